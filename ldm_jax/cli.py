"""What the command-line programs share: a user error ends in one line and a non-zero exit, a bug in a traceback.

A user error is a bad flag, a missing or unreadable file, or a check of ours that names the bad input (the
`ValueError`s and `OSError`s raised in ldm_jax code before any work starts: unknown sampler, bad size, a
checkpoint that does not match its model, ...). The same exception types raised inside a library (jax, flax,
...) are bugs of ours or theirs and keep their traceback. `--verbosity=1` shows the traceback of any error.
"""
from __future__ import annotations

import pathlib
import pickle
import sys
import traceback
from typing import Callable

from absl import app, flags

from ldm_jax import compile_cache
from ldm_jax.checkpoint import CheckpointSaveError, DamagedCheckpointError

flags.DEFINE_string("compile_cache", None, "Folder of JAX's persistent compilation cache (default: "
                    f"${compile_cache.ENV} or ~/.cache/ldm_jax/xla; 'off' turns it off). A restarted run loads "
                    "its compiled programs from there instead of compiling them again.")

_PACKAGE = str(pathlib.Path(__file__).resolve().parent)
# Always the user's input, wherever raised: flags, files, and what a corrupt checkpoint file raises when unpickled.
_ALWAYS = (app.UsageError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError,
           pickle.UnpicklingError, CheckpointSaveError, DamagedCheckpointError)


def _raised_in_package(e: BaseException) -> bool:
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and str(pathlib.Path(frames[-1].filename).resolve()).startswith(_PACKAGE)


def is_user_error(e: BaseException, also: tuple[type[BaseException], ...] = ()) -> bool:
    """Whether `e` reports bad input (see the module docstring); `also` adds a program's own error types."""
    if isinstance(e, _ALWAYS + tuple(also)):
        return True
    return isinstance(e, (ValueError, OSError)) and _raised_in_package(e)


def one_line(e: BaseException) -> str:
    """The message of `e` on one line."""
    return " ".join(str(e).split()) or type(e).__name__


def enable_compile_cache() -> None:
    """Turns on the persistent compilation cache where --compile_cache / the environment says (compile_cache.py)."""
    compile_cache.enable(flags.FLAGS.compile_cache if flags.FLAGS.is_parsed() else None)


def guarded(fn: Callable[[], object], *, prefix: str = "error", also: tuple[type[BaseException], ...] = ()) -> None:
    """Runs `fn` with the compilation cache on; a user error exits with `PREFIX: message` (status 1), unless
    --verbosity >= 1 asks for the traceback."""
    try:
        enable_compile_cache()
        fn()
    except Exception as e:
        if not is_user_error(e, also) or flags.FLAGS["verbosity"].value >= 1:
            raise
        sys.exit(f"{prefix}: {one_line(e)}  (--verbosity=1 shows the traceback)")
