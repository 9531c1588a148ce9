"""The evaluator hook in a real (tiny, unconditional) training run: records in WORKDIR/metrics.jsonl at the
eval steps; an evaluation killed mid-way is redone after the restart and nothing half-written is left."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

from ldm_jax import sharding as shd
from ldm_jax.data.config import default_data_config
from ldm_jax.evaluation import evaluator
from ldm_jax.training import eval_hook, loop
from training_utils import batches, shared_objective, tiny_config


def _config(tmp_path):
    config = tiny_config("test,none", num_steps=4, **{"checkpoint.every": 2, "checkpoint.async_save": False})
    folder = tmp_path / "images"  # the reference data: ten 8x8 images (the tiny model's size)
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    with config.unlocked():
        data = default_data_config()
        data.update(source="folder", path=str(folder), data_dir=str(tmp_path / "tfds"), resolution=8, caption_key="",
                    label_key="")
        config.data = data
        config.eval = evaluator.default_eval_config()
        config.eval.update(every=2, num_samples=4, metrics="fid_first_stage,kid_first_stage", steps=1, batch_size=4,
                           kid_subsets=2, kid_subset_size=4, split="train")
    return config


class _Killed(Exception):
    pass


def test_eval_hook_records_and_redoes_an_interrupted_evaluation(tmp_path, monkeypatch):
    config = _config(tmp_path)
    objective = shared_objective("test,none")  # compiled steps shared with the other training tests
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    wd = tmp_path / "run"

    calls = []
    real_call = evaluator.Evaluator.__call__

    def dies_at_step_4(self, step, *args, **kwargs):
        calls.append(step)
        if step == 4:
            raise _Killed
        return real_call(self, step, *args, **kwargs)

    monkeypatch.setattr(evaluator.Evaluator, "__call__", dies_at_step_4)
    with pytest.raises(_Killed):
        loop.train(config, wd, objective, eval_hook.eval_hooks(config, objective, wd),
                   dataset=batches(config, mesh), mesh=mesh, max_steps=4)
    assert calls == [2, 4]
    [rec] = evaluator.read_metrics(wd)
    assert rec["step"] == 2 and rec["num_samples"] == 4 and rec["fid_first_stage"] > 0
    assert not (wd / "metrics.jsonl.tmp").exists() and (wd / "eval" / "ref_first_stage_train_all.npz").is_file()

    monkeypatch.setattr(evaluator.Evaluator, "__call__", real_call)
    with config.unlocked():
        config.num_steps = 5
    result = loop.train(config, wd, objective, eval_hook.eval_hooks(config, objective, wd),
                        dataset=batches(config, mesh), mesh=mesh)
    assert result.start_step == 4
    records = evaluator.read_metrics(wd)
    assert [r["step"] for r in records] == [2, 5] and records[1]["redo_of"] == 4  # redone after the restart
    assert json.loads((wd / "eval" / "ref_first_stage_train_all.json").read_text())["num"] == 10


def test_eval_hooks_check_the_config_first(tmp_path):
    config = _config(tmp_path)
    with config.unlocked():
        config.eval.metrics = "fid"
    with pytest.raises(ValueError, match="eval.inception"):
        eval_hook.eval_hooks(config, None, tmp_path)
    with config.unlocked():
        config.eval.every = 0
    assert eval_hook.eval_hooks(config, None, tmp_path) == []
