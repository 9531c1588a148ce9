"""Model wrappers that turn a network into a denoiser D(x, σ) ≈ E[x0 | x0 + σ·ε = x].

Samplers only see D; the parameterisation lives here (k-diffusion `external.py` for discrete
CompVis models, Karras et al. 2022 Table 1 for EDM preconditioning), plus classifier-free guidance
that evaluates the conditional and unconditional halves in one batched call and, for the CFG++
samplers, hands out the unguided half too (`CFGDenoiser.with_uncond`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import schedules

PREDICTIONS = ("eps", "v", "x0")


def _bcast(v, x):
    """(B,) or scalar → shape broadcastable against x (B, ...)."""
    v = jnp.asarray(v, x.dtype)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) if v.ndim else v


@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteDenoiser:
    """A discrete-time model `model_fn(x_in, t, **cond)` → eps / v / x0 as D(x, σ).

    σ_t = sqrt((1 − ᾱ_t)/ᾱ_t); c_in = 1/sqrt(σ² + 1); t(σ) interpolates linearly in log σ
    between training levels, or snaps to the nearest one with `quantize` (k-diffusion
    `DiscreteEpsDDPMDenoiser` / `DiscreteVDDPMDenoiser`):
    eps: D = x − σ·ε;  v: D = x/(σ²+1) − σ/sqrt(σ²+1)·v;  x0: D = model output.
    """

    model_fn: Callable[..., jax.Array]
    alphas_cumprod: Any  # (T,) numpy float64
    prediction: str = "eps"
    quantize: bool = False

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        ac = np.asarray(self.alphas_cumprod, dtype=np.float64)
        if ac.ndim != 1 or ac.size < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with >= 2 entries, got shape {ac.shape}")
        object.__setattr__(self, "alphas_cumprod", ac)

    @property
    def sigmas(self) -> np.ndarray:
        """Training noise levels, ascending (float64)."""
        return schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma, quantize: bool | None = None):
        """Continuous (or quantized) timestep of σ."""
        q = self.quantize if quantize is None else quantize
        dtype = jnp.asarray(sigma).dtype
        return schedules.sigma_to_t(sigma, np.log(self.sigmas).astype(dtype), quantize=q)

    def t_to_sigma(self, t):
        return schedules.t_to_sigma(t, np.log(self.sigmas))

    def percent_to_sigma(self, percent: float) -> float:
        """σ at the fraction `percent` of the denoising process (0: pure noise, 1: clean): the level
        at timestep (1 − percent)·(T − 1), log-linear between training levels (ComfyUI's
        `ModelSamplingDiscrete.percent_to_sigma`, its 999999999.9 above the top and 0 at the end)."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        log_sigmas = np.log(self.sigmas)
        t = (1.0 - percent) * (log_sigmas.size - 1)
        lo = int(np.floor(t))
        hi = min(lo + 1, log_sigmas.size - 1)
        w = t - lo
        return float(np.exp((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]))

    def get_sigmas(self, n: int) -> jax.Array:
        """k-diffusion's "normal" schedule of this model."""
        return schedules.get_sigmas_normal(n, self.sigmas)

    def __call__(self, x: jax.Array, sigma: jax.Array, **cond) -> jax.Array:
        s = _bcast(sigma, x)
        c_in = 1 / jnp.sqrt(s ** 2 + 1)
        out = self.model_fn(x * c_in, self.sigma_to_t(jnp.asarray(sigma, x.dtype)), **cond)
        if self.prediction == "eps":
            return x - s * out
        if self.prediction == "v":
            return x / (s ** 2 + 1) - s / jnp.sqrt(s ** 2 + 1) * out
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class EDMDenoiser:
    """EDM preconditioning (Karras et al. 2022, Table 1): D = c_skip·x + c_out·F(c_in·x, c_noise),
    c_skip = σd²/(σ²+σd²), c_out = σ·σd/sqrt(σ²+σd²), c_in = 1/sqrt(σ²+σd²), c_noise = ln(σ)/4."""

    model_fn: Callable[..., jax.Array]
    sigma_data: float = 0.5

    def __call__(self, x: jax.Array, sigma: jax.Array, **cond) -> jax.Array:
        s = _bcast(sigma, x)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (s ** 2 + sd2)
        c_out = s * self.sigma_data / jnp.sqrt(s ** 2 + sd2)
        c_in = 1 / jnp.sqrt(s ** 2 + sd2)
        c_noise = jnp.log(jnp.asarray(sigma, x.dtype)) / 4
        return c_skip * x + c_out * self.model_fn(x * c_in, c_noise, **cond)


