"""Building blocks shared by the model files: partitioned dense layers, norms, attention, dtype policy."""
from __future__ import annotations

import os

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from blip3o_jax import kernels

KERNEL_LAYOUTS = ("in_out", "out_in")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name_or_dtype) -> Any:
    if isinstance(name_or_dtype, str):
        if name_or_dtype not in DTYPES:
            raise ValueError(f"unknown dtype {name_or_dtype!r}; expected one of {sorted(DTYPES)}")
        return DTYPES[name_or_dtype]
    return name_or_dtype


def torch_linear_init(fan_in_axes: int = 1):
    """PyTorch's default Linear init (kaiming-uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(fan_in_axes)))


def partitioned(init: Callable, names: Sequence[str | None]):
    # flax rejects a logical name used twice in one array (e.g. a square ("time", "time") kernel): keep the first
    seen, unique = set(), []
    for name in names:
        unique.append(None if name is not None and name in seen else name)
        seen.add(name)
    return nn.with_logical_partitioning(init, tuple(unique))


def target_platform() -> str:
    """The platform the program being traced is for: `BLIP3O_TARGET_PLATFORM` where set (the AOT tools set it when
    they compile for a TPU topology on a CPU host), else jax's default backend. Layout choices only: the math is
    the same on every platform."""
    return os.environ.get("BLIP3O_TARGET_PLATFORM") or jax.default_backend()


# a (rows, in) x (out, in) matmul with at most this many rows runs as (out, in) @ (in, rows) on a CPU (`matmul_out_in`)
SMALL_ROWS = 64


def gelu_exact(x):
    """The exact (erf) GELU as torch's `F.gelu` computes it, `0.5 x (1 + erf(x / sqrt 2))`.

    `jax.nn.gelu(approximate=False)` is the same function through `erfc`, which XLA:CPU evaluates ~2.4x slower than
    `erf` (an EVA MLP's (1028, 3072) activation: 21.7 vs 9.1 ms); the two differ by < 1e-6."""
    x = jnp.asarray(x)
    return 0.5 * x * (1 + jax.lax.erf(x * np.asarray(2 ** -0.5, x.dtype)))


def matmul_out_in(x, weight, precision=None):
    """`x @ weight.T` for a 2-D `x` (rows, in) and a weight in torch's (out, in) layout.

    With few rows (a decode step: one token per sequence) a CPU program computes it as `(weight @ x.T).T`, the
    weight as the matmul's left operand: XLA:CPU then runs a matrix-matrix kernel over the weight's rows that reads
    it at ~1.5-2x the rate of the (rows, in) x (in, out) form, whose few-row GEMM reads 10-14 GB/s against a
    ~27 GB/s stream on our 2-core test machine (docs/benchmarks.md). The barrier keeps XLA's simplifier from folding
    the transpose back into the dot's operands. Other platforms, and many rows, contract the two `in` dims
    directly (as fast as `x @ w_in_out` on XLA:CPU at prefill and training sizes).

    In fp32 with at most `kernels.MAX_ROWS` rows (a decode step's batch) a CPU runs the compiled few-row kernel
    (`blip3o_jax.kernels.few_row_matmul`), which reads the weight at the memory's stream rate, ~1.5x this form's;
    where it cannot be built it falls back to the form above."""
    if x.shape[0] <= SMALL_ROWS and target_platform() == "cpu":
        if x.dtype == weight.dtype and kernels.applies(x.shape[0], x.dtype):
            return kernels.few_row_matmul(x, weight)
        return jax.lax.optimization_barrier(jnp.dot(weight, x.T, precision=precision)).T
    return jax.lax.dot_general(x, weight, (((1,), (1,)), ((), ())), precision=precision)


class Dense(nn.Module):
    """Linear layer whose kernel is (in, out) = torch weight.T, annotated with logical axis names.

    `kernel_layout="out_in"` keeps the weight in torch's (out, in) layout instead, as a parameter named `weight`
    (so that a tree can never be read in the wrong layout): the same numbers transposed, the same init. A decode
    layout for CPUs (`generation.unrolled`; see `matmul_out_in`); training uses the default."""

    features: int
    use_bias: bool = True
    kernel_axes: tuple[str | None, str | None] = ("embed", "mlp")
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = torch_linear_init()
    bias_init: Callable = nn.initializers.zeros
    precision: Any = None
    kernel_layout: str = "in_out"

    @nn.compact
    def __call__(self, x):
        if self.kernel_layout not in KERNEL_LAYOUTS:
            raise ValueError(f"kernel_layout {self.kernel_layout!r}: expected one of {KERNEL_LAYOUTS}")
        out_in = self.kernel_layout == "out_in"
        if out_in:
            init = self.kernel_init
            kernel = self.param("weight", partitioned(lambda key, shape, dtype: init(key, shape[::-1], dtype).T,
                                                      self.kernel_axes[::-1]),
                                (self.features, x.shape[-1]), self.param_dtype)
        else:
            kernel = self.param(
                "kernel", partitioned(self.kernel_init, self.kernel_axes), (x.shape[-1], self.features),
                self.param_dtype)
        # as one 2-D matmul: XLA:CPU runs the backward's weight gradient of a (B, L, D) input (a contraction over
        # two dims) ~1.7x slower than over one merged dim, and a 3-D forward slower too. Merging is a bitcast on
        # CPU and GPU, and on TPU when L is a multiple of the (8|16, 128) tile's rows; there other lengths (EVA's
        # 1025 tokens) stay 3-D
        merge = out_in or (x.ndim > 2 and (x.shape[-2] % 16 == 0 or target_platform() != "tpu"))
        lead = x.shape[:-1]
        x2 = (x.reshape(-1, x.shape[-1]) if merge else x).astype(self.dtype)
        if out_in:
            y = matmul_out_in(x2, kernel.astype(self.dtype), precision=self.precision)
        else:
            y = jnp.dot(x2, kernel.astype(self.dtype), precision=self.precision)
        if merge:
            y = y.reshape(*lead, self.features)
        if self.use_bias:
            bias = self.param("bias", partitioned(self.bias_init, self.kernel_axes[-1:]), (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as transformers' Qwen2RMSNorm), weight named `scale` (torch: `weight`)."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    use_scale: bool = True
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        in_dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if not self.use_scale:
            return x32.astype(self.dtype if self.dtype is not None else in_dtype)
        scale = self.param("scale", partitioned(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],), self.param_dtype)
        # transformers multiplies after casting back to the input dtype
        return (scale.astype(self.dtype) * x32.astype(self.dtype))


class LayerNorm(nn.Module):
    """LayerNorm in fp32 with torch names mapped to `scale`/`bias`."""

    eps: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.use_scale:
            y = y * self.param("scale", partitioned(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],), self.param_dtype).astype(jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", partitioned(nn.initializers.zeros, (self.axis_name,)), (x.shape[-1],), self.param_dtype).astype(jnp.float32)
        return y.astype(self.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Depthwise convolution. XLA:CPU does not lower a convolution with feature_group_count == channels to a fast kernel
# (jax 0.10.2, on SANA's and DC-AE's shapes: 12-40x slower than the shifted sum below, its gradient ~100x), while
# oneDNN's depthwise kernel serves PyTorch. On TPU/GPU XLA's convolution is the fast one: the choice is a config field,
# "auto" (the default) picks by the target platform.

DEPTHWISE_IMPLS = ("auto", "conv", "shifts")


def resolve_depthwise_impl(impl: str) -> str:
    """"auto" -> "shifts" when the program is for a CPU (`target_platform`), else "conv"; others as given."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_impl={impl!r}; expected one of {DEPTHWISE_IMPLS}")
    if impl == "auto":
        return "shifts" if target_platform() == "cpu" else "conv"
    return impl


def _depthwise_padding(padding) -> tuple[tuple[int, int], tuple[int, int]]:
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    try:
        (top, bottom), (left, right) = padding
        pads = ((int(top), int(bottom)), (int(left), int(right)))
    except (TypeError, ValueError):
        expected = "an int or ((top, bottom), (left, right))"
        raise ValueError(f"depthwise_conv2d: padding={padding!r}; expected {expected}") from None
    if min(pads[0] + pads[1]) < 0:
        raise ValueError(f"depthwise_conv2d: padding={padding!r} must not be negative")
    return pads


def _depthwise_windows(x, kernel_hw, stride: int, padding):
    """The kh*kw shifted (and strided) windows of the zero-padded input, each (B, H_out, W_out, C), with their tap
    (i, j): output pixel (r, s) of tap (i, j) reads padded pixel (stride*r + i, stride*s + j)."""
    kh, kw = kernel_hw
    (top, bottom), (left, right) = padding
    b, h, w, c = x.shape
    h_out, w_out = (h + top + bottom - kh) // stride + 1, (w + left + right - kw) // stride + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(f"depthwise_conv2d: a {kh}x{kw} kernel does not fit the padded {h}x{w} input "
                         f"(padding {padding})")
    # the barrier makes every tap read the one padded array: without it XLA rewrites the centre tap to read `x`
    # itself, and then computes `x` (SANA's and DC-AE's SiLU after a 1x1 conv) in two fusions, the pad's and the
    # taps' (measured: SANA's Mix-FFN elementwise work 28 -> 16 ms per block, the step ~4 % faster)
    padded = jax.lax.optimization_barrier(jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0))))
    for i in range(kh):
        for j in range(kw):
            end = (b, i + stride * (h_out - 1) + 1, j + stride * (w_out - 1) + 1, c)
            yield i, j, jax.lax.slice(padded, (0, i, j, 0), end, (1, stride, stride, 1))


def _depthwise_sum(x, kernel, stride: int, padding):
    """sum over taps of window * kernel[i, j, 0]: elementwise work that XLA fuses into one loop over the output;
    accumulated in float32, returned in the inputs' dtype."""
    weights = kernel.astype(jnp.float32)
    out = None
    for i, j, window in _depthwise_windows(x, kernel.shape[:2], stride, padding):
        term = window.astype(jnp.float32) * weights[i, j, 0]
        out = term if out is None else out + term
    return out.astype(jnp.result_type(x, kernel))


def _depthwise_kernel_grad(x, cotangent, kernel_hw, stride: int, padding):
    """d kernel[i, j, 0, c] = sum over (b, r, s) of padded x[b, stride*r + i, stride*s + j, c] * cotangent[b, r, s, c].

    One output row per scan step: the kh*kw products of a row are reduced while its kh input rows are in cache.
    Autodiff of the sum instead emits kh*kw separate whole-array reductions (one pass over x and the cotangent
    each), which XLA:CPU runs ~2x slower."""
    kh, kw = kernel_hw
    (top, bottom), (left, right) = padding
    _, h_out, w_out, c = cotangent.shape
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0))).astype(jnp.float32)
    cotangent = cotangent.astype(jnp.float32)

    def row(acc, r):
        rows = jax.lax.dynamic_slice_in_dim(padded, stride * r, kh, axis=1)  # (B, kh, W_padded, C)
        g = jax.lax.dynamic_index_in_dim(cotangent, r, axis=1, keepdims=False)  # (B, W_out, C)
        taps = [jnp.sum(jax.lax.slice_in_dim(rows[:, i], j, j + stride * (w_out - 1) + 1, stride, axis=1) * g,
                        axis=(0, 1)) for i in range(kh) for j in range(kw)]
        return acc + jnp.stack(taps), None

    acc, _ = jax.lax.scan(row, jnp.zeros((kh * kw, c), jnp.float32), jnp.arange(h_out))
    return acc.reshape(kh, kw, 1, c)


