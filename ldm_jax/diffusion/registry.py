"""The one table of samplers and schedules, with what a caller needs to know about each.

`SAMPLER_INFO[name]` is a `SamplerInfo`: the function, the space it starts in ("sigma": from ε·σ_0,
k-diffusion; "vp": from ε·sqrt(1 + σ_0²), LDM's ddim/plms/ddpm as CompVis and diffusers), the noise
it draws by default ("none", "ancestral": i.i.d. per step, "sde": a Brownian tree that keeps
results stable across step counts), whether it needs the unguided prediction (CFG++), and its
A1111 / ComfyUI display names. `SAMPLERS[name]` is the bare function (the public contract of
`ldm_jax.sampling.SAMPLERS`). `SCHEDULE_INFO[name]` is a `ScheduleInfo` whose function maps
(steps, NoiseLevels) to exactly steps + 1 descending sigmas; `schedule_sigmas` calls it and checks.

Adding a sampler
    In a module ldm_jax/diffusion/samplers_<family>.py (imported by ldm_jax/sampling.py, which a
    test checks for every such module):

        from ldm_jax.diffusion.registry import register_sampler
        from ldm_jax.diffusion.sampler_core import call_denoiser, scan_steps, setup, ...

        @register_sampler("my_sampler", noise="ancestral", a1111="My sampler", comfy="my_sampler")
        def sample_my_sampler(denoiser, x, sigmas, *, key=None, noise_sampler=None, eta=1.0):
            x, sigmas, ns = setup("my_sampler", x, sigmas, key, noise_sampler, stochastic=not is_zero(eta))
            ...one lax.scan over sigmas (see sampler_core)...

    A preset of another sampler's options gets its own name with `register_variant` (ComfyUI's
    "dpmpp_2m_sde_heun" is dpmpp_2m_sde with solver_type="heun"). Then `sampling.sample_my_sampler`,
    `sampling.SAMPLERS["my_sampler"]`, `Pipeline.generate(sampler="my_sampler")` and the CLI's
    --sampler all know it. Add its parity case to the goldens (tests/goldens/make_*_goldens.py).

Adding a schedule
    Write the formula as a plain function in ldm_jax/diffusion/schedules*.py and register an
    adapter here that takes (steps, levels, **options) and returns steps + 1 sigmas ending at 0
    (or at `levels.final_sigma` for schedules that place discrete timesteps):

        @register_schedule("my_schedule", a1111="My schedule", comfy="my_schedule")
        def _my_schedule(steps, levels, **options):
            return schedules_x.get_sigmas_my_schedule(steps, levels.sigma_min, levels.sigma_max)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np

from ldm_jax.diffusion import schedules, schedules_extra

SPACES = ("sigma", "vp")
NOISE_KINDS = ("none", "ancestral", "sde")


@dataclasses.dataclass(frozen=True)
class SamplerInfo:
    """A registered sampler and the facts the pipeline and the front ends need about it."""

    name: str
    fn: Callable
    space: str = "sigma"
    noise: str = "none"
    needs_uncond: bool = False
    a1111: str | None = None
    comfy: str | None = None
    options: tuple[tuple[str, Any], ...] = ()  # the preset options of a variant


SAMPLER_INFO: dict[str, SamplerInfo] = {}
SAMPLERS: dict[str, Callable] = {}


def _add(info: SamplerInfo) -> None:
    if info.name in SAMPLER_INFO:
        raise ValueError(f"sampler {info.name!r} is registered twice")
    if info.space not in SPACES:
        raise ValueError(f"sampler {info.name!r}: space must be one of {SPACES}, got {info.space!r}")
    if info.noise not in NOISE_KINDS:
        raise ValueError(f"sampler {info.name!r}: noise must be one of {NOISE_KINDS}, got {info.noise!r}")
    SAMPLER_INFO[info.name] = info
    SAMPLERS[info.name] = info.fn


def register_sampler(name: str, *, space: str = "sigma", noise: str = "none", needs_uncond: bool = False,
                     a1111: str | None = None, comfy: str | None = ...) -> Callable[[Callable], Callable]:
    """Decorator: registers `sample_<name>` under `name`. `comfy` defaults to `name`; None means
    ComfyUI has no such sampler (as `a1111=None` for A1111)."""
    def deco(fn: Callable) -> Callable:
        _add(SamplerInfo(name, fn, space, noise, needs_uncond, a1111, name if comfy is ... else comfy))
        return fn
    return deco


def register_variant(name: str, base: str, *, a1111: str | None = None, comfy: str | None = ...,
                     **options) -> Callable:
    """Registers `base` with preset `options` under `name`; returns the new function."""
    b = sampler_info(base)
    fn = functools.partial(b.fn, **options)
    fn.__doc__ = f"`sample_{base}` with {options} (ComfyUI's {name!r})."
    _add(dataclasses.replace(b, name=name, fn=fn, a1111=a1111, comfy=name if comfy is ... else comfy,
                             options=tuple(sorted(options.items()))))
    return fn


def sampler_info(name: str) -> SamplerInfo:
    """The registered sampler called `name`, with the list of names when there is none."""
    if name not in SAMPLER_INFO:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(sorted(SAMPLER_INFO))}")
    return SAMPLER_INFO[name]


# ----------------------------------------------------------------------------------------------
# Schedules.


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseLevels:
    """A model's training noise levels σ(t), t = 0..T−1 ascending (float64), and the diffusers
    scheduler fields that place discrete timesteps on them."""

    sigmas: np.ndarray
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    final_sigma: float = 0.0  # where discrete-timestep schedules end (σ(ᾱ_0) for diffusers' DDIM)

    @property
    def sigma_min(self) -> float:
        return float(np.min(self.sigmas))

    @property
    def sigma_max(self) -> float:
        return float(np.max(self.sigmas))


@dataclasses.dataclass(frozen=True)
class ScheduleInfo:
    name: str
    fn: Callable[..., np.ndarray]
    a1111: str | None = None
    comfy: str | None = None


SCHEDULE_INFO: dict[str, ScheduleInfo] = {}


def register_schedule(name: str, *, a1111: str | None = None, comfy: str | None = None):
    """Decorator: registers fn(steps, levels, **options) -> steps + 1 sigmas under `name`."""
    def deco(fn):
        if name in SCHEDULE_INFO:
            raise ValueError(f"schedule {name!r} is registered twice")
        SCHEDULE_INFO[name] = ScheduleInfo(name, fn, a1111, comfy)
        return fn
    return deco


def schedule_sigmas(name: str, steps: int, levels: NoiseLevels, **options) -> np.ndarray:
    """The `steps` + 1 sigmas (float64, descending) of schedule `name` for a model's noise levels."""
    if name not in SCHEDULE_INFO:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_INFO)}")
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be >= 1 (an int), got {steps!r}")
    s = np.asarray(SCHEDULE_INFO[name].fn(int(steps), levels, **options), np.float64)
    if s.shape != (steps + 1,):
        raise ValueError(f"schedule {name!r} gave {s.shape[0]} sigmas for {steps} steps (expected {steps + 1})")
    return s


