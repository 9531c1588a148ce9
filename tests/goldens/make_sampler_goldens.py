"""Make tests/goldens/samplers_*.npz from the PyTorch references (float64).

Needs requirements-dev.txt (torch, k-diffusion 0.1.1, diffusers). Run from the repo root:
    python3 tests/goldens/make_sampler_goldens.py
k-diffusion's package __init__ pulls in training dependencies (skimage, torchvision), so its
`sampling.py`/`external.py` are loaded directly under a stub package with the one helper they use.

The model is an analytic Gaussian mixture: with x = x0 + σ·n and x0 ~ Σ w_k N(μ_k, s_k² I),
D(x, σ) = E[x0 | x] = Σ r_k(x) (μ_k + s_k²/(s_k² + σ²)·(x − μ_k)), r_k ∝ w_k N(x; μ_k, (s_k²+σ²) I).
Every Gaussian draw (noise_sampler calls and the churn samplers' torch.randn_like) is taken in
order from a stored noise bank, so the JAX samplers can be fed the same noise by draw index.
"""
from __future__ import annotations

import importlib.util
import math
import pathlib
import sys
import types

import numpy as np
import torch

torch.set_default_dtype(torch.float64)
OUT = pathlib.Path(__file__).parent


def load_k_diffusion():
    spec = importlib.util.find_spec("k_diffusion")
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x, target_dims):  # verbatim from k_diffusion/utils.py
        dims_to_append = target_dims - x.ndim
        if dims_to_append < 0:
            raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
        return x[(...,) + (None,) * dims_to_append]

    utils.append_dims = append_dims
    pkg.utils = utils
    sys.modules["k_diffusion"] = pkg
    sys.modules["k_diffusion.utils"] = utils
    import k_diffusion.external as external
    import k_diffusion.sampling as sampling
    return sampling, external


K, E = load_k_diffusion()

# ---- analytic mixture -------------------------------------------------------------------------
SHAPE = (8, 4, 4, 2)  # batch 8 so the sharding test can split it over 8 devices
rng = np.random.default_rng(0)
D = int(np.prod(SHAPE[1:]))
MEANS = rng.normal(size=(3, D)) * 1.5
STDS = np.array([0.3, 0.5, 0.8])
WEIGHTS = np.array([0.2, 0.3, 0.5])


def mixture_denoiser(x, sigma):
    xf = x.reshape(x.shape[0], -1)
    s2 = sigma.reshape(-1, 1) ** 2  # (B, 1)
    mu, sk2 = torch.from_numpy(MEANS), torch.from_numpy(STDS) ** 2
    v = sk2[None, :] + s2  # (B, K)
    diff = xf[:, None, :] - mu[None]  # (B, K, D)
    logp = torch.log(torch.from_numpy(WEIGHTS))[None] - (diff ** 2).sum(-1) / (2 * v) - D / 2 * torch.log(v)
    r = torch.softmax(logp, dim=1)
    post = mu[None] + (sk2[None, :] / v)[..., None] * diff
    return (r[..., None] * post).sum(1).reshape(x.shape)


class Counted:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        return self.fn(x, sigma)


class Bank:
    """Noise by draw index, shared by noise_sampler and the patched torch.randn_like."""

    def __init__(self, bank):
        self.bank, self.i = bank, 0

    def next(self):
        out = torch.from_numpy(self.bank[self.i].copy())
        self.i += 1
        return out


BANK = rng.normal(size=(80,) + SHAPE)
X_INIT = rng.normal(size=SHAPE)

CASES = [  # (case, sampler, steps, kwargs)
    ("euler", "euler", 10, {}),
    ("euler_churn", "euler", 10, dict(s_churn=2.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.003)),
    ("euler_ancestral", "euler_ancestral", 10, {}),
    ("euler_ancestral_eta05", "euler_ancestral", 10, dict(eta=0.5, s_noise=0.9)),
    ("heun", "heun", 10, {}),
    ("heun_churn", "heun", 10, dict(s_churn=1.0)),
    ("dpm_2", "dpm_2", 10, {}),
    ("dpm_2_churn", "dpm_2", 10, dict(s_churn=1.5, s_tmax=5.0)),
    ("dpm_2_ancestral", "dpm_2_ancestral", 10, {}),
    ("lms", "lms", 10, {}),
    ("lms_order2", "lms", 10, dict(order=2)),
    ("dpm_fast", "dpm_fast", 10, {}),
    ("dpm_fast_9_eta", "dpm_fast", 9, dict(eta=0.5)),
    ("dpm_adaptive", "dpm_adaptive", 10, {}),
    ("dpm_adaptive_o2_eta", "dpm_adaptive", 10, dict(order=2, eta=0.5, rtol=0.1)),
    ("dpmpp_2s_ancestral", "dpmpp_2s_ancestral", 10, {}),
    ("dpmpp_sde", "dpmpp_sde", 10, {}),
    ("dpmpp_sde_r03_eta05", "dpmpp_sde", 10, dict(r=0.3, eta=0.5)),
    ("dpmpp_2m", "dpmpp_2m", 10, {}),
    ("dpmpp_2m_sde", "dpmpp_2m_sde", 10, {}),
    ("dpmpp_2m_sde_heun", "dpmpp_2m_sde", 10, dict(solver_type="heun", eta=0.7)),
    ("dpmpp_3m_sde", "dpmpp_3m_sde", 10, {}),
    ("dpmpp_3m_sde_eta0", "dpmpp_3m_sde", 10, dict(eta=0.0)),
]