def _depthwise_fwd(x, kernel, stride, padding):
    return _depthwise_sum(x, kernel, stride, padding), (x, kernel)


def _depthwise_bwd(stride, padding, residuals, cotangent):
    x, kernel = residuals
    # the input's gradient is linear in the cotangent: XLA's transpose of the windows (pads of cotangent * weight,
    # summed) is already one fused loop
    _, input_vjp = jax.vjp(lambda x_: _depthwise_sum(x_, kernel, stride, padding), x)
    (dx,) = input_vjp(cotangent)
    dk = _depthwise_kernel_grad(x, cotangent, kernel.shape[:2], stride, padding)
    return dx, dk.astype(kernel.dtype)


_depthwise_shifts = jax.custom_vjp(_depthwise_sum, nondiff_argnums=(2, 3))
_depthwise_shifts.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv2d(x, kernel, *, stride: int = 1, padding):
    """Depthwise 2-D convolution as a sum of kh*kw shifted slices of the padded input times per-channel weights.

    x (B, H, W, C) channels-last; kernel (kh, kw, 1, C), as flax `nn.Conv(features=C, feature_group_count=C)`
    stores it (torch's (C, 1, kh, kw) weight transposed). `padding`: an int (every side) or ((top, bottom),
    (left, right)). Equals `jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=C)` up to float rounding (products summed in
    float32, result in the inputs' dtype), and is elementwise over channels, so a channel-sharded input stays
    sharded. Its gradient is a custom VJP (see `_depthwise_kernel_grad`)."""
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] != x.shape[-1]:
        raise ValueError(f"depthwise_conv2d: input {tuple(x.shape)} and kernel {tuple(kernel.shape)}; expected "
                         f"(B, H, W, C) and (kh, kw, 1, C)")
    if int(stride) < 1:
        raise ValueError(f"depthwise_conv2d: stride={stride} must be >= 1")
    return _depthwise_shifts(x, kernel, int(stride), _depthwise_padding(padding))


