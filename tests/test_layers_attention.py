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
    monkeypatch.setattr(layers, "BLOCK_LOGITS", 2 * 3 * 8 * 16)  # batch x heads x 8 queries x 16 keys
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
    """SD1 shapes with the real thresholds: 64-query blocks at 4096 tokens (32 at batch 2), none for cross-attention."""
    calls = []
    monkeypatch.setattr(layers, "_attention_query_blocks", lambda q, k, v, block: calls.append(block) or q)
    for b, t, s in [(1, 4096, 4096), (2, 4096, 4096), (1, 1024, 1024), (1, 4096, 77), (1, 256, 256), (1, 4095, 4095)]:
        q, kv = jax.ShapeDtypeStruct((b, t, 8, 40), jnp.float32), jax.ShapeDtypeStruct((b, s, 8, 40), jnp.float32)
        jax.eval_shape(layers._attention_head_major, q, kv, kv)
    assert calls == [64, 32, 256]
