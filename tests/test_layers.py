"""layers.depthwise_conv2d and layers.DepthwiseConv against XLA's grouped convolution.

The reference is `jax.lax.conv_general_dilated(feature_group_count=C)` (what flax `nn.Conv(feature_group_count=C)`
computes, itself checked against torch's depthwise `nn.Conv2d(groups=C)` by the SANA and DC-AE parity tests), forward
and gradient (the shifted sum has its own VJP), on odd-sized maps so that strided windows do not tile the input.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip3o_jax.models import layers
from conftest import rel_err  # noqa: E402  (tests/ is on sys.path under pytest)

CHANNELS = 6


def lax_depthwise(x, kernel, stride, padding):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def pads_of(padding):
    return ((padding, padding),) * 2 if isinstance(padding, int) else padding


# (kernel, stride, padding): the "same" 3x3 of GLUMBConv and the 5x5 of DC-AE's multiscale projection, each also
# strided, and an asymmetric padding
CASES = [(3, 1, 1), (3, 2, 1), (5, 1, 2), (5, 2, 2), (3, 2, ((0, 1), (1, 0)))]


@pytest.mark.parametrize("size, stride, padding", CASES, ids=[f"k{k}s{s}p{p}" for k, s, p in CASES])
def test_depthwise_conv2d_matches_lax_conv(size, stride, padding):
    rs = np.random.RandomState(size + stride)
    x = rs.randn(2, 7, 9, CHANNELS).astype(np.float32)
    kernel = rs.randn(size, size, 1, CHANNELS).astype(np.float32)
    want = lax_depthwise(x, kernel, stride, pads_of(padding))
    got = jax.jit(lambda x, k: layers.depthwise_conv2d(x, k, stride=stride, padding=padding))(x, kernel)
    assert got.shape == want.shape and got.dtype == jnp.float32
    err = rel_err(got, want)
    print(f"[rel] depthwise k{size} s{stride} p{padding} forward: {err:.3g}")
    assert err <= 1e-5

    cotangent = rs.randn(*want.shape).astype(np.float32)

    def grads(fn):
        return jax.jit(jax.grad(lambda x, k: jnp.sum(fn(x, k) * cotangent), argnums=(0, 1)))(x, kernel)

    want_dx, want_dk = grads(lambda x, k: lax_depthwise(x, k, stride, pads_of(padding)))
    got_dx, got_dk = grads(lambda x, k: layers.depthwise_conv2d(x, k, stride=stride, padding=padding))
    for what, got_g, want_g in (("input", got_dx, want_dx), ("kernel", got_dk, want_dk)):
        assert got_g.shape == want_g.shape, what
        err = rel_err(got_g, want_g)
        print(f"[rel] depthwise k{size} s{stride} p{padding} {what} gradient: {err:.3g}")
        assert err <= 1e-5, what


def test_depthwise_conv2d_bf16_accumulates_in_fp32():
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(1, 6, 6, CHANNELS), jnp.bfloat16)
    kernel = jnp.asarray(rs.randn(5, 5, 1, CHANNELS), jnp.bfloat16)
    want = lax_depthwise(x.astype(jnp.float32), kernel.astype(jnp.float32), 1, pads_of(2))  # of the same bf16 values
    got = layers.depthwise_conv2d(x, kernel, padding=2)
    assert got.dtype == jnp.bfloat16
    # the 25 products summed in fp32, then one rounding to bf16 (at most 2^-9 of the value); summing in bf16 rounds
    # at every step (~6e-3 on these inputs)
    err = rel_err(got.astype(jnp.float32), want)
    print(f"[rel] depthwise bf16 vs fp32 sum of the bf16 values: {err:.3g}")
    assert err <= 2.0 ** -9


def test_depthwise_conv2d_bad_arguments_raise():
    x = jnp.zeros((1, 4, 4, CHANNELS))
    with pytest.raises(ValueError, match=r"expected \(B, H, W, C\) and \(kh, kw, 1, C\)"):
        layers.depthwise_conv2d(x, jnp.zeros((3, 3, 2, CHANNELS)), padding=1)
    with pytest.raises(ValueError, match="padding='same'"):
        layers.depthwise_conv2d(x, jnp.zeros((3, 3, 1, CHANNELS)), padding="same")
    with pytest.raises(ValueError, match="does not fit"):
        layers.depthwise_conv2d(x, jnp.zeros((7, 7, 1, CHANNELS)), padding=1)


def test_depthwise_module_has_the_parameters_of_the_grouped_nn_conv():
    """Same parameter tree (names, shapes, logical axes, init) as the `nn.Conv(feature_group_count=C)` it replaces,
    so checkpoints and converter tables are unchanged; "conv" is the same program, "shifts" the same values."""
    x = jnp.asarray(np.random.RandomState(1).randn(2, 5, 7, CHANNELS).astype(np.float32))
    grouped = nn.Conv(CHANNELS, (5, 5), padding=((2, 2), (2, 2)), feature_group_count=CHANNELS,
                      kernel_init=layers.partitioned(layers.torch_linear_init(3), (None, None, None, "heads")),
                      bias_init=layers.partitioned(nn.initializers.zeros, ("heads",)))
    want_params = grouped.init(jax.random.PRNGKey(0), x)
    by_impl = {impl: layers.DepthwiseConv(5, padding=2, impl=impl, axis_name="heads")
               for impl in layers.DEPTHWISE_IMPLS}
    for impl, module in by_impl.items():
        params = module.init(jax.random.PRNGKey(0), x)
        assert jax.tree.structure(params) == jax.tree.structure(want_params), impl
        jax.tree.map(np.testing.assert_array_equal, params, want_params)
        names = jax.tree.map(lambda p: p.names, params["params"], is_leaf=lambda p: isinstance(p, nn.Partitioned))
        assert names == {"kernel": (None, None, None, "heads"), "bias": ("heads",)}, impl
    params = jax.tree.map(lambda p: p + 0.1, nn.unbox(want_params))  # a non-zero bias
    want = grouped.apply(params, x)
    np.testing.assert_array_equal(by_impl["conv"].apply(params, x), want)
    assert rel_err(by_impl["shifts"].apply(params, x), want) <= 1e-5
    assert str(jax.make_jaxpr(by_impl["conv"].apply)(params, x)) == str(jax.make_jaxpr(grouped.apply)(params, x))
    with pytest.raises(ValueError, match="impl='winograd'"):
        layers.DepthwiseConv(3, impl="winograd").init(jax.random.PRNGKey(0), x)


def test_auto_depthwise_impl_follows_the_target_platform(monkeypatch):
    monkeypatch.delenv("BLIP3O_TARGET_PLATFORM", raising=False)
    assert layers.resolve_depthwise_impl("auto") == "shifts"  # this test session runs on the CPU backend
    for platform, want in (("tpu", "conv"), ("gpu", "conv"), ("cpu", "shifts")):
        monkeypatch.setenv("BLIP3O_TARGET_PLATFORM", platform)  # as the AOT tools set it for a TPU topology
        assert layers.resolve_depthwise_impl("auto") == want
        assert layers.resolve_depthwise_impl("conv") == "conv"
    with pytest.raises(ValueError, match="depthwise_impl='fft'"):
        layers.resolve_depthwise_impl("fft")