def _concat(a, b):
    return jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), a, b)


@dataclasses.dataclass(frozen=True, eq=False)
class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022): D = D_u + scale·(D_c − D_u), with both halves
    from one call `denoiser(concat[x, x], concat[σ, σ], **concat[uncond, cond])`.

    `guidance_rescale` φ (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", eq. 15-16, as diffusers' `rescale_noise_cfg`): the guided ε is rescaled to the per-sample
    std of the conditional ε and mixed with weight φ.
    `cond`/`uncond` are dicts of keyword arrays with a leading batch axis (e.g. {"context": c}).
    `with_uncond` returns the unguided D_u next to D from the same call: the CFG++ samplers need it,
    and any denoiser that offers `with_uncond` can drive them (`has_uncond`).
    """

    denoiser: Callable[..., jax.Array]
    cond: dict
    uncond: dict
    scale: float = 7.5
    guidance_rescale: float = 0.0

    def __call__(self, x: jax.Array, sigma: jax.Array) -> jax.Array:
        return self.with_uncond(x, sigma)[0]

    def with_uncond(self, x: jax.Array, sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(guided D, unguided D_u) from the one batched call: what the CFG++ samplers
        (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance") step with."""
        b = x.shape[0]
        sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (b,))
        out = self.denoiser(jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]),
                            **_concat(self.uncond, self.cond))
        d_uncond, d_cond = out[:b], out[b:]
        guided = d_uncond + self.scale * (d_cond - d_uncond)
        if isinstance(self.guidance_rescale, (int, float)) and self.guidance_rescale == 0:
            return guided, d_uncond
        s = _bcast(sigma, x)
        eps_cond, eps_cfg = (x - d_cond) / s, (x - guided) / s
        axes = tuple(range(1, x.ndim))
        std_cond = jnp.std(eps_cond, axis=axes, keepdims=True, ddof=1)
        std_cfg = jnp.std(eps_cfg, axis=axes, keepdims=True, ddof=1)
        eps = self.guidance_rescale * eps_cfg * (std_cond / std_cfg) + (1 - self.guidance_rescale) * eps_cfg
        return x - s * eps, d_uncond


@dataclasses.dataclass(frozen=True, eq=False)
class MaskedDenoiser:
    """Inpainting with a plain UNet: D = m·D_inner + (1 − m)·x0_known, so the known region's x0 is the
    image's whatever the sampler (denoiser-level masking). Keeps CFG++ working: when the inner
    denoiser has `with_uncond`, so does this one (both halves masked)."""

    denoiser: Callable[..., jax.Array]
    mask: jax.Array  # 1 = generate, 0 = keep `known`; broadcastable against x
    known: jax.Array

    def _masked(self, d):
        return self.mask * d + (1 - self.mask) * self.known

    def __call__(self, x: jax.Array, sigma: jax.Array) -> jax.Array:
        return self._masked(self.denoiser(x, sigma))

    @property
    def with_uncond(self):
        if not has_uncond(self.denoiser):
            return None

        def with_uncond(x, sigma):
            guided, uncond = self.denoiser.with_uncond(x, sigma)
            return self._masked(guided), self._masked(uncond)
        return with_uncond


def has_uncond(denoiser) -> bool:
    """Whether `denoiser` offers `with_uncond(x, σ) -> (guided, unguided)` (CFGDenoiser does)."""
    return callable(getattr(denoiser, "with_uncond", None))


def inner_discrete(denoiser) -> "DiscreteDenoiser | None":
    """The DiscreteDenoiser under guidance / masking / partial wrappers (`.denoiser`, `.func`), or None."""
    for _ in range(8):
        if isinstance(denoiser, DiscreteDenoiser):
            return denoiser
        denoiser = getattr(denoiser, "denoiser", None) or getattr(denoiser, "func", None)
    return None


def discrete_denoiser(model_fn: Callable[..., jax.Array], alphas_cumprod, prediction: str = "eps",
                      quantize: bool = False) -> DiscreteDenoiser:
    """Shorthand for `DiscreteDenoiser(model_fn, alphas_cumprod, prediction, quantize)`."""
    return DiscreteDenoiser(model_fn, alphas_cumprod, prediction, quantize)


__all__ = ["PREDICTIONS", "DiscreteDenoiser", "EDMDenoiser", "CFGDenoiser", "MaskedDenoiser", "discrete_denoiser",
           "has_uncond", "inner_discrete"]
