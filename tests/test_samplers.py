"""Sampler behaviour beyond golden parity: input errors, tracing/compilation, sharding, the
Brownian tree, and exactness on a 2-D Gaussian mixture."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax import sampling
from ldm_jax.diffusion.brownian import BrownianTree, BrownianTreeNoiseSampler
from samplers_common import load, mixture_denoiser

G = load("samplers_kdiffusion.npz")
DEN = mixture_denoiser(G["means"], G["stds"], G["weights"])
SIGMAS = np.asarray(G["euler/sigmas"], np.float32)
X = jnp.asarray(G["x_init"] * SIGMAS[0], jnp.float32)


# ---- bad input: clear errors before anything compiles ------------------------------------------
def test_unknown_sampler_lists_names():
    with pytest.raises(ValueError, match="unknown sampler 'eulr'.*dpmpp_2m.*euler_ancestral"):
        sampling.get_sampler("eulr")


# CFG++ samplers take a denoiser that also gives the unguided prediction
CFG_DEN = sampling.CFGDenoiser(lambda x, s, c: DEN(x, s), {"c": jnp.ones(8)}, {"c": jnp.zeros(8)}, scale=2.0)


@pytest.mark.parametrize("name", sorted(sampling.SAMPLERS))
def test_bad_sigmas_rejected(name):
    fn, key = sampling.SAMPLERS[name], jax.random.key(0)
    DEN = CFG_DEN if sampling.SAMPLER_INFO[name].needs_uncond else globals()["DEN"]
    # SA-Solver's default noise interval comes from a discrete model's levels; the mixture has none
    opts = {"tau_interval": (10.0, 0.1)} if name.startswith("sa_solver") else {}
    with pytest.raises(ValueError, match="at least 2 entries"):
        fn(DEN, X, SIGMAS[:1], key=key, **opts)
    with pytest.raises(ValueError, match="decreasing"):
        fn(DEN, X, SIGMAS[::-1].copy(), key=key, **opts)
    with pytest.raises(ValueError, match="non-negative"):
        fn(DEN, X, np.asarray([2.0, 1.0, -0.5]), key=key, **opts)


def test_shape_and_noise_errors():
    with pytest.raises(ValueError, match="denoiser returned shape"):
        sampling.sample_euler(lambda x, s: x[:, :2], X, SIGMAS)
    with pytest.raises(ValueError, match="noise_sampler returned shape"):
        sampling.sample_euler_ancestral(DEN, X, SIGMAS, noise_sampler=lambda i, s, sn: jnp.zeros((3,)))
    with pytest.raises(ValueError, match="pass key="):
        sampling.sample_dpmpp_sde(DEN, X, SIGMAS)
    with pytest.raises(ValueError, match="only the last sigma may be 0"):
        sampling.sample_heun(DEN, X, np.asarray([2.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="solver_type"):
        sampling.sample_dpmpp_2m_sde(DEN, X, SIGMAS, key=jax.random.key(0), solver_type="rk4")


# ---- tracing: one program whatever the schedule and step count --------------------------------
def test_new_schedule_same_length_does_not_recompile():
    run = jax.jit(lambda x, s, k: sampling.sample_dpmpp_2m_sde(DEN, x, s, key=k))
    a = run(X, SIGMAS, jax.random.key(1))
    other = np.asarray(sampling.get_sigmas_exponential(10, 0.05, 12.0))
    b = run(X, other, jax.random.key(1))
    assert run._cache_size() == 1
    assert not np.allclose(a, b)


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m", "lms", "dpm_fast", "plms"])
def test_program_size_independent_of_steps(name):
    fn = sampling.SAMPLERS[name]
    sizes = []
    for n in (10, 100):
        sig = sampling.get_sigmas_karras(n, 0.03, 15.0)
        sizes.append(len(jax.jit(lambda x, s: fn(DEN, x, s)).lower(X, sig).as_text()))
    assert abs(sizes[0] - sizes[1]) < 200, sizes  # only the constants' shapes differ


# ---- sharded batch == single device -------------------------------------------------------------
@pytest.mark.parametrize("name", ["euler_ancestral", "dpm_adaptive"])
def test_batch_sharding_matches_single_device(name):
    assert len(jax.devices()) == 8
    mesh = Mesh(np.asarray(jax.devices()).reshape(8), ("data",))
    fn = sampling.SAMPLERS[name]
    opts = {"eta": 0.5} if name == "dpm_adaptive" else {}
    run = jax.jit(lambda x, s, k: fn(DEN, x, s, key=k, **opts))
    key = jax.random.key(3)
    single = run(X, SIGMAS, key)
    x_sharded = jax.device_put(X, NamedSharding(mesh, P("data")))
    sharded = run(x_sharded, SIGMAS, key)
    assert sharded.sharding.spec[0] == "data" or len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)


# ---- noise sources ----------------------------------------------------------------------------
def test_key_noise_is_deterministic():
    run = jax.jit(lambda k: sampling.sample_euler_ancestral(DEN, X, SIGMAS, key=k))
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2


def test_brownian_tree_statistics_and_consistency():
    tree = BrownianTree(jax.random.key(0), (20000,), jnp.float32, 0.03, 15.0)
    ns = BrownianTreeNoiseSampler(jnp.zeros((20000,)), 0.03, 15.0, jax.random.key(0))
    ts = jnp.asarray([0.03, 0.5, 1.0, 3.0, 15.0])
    w, inc_05_3, noise_3_1 = jax.jit(lambda: (jax.vmap(tree.w)(ts), tree(0.5, 3.0), ns(0, 3.0, 1.0)))()
    inc = np.diff(np.asarray(w), axis=0) / np.sqrt(np.diff(np.asarray(ts)))[:, None]
    assert np.abs(inc.mean(1)).max() < 0.04 and np.abs(inc.var(1) - 1).max() < 0.05
    assert np.abs(np.corrcoef(inc) - np.eye(4)).max() < 0.04  # disjoint increments independent
    np.testing.assert_array_equal(w[0], 0)
    # the same query gives the same value; an increment is the sum of its parts
    np.testing.assert_allclose(inc_05_3, w[3] - w[1], atol=1e-5)
    np.testing.assert_allclose(noise_3_1, (w[2] - w[3]) / np.sqrt(2.0), atol=1e-5)
    # hence a coarse step's noise is the exact combination of the fine steps' noise, which keeps
    # SDE samples close when the step count changes (k-diffusion's reason to default to it)


def test_ddim_eta1_equals_ddpm():
    """DDIM with η = 1 is DDPM's ancestral posterior (Song et al. 2021, §4.1)."""
    sig = sampling.get_sigmas_ddim_uniform(10, np.asarray(sampling.DiscreteDenoiser(
        lambda x, t: x, np.linspace(0.999, 0.005, 1000)).sigmas, np.float32))
    ns = sampling.key_noise_sampler(jax.random.key(2), X)
    a = jax.jit(lambda x: sampling.sample_ddim(DEN, x, sig, noise_sampler=ns, eta=1.0))(X)
    b = jax.jit(lambda x: sampling.sample_ddpm(DEN, x, sig, noise_sampler=ns))(X)
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)


