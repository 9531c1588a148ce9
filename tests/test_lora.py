"""LoRA: the parameter transform (models/lora.py) and the file formats (interop/lora.py).

Parity: tests/goldens/lora_peft.* (tests/goldens/make_lora_goldens.py) is a LoRA made with peft on the
tiny random SD folder and diffusers' UNet / CLIP outputs with it; loading it here must reproduce them.
Where diffusers + peft are installed, a LoRA we write (both layouts) is loaded by diffusers'
`load_lora_weights` and must give our outputs.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.interop import lora as lora_io
from ldm_jax.interop import load_diffusers
from ldm_jax.interop.common import CheckpointError, load_safetensors, save_safetensors
from ldm_jax.models import lora
from ldm_jax.models.text import CLIPTextTransformer
from ldm_jax.models.unet import UNet

UNET_TOL = 1e-4  # the tolerance of the UNet goldens (tests/test_unet.py)


@pytest.fixture(scope="module")
def tiny(goldens_dir):
    return load_diffusers(goldens_dir / "tiny_sd")


@pytest.fixture(scope="module")
def golden(goldens_dir):
    return dict(np.load(goldens_dir / "lora_peft.npz"))


def _kwargs(p):
    return {"unet": p.unet_kwargs, "text": p.text_kwargs}


_JITTED: dict[str, object] = {}  # one compiled UNet / text encoder for the whole module


def _unet_out(p, params, g):
    fn = _JITTED.setdefault("unet", jax.jit(UNet(**p.unet_kwargs).apply))
    return np.asarray(fn({"params": params}, jnp.asarray(g["x"]), jnp.asarray(g["t"]), jnp.asarray(g["ctx"])))


def _text_out(p, params, ids):
    fn = _JITTED.setdefault("text", jax.jit(CLIPTextTransformer(**p.text_kwargs).apply))
    return np.asarray(fn({"params": params}, jnp.asarray(ids))[0])


def _random_adapters(p, key, rank=3, targets=None):
    targets = targets or {"unet": ("attn", "proj", "conv", "ff"), "text": ("attn", "mlp")}
    out = {}
    for i, (model, pats) in enumerate(targets.items()):
        mods = lora.select_targets(p.params[model], pats, model)

        @jax.jit
        def make(params, k):  # up is zero at init: give it values so the delta is visible
            ad = lora.init_adapters(k, params, mods, rank)
            return jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.fold_in(k, 99), a.shape), ad)

        out[model] = make(p.params[model], jax.random.fold_in(key, i))
    return out


_deltas = jax.jit(lora.lora_deltas, static_argnums=1)


# ------------------------------------------------------------------ the transform

def test_zero_up_is_identity_and_delta_is_low_rank(tiny):
    base = tiny.params["unet"]
    mods = lora.select_targets(base, ["attn"])
    assert len(mods) == 4 * 8 and all(m.split("/")[-1] in ("to_q", "to_k", "to_v", "to_out") for m in mods)
    ad = lora.init_adapters(jax.random.key(0), base, mods, rank=4)
    same = lora.apply(base, [(ad, 1.0)], alpha=4.0)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(base)))
    ad = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(1), a.shape), ad)
    m = mods[0]
    d = np.asarray(_deltas(ad, 8.0)[m])
    assert np.linalg.matrix_rank(d) == 4
    a = lora.modules_of(ad)[m]
    np.testing.assert_allclose(d, 2.0 * np.asarray(a["down"]) @ np.asarray(a["up"]), rtol=1e-6)


def test_several_loras_add_with_their_scales(tiny):
    base = tiny.params["unet"]
    a1 = _random_adapters(tiny, jax.random.key(1), targets={"unet": ("attn",)})["unet"]
    a2 = _random_adapters(tiny, jax.random.key(2), targets={"unet": ("attn", "conv")})["unet"]
    both = jax.jit(lambda p, a, b, s: lora.apply(p, [(a, s[0]), (b, s[1])], alpha=6.0))(base, a1, a2, jnp.array([0.5, -2.0]))
    d1, d2 = _deltas(a1, 6.0), _deltas(a2, 6.0)
    k = "down_0_attn_0/transformer_blocks_0/attn1/to_q"
    want = np.asarray(base["down_0_attn_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]) + 0.5 * d1[k] - 2.0 * d2[k]
    got = both["down_0_attn_0"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    conv = both["down_0_res_0"]["conv1"]["kernel"]  # only in a2
    np.testing.assert_allclose(conv, np.asarray(base["down_0_res_0"]["conv1"]["kernel"]) - 2.0 * d2["down_0_res_0/conv1"],
                               rtol=1e-6, atol=1e-6)
    untouched = both["down_0_res_0"]["time_emb_proj"]["kernel"]
    assert np.array_equal(untouched, base["down_0_res_0"]["time_emb_proj"]["kernel"])


def test_merge_equals_the_transform_and_unmerge_restores(tiny):
    base = tiny.params["unet"]
    ad = _random_adapters(tiny, jax.random.key(3))["unet"]
    merged = lora.merge(base, [(ad, 0.7)], alpha=3.0)
    used = jax.jit(lambda p, a, s: lora.apply(p, [(a, s)], alpha=3.0))(base, ad, 0.7)  # the pipeline's on-the-fly form
    assert all(np.array_equal(m, u) for m, u in zip(jax.tree.leaves(merged), jax.tree.leaves(used)))
    assert any(not np.array_equal(m, b) for m, b in zip(jax.tree.leaves(merged), jax.tree.leaves(base)))
    back = lora.unmerge(merged, [(ad, 0.7)], alpha=3.0)
    for b, u in zip(jax.tree.leaves(base), jax.tree.leaves(back)):
        np.testing.assert_allclose(u, b, rtol=0, atol=1e-6)


def _both_paths(module, base, loras, args, name, root, **kw):
    """(loss, adapter grads) of mean(out²) with the LoRAs on the weights (`apply`) and on the activations."""
    def on_weights(ls):
        out = module.apply({"params": lora.apply(base, ls, **kw)}, *args)
        return jnp.mean((out[0] if isinstance(out, tuple) else out) ** 2)

    def on_activations(ls):
        keys = {name: kw["key"]} if "key" in kw else None
        with lora.activations({root: name}, {name: ls}, alpha=kw.get("alpha"), dropout=kw.get("dropout", 0.0), keys=keys):
            out = module.apply({"params": base}, *args)
        return jnp.mean((out[0] if isinstance(out, tuple) else out) ** 2)

    return [jax.jit(jax.value_and_grad(f))(loras) for f in (on_weights, on_activations)]


def _assert_same(w, a, rtol):
    (lw, gw), (la, ga) = w, a
    np.testing.assert_allclose(la, lw, rtol=rtol)
    leaves_w, leaves_a = jax.tree.leaves(gw), jax.tree.leaves(ga)
    assert len(leaves_w) == len(leaves_a) and all(np.abs(g).max() > 0 for g in leaves_a)
    for x, y in zip(leaves_w, leaves_a):
        np.testing.assert_allclose(y, x, rtol=rtol, atol=rtol * np.abs(x).max())


def test_activation_path_equals_the_parameter_transform(tiny, golden):
    """The training form (W x + s·up(down(x)), no kernel gradient) against `apply` (W + s·down@up): loss and
    adapter gradients, two LoRAs with their scales, dropout (the same masks), every UNet target preset incl. LoCon
    convs, a bf16 base; and the text encoder with remat'd layers (flax lifts them: their modules see no root)."""
    x, t, ctx = (jnp.asarray(golden[k]) for k in ("x", "t", "ctx"))
    unet = UNet(**tiny.unet_kwargs)
    base16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), tiny.params["unet"])
    a1 = _random_adapters(tiny, jax.random.key(11), targets={"unet": ("attn", "proj", "conv", "ff")})["unet"]
    a2 = _random_adapters(tiny, jax.random.key(12), targets={"unet": ("attn",)})["unet"]
    loras = [(a1, jnp.float32(0.7)), (a2, jnp.float32(-1.3))]
    w, a = _both_paths(unet, base16, loras, (x, t, ctx), "unet", UNet, alpha=6.0, dropout=0.25, key=jax.random.key(5))
    _assert_same(w, a, 2e-5)
    keeps = [np.asarray(k) for ts in lora.terms(loras, 6.0, 0.25, jax.random.key(5)).values() for *_, k in ts]
    assert 0.15 < np.mean(np.concatenate(keeps) == 0) < 0.35  # dropout was on (both paths use these masks)

    text = CLIPTextTransformer(**tiny.text_kwargs, remat_policy="full")
    at = _random_adapters(tiny, jax.random.key(13), targets={"text": ("attn", "mlp")})["text"]
    w, a = _both_paths(text, tiny.params["text"], [(at, 1.0)], (jnp.asarray(golden["ids"]),), "text",
                       CLIPTextTransformer, alpha=2.0)
    _assert_same(w, a, 2e-5)


