"""The shape-only memory plan (`python -m ldm_jax.train ... --dry_run`, ldm_jax/training/memory.py).

Checked two independent ways: on 8 fake CPU devices the plan equals the bytes the sharded state really
allocates on each device (tiny SDXL), and for full-size SDXL base the per-device bytes are the parameter
counts diffusers/transformers report (tests/goldens/*param_counts.json) x 4 bytes / the shards.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from ldm_jax import sharding as shd
from ldm_jax.training import memory, registry
from ldm_jax.training import trainer as tr
from training_utils import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDENS = ROOT / "tests" / "goldens"


def _parts(parts):
    return {p.name: p for p in parts}


@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 2, 2)])
def test_plan_equals_the_allocated_shards(mesh):
    config = load_config("ldm_sdxl", "tiny")
    objective = registry.make_objective(config)
    boxed = memory.abstract_state(objective, int(config.seed))
    plan = _parts(memory.state_memory(objective, memory.abstract_mesh(mesh, 8), boxed=boxed))
    # the state's leaves really placed with the run's shardings on 8 devices (zeros: no init compile needed)
    abstract, shardings = tr.state_shardings(objective, shd.make_mesh(mesh), int(config.seed))
    state = jax.tree_util.tree_map(lambda a, s: jax.device_put(np.zeros(a.shape, a.dtype), s), abstract, shardings)
    per_device: dict[str, dict] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path({f: getattr(state, f) for f in
                                                           ("params", "opt_state", "ema", "frozen")}):
        name = memory._part_name(path)
        for s in leaf.addressable_shards:
            d = per_device.setdefault(name, {})
            d[s.device] = d.get(s.device, 0) + s.data.nbytes
    assert set(per_device) == {n for n in plan if "/" in n}
    for name, by_device in per_device.items():
        assert len(by_device) == 8 and set(by_device.values()) == {plan[name].device_bytes}, name
    assert plan["params/model/unet"].device_bytes < plan["params/model/unet"].total_bytes  # it is sharded
    assert plan["gradients (during the step)"].device_bytes == plan["params/model/unet"].device_bytes
    assert plan["total"].device_bytes == sum(p.device_bytes for n, p in plan.items() if n != "total")


def test_sdxl_base_plan_is_the_published_counts():
    unet = json.loads((GOLDENS / "unet_param_counts.json").read_text())["sdxl-base"]
    towers = json.loads((GOLDENS / "sdxl_param_counts.json").read_text())
    config = load_config("ldm_sdxl", "finetune")
    objective = registry.make_objective(config)
    boxed = memory.abstract_state(objective, int(config.seed))  # one trace for both meshes
    dp = _parts(memory.state_memory(objective, memory.abstract_mesh((8, 1, 1), 8), boxed=boxed))
    assert dp["params/model/unet"].count == unet and dp["params/model/unet"].device_bytes == 4 * unet  # replicated
    assert dp["ema/model/unet"].device_bytes == 4 * unet
    assert 0 < dp["opt_state/model"].device_bytes - 2 * 4 * unet <= 64  # AdamW mu, nu + int32 step counters
    for name, count in towers.items():
        assert dp[f"frozen/text/{name}"].device_bytes == 4 * count, name
    fsdp = _parts(memory.state_memory(objective, memory.abstract_mesh((1, -1, 1), 8), boxed=boxed))
    u = fsdp["params/model/unet"].device_bytes
    assert 4 * unet / 8 <= u <= 1.01 * 4 * unet / 8  # all but norms and biases are split over the 8 devices
    assert fsdp["total"].device_bytes < dp["total"].device_bytes / 3


def test_dry_run_cli_prints_the_plan(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "ldm_jax.train", "--config=configs/ldm_sdxl.py:tiny", f"--workdir={tmp_path / 'wd'}",
           "--dry_run", "--devices=8", "--config.mesh=(2,4,1)", "--config.global_batch_size=8"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert not (tmp_path / "wd").exists()  # nothing written
    config = load_config("ldm_sdxl", "tiny")
    plan = _parts(memory.state_memory(registry.make_objective(config), memory.abstract_mesh((2, 4, 1), 8)))
    line = next(x for x in out.stdout.splitlines() if x.strip().startswith("params/model/unet"))
    assert "mesh data=2 fsdp=4 tensor=1 (8 devices)" in out.stdout
    assert line.split()[1] == f"{plan['params/model/unet'].count:,}"
    assert "per device MiB" in out.stdout  # a tiny state: MiB
    assert float(line.split()[3]) == round(plan["params/model/unet"].device_bytes / 2**20, 3) > 0
    bad = subprocess.run(cmd[:-2] + ["--config.mesh=(3,1,1)"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode != 0 and "does not fit 8 devices" in bad.stderr
