"""Does LoRA learn? A new token for a (color, shape) pair the base never saw, on the built-in shapes data.

    python3 bench/lora_shapes_proof.py --base runs/shapes --out /tmp/lora_proof [--pair red:triangle]
        [--images 8] [--steps 300] [--rank 8] [--samples 48] [--grid docs/lora_shapes_proof.png]

--base: a shapes LDM workdir (the main job: `python -m ldm_jax.train --config=configs/shapes.py
--workdir=runs/shapes`); its training data never holds the pair (`data.shapes.heldout`). The script
1. renders `--images` images of the pair (random size / position / background, `data.shapes.render`) and
   captions them with the pair's words replaced by the new token: "a large sks at the top left on a black
   background" (OUT/instance/*.png + .txt);
2. LoRA-fine-tunes the base on them (configs/lora_sd1.py with init_from = the base workdir: rank `--rank`
   on the UNet's attention / proj / feed-forward / conv and the text encoder's attention + MLP) into OUT/lora;
3. samples `--samples` new-token prompts (fresh sizes / positions / backgrounds) with the base and with the
   base + LoRA (`load_pretrained(OUT/lora)`), the same seeds, and scores them with the dataset's classifier
   (`data.shapes.describe`): how often the sample shows the pair's color, its shape, both. Controls: the
   pair named in words ("a large red triangle ...") and fresh captions of trained pairs (does the LoRA keep
   what the base knew?). Prints a table, the LoRA file size (diffusers/peft safetensors, fp32 and fp16),
   and writes a grid PNG: new-token samples, base (top half) vs base + LoRA (bottom half).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKEN = "sks"


def new_token_prompts(spec, pair, n: int, seed: int) -> tuple[list[dict], list[str], list[str]]:
    """(attributes, prompts with the token, the same prompts in words) of n draws of `pair`."""
    import numpy as np

    from ldm_jax.data import shapes

    color, shape = pair
    rng = np.random.default_rng([seed, 13])
    backgrounds = [b for b in spec.backgrounds if b != color]
    attrs, token, words = [], [], []
    for _ in range(n):
        a = {"color": color, "shape": shape, "size": spec.sizes[rng.integers(len(spec.sizes))],
             "position": spec.positions[rng.integers(len(spec.positions))],
             "background": backgrounds[rng.integers(len(backgrounds))]}
        attrs.append(a)
        words.append(shapes.caption(a))
        token.append(words[-1].replace(f"{color} {shape}", TOKEN))
    return attrs, token, words


def rates(images, pair, spec) -> dict[str, float]:
    """Fraction of images the classifier reads as the pair's color, its shape, both."""
    from ldm_jax.data import shapes

    got = [shapes.classify(im, spec) for im in images]
    n = len(got)
    return {"color": sum(c == pair[0] for c, _ in got) / n, "shape": sum(s == pair[1] for _, s in got) / n,
            "both": sum((c, s) == tuple(pair) for c, s in got) / n}


