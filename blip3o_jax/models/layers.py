"""Building blocks shared by the model files: partitioned dense layers, norms, attention, dtype policy."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

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


class Dense(nn.Module):
    """Linear layer whose kernel is (in, out) = torch weight.T, annotated with logical axis names."""

    features: int
    use_bias: bool = True
    kernel_axes: tuple[str | None, str | None] = ("embed", "mlp")
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = torch_linear_init()
    bias_init: Callable = nn.initializers.zeros
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel", partitioned(self.kernel_init, self.kernel_axes), (x.shape[-1], self.features), self.param_dtype
        )
        # as one 2-D matmul: XLA:CPU runs the backward's weight gradient of a (B, L, D) input (a contraction over
        # two dims) ~1.7x slower than over one merged dim. Merging is a bitcast on CPU and GPU, and on TPU when L
        # is a multiple of the (8|16, 128) tile's rows; other lengths (EVA's 1025 tokens) stay 3-D
        merge = x.ndim > 2 and x.shape[-2] % 16 == 0
        lead = x.shape[:-1]
        y = jnp.dot((x.reshape(-1, x.shape[-1]) if merge else x).astype(self.dtype), kernel.astype(self.dtype),
                    precision=self.precision)
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

    `implementation`: None/"xla" (portable) or "cudnn" (GPU flash attention). Softmax is computed in fp32
    for the xla path by upcasting low-precision inputs' logits inside XLA.
    """
    impl = None if implementation in (None, "xla", "auto") else implementation
    if impl is None:
        # portable path: softmax and accumulation in fp32 for parity with torch's SDPA math kernel
        out_dtype = query.dtype
        f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
        out = jax.nn.dot_product_attention(f32(query), f32(key), f32(value), mask=mask, is_causal=is_causal, scale=scale)
        return out.astype(out_dtype)
    return jax.nn.dot_product_attention(
        query, key, value, mask=mask, is_causal=is_causal, scale=scale, implementation=impl
    )


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
