"""Building blocks shared by every model: logically-partitioned Dense/Conv/GroupNorm, attention, remat.

Every parameter carries logical axis names; `ldm_jax.sharding.LOGICAL_RULES` maps them to the mesh
axes `data`, `fsdp`, `tensor`. Names used for parameters:
  embed      input features of a Dense / the model width        -> fsdp
  mlp        output features of a Dense                          -> tensor
  conv_in    input channels of a Conv                            -> fsdp
  conv_out   output channels of a Conv                           -> tensor
  vocab      token / class / codebook table rows                 -> tensor
  norm       scale and bias of normalisation layers              -> (replicated)
  kernel_h, kernel_w   conv kernel height / width               -> (replicated)
  table      second axis of an embedding table, position rows    -> (replicated)
"""
from __future__ import annotations

import collections
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from ldm_jax.models import conv_grad

Dtype = Any
Initializer = Callable[..., jax.Array]

# The same default init PyTorch uses for Linear/Conv weights (kaiming_uniform(a=sqrt(5)) == U(±1/sqrt(fan_in))),
# so that models trained from scratch start where the references start.
torch_default_kernel_init: Initializer = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def partitioned(init: Initializer, names: Sequence[str | None]) -> Initializer:
    """Wraps an initializer so the parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, tuple(names))


def dense(
    features: int,
    *,
    names: tuple[str | None, str | None] = ("embed", "mlp"),
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Initializer = torch_default_kernel_init,
    name: str | None = None,
) -> nn.Dense:
    """A Dense layer whose kernel is (in, out) with logical names `names`."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(kernel_init, names),
        bias_init=partitioned(nn.initializers.zeros_init(), (names[1],)),
        name=name,
    )


def conv(
    features: int,
    kernel_size: int = 3,
    *,
    stride: int = 1,
    padding: int | str | None = None,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Initializer = torch_default_kernel_init,
    names: tuple[str | None, str | None] = ("conv_in", "conv_out"),
    name: str | None = None,
) -> nn.Conv:
    """An NHWC conv with PyTorch's symmetric padding (k//2 unless given); kernel (kh, kw, in, out).

    Its gradients on the CPU backend are `conv_grad`'s (XLA:CPU's own are slow inside loops and conds)."""
    pad = kernel_size // 2 if padding is None else padding
    if isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=pad,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(kernel_init, ("kernel_h", "kernel_w", *names)),
        bias_init=partitioned(nn.initializers.zeros_init(), (names[1],)),
        conv_general_dilated=conv_grad.conv_general_dilated,
        name=name,
    )


