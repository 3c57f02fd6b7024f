"""`attention(..., implementation="pallas")`: jax's Pallas TPU flash-attention kernel
(`jax.experimental.pallas.ops.tpu.flash_attention`), run here in Pallas' TPU interpret mode on CPU
(BLIP3O_PALLAS_INTERPRET=1), against the XLA path (`jax.nn.dot_product_attention` in fp32).

Shapes: GQA (2 query heads over 1 KV head), head size 32, 256 tokens in tiles of 128 keys (two key tiles, so the
online softmax crosses a tile boundary) and 200 tokens (padded to 256 by the wrapper). Tolerances: fp32 1e-5
relative (max|d| / max|ref|; measured ~1e-6), bf16 inputs 2e-2 relative (the kernel multiplies the probabilities,
cast to bf16, with V; the XLA path does everything in fp32).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from blip3o_jax import sharding
from blip3o_jax.models import layers

# the wrapper reads it at call time: every Pallas kernel of this process runs in TPU interpret mode
os.environ[layers.PALLAS_INTERPRET_ENV] = "1"

B, L, H, HKV, D = 2, 256, 2, 1, 32
FP32_TOL, BF16_TOL = 1e-5, 2e-2


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, L, H, D)).astype(np.float32)
    k = rng.standard_normal((B, L, HKV, D)).astype(np.float32)
    v = rng.standard_normal((B, L, HKV, D)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _valid(lengths, n):  # (B, n) key-padding mask: the first lengths[b] keys are real
    return jnp.asarray(np.arange(n)[None, :] < np.asarray(lengths)[:, None])


def _masks(n):
    """The mask kinds our models pass: none, causal, key padding (DiT cross-attention), causal + key padding, and
    a dense (B, 1, L, L) causal & padding mask (what the Qwen backbone builds)."""
    valid = _valid([n, n - 57], n)  # the second sample ends in padding that spans a whole key tile at n=256
    dense = jnp.tril(jnp.ones((n, n), jnp.bool_))[None, None] & valid[:, None, None, :]
    return {
        "none": dict(),
        "causal": dict(is_causal=True),
        "key_padding": dict(mask=valid[:, None, None, :]),
        "causal+key_padding": dict(is_causal=True, mask=valid[:, None, None, :]),
        "dense": dict(mask=dense),
    }


def _compare(q, k, v, kw, dtype):
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    want = layers.attention(q, k, v, implementation="xla", **kw)
    got = layers.attention(q, k, v, implementation="pallas", **kw)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    # every query row of these masks sees at least one key (a fully masked row has no defined result)
    return rel_err(got.astype(jnp.float32), want.astype(jnp.float32))


@pytest.mark.parametrize("kind", list(_masks(L)))
def test_forward_matches_xla_fp32(qkv, kind):
    err = _compare(*qkv, _masks(L)[kind], jnp.float32)
    assert err <= FP32_TOL, f"{kind}: max rel err {err:.2e} > {FP32_TOL}"


@pytest.mark.parametrize("kind", ["causal+key_padding", "dense"])
def test_forward_matches_xla_bf16(qkv, kind):
    err = _compare(*qkv, _masks(L)[kind], jnp.bfloat16)
    assert err <= BF16_TOL, f"{kind}: max rel err {err:.2e} > {BF16_TOL}"


@pytest.mark.parametrize("kind", ["causal", "dense"])
def test_lengths_not_a_multiple_of_the_tile(qkv, kind):
    """200 tokens: the wrapper pads keys to 256 (padded keys masked through segment ids) and queries likewise."""
    q, k, v = (x[:, :200] for x in qkv)
    err = _compare(q, k, v, _masks(200)[kind], jnp.float32)
    assert err <= FP32_TOL, f"{kind}: {err:.2e}"


def test_cross_attention_with_key_padding(qkv):
    """Queries and keys of different lengths (the DiT's cross-attention to the LLM's padded conditions): 64 queries
    in one whole tile, 200 keys."""
    q, k, v = qkv[0][:, :64], qkv[1][:, :200], qkv[2][:, :200]
    mask = _valid([200, 131], 200)[:, None, None, :]
    assert _compare(q, k, v, dict(mask=mask), jnp.float32) <= FP32_TOL


def test_gradients_match_xla(qkv):
    """The kernel's own backward (dq and dkv kernels) against autodiff of the XLA path, causal + key padding."""
    mask = _valid([L, L - 57], L)[:, None, None, :]
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((B, L, H, D)), jnp.float32)

    def loss(impl):
        # padded query rows excluded: their outputs are not used, and the XLA path gives them a uniform average
        row_valid = _valid([L, L - 57], L)[:, :, None, None]
        return lambda q, k, v: jnp.sum(weights * row_valid * layers.attention(
            q, k, v, mask=mask, is_causal=True, implementation=impl))

    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(*qkv)
    got = jax.grad(loss("pallas"), argnums=(0, 1, 2))(*qkv)
    for name, g, w in zip("qkv", got, want):
        err = rel_err(g, w)
        assert err <= FP32_TOL, f"d{name}: {err:.2e}"


