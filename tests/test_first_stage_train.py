"""First-stage training through the one loop: the small KL preset on `shapes` (held-out PSNR must rise), and one
objective step with the discriminator active, checked against independently computed gradients."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import sharding as shd
from ldm_jax.training.loop import train
from ldm_jax.training.registry import make_objective
from ldm_jax.training.trainer import create_state

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"


def get_config(name: str, arg: str = ""):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def test_shapes_preset_psnr_rises(tmp_path):
    c = get_config("autoencoder_shapes", "test")
    with c.unlocked():
        c.data.data_dir = str(tmp_path / "tfds")
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    obj = make_objective(c)
    it = obj.make_dataset(mesh, split="test", batch_size=c.eval.batch_size)
    held_out = [next(it) for _ in range(c.eval.num_batches)]
    before = obj.evaluate(create_state(obj, mesh, c.seed).params["ae"], held_out)
    result = train(c, tmp_path / "wd", objective=obj, mesh=mesh)
    after = obj.evaluate(result.state.params["ae"], held_out)
    print(f"held-out PSNR {before['psnr']:.2f} -> {after['psnr']:.2f} dB, SSIM {before['ssim']:.3f} -> {after['ssim']:.3f}")
    assert len(result.losses) == c.num_steps and all(np.isfinite(result.losses))
    assert after["psnr"] > before["psnr"] + 5.0, (before, after)
    assert after["ssim"] > before["ssim"] + 0.3, (before, after)
    assert np.mean(result.losses[-20:]) < 0.6 * np.mean(result.losses[:20])


def test_gan_step_on_8_devices_matches_independent_gradients():
    """One step with the discriminator on (disc_start=0) on a (data 4 x fsdp 2) mesh: the adaptive weight, the loss,
    the combined AE gradient (read back through Adam's first step) and the discriminator loss, recomputed here."""
    from ldm_jax.models.discriminator import hinge_d_loss
    from ldm_jax.training.autoencoder import LAST_LAYER, reconstruction_nll
    from ldm_jax.training.trainer import jit_train_step, state_shardings

    c = get_config("autoencoder_shapes", "test")
    with c.unlocked():
        c.model.overrides = dict(ch=8, ch_mult=(1, 2), norm_groups=4, mid_attn=False)  # few ops: a short compile
        c.loss.update(disc_factor=1.0, disc_start=0, disc_ndf=8, kl_weight=1e-2)
    mesh = shd.make_mesh((4, 2, 1))
    obj = make_objective(c)
    state = create_state(obj, mesh, c.seed)
    _, sh = state_shardings(obj, mesh, c.seed)
    x = np.random.RandomState(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
    batch = {"image": jax.device_put(x, shd.batch_sharding(mesh, 4))}
    key = jax.random.key(3)
    before = jax.device_get(state)
    new, m = jit_train_step(obj, c, mesh, sh, batch)(state, batch, key)
    m = {k: float(v) for k, v in m.items()}
    new = jax.device_get(new)

    k_ae, k_d = jax.random.split(key)
    ae0, dp, stats = before.params["ae"], before.params["disc"], before.extra["disc_batch_stats"]
    disc = lambda r: obj.disc.apply({"params": dp, "batch_stats": stats}, r, train=True, mutable=["batch_stats"])[0]  # noqa: E731

    def parts(p):
        recon, post = obj.model.apply({"params": p}, x, key=k_ae)
        nll, _ = reconstruction_nll(x, recon, 0.0, None, kind="kl")
        return nll, jnp.sum(post.kl()) / x.shape[0], -jnp.mean(disc(recon))

    (nll, kl, g), (g_nll, g_kl, g_g) = jax.jit(lambda p: (parts(p), jax.jacrev(parts)(p)))(ae0)
    last = lambda t: np.asarray(t[LAST_LAYER[0]][LAST_LAYER[1]][LAST_LAYER[2]], np.float64)  # noqa: E731
    d_weight = min(np.linalg.norm(last(g_nll)) / (np.linalg.norm(last(g_g)) + 1e-4), 1e4) * c.loss.disc_weight
    np.testing.assert_allclose(m["d_weight"], d_weight, rtol=1e-4)
    np.testing.assert_allclose(m["loss"], float(nll) + 1e-2 * float(kl) + d_weight * float(g), rtol=1e-5)

    # Adam's first update is -lr * g / (|g| + eps): its sign is the sign of the combined gradient.
    total = jax.tree_util.tree_map(lambda a, b, cc: a + 1e-2 * b + d_weight * cc, g_nll, g_kl, g_g)
    no_gan = jax.tree_util.tree_map(lambda a, b: a + 1e-2 * b, g_nll, g_kl)
    flips = sum(int(np.sum((np.sign(t) != np.sign(n)) & (np.abs(t) > 1e-3)))
                for t, n in zip(jax.tree_util.tree_leaves(total), jax.tree_util.tree_leaves(no_gan)))
    assert flips > 10  # the GAN term changes the update, so the sign check below can tell it was applied
    for t, p0, p1 in zip(*(jax.tree_util.tree_leaves(t) for t in (total, ae0, new.params["ae"]))):
        big = np.abs(t) > 1e-3
        np.testing.assert_array_equal(np.sign(p0 - p1)[big], np.sign(t)[big])

    # The discriminator step sees x̂ from the UPDATED autoencoder (Lightning's second optimizer pass).
    @jax.jit
    def d_loss(ae1):
        recon2, _ = obj.model.apply({"params": ae1}, x, key=k_d)
        real, s1 = obj.disc.apply({"params": dp, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        fake, _ = obj.disc.apply({"params": dp, "batch_stats": s1["batch_stats"]}, recon2, train=True, mutable=["batch_stats"])
        return hinge_d_loss(real, fake)

    np.testing.assert_allclose(m["d_loss"], float(d_loss(new.params["ae"])), rtol=1e-4)
    assert not np.allclose(new.params["disc"]["conv_0"]["kernel"], dp["conv_0"]["kernel"])


def test_permute_channels_draws_each_rgb_order_per_image_and_keeps_the_pixels():
    from ldm_jax.training.autoencoder import permute_channels

    n = 1200
    x = jnp.broadcast_to(jnp.asarray([0.1, 0.5, 0.9]), (n, 2, 3, 3)) + jnp.arange(n)[:, None, None, None] * 1e-3
    y = np.asarray(permute_channels(x, jax.random.key(0)))
    orders = np.argsort(np.argsort(y[:, 0, 0], axis=-1), axis=-1)  # the rank of each output channel's value
    assert np.all(np.sort(y, axis=-1) == np.sort(np.asarray(x), axis=-1))  # only the channel order changes
    assert np.all(y == y[:, :1, :1])  # one order per image, the same at every pixel
    counts = np.unique(orders, axis=0, return_counts=True)[1]
    assert len(counts) == 6 and np.all(np.abs(counts / n - 1 / 6) < 0.04), counts
    assert not np.array_equal(y, np.asarray(permute_channels(x, jax.random.key(1))))
    with pytest.raises(ValueError, match="3-channel"):
        permute_channels(jnp.zeros((1, 2, 2, 4)), jax.random.key(0))
