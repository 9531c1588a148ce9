"""LPIPS (VGG) against the `lpips` package through stored goldens; the weight converter's layouts and round trip."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from ldm_jax.interop.common import CheckpointError
from ldm_jax.interop.lpips import from_torch, load_lpips_params, save_lpips_safetensors, to_torch
from ldm_jax.models.lpips import LPIPS, vgg16_conv_indices


@pytest.fixture(scope="module")
def golden(goldens_dir):
    spec = importlib.util.spec_from_file_location("make_lpips_goldens", goldens_dir / "make_lpips_goldens.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    g = dict(np.load(goldens_dir / "lpips_vgg.npz"))
    heads = {k.replace("/", "."): g[k] for k in g if k.startswith("lin")}
    return maker, g, {**maker.vgg16_random_state_dict(), **heads}


@pytest.fixture(scope="module")
def params(golden):
    return from_torch(golden[2])


def test_matches_lpips_package(golden, params):
    _, g, _ = golden
    dist, per_layer = jax.jit(lambda p, a, b: LPIPS().apply({"params": p}, a, b, per_layer=True))(params, g["x0"], g["x1"])
    np.testing.assert_allclose(np.asarray(per_layer), g["per_layer"], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(dist), g["dist"], rtol=2e-5, atol=1e-7)
    assert np.all(np.asarray(dist) > 1e-3)  # the golden pair is far enough apart for the check to mean something


def test_identity_is_zero_and_init_shapes_match(golden, params):
    _, g, _ = golden
    x = jnp.asarray(g["x0"][:1, :16, :16])
    np.testing.assert_allclose(np.asarray(jax.jit(LPIPS().apply)({"params": params}, x, x)), 0.0, atol=1e-7)
    abstract = meta.unbox(jax.eval_shape(LPIPS().init, jax.random.key(0), x, x)["params"])
    shape = lambda t: jax.tree_util.tree_map(lambda a: tuple(a.shape), t)  # noqa: E731
    assert shape(abstract) == shape(params)


def test_converter_layouts_and_round_trip(golden, params, tmp_path):
    _, _, sd = golden
    # the lpips package's / taming's whole-model layout: net.sliceS.N.*, with the scaling buffers
    slices = {3: 1, 8: 2, 15: 3, 22: 4, 29: 5}
    whole = {}
    for k, v in sd.items():
        if k.startswith("features."):
            idx = int(k.split(".")[1])
            s = min(s for end, s in slices.items() if idx <= end)
            whole[f"net.slice{s}.{idx}.{k.split('.')[2]}"] = v
        else:
            whole[k] = v
    whole["scaling_layer.shift"] = np.array([-0.030, -0.088, -0.188], np.float32).reshape(1, 3, 1, 1)
    whole["scaling_layer.scale"] = np.array([0.458, 0.448, 0.450], np.float32).reshape(1, 3, 1, 1)
    p2 = from_torch(whole)
    jax.tree_util.tree_map(np.testing.assert_array_equal, p2, params)
    # our safetensors file: save -> load reproduces the params exactly
    path = tmp_path / "lpips.safetensors"
    save_lpips_safetensors(params, path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, load_lpips_params(path), params)
    assert set(to_torch(params)) == set(sd)
    assert len(vgg16_conv_indices()) == 13


def test_converter_errors_name_the_problem(golden):
    _, _, sd = golden
    trunk_only = {k: v for k, v in sd.items() if k.startswith("features.")}
    with pytest.raises(CheckpointError, match="linear heads"):
        from_torch(trunk_only)
    with pytest.raises(CheckpointError, match="VGG16 trunk"):
        from_torch({k: v for k, v in sd.items() if k.startswith("lin")})
    bad = dict(sd)
    bad["features.0.weight"] = bad["features.0.weight"][:, :, :2]
    with pytest.raises(CheckpointError, match="features.0.weight"):
        from_torch(bad)
    with pytest.raises(CheckpointError, match="unexpected"):
        from_torch({**sd, "foo.weight": np.zeros(1)})
