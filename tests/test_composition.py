"""The composition root (issue 11): a new objective and hook run through the unchanged loop, a workdir reads back
through its sampling spec without the training code, one latent interface for KL and VQ, and the import
directions that keep inference below training."""
import ast
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ldm_jax import sharding as shd
from ldm_jax.interop import workdir as workdir_io
from ldm_jax.models.autoencoder import build_autoencoder, round_trip
from ldm_jax.training import loop
from ldm_jax.training.objective import Hook, Objective, default_loop_config
from ldm_jax.training.state import apply_gradients
from training_utils import batches, host, max_diff, shared_objective, tiny_config

PKG = pathlib.Path(__file__).resolve().parents[1] / "ldm_jax"
X = np.array([1.0, -2.0], np.float32)
LR = 0.1


class Quadratic(Objective):
    """loss = sum((w - x)^2) with SGD: w_k = x (1 - (1 - 2 lr)^k), loss_k = sum(x^2) (1 - 2 lr)^(2k)."""

    name = "quadratic"

    def init(self, key):
        return {"params": {"w": jnp.zeros((2,), jnp.float32)}}

    def optimizers(self):
        return {"w": optax.sgd(LR)}

    def train_step(self, state, batch, key):
        loss, g = jax.value_and_grad(lambda w: jnp.sum(jnp.square(w - batch["x"][0])))(state.params["w"])
        state, _ = apply_gradients(state, "w", g, optax.sgd(LR))
        return state, {"loss": loss}


class Recorder(Hook):
    def __init__(self, every):
        super().__init__(every=every)
        self.seen, self.closed = [], False

    def __call__(self, ctx):
        self.seen.append((ctx.step, int(ctx.state.step), ctx.metrics["loss"]))

    def close(self):
        self.closed = True


def _quadratic_config(steps: int) -> ml_collections.ConfigDict:
    c = default_loop_config()
    c.update(objective="quadratic", num_steps=steps, global_batch_size=1, log_every=2, progress=False, mesh=(1, 1, 1))
    c.checkpoint.update(every=1000, async_save=False)
    return c


def _forever(x):
    while True:
        yield {"x": x[None]}


def test_new_objective_and_hook_run_through_the_unchanged_loop(tmp_path):
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    rec = Recorder(every=2)
    result = loop.train(_quadratic_config(5), tmp_path, Quadratic(), hooks=[rec], dataset=_forever(X), mesh=mesh)
    q = (1 - 2 * LR) ** np.arange(6)
    np.testing.assert_allclose(result.losses, np.sum(X**2) * q[:5] ** 2, rtol=1e-5)
    np.testing.assert_allclose(host(result.state.params["w"]), X * (1 - q[5]), rtol=1e-5)
    # due at 2, 4 and the last step; the hook sees that step's state and its (already read) loss
    assert [(s, n) for s, n, _ in rec.seen] == [(2, 2), (4, 4), (5, 5)] and rec.closed
    np.testing.assert_allclose([m for _, _, m in rec.seen], [result.losses[i] for i in (1, 3, 4)], rtol=0)
    again = loop.train(_quadratic_config(5), tmp_path, Quadratic(), dataset=_forever(X), mesh=mesh)
    assert again.start_step == 5 and again.losses == []  # resumed from the final checkpoint


def test_workdir_reads_back_through_its_sampling_spec(tmp_path):
    """What the loader reads is what the sample-grid hook samples: the EMA (or raw) weights of the checkpoint."""
    config = tiny_config("test", num_steps=2, **{"checkpoint.every": 1000})
    objective = shared_objective("test")
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    result = loop.train(config, tmp_path, objective, dataset=batches(config, mesh), mesh=mesh)
    p, meta = workdir_io.load_workdir(tmp_path)
    assert meta["step"] == 2 and p.tokenizer_dir is None  # the test config feeds token ids (no tokenizer)
    live = host(objective.sampling_params(result.state))
    assert set(p.params) == set(live) == {"unet", "vae", "text"}
    assert max_diff(p.params, live) == 0.0
    assert max_diff(p.params["unet"], host(result.state.ema["model"]["unet"])) == 0.0
    raw, _ = workdir_io.load_workdir(tmp_path, use_ema=False)
    assert max_diff(raw.params["unet"], host(result.state.params["model"]["unet"])) == 0.0
    assert max_diff(raw.params["unet"], p.params["unet"]) > 0  # EMA differs from the raw weights after 2 steps
    assert p.scheduler["scale_factor"] == pytest.approx(float(result.state.extra["scale_factor"]), rel=1e-7)
    assert p.sample_size * 2 ** (len(p.vae_kwargs["ch_mult"]) - 1) == config.image_size
    assert p.unet_kwargs == objective.unet_kwargs and p.text_kwargs == objective.text_kwargs
    with pytest.raises(FileNotFoundError, match="no checkpoint at step 7"):
        workdir_io.load_workdir(tmp_path, step=7)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_one_latent_interface(kind):
    kw = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, norm_groups=4, resolution=16)
    if kind == "vq":
        kw.update(n_embed=16)
    model = build_autoencoder(kw)
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    params = model.init(jax.random.key(0), x, method=round_trip)
    z = model.apply(params, x, method="encode_latent")
    assert z.shape == (2, 8, 8, 4) and z.dtype == jnp.float32
    if kind == "kl":
        post = model.apply(params, x, method="encode")
        np.testing.assert_array_equal(z, post.mode())
        k = jax.random.key(2)
        np.testing.assert_array_equal(model.apply(params, x, k, method="encode_latent"), post.sample(k))
        ref = model.apply(params, x, sample_posterior=False)[0]
        mean, std = model.apply(params, x, method="latent_moments")
        np.testing.assert_array_equal(mean, post.mean)
        np.testing.assert_array_equal(std, post.std)
        np.testing.assert_array_equal(model.apply(params, z, method="decode_latent"), model.apply(params, z, method="decode"))
    else:  # LDM's VQModelInterface: encode = pre-quantization latents, decode = quantize then decode
        np.testing.assert_array_equal(model.apply(params, x, jax.random.key(2), method="encode_latent"), z)
        quant = model.apply(params, x, method="encode")[0]
        np.testing.assert_allclose(model.apply(params, z, method="decode_latent"),
                                   model.apply(params, quant, method="decode"), atol=1e-6)
        ref = model.apply(params, x)[0]
        mean, std = model.apply(params, x, method="latent_moments")
        np.testing.assert_array_equal(mean, z)
        assert not np.any(std)
    np.testing.assert_allclose(model.apply(params, x, method=round_trip), ref, atol=1e-6)


def _imports(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("ldm_jax")}


def test_dependencies_point_one_way():
    """Nothing below training/ imports it (inference reads workdirs via interop.workdir); the loop and its
    services import no objective; only the registry and entry points name the objectives."""
    entry = {"train.py", "sample.py"}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG).as_posix()
        if rel.startswith(("training/", "evaluation/")) or rel in entry:
            continue
        bad = sorted(m for m in _imports(f) if m.startswith("ldm_jax.training"))
        assert not bad, f"ldm_jax/{rel} imports {bad}"
    objectives = {"ldm_jax.training.ldm", "ldm_jax.training.autoencoder"}
    for name in ("loop", "trainer", "hooks", "objective", "state"):
        bad = _imports(PKG / "training" / f"{name}.py") & objectives
        assert not bad, f"training/{name}.py imports {bad}"
