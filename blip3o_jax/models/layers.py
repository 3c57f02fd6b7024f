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
                  n_broadcast: int = 0, **module_kwargs):
    """`length` copies of `block` for a module's `setup()`: one `nn.scan` module (params stacked on a leading
    "layers" axis, one compiled body) when `scan`, else a list (params `<attr>_0`, `<attr>_1`, ...).

    The block's `__call__(carry, *args)` returns `(carry, None)`; the `n_broadcast` extra args are shared by every
    layer. `remat` wraps each block in `nn.remat` with the named policy (`remat_policy`). Run with `run_blocks`.
    """
    cls = block
    if remat:
        cls = nn.remat(cls, policy=globals()["remat_policy"](remat_policy), prevent_cse=not scan)
    if scan:
        return nn.scan(
            cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * n_broadcast,
            length=length,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(*module_args, **module_kwargs)
    return [cls(*module_args, **module_kwargs) for _ in range(length)]


def run_blocks(stack, carry, *args):
    """Runs a `repeat_blocks` stack (scanned module or list) over `carry`."""
    if isinstance(stack, (list, tuple)):
        for block in stack:
            carry, _ = block(carry, *args)
        return carry
    carry, _ = stack(carry, *args)
    return carry
