"""The Qwen model on a 2x2x2 (data, fsdp, tensor) mesh of 8 simulated CPU devices: sharded == unsharded, and the
large parameters really are split the way the logical axis rules say."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from blip3o_jax import models, sharding
from blip3o_jax.generation import generate
from blip3o_jax.models import qwen

CFG = qwen.QwenConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, attention_bias=False, qk_norm=True, tie_word_embeddings=False,
    rope_theta=10000.0, initializer_range=0.2,
)
KIND = "qwen3"


@pytest.fixture(scope="module")
def setup():
    assert jax.device_count() == 8, "conftest.py sets 8 simulated devices"
    module = models.build(KIND, CFG)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rng = np.random.RandomState(0)
    ids = rng.randint(1, CFG.vocab_size, (4, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding in one row
    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids))["params"]
    shardings = sharding.params_shardings(abstract, mesh)
    with jax.set_mesh(mesh), sharding.axis_rules():
        params = jax.jit(lambda r: nn.unbox(module.init(r, ids)["params"]), out_shardings=shardings)(
            jax.random.PRNGKey(0))
    host_params = jax.device_get(params)
    return module, mesh, params, host_params, ids, mask


def test_large_params_are_sharded(setup):
    _, mesh, params, _, _, _ = setup
    expected = {
        ("embed_tokens", "embedding"): P("tensor", "fsdp"),  # (vocab, embed)
        ("lm_head", "kernel"): P("fsdp", "tensor"),  # (embed, vocab)
        ("layers", "self_attn", "q_proj", "kernel"): P(None, "fsdp", "tensor"),  # (layers, embed, heads)
        ("layers", "self_attn", "k_proj", "kernel"): P(None, "fsdp", "tensor"),
        ("layers", "self_attn", "o_proj", "kernel"): P(None, "tensor", "fsdp"),
        ("layers", "mlp", "gate_proj", "kernel"): P(None, "fsdp", "tensor"),
        ("layers", "mlp", "down_proj", "kernel"): P(None, "tensor", "fsdp"),
    }
    for path, spec in expected.items():
        leaf = params
        for p in path:
            leaf = leaf[p]
        assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh.shape == mesh.shape
        assert leaf.sharding.spec == spec, path
        # each device holds a quarter: split over fsdp (2) and tensor (2), replicated over data (2)
        shard_shape = leaf.addressable_shards[0].data.shape
        assert np.prod(shard_shape) * 4 == np.prod(leaf.shape), (path, shard_shape, leaf.shape)
    # the norms are small and replicated
    assert params["norm"]["scale"].sharding.is_fully_replicated


def test_sharded_forward_equals_unsharded(setup):
    module, mesh, params, host_params, ids, mask = setup
    one_device = jax.device_put(host_params, jax.devices()[0])
    ref = np.asarray(jax.jit(module.apply)({"params": one_device}, ids, mask))
    with jax.set_mesh(mesh), sharding.axis_rules():
        batch = sharding.batch_sharding(mesh)
        out = jax.jit(module.apply)({"params": params}, jax.device_put(ids, batch), jax.device_put(mask, batch))
        # the logits leave batch-sharded over data x fsdp and vocab-sharded over tensor (activation rules)
        assert out.sharding.spec[0] == ("data", "fsdp") and out.sharding.spec[-1] == "tensor"
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], rtol=0, atol=1e-5 * np.abs(ref).max())


def test_sharded_generation_equals_unsharded(setup):
    module, mesh, params, host_params, ids, mask = setup
    kw = dict(max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    ref = np.asarray(generate(module, jax.device_put(host_params, jax.devices()[0]), ids, mask, **kw))
    with jax.set_mesh(mesh), sharding.axis_rules():
        out = np.asarray(generate(module, params, ids, mask, **kw))
    np.testing.assert_array_equal(out, ref)
