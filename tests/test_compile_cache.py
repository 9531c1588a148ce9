"""The persistent compilation cache: a second process loads the program the first one compiled."""
import os
import pathlib
import subprocess
import sys
import textwrap

from ldm_jax import compile_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]

PROGRAM = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from ldm_jax import compile_cache
    hits = []
    jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
    folder = compile_cache.enable(sys.argv[1] if len(sys.argv) > 1 else None, min_compile_secs=0)
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3.0)
    print(float(f(jnp.arange(12.0).reshape(3, 4) / 10)), len(hits), folder)
""")


def _run(env, *args):
    out = subprocess.run([sys.executable, "-c", PROGRAM, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    value, hits, folder = out.stdout.split()
    return float(value), int(hits), folder


def test_second_process_hits_the_cache(tmp_path):
    env = {**os.environ, compile_cache.ENV: str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    v1, hits1, folder = _run(env)
    assert hits1 == 0
    assert pathlib.Path(folder).parent == tmp_path / "cache" and any(pathlib.Path(folder).iterdir())
    v2, hits2, folder2 = _run(env)
    assert hits2 >= 1 and folder2 == folder and v2 == v1


def test_off_and_explicit_path(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.enable() is None
    env = {**os.environ, compile_cache.ENV: "off", "JAX_PLATFORMS": "cpu"}
    # an explicit path wins over the environment variable
    _, _, folder = _run(env, str(tmp_path / "explicit"))
    assert pathlib.Path(folder).parent == tmp_path / "explicit"
    assert compile_cache.host_tag() == compile_cache.host_tag() and "-" in compile_cache.host_tag()


def test_unwritable_folder_runs_without_cache(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert compile_cache.enable(blocker / "cache") is None
    assert "no persistent compilation cache" in caplog.text