def group_norm(
    num_groups: int = 32,
    *,
    epsilon: float = 1e-5,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.GroupNorm:
    """GroupNorm over the channel axis (statistics are reduced in float32 even for bf16 inputs)."""
    return nn.GroupNorm(num_groups=num_groups, **_norm_kwargs(epsilon, dtype, param_dtype, name))


def layer_norm(
    *, epsilon: float = 1e-5, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, name: str | None = None
) -> nn.LayerNorm:
    """LayerNorm over the last axis with PyTorch's default epsilon."""
    return nn.LayerNorm(**_norm_kwargs(epsilon, dtype, param_dtype, name))


def _norm_kwargs(epsilon: float, dtype: Dtype, param_dtype: Dtype, name: str | None) -> dict:
    """Arguments shared by the norms: scale 1 / bias 0 on the logical "norm" axis."""
    return dict(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
                scale_init=partitioned(nn.initializers.ones_init(), ("norm",)),
                bias_init=partitioned(nn.initializers.zeros_init(), ("norm",)))


# Which attention implementation each traced attention call used ("cpu-blocked"/"cpu-matmul", "cudnn", "xla"):
# bench/device_check.py prints it. LDM_JAX_ATTENTION=xla|cudnn forces the GPU choice (default: auto).
ATTENTION_PATHS: collections.Counter = collections.Counter()


def gpu_attention_impl(dtype: Any, head_dim: int, mask: jax.Array | None, choice: str | None = None) -> str:
    """'cudnn' (fused flash attention) where cuDNN takes the call — fp16/bf16, head width ≤ 128 and a multiple of 8,
    no explicit mask (causal is fine) — else 'xla'. `choice` (default $LDM_JAX_ATTENTION or 'auto') forces one."""
    choice = (choice or os.environ.get("LDM_JAX_ATTENTION", "auto")).lower()
    if choice not in ("auto", "xla", "cudnn"):
        raise ValueError(f"LDM_JAX_ATTENTION must be auto, xla or cudnn, got {choice!r}")
    if choice != "auto":
        return choice
    fits = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim <= 128 and head_dim % 8 == 0
    return "cudnn" if fits and mask is None else "xla"


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None, is_causal: bool = False
) -> jax.Array:
    """Scaled dot-product attention on (batch, length, heads, head_dim) through `jax.nn.dot_product_attention`.

    On GPUs the fused cuDNN kernel is asked for explicitly where it applies (`gpu_attention_impl`; JAX's default
    implementation is XLA's, unfused); if cuDNN refuses the call at trace time, XLA's is used. On CPU the same math
    is written as head-major batched matmuls, which XLA:CPU runs ~3x faster than `dot_product_attention`'s
    (B,T,N,H) einsums (one 4096-token, 8-head SD attention layer on 2 cores: 5-14 s -> 2-4 s, measured while the
    cores were shared), and long unmasked attention is computed in query blocks (`_attention_query_blocks`) so
    that the logits of a block stay in cache instead of going through memory whole (SD1 at 64x64: 4096x4096
    logits per head).
    """
    backend = jax.default_backend()
    if backend == "cpu":
        return _attention_head_major(q, k, v, mask=mask, is_causal=is_causal)
    if backend in ("gpu", "cuda") and gpu_attention_impl(q.dtype, q.shape[-1], mask) == "cudnn":
        try:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="cudnn")
            ATTENTION_PATHS["cudnn"] += 1
            return out
        except (RuntimeError, ValueError, NotImplementedError, TypeError):
            if os.environ.get("LDM_JAX_ATTENTION", "auto").lower() == "cudnn":
                raise
    ATTENTION_PATHS["xla"] += 1
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)


def _attention_head_major(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None, is_causal: bool = False
) -> jax.Array:
    """`jax.nn.dot_product_attention`'s XLA math (fp32 softmax, same masking) as (B, N, T, S) matmuls."""
    b, t, n, _ = q.shape
    s = k.shape[1]
    if mask is None and not is_causal and b * n * t * s > CHUNK_MIN_LOGITS:
        block = t & -t  # the largest power of two dividing t, halved until a block's logits fit BLOCK_LOGITS
        while block > 8 and b * block * s > BLOCK_LOGITS:
            block //= 2
        if 8 <= block <= t:
            ATTENTION_PATHS["cpu-blocked"] += 1
            return _attention_query_blocks(q, k, v, block)
    ATTENTION_PATHS["cpu-matmul"] += 1
    scale = q.shape[-1] ** -0.5
    qh, kh, vh = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # (B, N, T, H)
    logits = (qh * jnp.asarray(scale, q.dtype)) @ jnp.swapaxes(kh, -1, -2)
    big_neg = jnp.asarray(jnp.finfo(logits.dtype).min * 0.7, logits.dtype)
    if mask is not None:
        logits = jnp.where(mask, logits, big_neg)
    if is_causal:
        causal = jnp.tril(jnp.ones(logits.shape[-2:], dtype=bool))
        logits = jnp.where(causal, logits, big_neg)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.swapaxes(probs @ vh, 1, 2)


# Unmasked attention with more than CHUNK_MIN_LOGITS logits (16 MB in fp32) runs one head at a time, in query
# blocks whose logits (batch x block x keys, one head) take at most BLOCK_LOGITS (4 MB; a block has at least 8
# queries). On 2 AMD EPYC cores (2 MB L2 each, 32 MB L3) SD1's 4096-token, 8-head self-attention at batch 1: 0.70 s
# whole, 0.23 s in all-head blocks of 64 queries (the previous scheme: 8 MB of logits a block), 0.165 s one head at
# a time in blocks of 256 queries (128: 0.168 s, 512: 0.170 s, 1024: 0.197 s; all measured at load ~3 on 2 cores).
# The 1024-token one: 0.021 s in all-head blocks of 256 -> 0.018 s one head at a time, whole. PyTorch's fused CPU
# kernel: 0.26 s and 0.032 s (bench/micro_unet_ops.py measures these).
CHUNK_MIN_LOGITS = 1 << 22
BLOCK_LOGITS = 1 << 20


