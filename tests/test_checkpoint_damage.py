"""Damaged checkpoints on disk are detected at restore and set aside; a failing writer stops with a clear error."""
import json
import logging
import pathlib
import resource
import signal

import jax
import numpy as np
import pytest

from ldm_jax.checkpoint import (CHECKSUMS, CheckpointMismatchError, Checkpointer, CheckpointSaveError,
                                DamagedCheckpointError, verify)


def _state(step: int, n: int = 4096) -> dict:
    return {"w": np.arange(n, dtype=np.float32) * step, "b": {"c": np.full((3, 4), step, np.float32)}}


def _abstract(state: dict) -> dict:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state)


def _run(directory: pathlib.Path, steps=(1, 2), async_save=True) -> None:
    ck = Checkpointer(directory, every=1, keep=5, async_save=async_save)
    for s in steps:
        ck.save(s, _state(s), {"index": s}, {"step": s})
    ck.close()


def _biggest(step_dir: pathlib.Path) -> pathlib.Path:
    return max((f for f in step_dir.rglob("*") if f.is_file() and f.name != CHECKSUMS), key=lambda f: f.stat().st_size)


def _truncate(d):
    f = _biggest(d)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(d):  # one bit in the middle of the array data: orbax alone restores it as wrong numbers
    f = _biggest(d)
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x10
    f.write_bytes(bytes(b))


def _remove(name):
    return lambda d: (d / name).unlink()


DAMAGE = {"truncated": _truncate, "bit_flip": _flip, "no_state_metadata": _remove("state/_METADATA"),
          "no_meta": _remove("meta/metadata"), "no_step_metadata": _remove("_CHECKPOINT_METADATA")}


@pytest.mark.parametrize("async_save", [True, False])
def test_every_save_is_sealed_with_checksums(tmp_path, async_save):
    _run(tmp_path / "ck", async_save=async_save)
    for s in (1, 2):
        files = json.loads((tmp_path / "ck" / str(s) / CHECKSUMS).read_text())["files"]
        assert any(k.startswith("state/") for k in files) and "meta/metadata" in files
        assert verify(tmp_path / "ck" / str(s)) == []


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_falls_back_to_previous_and_is_set_aside(tmp_path, caplog, kind):
    ck_dir = tmp_path / "checkpoints"
    _run(ck_dir)
    DAMAGE[kind](ck_dir / "2")
    ck = Checkpointer(ck_dir)
    with caplog.at_level(logging.WARNING, logger="ldm_jax.checkpoint"):
        step, state, data, meta = ck.restore_latest(_abstract(_state(0)))
    assert (step, data, meta) == (1, {"index": 1}, {"step": 1})
    np.testing.assert_array_equal(np.asarray(state["w"]), _state(1)["w"])
    assert f"checkpoint step 2 in {ck_dir} is damaged" in caplog.text and "resuming from step 1" in caplog.text
    assert (tmp_path / "checkpoints-damaged" / "2" / "state").is_dir()  # kept for inspection, out of orbax's way
    assert ck.all_steps() == [1]
    ck.save(2, _state(2), {"index": 2}, {"step": 2}, force=True)  # the resumed run can write step 2 again
    ck.close()
    assert verify(ck_dir / "2") == []


def test_checkpoint_without_checksums_falls_back_when_orbax_cannot_read_it(tmp_path, caplog):
    ck_dir = tmp_path / "checkpoints"
    _run(ck_dir)
    (ck_dir / "2" / CHECKSUMS).unlink()  # as written before checksums existed
    _truncate(ck_dir / "2")
    ck = Checkpointer(ck_dir)
    with caplog.at_level(logging.WARNING, logger="ldm_jax.checkpoint"):
        assert ck.restore_latest(_abstract(_state(0)))[0] == 1
    ck.close()
    assert "orbax could not read it back" in caplog.text


def test_all_damaged_or_other_shapes_moves_nothing(tmp_path):
    ck_dir = tmp_path / "checkpoints"
    _run(ck_dir)
    ck = Checkpointer(ck_dir)
    with pytest.raises(CheckpointMismatchError, match=r"step 2 .* another shape .*w: stored \(4096,\), expected \(8,\)"):
        ck.restore_latest(_abstract(_state(0, n=8)))
    for s in (1, 2):
        _flip(ck_dir / str(s))
    with pytest.raises(DamagedCheckpointError, match="every checkpoint .* is damaged .*step 2.*step 1.*nothing was changed"):
        ck.restore_latest(_abstract(_state(0)))
    ck.close()
    assert sorted(p.name for p in ck_dir.iterdir()) == ["1", "2"] and not (tmp_path / "checkpoints-damaged").exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax drops the failed write
def test_failing_writer_raises_naming_the_directory_and_keeps_the_previous(tmp_path):
    """The file-size limit makes every write past 64 KiB fail in the OS (EFBIG), as a full disk does (ENOSPC)."""
    ck_dir = tmp_path / "checkpoints"
    ck = Checkpointer(ck_dir, every=1)
    big = _state(1, n=1 << 16)  # 256 KiB array
    ck.save(1, big, {"index": 1}, {"step": 1})
    ck.wait()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))
    try:
        ck.save(2, _state(2, n=1 << 16), {"index": 2}, {"step": 2})
        with pytest.raises(CheckpointSaveError) as err:
            ck.wait()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    msg = str(err.value)
    assert f"could not save step 2 to {ck_dir}" in msg and "File too large" in msg
    assert "the previous checkpoint, step 1, is intact" in msg and "Stopping" in msg
    ck.close()  # quiet after the reported failure
    again = Checkpointer(ck_dir)
    step, state, data, _ = again.restore_latest(_abstract(big))
    again.close()
    assert (step, data) == (1, {"index": 1})
    np.testing.assert_array_equal(np.asarray(state["w"]), big["w"])


def test_readers_skip_a_damaged_newest(tmp_path, caplog):
    ck_dir = tmp_path / "checkpoints"
    _run(ck_dir)
    _flip(ck_dir / "2")
    ck = Checkpointer(ck_dir)
    with caplog.at_level(logging.WARNING, logger="ldm_jax.checkpoint"):
        assert ck.latest_intact_step() == 1 and ck.latest_step() == 2
    ck.close()
    assert "skipping damaged checkpoint step 2" in caplog.text and (ck_dir / "2").is_dir()  # readers move nothing