def lora_config(base: pathlib.Path, data: pathlib.Path, a: argparse.Namespace):
    sys.path.insert(0, str(ROOT / "tests"))
    from training_utils import load_config

    c = load_config("lora_sd1")
    with c.unlocked():
        c.init_from = str(base)
        c.image_size = c.data.resolution = 32
        c.data.update(source="folder", path=str(data), flip=False, crop="center", num_threads=1,
                      data_dir=str(data.parent / "tfds"))
        c.global_batch_size = a.batch
        c.num_steps = a.steps
        c.optim.lr = a.lr
        c.optim.weight_decay = 0.0
        c.lora.update(rank=a.rank, alpha=float(a.rank), unet_targets="attn,proj,ff,conv", text_targets="attn,mlp")
        c.cond.drop_prob = 0.1  # as the base was trained: the null prompt stays what guidance expects
        c.first_stage.sample_posterior = False  # as configs/shapes.py
        c.diffusion.min_snr_gamma = 5.0
        c.ema.decay = 0.99
        c.checkpoint.update(every=a.steps, async_save=False)
        c.log_every = 50
        c.mesh = (1, 1, 1)
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="a shapes LDM workdir (configs/shapes.py)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--pair", default="red:triangle", help="COLOR:SHAPE, one of the base's held-out pairs")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--grid", default=str(ROOT / "docs" / "lora_shapes_proof.png"))
    a = ap.parse_args()

    import numpy as np
    from PIL import Image

    from ldm_jax import train
    from ldm_jax.data import shapes
    from ldm_jax.images import image_grid
    from ldm_jax.interop import lora as lora_io
    from ldm_jax.pipeline import load_pretrained

    base, out = pathlib.Path(a.base).expanduser().absolute(), pathlib.Path(a.out).expanduser().absolute()
    spec = shapes.ShapesSpec(**{k: v for k, v in json.loads((base / "config.json").read_text())["data"]["shapes"].items()
                                if k in ("colors", "shapes", "sizes", "positions", "backgrounds", "heldout")})
    pair = tuple(a.pair.split(":"))
    if pair not in spec.heldout:
        raise SystemExit(f"--pair {a.pair}: the base saw it in training; held-out pairs: {spec.heldout}")

    # 1. instance images of the pair, captioned with the new token
    inst = out / "instance"
    inst.mkdir(parents=True, exist_ok=True)
    attrs, captions, _ = new_token_prompts(spec, pair, a.images, seed=1)
    for i, (at, cap) in enumerate(zip(attrs, captions)):
        Image.fromarray(shapes.render(at, 32)).save(inst / f"{i:03d}.png")
        (inst / f"{i:03d}.txt").write_text(cap)

    # 2. LoRA fine-tune on the base workdir
    t0 = time.perf_counter()
    train.train_stage(lora_config(base, inst, a), out / "lora")
    train_s = time.perf_counter() - t0

    # 3. sample before / after with the same prompts and seeds
    _, token, words = new_token_prompts(spec, pair, a.samples, seed=2)
    indist = shapes.indistribution_prompts(spec, a.samples, seed=77)
    kw = dict(sampler="dpmpp_2m", schedule="karras", steps=20, guidance_scale=a.guidance, seed=0, height=32, width=32)
    results, grids = {}, []
    for name, path in (("base", base), ("base + LoRA", out / "lora")):
        pipe = load_pretrained(path)
        imgs = {k: np.asarray(pipe.generate(p, **kw)) for k, p in (("token", token), ("words", words),
                                                                     ("indist", indist))}
        results[name] = {"token": rates(imgs["token"], pair, spec), "words": rates(imgs["words"], pair, spec),
                         "indist_both": shapes.score(list(imgs["indist"]), indist, spec)["both"]}
        grids.append(imgs["token"][:16])
        if name != "base":
            (name_, adapters), = pipe.loras.adapters.items()
            for dtype, suffix in ((np.float32, "fp32"), (np.float16, "fp16")):
                f = out / f"{TOKEN}_{suffix}.safetensors"
                lora_io.save(f, adapters, pipe.lora_kwargs(), format="diffusers", dtype=dtype)
                results[f"file_{suffix}_bytes"] = f.stat().st_size

    grid = image_grid(np.concatenate(grids))
    pathlib.Path(a.grid).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST))
                    ).save(a.grid)

    c, s = pair
    print(f"\nLoRA on {a.images} images of the held-out pair '{c} {s}' as '{TOKEN}', {a.steps} steps (batch {a.batch}, "
          f"rank {a.rank}, lr {a.lr}), {train_s:.0f} s; {a.samples} samples per row, classifier data.shapes.describe")
    print(f"{'prompt':44s} {'model':12s} {'color':>6s} {'shape':>6s} {'both':>6s}")
    for name in ("base", "base + LoRA"):
        r = results[name]
        print(f"{'new token: ' + token[0]:44.44s} {name:12s} {r['token']['color']:6.0%} {r['token']['shape']:6.0%} "
              f"{r['token']['both']:6.0%}")
    for name in ("base", "base + LoRA"):
        r = results[name]
        print(f"{'in words: ' + words[0]:44.44s} {name:12s} {r['words']['color']:6.0%} {r['words']['shape']:6.0%} "
              f"{r['words']['both']:6.0%}")
    for name in ("base", "base + LoRA"):
        print(f"{'trained pairs (fresh captions), both right':44s} {name:12s} {'':6s} {'':6s} "
              f"{results[name]['indist_both']:6.0%}")
    print(f"chance: color {1 / len(spec.colors):.0%}, shape {1 / len(spec.shapes):.0%}; LoRA file "
          f"{results['file_fp32_bytes'] / 1024:.0f} KiB fp32, {results['file_fp16_bytes'] / 1024:.0f} KiB fp16; "
          f"grid {a.grid} (new-token samples: base top, base + LoRA bottom)")
    (out / "results.json").write_text(json.dumps({**results, "train_seconds": train_s, "args": vars(a)}, indent=1))


if __name__ == "__main__":
    main()
