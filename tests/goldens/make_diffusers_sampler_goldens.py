"""Make tests/goldens/samplers_diffusers.npz: diffusers' multistep schedulers (UniPC, ...) step by
step on the float64 Gaussian-mixture denoiser of make_sampler_goldens.py, and the ipndm / lcm
cases from ComfyUI's own `sample_ipndm` / `sample_lcm` (read out of a ComfyUI checkout at run time).

Needs requirements-dev.txt (torch, diffusers) and ComfyUI. Run from the repo root:
    python3 tests/goldens/make_diffusers_sampler_goldens.py [/path/to/ComfyUI[.git]]
Each scheduler is set up for the same Karras schedule as the k-diffusion goldens: after
set_timesteps its `sigmas` are replaced by that schedule (float64) and its `timesteps` by distinct
labels; the model is the mixture's data prediction (prediction_type "sample") at the VE point
x_vp·sqrt(1 + σ²), and the result is at σ = 0 where VP and VE coincide.
UniPC with solver_type "bh1" returns NaN on a step to σ = 0 (B(h) = −h = −∞ times a zero
correction in its order-1 update), and so does DEIS (σ_t·(e^h − 1) = 0·∞), so their cases run a
schedule that ends at σ_min > 0
(`{case}/sigmas`, the VP result x_vp = x_σ / sqrt(1 + σ_min²)); ours takes the limit there.
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from make_sampler_goldens import BANK, K, MEANS, STDS, WEIGHTS, X_INIT, Bank, Counted, mixture_denoiser  # noqa: E402
from make_schedule_goldens import pick, read  # noqa: E402

torch.set_default_dtype(torch.float64)
OUT = pathlib.Path(__file__).parent
STEPS = 10

CASES = {  # case -> (our sampler, our options, diffusers class, its config)
    "uni_pc_o1": ("uni_pc", dict(order=1), "UniPCMultistepScheduler", dict(solver_order=1, solver_type="bh1")),
    "uni_pc_o2": ("uni_pc", dict(order=2), "UniPCMultistepScheduler", dict(solver_order=2, solver_type="bh1")),
    "uni_pc_o3": ("uni_pc", dict(order=3), "UniPCMultistepScheduler", dict(solver_order=3, solver_type="bh1")),
    "uni_pc_o3_no_corrector": ("uni_pc", dict(order=3, disable_corrector=tuple(range(STEPS))),
                               "UniPCMultistepScheduler",
                               dict(solver_order=3, solver_type="bh1", disable_corrector=list(range(STEPS)))),
    "uni_pc_o3_no_last_corrector": ("uni_pc", dict(order=3, disable_corrector=(STEPS - 2,)),
                                    "UniPCMultistepScheduler",
                                    dict(solver_order=3, solver_type="bh1", disable_corrector=[STEPS - 2])),
    "uni_pc_bh2_o1": ("uni_pc_bh2", dict(order=1), "UniPCMultistepScheduler", dict(solver_order=1, solver_type="bh2")),
    "uni_pc_bh2_o2": ("uni_pc_bh2", dict(order=2), "UniPCMultistepScheduler", dict(solver_order=2, solver_type="bh2")),
    "uni_pc_bh2_o3": ("uni_pc_bh2", dict(order=3), "UniPCMultistepScheduler", dict(solver_order=3, solver_type="bh2")),
    "uni_pc_bh2_o2_no_last_corrector": ("uni_pc_bh2", dict(order=2, disable_corrector=(STEPS - 2,)),
                                        "UniPCMultistepScheduler",
                                        dict(solver_order=2, solver_type="bh2", disable_corrector=[STEPS - 2])),
    "deis_o1": ("deis", dict(order=1), "DEISMultistepScheduler", dict(solver_order=1)),
    "deis_o2": ("deis", dict(order=2), "DEISMultistepScheduler", dict(solver_order=2)),
    "deis_o3": ("deis", dict(order=3), "DEISMultistepScheduler", dict(solver_order=3)),
    "deis_o3_16": ("deis", dict(order=3), "DEISMultistepScheduler", dict(solver_order=3)),  # no lower_order_final
}


def run(cls_name: str, config: dict, sigmas: torch.Tensor):
    import diffusers

    steps = len(sigmas) - 1
    sch = getattr(diffusers, cls_name)(prediction_type="sample", **config)
    sch.set_timesteps(steps)
    sch.sigmas = sigmas.clone()
    sch.timesteps = torch.arange(steps, 0, -1)
    x = torch.from_numpy(X_INIT) * sigmas[0] / (1 + sigmas[0] ** 2) ** 0.5  # VP noise at σ_0
    calls = 0
    for i, t in enumerate(sch.timesteps):
        s = sigmas[i]
        d = mixture_denoiser(x * (1 + s ** 2) ** 0.5, s * torch.ones(x.shape[0]))
        calls += 1
        x = sch.step(d, t, x).prev_sample
    assert torch.isfinite(x).all(), cls_name
    return x.numpy(), calls


COMFY_CASES = {"ipndm": ("ipndm", {}), "ipndm_order2": ("ipndm", dict(max_order=2)), "lcm": ("lcm", {})}


def run_comfy(src: pathlib.Path, sigmas: torch.Tensor):
    """ComfyUI's sample_ipndm / sample_lcm on the mixture, noise from the bank by draw index."""
    import tqdm

    ns = pick(read(src, "comfy/k_diffusion/sampling.py"), {"sample_ipndm", "sample_lcm"},
              {"torch": torch, "trange": lambda n, disable=None: tqdm.trange(n, disable=True)})
    out = {}
    for case, (name, opts) in COMFY_CASES.items():
        model = Counted(mixture_denoiser)
        # ModelSamplingDiscrete (EPS).noise_scaling: sigma * noise + latent
        model.inner_model = type("M", (), {"inner_model": type("N", (), {"model_sampling": type("S", (), {
            "noise_scaling": staticmethod(lambda sigma, noise, latent: sigma * noise + latent)})})})
        bank = Bank(BANK)
        kw = dict(opts, disable=True)
        if name == "lcm":
            kw["noise_sampler"] = lambda s, sn: bank.next()
        x = ns[f"sample_{name}"](model, torch.from_numpy(X_INIT) * sigmas[0], sigmas, **kw)
        out[f"{case}/out"], out[f"{case}/nfe"], out[f"{case}/sigmas"] = x.numpy(), np.int64(model.calls), sigmas.numpy()
        print(f"{case:34s} nfe={model.calls} draws={bank.i} |x|={np.abs(x.numpy()).max():.4f}")
    return out


