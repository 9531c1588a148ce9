"""What every sampler starts with, written once: input checks, the default noise, calling the
denoiser, drawing noise, and the `lax.scan` over steps.

A sampler reads

    x, sigmas, ns = setup("my_sampler", x, sigmas, key, noise_sampler, stochastic=not is_zero(eta))

    def step(x, s, state):  # s: Step(i, sigma, sigma_next, denoised, cnt)
        sigma_down, sigma_up = get_ancestral_step(s.sigma, s.sigma_next, eta)
        x = x + to_d(x, s.sigma, s.denoised) * (sigma_down - s.sigma)
        return *add_noise(x, s.cnt, ns, s.sigma, s.sigma_next, sigma_up * s_noise), state

    return sample_loop(denoiser, x, sigmas, step)

`setup` picks a Brownian tree as the default noise for samplers registered with noise="sde"
(`ldm_jax.diffusion.registry`), i.i.d. draws from `key` for the others.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ldm_jax.diffusion import registry
from ldm_jax.diffusion.brownian import BrownianTreeNoiseSampler, NoiseSampler, key_noise_sampler

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]


def is_zero(v) -> bool:
    """True only for a static zero (a traced option counts as non-zero)."""
    return isinstance(v, (int, float, np.floating, np.integer)) and v == 0


def check_inputs(name: str, x, sigmas, *, needs_noise: bool = False, key=None, noise_sampler=None):
    """Validate before tracing; returns (x, sigmas) in x's dtype (at least float32).

    Value checks on sigmas (finite, non-negative, decreasing, only the last 0) run when sigmas are
    concrete; a traced schedule is only checked for its shape."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: x must be an array, got {type(x).__name__}")
    if x.ndim < 1:
        raise ValueError(f"{name}: x must have a leading batch axis, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: x must be floating point, got {x.dtype}")
    if not hasattr(sigmas, "shape"):
        sigmas = np.asarray(sigmas, dtype=np.float64)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"{name}: sigmas must be a 1-D schedule with at least 2 entries (>= 1 step), "
                         f"got shape {tuple(sigmas.shape)}")
    if not isinstance(sigmas, jax.core.Tracer):
        s = np.asarray(sigmas, dtype=np.float64)
        if not np.all(np.isfinite(s)):
            raise ValueError(f"{name}: sigmas must be finite, got {s}")
        if np.any(s < 0):
            raise ValueError(f"{name}: sigmas must be non-negative, got {s}")
        bad = np.nonzero(np.diff(s) > 0)[0]
        if bad.size:
            raise ValueError(f"{name}: sigmas must be decreasing, but sigmas[{bad[0] + 1}]={s[bad[0] + 1]} > "
                             f"sigmas[{bad[0]}]={s[bad[0]]}")
        if np.any(s[:-1] == 0):
            raise ValueError(f"{name}: only the last sigma may be 0, got {s}")
    if needs_noise and key is None and noise_sampler is None:
        raise ValueError(f"{name} draws noise: pass key= (a jax.random key) or noise_sampler=")
    # half-precision latents are integrated in float32 (σ in bf16 would lose the schedule)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    return jnp.asarray(x, dtype), jnp.asarray(sigmas, dtype)


def default_noise(x, sigmas, key, noise_sampler, brownian: bool = False) -> NoiseSampler:
    """The caller's noise sampler, else a Brownian tree (SDE samplers) or i.i.d. draws from `key`."""
    if noise_sampler is not None:
        return noise_sampler
    if brownian:
        positive = jnp.where(sigmas > 0, sigmas, jnp.inf)
        return BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), key)
    return key_noise_sampler(key, x)


class Setup(NamedTuple):
    """A sampler's checked inputs: x and sigmas in the working dtype, the noise source (None when
    this call draws no noise). Unpacks as `x, sigmas, ns = setup(...)`."""

    x: jax.Array
    sigmas: jax.Array
    noise: NoiseSampler | None