def _attention_query_blocks(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> jax.Array:
    """Unmasked attention on (B, T, N, H), one head at a time and, within a head, one block of `block` queries
    at a time (nested `lax.map`s, sequential; `block == T` is the whole head).

    Every block sees all keys, so this is the exact softmax (no online rescaling); it is normalised after the
    probabilities @ values product, on (block, H) instead of (block, S) numbers. fp32 softmax as above.
    """
    b, t, n, d = q.shape
    qh = jnp.transpose(q * jnp.asarray(d**-0.5, q.dtype), (2, 0, 1, 3))  # (N, B, T, H)
    kt = jnp.transpose(k, (2, 0, 3, 1))  # (N, B, H, S)
    vh = jnp.transpose(v, (2, 0, 1, 3))  # (N, B, S, H)

    def one_block(qb: jax.Array, kth: jax.Array, vhh: jax.Array) -> jax.Array:
        logits = (qb @ kth).astype(jnp.float32)
        p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
        out = (p.astype(v.dtype) @ vhh).astype(jnp.float32) / jnp.sum(p, axis=-1, keepdims=True)
        return out.astype(v.dtype)

    def one_head(args: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        qhh, kth, vhh = args  # (B, T, H), (B, H, S), (B, S, H)
        if block == t:
            return one_block(qhh, kth, vhh)
        blocks = qhh.reshape(b, t // block, block, d).transpose(1, 0, 2, 3)  # (T/block, B, block, H)
        out = jax.lax.map(lambda qb: one_block(qb, kth, vhh), blocks)
        return out.transpose(1, 0, 2, 3).reshape(b, t, d)

    out = jax.lax.map(one_head, (qh, kt, vh))  # (N, B, T, H)
    return jnp.transpose(out, (1, 2, 0, 3))


# Token-wise layers with a wide hidden layer (the transformer feed-forward: 8x expansion for GEGLU) run on CPU in
# chunks of ROW_CHUNK rows (`lax.map`) when the hidden activations are big (more than CHUNK_MIN_HIDDEN numbers), so
# that a chunk's hidden activations (512 x 2560 floats at SD1's 64x64 level, 5 MB) stay in cache between the two
# matmuls. SD1's 4096 x 320 GEGLU on 2 AMD EPYC cores: 84 ms whole, 52 ms in chunks of 512 rows (256: 53, 1024: 57,
# 2048: 62 ms; unrolled in Python instead of lax.map: 70 ms); 1024 x 640: 60 -> 48 ms; 256 x 1280 is not chunked
# (128-row chunks: 50 -> 55 ms). In a whole SD1 transformer block (LayerNorm and residual in the chunks too):
# 290 -> 268 ms at 4096 x 320, 101 -> 90 ms at 1024 x 640 (load ~4 on 2 cores).
ROW_CHUNK = 512
CHUNK_MIN_HIDDEN = 1 << 22


def row_chunk_size(rows: int, hidden: int) -> int | None:
    """The chunk `map_row_chunks` should use for `rows` rows with `hidden` hidden features, or None (one call)."""
    if jax.default_backend() != "cpu" or rows <= ROW_CHUNK or rows % ROW_CHUNK or rows * hidden <= CHUNK_MIN_HIDDEN:
        return None
    return ROW_CHUNK


def map_row_chunks(fn: Callable[[jax.Array], jax.Array], x: jax.Array, chunk: int) -> jax.Array:
    """Applies a row-wise `fn` ((rows, C) -> (rows, D)) to x (..., C) in sequential chunks of `chunk` rows."""
    lead, c = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, c)
    out = jax.lax.map(fn, rows.reshape(rows.shape[0] // chunk, chunk, c))
    return out.reshape(*lead, out.shape[-1])


REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def maybe_remat(module_cls: type[nn.Module], policy: str, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
    """Returns `module_cls` wrapped in `nn.remat` with a named policy ('none' leaves it unchanged)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose one of {sorted(REMAT_POLICIES)}")
    if policy == "none":
        return module_cls
    return nn.remat(module_cls, policy=REMAT_POLICIES[policy], static_argnums=static_argnums)
