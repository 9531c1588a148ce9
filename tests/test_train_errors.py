"""Bad training input fails before compiling with one line naming the key; a workdir of another run is refused
unchanged; a damaged newest checkpoint or a failing checkpoint writer is handled by the loop."""
import hashlib
import logging
import pathlib
import resource
import shutil
import signal
import subprocess
import sys

import jax
import pytest

from ldm_jax import sharding as shd
from ldm_jax import train
from ldm_jax.checkpoint import CheckpointSaveError, Checkpointer
from ldm_jax.training import ldm, loop
from ldm_jax.training.objective import ConfigError
from ldm_jax.training.trainer import Trainer
from training_utils import batches, host, max_diff, shared_objective, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def no_compile(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("compiled although the config is bad")

    monkeypatch.setattr(Trainer, "jit_step", refuse)
    monkeypatch.setattr(Trainer, "create_state", refuse)


@pytest.mark.parametrize("over,want", [
    ({"optim.lr": -1e-4}, "optim.lr=-0.0001 must be a finite number > 0"),
    ({"optim.lr": 0.0}, "optim.lr=0.0 must be a finite number > 0"),
    ({"num_steps": 0}, "num_steps=0 must be a whole number >= 1"),
    ({"num_steps": -5}, "num_steps=-5 must be a whole number >= 1"),
    ({"image_size": 16}, "image_size=16 and data.resolution=8 differ"),
    ({"mesh": (3, 1, 1)}, "mesh=(3, 1, 1) does not fit the 8 devices"),
])
def test_bad_values_fail_before_compiling(tmp_path, no_compile, over, want):
    with pytest.raises(ConfigError, match=want.replace("(", r"\(").replace(")", r"\)")):
        train.run(tiny_config("test", **over), tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()


def test_workdir_that_is_a_file(tmp_path, no_compile):
    (tmp_path / "run").write_text("")
    with pytest.raises(ConfigError, match=r"--workdir .*run is a file, not a directory"):
        train.run(tiny_config("test"), tmp_path / "run")


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ldm_jax.train", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def test_train_cli_errors_are_one_line(tmp_path):
    res = _cli(f"--config={ROOT / 'configs' / 'ldm_tiny.py'}:bogus", f"--workdir={tmp_path / 'a'}", cwd=ROOT)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("config error: ") and \
        "unknown ldm_tiny arguments ['bogus']; use test, class, none" in res.stderr.strip().splitlines()[-1]
    res = _cli(f"--config={ROOT / 'configs' / 'ldm_tiny.py'}:test", f"--workdir={tmp_path / 'b'}",
               "--config.optim.lr=-1e-4", cwd=ROOT)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == "config error: optim.lr=-0.0001 must be a finite number > 0, e.g. 1e-4"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 4-step run (checkpoints 2 and 4) and the config it ran with."""
    config = tiny_config("test", num_steps=4, **{"checkpoint.every": 2})
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    wd = tmp_path_factory.mktemp("finished")
    result = loop.train(config, wd, shared_objective("test"), dataset=batches(config, mesh), mesh=mesh)
    return config, mesh, wd, result


def _digest(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_resume_with_another_architecture_is_refused_and_changes_nothing(finished, tmp_path):
    config, mesh, wd, _ = finished
    run = tmp_path / "run"
    shutil.copytree(wd, run)
    before = _digest(run)
    other = tiny_config("test", num_steps=4, **{"checkpoint.every": 2, "unet.model_channels": 64})
    with pytest.raises(ConfigError) as err:
        loop.train(other, run, ldm.build(other), dataset=batches(other, mesh), mesh=mesh)
    msg = str(err.value)
    assert f"{run} holds a run of another configuration" in msg and "unet.model_channels: 32 -> 64" in msg
    assert "Nothing was changed" in msg and "another --workdir" in msg
    assert _digest(run) == before  # checkpoints byte-identical, config.json still the run's


def test_resume_with_changed_settings_keeps_the_old_record(finished, tmp_path, caplog):
    config, mesh, wd, _ = finished
    run = tmp_path / "run"
    shutil.copytree(wd, run)
    old = (run / "config.json").read_text()
    changed = tiny_config("test", num_steps=4, **{"checkpoint.every": 2, "optim.lr": 1e-4})
    with caplog.at_level(logging.WARNING, logger="ldm_jax.train"):
        result = loop.train(changed, run, ldm.build(changed), dataset=batches(changed, mesh), mesh=mesh)
    assert result.start_step == 4 and "changed settings: optim.lr: 0.0002 -> 0.0001" in caplog.text
    assert (run / "config.4.json").read_text() == old and '"lr": 0.0001' in (run / "config.json").read_text()


def test_damaged_newest_checkpoint_resumes_from_the_previous(finished, tmp_path, caplog):
    config, mesh, wd, full = finished
    run = tmp_path / "run"
    shutil.copytree(wd, run)
    data = max((f for f in (run / "checkpoints" / "4" / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit: orbax alone would restore it as a wrong number
    data.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="ldm_jax.checkpoint"):
        resumed = loop.train(config, run, shared_objective("test"), dataset=batches(config, mesh), mesh=mesh)
    assert "checkpoint step 4" in caplog.text and "is damaged" in caplog.text
    assert resumed.start_step == 2 and resumed.losses == full.losses[2:]
    assert max_diff(host(resumed.state), host(full.state)) == 0.0
    assert (tmp_path / "run" / "checkpoints-damaged" / "4").is_dir()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax drops the failed write
def test_failing_checkpoint_writer_stops_the_run(finished, tmp_path, monkeypatch):
    """Every write past 64 KiB fails in the OS (EFBIG) from the step-4 save on, as a full disk (ENOSPC) does."""
    config, mesh, _, full = finished
    real_save, consumed = Checkpointer.save, []
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.getsignal(signal.SIGXFSZ)

    def save(self, step, *a, **k):
        if step == 4:
            self.wait()  # step 2 is on disk before the limit
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))
        return real_save(self, step, *a, **k)

    class Counting(type(batches(config, mesh))):
        def host_batch(self, index):
            consumed.append(index)
            return super().host_batch(index)

    monkeypatch.setattr(Checkpointer, "save", save)
    longer = tiny_config("test", num_steps=8, **{"checkpoint.every": 2})
    data = Counting(mesh, 16, 8, text_length=8, vocab_size=64)
    try:
        with pytest.raises(CheckpointSaveError, match=r"could not save step 4 to .*checkpoints.*step 2, is intact"):
            loop.train(longer, tmp_path / "run", shared_objective("test"), dataset=data, mesh=mesh)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert len(consumed) <= 6  # stopped within a step or two of the failed save, not at step 8
    monkeypatch.setattr(Checkpointer, "save", real_save)
    resumed = loop.train(config, tmp_path / "run", shared_objective("test"), dataset=batches(config, mesh), mesh=mesh)
    assert resumed.start_step == 2 and resumed.losses == full.losses[2:]
