"""MFU bookkeeping: FLOPs from the compiled program, peak rates by device kind, the GPU attention choice."""
import types

import jax
import jax.numpy as jnp
import pytest

from ldm_jax import perf
from ldm_jax.models import layers


def test_compiled_flops_of_a_matmul():
    f = jax.jit(lambda a, b: a @ b)
    compiled = f.lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile()
    assert perf.compiled_flops(compiled) == 2 * 64 * 32 * 16


@pytest.mark.parametrize("kind,tflops", [("NVIDIA H200", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                         ("NVIDIA A100-SXM4-80GB", 312.0), ("TPU v5 lite", 197.0),
                                         ("TPU v5p", 459.0), ("TPU v4", 275.0), ("TPU v6 lite", 918.0)])
def test_peak_table(kind, tflops):
    dev = types.SimpleNamespace(platform="gpu" if "NVIDIA" in kind else "tpu", device_kind=kind)
    peak, _ = perf.peak_flops(dev)
    assert peak == tflops * 1e12
    assert perf.utilisation(peak * 0.5, 1.0, dev) == {"tflops_per_device": tflops * 0.5, "mfu": 0.5}


def test_unknown_device_and_cpu_peak():
    with pytest.raises(KeyError, match="PEAK_TFLOPS"):
        perf.peak_flops(types.SimpleNamespace(platform="gpu", device_kind="Quantum 9000"))
    assert perf.peak_flops()[0] > 1e8  # this CPU's measured matmul rate: > 0.1 GFLOP/s on anything


def test_gpu_attention_choice(monkeypatch):
    monkeypatch.delenv("LDM_JAX_ATTENTION", raising=False)
    assert layers.gpu_attention_impl(jnp.bfloat16, 64, None) == "cudnn"
    assert layers.gpu_attention_impl(jnp.float32, 64, None) == "xla"  # cuDNN's fused kernel is fp16/bf16 only
    assert layers.gpu_attention_impl(jnp.float16, 160, None) == "xla"
    assert layers.gpu_attention_impl(jnp.bfloat16, 64, jnp.ones((1, 1, 4, 4), bool)) == "xla"
    monkeypatch.setenv("LDM_JAX_ATTENTION", "xla")
    assert layers.gpu_attention_impl(jnp.bfloat16, 64, None) == "xla"
    with pytest.raises(ValueError, match="LDM_JAX_ATTENTION"):
        layers.gpu_attention_impl(jnp.bfloat16, 64, None, choice="flash")


def test_step_flops_reuses_the_compiled_program():
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(name) if name.endswith("backend_compile_duration") else None)
    # as the loop's step: explicit shardings, state donated
    rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    f = jax.jit(lambda a, b: (a @ b, b), in_shardings=(rep, rep), out_shardings=(rep, rep), donate_argnums=(1,))
    a, b = jax.device_put(jnp.ones((16, 8)), rep), jax.device_put(jnp.ones((8, 8)), rep)
    args = perf.abstract_args(a, b)
    f(a, b)  # donates b
    n = len(compiles)
    assert perf.step_flops(f, args) == 2 * 16 * 8 * 8
    assert len(compiles) == n  # looked up, not compiled again


def test_scalar_log_writes_mfu(monkeypatch):
    from ldm_jax.training.hooks import ScalarLog

    class Writer:
        def __init__(self):
            self.scalars = {}

        def add_scalar(self, k, v, step):
            self.scalars[k] = v

        def flush(self):
            pass

    monkeypatch.setattr(perf, "peak_flops", lambda device=None: (1e12, "test"))
    w = Writer()
    log = ScalarLog(w, every=2, stop=10, global_batch_size=4, flops=lambda: 3e9)
    ctx = types.SimpleNamespace(step=2, objective=types.SimpleNamespace(schedules=lambda: {}))
    log.add({"loss": 1.0})
    log.add({"loss": 3.0})
    log(ctx)
    step_time = w.scalars["perf/step_time_s"]
    assert w.scalars["train/loss"] == 2.0
    assert abs(w.scalars["perf/tflops_per_device"] - 3e9 / step_time / 1e12) < 1e-9
    assert abs(w.scalars["perf/mfu"] - 3e9 / step_time / 1e12) < 1e-9  # peak 1 TFLOP/s
