"""Noise sources for samplers: i.i.d. draws from a key, and a virtual Brownian tree.

A noise sampler is `noise_sampler(i, sigma, sigma_next) -> array like x`; `i` counts the draws of
one sampling run from 0 (it may be a traced int). The Brownian-tree source returns the normalised
increment (W(σ_next) − W(σ)) / sqrt(|σ_next − σ|) of one fixed Brownian path, so the noise a step
sees depends on the interval it covers rather than on the step count (k-diffusion's
`BrownianTreeNoiseSampler`, backed there by torchsde).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

NoiseSampler = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _as_typed(key: jax.Array) -> jax.Array:
    return key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def is_batched_key(key: jax.Array, x: jax.Array) -> bool:
    """One key per sample: a typed key array of shape (B,) or raw uint32 keys of shape (B, 2)."""
    key = _as_typed(key)
    return key.ndim == 1 and key.shape[0] == x.shape[0]


def key_noise_sampler(key: jax.Array, x: jax.Array) -> NoiseSampler:
    """Independent N(0, I) draws like x, the i-th from fold_in(key, i). With one key per sample
    (shape (B,)), sample b's noise depends only on key[b], not on the batch it is in."""
    key = _as_typed(key)
    dtype = x.dtype
    if is_batched_key(key, x):
        def sample(i, sigma, sigma_next):
            return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], dtype))(key)
    else:
        def sample(i, sigma, sigma_next):
            return jax.random.normal(jax.random.fold_in(key, i), x.shape, dtype)
    return sample


class BrownianTree:
    """A virtual Brownian tree (Gaines & Lyons 1997; Li et al. 2020, "Scalable Gradients for SDEs").

    W on [t0, t1] with W(t0) = 0 is never stored: W(t) is rebuilt by bisecting [t0, t1] `depth`
    times, sampling each midpoint from its Brownian-bridge law
    W(m) | W(a), W(b) ~ N((W(a) + W(b)) / 2, (b − a) / 4) with a key fixed by the node's path, and
    finally W(t) | W(a), W(b) ~ N(lerp, (t − a)(b − t)/(b − a)) inside the leaf with a key fixed by
    the leaf and the bits of t. The same t always gives the same W(t) and every W(t) has the exact
    Brownian law; two different points inside one leaf (width (t1 − t0)/2^depth, 1e-6 relative at
    the default depth 20) get independent bridge draws — the tree's only approximation.
    Cost per query: depth + 2 Gaussian draws of the full shape.
    """

    def __init__(self, key: jax.Array, shape: tuple[int, ...], dtype, t0, t1, depth: int | None = None):
        key = _as_typed(key)
        self.impl = jax.random.key_impl(key)  # keep the caller's PRNG implementation
        self.key = jax.random.key_data(key)
        self.shape, self.dtype = tuple(shape), jnp.dtype(dtype)
        self.t0 = jnp.asarray(t0, self.dtype)
        self.t1 = jnp.asarray(t1, self.dtype)
        self.depth = 20 if depth is None else depth

    def _normal(self, key):
        return jax.random.normal(jax.random.wrap_key_data(key, impl=self.impl), self.shape, self.dtype)

    def w(self, t) -> jax.Array:
        """W(t) for t clipped to [t0, t1]."""
        t = jnp.clip(jnp.asarray(t, self.dtype), self.t0, self.t1)
        root, first = jax.random.split(jax.random.wrap_key_data(self.key, impl=self.impl))
        w1 = jnp.sqrt(self.t1 - self.t0) * jax.random.normal(root, self.shape, self.dtype)

        def level(_, state):
            a, b, wa, wb, key = state
            m = (a + b) / 2
            keys = jax.random.split(jax.random.wrap_key_data(key, impl=self.impl), 3)
            k_mid, k_left, k_right = (jax.random.key_data(k) for k in keys)
            wm = (wa + wb) / 2 + jnp.sqrt((b - a) / 4) * self._normal(k_mid)
            left = t < m
            return (jnp.where(left, a, m), jnp.where(left, m, b), jnp.where(left, wa, wm),
                    jnp.where(left, wm, wb), jnp.where(left, k_left, k_right))

        init = (self.t0, self.t1, jnp.zeros(self.shape, self.dtype), w1, jax.random.key_data(first))
        a, b, wa, wb, leaf = jax.lax.fori_loop(0, self.depth, level, init)
        width = jnp.where(b > a, b - a, 1)
        frac = jnp.clip((t - a) / width, 0, 1)
        bits = jax.lax.bitcast_convert_type(t, jnp.uint32 if self.dtype.itemsize == 4 else jnp.uint64)
        key = jax.random.wrap_key_data(leaf, impl=self.impl)
        for k in range(self.dtype.itemsize // 4):  # fold every 32-bit word of t into the leaf key
            key = jax.random.fold_in(key, (bits >> (32 * k)).astype(jnp.uint32))
        std = jnp.sqrt(jnp.maximum((t - a) * (b - t), 0) / width)
        return wa + frac * (wb - wa) + std * jax.random.normal(key, self.shape, self.dtype)

    def __call__(self, ta, tb) -> jax.Array:
        """The increment W(tb) − W(ta)."""
        # both endpoints in one bisection loop: one copy of the RNG code in the compiled program
        ts = jnp.stack([jnp.asarray(ta, self.dtype), jnp.asarray(tb, self.dtype)])
        w = jax.vmap(self.w)(ts)
        return w[1] - w[0]


class BrownianTreeNoiseSampler:
    """k-diffusion's `BrownianTreeNoiseSampler`: normalised Brownian increments over [σ_min, σ_max]."""

    def __init__(self, x: jax.Array, sigma_min, sigma_max, key: jax.Array,
                 transform: Callable = lambda s: s, depth: int | None = None):
        self.transform = transform
        t_a, t_b = transform(jnp.asarray(sigma_min, x.dtype)), transform(jnp.asarray(sigma_max, x.dtype))
        lo, hi = jnp.minimum(t_a, t_b), jnp.maximum(t_a, t_b)
        key = _as_typed(key)
        self.batched = is_batched_key(key, x)  # one tree per sample, as k-diffusion's list of seeds
        if self.batched:
            self.keys = jax.random.key_data(key)
            self.tree = BrownianTree(key[0], x.shape[1:], x.dtype, lo, hi, depth)
        else:
            self.tree = BrownianTree(key, x.shape, x.dtype, lo, hi, depth)

    def __call__(self, i, sigma, sigma_next) -> jax.Array:
        t0, t1 = self.transform(sigma), self.transform(sigma_next)
        dt = jnp.abs(t1 - t0)
        if self.batched:
            tree = self.tree

            def one(k):
                key = jax.random.wrap_key_data(k, impl=tree.impl)
                return BrownianTree(key, tree.shape, tree.dtype, tree.t0, tree.t1, tree.depth)(t0, t1)

            w = jax.vmap(one)(self.keys)
        else:
            w = self.tree(t0, t1)
        return w / jnp.sqrt(jnp.where(dt > 0, dt, 1))


__all__ = ["NoiseSampler", "is_batched_key", "key_noise_sampler", "BrownianTree", "BrownianTreeNoiseSampler"]
