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

from blip3o_jax import kernels
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


# ---------------------------------------------------------------------------------------------------------------
# attention: the CPU arrangement against jax.nn.dot_product_attention (the path every other platform takes)


@pytest.mark.parametrize("heads,kv_heads,lq,lk,mask_kind,is_causal", [
    (4, 4, 9, 9, None, False),
    (4, 2, 7, 7, None, True),             # GQA + causal
    (6, 2, 5, 11, "key_padding", False),  # GQA, cross lengths, (B, 1, 1, Lk)
    (4, 1, 8, 8, "dense", True),          # MQA, (B, 1, Lq, Lk) & causal, a fully masked row
    (4, 4, 6, 6, "per_head", False),      # (B, H, Lq, Lk)
])
@pytest.mark.parametrize("split", [None, "units", "rows"])
def test_cpu_attention_matches_dot_product_attention(heads, kv_heads, lq, lk, mask_kind, is_causal, split,
                                                     monkeypatch):
    """Also with the scores split into blocks (`CPU_ATTENTION_*` set small): groups of (batch, kv-head) units, or
    blocks of one unit's query rows (some cases with an uneven last block)."""
    rs = np.random.RandomState(0)
    b, d = 2, 8
    unit = (heads // kv_heads) * lq * lk * 4  # one unit's fp32 scores
    if split is not None:
        monkeypatch.setattr(layers, "CPU_ATTENTION_SPLIT_ABOVE", 0)
        monkeypatch.setattr(layers, "CPU_ATTENTION_BLOCK_BYTES", 3 * unit if split == "units" else 4 * lk * 4)
    q = jnp.asarray(rs.randn(b, lq, heads, d), jnp.float32)
    k = jnp.asarray(rs.randn(b, lk, kv_heads, d), jnp.float32)
    v = jnp.asarray(rs.randn(b, lk, kv_heads, d), jnp.float32)
    mask = None
    if mask_kind == "key_padding":
        mask = jnp.asarray(np.arange(lk)[None, None, None, :] < np.array([lk, 3])[:, None, None, None])
    elif mask_kind == "dense":
        m = rs.rand(b, 1, lq, lk) > 0.3
        m[0, 0, 2] = False  # a row with nothing to attend to: both attend uniformly
        mask = jnp.asarray(m)
    elif mask_kind == "per_head":
        mask = jnp.asarray(rs.rand(b, heads, lq, lk) > 0.4)

    def loss(fn, q, k, v):
        out = fn(q, k, v, mask=mask, is_causal=is_causal, scale=0.3)
        return jnp.sum(out * jnp.cos(out)), out

    (l_ref, o_ref), g_ref = jax.value_and_grad(lambda *a: loss(jax.nn.dot_product_attention, *a), argnums=(0, 1, 2),
                                               has_aux=True)(q, k, v)
    (l_ours, o_ours), g_ours = jax.value_and_grad(lambda *a: loss(layers._attention_cpu, *a), argnums=(0, 1, 2),
                                                  has_aux=True)(q, k, v)
    assert o_ours.shape == o_ref.shape == (b, lq, heads, d)
    assert rel_err(o_ours, o_ref) < 1e-5
    for go, gr in zip(g_ours, g_ref):
        assert rel_err(go, gr) < 1e-5
    # the blocks are there: two products per block
    products = str(jax.make_jaxpr(lambda *a: layers._attention_cpu(*a, mask=mask, is_causal=is_causal))(q, k, v))
    units, rows = b * kv_heads, (heads // kv_heads) * lq
    blocks = {None: 1, "units": -(-units // 3), "rows": units * -(-rows // 4)}[split]
    assert products.count("dot_general") == 2 * blocks


def test_attention_takes_the_cpu_arrangement_only_for_a_cpu_program(monkeypatch):
    calls = []
    real = layers._attention_cpu
    monkeypatch.setattr(layers, "_attention_cpu", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q = jnp.ones((1, 4, 2, 8), jnp.float32)
    monkeypatch.setenv("BLIP3O_TARGET_PLATFORM", "cpu")
    layers.attention(q, q, q)
    assert calls == [1]
    monkeypatch.setenv("BLIP3O_TARGET_PLATFORM", "tpu")
    layers.attention(q, q, q)
    assert calls == [1]


# ---------------------------------------------------------------------------------------------------------------
# Dense in torch's (out, in) layout (the CPU decode layout)


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
@pytest.mark.parametrize("lead", [(4, 1), (3, 7), (2, 100)])  # decode rows, few rows, prefill rows (> SMALL_ROWS)
def test_dense_out_in_is_the_in_out_dense_transposed(platform, lead, monkeypatch):
    monkeypatch.setenv("BLIP3O_TARGET_PLATFORM", platform)
    rs = np.random.RandomState(2)
    x = jnp.asarray(rs.randn(*lead, 24), jnp.float32)
    ref = layers.Dense(40, kernel_axes=("embed", "mlp"))
    oi = layers.Dense(40, kernel_axes=("embed", "mlp"), kernel_layout="out_in")
    p_ref = nn.unbox(ref.init(jax.random.key(3), x))["params"]
    p_oi = nn.unbox(oi.init(jax.random.key(3), x))["params"]
    # the same init, transposed, under a name that cannot be read in the other layout
    assert set(p_oi) == {"weight", "bias"} and p_oi["weight"].shape == (40, 24)
    np.testing.assert_array_equal(p_oi["weight"], p_ref["kernel"].T)
    bias = jnp.asarray(rs.randn(40), jnp.float32)
    want = ref.apply({"params": {"kernel": p_ref["kernel"], "bias": bias}}, x)
    got = oi.apply({"params": {"weight": p_ref["kernel"].T, "bias": bias}}, x)
    assert got.shape == (*lead, 40)
    assert rel_err(got, want) < 1e-6
    # a CPU program with a decode step's rows runs the few-row kernel (tests/test_kernels.py), with up to SMALL_ROWS
    # the weight-as-left-operand form; many rows, and other platforms, contract directly
    hlo = jax.jit(lambda x: oi.apply({"params": {"weight": p_oi["weight"], "bias": bias}}, x)).lower(x).as_text()
    rows = int(np.prod(lead))
    kernel = platform == "cpu" and rows <= kernels.MAX_ROWS and kernels.available()
    assert ("blip3o_few_row_matmul" in hlo) == kernel
    assert ("optimization_barrier" in hlo) == (platform == "cpu" and rows <= layers.SMALL_ROWS and not kernel)


def test_dense_rejects_an_unknown_kernel_layout():
    with pytest.raises(ValueError, match="kernel_layout"):
        layers.Dense(4, kernel_layout="io").init(jax.random.key(0), jnp.ones((1, 3)))


# ---------------------------------------------------------------------------------------------------------------
# conv_blocks: the CPU forms (per-channel GroupNorm statistics, 1x1 convolutions as matmuls)


@pytest.mark.parametrize("shape,groups", [((2, 5, 6, 12), 4), ((2, 7, 16), 8), ((1, 3, 4, 5, 6), 3)])
def test_group_norm_matches_a_direct_reference(shape, groups):
    from blip3o_jax.models import conv_blocks

    rs = np.random.RandomState(0)
    x = rs.randn(*shape).astype(np.float32) * 3 + 1.5
    gn = conv_blocks.GroupNorm(groups, 1e-6)
    params = {"params": {"scale": rs.randn(shape[-1]).astype(np.float32),
                         "bias": rs.randn(shape[-1]).astype(np.float32)}}
    got = np.asarray(gn.apply(params, jnp.asarray(x)))
    g = x.reshape(shape[0], -1, groups, shape[-1] // groups).astype(np.float64)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)  # biased, as torch
    want = ((g - mean) / np.sqrt(var + 1e-6)).reshape(shape) * params["params"]["scale"] + params["params"]["bias"]
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_pointwise_conv2d_is_the_convolution(platform, monkeypatch):
    from blip3o_jax.models import conv_blocks

    monkeypatch.setenv("BLIP3O_TARGET_PLATFORM", platform)
    rs = np.random.RandomState(1)
    x = jnp.asarray(rs.randn(2, 5, 7, 6), jnp.float32)
    conv = conv_blocks.Conv2D(4, 1)
    params = nn.unbox(conv.init(jax.random.key(0), x))
    kernel, bias = params["params"]["kernel"], params["params"]["bias"] + 0.5
    got = conv.apply({"params": {"kernel": kernel, "bias": bias}}, x)
    want = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((0, 0), (0, 0)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
    assert got.shape == (2, 5, 7, 4)
    assert rel_err(got, want) < 1e-6
    hlo = jax.jit(lambda x: conv.apply({"params": {"kernel": kernel, "bias": bias}}, x)).lower(x).as_text()
    assert ("convolution" in hlo) == (platform == "tpu")


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 6, 6, 3)])
def test_upsample2x_conv_is_conv_of_the_nearest_upsample(shape):
    from blip3o_jax.models import conv_blocks

    rs = np.random.RandomState(2)
    x = jnp.asarray(rs.randn(*shape), jnp.float32)
    kernel = jnp.asarray(rs.randn(3, 3, shape[-1], 7), jnp.float32)
    bias = jnp.asarray(rs.randn(7), jnp.float32)
    params = {"params": {"kernel": kernel, "bias": bias}}
    got = conv_blocks.Conv2D(7, 3, upsample_nearest2x=True).apply(params, x)
    up = conv_blocks.nearest_resize(x, (2 * shape[1], 2 * shape[2]))
    want = conv_blocks.Conv2D(7, 3).apply(params, up)
    assert got.shape == (shape[0], 2 * shape[1], 2 * shape[2], 7)
    assert rel_err(got, want) < 1e-6
    # the module path: Upsample2D takes it for an exact x2, and the explicit path for any other size
    up2d = conv_blocks.Upsample2D(7)
    p = {"params": {"conv": params["params"]}}
    assert rel_err(up2d.apply(p, x), want) < 1e-6
    odd = (2 * shape[1] - 1, 2 * shape[2] + 1)
    want_odd = conv_blocks.Conv2D(7, 3).apply(params, conv_blocks.nearest_resize(x, odd))
    assert rel_err(up2d.apply(p, x, odd), want_odd) < 1e-6
    with pytest.raises(ValueError, match="3x3 kernel"):
        conv_blocks.Conv2D(7, 1, upsample_nearest2x=True).init(jax.random.key(0), x)


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_upsample2x_conv_form_per_platform(platform, monkeypatch):
    """Off TPU the four 2x2 phase convolutions (fewer FLOPs); for a TPU program the upsample then the 3x3 conv
    (fewer HBM bytes there): the same values either way."""
    from blip3o_jax.models import conv_blocks

    monkeypatch.setenv("BLIP3O_TARGET_PLATFORM", platform)
    rs = np.random.RandomState(3)
    x = jnp.asarray(rs.randn(2, 4, 3, 5), jnp.float32)
    kernel = jnp.asarray(rs.randn(3, 3, 5, 6), jnp.float32)
    got = conv_blocks.upsample2x_conv(x, kernel, jnp.float32)
    up = conv_blocks.nearest_resize(x, (8, 6))
    want = jax.lax.conv_general_dilated(up, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert rel_err(got, want) < 1e-6
    hlo = jax.jit(lambda x: conv_blocks.upsample2x_conv(x, kernel, jnp.float32)).lower(x).as_text()
    # the phase form convolves the 4 x 5 x 3 input (padded) into 4 x 6 outputs; the other one the 8 x 6 upsample
    assert ("x24xf32>" in hlo) == (platform != "tpu"), platform


def test_sana_linear_attention_cpu_form_matches_the_einsums(monkeypatch):
    from blip3o_jax.models import sana

    rs = np.random.RandomState(3)
    q, k, v = (jnp.asarray(np.maximum(rs.randn(2, 9, 3, 4), 0), jnp.float32) for _ in range(3))
    monkeypatch.setenv("BLIP3O_TARGET_PLATFORM", "tpu")
    want = sana.relu_linear_attention(q, k, v)
    monkeypatch.setenv("BLIP3O_TARGET_PLATFORM", "cpu")
    got = sana.relu_linear_attention(q, k, v)
    assert got.shape == want.shape == (2, 9, 3, 4)
    assert rel_err(got, want) < 1e-6
    assert rel_err(got[0, 0, 0], np.asarray(v[0, :, 0]).T @ (np.asarray(k[0, :, 0]) @ np.asarray(q[0, 0, 0]))
                   / (np.asarray(k[0, :, 0]).sum(0) @ np.asarray(q[0, 0, 0]) + sana.LINEAR_ATTN_EPS)) < 1e-5


def test_gelu_exact_is_torchs_gelu():
    """`layers.gelu_exact` (erf) is torch's exact `F.gelu` and `jax.nn.gelu(approximate=False)` (erfc), values and
    gradients, and keeps the input's dtype; the tanh approximation is not it."""
    import torch

    x = np.linspace(-10, 10, 20001).astype(np.float32)
    ours = np.asarray(layers.gelu_exact(x))
    np.testing.assert_allclose(ours, torch.nn.functional.gelu(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(ours, np.asarray(jax.nn.gelu(x, approximate=False)), rtol=1e-6, atol=2e-6)
    assert np.abs(ours - np.asarray(jax.nn.gelu(x, approximate=True))).max() > 1e-4
    grad = jax.grad(lambda a: layers.gelu_exact(a).sum())(jnp.asarray(x))
    ref = jax.grad(lambda a: jax.nn.gelu(a, approximate=False).sum())(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref), rtol=1e-5, atol=1e-6)
    assert layers.gelu_exact(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16