def setup(name: str, x, sigmas, key=None, noise_sampler=None, *, stochastic: bool = False) -> Setup:
    """check_inputs + the default noise source of sampler `name` (a Brownian tree when it is
    registered with noise="sde"), built only when the call draws noise."""
    x, sigmas = check_inputs(name, x, sigmas, needs_noise=stochastic, key=key, noise_sampler=noise_sampler)
    if not stochastic:
        return Setup(x, sigmas, None)
    info = registry.SAMPLER_INFO.get(name)
    brownian = info is not None and info.noise == "sde"
    return Setup(x, sigmas, default_noise(x, sigmas, key, noise_sampler, brownian))


def call_denoiser(denoiser: Denoiser, x: jax.Array, sigma) -> jax.Array:
    """denoiser(x, sigma·1_B), checking that the result has x's shape (a trace-time error)."""
    s = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (x.shape[0],))
    out = denoiser(x, s)
    if out.shape != x.shape:
        raise ValueError(f"denoiser returned shape {tuple(out.shape)}, expected x's shape {tuple(x.shape)}")
    return out.astype(x.dtype)


def draw(noise_sampler: NoiseSampler, i, sigma, sigma_next, x) -> jax.Array:
    """One draw, checked against x's shape."""
    n = noise_sampler(i, sigma, sigma_next)
    if n.shape != x.shape:
        raise ValueError(f"noise_sampler returned shape {tuple(n.shape)}, expected {tuple(x.shape)}")
    return n.astype(x.dtype)


def add_noise(x, cnt, noise_sampler: NoiseSampler | None, sigma, sigma_next, scale):
    """(x + scale·draw, cnt + 1) when σ_next > 0, else (x, cnt): k-diffusion's ancestral tail
    (no draw on the last step to σ = 0). With no noise source, (x, cnt) unchanged."""
    if noise_sampler is None:
        return x, cnt
    add = lax.cond(sigma_next > 0, lambda: draw(noise_sampler, cnt, sigma, sigma_next, x) * scale,
                   lambda: jnp.zeros_like(x))
    return x + add, cnt + (sigma_next > 0)


class Step(NamedTuple):
    """What `sample_loop` hands a step: its index, σ_i, σ_{i+1}, D(x, σ_i) and the draws so far."""

    i: jax.Array
    sigma: jax.Array
    sigma_next: jax.Array
    denoised: jax.Array
    cnt: jax.Array


def sample_loop(denoiser: Denoiser, x, sigmas, step, state=()):
    """The loop most samplers are: one `lax.scan` over the steps; step i calls the denoiser once at
    (x, σ_i) and then `step(x, Step, state) -> (x, cnt, state)`. `cnt` counts the noise draws
    (start 0), `state` is the sampler's own carry (a multistep method's history). Returns x."""
    def body(carry, i):
        x, cnt, st = carry
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        return step(x, Step(i, sigma, sigma_next, call_denoiser(denoiser, x, sigma), cnt), st)

    return scan_steps(body, (x, jnp.int32(0), state), sigmas)[0]


def scan_steps(body, carry, sigmas):
    """lax.scan of body(carry, i) over the len(sigmas) − 1 steps; returns the final carry."""
    carry, _ = lax.scan(lambda c, i: (body(c, i), None), carry, jnp.arange(sigmas.shape[0] - 1))
    return carry


def to_d(x, sigma, denoised):
    """Karras ODE derivative (x − D(x, σ)) / σ."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    """(σ_down, σ_up) of an ancestral step; σ_up = min(σ_to, η·sqrt(σ_to²(σ_from² − σ_to²)/σ_from²))."""
    if is_zero(eta):
        return sigma_to, jnp.zeros_like(sigma_to)
    sigma_up = jnp.minimum(sigma_to, eta * jnp.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2)
                                                    / sigma_from ** 2))
    sigma_down = jnp.sqrt(jnp.maximum(sigma_to ** 2 - sigma_up ** 2, 0))
    return sigma_down, sigma_up


def t_of(sigma):
    """t = −log σ, the time variable of the exponential integrators (DPM-Solver, UniPC, DEIS)."""
    return -jnp.log(sigma)


def sigma_of(t):
    """σ = exp(−t), the inverse of `t_of`."""
    return jnp.exp(-t)


__all__ = ["Denoiser", "Setup", "setup", "is_zero", "check_inputs", "default_noise", "call_denoiser", "draw",
           "add_noise", "Step", "sample_loop", "scan_steps", "to_d", "get_ancestral_step", "t_of", "sigma_of"]