def run_k(sampler, steps, kwargs):
    sigmas = K.get_sigmas_karras(steps, 0.03, 15.0)
    model = Counted(mixture_denoiser)
    bank = Bank(BANK)
    x = torch.from_numpy(X_INIT) * sigmas[0]
    orig = torch.randn_like
    torch.randn_like = lambda t, *a, **k: bank.next()
    try:
        fn = getattr(K, f"sample_{sampler}")
        kw = dict(kwargs, disable=True)
        if sampler not in ("euler", "heun", "dpm_2", "lms", "dpmpp_2m"):
            kw["noise_sampler"] = lambda s, sn: bank.next()
        if sampler in ("dpm_fast", "dpm_adaptive"):
            args = (sigmas[-2].item(), sigmas[0].item()) + ((steps,) if sampler == "dpm_fast" else ())
            out = fn(model, x, *args, **kw)
        else:
            out = fn(model, x, sigmas, **kw)
    finally:
        torch.randn_like = orig
    return sigmas.numpy(), out.numpy(), model.calls, bank.i


# ---- LDM samplers through diffusers' schedulers, in VP space ----------------------------------
def sd_alphas_cumprod():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def vp_eps(x_vp, t, ac):
    """ε(x_t, t) of the analytic model, with x_ve = x_vp / sqrt(ᾱ_t)."""
    a = ac[int(t)]
    sigma = ((1 - a) / a) ** 0.5
    x_ve = x_vp / a ** 0.5
    return (x_ve - mixture_denoiser(x_ve, sigma * torch.ones(x_vp.shape[0]))) / sigma


def run_diffusers(kind, steps, eta=0.0):
    import diffusers
    from diffusers.schedulers import scheduling_ddim, scheduling_ddpm

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  steps_offset=1)
    if kind == "ddim":
        sch = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common)
    elif kind == "plms":
        sch = diffusers.PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **common)
    else:
        sch = diffusers.DDPMScheduler(clip_sample=False, **common)
    ac = sd_alphas_cumprod()  # float64 instead of diffusers' float32 tables
    sch.alphas_cumprod = ac
    sch.alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    sch.betas = 1 - sch.alphas
    if hasattr(sch, "final_alpha_cumprod"):
        sch.final_alpha_cumprod = ac[0]
    sch.set_timesteps(steps)
    bank = Bank(BANK)
    patched = lambda *a, **k: bank.next()  # noqa: E731
    scheduling_ddim.randn_tensor = scheduling_ddpm.randn_tensor = patched
    x = torch.from_numpy(X_INIT)
    calls = 0
    for t in sch.timesteps:
        e = vp_eps(x, t, ac)
        calls += 1
        kw = dict(eta=eta) if kind == "ddim" else {}
        x = sch.step(e, t, x, **kw).prev_sample
    return np.asarray(sch.timesteps), x.numpy(), calls, bank.i


# ---- wrappers and schedules -------------------------------------------------------------------
def toy_inner(x_in, t):
    """An arbitrary smooth network stand-in, the same formula in the JAX test."""
    t = t.reshape(-1, *([1] * (x_in.ndim - 1)))
    return torch.tanh(x_in) * (1 + t / 1000) + torch.sin(t / 100)


def wrapper_goldens(out):
    ac = sd_alphas_cumprod()
    x = torch.from_numpy(X_INIT) * 3
    sig = torch.tensor([14.6, 7.3, 3.1, 1.0, 0.5, 0.2, 0.0292, 0.05])
    out["wrap_x"], out["wrap_sigma"] = x.numpy(), sig.numpy()
    for q in (False, True):
        eps = E.DiscreteEpsDDPMDenoiser(toy_inner, ac, quantize=q)
        v = E.DiscreteVDDPMDenoiser(toy_inner, ac, quantize=q)
        v.get_v = toy_inner
        tag = "q" if q else "c"
        out[f"wrap_eps_{tag}"] = eps(x, sig).numpy()
        out[f"wrap_v_{tag}"] = v(x, sig).numpy()
        out[f"wrap_t_{tag}"] = eps.sigma_to_t(sig).numpy().astype(np.float64)
    ds = E.DiscreteSchedule(((1 - ac) / ac) ** 0.5, False)
    out["sched_normal_10"] = ds.get_sigmas(10).numpy()
    out["sched_normal_25"] = ds.get_sigmas(25).numpy()


