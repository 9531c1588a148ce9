"""The first-stage loss formulas against float64 NumPy, the discriminator against the PyTorch reference (golden),
and one full objective step whose adaptive weight is recomputed from independent gradients."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldm_jax.models.discriminator import NLayerDiscriminator, hinge_d_loss, vanilla_d_loss
from ldm_jax.training.autoencoder import adaptive_weight, reconstruction_nll

RS = np.random.RandomState(0)


def test_hinge_and_vanilla_match_numpy_float64():
    real = RS.standard_normal((4, 3, 3, 1)) * 2
    fake = RS.standard_normal((4, 3, 3, 1)) * 2
    hinge = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
    vanilla = 0.5 * (np.mean(np.log1p(np.exp(-real))) + np.mean(np.log1p(np.exp(fake))))
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    np.testing.assert_allclose(float(hinge_d_loss(f32(real), f32(fake))), hinge, rtol=1e-6)
    np.testing.assert_allclose(float(vanilla_d_loss(f32(real), f32(fake))), vanilla, rtol=1e-6)
    assert 0.3 < hinge < 3 and 0.3 < vanilla < 3  # both branches of the hinge are exercised


@pytest.mark.parametrize("g_scale", [1.0, 1e-9])  # 1e-9: the ratio hits the 1e4 clamp
def test_adaptive_weight_matches_numpy_float64(g_scale):
    a = RS.standard_normal((3, 3, 8, 3))
    b = RS.standard_normal((3, 3, 8, 3)) * g_scale
    want = min(max(np.linalg.norm(a) / (np.linalg.norm(b) + 1e-4), 0.0), 1e4) * 0.5
    got = float(adaptive_weight(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), 0.5))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_reconstruction_nll_matches_numpy_float64():
    x = RS.uniform(-1, 1, (2, 4, 4, 3))
    r = RS.uniform(-1, 1, (2, 4, 4, 3))
    p = RS.uniform(0, 1, (2,))
    lv = 0.3
    rec = 1.5 * np.abs(x - r) + 0.7 * p[:, None, None, None]  # LPIPS broadcast onto every pixel, as in LDM
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    nll, mean_rec = reconstruction_nll(f32(x), f32(r), f32(lv), f32(p), kind="kl", pixel_weight=1.5, perceptual_weight=0.7)
    np.testing.assert_allclose(float(nll), np.sum(rec / np.exp(lv) + lv) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(mean_rec), rec.mean(), rtol=1e-5)
    nll_vq, _ = reconstruction_nll(f32(x), f32(r), f32(lv), f32(p), kind="vq", pixel_weight=1.5, perceptual_weight=0.7)
    np.testing.assert_allclose(float(nll_vq), rec.mean(), rtol=1e-5)
    rec2 = 1.5 * (x - r) ** 2 + 0.7 * p[:, None, None, None]  # pixel_loss="l2"
    nll2, _ = reconstruction_nll(f32(x), f32(r), f32(lv), f32(p), kind="kl", pixel_weight=1.5, perceptual_weight=0.7,
                                 pixel_loss="l2")
    np.testing.assert_allclose(float(nll2), np.sum(rec2 / np.exp(lv) + lv) / 2, rtol=1e-5)
    with pytest.raises(ValueError, match="pixel_loss"):
        reconstruction_nll(f32(x), f32(r), f32(lv), None, kind="kl", pixel_loss="huber")


def test_discriminator_matches_torch_golden(goldens_dir):
    g = dict(np.load(goldens_dir / "first_stage_disc.npz"))
    from ldm_jax.interop.common import conv_to_flax

    params, stats = {}, {}
    for n in range(5):
        layer = {"kernel": conv_to_flax(g[f"conv_{n}/weight"])}
        if f"conv_{n}/bias" in g:
            layer["bias"] = g[f"conv_{n}/bias"]
        params[f"conv_{n}"] = layer
    for n in (1, 2, 3):
        params[f"norm_{n}"] = {"scale": g[f"norm_{n}/weight"], "bias": g[f"norm_{n}/bias"]}
        stats[f"norm_{n}"] = {"mean": np.zeros_like(g[f"norm_{n}/bias"]), "var": np.ones_like(g[f"norm_{n}/bias"])}
    disc = NLayerDiscriminator(ndf=8)
    out, upd = disc.apply({"params": params, "batch_stats": stats}, g["x"], train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(out), g["logits_train"], rtol=1e-4, atol=1e-5)
    # running stats after one step, torch momentum 0.1 (torch keeps the unbiased variance: compare the mean only)
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["norm_1"]["mean"]), g["norm_1/running_mean"], rtol=1e-4, atol=1e-6)
    out_eval = disc.apply({"params": params, "batch_stats": stats}, g["x"], train=False)
    np.testing.assert_allclose(np.asarray(out_eval), g["logits_eval"], rtol=1e-4, atol=1e-5)


def test_shapes_reconstruction_agreement():
    """<attribute>_kept: the shapes classifier reads the same attributes from an image and its reconstruction."""
    from ldm_jax.data import shapes
    from ldm_jax.training.autoencoder import _classified_alike

    spec = shapes.ShapesSpec()
    ex = list(shapes.generate(spec, 0, "train", 0, 4))
    x = np.stack([e["image"] for e in ex]).astype(np.float32) / 127.5 - 1
    blurred = x.copy()
    blurred[1] = blurred[1, :1, :1]  # the background only: the shape is lost
    blurred[2] = 0.98 * x[2]  # a slight change keeps everything
    kept = _classified_alike(x, blurred, spec)
    every = dict.fromkeys(shapes.ATTRIBUTES, True)
    lost = {**dict.fromkeys(shapes.ATTRIBUTES, False), "background": True}  # the background is all that is left
    assert kept == [every, lost, every, every]


def test_shapes_evaluation_reports_shape_kept_per_kind():
    """evaluate(): shape_kept/<size>_<shape> is the fraction of each kind of original whose shape survives."""
    import importlib.util
    import pathlib

    from ldm_jax.data import shapes
    from ldm_jax.training.autoencoder import build

    path = pathlib.Path(__file__).parents[1] / "configs" / "autoencoder_shapes.py"
    mod_spec = importlib.util.spec_from_file_location("autoencoder_shapes", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    obj = build(module.get_config("test"))
    spec = shapes.ShapesSpec()
    ex = list(shapes.generate(spec, 0, "train", 0, 40))
    to_x = lambda imgs: np.stack(imgs).astype(np.float32) / 127.5 - 1  # noqa: E731
    # a "reconstruction" that turns every small circle into a small square and keeps everything else
    recon = to_x([shapes.render({**e, "shape": "square"} if (e["size"], e["shape"]) == ("small", "circle") else e,
                                32) for e in ex])
    x = to_x([e["image"] for e in ex])
    obj._eval_fn = lambda params, images: (recon, np.full(len(ex), 30.0), np.ones(len(ex)))
    out = obj.evaluate(None, [{"image": x}])
    kinds = {f"{e['size']}_{e['shape']}" for e in ex}
    assert {k for k in out if k.startswith("shape_kept/")} == {f"shape_kept/{k}" for k in kinds}
    assert out["shape_kept/small_circle"] == 0.0
    assert all(v == 1.0 for k, v in out.items() if k.startswith("shape_kept/") and k != "shape_kept/small_circle")
    n_small_circles = sum((e["size"], e["shape"]) == ("small", "circle") for e in ex)
    assert 0 < n_small_circles < len(ex) and out["shape_kept"] == pytest.approx(1 - n_small_circles / len(ex))


def test_kl_autoencoder_can_train_on_the_posterior_mean():
    """loss.sample_posterior=False: the step decodes the posterior mean, whatever the key (LDM's default, True, decodes
    a sample: the posterior's std here is far from 0, so a sample would differ)."""
    import importlib.util
    import pathlib

    from ldm_jax.training.autoencoder import build

    path = pathlib.Path(__file__).parents[1] / "configs" / "autoencoder_shapes.py"
    spec = importlib.util.spec_from_file_location("autoencoder_shapes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("test")
    assert cfg.loss.sample_posterior  # the default
    with cfg.unlocked():
        cfg.loss.sample_posterior = False
    obj = build(cfg)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
    params = jax.jit(obj.init)(jax.random.key(1))["params"]["ae"]
    recon = jax.jit(lambda p, k: obj._reconstruct(p, x, k)[0])
    a, b = recon(params, jax.random.key(2)), recon(params, jax.random.key(3))
    np.testing.assert_array_equal(a, b)
    def mean_and_std(p):
        recon_of_mean, posterior = obj.model.apply({"params": p}, x, sample_posterior=False)
        return recon_of_mean, posterior.std

    mean, std = jax.jit(mean_and_std)(params)
    np.testing.assert_allclose(a, mean, atol=1e-6)
    assert float(jnp.min(std)) > 0.5