# ---- exactness: a 2-D Gaussian mixture is reproduced ---------------------------------------------
MU2 = np.asarray([[-2.0, 0.0], [2.0, 1.0], [0.0, -3.0]])
W2 = np.asarray([0.2, 0.3, 0.5])
S2 = np.asarray([0.3, 0.4, 0.5])


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m"])
def test_gaussian_mixture_exactness(name):
    den = mixture_denoiser(MU2, S2, W2)
    sig = sampling.get_sigmas_karras(50, 0.002, 80.0)
    x = jax.random.normal(jax.random.key(7), (4096, 2)) * 80.0
    out = np.asarray(jax.jit(lambda x: sampling.SAMPLERS[name](den, x, sig))(x))
    label = np.argmin(((out[:, None] - MU2[None]) ** 2).sum(-1), axis=1)
    weights = np.bincount(label, minlength=3) / len(out)
    np.testing.assert_allclose(weights, W2, atol=0.03)  # binomial std ≈ 0.008
    for k in range(3):
        np.testing.assert_allclose(out[label == k].mean(0), MU2[k], atol=0.06)  # std ≈ s_k/sqrt(n_k) < 0.02
        np.testing.assert_allclose(out[label == k].std(0), S2[k], rtol=0.1)


def test_per_sample_keys_independent_of_batch():
    """With one key per sample (iid draws, or one Brownian tree each), a sample does not depend on
    which batch it is drawn in."""
    keys = jax.random.split(jax.random.key(9), 8)
    run = jax.jit(lambda x, k: sampling.sample_euler_ancestral(DEN, x, SIGMAS, key=k))
    full, part = run(X, keys), run(X[2:4], keys[2:4])
    np.testing.assert_allclose(full[2:4], part, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(full[0]) - np.asarray(run(X, jax.random.split(jax.random.key(8), 8))[0])).max() > 1e-2
    tree = jax.jit(lambda x, k: BrownianTreeNoiseSampler(x, 0.03, 15.0, k)(0, 3.0, 1.0))
    np.testing.assert_array_equal(tree(X, keys)[2:4], tree(X[2:4], keys[2:4]))
