"""Checkpoints: exact resume, restore onto another mesh, SIGTERM saves and exits, kill -9 leaves a usable run."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ldm_jax import sharding as shd
from ldm_jax.checkpoint import Checkpointer, abstract_with_shardings
from ldm_jax.training import ldm, loop
from ldm_jax.training import state as st
from ldm_jax.training import trainer as tr
from training_utils import batches, host, max_diff, shared_objective, tiny_config

HERE = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = tiny_config("test", num_steps=6, **{"checkpoint.every": 2})
    objective = shared_objective("test")
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    full_dir = tmp_path_factory.mktemp("full")
    full = loop.train(config, full_dir, objective=objective, dataset=batches(config, mesh), mesh=mesh)
    return config, objective, mesh, full_dir, full


def test_resume_reproduces_uninterrupted_losses(setup, tmp_path):
    config, objective, mesh, _, full = setup
    assert len(full.losses) == 6 and np.isfinite(full.losses).all()
    first = loop.train(config, tmp_path, objective=objective, dataset=batches(config, mesh), mesh=mesh, max_steps=3)
    assert first.losses == full.losses[:3]
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [2]  # step 3 was not a save step: the resumed run redoes it
    ckpt.close()
    resumed = loop.train(config, tmp_path, objective=objective, dataset=batches(config, mesh), mesh=mesh)
    assert resumed.start_step == 2
    assert resumed.losses == full.losses[2:]  # bit-exact on CPU
    assert max_diff(host(resumed.state), host(full.state)) == 0.0


def test_keep_policy_and_meta(setup):
    config, _, _, full_dir, full = setup
    ckpt = Checkpointer(full_dir / "checkpoints")
    assert ckpt.all_steps() == [2, 4, 6]  # keep=3
    meta = ckpt.read_meta(6)
    assert meta["objective"] == "ldm" and meta["step"] == 6
    np.testing.assert_allclose(meta["scale_factor"], float(full.state.extra["scale_factor"]), rtol=1e-6)
    ckpt.close()


def test_restore_onto_other_meshes(setup, tmp_path):
    config, objective, _, full_dir, full = setup
    ref = host(full.state)
    abstract, sh8 = tr.state_shardings(objective, shd.make_mesh((4, 2, 1)), config.seed)
    ckpt = Checkpointer(full_dir / "checkpoints")
    state8, data_state, _ = ckpt.restore(None, abstract_with_shardings(abstract, sh8))
    ckpt.close()
    assert data_state == {"index": 6}
    leaf = jax.tree_util.tree_leaves(state8.params)[0]
    assert len(leaf.sharding.device_set) == 8
    assert max_diff(host(state8), ref) == 0.0
    out = Checkpointer(tmp_path / "ck8", async_save=False)  # 8 devices -> disk -> 1 device
    out.save(6, state8, data_state, {})
    out.wait()
    _, sh1 = tr.state_shardings(objective, shd.make_mesh((1, 1, 1), jax.devices()[:1]), config.seed)
    state1, _, _ = out.restore(6, abstract_with_shardings(abstract, sh1))
    out.close()
    assert max_diff(host(state1), ref) == 0.0


def test_nan_stops_naming_step_and_checkpoint(setup, tmp_path):
    config, objective, mesh, _, _ = setup

    class Poisoned(type(batches(config, mesh))):
        def host_batch(self, index):
            b = super().host_batch(index)
            if index == 4:
                b["image"][:] = np.nan
            return b

    data = Poisoned(mesh, int(config.global_batch_size), int(config.image_size), text_length=int(config.cond.text.max_length),
                    vocab_size=int(config.cond.text.vocab_size))
    with pytest.raises(FloatingPointError, match=r"at step 5.*last good checkpoint is step 4"):
        loop.train(config, tmp_path, objective=objective, dataset=data, mesh=mesh)


def _worker(workdir, steps, out, env):
    cmd = [sys.executable, str(HERE / "train_worker.py"), str(workdir), "test", str(steps), "2", str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(ckdir, at_least, proc, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name) for p in ckdir.glob("*") if p.name.isdigit()] if ckdir.exists() else []
        if steps and max(steps) >= at_least:
            return max(steps)
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early: {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint >= {at_least} within {timeout}s")


def test_sigterm_saves_and_kill9_resumes(setup, tmp_path):
    config, objective, _, _, full = setup
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    wd, ck = tmp_path / "run", tmp_path / "run" / "checkpoints"
    proc = _worker(wd, 100000, tmp_path / "a.json", env)
    try:
        _wait_for_step(ck, 2, proc, timeout=300)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["stopped"] == "preempted"
    c = Checkpointer(ck)
    assert c.latest_step() == a["step"] >= 2  # the preemption checkpoint is the step it stopped at
    c.close()

    proc = _worker(wd, 100000, tmp_path / "b.json", env)
    try:
        step = _wait_for_step(ck, a["step"] + 4, proc, timeout=300)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.stdout.close()
    c = Checkpointer(ck)
    latest = c.latest_step()
    assert latest is not None and latest >= step - 2
    abstract, sh = tr.state_shardings(objective, shd.make_mesh((1, 1, 1), jax.devices()[:1]), config.seed)
    state, data_state, meta = c.restore(latest, abstract_with_shardings(abstract, sh))
    c.close()
    assert int(state.step) == latest == meta["step"] and data_state == {"index": latest}
    # Same config and data: the subprocess ran the in-process run's steps. It is compiled in a process with 1 host
    # device instead of 8, and XLA:CPU may then round a reduction differently (seen once: 6e-8 at step 5), so this
    # cross-process check allows float32 rounding; bit-exact resume is checked in-process by
    # test_resume_reproduces_uninterrupted_losses.
    n = min(len(a["losses"]), 6)
    assert n >= 2
    np.testing.assert_allclose(a["losses"][:n], full.losses[:n], rtol=1e-6, atol=0)


def test_first_stage_from_autoencoder_workdir(tmp_path):
    """An autoencoder workdir's params["ae"] becomes the LDM's frozen first stage; mismatched kwargs fail early."""
    from flax import linen as nn

    from ldm_jax.training import ldm_io
    from ldm_jax.training.objective import ConfigError

    objective = shared_objective("test")
    abstract = nn.meta.unbox(jax.eval_shape(objective.init, jax.random.key(0)))["frozen"]["first_stage"]
    rng = np.random.default_rng(0)
    ae = jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)
    kwargs = objective.config.first_stage.kwargs.to_dict()
    state = st.TrainState(step=np.int32(7), params={"ae": ae}, opt_state={"ae": {"count": np.int32(7)}}, ema={},
                          frozen={"lpips": {"w": np.ones(2, np.float32)}}, extra={"x": np.float32(0)},
                          rng=np.zeros(2, np.uint32))
    ck = Checkpointer(tmp_path / "ae" / "checkpoints", async_save=False)
    ck.save(7, state, {}, {"objective": "autoencoder", "config": {"ema_groups": []},
                           "first_stage": {"kind": "kl", "kwargs": kwargs}})
    ck.close()
    config = tiny_config("test", **{"first_stage.checkpoint": str(tmp_path / "ae")})
    ldm_io.check_first_stage(config)
    loaded = ldm_io.load_first_stage(config, objective.first_stage, abstract)
    assert max_diff(loaded, ae) == 0.0
    bad = tiny_config("test", **{"first_stage.checkpoint": str(tmp_path / "ae"), "first_stage.kwargs.z_channels": 8})
    with pytest.raises(ConfigError, match="z_channels"):
        ldm_io.load_first_stage(bad, objective.first_stage, abstract)