def test_activation_path_names_modules_the_model_never_calls(tiny, golden):
    ad = _random_adapters(tiny, jax.random.key(1), targets={"text": ("attn",)})["text"]
    ad = {**ad, "no_such_layer": {"q_proj": ad["layers_0"]["self_attn"]["q_proj"]}}
    text = CLIPTextTransformer(**tiny.text_kwargs)
    with pytest.raises(KeyError, match="no_such_layer/q_proj"):
        with lora.activations({CLIPTextTransformer: "text"}, {"text": [(ad, 1.0)]}, alpha=1.0):
            jax.eval_shape(lambda: text.apply({"params": tiny.params["text"]}, jnp.asarray(golden["ids"])))


def test_bad_targets_and_config_raise(tiny):
    with pytest.raises(ValueError, match="matches no unet module"):
        lora.select_targets(tiny.params["unet"], ["to_qq"])
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora.LoraConfig(rank=0)
    with pytest.raises(ValueError, match="valid"):
        lora.LoraConfig(targets={"vae": ("attn",)})


# ------------------------------------------------------------------ formats

def test_peft_lora_gives_diffusers_outputs(tiny, golden, goldens_dir):
    loras, fmt = lora_io.load(goldens_dir / "lora_peft.safetensors", _kwargs(tiny))
    assert fmt == "diffusers"
    mods = lora.modules_of(loras["unet"])
    assert float(mods["down_0_res_0/conv1"]["alpha"]) == 8.0 and mods["down_0_res_0/conv1"]["down"].shape == (3, 3, 32, 4)
    unet = lora.apply(tiny.params["unet"], [(loras["unet"], 1.0)])
    np.testing.assert_allclose(_unet_out(tiny, unet, golden), golden["out"], atol=UNET_TOL)
    assert np.abs(_unet_out(tiny, tiny.params["unet"], golden) - golden["out"]).max() > 100 * UNET_TOL
    text = lora.apply(tiny.params["text"], [(loras["text"], 1.0)])
    np.testing.assert_allclose(_text_out(tiny, text, golden["ids"]), golden["lora_text"], atol=1e-4)
    np.testing.assert_allclose(_text_out(tiny, tiny.params["text"], golden["ids"]), golden["base_text"], atol=1e-4)


