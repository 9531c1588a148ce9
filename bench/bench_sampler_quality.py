"""Which few-step solver to pick: error vs step count on the analytic Gaussian mixture.

    python3 bench/bench_sampler_quality.py [--out docs/sampler_quality.png]

The model is the exact denoiser of the 3-component mixture in tests/goldens/samplers_kdiffusion.npz
(x0 in R^32, float64), so the probability-flow ODE's solution is known to any accuracy: the
reference is Heun with 2000 Karras steps. Every deterministic (ODE) sampler starts from the same
noise on a Karras schedule (σ 0.03 → 15, then 0) of 5, 10 and 20 steps; the error is
max |x − x_ref| / max |x_ref| over a batch of 8. NFE (denoiser calls) is printed next to it, since
second-order single-step methods (heun, ...) call the model about twice per step.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ldm_jax import sampling  # noqa: E402
from samplers_common import load, mixture_denoiser  # noqa: E402

SOLVERS = ["euler", "heun", "lms", "dpmpp_2m", "uni_pc", "uni_pc_bh2", "deis", "ipndm", "ipndm_v",
           "res_multistep", "gradient_estimation", "exp_heun_2_x0", "heunpp2"]
STEPS = (5, 10, 20)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs" / "sampler_quality.png"))
    args = ap.parse_args()
    jax.config.update("jax_enable_x64", True)
    g = load("samplers_kdiffusion.npz")
    den = mixture_denoiser(g["means"], g["stds"], g["weights"])
    calls = []

    def counted(x, s):
        jax.debug.callback(lambda: calls.append(1), ordered=True)
        return den(x, s)

    x_init = jnp.asarray(g["x_init"])

    def run(name, n, model=den):
        sig = sampling.get_sigmas_karras(n, 0.03, 15.0)
        return np.asarray(jax.jit(lambda x: sampling.SAMPLERS[name](model, x * sig[0], sig))(x_init))

    ref = run("heun", 2000)
    table = {}
    print(f"{'sampler':22s} " + " ".join(f"{f'{n} steps (nfe)':>20s}" for n in STEPS))
    for name in [s for s in SOLVERS if s in sampling.SAMPLERS]:
        row = []
        for n in STEPS:
            calls.clear()
            out = run(name, n, counted)
            row.append((float(np.abs(out - ref).max() / np.abs(ref).max()), len(calls)))
        table[name] = row
        print(f"{name:22s} " + " ".join(f"{e:13.2e} ({c:3d})" for e, c in row))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in table.items():
        style = dict(lw=2.5, color="black") if name == "dpmpp_2m" else dict(lw=1.2)
        ax.plot([c for _, c in row], [e for e, _ in row], marker="o", label=name, **style)
    ax.set(xscale="log", yscale="log", xlabel="denoiser calls (5, 10, 20 Karras steps)",
           ylabel="max |x − x_ODE| / max |x_ODE|", title="ODE samplers on an analytic Gaussian mixture (float64)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
