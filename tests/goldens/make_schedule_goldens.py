"""Make tests/goldens/schedules_references.npz: timesteps and sigma schedules from diffusers and ComfyUI.

Needs requirements-dev.txt (torch, diffusers, scipy) and a ComfyUI checkout or bare git dir (its
comfy/samplers.py and comfy_extras/nodes_align_your_steps.py are read at run time, never copied):
    python3 tests/goldens/make_schedule_goldens.py /path/to/ComfyUI[.git]
ComfyUI's scheduler functions are taken out of comfy/samplers.py by name (its imports pull in the
whole app) and run on a stub `model_sampling` holding SD1's float64 noise levels with ComfyUI's
`ModelSamplingDiscrete.timestep` / `sigma` formulas written out.
"""
from __future__ import annotations

import ast
import math
import pathlib
import subprocess
import sys
from functools import partial

import numpy as np
import scipy.stats
import torch

OUT = pathlib.Path(__file__).parent
# step counts checked against diffusers' DDIM timesteps: small ones, ones that do not divide 1000,
# ones where diffusers' trailing arange gets an extra -1 entry (61, 103), the ends
STEP_COUNTS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 25, 30, 33, 40, 48, 50, 61, 75, 99, 100, 103, 128,
               150, 200, 250, 333, 499, 500, 501, 750, 999, 1000)
SPACINGS = (("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0))
COMFY_SCHEDULES = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                   "linear_quadratic", "kl_optimal")
COMFY_STEPS = (1, 2, 3, 5, 10, 20, 30, 50)


def read(src: pathlib.Path, path: str) -> str:
    if (src / path).exists():
        return (src / path).read_text()
    git = ["git", f"--git-dir={src}"] if (src / "HEAD").exists() else ["git", "-C", str(src)]
    return subprocess.run(git + ["show", f"HEAD:{path}"], check=True, capture_output=True, text=True).stdout


def pick(source: str, names: set[str], namespace: dict) -> dict:
    """Exec only the top-level functions / assignments called `names` of a module's source."""
    tree = ast.parse(source)
    body = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and n.name in names)
            or (isinstance(n, ast.Assign) and any(getattr(t, "id", None) in names for t in n.targets))]
    exec(compile(ast.Module(body=body, type_ignores=[]), "<comfy>", "exec"), namespace)
    return namespace


class ModelSampling:
    """ComfyUI's ModelSamplingDiscrete (comfy/model_sampling.py) for SD1's schedule, in float64."""

    def __init__(self):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        ac = torch.cumprod(1 - betas, 0)
        self.sigmas = ((1 - ac) / ac) ** 0.5
        self.log_sigmas = self.sigmas.log()
        self.sigma_min, self.sigma_max = self.sigmas[0], self.sigmas[-1]

    def timestep(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma.to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape)

    def sigma(self, timestep):
        t = torch.clamp(timestep.double(), min=0, max=(len(self.sigmas) - 1))
        low_idx, high_idx = t.floor().long(), t.ceil().long()
        w = t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]
        return log_sigma.exp()


def diffusers_timesteps(out):
    import diffusers

    for spacing, offset in SPACINGS:
        sch = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
        for n in STEP_COUNTS:
            if spacing == "leading" and offset and n == 1000:
                continue  # t = 1000 is out of range (diffusers indexes past its table)
            sch.set_timesteps(n)
            out[f"ts/{spacing}{offset}/{n}"] = sch.timesteps.numpy().astype(np.int16)


def comfy_schedules(out, src):
    ns = {"torch": torch, "numpy": np, "scipy": scipy, "math": math}
    pick(read(src, "comfy/k_diffusion/sampling.py"), {"append_zero", "get_sigmas_karras", "get_sigmas_exponential"}, ns)
    pick(read(src, "comfy/samplers.py"), {"simple_scheduler", "ddim_scheduler", "normal_scheduler", "beta_scheduler",
                                          "linear_quadratic_schedule", "kl_optimal_scheduler"}, ns)
    ms = ModelSampling()
    # comfy/samplers.py SCHEDULER_HANDLERS: (function, called with model_sampling?)
    handlers = {"simple": (ns["simple_scheduler"], True), "sgm_uniform": (partial(ns["normal_scheduler"], sgm=True), True),
                "karras": (ns["get_sigmas_karras"], False), "exponential": (ns["get_sigmas_exponential"], False),
                "ddim_uniform": (ns["ddim_scheduler"], True), "beta": (ns["beta_scheduler"], True),
                "normal": (ns["normal_scheduler"], True), "linear_quadratic": (ns["linear_quadratic_schedule"], True),
                "kl_optimal": (ns["kl_optimal_scheduler"], False)}
    assert set(handlers) == set(COMFY_SCHEDULES)
    for name, (fn, use_ms) in handlers.items():
        for n in COMFY_STEPS:
            if name == "kl_optimal" and n == 1:
                continue  # ComfyUI divides by n - 1
            sig = fn(ms, n) if use_ms else fn(n=n, sigma_min=float(ms.sigma_min), sigma_max=float(ms.sigma_max))
            out[f"comfy/{name}/{n}"] = np.asarray(sig, np.float64)
    for n in (100, 200):
        out[f"comfy/beta/{n}"] = np.asarray(ns["beta_scheduler"](ms, n), np.float64)
    ay = pick(read(src, "comfy_extras/nodes_align_your_steps.py"), {"loglinear_interp", "NOISE_LEVELS"}, {"np": np})
    for model in ("SD1", "SDXL"):
        for n in (1, 4, 10, 11, 20, 32, 50):
            sigmas = ay["NOISE_LEVELS"][model][:]  # AlignYourStepsScheduler.execute with denoise 1
            if n + 1 != len(sigmas):
                sigmas = ay["loglinear_interp"](sigmas, n + 1)
            sigmas = np.array(sigmas, np.float64)
            sigmas[-1] = 0
            out[f"ays/{model}/{n}"] = sigmas


def zero_snr(out):
    import diffusers
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    out["zsnr/betas"] = rescale_zero_terminal_snr(betas).numpy()
    for n in (10, 30):
        sch = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                               rescale_betas_zero_snr=True, timestep_spacing="trailing")
        sch.set_timesteps(n)
        out[f"zsnr/euler_sigmas/{n}"] = sch.sigmas.numpy().astype(np.float64)
        out[f"zsnr/euler_timesteps/{n}"] = sch.timesteps.numpy().astype(np.float64)


def main():
    src = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/work/.mirror/Comfy-Org+ComfyUI/repo")
    out = {}
    diffusers_timesteps(out)
    comfy_schedules(out, src)
    zero_snr(out)
    path = OUT / "schedules_references.npz"
    np.savez_compressed(path, **out)
    print(path, path.stat().st_size, "bytes,", len(out), "arrays")


if __name__ == "__main__":
    main()
