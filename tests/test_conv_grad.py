"""`ldm_jax.models.conv_grad`: the same convolution and gradients as `lax.conv_general_dilated`, written so that
XLA:CPU runs them on its fast path inside `lax.scan` / `lax.cond` bodies too (canonical NHWC x HWIO convs)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ldm_jax.models import conv_grad, layers

NHWC = ("NHWC", "HWIO", "NHWC")
CASES = [  # kernel, stride, padding, kernel dilation, input height
    (k, s, pad, d, h)
    for k, s, pad, d, h in itertools.product((1, 3, 4), (1, 2), ("sym", "none", "asym", "SAME", "VALID"), (1, 2),
                                             (8, 9))
    if (h + 2 - d * (k - 1)) > 0
]


def _pad(pad, k):
    return {"sym": ((k // 2, k // 2),) * 2, "none": ((0, 0),) * 2, "asym": ((1, 2), (0, 1))}.get(pad, pad)


def _loss(conv, s, pad, d):
    # sin() makes the output cotangent vary per element, so every tap of the gradients is checked
    return lambda x, w: jnp.sum(jnp.sin(conv(x, w, (s, s), pad, rhs_dilation=(d, d), dimension_numbers=NHWC)))


@pytest.mark.parametrize("k,s,pad,d,h", CASES)
def test_value_and_gradients_match_lax(k, s, pad, d, h):
    rng = np.random.default_rng(k * 100 + s * 10 + d)
    x = jnp.asarray(rng.normal(size=(3, h, h + 1, 5)), jnp.float32)  # non-square, odd sizes
    w = jnp.asarray(rng.normal(size=(k, k, 5, 7)), jnp.float32)
    p = _pad(pad, k)
    y_ref = lax.conv_general_dilated(x, w, (s, s), p, rhs_dilation=(d, d), dimension_numbers=NHWC)
    y = conv_grad.conv_general_dilated(x, w, (s, s), p, rhs_dilation=(d, d), dimension_numbers=NHWC)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    gx_ref, gw_ref = jax.grad(_loss(lax.conv_general_dilated, s, p, d), (0, 1))(x, w)
    gx, gw = jax.jit(jax.grad(_loss(conv_grad.conv_general_dilated, s, p, d), (0, 1)))(x, w)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(gx_ref).max()))
    np.testing.assert_allclose(gw, gw_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(gw_ref).max()))


def _conv_dimension_numbers(jaxpr) -> list:
    """The dimension numbers of every convolution in a (closed) jaxpr, nested jaxprs included."""
    out = []

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                out.append(eqn.params["dimension_numbers"])
            for v in eqn.params.values():
                for sub in v if isinstance(v, (tuple, list)) else (v,):
                    if hasattr(sub, "jaxpr"):
                        walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(jaxpr.jaxpr)
    return out


def test_gradients_are_canonical_convolutions_inside_cond_and_scan():
    """The property XLA:CPU needs: every convolution of the backward pass is NHWC x HWIO -> NHWC, also inside a
    `lax.cond` branch and a `lax.scan` body; `lax`'s own weight gradient is not (and `xla_gradients()` gives it back)."""
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 6))
    canonical = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)

    def program(conv):
        g = jax.grad(_loss(conv, 2, ((1, 1), (1, 1)), 1), (0, 1))
        in_cond = lambda x, p: lax.cond(p, lambda x: g(x, w)[1], lambda x: jnp.zeros_like(w), x)  # noqa: E731
        in_scan = lambda x, p: lax.scan(lambda c, _: (c + g(x, w)[1], None), jnp.zeros_like(w), None, length=2)[0]  # noqa: E731
        return lambda x, p: in_cond(x, p) + in_scan(x, p)

    ours = _conv_dimension_numbers(jax.make_jaxpr(program(conv_grad.conv_general_dilated))(x, True))
    assert len(ours) == 2 * 3 and all(dn == canonical for dn in ours)  # forward, dx, dw in each of the two
    theirs = _conv_dimension_numbers(jax.make_jaxpr(program(lax.conv_general_dilated))(x, True))
    assert any(dn != canonical for dn in theirs)
    with conv_grad.xla_gradients():
        off = _conv_dimension_numbers(jax.make_jaxpr(program(conv_grad.conv_general_dilated))(x, True))
    assert off == theirs


def test_other_convolutions_are_lax_itself():
    """Grouped or input-dilated convs and other layouts go to `lax.conv_general_dilated` unchanged."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
    for kw in (dict(feature_group_count=2), dict(lhs_dilation=(2, 2), feature_group_count=2)):
        f = lambda c: lambda x, w: jnp.sum(jnp.sin(c(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC, **kw)))  # noqa: E731
        ours = jax.make_jaxpr(jax.grad(f(conv_grad.conv_general_dilated), (0, 1)))(x, w)
        theirs = jax.make_jaxpr(jax.grad(f(lax.conv_general_dilated), (0, 1)))(x, w)
        assert _conv_dimension_numbers(ours) == _conv_dimension_numbers(theirs)
        for a, b in zip(jax.grad(f(conv_grad.conv_general_dilated), (0, 1))(x, w),
                        jax.grad(f(lax.conv_general_dilated), (0, 1))(x, w)):
            np.testing.assert_array_equal(a, b)
    xn = jnp.transpose(x, (0, 3, 1, 2))
    wn = jnp.asarray(rng.normal(size=(5, 4, 3, 3)), jnp.float32)
    dn = ("NCHW", "OIHW", "NCHW")
    np.testing.assert_array_equal(conv_grad.conv_general_dilated(xn, wn, (1, 1), "SAME", dimension_numbers=dn),
                                  lax.conv_general_dilated(xn, wn, (1, 1), "SAME", dimension_numbers=dn))


def test_layers_conv_bf16_gradients_keep_dtypes_and_match():
    """`layers.conv` (every model's conv) uses it: bf16 compute over fp32 weights gives fp32 weight gradients
    close to XLA's, and the stride-2 4x4 conv of the PatchGAN matches in float32."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 8)), jnp.float32)
    for kwargs, tol in ((dict(kernel_size=3, dtype=jnp.bfloat16), 2e-2), (dict(kernel_size=4, stride=2, padding=1),
                                                                           1e-5)):
        mod = layers.conv(6, **kwargs)
        params = mod.init(jax.random.key(0), x)

        def loss(p, x):
            return jnp.sum(jnp.sin(mod.apply(p, x).astype(jnp.float32)))

        ours = jax.jit(jax.grad(loss, (0, 1)))(params, x)
        canonical = lax.conv_dimension_numbers((1,) * 4, (1,) * 4, NHWC)
        assert set(_conv_dimension_numbers(jax.make_jaxpr(jax.grad(loss))(params, x))) == {canonical}
        with conv_grad.xla_gradients():
            ref = jax.jit(jax.grad(loss, (0, 1)))(params, x)
            assert set(_conv_dimension_numbers(jax.make_jaxpr(jax.grad(loss))(params, x))) != {canonical}
        for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(jnp.abs(b).max()))
