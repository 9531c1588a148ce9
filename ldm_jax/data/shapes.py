"""The built-in `shapes` dataset: colored geometric shapes with captions, no download needed.

Every example is a pure function of (seed, split, index), so a dataset of any size is reproducible
and can be generated in any order. Colors are corners of the RGB cube (plus gray) so that they stay
distinct after a lossy autoencoder and a few minutes of diffusion training, and `classify` can read
them back from generated samples by nearest-palette lookup.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Iterator, Sequence

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
# Side (or diameter) of a shape as a fraction of the image side. "large" still fits in a grid cell (1/3).
SIZES: dict[str, float] = {"small": 0.2, "medium": 0.26, "large": 0.32}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
_PHRASE = {"center": "in the center"}
SPLITS = ("train", "test", "heldout")


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
    """What the generator draws from. Comma-separated strings are accepted for every list (config-friendly)."""

    resolution: int = 32
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
    shapes: tuple[str, ...] = SHAPES
    sizes: tuple[str, ...] = ("small", "large")
    positions: tuple[str, ...] = POSITIONS
    backgrounds: tuple[str, ...] = ("black", "white", "gray", "blue")
    # (color, shape) pairs that never appear in "train"/"test"; "heldout" holds only these.
    heldout: tuple[tuple[str, str], ...] = (("red", "triangle"), ("green", "square"), ("blue", "circle"))

    def __post_init__(self):
        for field in ("colors", "shapes", "sizes", "positions", "backgrounds"):
            object.__setattr__(self, field, _names(getattr(self, field)))
        heldout = self.heldout
        if isinstance(heldout, str):
            heldout = tuple(tuple(p.split(":")) for p in _names(heldout))
        object.__setattr__(self, "heldout", tuple(tuple(p) for p in heldout))
        if not 32 <= self.resolution <= 512:
            raise ValueError(f"shapes resolution must be in [32, 512], got {self.resolution}")
        checks = (("colors", PALETTE), ("backgrounds", PALETTE), ("shapes", SHAPES), ("sizes", SIZES),
                  ("positions", POSITIONS))
        for field, known in checks:
            values = getattr(self, field)
            if not values:
                raise ValueError(f"shapes: {field} is empty")
            bad = [v for v in values if v not in known]
            if bad:
                raise ValueError(f"shapes: unknown {field} {bad}; known: {list(known)}")
        for pair in self.heldout:
            if len(pair) != 2 or pair[0] not in self.colors or pair[1] not in self.shapes:
                raise ValueError(f"shapes: held-out pair {pair} must be (color, shape) from {self.colors} x {self.shapes}")
        if not self.train_pairs:
            raise ValueError("shapes: every (color, shape) pair is held out; nothing left to train on")
        if any(all(b == c for b in self.backgrounds) for c in self.colors):
            raise ValueError("shapes: a color needs at least one background different from it")

    @property
    def train_pairs(self) -> tuple[tuple[str, str], ...]:
        """(color, shape) pairs seen in training."""
        return tuple((c, s) for c in self.colors for s in self.shapes if (c, s) not in self.heldout)

    @property
    def classes(self) -> tuple[tuple[str, str], ...]:
        """All (color, shape) pairs; `label` indexes this tuple."""
        return tuple((c, s) for c in self.colors for s in self.shapes)


def sample_attributes(spec: ShapesSpec, seed: int, split: str, index: int) -> dict[str, str]:
    """The attributes of example `index` of `split`: a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"shapes split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    pairs = spec.heldout if split == "heldout" else spec.train_pairs
    if not pairs:
        raise ValueError("shapes: the heldout split is empty because no (color, shape) pair is held out")
    color, shape = pairs[rng.integers(len(pairs))]
    backgrounds = [b for b in spec.backgrounds if b != color]
    return {
        "color": color,
        "shape": shape,
        "size": spec.sizes[rng.integers(len(spec.sizes))],
        "position": spec.positions[rng.integers(len(spec.positions))],
        "background": backgrounds[rng.integers(len(backgrounds))],
    }


def caption(attrs: dict[str, str]) -> str:
    """E.g. "a small red circle at the top left on a blue background"."""
    where = _PHRASE.get(attrs["position"], f"at the {attrs['position']}")
    return f"a {attrs['size']} {attrs['color']} {attrs['shape']} {where} on a {attrs['background']} background"


def parse_caption(text: str) -> dict[str, str]:
    """Inverse of `caption`; raises ValueError on text it did not write."""
    words = text.strip().split()
    try:
        if words[0] != "a" or words[-1] != "background" or words[-4:-2] != ["on", "a"]:
            raise ValueError
        size, color, shape = words[1:4]
        where = " ".join(words[4:-4])
        background = words[-2]
        position = next(p for p in POSITIONS if _PHRASE.get(p, f"at the {p}") == where)
    except (ValueError, IndexError, StopIteration):
        raise ValueError(f"not a shapes caption: {text!r}") from None
    return {"color": color, "shape": shape, "size": size, "position": position, "background": background}


