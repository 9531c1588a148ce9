"""Scoring every caption attribute of the shapes main job: the classifier on rendered captions, the eval's
held-out / in-distribution blocks, eval.json and TensorBoard, with a fake pipeline that draws what it is told."""
import json

import numpy as np
import pytest

from ldm_jax import evaluation
from ldm_jax.data import shapes as S


def tb_scalars(logdir):
    """{tag: [(step, value)]} from the TFRecord event files tensorboardX wrote (no tensorboard package needed)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


class DrawPipe:
    """Renders each prompt exactly, after `edit(attrs)` (to make the "model" wrong on purpose)."""

    step = 7

    def __init__(self, edit=lambda a: a):
        self.edit = edit
        self.calls = []

    def generate(self, prompts, *, height, width, **kw):
        self.calls.append((list(prompts), kw))
        return np.stack([S.render(self.edit(S.parse_caption(p)), height) for p in prompts])


def test_indistribution_prompts_are_fresh_trained_pairs():
    spec = S.ShapesSpec()
    prompts = S.indistribution_prompts(spec, 200, seed=5)
    attrs = [S.parse_caption(p) for p in prompts]
    assert {(a["color"], a["shape"]) for a in attrs} == set(spec.train_pairs)  # every trained pair, no held-out one
    assert {a["position"] for a in attrs} == set(spec.positions) and {a["size"] for a in attrs} == set(spec.sizes)
    assert prompts == S.indistribution_prompts(spec, 200, seed=5) != S.indistribution_prompts(spec, 200, seed=6)


def test_score_counts_each_attribute_separately():
    spec = S.ShapesSpec()
    prompts = S.indistribution_prompts(spec, 6, seed=0)
    images = [S.render(S.parse_caption(p), 32) for p in prompts]
    moved = []
    for p in prompts[:3]:  # right everything but the position
        a = S.parse_caption(p)
        a["position"] = "top left" if a["position"] == "bottom right" else "bottom right"
        moved.append(S.render(a, 32))
    got = S.score(moved + images[3:], prompts, spec)
    assert got == {"color": 1.0, "shape": 1.0, "size": 1.0, "position": 0.5, "background": 1.0, "both": 1.0, "all": 0.5}
    assert S.chance_levels(spec) == pytest.approx({"color": 1 / 6, "shape": 1 / 3, "size": 1 / 2, "position": 1 / 9,
                                                   "background": 1 / 3})


def test_shape_breakdown_counts_each_kind_and_what_it_was_read_as():
    spec = S.ShapesSpec()
    wanted = [S.parse_caption(p) for p in S.indistribution_prompts(spec, 60, seed=3)]
    # circles drawn as squares, everything else right
    images = [S.render({**a, "shape": "square" if a["shape"] == "circle" else a["shape"]}, 32) for a in wanted]
    got = S.shape_breakdown(images, wanted, spec)
    kinds = {f"{a['size']} {a['shape']}" for a in wanted}
    assert set(got) == kinds and list(got)[:2] == ["large circle", "small circle"]  # ordered by shape, then size
    for kind, b in got.items():
        n = sum(f"{a['size']} {a['shape']}" == kind for a in wanted)
        assert b["count"] == n
        if kind.endswith("circle"):
            assert b["accuracy"] == 0.0 and b["read_as"] == {"square": n}
        else:
            assert b["accuracy"] == 1.0 and b["read_as"] == {kind.split()[1]: n}
    line = S.format_breakdown(got)
    n_small = got["small circle"]["count"]
    assert f"small circle 0% ({n_small}; {n_small} read as square)" in line and "large square 100% (" in line
    with pytest.raises(ValueError, match="as many images"):
        S.shape_breakdown(images[:2], wanted, spec)


def test_evaluate_shapes_scores_both_splits_and_logs(tmp_path):
    spec = S.ShapesSpec()
    # a "model" that always draws a circle: right on held-out blue circles only, and on trained circles
    pipe = DrawPipe(lambda a: {**a, "shape": "circle"})
    metrics, images = evaluation.evaluate_shapes(pipe, spec, per_pair=4, in_distribution=30, steps=3)
    prompts, kw = pipe.calls[0]
    assert len(prompts) == 12 + 30 and images.shape == (42, 32, 32, 3) and kw["steps"] == 3
    h, d = metrics["heldout"], metrics["in_distribution"]
    assert h["num_samples"] == metrics["num_samples"] == 12 and d["num_samples"] == 30
    assert h["shape"] == metrics["shape_accuracy"] == pytest.approx(1 / 3)  # blue circle is 1 of 3 held-out pairs
    assert h["per_pair"]["blue circle"]["shape"] == 1.0 and h["per_pair"]["red triangle"]["shape"] == 0.0
    circles = np.mean([S.parse_caption(p)["shape"] == "circle" for p in prompts[12:]])
    assert d["shape"] == pytest.approx(circles) and 0 < circles < 1
    for split in (h, d):
        assert split["color"] == split["size"] == split["position"] == split["background"] == 1.0

    path = evaluation.write_eval(tmp_path, metrics, images)
    assert json.loads(path.read_text())["in_distribution"]["shape"] == pytest.approx(circles)
    evaluation.log_to_tensorboard(tmp_path, metrics, 7)
    scalars = tb_scalars(tmp_path / "tb")
    assert scalars["eval/heldout/shape"] == [(7, pytest.approx(1 / 3))]
    assert scalars["eval/in_distribution/position"] == [(7, 1.0)]
    # where the shape accuracy is lost, per size and shape: every circle right, every other kind read as a circle
    for split in (h, d):
        for kind, b in split["shape_by_kind"].items():
            assert b["accuracy"] == (1.0 if kind.endswith("circle") else 0.0) and set(b["read_as"]) == {"circle"}
    assert sum(b["count"] for b in d["shape_by_kind"].values()) == 30
    assert {k.split()[1] for k in h["shape_by_kind"]} == {"triangle", "square", "circle"}
    text = evaluation.format_metrics(metrics)
    assert "in_distribution (30 samples): color 100.0%" in text and "heldout (12 samples)" in text
    assert text.count("shape by kind: ") == 2 and "read as circle)" in text


def test_run_settings_fill_what_is_not_given_from_the_runs_final_eval():
    import ml_collections

    from ldm_jax.evaluation.shapes_eval import run_settings

    config = ml_collections.ConfigDict(dict(final_eval=dict(kind="shapes", per_pair=16, steps=20, guidance_scale=2.0,
                                                            sampler="dpmpp_2m", batch_size=48)))
    got = run_settings(config, steps=None, guidance_scale=1.5, per_pair=None, seed=None, sampler="euler")
    assert got == {"steps": 20, "guidance_scale": 1.5, "per_pair": 16, "sampler": "euler"}  # seed: the default
    assert run_settings(None, steps=None, guidance_scale=3.0) == {"guidance_scale": 3.0}
