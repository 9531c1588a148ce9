"""An NHWC convolution whose gradients XLA:CPU runs on its fast convolution path (`conv_general_dilated`).

On the CPU backend, the convolutions that `jax.grad` of `lax.conv_general_dilated` emits carry permuted
dimension numbers (the weight gradient: `[f, 0, 1, b] x [i, 0, 1, o] -> [0, 1, b, f]`). In straight-line code
XLA:CPU copes, but inside a loop body or a `lax.cond` branch (a gradient-accumulation scan, the GAN phase of
the autoencoder step) it runs them on a slow generic path (jax-ml/jax#12868): measured on an AMD EPYC (2 cores)
for a 3x3 64-channel conv at 8x8, batch 16, the weight gradient took 131 ms inside a `lax.scan` vs 3.8 ms
outside. Written as ordinary NHWC x HWIO convolutions on explicitly transposed operands, both gradients take
the fast path everywhere (that weight gradient: 1.5 ms in the scan). `python3 bench/bench_conv_grad.py`, same
machine: the autoencoder step with the GAN on 1242 -> 120 ms, the LDM step with grad_accum=2 1478 -> 200 ms;
straight-line steps unchanged (AE 46 vs 47 ms, LDM 189 vs 188 ms).

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (the callable `flax.linen.Conv` takes): on
the CPU backend, for the NHWC/HWIO convolutions our models use (no input dilation, one feature group), it is a
`jax.custom_vjp` with those gradients; anything else, and every other backend, is `lax.conv_general_dilated`
itself. The values are the same (the gradients up to float summation order; tests/test_conv_grad.py).
`xla_gradients()` (a context manager, read when a function is traced) turns it off, for comparisons:
`python3 bench/bench_conv_grad.py` times the main job's steps both ways.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
_enabled = [True]


@contextlib.contextmanager
def xla_gradients():
    """Within it, functions traced use `lax.conv_general_dilated`'s own gradients (XLA's convolutions)."""
    _enabled.append(False)
    try:
        yield
    finally:
        _enabled.pop()


def _is_nhwc(dimension_numbers: Any) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return dimension_numbers == lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    return tuple(dimension_numbers) == _NHWC


def _explicit_padding(padding: Any, x_shape, w_shape, strides, rhs_dilation) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        eff = [(k - 1) * d + 1 for k, d in zip(w_shape[:2], rhs_dilation)]
        return tuple(tuple(p) for p in lax.padtype_to_pads(x_shape[1:3], eff, strides, padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    """`lax.conv_general_dilated`, with CPU-friendly gradients for 2-D NHWC convolutions (module docstring)."""
    strides = tuple(int(s) for s in window_strides)
    dil = tuple(int(d) for d in rhs_dilation) if rhs_dilation is not None else (1, 1)
    plain = (not _enabled[-1] or jax.default_backend() != "cpu" or not _is_nhwc(dimension_numbers) or lhs.ndim != 4
             or feature_group_count != 1 or batch_group_count != 1 or preferred_element_type is not None
             or (lhs_dilation is not None and tuple(lhs_dilation) != (1, 1)))
    if plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count,
                                        batch_group_count=batch_group_count, precision=precision,
                                        preferred_element_type=preferred_element_type)
    pads = _explicit_padding(padding, lhs.shape, rhs.shape, strides, dil)
    return _conv(lhs, rhs, strides, pads, dil, precision)


def _forward(x, w, strides, pads, dil, precision):
    return lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dil, dimension_numbers=_NHWC,
                                    precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, pads, dil, precision):
    return _forward(x, w, strides, pads, dil, precision)


def _conv_fwd(x, w, strides, pads, dil, precision):
    return _forward(x, w, strides, pads, dil, precision), (x, w)


def _conv_bwd(strides, pads, dil, precision, res, dy):
    x, w = res
    dx = _grad_input(dy, w, x.shape, strides, pads, dil, precision).astype(x.dtype)
    return dx, _grad_kernel(x, dy, w.shape, strides, pads, dil, precision).astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _grad_input(dy, w, x_shape, strides, pads, dil, precision):
    """dx: `dy` dilated by the strides, convolved with the spatially flipped kernel, in and out swapped."""
    kernel = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)  # (kh, kw, out, in) as HWIO
    pad = []
    for size, out, k, s, d, (lo, _) in zip(x_shape[1:3], dy.shape[1:3], w.shape[:2], strides, dil, pads):
        lo_t = d * (k - 1) - lo
        pad.append((lo_t, size - (out - 1) * s - 1 + lo))
    dx = lax.conv_general_dilated(dy, kernel.astype(dy.dtype), (1, 1), pad, lhs_dilation=strides, rhs_dilation=dil,
                                  dimension_numbers=_NHWC, precision=precision)
    return dx


def _grad_kernel(x, dy, w_shape, strides, pads, dil, precision):
    """dw[h, w, i, o] = sum_{b, y, x} x_pad[b, s*y + d*h, s*x + d*w, i] dy[b, y, x, o]: a conv of x^T (C, H, W, B)
    with dy^T (Ho, Wo, B, O) as its kernel, window strides = the kernel dilation, kernel dilation = the strides."""
    lhs = x.transpose(3, 1, 2, 0)
    kernel = dy.transpose(1, 2, 0, 3).astype(x.dtype)
    out = lax.conv_general_dilated(lhs, kernel, dil, pads, rhs_dilation=strides, dimension_numbers=_NHWC,
                                   precision=precision)  # (C, >= kh, >= kw, O)
    return out[:, : w_shape[0], : w_shape[1], :].transpose(1, 2, 0, 3)