def test_sharded_equals_unsharded(qkv):
    """Under a mesh the kernel runs per shard (shard_map over batch on data x fsdp and heads on tensor): same
    result as one device, and the output keeps the batch sharding."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, devices=jax.devices()[:4])
    kw = _masks(L)["causal+key_padding"]
    want = layers.attention(*qkv, implementation="pallas", **kw)
    with jax.set_mesh(mesh), sharding.axis_rules():
        assert layers._pallas_mesh_axes(B, H) == (("data", "fsdp"), "tensor")
        got = jax.jit(lambda q, k, v: layers.attention(q, k, v, implementation="pallas", **kw))(*qkv)
    assert rel_err(got, want) <= FP32_TOL


def test_errors_name_what_is_unsupported(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="is_causal with 64 queries and 256 keys"):
        layers.attention(q[:, :64], k, v, is_causal=True, implementation="pallas")
    with pytest.raises(ValueError, match="multiple of 128"):
        layers.pallas_attention(q, k, v, block=64)
    with pytest.raises(ValueError, match="does not broadcast"):
        layers.attention(q, k, v, mask=jnp.ones((B, 1, 1, 17), jnp.bool_), implementation="pallas")
    with pytest.raises(ValueError, match="one head size"):
        layers.attention(q, k, v[..., :16], implementation="pallas")


def test_qwen_accepts_pallas(monkeypatch):
    """attention_impl="pallas" through a model config: a 2-layer Qwen3-style decoder with left padding (without a
    cache the kernel gets the key padding as segment ids and causality as its flag, no dense bias) equals the XLA
    path on the real tokens, and the padding rows stay finite (they feed the next layer's keys)."""
    from blip3o_jax.models import qwen

    def model(impl):
        cfg = qwen.QwenConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_impl=impl)
        return qwen.QwenForCausalLM(cfg)

    ids = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 24)), jnp.int32)
    attention_mask = jnp.asarray(np.arange(24)[None] >= np.array([[0], [5]]), jnp.int32)
    xla = model("xla")
    params = jax.jit(xla.init)(jax.random.key(0), ids, attention_mask)  # jitted: eager init costs more
    rs = np.random.RandomState(1)  # perturbed on the host (jax.random compiles a sampler per shape)
    params = jax.tree.map(lambda p: jnp.asarray(np.asarray(p) + 0.05 * rs.standard_normal(p.shape), p.dtype), params)
    want = jax.jit(xla.apply)(params, ids, attention_mask)
    seen = []
    kernel = layers.pallas_attention

    def spy(q, k, v, *, mask=None, is_causal=False, **kw):
        seen.append((None if mask is None else mask.shape, is_causal))
        return kernel(q, k, v, mask=mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(layers, "pallas_attention", spy)
    got = jax.jit(model("pallas").apply)(params, ids, attention_mask)
    assert seen == [((2, 1, 1, 24), True)] * 2, seen  # key padding + the causal flag in both layers
    assert np.isfinite(np.asarray(got)).all()
    err = rel_err(got * attention_mask[..., None], want * attention_mask[..., None])
    assert err <= FP32_TOL, err
