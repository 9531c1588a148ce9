"""CLIPTextTransformer: parity with transformers' CLIPTextModel goldens, parameter count, sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from ldm_jax.interop import clip
from ldm_jax.interop.common import StrictStateDict, load_safetensors
from ldm_jax.models.text import TEXT_PRESETS, CLIPTextTransformer
from ldm_jax.sharding import logical_sharding, make_mesh

_OUTPUTS = {"input_ids", "last_hidden_state", "pooler_output", "penultimate_normed", "text_embeds"}


def _golden(goldens_dir, name):
    t = load_safetensors(goldens_dir / f"text_{name}.safetensors")
    weights = {k: v for k, v in t.items() if k not in _OUTPUTS}
    return weights, t


def _close(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


SD1_KW = dict(vocab_size=512, width=32, layers=2, heads=4, mlp_dim=64, act="quick_gelu")
SD2_KW = dict(vocab_size=512, width=32, layers=3, heads=4, mlp_dim=64, act="gelu", eos_token_id=511,
              projection_dim=16, output_layer=-2)


def test_sd1_style_matches_transformers(goldens_dir):
    weights, t = _golden(goldens_dir, "sd1")
    # the stored config: eos_token_id=2 is transformers' legacy "pool at argmax" rule
    assert clip.config_from_diffusers({"hidden_act": "quick_gelu", "eos_token_id": 2})["eos_token_id"] is None
    params = clip.from_diffusers(StrictStateDict(weights), SD1_KW)
    hidden, pooled = jax.jit(CLIPTextTransformer(**SD1_KW).apply)({"params": params}, t["input_ids"])
    _close(hidden, t["last_hidden_state"])
    _close(pooled, t["pooler_output"])


def test_sd2_style_penultimate_matches_transformers(goldens_dir):
    weights, t = _golden(goldens_dir, "sd2")
    params = clip.from_diffusers(StrictStateDict(weights), SD2_KW)
    hidden, pooled = jax.jit(CLIPTextTransformer(**SD2_KW).apply)({"params": params}, t["input_ids"])
    _close(hidden, t["penultimate_normed"])  # hidden_states[-2] -> final_layer_norm, as SD2 conditions
    _close(pooled, t["text_embeds"])  # first EOS (padding reuses the EOS id), then text_projection
    # diffusers' SD2 text encoder is the truncated model: its last layer == our penultimate output
    cfg = clip.config_to_diffusers(SD2_KW)
    assert cfg["num_hidden_layers"] == 2 and cfg["architectures"] == ["CLIPTextModel"]
    kw = clip.config_from_diffusers(cfg)
    sd = clip.to_diffusers(params, SD2_KW)
    trunc = clip.from_diffusers(StrictStateDict(sd), kw)
    hidden2, _ = jax.jit(CLIPTextTransformer(**kw).apply)({"params": trunc}, t["input_ids"])
    np.testing.assert_allclose(np.asarray(hidden2), np.asarray(hidden), atol=1e-6)


def test_clip_vit_l_14_parameter_count():
    m = CLIPTextTransformer(**TEXT_PRESETS["clip-vit-l-14"])
    shapes = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 77), jnp.int32)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(meta.unbox(shapes))) == 123_060_480


@pytest.mark.parametrize("name", ["ldm-kl-8-g", "tiny"])  # the CLIP presets are counted below
def test_presets_build(name):
    m = CLIPTextTransformer(**TEXT_PRESETS[name])
    out = jax.eval_shape(lambda: m.init_with_output(jax.random.key(0), jnp.zeros((2, 77), jnp.int32)))
    hidden, pooled = out[0]
    assert hidden.shape == (2, 77, TEXT_PRESETS[name]["width"]) and pooled.shape == (2, TEXT_PRESETS[name]["width"])


@pytest.fixture(scope="module")
def tiny_boxed():
    ids = np.zeros((1, 16), np.int32)
    return jax.jit(CLIPTextTransformer(**TEXT_PRESETS["tiny"]).init)(jax.random.key(1), ids)


def test_causal_mask_and_bidirectional(tiny_boxed):
    kw = dict(TEXT_PRESETS["tiny"])
    ids = np.random.default_rng(0).integers(0, 1000, (1, 16)).astype(np.int32)
    ids2 = ids.copy()
    ids2[0, 10:] = 7  # change only the tail
    both = np.concatenate([ids, ids2])
    p = meta.unbox(tiny_boxed)  # same parameters either way
    for causal in (True, False):
        h, _ = jax.jit(CLIPTextTransformer(**kw, causal=causal).apply)(p, both)
        head_same = np.allclose(h[0, :10], h[1, :10], atol=1e-6)
        assert head_same == causal  # causal: earlier tokens never see later ones


def test_bf16_and_sharded_remat_match(tiny_boxed):
    kw = dict(TEXT_PRESETS["tiny"])
    ids = np.random.default_rng(0).integers(0, 1000, (8, 77)).astype(np.int32)
    params = meta.unbox(tiny_boxed)

    def loss(p, remat):  # remat only changes what the backward pass keeps
        h, _ = CLIPTextTransformer(**kw, remat_policy=remat).apply(p, ids)
        return jnp.sum(h**2), h

    (_, ref), g_ref = jax.jit(jax.value_and_grad(lambda p: loss(p, "none"), has_aux=True))(params)
    mesh = make_mesh((2, 2, 2))
    sharded = jax.device_put(params, logical_sharding(tiny_boxed, mesh))
    assert sharded["params"]["layers_0"]["fc1"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert sharded["params"]["token_embedding"]["embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor", None)
    (_, out), g = jax.jit(jax.value_and_grad(lambda p: loss(p, "full"), has_aux=True))(sharded)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):  # float32 sums in another order
        np.testing.assert_allclose(a, b, atol=1e-3 * float(np.abs(b).max()) + 1e-6)
    bf16, _ = jax.jit(CLIPTextTransformer(**kw, dtype=jnp.bfloat16).apply)(params, ids)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf16, np.float32), ref, atol=0.1)


def test_bad_fields_raise():
    with pytest.raises(ValueError, match="act must be"):
        CLIPTextTransformer(**{**TEXT_PRESETS["tiny"], "act": "relu"}).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="more than max_length"):
        CLIPTextTransformer(**TEXT_PRESETS["tiny"]).init(jax.random.key(0), jnp.zeros((1, 78), jnp.int32))


def _count(kw):
    m = CLIPTextTransformer(**kw)
    shapes = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 77), jnp.int32)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(meta.unbox(shapes)))


def test_sd2_openclip_single_file_config_matches_preset():
    # the tensor names and shapes of SD 2.x single files' OpenCLIP ViT-H/14 text tower (shapes only)
    z = lambda *s: np.broadcast_to(np.float32(0), s)  # noqa: E731
    b = "cond_stage_model.model."
    t = {b + "token_embedding.weight": z(49408, 1024), b + "positional_embedding": z(77, 1024),
         b + "ln_final.weight": z(1024), b + "ln_final.bias": z(1024), b + "text_projection": z(1024, 1024),
         b + "logit_scale": z()}
    for i in range(24):
        r = f"{b}transformer.resblocks.{i}."
        t.update({r + "attn.in_proj_weight": z(3072, 1024), r + "attn.in_proj_bias": z(3072),
                  r + "mlp.c_fc.weight": z(4096, 1024), r + "mlp.c_proj.weight": z(1024, 4096)})
    kw = clip.config_from_compvis(t)
    assert kw == {**clip._DEFAULTS, "vocab_size": 49408, "width": 1024, "layers": 24, "heads": 16, "mlp_dim": 4096,
                  "act": "gelu", "output_layer": -2, "projection_dim": 1024}
    assert _count(kw) == 354_032_640  # = transformers CLIPTextModelWithProjection, 24 layers (meta-device count)
    # exported to diffusers it is SD2's 23-layer text encoder, i.e. our "openclip-vit-h-14" preset
    assert clip.config_from_diffusers(clip.config_to_diffusers(kw)) == clip._kw(TEXT_PRESETS["openclip-vit-h-14"])
    assert _count(TEXT_PRESETS["openclip-vit-h-14"]) == 340_387_840  # = transformers CLIPTextModel, 23 layers


def test_zero_layer_encoder_is_its_embeddings():
    """layers=0: hidden states = final LayerNorm(token + position embeddings), each token independent of the others;
    negative layer counts and an output_layer other than -1 are refused."""
    m = CLIPTextTransformer(vocab_size=50, width=16, layers=0, heads=2, mlp_dim=32, max_length=8, causal=False)
    ids = jnp.array([[1, 7, 3, 49, 0, 0], [1, 7, 4, 49, 0, 0]])
    p = meta.unbox(m.init(jax.random.key(0), ids)["params"])
    hidden, pooled = m.apply({"params": p}, ids)
    x = p["token_embedding"]["embedding"][ids] + p["position_embedding"][None, :6]
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    ln = p["final_layer_norm"]
    want = (x - mu) / np.sqrt(var + 1e-5) * ln["scale"] + ln["bias"]
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(hidden[0, :2]), np.asarray(hidden[1, :2]))  # no mixing across tokens
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(want[:, 3]), rtol=1e-5, atol=1e-5)  # EOS = largest id
    with pytest.raises(ValueError, match="layers must be >= 0"):
        CLIPTextTransformer(layers=-1).init(jax.random.key(0), ids)
    with pytest.raises(ValueError, match="output_layer"):
        CLIPTextTransformer(vocab_size=50, width=16, layers=0, heads=2, max_length=8, output_layer=-2).init(
            jax.random.key(0), ids)