def _center(position: str, resolution: int) -> tuple[float, float]:
    row, col = divmod(POSITIONS.index(position), 3)
    return (row + 0.5) * resolution / 3, (col + 0.5) * resolution / 3


def _shape_mask(shape: str, cy: float, cx: float, hy: float, hx: float, height: int, width: int) -> np.ndarray:
    """Boolean (H, W) mask of `shape` filling the box of half-sizes (hy, hx) around (cy, cx).

    Sampled at pixel centers with hard edges, so an image holds only palette colors.
    """
    y = (np.arange(height, dtype=np.float32)[:, None] + 0.5 - cy) / hy
    x = (np.arange(width, dtype=np.float32)[None, :] + 0.5 - cx) / hx
    if shape == "circle":
        return y * y + x * x <= 1.0
    if shape == "square":
        return (np.abs(y) <= 1.0) & (np.abs(x) <= 1.0)
    if shape == "triangle":  # apex up, base at the bottom of the box
        return (y <= 1.0) & (np.abs(x) <= (y + 1.0) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def _box(attrs: dict[str, str], resolution: int) -> tuple[int, int, int]:
    """Top, left and side in whole pixels, so squares stay s x s wherever they sit."""
    side = max(3, round(SIZES[attrs["size"]] * resolution))
    cy, cx = _center(attrs["position"], resolution)
    return round(cy - side / 2), round(cx - side / 2), side


def render(attrs: dict[str, str], resolution: int) -> np.ndarray:
    """uint8 (R, R, 3) image of one shape on a flat background."""
    image = np.empty((resolution, resolution, 3), np.uint8)
    image[...] = PALETTE[attrs["background"]]
    top, left, side = _box(attrs, resolution)
    h = side / 2
    # Drawn in the shape's own box only (the rest is background): 10x faster at 256 px.
    t, l = max(top, 0), max(left, 0)
    region = image[t:top + side, l:left + side]
    mask = _shape_mask(attrs["shape"], top + h - t, left + h - l, h, h, *region.shape[:2])
    region[mask] = PALETTE[attrs["color"]]
    return image


def generate(spec: ShapesSpec, seed: int, split: str, start: int, stop: int) -> Iterator[dict]:
    """Examples [start, stop) of `split`: image, caption, label and the attribute names."""
    for index in range(start, stop):
        attrs = sample_attributes(spec, seed, split, index)
        yield {
            "image": render(attrs, spec.resolution),
            "caption": caption(attrs),
            "label": spec.classes.index((attrs["color"], attrs["shape"])),
            **attrs,
        }


def encoded_examples(spec: ShapesSpec, seed: int, split: str, start: int, stop: int) -> list[dict]:
    """`generate` with the image PNG-encoded (what the tfds builder stores); a unit of parallel work."""
    import io

    from PIL import Image

    out = []
    for ex in generate(spec, seed, split, start, stop):
        buf = io.BytesIO()
        # Flat-color images compress well even at the fastest level; level 1 keeps building quick.
        Image.fromarray(ex["image"]).save(buf, format="PNG", compress_level=1)
        out.append({"image": buf.getvalue(), "caption": ex["caption"], "label": ex["label"]})
    return out


def heldout_prompts(spec: ShapesSpec | None = None, per_pair: int = 4, seed: int = 0) -> list[str]:
    """Captions of held-out (color, shape) pairs, `per_pair` each with varied size/position/background."""
    spec = spec or ShapesSpec()
    prompts = []
    for p, (color, shape) in enumerate(spec.heldout):
        rng = np.random.default_rng([seed, 7, p])
        backgrounds = [b for b in spec.backgrounds if b != color]
        for _ in range(per_pair):
            prompts.append(caption({
                "color": color, "shape": shape,
                "size": spec.sizes[rng.integers(len(spec.sizes))],
                "position": spec.positions[rng.integers(len(spec.positions))],
                "background": backgrounds[rng.integers(len(backgrounds))],
            }))
    return prompts


# ---------------------------------------------------------------------------------------------
# Classifier: reads every caption attribute back from an image, e.g. a generated sample.
# ---------------------------------------------------------------------------------------------

def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean mask (noise in generated samples is dropped)."""
    labels = np.zeros(mask.shape, np.int32)
    best, best_size, current = 0, 0, 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else mask


_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / side**2 of each template
_BLURS = (0.0, 0.5, 0.8, 1.1, 1.5)  # px (Gaussian sigma) a template may be blurred by to match an image


def _coverage(shape: str, cy: float, cx: float, half: float, height: int, width: int, sub: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by `shape` in its box of half-side `half` around (cy, cx) (sub x sub samples)."""
    fine = _shape_mask(shape, cy * sub, cx * sub, half * sub, half * sub, height * sub, width * sub)
    return fine.reshape(height, sub, width, sub).mean((1, 3))


def _fit_shape(alpha: np.ndarray, shapes: Sequence[str]) -> tuple[str, float, float, float, float]:
    """The template that best explains a soft shape mask: (shape, side, box center y, x, fit).

    Blurring keeps a mask's area and centroid, so each shape's template is placed with the mask's area and
    centroid (a triangle's centroid sits a sixth of its side below its box center) and compared, blurred by
    each of `_BLURS`, with the mask in squared error; fit = 1 - error / mask energy of the best candidate.
    """
    from scipy.ndimage import gaussian_filter

    area = float(alpha.sum())
    ys, xs = np.mgrid[:alpha.shape[0], :alpha.shape[1]] + 0.5
    my, mx = float((alpha * ys).sum() / area), float((alpha * xs).sum() / area)
    best = ("", 0.0, 0.0, 0.0, np.inf)
    for shape in shapes:
        side = float(np.sqrt(area / _FILL[shape]))
        cy = my - side / 6 if shape == "triangle" else my
        template = _coverage(shape, cy, mx, side / 2, *alpha.shape)
        for sigma in _BLURS:
            t = gaussian_filter(template, sigma, mode="constant") if sigma else template
            err = float(((t - alpha) ** 2).sum())
            if err < best[4]:
                best = (shape, side, cy, mx, err)
    shape, side, cy, cx, err = best
    return shape, side, cy, cx, 1.0 - err / max(float((alpha ** 2).sum()), 1e-6)


def describe(image_uint8: np.ndarray, spec: ShapesSpec | None = None) -> dict[str, str | float | None]:
    """Color, shape, size, position and background read from an image, plus the shape fit.

    Pixels are mapped to the nearest palette color; the background is the most common color on the
    border; the shape's color is the most common other shape color, and its largest connected blob
    locates the shape. Around the blob each pixel's soft membership (its position between the background
    and the shape color) forms a soft mask; shape, size and position are those of the template (circle,
    square, triangle of the mask's area and centroid, sharp or blurred up to 1.5 px) that fits the mask
    best, so a slightly blurred shape (an autoencoder's reconstruction, a sample) is read as drawn.
    """
    spec = spec or ShapesSpec()
    image = np.asarray(image_uint8)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"classify expects a (H, W, 3) uint8 image, got shape {image.shape}")
    stride = max(1, min(image.shape[:2]) // 64)  # 64 px are plenty to tell shapes apart; keeps this fast
    image = image[stride // 2::stride, stride // 2::stride].astype(np.float32)
    names = sorted(set(spec.colors) | set(spec.backgrounds))
    palette = np.asarray([PALETTE[n] for n in names], np.float32)
    dist = ((image[:, :, None, :] - palette) ** 2).sum(-1)
    nearest = dist.argmin(-1)
    border = np.concatenate([nearest[0], nearest[-1], nearest[:, 0], nearest[:, -1]])
    background = int(np.bincount(border, minlength=len(names)).argmax())
    shape_colors = [names.index(c) for c in spec.colors if names[background] != c]
    counts = np.bincount(nearest.ravel(), minlength=len(names))
    out: dict[str, str | float | None] = {"background": names[background], "color": None, "shape": None,
                                          "size": None, "position": None, "fit": 0.0}
    color = max(shape_colors, key=lambda i: counts[i])
    if counts[color] == 0:
        return out
    blob = _largest_component(nearest == color)
    ys, xs = np.nonzero(blob)
    pad = 3  # px around the blob: room for a blurred edge
    y0, y1 = max(ys.min() - pad, 0), min(ys.max() + 1 + pad, image.shape[0])
    x0, x1 = max(xs.min() - pad, 0), min(xs.max() + 1 + pad, image.shape[1])
    bg, fg = palette[background], palette[color]
    d = fg - bg
    window = image[y0:y1, x0:x1] - bg
    alpha = np.clip((window @ d) / float(d @ d), 0.0, 1.0)
    off = np.linalg.norm(window - alpha[..., None] * d, axis=-1) > 0.5 * np.linalg.norm(d)
    alpha[off] = 0.0  # another color: not this shape
    shape, side, cy, cx, fit = _fit_shape(alpha, spec.shapes)
    cy, cx = cy + y0, cx + x0
    res = image.shape[0]
    row, col = min(max(int(cy * 3 / res), 0), 2), min(max(int(cx * 3 / image.shape[1]), 0), 2)
    out.update(color=names[color], shape=shape, fit=fit, position=POSITIONS[row * 3 + col],
               size=min(spec.sizes, key=lambda s: abs(SIZES[s] * res - side)))
    return out


def classify(image_uint8: np.ndarray, spec: ShapesSpec | None = None) -> tuple[str | None, str | None]:
    """(color, shape) of the shape in a uint8 (H, W, 3) image; (None, None) if no shape is found."""
    d = describe(image_uint8, spec)
    return d["color"], d["shape"]


ATTRIBUTES = ("color", "shape", "size", "position", "background")


def chance_levels(spec: ShapesSpec) -> dict[str, float]:
    """Accuracy of a uniform guess per attribute (the background excludes the shape's color, hence the -1)."""
    n_bg = len(spec.backgrounds) - (1 if set(spec.colors) & set(spec.backgrounds) else 0)
    n = {"color": len(spec.colors), "shape": len(spec.shapes), "size": len(spec.sizes),
         "position": len(spec.positions), "background": max(n_bg, 1)}
    return {a: 1.0 / n[a] for a in ATTRIBUTES}


def indistribution_prompts(spec: ShapesSpec | None = None, num: int = 96, seed: int = 4321) -> list[str]:
    """`num` fresh captions of trained (color, shape) pairs: the test split's attribute draws under `seed`."""
    spec = spec or ShapesSpec()
    return [caption(sample_attributes(spec, seed, "test", i)) for i in range(num)]


def score(images: Sequence[np.ndarray], prompts: Sequence[str], spec: ShapesSpec | None = None) -> dict[str, float]:
    """Fraction of images whose classified attribute matches their prompt, for every caption attribute.

    Keys: the `ATTRIBUTES` (color, shape, size, position, background), "both" (color and shape) and
    "all" (every attribute right).
    """
    if len(images) != len(prompts) or not prompts:
        raise ValueError(f"score needs as many images as prompts (>0), got {len(images)} and {len(prompts)}")
    hits: Counter = Counter()
    for image, prompt in zip(images, prompts):
        want, got = parse_caption(prompt), describe(image, spec)
        right = {a: got[a] == want[a] for a in ATTRIBUTES}
        hits.update(a for a, ok in right.items() if ok)
        hits["both"] += right["color"] and right["shape"]
        hits["all"] += all(right.values())
    return {k: hits[k] / len(prompts) for k in (*ATTRIBUTES, "both", "all")}


def shape_breakdown(images: Sequence[np.ndarray], wanted: Sequence[dict[str, str]],
                    spec: ShapesSpec | None = None) -> dict[str, dict]:
    """Where shape accuracy is lost: per "size shape" kind (e.g. "small circle") of `wanted` (attribute dicts,
    one per image), the fraction of images read as that shape ("accuracy"), how many there are ("count") and
    what they were read as ("read_as": {shape or "none": count}). Kinds are ordered by shape, then size."""
    if len(images) != len(wanted) or not wanted:
        raise ValueError(f"shape_breakdown needs as many images as attribute sets (>0), got {len(images)} and "
                         f"{len(wanted)}")
    read: dict[str, Counter] = {}
    for image, want in zip(images, wanted):
        got = describe(image, spec)["shape"] or "none"
        read.setdefault(f"{want['size']} {want['shape']}", Counter())[got] += 1
    kinds = sorted(read, key=lambda k: (SHAPES.index(k.split()[1]) if k.split()[1] in SHAPES else len(SHAPES), k))
    return {k: {"accuracy": read[k][k.split()[1]] / sum(read[k].values()), "count": sum(read[k].values()),
                "read_as": dict(read[k])} for k in kinds}


def format_breakdown(breakdown: dict[str, dict]) -> str:
    """One line: "small circle 34% (35; 19 read as square), ..." (the commonest wrong reading of each kind)."""
    parts = []
    for kind, b in breakdown.items():
        wrong = {s: n for s, n in b["read_as"].items() if s != kind.split()[1]}
        worst = max(wrong, key=wrong.get) if wrong else None
        parts.append(f"{kind} {b['accuracy']:.0%} ({b['count']}" + (f"; {wrong[worst]} read as {worst})" if worst
                                                                  else ")"))
    return ", ".join(parts)


def attributes_kept(originals: Sequence[np.ndarray], recons: Sequence[np.ndarray],
                    spec: ShapesSpec | None = None) -> list[dict[str, bool]]:
    """Per image pair: whether the classifier reads the same value of each attribute from both (uint8 images)."""
    out = []
    for a, b in zip(originals, recons):
        da, db = describe(a, spec), describe(b, spec)
        out.append({k: da[k] == db[k] for k in ATTRIBUTES})
    return out
