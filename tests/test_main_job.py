"""The README's first command, in its smoke variant, for real: `python -m ldm_jax.train --config=configs/shapes.py:smoke`
trains both stages from one command, samples held-out prompts and scores them, leaving what the README promises."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parent.parent


def test_main_job_smoke_leaves_scores_samples_and_logs(tmp_path):
    wd = tmp_path / "shapes"
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "TFDS_DATA_DIR": str(tmp_path / "tfds")}
    cmd = [sys.executable, "-m", "ldm_jax.train", "--config=configs/shapes.py:smoke", f"--workdir={wd}",
           f"--config.data.data_dir={tmp_path / 'tfds'}", f"--config.first_stage_train.data.data_dir={tmp_path / 'tfds'}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]

    ev = json.loads((wd / "eval.json").read_text())
    assert ev["num_samples"] == 3 * 2 and ev["steps"] == 2  # 3 held-out pairs x per_pair 2 (the smoke settings)
    for k in ("color_accuracy", "shape_accuracy", "both_accuracy"):
        assert 0.0 <= ev[k] <= 1.0 and ev[k] * ev["num_samples"] == round(ev[k] * ev["num_samples"])
    assert ev["both_accuracy"] <= min(ev["color_accuracy"], ev["shape_accuracy"])
    assert "held-out shapes prompts (6 samples): color accuracy" in out.stdout + out.stderr
    assert ev["in_distribution"]["num_samples"] == 6 and set(ev["heldout"]) >= {"color", "shape", "size", "position",
                                                                                "background", "all"}
    assert "in_distribution (6 samples): color" in out.stdout + out.stderr
    timing = json.loads((wd / "timing.json").read_text())  # the per-stage table printed at the end
    stages = timing["stages"]
    assert "time per stage" in out.stdout and stages["stage 2/steps"]["count"] == 3  # 4 steps: 1 first + 3
    assert stages["stage 1/first step (trace + compile)"]["count"] == 1 and stages["stage 2/data"]["count"] == 4
    assert stages["stage 2/hook: samples"]["count"] == 1 and stages["final eval"]["count"] == 1
    top = sum(v["seconds"] for k, v in stages.items() if "/" not in k)
    # the stages cover the wall time with little left over (each value is rounded to 1 ms: allow that per term)
    assert 0.5 * timing["wall_seconds"] < top <= timing["wall_seconds"] + 0.001 * len(stages)
    assert sum(v["seconds"] for k, v in stages.items() if k.startswith("stage 2/")) \
        <= stages["stage 2"]["seconds"] + 0.001 * len(stages)

    ae = [json.loads(line) for line in (wd / "first_stage" / "reconstructions" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in ae] == [(4, "test"), (4, "heldout")]  # eval.extra_splits: the held-out
    assert all(0.0 <= r["color_kept"] <= 1.0 and r["psnr"] > 0 for r in ae)           # pairs' images too
    assert (wd / "eval_grid.png").stat().st_size > 0 and list((wd / "samples").glob("*.png"))
    assert list((wd / "tb").glob("events.out.tfevents.*")) and list((wd / "first_stage" / "tb").glob("events.out.tfevents.*"))
    [rec] = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]  # config.eval, step 4
    assert rec["step"] == 4 and rec["num_samples"] == 6 and rec["fid_first_stage"] > 0
    assert (wd / "tokenizer.json").exists() and (wd / "checkpoints" / "4").is_dir()

    # a re-score with another guidance into its own folder: the rest as the run scored itself, the run's files kept
    before = (wd / "eval.json").read_bytes()
    cmd = [sys.executable, "-m", "ldm_jax.evaluation", f"--workdir={wd}", "--guidance_scale=1.5", f"--out={tmp_path / 're'}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    re = json.loads((tmp_path / "re" / "eval.json").read_text())
    assert re["settings"]["guidance_scale"] == 1.5 and re["settings"]["steps"] == 2 and re["num_samples"] == 6
    assert (wd / "eval.json").read_bytes() == before and (tmp_path / "re" / "eval_grid.png").stat().st_size > 0
