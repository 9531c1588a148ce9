"""Make tests/goldens/samplers_comfy.npz by running ComfyUI's own samplers (float64).

ComfyUI is not on the package index. Bring its source onto the machine (never into this repo), e.g.
with the search tool's fetch of a GitHub snapshot, and point this script at the checkout or at the
bare git directory:
    python3 tests/goldens/make_comfy_sampler_goldens.py /path/to/ComfyUI[.git]
Needs torch, torchsde, scipy, tqdm (requirements-dev.txt). The goldens in the repo were made from
silveroxides/ComfyUI at 4f874c5e (2026-07-29), a fork that follows Comfy-Org/ComfyUI master: the
Comfy-Org snapshot available here (a125cd84, 2025-10-12) predates exp_heun_2_x0 and seeds_2's
solver_type.

ComfyUI's comfy/k_diffusion/{sampling,utils,deis,sa_solver}.py and comfy/model_sampling.py are
loaded unchanged under stub `comfy` packages; the stubs provide only what these samplers touch:
`model_patcher.set_model_options_post_cfg_function` (appends the hook to model_options, as
ComfyUI's), `utils.model_trange`, `memory_management`, and the beta schedule helper that
model_sampling imports (unused: the schedule is registered from given betas). The model is the
float64 Gaussian-mixture denoiser of make_sampler_goldens.py, wrapped like ComfyUI's CFGGuider:
`model(x, σ, model_options=...)` runs the post-CFG hooks with "denoised" and "uncond_denoised", and
`model.inner_model.model_patcher.get_model_object("model_sampling")` is a real
ModelSamplingDiscrete with SD's scaled-linear betas (σ space, so half-log-SNR = −log σ).
Every Gaussian draw (noise_sampler calls and torch.randn_like) comes in order from a stored bank.
"""
from __future__ import annotations

import importlib.util
import math
import pathlib
import subprocess
import sys
import tempfile
import types

import numpy as np
import torch
import tqdm

torch.set_default_dtype(torch.float64)
OUT = pathlib.Path(__file__).parent
FILES = ["comfy/k_diffusion/sampling.py", "comfy/k_diffusion/utils.py", "comfy/k_diffusion/deis.py",
         "comfy/k_diffusion/sa_solver.py", "comfy/model_sampling.py"]


