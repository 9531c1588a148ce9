"""Every first-stage config builds its objective; bad settings fail early naming the fix; PSNR/SSIM match TensorFlow."""
import importlib.util
import logging
import pathlib

import numpy as np
import pytest

from ldm_jax import metrics
from ldm_jax.training.autoencoder import build, model_kwargs, recon_grid
from ldm_jax.training.objective import ConfigError

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"


def get_config(name: str, arg: str = ""):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


@pytest.mark.parametrize(
    "name,arg,kind,ch,lr",
    [
        ("autoencoder_kl_f8", "", "kl", 128, 4.5e-6 * 24),
        ("autoencoder_kl_f8", "small", "kl", 32, 4.5e-6 * 8),
        ("autoencoder_kl_f4", "", "kl", 128, 4.5e-6 * 24),
        ("autoencoder_vq_f4", "", "vq", 128, 4.5e-6 * 12),
        ("autoencoder_shapes", "", "kl", 32, 1e-3),
        ("autoencoder_shapes", "test", "kl", 16, 1e-3),
    ],
)
def test_configs_build(name, arg, kind, ch, lr):
    c = get_config(name, arg)
    obj = build(c)
    assert obj.kind == kind and model_kwargs(c)["ch"] == ch
    assert (c.optim.name, c.optim.b1, c.optim.b2) == ("adam", 0.5, 0.9)
    np.testing.assert_allclose(float(obj.schedules()["ae"](0)), lr, rtol=1e-6)
    assert set(obj.optimizers()) == ({"ae", "disc"} if c.loss.disc_factor > 0 else {"ae"})


def test_validate_names_the_fix(tmp_path, caplog):
    c = get_config("autoencoder_kl_f8")
    with pytest.raises(ConfigError, match="lpips_weights"):
        build(c).validate(None)
    with c.unlocked():
        c.loss.lpips_weights = str(tmp_path / "nope.safetensors")
    with pytest.raises(ConfigError, match="no file at"):
        build(c).validate(None)
    with c.unlocked():
        c.optim.grad_accum = 2
    with pytest.raises(ConfigError, match="grad_accum=1"):
        build(c).validate(None)
    with caplog.at_level(logging.WARNING):
        build(get_config("autoencoder_shapes")).validate(None)
    assert "WITHOUT the LPIPS" in caplog.text


def test_psnr_ssim_match_tensorflow():
    tf = pytest.importorskip("tensorflow")
    rs = np.random.RandomState(0)
    a = rs.uniform(0, 1, (3, 24, 20, 3)).astype(np.float32)
    b = np.clip(a + 0.1 * rs.standard_normal(a.shape), 0, 1).astype(np.float32)
    b[1] = a[1] * 0.5 + 0.25  # a structured change as well as noise
    np.testing.assert_allclose(np.asarray(metrics.psnr(a, b)), tf.image.psnr(a, b, 1.0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics.ssim(a, b)), tf.image.ssim(a, b, 1.0).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics.ssim(a, a)), 1.0, atol=1e-5)


def test_recon_grid_layout():
    x = np.full((2, 4, 4, 3), -1.0, np.float32)
    r = np.full((2, 4, 4, 3), 1.0, np.float32)
    g = recon_grid(x, r)
    assert g.shape == (8, 8, 3) and g.dtype == np.uint8
    assert (g[:, :4] == 0).all() and (g[:, 4:] == 255).all()