def comfy_simple(s, steps):  # ComfyUI comfy/samplers.py simple_scheduler, verbatim logic
    sigs, ss = [], len(s) / steps
    for x in range(steps):
        sigs += [float(s[-(1 + int(x * ss))])]
    return np.asarray(sigs + [0.0])


def comfy_ddim_uniform(s, steps):  # ComfyUI ddim_scheduler
    x, sigs = 1, [0.0]
    ss = max(len(s) // steps, 1)
    while x < len(s):
        sigs += [float(s[x])]
        x += ss
    return np.asarray(sigs[::-1])


def ldm_betas(schedule, n, start, end, cosine_s=8e-3):  # ldm make_beta_schedule, verbatim logic
    if schedule == "linear":
        return (torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2).numpy()
    if schedule == "cosine":
        ts = torch.arange(n + 1, dtype=torch.float64) / n + cosine_s
        a = torch.cos(ts / (1 + cosine_s) * np.pi / 2).pow(2)
        a = a / a[0]
        return np.clip((1 - a[1:] / a[:-1]).numpy(), 0, 0.999)
    return torch.linspace(start, end, n, dtype=torch.float64).numpy()  # "sqrt_linear"


def schedule_goldens(out):
    out["karras_10"] = K.get_sigmas_karras(10, 0.0292, 14.6146).numpy()
    out["karras_7_rho5"] = K.get_sigmas_karras(7, 0.1, 80.0, rho=5.0).numpy()
    out["exponential_10"] = K.get_sigmas_exponential(10, 0.0292, 14.6146).numpy()
    out["polyexponential_10_rho2"] = K.get_sigmas_polyexponential(10, 0.0292, 14.6146, rho=2.0).numpy()
    out["vp_10"] = K.get_sigmas_vp(10).numpy()
    s = (((1 - sd_alphas_cumprod()) / sd_alphas_cumprod()) ** 0.5).numpy()
    out["simple_10"], out["simple_30"] = comfy_simple(s, 10), comfy_simple(s, 30)
    out["ddim_uniform_10"], out["ddim_uniform_30"] = comfy_ddim_uniform(s, 10), comfy_ddim_uniform(s, 30)
    out["betas_linear"] = ldm_betas("linear", 1000, 0.00085, 0.012)
    out["betas_cosine"] = ldm_betas("cosine", 1000, 0, 0)
    out["betas_sqrt_linear"] = ldm_betas("sqrt_linear", 1000, 1e-4, 2e-2)
    import diffusers
    for name in ("scaled_linear", "linear", "squaredcos_cap_v2"):
        sch = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=name)
        out[f"diffusers_betas_{name}"] = sch.betas.numpy().astype(np.float64)


def main():
    out = dict(means=MEANS, stds=STDS, weights=WEIGHTS, bank=BANK, x_init=X_INIT)
    names = []
    for case, sampler, steps, kwargs in CASES:
        sigmas, x, calls, draws = run_k(sampler, steps, kwargs)
        out[f"{case}/sigmas"], out[f"{case}/out"] = sigmas, x
        out[f"{case}/nfe"], out[f"{case}/draws"] = np.int64(calls), np.int64(draws)
        names.append(case)
        print(f"{case:24s} nfe={calls:3d} draws={draws:3d} |x|={np.abs(x).max():.3f}")
    for case, kind, steps, eta in [("ddim", "ddim", 10, 0.0), ("ddim_eta05", "ddim", 10, 0.5),
                                   ("plms", "plms", 10, 0.0), ("ddpm", "ddpm", 10, 0.0)]:
        ts, x, calls, draws = run_diffusers(kind, steps, eta)
        out[f"{case}/timesteps"], out[f"{case}/out"] = ts, x
        out[f"{case}/nfe"], out[f"{case}/draws"] = np.int64(calls), np.int64(draws)
        print(f"{case:24s} nfe={calls:3d} draws={draws:3d} timesteps={ts.tolist()}")
    out["cases"] = np.asarray(names)
    np.savez_compressed(OUT / "samplers_kdiffusion.npz", **out)
    sched = {}
    schedule_goldens(sched)
    wrapper_goldens(sched)
    np.savez_compressed(OUT / "samplers_schedules.npz", **sched)
    for f in ("samplers_kdiffusion.npz", "samplers_schedules.npz"):
        print(f, (OUT / f).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
