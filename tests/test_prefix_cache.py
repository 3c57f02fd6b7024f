"""Prefix-cached latent queries (models/prefix_cache.py) == the full-sequence path: loss and gradients.

The prompt runs once without gradient into a KV cache and only the n_query query tokens run with gradient; with a
frozen backbone this is exact. Checked through the training step's own loss function (training/step.py), in fp32,
for the tiny config (configs/tiny.py) and a mid-sized one (wider, deeper, GQA, longer sequences), on batches with
right padding, prompts of different lengths, a row without a generation target and a padding row. Also: the
prefix path does less work (XLA's FLOP count of the compiled gradient) and `query_path="auto"` picks it exactly
when the backbone is frozen and there is no text loss.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from blip3o_jax import cli
from blip3o_jax import sharding as shd
from blip3o_jax.models import prefix_cache
from blip3o_jax.training import model_setup as ms_lib
from blip3o_jax.training import optimizer as opt_lib
from blip3o_jax.training import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def tiny(query_path: str):
    c = cli.load_config(os.path.join(ROOT, "configs", "tiny.py"))
    c.model.query_path = query_path
    c.data.datasets = [dict(name="x", paths="unused", task="t2i")]
    c.data.global_batch_size = 8
    return c


def mid(query_path: str):
    """4 layers, width 256, 8 query heads over 2 KV heads, 160-token rows, 32 queries, a precomputed 8x8x32 target."""
    c = tiny(query_path)
    c.model.backbone = dict(c.model.backbone.to_dict(), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=32, scan_layers=True)
    c.model.n_query = 32
    c.model.target = "precomputed"
    c.model.dit = dict(input_size=8, patch_size=1, in_channels=32, dim=128, n_layers=2, n_heads=4, n_kv_heads=4,
                       multiple_of=32, norm_eps=1e-5, qk_norm=True)
    c.data.seq_buckets = (160,)
    c.data.n_query = 32
    return c


def make_batch(mcfg, B: int, L: int, seed: int):
    """Right-padded rows: prompt, n_query slots, padding; row B-2 is an understanding row, row B-1 padding."""
    rs = np.random.RandomState(seed)
    nq = mcfg.n_query
    ids = np.zeros((B, L), np.int32)
    mask = np.zeros((B, L), np.int32)
    pos = np.zeros((B, L), np.int32)
    qidx = np.zeros((B, nq), np.int32)
    task = np.zeros((B,), np.int32)
    valid = np.ones((B,), np.int32)
    prompts = rs.randint(1, L - nq + 1, B)
    prompts[0] = L - nq  # a row without padding
    prompts[1] = 1  # a one-token prompt
    for b, n in enumerate(prompts):
        total = n + nq
        ids[b, :total] = rs.randint(3, mcfg.backbone.vocab_size, total)
        mask[b, :total] = 1
        pos[b, :total] = np.arange(total)
        qidx[b] = n + np.arange(nq)
    task[B - 2], qidx[B - 2] = 1, 0  # no generation target: query_index zeros, as the collator writes it
    valid[B - 1] = 0
    g, c = mcfg.target_shape[0], mcfg.target_shape[2]
    batch = {"input_ids": ids, "attention_mask": mask, "positions": pos, "query_index": qidx, "task": task,
             "sample_valid": valid}
    if mcfg.target == "pixels":
        batch["gen_image"] = rs.randint(0, 256, (B, g, g, 3)).astype(np.uint8)
    else:
        batch["targets"] = rs.randn(B, g, g, c).astype(np.float32)
    return batch


def perturbed_params(setup, seed: int):
    """Initial params moved off their init (zero-initialised DiT gates would cut the queries' gradient)."""
    state, frozen = setup.init(jax.random.key(seed))
    params = jax.device_get(opt_lib.merge_params(state.params, frozen))
    rs = np.random.RandomState(seed)
    return jax.tree.map(lambda x: (x + 0.2 * rs.standard_normal(x.shape).astype(x.dtype) * (np.std(x) + 0.1))
                        if np.issubdtype(x.dtype, np.floating) else x, params)


def loss_and_grads(config):
    """jit(value_and_grad) of the step's loss on the trainable groups, for one config; plus the setup."""
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    setup = step_lib.make_train_step(config, mesh)
    trainable = setup.trainable_names

    def f(params, batch, rng):
        def loss(tr):
            all_params = {**params, **tr}
            targets = _targets(setup, all_params, batch)
            aux = setup.loss_fn(all_params, batch, targets, rng)
            return aux["gen_loss_sum"] / jnp.maximum(aux["gen_count"], 1.0), aux
        return jax.value_and_grad(loss, has_aux=True)({k: params[k] for k in trainable})

    return setup, jax.jit(f)


def _targets(setup, params, batch):
    from blip3o_jax.models import blip3o as blip3o_lib

    if setup.model_cfg.target == "precomputed":
        return batch["targets"].astype(jnp.float32)
    return setup.model.apply({"params": params}, batch["gen_image"], method=blip3o_lib.Blip3o.targets)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("make_config", [tiny, mid], ids=["tiny", "mid"])
def test_prefix_cached_loss_and_gradients_equal_full(make_config):
    full_setup, full_fn = loss_and_grads(make_config("full"))
    prefix_setup, prefix_fn = loss_and_grads(make_config("prefix_cache"))
    assert full_setup.model_cfg.query_path == "full" and prefix_setup.model_cfg.query_path == "prefix_cache"
    mcfg = full_setup.model_cfg
    params = perturbed_params(full_setup, seed=1)
    L = max(int(n) for n in make_config("full").data.seq_buckets)
    batch = make_batch(mcfg, 8, L, seed=2)
    rng = jax.random.key(3)

    (loss_f, aux_f), grads_f = full_fn(params, batch, rng)
    (loss_p, aux_p), grads_p = prefix_fn(params, batch, rng)
    assert np.isfinite(float(loss_f)) and float(aux_f["gen_count"]) == 6  # 8 rows - understanding - padding
    assert rel(loss_p, loss_f) <= TOL, (float(loss_p), float(loss_f))
    assert set(grads_f) == {"dit", "latent_queries"}
    q_f, q_p = np.asarray(grads_f["latent_queries"]), np.asarray(grads_p["latent_queries"])
    assert np.max(np.abs(q_f)) > 0  # the queries' gradient crosses the frozen backbone
    assert rel(q_p, q_f) <= TOL
    dit_f, dit_p = jax.tree.leaves(grads_f["dit"]), jax.tree.leaves(grads_p["dit"])
    scale = max(float(np.max(np.abs(g))) for g in dit_f)
    assert rel(np.concatenate([np.ravel(g) for g in dit_p]), np.concatenate([np.ravel(g) for g in dit_f])) <= TOL
    for (path, gf), gp in zip(jax.tree_util.tree_leaves_with_path(grads_f["dit"]), dit_p):
        # per parameter too; a few are exactly zero in exact arithmetic (e.g. the key-norm bias: it shifts every
        # logit of a query equally) and hold float noise, compared against the whole gradient's scale
        leaf_scale = max(float(np.max(np.abs(gf))), 1e-3 * scale)
        assert float(np.max(np.abs(np.asarray(gp) - np.asarray(gf)))) <= TOL * leaf_scale, jax.tree_util.keystr(path)

    # the saving: XLA's FLOP count of the compiled gradient computations (scan bodies are counted once in both)
    flops = [float(fn.lower(params, batch, rng).compile().cost_analysis()["flops"]) for fn in (full_fn, prefix_fn)]
    assert flops[1] < flops[0], flops


def test_auto_query_path_follows_what_trains():
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    frozen = tiny("auto")
    assert ms_lib.model_config(frozen).query_path == "prefix_cache"
    joint = tiny("auto")
    joint.train.freeze_backbone = False
    assert ms_lib.model_config(joint).query_path == "full"
    text = tiny("auto")
    text.train.text_loss_weight = 1.0
    assert ms_lib.model_config(text).query_path == "full"
    assert step_lib.make_train_step(frozen, mesh).model_cfg.query_path == "prefix_cache"


def test_prefix_cache_with_a_trained_backbone_is_refused():
    config = tiny("prefix_cache")
    config.train.freeze_backbone = False
    with pytest.raises(ValueError, match="frozen"):
        ms_lib.model_config(config)


def test_analytic_backbone_saving():
    """(seq 512, 64 queries, the 8B backbone): prompt forward only, queries forward+backward."""
    from blip3o_jax.models import qwen

    bb = qwen.QwenConfig(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, head_dim=128)
    plain = prefix_cache.backbone_flops_per_sample(bb, 512, 64)
    remat = prefix_cache.backbone_flops_per_sample(bb, 512, 64, remat=True)
    # ~ (448 * 27/28 + 2 * 64) / (2 * 512) and (448 * 27/28 + 3 * 64) / (3 * 512): the prompt's last layer only
    # computes keys and values; attention adds a little
    assert 0.53 < plain["ratio"] < 0.57 and 0.39 < remat["ratio"] < 0.42
