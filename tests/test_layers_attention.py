"""layers.attention's CPU paths: query-blocked attention (long unmasked sequences) vs jax.nn.dot_product_attention."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import layers


def _qkv(t, s, seed=0, shape=(2, 3, 8)):
    rng = np.random.default_rng(seed)
    b, n, h = shape
    q = jnp.asarray(rng.standard_normal((b, t, n, h)) * 2, jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, s, n, h)) * 2, jnp.float32) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("t,s,block", [(12, 12, 4), (16, 5, 8), (8, 8, 8)])
def test_query_blocks_match_dot_product_attention(t, s, block):
    q, k, v = _qkv(t, s)
    ref = jax.nn.dot_product_attention(q, k, v)
    out = layers._attention_query_blocks(q, k, v, block)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=2e-6)


def test_query_blocks_grad_and_bf16():
    q, k, v = _qkv(12, 12, seed=1)
    w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w)  # noqa: E731
    g = jax.grad(loss(lambda q, k, v: layers._attention_query_blocks(q, k, v, 4)), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = layers._attention_query_blocks(*bf, 4)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(jax.nn.dot_product_attention(q, k, v)), atol=0.1)


@pytest.mark.parametrize("causal,masked", [(False, False), (True, False), (False, True)])
def test_attention_dispatch_with_small_thresholds(monkeypatch, causal, masked):
    """With tiny thresholds the unmasked case takes the blocked path; masked/causal ones must not (and stay exact)."""
    monkeypatch.setattr(layers, "CHUNK_MIN_LOGITS", 0)
    monkeypatch.setattr(layers, "BLOCK_LOGITS", 2 * 8 * 16)  # batch x 8 queries x 16 keys (one head)
    calls = []
    real = layers._attention_query_blocks
    monkeypatch.setattr(layers, "_attention_query_blocks", lambda *a: calls.append(a[-1]) or real(*a))
    q, k, v = _qkv(16, 16, seed=3)
    mask = jnp.asarray(np.random.default_rng(4).random((2, 1, 16, 16)) > 0.3) | jnp.eye(16, dtype=bool) if masked else None
    out = layers._attention_head_major(q, k, v, mask=mask, is_causal=causal)
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=2e-6)
    assert calls == ([] if (causal or masked) else [8])


def test_block_size_choice(monkeypatch):
    """SD1 shapes with the real thresholds: 256-query blocks at 4096 tokens (128 at batch 2), whole heads at 1024
    tokens, none for cross-attention or 256 tokens."""
    calls = []
    monkeypatch.setattr(layers, "_attention_query_blocks", lambda q, k, v, block: calls.append(block) or q)
    for b, t, s in [(1, 4096, 4096), (2, 4096, 4096), (1, 1024, 1024), (1, 4096, 77), (1, 256, 256), (1, 4095, 4095)]:
        q, kv = jax.ShapeDtypeStruct((b, t, 8, 40), jnp.float32), jax.ShapeDtypeStruct((b, s, 8, 40), jnp.float32)
        jax.eval_shape(layers._attention_head_major, q, kv, kv)
    assert calls == [256, 128, 1024]


def test_row_chunk_size_sd1():
    """Feed-forward chunking on CPU: 512-row chunks at SD1's 64x64 and 32x32 levels, none at 16x16 or for odd sizes."""
    hid = lambda c: 8 * c  # noqa: E731  GEGLU hidden width
    got = [layers.row_chunk_size(r, hid(c)) for r, c in [(4096, 320), (1024, 640), (256, 1280), (8192, 320), (4095, 320)]]
    assert got == [512, 512, None, 512, None]


def test_transformer_block_row_chunks_match_whole(monkeypatch):
    """The chunked inference path of TransformerBlock (norm3 + GEGLU + residual) equals the whole-matmul path."""
    from ldm_jax.models.unet_blocks import TransformerBlock

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 24, 16)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((2, 5, 12)), jnp.float32)
    block = TransformerBlock(2, 8)
    params = block.init(jax.random.key(0), x, ctx)
    params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    whole = block.apply(params, x, ctx)
    monkeypatch.setattr(layers, "ROW_CHUNK", 8)
    monkeypatch.setattr(layers, "CHUNK_MIN_HIDDEN", 0)
    maps = []
    real = layers.map_row_chunks
    monkeypatch.setattr(layers, "map_row_chunks", lambda f, x, c: maps.append(c) or real(f, x, c))
    chunked = block.apply(params, x, ctx)
    assert maps == [8]
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), atol=2e-6, rtol=2e-6)
    block.apply(params, x, ctx, train=True)  # training keeps the whole matmuls
    assert maps == [8]