def main():
    to_zero = K.get_sigmas_karras(STEPS, 0.03, 15.0)
    to_positive = K.get_sigmas_karras(STEPS + 1, 0.03, 15.0)[:-1]
    out = dict(means=MEANS, stds=STDS, weights=WEIGHTS, x_init=X_INIT)
    for case, (_, _, cls_name, config) in CASES.items():
        if case == "deis_o3_16":
            sigmas = K.get_sigmas_karras(17, 0.03, 15.0)[:-1]
        elif config.get("solver_type") == "bh1" or cls_name.startswith("DEIS"):
            sigmas = to_positive  # diffusers' bh1 and DEIS give NaN on a step to σ = 0
        else:
            sigmas = to_zero
        x, calls = run(cls_name, config, sigmas)
        out[f"{case}/out"], out[f"{case}/nfe"], out[f"{case}/sigmas"] = x, np.int64(calls), sigmas.numpy()
        print(f"{case:34s} nfe={calls} |x|={np.abs(x).max():.4f}")
    src = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/work/.mirror/Comfy-Org+ComfyUI/repo")
    comfy = run_comfy(src, to_zero)
    out.update(comfy)
    out["bank"] = BANK[:12]
    out["cases"] = np.asarray(list(CASES) + list(COMFY_CASES))
    path = OUT / "samplers_diffusers.npz"
    np.savez_compressed(path, **out)
    print(path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
