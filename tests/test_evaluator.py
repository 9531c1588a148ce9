"""The periodic evaluator (config.eval): its metrics.jsonl record is the FID of exactly the samples it drew,
against the cached reference statistics of the data split; records are replaced atomically; config errors name
the key. Offline: tiny diffusers folder + built-in shapes data, in the first-stage feature space."""
import json

import ml_collections
import numpy as np
import pytest

from ldm_jax.data.config import default_data_config
from ldm_jax.evaluation import evaluator, fid, first_stage, reference, run
from ldm_jax.pipeline import load_pretrained


class _Writer:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass


def _configs(tmp_path):
    data = default_data_config()
    data.data_dir = str(tmp_path / "tfds")
    data.shapes.update(num_train=16, num_test=12, num_heldout=4)
    cfg = evaluator.default_eval_config()
    cfg.update(every=5, num_samples=6, metrics="fid_first_stage,kid_first_stage", steps=1, batch_size=4,
               kid_subsets=3, kid_subset_size=5)
    return data, cfg


def test_evaluator_logs_the_fid_of_its_samples(tmp_path, goldens_dir):
    data, cfg = _configs(tmp_path)
    pipe = load_pretrained(goldens_dir / "tiny_sd")
    writer = _Writer()
    ev = evaluator.Evaluator(cfg, data, tmp_path)
    assert not ev.done(5)
    values = ev(5, pipe, pipe.params, writer)
    assert ev.done(5) and not ev.done(10)
    [record] = evaluator.read_metrics(tmp_path)
    assert record["step"] == 5 and record["num_samples"] == 6
    assert record["fid_first_stage"] == pytest.approx(values["fid_first_stage"])
    assert {t for t, _, s in writer.scalars} == {"eval/fid_first_stage", "eval/kid_first_stage"}

    # the same samples and the same reference, recomputed here
    feats = first_stage.from_pipeline(pipe, batch_size=4)
    prompts = run.read_prompts("data:test", 6, data)
    images = np.concatenate([c[0] for c in run.sample_chunks(pipe, prompts, 6, chunk=4, seed=0, steps=1,
                                                             sampler="dpmpp_2m", schedule="karras", guidance_scale=3.0)])
    real, n = reference.dataset_images(data, "test")
    assert n == 12
    ref = fid.feature_stats(feats(real))
    assert record["fid_first_stage"] == pytest.approx(fid.fid_from_features(feats(images), ref), rel=1e-5)
    cache = tmp_path / "eval" / "ref_first_stage_test_all.npz"
    np.testing.assert_allclose(fid.load_stats(cache).sigma, ref.sigma, rtol=1e-5, atol=1e-7)

    # a second evaluation of the same step replaces its record; the file never holds a partial line
    evaluator.append_metrics(tmp_path, {"step": 5, "fid_first_stage": 1.0})
    evaluator.append_metrics(tmp_path, {"step": 3, "fid_first_stage": 2.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [3, 5] and json.loads(lines[1])["fid_first_stage"] == 1.0
    assert not (tmp_path / "metrics.jsonl.tmp").exists()

    # the next evaluation of a training run: the train step has donated the state's buffers since, frozen ones too,
    # so the first-stage weights come in new buffers and the old ones are gone
    import jax

    fresh = jax.tree_util.tree_map(lambda a: jax.numpy.array(a, copy=True), dict(pipe.params))
    for a in jax.tree_util.tree_leaves(pipe.params["vae"]):
        a.delete()
    again = ev(10, pipe, fresh, writer)
    assert again["fid_first_stage"] == pytest.approx(values["fid_first_stage"], rel=1e-5)


@pytest.mark.parametrize("update, message", [
    (dict(metrics="fid,fidd"), "eval.metrics: unknown metrics \\['fidd'\\]"),
    (dict(metrics="fid"), "eval.inception"),
    (dict(metrics="clip_score"), "eval.clip"),
    (dict(num_samples=1), "eval.num_samples must be >= 2"),
    (dict(prompts_from=""), "eval.prompts_from is empty"),
])
def test_eval_config_errors_name_the_key(update, message):
    cfg = evaluator.default_eval_config()
    cfg.update({"every": 10, "metrics": "fid_first_stage", **update})
    with pytest.raises(ValueError, match=message):
        evaluator.check_eval_config(cfg, text_conditional=True)
    evaluator.check_eval_config(ml_collections.ConfigDict({**cfg.to_dict(), "every": 0}), text_conditional=True)
