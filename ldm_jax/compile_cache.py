"""JAX's persistent compilation cache, on by default in the command-line programs.

A restarted or resumed run loads its compiled programs from disk instead of compiling them again. Location,
first match wins:
  1. the `path` argument (the CLIs' `--compile_cache=DIR`),
  2. the environment variable `LDM_JAX_COMPILE_CACHE` (`off`, `0` or `none` turns the cache off),
  3. `$XDG_CACHE_HOME/ldm_jax/xla` (default `~/.cache/ldm_jax/xla`).
Entries go into a sub-folder named after the host's CPU (model and instruction-set flags), so a cache on a shared
filesystem is never read by a machine whose CPU cannot run its code. A size limit is always set: it turns on
JAX's file lock around reads and writes, which makes one cache safe for several processes at once (the processes
of a multi-process run, or several runs). Only programs that took at least `min_compile_secs` to compile are kept.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import platform

import jax

log = logging.getLogger(__name__)

ENV = "LDM_JAX_COMPILE_CACHE"
OFF = ("off", "0", "none", "false", "")
MAX_BYTES = 8 << 30


def host_tag() -> str:
    """A short name for this host's CPU: machine type + a hash of its model and feature flags."""
    model, flags = platform.processor(), ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = value.strip()
    except OSError:
        pass
    digest = hashlib.sha256(f"{model}|{' '.join(sorted(flags.split()))}".encode()).hexdigest()[:12]
    return f"{platform.machine() or 'unknown'}-{digest}"


def default_dir() -> pathlib.Path:
    """`$XDG_CACHE_HOME/ldm_jax/xla` (or `~/.cache/ldm_jax/xla`)."""
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "ldm_jax" / "xla"


def enable(path: str | os.PathLike | None = None, *, min_compile_secs: float = 1.0) -> pathlib.Path | None:
    """Turns the persistent compilation cache on (call before the first compilation); returns its folder or None."""
    choice = os.fspath(path) if path is not None else os.environ.get(ENV)
    if choice is not None and choice.strip().lower() in OFF:
        return None
    root = pathlib.Path(choice).expanduser() if choice else default_dir()
    folder = root / host_tag()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a cache only saves time: run without it
        log.warning("no persistent compilation cache: cannot create %s (%s); set %s or --compile_cache=DIR to a "
                    "writable place, or 'off' to silence this", folder, e.strerror, ENV)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
