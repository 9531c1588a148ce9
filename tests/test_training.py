"""Training machinery: schedules, EMA, losses, accumulation, and sharded steps equal to the one-device step."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldm_jax import sharding as shd
from ldm_jax.diffusion import losses
from ldm_jax.training import ldm, loop, optim
from ldm_jax.training import state as st
from ldm_jax.training import trainer as tr
from ldm_jax.training.objective import ConfigError
from training_utils import batches, host, max_diff, shared_objective, tiny_config


# ------------------------------------------------------------------------------------- schedules
def _ldm_linear(n, warm, f_start, f_max, f_min, length):  # LambdaLinearScheduler, one cycle (ldm/lr_scheduler.py)
    if n < warm:
        return (f_max - f_start) / warm * n + f_start
    return f_min + (f_max - f_min) * (length - n) / length


def _ldm_cosine(n, warm, lr_min, lr_max, lr_start, max_decay):  # LambdaWarmUpCosineScheduler
    if n < warm:
        return (lr_max - lr_start) / warm * n + lr_start
    t = min((n - warm) / (max_decay - warm), 1.0)
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(t * math.pi))


@pytest.mark.parametrize("scale", [False, True])
def test_schedules_match_ldm_lambdas(scale):
    cfg = optim.default_optim_config()
    cfg.lr, cfg.scale_lr, cfg.grad_accum = 1e-4, scale, 2
    base = 1e-4 * (2 * 16 if scale else 1)
    cfg.schedule, cfg.warmup_steps, cfg.f_start, cfg.f_max, cfg.f_min, cfg.cycle_length = "sd_linear", 10, 1e-6, 1.0, 0.5, 50
    lin = optim.make_schedule(cfg, 16)
    cfg.schedule, cfg.decay_steps, cfg.f_start, cfg.f_max, cfg.f_min = "ldm_cosine", 40, 0.1, 1.0, 0.01
    cos = optim.make_schedule(cfg, 16)
    for n in [0, 1, 5, 9, 10, 11, 25, 39, 40, 41, 49]:
        np.testing.assert_allclose(float(lin(n)), base * _ldm_linear(n, 10, 1e-6, 1.0, 0.5, 50), rtol=1e-5, atol=1e-6 * base)
        np.testing.assert_allclose(float(cos(n)), base * _ldm_cosine(n, 10, 0.01, 1.0, 0.1, 40), rtol=1e-5, atol=1e-6 * base)


def test_optimizer_is_adamw_with_clipping():
    cfg = optim.default_optim_config()
    cfg.clip_norm, cfg.weight_decay, cfg.lr = 0.5, 0.1, 1e-2
    tx, _ = optim.make_optimizer(cfg, 1)
    p = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([3.0, 4.0])}  # norm 5 -> clipped to 0.5
    upd, _ = tx.update(g, tx.init(p), p)
    gc = np.array([3.0, 4.0]) * 0.1
    m, v = 0.1 * gc, 0.001 * gc**2  # first Adam step, bias-corrected
    expect = -1e-2 * ((m / 0.1) / (np.sqrt(v / 0.001) + 1e-8) + 0.1 * np.array([1.0, -2.0]))
    np.testing.assert_allclose(np.asarray(upd["w"]), expect, rtol=1e-5)


# ------------------------------------------------------------------------------------------ EMA
def test_ema_follows_litema():
    ema, p = np.float64(0.0), 0.0
    e = {"w": jnp.zeros((2,))}
    for n in range(1, 6):
        p = float(n)
        decay = min(0.9999, (1 + n) / (10 + n))  # LitEma: num_updates incremented before use
        ema = ema - (1 - decay) * (ema - p)
        e = st.update_ema(e, {"w": jnp.full((2,), p)}, st.ema_decay(jnp.asarray(n), 0.9999))
    np.testing.assert_allclose(np.asarray(e["w"]), ema, rtol=1e-6)
    np.testing.assert_allclose(float(st.ema_decay(5, 0.9, warmup=False)), 0.9)


# ---------------------------------------------------------------------------------------- losses
def test_losses_match_float64_formulas():
    rng = np.random.default_rng(0)
    ab = np.cumprod(1 - np.linspace(1e-4, 2e-2, 100))
    x0, eps = rng.normal(size=(4, 3, 3, 2)), rng.normal(size=(4, 3, 3, 2))
    out = rng.normal(size=(4, 3, 3, 2))
    t = np.array([0, 10, 50, 99])
    logvar = rng.normal(size=(100,)) * 0.1
    a = ab[t][:, None, None, None]
    np.testing.assert_allclose(np.asarray(losses.q_sample(x0, eps, jnp.asarray(t), jnp.asarray(ab))),
                               np.sqrt(a) * x0 + np.sqrt(1 - a) * eps, rtol=1e-5, atol=1e-6)
    v = np.sqrt(a) * eps - np.sqrt(1 - a) * x0
    np.testing.assert_allclose(np.asarray(losses.prediction_target("v", x0, eps, jnp.asarray(t), jnp.asarray(ab))),
                               v, rtol=1e-5, atol=1e-6)
    snr = ab[t] / (1 - ab[t])
    for pred, w in [("eps", np.minimum(snr, 5) / snr), ("v", np.minimum(snr, 5) / (snr + 1)), ("x0", np.minimum(snr, 5))]:
        got = losses.min_snr_weight(jnp.asarray(losses.snr_table(ab), jnp.float32)[t], 5.0, pred)
        np.testing.assert_allclose(np.asarray(got), w, rtol=1e-5)
    for kind, err in [("l2", (out - v) ** 2), ("l1", np.abs(out - v))]:
        per = err.mean(axis=(1, 2, 3))
        w = np.minimum(snr, 5) / (snr + 1)
        expect = np.mean(w * per / np.exp(logvar[t]) + logvar[t])
        got, _ = losses.diffusion_loss(jnp.asarray(out), jnp.asarray(v), jnp.asarray(t), loss_type=kind,
                                       logvar=jnp.asarray(logvar), weights=jnp.asarray(w))
        np.testing.assert_allclose(float(got), expect, rtol=1e-5)


def test_logit_normal_timesteps_follow_their_distribution():
    """t = floor(T sigmoid(m + s n)): the empirical CDF matches the logit-normal's at several t; uniform stays
    uniform; bad names and scales are refused (before tracing, in the objective: ConfigError)."""
    from scipy.stats import norm

    n, T = 200_000, 1000
    t = np.asarray(losses.sample_timesteps(jax.random.key(0), n, T, "logit_normal", 1.0, 0.8))
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= T - 1
    for q in (100, 500, 850, 990):
        want = norm.cdf((math.log(q / (T - q)) - 1.0) / 0.8)  # P(t < q) = P(sigmoid(.) < q / T)
        assert abs(np.mean(t < q) - want) < 0.005, (q, np.mean(t < q), want)
    u = np.asarray(losses.sample_timesteps(jax.random.key(1), n, T))
    assert abs(np.mean(u < 850) - 0.85) < 0.005 and u.max() == T - 1
    with pytest.raises(ValueError, match="unknown"):
        losses.sample_timesteps(jax.random.key(0), 4, T, "cosine")
    with pytest.raises(ValueError, match="scale"):
        losses.sample_timesteps(jax.random.key(0), 4, T, "logit_normal", 0.0, 0.0)
    cfg = tiny_config()
    with cfg.unlocked():
        cfg.diffusion.timestep_sampling = "lognormal"
    with pytest.raises(ConfigError, match="timestep_sampling"):
        ldm.LDMObjective(cfg)


def test_accumulate_averages_micro_batches():
    x = jnp.arange(24.0).reshape(8, 3)

    def loss_fn(p, b, key):
        return jnp.mean((b["x"] @ p) ** 2), {"m": jnp.mean(b["x"])}

    p = jnp.array([0.1, -0.2, 0.3])
    l1, a1, g1 = optim.accumulate(loss_fn, p, {"x": x}, jax.random.key(0), 1)
    l4, a4, g4 = optim.accumulate(loss_fn, p, {"x": x}, jax.random.key(0), 4)
    np.testing.assert_allclose(float(l4), float(l1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g4), np.asarray(g1), rtol=1e-6)
    np.testing.assert_allclose(float(a4["m"]), float(a1["m"]), rtol=1e-6)


def test_noise_draw_has_no_collectives():
    """A batch-sharded draw is generated shard by shard (partitionable threefry): no cross-device traffic."""
    mesh = shd.make_mesh((4, 2, 1))
    f = jax.jit(lambda k: losses.sample_noise(k, (8, 4, 4, 4), 0.1), out_shardings=shd.batch_sharding(mesh, 4))
    hlo = f.lower(jax.random.key(0)).compile().as_text()
    for op in ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter"):
        assert op not in hlo, op
    single = jax.jit(lambda k: losses.sample_noise(k, (8, 4, 4, 4), 0.1))(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(f(jax.random.key(0))), np.asarray(single))


# ------------------------------------------------------------------------- sharded == single device
@pytest.fixture(scope="module")
def tiny():
    config = tiny_config("test")
    objective = shared_objective("test")
    mesh1 = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    state = tr.create_state(objective, mesh1, config.seed)
    data = batches(config, mesh1)
    state = jax.jit(objective.prepare)(state, next(data))
    return config, objective, host(state)


def _run(config, objective, init_host, mesh, steps=2):
    abstract, sh = tr.state_shardings(objective, mesh, config.seed)
    state = shd.put_like(init_host, abstract_with(abstract, sh))
    data = batches(config, mesh)
    step = tr.jit_train_step(objective, config, mesh, sh, data.host_batch(0))
    out = []
    for i in range(steps):
        state, metrics = step(state, next(data), tr.step_key(state.rng, i))
        out.append(float(metrics["loss"]))
    return out, host(state)


def abstract_with(abstract, shardings):
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def test_sharded_steps_equal_single_device(tiny, monkeypatch):
    """grad_accum 2: on the multi-device meshes the step accumulates in optim.accumulate_shard_map (counted at
    trace time; its one-reduction-per-step HLO is checked in tests/test_accumulate_shard_map.py)."""
    config, objective, init = tiny
    traced = []
    real = optim.accumulate_shard_map
    monkeypatch.setattr(optim, "accumulate_shard_map", lambda *a, **k: traced.append(a[-1].shape) or real(*a, **k))
    ref_losses, ref = _run(config, objective, init, shd.make_mesh((1, 1, 1), jax.devices()[:1]))
    assert np.isfinite(ref_losses).all() and int(ref.step) == 2
    assert max_diff(ref.params, init.params) > 0  # it trained
    assert float(init.extra["scale_factor"]) != config.first_stage.scale_factor  # scale_by_std ran
    for shape in [(4, 2, 1), (2, 1, 4)]:
        got_losses, got = _run(config, objective, init, shd.make_mesh(shape))
        np.testing.assert_allclose(got_losses, ref_losses, rtol=1e-5, atol=1e-6, err_msg=str(shape))
        assert max_diff(got.params, ref.params) < 1e-5, shape
        assert max_diff(got.ema, ref.ema) < 1e-5, shape
        assert max_diff(got.opt_state, ref.opt_state) < 1e-5, shape
    # Traced through shard_map on the multi-device meshes, never on one device. A mesh whose step another test in the
    # same process traced already (test_checkpoint uses data 4 x fsdp 2) hits jit's cache and is not re-traced here.
    assert traced and all(dict(m)["data"] in (4, 2) for m in traced), traced


def test_state_is_born_sharded(tiny):
    config, objective, _ = tiny
    mesh = shd.make_mesh((2, 1, 4))
    _, sh = tr.state_shardings(objective, mesh, config.seed)
    specs = [s.spec for s in jax.tree_util.tree_leaves(sh.params)]
    assert any("tensor" in str(s) for s in specs)  # wide kernels are split over the tensor axis
    opt_specs = {str(s.spec) for s in jax.tree_util.tree_leaves(sh.opt_state)}
    assert any("tensor" in s for s in opt_specs)  # Adam moments follow their parameters


# ------------------------------------------------------------------------------- config errors
def test_bad_configs_fail_before_compiling(tmp_path):
    config = tiny_config("test")
    with pytest.raises(ValueError, match="does not divide the 8 devices"):
        shd.mesh_from_config((3, 1, 1))
    with pytest.raises(ConfigError, match="global_batch_size=6 is not divisible"):
        with config.unlocked():
            config.global_batch_size = 6
        loop.check_config(config, shd.make_mesh((4, 2, 1)))
    with pytest.raises(ConfigError, match="optim.grad_accum"):
        with config.unlocked():
            config.global_batch_size = 8  # divisible by data*fsdp=8 but not by grad_accum(2)*8
        loop.check_config(config, shd.make_mesh((4, 2, 1)))
    config = tiny_config("test", **{"first_stage.checkpoint": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="autoencoder_kl_f8.py"):
        ldm.build(config).validate(None)
    with pytest.raises(AttributeError):
        tiny_config("test").unet.no_such_key = 1  # locked configs reject unknown keys
    from training_utils import load_config

    with pytest.raises(ConfigError, match=r"(?s)first_stage.checkpoint.*data.path.*configs/shapes.py.*text_checkpoint"):
        ldm.build(load_config("ldm_f8")).validate(None)