def sampler_levels(model_sigmas, sampler: str, *, timestep_spacing: str = "leading", steps_offset: int = 1,
                   set_alpha_to_one: bool = False) -> NoiseLevels:
    """NoiseLevels for `sampler`: LDM's own samplers ("vp" space) end a discrete-timestep schedule
    at ᾱ_0 as CompVis and diffusers' DDIM with set_alpha_to_one=False do; the others at σ = 0."""
    s = np.asarray(model_sigmas, np.float64)
    vp = sampler_info(sampler).space == "vp"
    return NoiseLevels(s, timestep_spacing, int(steps_offset), float(s[0]) if vp and not set_alpha_to_one else 0.0)


def _host64(fn):
    """Runs one of the jnp (traceable) k-diffusion formulas in float64 on the host."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with jax.enable_x64(True):
            return np.asarray(fn(*args, **kwargs), np.float64)
    return run


@register_schedule("karras", a1111="Karras", comfy="karras")
@_host64
def _karras(steps, levels, rho: float = 7.0):
    return schedules.get_sigmas_karras(steps, levels.sigma_min, levels.sigma_max, rho)


@register_schedule("exponential", a1111="Exponential", comfy="exponential")
@_host64
def _exponential(steps, levels):
    return schedules.get_sigmas_exponential(steps, levels.sigma_min, levels.sigma_max)


@register_schedule("polyexponential", a1111="Polyexponential")
@_host64
def _polyexponential(steps, levels, rho: float = 1.0):
    return schedules.get_sigmas_polyexponential(steps, levels.sigma_min, levels.sigma_max, rho)


@register_schedule("vp")
@_host64
def _vp(steps, levels, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3):
    return schedules.get_sigmas_vp(steps, beta_d, beta_min, eps_s)


@register_schedule("normal", a1111="Normal", comfy="normal")
def _normal(steps, levels):
    return schedules.get_sigmas_normal(steps, levels.sigmas)


@register_schedule("simple", a1111="Simple", comfy="simple")
def _simple(steps, levels):
    return schedules.get_sigmas_simple(steps, levels.sigmas)


@register_schedule("sgm_uniform", a1111="SGM Uniform", comfy="sgm_uniform")
def _sgm_uniform(steps, levels):
    return schedules_extra.get_sigmas_sgm_uniform(steps, levels.sigmas)


@register_schedule("beta", a1111="Beta", comfy="beta")
def _beta(steps, levels, alpha: float = 0.6, beta: float = 0.6):
    return schedules_extra.get_sigmas_beta(steps, levels.sigmas, alpha, beta)


@register_schedule("linear_quadratic", comfy="linear_quadratic")
def _linear_quadratic(steps, levels, threshold_noise: float = 0.025, linear_steps: int | None = None):
    return schedules_extra.get_sigmas_linear_quadratic(steps, levels.sigma_max, threshold_noise, linear_steps)


@register_schedule("kl_optimal", a1111="KL Optimal", comfy="kl_optimal")
def _kl_optimal(steps, levels):
    return schedules_extra.get_sigmas_kl_optimal(steps, levels.sigma_min, levels.sigma_max)


@register_schedule("ays_sd1", a1111="Align Your Steps")
def _ays_sd1(steps, levels):
    return schedules_extra.get_sigmas_ays(steps, "sd1")


@register_schedule("ays_sdxl", a1111="Align Your Steps")
def _ays_sdxl(steps, levels):
    return schedules_extra.get_sigmas_ays(steps, "sdxl")


@register_schedule("ddim_uniform", a1111="DDIM", comfy="ddim_uniform")
def _ddim_uniform(steps, levels, timestep_spacing: str | None = None):
    """diffusers' DDIM timesteps for the model's `timestep_spacing` / `steps_offset` (any step count);
    timestep_spacing="compvis" asks for CompVis' range(0, T, T // steps) + 1, which only some step
    counts can have (ComfyUI's ddim_uniform runs 31 steps when asked for 30)."""
    spacing = timestep_spacing or levels.timestep_spacing
    t = schedules.discrete_timesteps(steps, len(levels.sigmas), spacing, levels.steps_offset)
    if len(t) != steps:
        raise ValueError(f"ddim_uniform with CompVis spacing has {len(t)} timesteps for steps={steps} "
                         f"(range(0, {len(levels.sigmas)}, {len(levels.sigmas) // steps}) + 1); use "
                         f"timestep_spacing 'leading' (diffusers' DDIM) for exactly {steps}")
    return np.concatenate([np.asarray(levels.sigmas, np.float64)[t], [levels.final_sigma]])


def display_names(sampler: str, schedule: str) -> dict[str, str | None]:
    """The sampler's and schedule's names in A1111 ("Sampler" / "Schedule type") and ComfyUI
    ("sampler_name" / "scheduler") spelling; ours where A1111 has none, None where ComfyUI has none."""
    info = sampler_info(sampler)
    if schedule not in SCHEDULE_INFO:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULE_INFO)}")
    sched = SCHEDULE_INFO[schedule]
    return {"a1111_sampler": info.a1111 or sampler, "a1111_schedule": sched.a1111 or schedule,
            "comfy_sampler": info.comfy, "comfy_scheduler": sched.comfy}


def a1111_infotext(*, prompt: str | None, negative_prompt: str, steps: int, sampler: str, schedule: str,
                   guidance_scale: float, seed: int, width: int, height: int, model: str | None = None) -> str:
    """A1111's "parameters" text (what its PNG Info tab and ComfyUI's A1111 importers read)."""
    names = display_names(sampler, schedule)
    lines = [] if prompt is None else [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields = [f"Steps: {steps}", f"Sampler: {names['a1111_sampler']}", f"Schedule type: {names['a1111_schedule']}",
              f"CFG scale: {guidance_scale:g}", f"Seed: {seed}", f"Size: {width}x{height}"]
    if model:
        fields.append(f"Model: {model}")
    return "\n".join(lines + [", ".join(fields)])


__all__ = ["display_names", "a1111_infotext", "SamplerInfo", "SAMPLER_INFO", "SAMPLERS", "register_sampler", "register_variant", "sampler_info",
           "NoiseLevels", "ScheduleInfo", "SCHEDULE_INFO", "register_schedule", "schedule_sigmas",
           "sampler_levels", "SPACES", "NOISE_KINDS"]