class DepthwiseConv(nn.Module):
    """torch `nn.Conv2d(C, C, k, stride, padding, groups=C)` channels-last, with the parameters of the flax
    `nn.Conv(C, (k, k), feature_group_count=C)` it stands in for: `kernel` (k, k, 1, C) and `bias` (C,), the channel
    axis named `axis_name`; C is the input's channel count.

    `impl`: "conv" = XLA's grouped convolution (what nn.Conv computes; fast on TPU/GPU), "shifts" =
    `depthwise_conv2d` (fast on XLA:CPU), "auto" = shifts for a CPU program, else conv (`resolve_depthwise_impl`)."""

    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = True
    impl: str = "auto"
    axis_name: str | None = "mlp"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = torch_linear_init(fan_in_axes=3)
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        impl = resolve_depthwise_impl(self.impl)
        c, k, s = x.shape[-1], self.kernel_size, self.stride
        kernel = self.param("kernel", partitioned(self.kernel_init, (None, None, None, self.axis_name)), (k, k, 1, c),
                            self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        pads = ((self.padding, self.padding), (self.padding, self.padding))
        if impl == "shifts":
            y = depthwise_conv2d(x, kernel, stride=s, padding=pads)
        else:
            y = jax.lax.conv_general_dilated(x, kernel, (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                             feature_group_count=c)
        if self.use_bias:
            bias = self.param("bias", partitioned(self.bias_init, (self.axis_name,)), (c,), self.param_dtype)
            y = y + bias.astype(self.dtype).reshape(1, 1, 1, c)  # as nn.Conv: the "conv" program is unchanged
        return y


def attention(
    query,  # (B, Lq, H, D)
    key,  # (B, Lk, Hkv, D)
    value,  # (B, Lk, Hkv, D)
    *,
    mask=None,  # bool, broadcastable to (B, H, Lq, Lk); True = attend
    is_causal: bool = False,
    scale: float | None = None,
    implementation: str | None = None,
):
    """Scaled dot-product attention via `jax.nn.dot_product_attention` (GQA handled there).

    `implementation`: None/"xla" (portable), "cudnn" (GPU flash attention) or "pallas" (TPU flash attention,
    `pallas_attention`). The xla path computes in fp32 (low-precision inputs are upcast, the result cast back);
    for a CPU program (`target_platform`) it is `_attention_cpu`, the same math arranged for XLA:CPU.
    """
    if implementation == "pallas":
        return pallas_attention(query, key, value, mask=mask, is_causal=is_causal, scale=scale)
    impl = None if implementation in (None, "xla", "auto") else implementation
    if impl is None:
        # portable path: softmax and accumulation in fp32 for parity with torch's SDPA math kernel
        out_dtype = query.dtype
        f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
        if target_platform() == "cpu":
            out = _attention_cpu(f32(query), f32(key), f32(value), mask=mask, is_causal=is_causal, scale=scale)
        else:
            out = jax.nn.dot_product_attention(f32(query), f32(key), f32(value), mask=mask, is_causal=is_causal,
                                               scale=scale)
        return out.astype(out_dtype)
    return jax.nn.dot_product_attention(
        query, key, value, mask=mask, is_causal=is_causal, scale=scale, implementation=impl
    )


# `_attention_cpu` splits the (batch x kv-head) units, or each unit's query rows, into independent blocks of ~4 MB
# of fp32 scores once a call's scores exceed 8 MB (at most 64 blocks)
CPU_ATTENTION_SPLIT_ABOVE = 8 << 20
CPU_ATTENTION_BLOCK_BYTES = 4 << 20
CPU_ATTENTION_MAX_BLOCKS = 64


def _even_chunk(count: int, most: int) -> int:
    """The chunk size that splits `count` items into as few chunks of at most `most` (at least 1) as possible, as
    evenly as possible: 48 at most 15 -> 12 (four chunks of 12, not 15, 15, 15, 3)."""
    chunks = -(-count // max(1, most))
    return -(-count // chunks)


def _attention_cpu(query, key, value, *, mask=None, is_causal: bool = False, scale: float | None = None):
    """`jax.nn.dot_product_attention`'s XLA path (same masking: masked logits set to -0.7 x the dtype's max, so a
    fully masked row attends uniformly), arranged for XLA:CPU: heads-major operands for the two batched matmuls,
    queries pre-scaled, and the softmax's normalisation applied to the (Lq, D) output instead of the (Lq, Lk)
    probabilities (one pass over the scores fewer). On the models' CPU shapes it is ~1.3-1.9x faster than
    `jax.nn.dot_product_attention`; the math is the same up to fp32 rounding.

    Scores larger than `CPU_ATTENTION_SPLIT_ABOVE` are computed in independent blocks of ~`CPU_ATTENTION_BLOCK_BYTES`
    (groups of (batch, kv-head) units, or query rows of one unit): each block's scores stay in the cores' caches
    and XLA:CPU runs blocks on both cores at once. One batched computation over all units ran at about half the
    rate on an AVX-512 host (docs/benchmarks.md: EVA's 4 x 12 heads x 257 tokens 9 -> 6.7 ms, a UNet's
    2 x 5 heads x 1024 tokens 38 -> 26 ms)."""
    b, lq, h, d = query.shape
    lk, hkv = key.shape[1], key.shape[2]
    if h % hkv:
        raise ValueError(f"attention: {h} query heads are not a multiple of {hkv} key/value heads")
    g = h // hkv
    n, rows = b * hkv, g * lq
    scale = d ** -0.5 if scale is None else scale
    q = (query * jnp.asarray(scale, query.dtype)).reshape(b, lq, hkv, g, d).transpose(0, 2, 3, 1, 4)
    q = q.reshape(b, hkv, rows, d)
    k = key.transpose(0, 2, 3, 1)  # (B, Hkv, D, Lk): a heads-major KV cache's layout as it is
    v = value.transpose(0, 2, 1, 3)  # (B, Hkv, Lk, D)
    keep = None  # broadcastable to (B, Hkv, G, Lq, Lk)
    if mask is not None:
        _, m4 = _mask_kind(mask, (b, h, lq, lk))
        m4 = m4.astype(bool)
        heads = m4.shape[1]
        keep = m4.reshape(m4.shape[0], hkv if heads == h else 1, g if heads == h else 1, *m4.shape[2:])
    if is_causal:
        causal = jnp.tril(jnp.ones((lq, lk), bool))
        keep = causal if keep is None else jnp.logical_and(keep, causal)
    masked = jnp.asarray(-0.7 * jnp.finfo(jnp.result_type(q, k)).max, jnp.result_type(q, k))

    def block(q, k, v, keep, groups=None):
        """q (..., rows, D), k (..., D, Lk), v (..., Lk, D); `keep` broadcastable to the scores (..., rows, Lk), or
        with `groups` = (G, Lq) to the scores as (..., G, Lq, Lk)."""
        logits = jnp.matmul(q, k)
        shape = logits.shape
        if keep is not None:
            logits = jnp.where(keep, logits if groups is None else logits.reshape(*shape[:-2], *groups, shape[-1]),
                               masked)
        probs = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
        denom = jnp.sum(probs, axis=-1, keepdims=True)
        return jnp.matmul(probs.reshape(shape), v) / denom.reshape(*shape[:-1], 1)

    total = n * rows * lk * 4
    if total <= CPU_ATTENTION_SPLIT_ABOVE:
        out = block(q, k, v, keep, groups=(g, lq))  # the mask broadcasts as it is
    else:
        q, k, v = q.reshape(n, rows, d), k.reshape(n, d, lk), v.reshape(n, lk, d)
        if keep is not None:  # index math that XLA fuses into each block's `where`
            keep = jnp.broadcast_to(keep, (b, hkv, g, lq, lk)).reshape(n, rows, lk)

        def part(units, span):
            sl = lambda a: a[units[0]:units[1], span[0]:span[1]]  # noqa: E731
            return block(sl(q), k[units[0]:units[1]], v[units[0]:units[1]], None if keep is None else sl(keep))

        budget = max(CPU_ATTENTION_BLOCK_BYTES, -(-total // CPU_ATTENTION_MAX_BLOCKS))
        unit = rows * lk * 4
        if unit <= budget:  # groups of whole units
            per = _even_chunk(n, budget // unit)
            out = jnp.concatenate([part((i, min(i + per, n)), (0, rows)) for i in range(0, n, per)], axis=0)
        else:  # each unit in blocks of query rows
            per = _even_chunk(rows, budget // (lk * 4))
            out = jnp.concatenate([
                jnp.concatenate([part((i, i + 1), (j, min(j + per, rows))) for j in range(0, rows, per)], axis=1)
                for i in range(n)], axis=0)
    return out.reshape(b, hkv, g, lq, d).transpose(0, 3, 1, 2, 4).reshape(b, lq, h, d)


# Set to 1 to run the Pallas kernels in TPU interpret mode (on CPU: slow, for tests); the kernels otherwise lower
# only for TPU.
PALLAS_INTERPRET_ENV = "BLIP3O_PALLAS_INTERPRET"
PALLAS_BLOCK = 128  # the kernel's default tile (q and kv rows): the TPU's lane width


def _pallas_padded(length: int, block: int, *, whole: bool) -> tuple[int, int]:
    """(padded length, tile) along a sequence. Keys: tiles of `block` (the kernel needs key tiles of a multiple of
    128 lanes), the length padded to a multiple. Queries (`whole`): one tile of the whole length up to `block` (a
    tile equal to the array's dimension is always a legal TPU block), else the same as keys."""
    if whole and length <= block:
        return length, length
    return -(-length // block) * block, block


def _mask_kind(mask, shape_bhqk):
    """("none" | "key_padding" | "dense", mask broadcast to 4-D or None) from a boolean mask broadcastable to
    (B, H, Lq, Lk)."""
    if mask is None:
        return "none", None
    mask = jnp.asarray(mask)
    if mask.ndim > 4:
        raise ValueError(f"attention mask must broadcast to (B, H, Lq, Lk) = {shape_bhqk}, got shape {mask.shape}")
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    try:
        jnp.broadcast_shapes(mask.shape, shape_bhqk)
    except ValueError:
        raise ValueError(f"attention mask of shape {mask.shape} does not broadcast to (B, H, Lq, Lk) = "
                         f"{shape_bhqk}") from None
    if mask.shape[1] == 1 and mask.shape[2] == 1:
        return "key_padding", mask
    return "dense", mask


def pallas_attention(query, key, value, *, mask=None, is_causal: bool = False, scale: float | None = None,
                     block: int = PALLAS_BLOCK, interpret: bool | None = None):
    """`attention` with jax's Pallas TPU flash-attention kernel (`jax.experimental.pallas.ops.tpu.flash_attention`:
    blockwise online softmax, fp32 logits, running max/sum and accumulator; custom VJP with its own backward
    kernels). Same arguments and result as `attention` (query (B, Lq, H, D), key/value (B, Lk, Hkv, D)).

    Masks, by kind:
    - none, and `is_causal` (top-left aligned like `jax.nn.dot_product_attention`; needs Lq == Lk): in the kernel,
      causal tiles above the diagonal skipped;
    - a key-padding mask (broadcastable to (B, 1, 1, Lk)): segment ids (queries 1, keys 1 valid / 0 padding), O(L);
    - any other boolean mask (e.g. a causal & padding (B, 1, Lq, Lk) mask, a KV cache's slot mask): an additive
      bias of (B, H, Lq, Lk) fp32 that the kernel reads tile by tile; exact, but it streams Lq x Lk per head from
      HBM (and its backward writes a gradient of that size) like XLA's path: give a key-padding mask with
      `is_causal` where the structure allows.
    Key lengths are padded to a multiple of `block` (a multiple of 128; padded keys masked out through segment
    ids), query lengths over `block` too (padded queries dropped); grouped
    KV heads are repeated to the query heads. Under a mesh (`jax.set_mesh`) the kernel runs per shard
    (`jax.shard_map`) with batch and heads split as the logical axes `activation_batch` / `activation_heads` map
    them; an opaque kernel would otherwise be replicated by the partitioner. `interpret` (default: the
    BLIP3O_PALLAS_INTERPRET environment variable) switches the process to Pallas' TPU interpret mode (on CPU, for
    tests; it stays on for every later Pallas kernel of the process).
    """
    import os

    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    B, Lq, H, D = query.shape
    Lk, Hkv = key.shape[1], key.shape[2]
    if value.shape[-1] != D or key.shape[-1] != D:
        raise ValueError(f"pallas attention needs one head size for queries, keys and values, got {D}, "
                         f"{key.shape[-1]}, {value.shape[-1]}; use implementation='xla'")
    if H % Hkv:
        raise ValueError(f"query heads {H} are not a multiple of key/value heads {Hkv}")
    if is_causal and Lq != Lk:
        raise ValueError(f"pallas attention: is_causal with {Lq} queries and {Lk} keys is ambiguous (the kernel "
                         f"aligns the diagonal top-left); pass the mask instead")
    kind, mask4 = _mask_kind(mask, (B, H, Lq, Lk))
    if interpret is None:
        interpret = os.environ.get(PALLAS_INTERPRET_ENV, "0") not in ("", "0", "false", "False")
    scale = D ** -0.5 if scale is None else float(scale)
    if block % 128:
        raise ValueError(f"pallas attention: block {block} must be a multiple of 128 (the kernel's key tiles)")
    Lq_pad, block_q = _pallas_padded(Lq, block, whole=True)
    Lk_pad, block_k = _pallas_padded(Lk, block, whole=False)

    q_segments = kv_segments = bias = None
    if kind == "key_padding" or (kind == "none" and Lk_pad != Lk):
        valid = jnp.ones((B, Lk), jnp.bool_) if kind == "none" else jnp.broadcast_to(mask4[:, 0, 0, :], (B, Lk))
        kv_segments = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, Lk_pad - Lk)))  # padding: segment 0
        q_segments = jnp.ones((B, Lq_pad), jnp.int32)
    elif kind == "dense":
        bias = jnp.where(jnp.broadcast_to(mask4, (B, H, Lq, Lk)), 0.0, fa.DEFAULT_MASK_VALUE).astype(jnp.float32)
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, Lq_pad - Lq), (0, Lk_pad - Lk)),
                       constant_values=fa.DEFAULT_MASK_VALUE)

    def heads_first(x, length, padded):  # (B, L, h, D) -> (B, H, L_pad, D), kv heads repeated to the query heads
        x = jnp.repeat(x, H // x.shape[2], axis=2) if x.shape[2] != H else x
        return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, padded - length), (0, 0)))

    q, k, v = heads_first(query, Lq, Lq_pad), heads_first(key, Lk, Lk_pad), heads_first(value, Lk, Lk_pad)
    blocks = fa.BlockSizes(block_q=block_q, block_k_major=block_k, block_k=block_k, block_b=1,
                           block_q_major_dkv=block_q, block_k_major_dkv=block_k, block_k_dkv=block_k,
                           block_q_dkv=block_q, block_k_major_dq=block_k, block_k_dq=block_k, block_q_dq=block_q)

    def kernel(q, k, v, bias, q_segments, kv_segments):
        segments = None if q_segments is None else fa.SegmentIds(q=q_segments, kv=kv_segments)
        return fa.flash_attention(q, k, v, bias, segments, causal=is_causal, sm_scale=scale, block_sizes=blocks)

    batch_axes, head_axes = _pallas_mesh_axes(B, H)
    if batch_axes or head_axes:
        from jax.sharding import PartitionSpec as P

        bh, b_ = P(batch_axes, head_axes, None, None), P(batch_axes, None)
        kernel = jax.shard_map(kernel, in_specs=(bh, bh, bh, None if bias is None else bh,
                                                 None if q_segments is None else b_,
                                                 None if kv_segments is None else b_),
                               out_specs=bh, check_vma=False)
    if interpret:
        # process-wide: the backward kernels are traced when the gradient is taken, after this call returns
        pltpu.set_tpu_interpret_mode()
    out = kernel(q, k, v, bias, q_segments, kv_segments)
    return out[:, :, :Lq].transpose(0, 2, 1, 3).astype(query.dtype)


def _pallas_mesh_axes(batch: int, heads: int):
    """(mesh axes of the batch dim, of the heads dim) for the kernel's shard_map under the current mesh and logical
    axis rules (flax `nn.logical_axis_rules`); axes that do not divide the dim are left out (replicated)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None, None
    spec = nn.logical_to_mesh_axes(("activation_batch", "activation_heads"))

    def fit(axes, dim):
        if axes is None:
            return None
        keep, size = [], 1
        for a in (axes,) if isinstance(axes, str) else tuple(axes):
            if a in mesh.shape and dim % (size * mesh.shape[a]) == 0:
                keep.append(a)
                size *= mesh.shape[a]
        return None if not keep else (keep[0] if len(keep) == 1 else tuple(keep))

    return fit(spec[0], batch), fit(spec[1], heads)


def remat_policy(name: str | None):
    """Names a `jax.checkpoint` policy from the config: none | full | dots | dots_no_batch | save_nothing."""
    if name in (None, "none", "minimal", "full", "nothing_saveable", "save_nothing"):
        return jax.checkpoint_policies.nothing_saveable
    table = {
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        "everything": jax.checkpoint_policies.everything_saveable,
    }
    if name not in table:
        raise ValueError(f"unknown remat policy {name!r}; expected none, full, dots, dots_no_batch or everything")
    return table[name]


def repeat_blocks(block, length: int, *module_args, scan: bool, remat: bool = False, remat_policy: str | None = None,
                  n_broadcast: int = 0, in_axes: tuple | None = None, name: str | None = None, **module_kwargs):
    """`length` copies of `block`: one `nn.scan` module (params stacked on a leading "layers" axis, one compiled
    body) when `scan`, else a list (params `<name>_0`, `<name>_1`, ...).

    The block's `__call__(carry, *args)` returns `(carry, per_layer_output or None)`. The extra args are shared by
    every layer (`n_broadcast` of them), or, with `in_axes`, one entry per arg: `nn.broadcast` (shared) or 0 (one
    slice per layer along the leading axis, e.g. a per-layer KV cache). `remat` wraps each block in `nn.remat`
    with the named policy (`remat_policy`). In `setup()` the attribute names the stack; inside an `nn.compact`
    method pass `name` (the scanned module is `name`, the unrolled ones `name_0`, `name_1`, ...).
    Run with `run_blocks` (giving it the same `in_axes`).
    """
    cls = block
    if remat:
        cls = nn.remat(cls, policy=globals()["remat_policy"](remat_policy), prevent_cse=not scan)
    if in_axes is None:
        in_axes = (nn.broadcast,) * n_broadcast
    if scan:
        named = {} if name is None else {"name": name}
        return nn.scan(
            cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=tuple(in_axes),
            length=length,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(*module_args, **named, **module_kwargs)
    if name is None:
        return [cls(*module_args, **module_kwargs) for _ in range(length)]
    return [cls(*module_args, name=f"{name}_{i}", **module_kwargs) for i in range(length)]


def run_blocks(stack, carry, *args, in_axes: tuple | None = None, with_outputs: bool = False):
    """Runs a `repeat_blocks` stack (scanned module or list) over `carry`.

    `in_axes` as given to `repeat_blocks` (only the unrolled list needs it, to slice the per-layer args). Returns
    the final carry, or with `with_outputs` (carry, per-layer outputs stacked on a leading layer axis).
    """
    if isinstance(stack, (list, tuple)):
        outputs = []
        for i, block in enumerate(stack):
            layer_args = [jax.tree.map(lambda a: a[i], arg) if in_axes is not None and in_axes[j] == 0 else arg
                          for j, arg in enumerate(args)]
            carry, out = block(carry, *layer_args)
            outputs.append(out)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *outputs) if with_outputs and outputs else None
    else:
        carry, stacked = stack(carry, *args)
    return (carry, stacked) if with_outputs else carry


def patchify(x, p: int):
    """(B, H, W, C) -> (B, H/p * W/p, p*p*C): non-overlapping p x p patches, tokens row-major, features (ph, pw, C).

    A Conv2d with kernel = stride = p is a matmul over these (its OIHW weight permuted to (ph, pw, C) x O).
    """
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x, p: int, height: int, width: int):
    """(B, L, p*p*C) -> (B, H, W, C): the inverse of `patchify`."""
    b, _, f = x.shape
    c = f // (p * p)
    x = x.reshape(b, height // p, width // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


def normalize_images(images, mean, std):
    """uint8 (..., C) -> float32 (x / 255 - mean) / std, per channel (the image processors' rescale + normalize)."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (jnp.asarray(images).astype(jnp.float32) * jnp.float32(1.0 / 255.0) - mean) / std
