"""FID / KID: our FID InceptionV3, resizes, Fréchet distance, KID and stats files vs pytorch-fid, torch-fidelity
and clean-fid (goldens from tests/goldens/make_fid_goldens.py; random Inception weights rebuilt from a seed)."""
import pathlib

import numpy as np
import pytest

from ldm_jax.evaluation import fid
from ldm_jax.evaluation.features import InceptionFeatures, resize_clean, resize_pytorch_fid
from ldm_jax.interop import inception as interop
from ldm_jax.interop.common import CheckpointError, save_safetensors

GOLDENS = pathlib.Path(__file__).parent / "goldens"


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDENS / "fid_inception.npz"))


@pytest.fixture(scope="module")
def random_torch_state(golden):
    return interop.random_state_dict(int(golden["seed"]))


def test_inception_features_match_pytorch_fid(golden, random_torch_state):
    feats = InceptionFeatures(interop.from_torch(random_torch_state), batch_size=2)
    ours, ref = feats(golden["images_up"]), golden["features_up"]  # 64x48 -> bilinear 299 -> the network
    assert ours.shape == ref.shape == (2, 2048) and ours.dtype == np.float32
    assert np.abs(ref).max() > 0.5 and np.abs(ref[0] - ref[1]).max() > 0.1  # signal passes all 94 convolutions
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, rel


def test_bilinear_downsampling_matches_torch_interpolate(golden):
    # 311x305 -> 299: torch's bilinear does not antialias; jax.image.resize must not either
    x = golden["images_down"].astype(np.float32) / 255.0
    ours = np.asarray(resize_pytorch_fid(x))[:, ::7, ::7]
    np.testing.assert_allclose(ours, golden["resized_down_every7"], atol=2e-6)


def test_inception_converter_keys_round_trip_and_errors(random_torch_state, tmp_path):
    params = interop.from_torch({**random_torch_state, "fc.weight": np.zeros((1008, 2048), np.float32),
                                 "Conv2d_1a_3x3.bn.num_batches_tracked": np.zeros((), np.int64)})
    back = interop.to_torch(params)
    assert set(back) == set(random_torch_state) and len(back) == 470
    for k, v in random_torch_state.items():
        np.testing.assert_array_equal(back[k], v)
    broken = dict(random_torch_state)
    del broken["Mixed_6b.branch7x7_2.conv.weight"]
    broken["Mixed_6b.branch7x7_2.conv.wieght"] = np.zeros(1)
    with pytest.raises(CheckpointError, match=r"Mixed_6b\.branch7x7_2\.conv\.weight.*wieght"):
        interop.from_torch(broken)
    src = tmp_path / "pt_inception.safetensors"
    save_safetensors(random_torch_state, src)
    interop.main([str(tmp_path / "ours.safetensors"), str(src)])
    again = interop.load_inception_params(tmp_path / "ours.safetensors")
    np.testing.assert_array_equal(again["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"],
                                  params["params"]["Mixed_7c"]["branch_pool"]["conv"]["kernel"])
    with pytest.raises(SystemExit, match="no checkpoint at"):
        interop.main([str(tmp_path / "x.safetensors"), str(tmp_path / "missing.pth")])


def test_clean_resize_matches_clean_fid(golden):
    np.testing.assert_array_equal(resize_clean(golden["images_up"][:1], 29)[0], golden["clean_up"])
    np.testing.assert_array_equal(resize_clean(golden["images_down"], 29)[0], golden["clean_down"])


def test_frechet_distance_matches_pytorch_fid(golden):
    s1, s2 = fid.feature_stats(golden["feats1"]), fid.feature_stats(golden["feats2"])
    assert fid.frechet_distance(s1, s2) == pytest.approx(float(golden["fid"]), rel=1e-6)
    assert fid.frechet_distance(s1, s2) == pytest.approx(fid.frechet_distance(s2, s1), rel=1e-9)
    assert abs(fid.frechet_distance(s1, s1)) < 1e-8


def test_trace_sqrt_product_on_rank_deficient_covariances():
    # 20 samples in 64-d: rank-19 covariances, where sqrtm(Σ1Σ2) is singular. Reference: the eigenvalues of
    # the (similar) product, which are real and >= 0, from a 100-digit-free route: eigvals of Σ1 Σ2 directly.
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((20, 64)), rng.standard_normal((20, 64)) * 2 + 1
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    assert fid.trace_sqrt_product(s1, s2) == pytest.approx(ref, rel=1e-6)
    assert np.isfinite(fid.frechet_distance(fid.feature_stats(a), fid.feature_stats(b)))


def test_kid_matches_torch_fidelity(golden):
    mean, std = fid.kernel_distance(golden["feats1"], golden["feats2"], num_subsets=10, subset_size=100, seed=2020)
    assert mean == pytest.approx(float(golden["kid_mean"]), rel=1e-6)
    assert std == pytest.approx(float(golden["kid_std"]), rel=1e-6)
    # the same distribution: KID's unbiased estimate is centred on 0
    same, _ = fid.kernel_distance(golden["feats1"][:200], golden["feats1"][200:], num_subsets=10, subset_size=100)
    assert abs(same) < 0.1 * mean
    with pytest.raises(ValueError, match="same d"):
        fid.kernel_distance(golden["feats1"], golden["feats2"][:, :10])


def test_stats_files_read_pytorch_fid_and_round_trip(golden, tmp_path):
    theirs = fid.load_stats(GOLDENS / "fid_stats_pytorch_fid.npz")
    ours = fid.feature_stats(golden["feats1"], keep_features=True)
    np.testing.assert_allclose(ours.mu, theirs.mu, rtol=1e-12)
    np.testing.assert_allclose(ours.sigma, theirs.sigma, rtol=1e-12)
    path = fid.save_stats(ours, tmp_path / "ref.npz")
    with np.load(path) as f:  # what pytorch-fid reads: f["mu"][:], f["sigma"][:]
        assert f["mu"].dtype == np.float64 and f["sigma"].shape == (64, 64)
    back = fid.load_stats(path)
    assert back.num_samples == 400 and back.features.shape == (400, 64)
    np.testing.assert_array_equal(back.sigma, ours.sigma)
    np.savez(tmp_path / "bad.npz", m=np.zeros(3))
    with pytest.raises(ValueError, match=r"bad\.npz has no \['mu', 'sigma'\]"):
        fid.load_stats(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="no statistics file"):
        fid.load_stats(tmp_path / "none.npz")