def test_kohya_file_round_trips_exactly(tiny, goldens_dir, tmp_path):
    loras, _ = lora_io.load(goldens_dir / "lora_peft.safetensors", _kwargs(tiny))
    first = tmp_path / "kohya.safetensors"
    lora_io.save(first, loras, _kwargs(tiny), format="kohya", dtype=np.float16)
    t1 = load_safetensors(first)
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in t1
    assert t1["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, 4, 1, 1)
    assert float(t1["lora_te_text_model_encoder_layers_1_mlp_fc1.alpha"]) == 4.0
    assert t1["lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight"].shape == (2, 32)
    again, fmt = lora_io.load(first, _kwargs(tiny))
    assert fmt == "kohya"
    second = tmp_path / "again.safetensors"
    lora_io.save(second, again, _kwargs(tiny), format="kohya", dtype=np.float16)
    from safetensors.numpy import load_file

    a, b = load_file(str(first)), load_file(str(second))
    assert sorted(a) == sorted(b) and all(a[k].dtype == np.float16 and np.array_equal(a[k], b[k]) for k in a)
    # the diffusers layout round-trips too (float32: bit for bit against the peft-made tensors)
    d = tmp_path / "peft.safetensors"
    lora_io.save(d, loras, _kwargs(tiny), format="diffusers")
    theirs, ours = load_safetensors(goldens_dir / "lora_peft.safetensors"), load_safetensors(d)
    renamed = {lora_io._nest_text_model(k): v for k, v in theirs.items()}
    assert sorted(renamed) == sorted(ours) and all(np.array_equal(renamed[k], ours[k]) for k in ours)
    meta = json.loads(lora_io.read(d)[1][lora_io.METADATA_KEY])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8.0 and meta["text_encoder.lora_alpha"] == 4.0


def test_unknown_lora_keys_raise(tiny, goldens_dir, tmp_path):
    t = load_safetensors(goldens_dir / "lora_peft.safetensors")
    t["unet.down_blocks.0.nothing.lora_A.weight"] = np.zeros((4, 32), np.float32)
    save_safetensors(t, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="name no module.*nothing"):
        lora_io.load(tmp_path / "bad.safetensors", _kwargs(tiny))
    save_safetensors({"foo.weight": np.zeros(2, np.float32)}, tmp_path / "none.safetensors")
    with pytest.raises(CheckpointError, match="not a LoRA file"):
        lora_io.load(tmp_path / "none.safetensors", _kwargs(tiny))


def test_our_lora_loads_in_diffusers(tiny, golden, goldens_dir, tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    loras = _random_adapters(tiny, jax.random.key(5))
    unet = lora.apply(tiny.params["unet"], [(loras["unet"], 1.0)], alpha=6.0)
    ours = _unet_out(tiny, unet, golden)
    assert np.abs(ours - _unet_out(tiny, tiny.params["unet"], golden)).max() > 100 * UNET_TOL
    ours_text = _text_out(tiny, lora.apply(tiny.params["text"], [(loras["text"], 1.0)], alpha=6.0), golden["ids"])
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(goldens_dir / "tiny_sd"), safety_checker=None,
                                                             requires_safety_checker=False, dtype=torch.float32)
    for fmt in lora_io.FORMATS:
        path = tmp_path / f"{fmt}.safetensors"
        lora_io.save(path, loras, _kwargs(tiny), format=fmt, alpha=6.0)
        pipe.load_lora_weights(str(path), adapter_name=fmt)
        with torch.no_grad():
            x = torch.from_numpy(golden["x"].transpose(0, 3, 1, 2).copy())
            theirs = pipe.unet(x, torch.from_numpy(golden["t"]), torch.from_numpy(golden["ctx"])).sample.numpy()
            theirs_text = pipe.text_encoder(torch.from_numpy(golden["ids"]))[0].numpy()
        np.testing.assert_allclose(ours, theirs.transpose(0, 2, 3, 1), atol=UNET_TOL, err_msg=fmt)
        np.testing.assert_allclose(ours_text, theirs_text, atol=1e-4, err_msg=fmt)
        pipe.unload_lora_weights()


def test_sharded_base_gives_the_single_device_gradients(tiny, golden):
    """Base on a (data 1, fsdp 2, tensor 4) mesh with its logical shardings, adapters replicated (as in training)."""
    from ldm_jax import sharding

    kw = tiny.unet_kwargs
    model = UNet(**kw)
    x, t, ctx = (jnp.asarray(golden[k]) for k in ("x", "t", "ctx"))
    ad = _random_adapters(tiny, jax.random.key(7), targets={"unet": ("attn", "conv")})["unet"]

    def loss(a, base, x):
        return jnp.mean(model.apply({"params": lora.apply(base, [(a, 1.0)], alpha=2.0)}, x, t, ctx) ** 2)

    grad = jax.jit(jax.grad(loss))
    ref = grad(ad, tiny.params["unet"], x)
    mesh = sharding.make_mesh((1, 2, 4))
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, ctx))["params"]
    base = jax.device_put(tiny.params["unet"], sharding.logical_sharding(boxed, mesh))
    assert any(len(set(s.device_set)) > 1 and not s.is_fully_replicated
               for s in (v.sharding for v in jax.tree.leaves(base)))
    out = grad(jax.device_put(ad, sharding.replicated(mesh)), base, jax.device_put(x, sharding.batch_sharding(mesh, 4)))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
