"""Achieved FLOP/s and model FLOPs utilisation (MFU) from a compiled program's own cost analysis.

MFU = (FLOPs of one step per device, from XLA's `cost_analysis()` of the compiled program) / (seconds per step)
/ (the device's peak dense bf16 rate). Peak rates are the vendors' dense (no-sparsity) bf16 figures per chip;
a CPU has no published figure, so its peak is the float32 matmul rate measured on this host (`cpu_peak_flops`).
"""
from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp

# Dense bf16 TFLOP/s per chip (vendor data sheets). Matched in order against `device.device_kind`, lower-cased.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918.0),  # v6e (Trillium)
    ("tpu v6e", 918.0),
    ("tpu v5 lite", 197.0),  # v5e
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),
    ("tpu v4", 275.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),  # SXM
    ("a100", 312.0),
)


@functools.lru_cache(maxsize=None)
def cpu_peak_flops(n: int = 1024, reps: int = 5) -> float:
    """The float32 matmul rate of this host (FLOP/s), measured once per process: the CPU's 'peak'."""
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_flops(device: Any | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    device = device or jax.devices()[0]
    kind = str(getattr(device, "device_kind", "")).lower()
    if device.platform == "cpu":
        return cpu_peak_flops(), "measured f32 matmul"
    for key, tflops in PEAK_TFLOPS:
        if key in kind:
            return tflops * 1e12, f"{key} dense bf16"
    raise KeyError(f"no peak rate known for device kind {kind!r}; add it to ldm_jax.perf.PEAK_TFLOPS")


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one execution of a compiled program on one device (XLA's estimate), or None if it has none."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):  # older JAX returned one dict per program
        cost = cost[0] if cost else None
    flops = None if not cost else cost.get("flops")
    return float(flops) if flops and flops > 0 else None


def utilisation(flops_per_step: float, seconds_per_step: float, device: Any | None = None) -> dict[str, float]:
    """{'tflops_per_device': achieved TFLOP/s of one device, 'mfu': fraction of its peak}."""
    peak, _ = peak_flops(device)
    achieved = flops_per_step / seconds_per_step
    return {"tflops_per_device": achieved / 1e12, "mfu": achieved / peak}


def abstract_args(*args: Any) -> tuple:
    """ShapeDtypeStructs (with shardings) of a call's arguments: enough to look up its compiled program later,
    after donation has deleted the arrays."""
    def spec(x: Any) -> Any:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)) if hasattr(x, "shape") else x

    return jax.tree_util.tree_map(spec, args)


def step_flops(jitted: Any, args: tuple) -> float | None:
    """FLOPs per device of `jitted(*args)` (already compiled by its first call, so this only looks it up)."""
    try:
        return compiled_flops(jitted.lower(*args).compile())
    except Exception:  # noqa: BLE001 - a missing cost model must never stop a training run
        return None