def export_sources(src: pathlib.Path, dest: pathlib.Path) -> str:
    """Copy the five ComfyUI files from a checkout or a bare git dir; returns the commit."""
    git = ["git", f"--git-dir={src}"] if (src / "HEAD").exists() and not (src / "comfy").exists() else \
        ["git", "-C", str(src)]
    for f in FILES:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        if (src / f).exists():
            (dest / f).write_bytes((src / f).read_bytes())
        else:
            (dest / f).write_bytes(subprocess.run(git + ["show", f"HEAD:{f}"], check=True, capture_output=True).stdout)
    return subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def module(name, path=None, **attrs):
    m = types.ModuleType(name)
    if path is not None:
        m.__path__ = [str(path)]
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def load_comfy(root: pathlib.Path):
    def set_post_cfg(model_options, post_cfg_function, disable_cfg1_optimization=False):
        model_options["sampler_post_cfg_function"] = model_options.get("sampler_post_cfg_function", []) + \
            [post_cfg_function]
        if disable_cfg1_optimization:
            model_options["disable_cfg1_optimization"] = True
        return model_options

    def model_trange(*args, disable=None, **kw):
        return tqdm.trange(*args, disable=True, **kw)

    comfy = module("comfy", root / "comfy")
    comfy.model_patcher = module("comfy.model_patcher", set_model_options_post_cfg_function=set_post_cfg)
    comfy.utils = module("comfy.utils", model_trange=model_trange)
    comfy.memory_management = module("comfy.memory_management")
    module("comfy.ldm", root / "comfy/ldm")
    module("comfy.ldm.modules")
    module("comfy.ldm.modules.diffusionmodules")
    module("comfy.ldm.modules.diffusionmodules.util", make_beta_schedule=None)
    module("comfy.k_diffusion", root / "comfy/k_diffusion")
    for name in ("comfy.model_sampling", "comfy.k_diffusion.sampling"):
        spec = importlib.util.spec_from_file_location(name, root / (name.replace(".", "/") + ".py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    comfy.model_sampling = sys.modules["comfy.model_sampling"]
    return sys.modules["comfy.k_diffusion.sampling"], comfy.model_sampling


# ---- analytic mixtures (cond and uncond) --------------------------------------------------------
SHAPE = (4, 3, 3, 2)
rng = np.random.default_rng(15)
D = int(np.prod(SHAPE[1:]))
MIX_C = dict(means=rng.normal(size=(3, D)) * 1.5, stds=np.array([0.3, 0.5, 0.8]), weights=np.array([0.2, 0.3, 0.5]))
MIX_U = dict(means=rng.normal(size=(2, D)) * 1.2, stds=np.array([0.6, 0.9]), weights=np.array([0.45, 0.55]))
GUIDANCE = 2.5
BANK = rng.normal(size=(40,) + SHAPE)
X_INIT = rng.normal(size=SHAPE)


def mixture(mix, x, sigma):
    means, stds, weights = (torch.from_numpy(mix[k]) for k in ("means", "stds", "weights"))
    xf = x.reshape(x.shape[0], -1)
    v = stds[None, :] ** 2 + sigma.reshape(-1, 1) ** 2
    diff = xf[:, None, :] - means[None]
    logp = torch.log(weights)[None] - (diff ** 2).sum(-1) / (2 * v) - D / 2 * torch.log(v)
    post = means[None] + (stds[None, :] ** 2 / v)[..., None] * diff
    return (torch.softmax(logp, dim=1)[..., None] * post).sum(1).reshape(x.shape)


class Model:
    """What ComfyUI's samplers see: guided D (CFG of the two mixtures, or the cond mixture alone)
    after the post-CFG hooks, and model_sampling behind inner_model.model_patcher."""

    def __init__(self, model_sampling, cfg: bool):
        self.cfg, self.calls = cfg, 0
        patcher = types.SimpleNamespace(get_model_object=lambda name: model_sampling)
        self.inner_model = types.SimpleNamespace(model_patcher=patcher)

    def __call__(self, x, sigma, model_options=None, **kw):
        self.calls += 1
        cond = mixture(MIX_C, x, sigma)
        if not self.cfg:
            return cond
        uncond = mixture(MIX_U, x, sigma)
        out = uncond + (cond - uncond) * GUIDANCE
        for fn in (model_options or {}).get("sampler_post_cfg_function", []):
            out = fn({"denoised": out, "uncond_denoised": uncond, "cond_denoised": cond, "cond_scale": GUIDANCE})
        return out


class Bank:
    def __init__(self):
        self.i = 0

    def next(self, *args, **kw):
        self.i += 1
        return torch.from_numpy(BANK[self.i - 1].copy())


CASES = [  # (case, sampler, cfg, schedule end, kwargs)
    ("res_multistep", "res_multistep", False, "zero", {}),
    ("res_multistep_ancestral", "res_multistep_ancestral", False, "zero", {}),
    ("res_multistep_ancestral_eta05", "res_multistep_ancestral", False, "zero", dict(eta=0.5, s_noise=0.9)),
    ("er_sde", "er_sde", False, "zero", {}),
    ("er_sde_stage2_s08", "er_sde", False, "zero", dict(max_stage=2, s_noise=0.8)),
    ("er_sde_ode", "er_sde", False, "zero", dict(s_noise=0.0)),
    ("seeds_2", "seeds_2", False, "zero", {}),
    ("seeds_2_phi2_r03_eta05", "seeds_2", False, "zero", dict(solver_type="phi_2", r=0.3, eta=0.5)),
    ("seeds_3", "seeds_3", False, "zero", {}),
    ("seeds_3_ode", "seeds_3", False, "zero", dict(eta=0.0, r_1=0.25, r_2=0.6)),
    ("exp_heun_2_x0", "exp_heun_2_x0", False, "zero", {}),
    ("exp_heun_2_x0_phi1", "exp_heun_2_x0", False, "zero", dict(solver_type="phi_1")),
    ("exp_heun_2_x0_sde", "exp_heun_2_x0_sde", False, "zero", {}),
    ("gradient_estimation", "gradient_estimation", False, "zero", {}),
    ("gradient_estimation_g25", "gradient_estimation", False, "zero", dict(ge_gamma=2.5)),
    ("heunpp2", "heunpp2", False, "zero", {}),
    ("heunpp2_churn", "heunpp2", False, "zero", dict(s_churn=1.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.003)),
    ("heunpp2_nonzero_end", "heunpp2", False, "min", {}),
    ("ipndm_v", "ipndm_v", False, "zero", {}),
    ("ipndm_v_order2", "ipndm_v", False, "zero", dict(max_order=2)),
    ("ipndm_v_nonzero_end", "ipndm_v", False, "min", dict(max_order=3)),
    ("sa_solver", "sa_solver", False, "zero", {}),
    ("sa_solver_pece", "sa_solver_pece", False, "zero", {}),
    ("sa_solver_simple2", "sa_solver", False, "zero", dict(predictor_order=2, corrector_order=2, simple_order_2=True)),
    ("sa_solver_pece_o1_nonzero_end", "sa_solver_pece", False, "min", dict(predictor_order=1, corrector_order=1)),
    ("euler_cfg_pp", "euler_cfg_pp", True, "zero", {}),
    ("euler_ancestral_cfg_pp", "euler_ancestral_cfg_pp", True, "zero", {}),
    ("euler_ancestral_cfg_pp_eta05", "euler_ancestral_cfg_pp", True, "zero", dict(eta=0.5, s_noise=0.9)),
    ("dpmpp_2m_cfg_pp", "dpmpp_2m_cfg_pp", True, "zero", {}),
    ("dpmpp_2s_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", True, "zero", {}),
    ("dpmpp_2s_ancestral_cfg_pp_eta0", "dpmpp_2s_ancestral_cfg_pp", True, "zero", dict(eta=0.0)),
    ("res_multistep_cfg_pp", "res_multistep_cfg_pp", True, "zero", {}),
    ("res_multistep_ancestral_cfg_pp", "res_multistep_ancestral_cfg_pp", True, "zero", {}),
    ("gradient_estimation_cfg_pp", "gradient_estimation_cfg_pp", True, "zero", {}),
]
NO_NOISE_SAMPLER = ("euler_cfg_pp", "dpmpp_2m_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp",
                    "heunpp2", "ipndm_v", "exp_heun_2_x0")


def sd_model_sampling(ms_mod):
    ms = ms_mod.ModelSamplingDiscrete.__new__(ms_mod.ModelSamplingDiscrete)
    torch.nn.Module.__init__(ms)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ms._register_schedule(given_betas=betas)
    return ms


def main():
    src = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/work/.mirror/silveroxides+ComfyUI/repo")
    with tempfile.TemporaryDirectory() as tmp:
        commit = export_sources(src, pathlib.Path(tmp))
        K, MS = load_comfy(pathlib.Path(tmp))
        ms = sd_model_sampling(MS)
        out = dict(x_init=X_INIT, bank=BANK, guidance=np.float64(GUIDANCE), comfy_commit=np.asarray(commit))
        out.update({f"mix_c/{k}": v for k, v in MIX_C.items()})
        out.update({f"mix_u/{k}": v for k, v in MIX_U.items()})
        out["sa_interval"] = np.asarray([ms.percent_to_sigma(0.2), ms.percent_to_sigma(0.8)])
        out["sd_percent_to_sigma"] = np.asarray([ms.percent_to_sigma(p) for p in (0.0, 0.05, 0.2, 0.5, 0.8, 1.0)])
        karras = K.get_sigmas_karras(8, 0.03, 15.0)
        for case, sampler, cfg, end, kwargs in CASES:
            sigmas = karras if end == "zero" else karras[:-1]
            model, bank = Model(ms, cfg), Bank()
            orig, torch.randn_like = torch.randn_like, bank.next
            try:
                kw = dict(kwargs, disable=True)
                if sampler not in NO_NOISE_SAMPLER:
                    kw["noise_sampler"] = bank.next
                x = getattr(K, f"sample_{sampler}")(model, torch.from_numpy(X_INIT) * sigmas[0], sigmas, **kw)
            finally:
                torch.randn_like = orig
            out[f"{case}/sigmas"], out[f"{case}/out"] = sigmas.numpy(), x.numpy()
            out[f"{case}/nfe"], out[f"{case}/draws"] = np.int64(model.calls), np.int64(bank.i)
            print(f"{case:34s} nfe={model.calls:3d} draws={bank.i:3d} |x|={np.abs(x.numpy()).max():.3f}")
    out["cases"] = np.asarray([c[0] for c in CASES])
    np.savez_compressed(OUT / "samplers_comfy.npz", **out)
    print("samplers_comfy.npz", (OUT / "samplers_comfy.npz").stat().st_size, "bytes; ComfyUI", commit)


if __name__ == "__main__":
    main()
