"""Qwen language models: parity with transformers, dtype policy, KV/prefix cache, conversion round trip, configs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from blip3o_jax import convert, models
from blip3o_jax.convert.common import ConversionError
from blip3o_jax.models import qwen

from qwen_reference import CONFIGS, padded_batch, reference, text_state_dict
from conftest import rel_err  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture(scope="module")
def converted():
    """name -> (kind, cfg, torch model, our params, directory)."""
    out = {}
    for name in CONFIGS:
        kind, cfg, model, directory = reference(name)
        out[name] = (kind, cfg, model, convert.from_torch(kind, text_state_dict(directory), cfg), directory)
    return out


_FORWARD = {}


def forward_fn(kind, cfg):
    """One jitted forward per config (compile once per module)."""
    key = (kind, cfg)
    if key not in _FORWARD:
        module = models.build(kind, cfg)
        _FORWARD[key] = jax.jit(lambda p, ids, mask, pos: module.apply({"params": p}, ids, mask, pos))
    return _FORWARD[key]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_with_padding(converted, name):
    kind, cfg, model, params, _ = converted[name]
    rng = np.random.RandomState(0)
    # row 0 full, row 1 left-padded, row 2 right-padded
    ids, mask = padded_batch(rng, cfg.vocab_size, [11, 7, 5], 11)
    ids[2], mask[2] = np.roll(ids[2], -6), np.roll(mask[2], -6)
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int32)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
    ours = np.asarray(forward_fn(kind, cfg)(params, ids, mask, positions))
    assert ours.shape == ref.shape and ours.dtype == np.float32
    valid = mask.astype(bool)
    assert rel_err(ours[valid], ref[valid]) <= 1e-4
    # the default positions are the same cumsum rule
    ours_default = np.asarray(jax.jit(models.build(kind, cfg).apply)({"params": params}, ids, mask))
    assert rel_err(ours_default[valid], ref[valid]) <= 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_without_mask(converted, name):
    kind, cfg, model, params, _ = converted[name]
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours = np.asarray(jax.jit(models.build(kind, cfg).apply)({"params": params}, jnp.asarray(ids)))
    assert rel_err(ours, ref) <= 1e-4


@pytest.mark.parametrize("name", ["vl_untied", "vl_tied"])
def test_mrope_3d_positions_match_transformers(converted, name):
    """Distinct temporal/height/width rows (as for image tokens) exercise every mrope_section."""
    kind, cfg, model, params, _ = converted[name]
    rng = np.random.RandomState(2)
    ids = rng.randint(3, cfg.vocab_size, (2, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    positions = np.sort(rng.randint(0, 40, (3, 2, 10)), axis=-1).astype(np.int32)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
    ours = np.asarray(forward_fn(kind, cfg)(params, ids, mask, positions))
    assert rel_err(ours, ref) <= 1e-4
    # and the rows matter: collapsing them to one changes the result
    flat = np.asarray(forward_fn(kind, cfg)(params, ids, mask, np.broadcast_to(positions[:1], positions.shape)))
    assert rel_err(flat, ref) > 1e-3


@pytest.mark.parametrize("name", ["qwen3_untied", "vl_tied"])
def test_precomputed_rope_equals_positions(converted, name):
    """`forward(rope=...)` (what the decode loop passes: cos/sin computed once before the loop) gives the logits of
    `forward(positions=...)`, for plain and M-RoPE positions; cos/sin of other relative positions change them."""
    kind, cfg, _, params, _ = converted[name]
    module = models.build(kind, cfg)
    rng = np.random.RandomState(3)
    ids = jnp.asarray(rng.randint(3, cfg.vocab_size, (2, 7)).astype(np.int32))
    positions = jnp.asarray(np.sort(rng.randint(0, 30, (2, 7)), axis=-1).astype(np.int32))

    def logits(**kw):
        return np.asarray(module.apply({"params": params}, ids, method=module.forward, **kw)[1])

    by_positions = logits(positions=positions)
    np.testing.assert_array_equal(logits(rope=qwen.rope_cos_sin(positions, cfg)), by_positions)
    spread = positions * 3  # not a shift: RoPE sees relative positions only
    assert rel_err(logits(rope=qwen.rope_cos_sin(spread, cfg)), by_positions) > 1e-3


@pytest.mark.parametrize("name", ["qwen3_untied", "vl_tied", "qwen2_untied"])
def test_bf16_compute_close_to_fp32(converted, name):
    kind, cfg, model, params, _ = converted[name]
    ids, mask = padded_batch(np.random.RandomState(3), cfg.vocab_size, [12, 8], 12)
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int32)
    ref = np.asarray(forward_fn(kind, cfg)(params, ids, mask, positions))
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
    params16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    ours = np.asarray(forward_fn(kind, cfg16)(params16, ids, mask, positions))
    assert ours.dtype == np.float32
    valid = mask.astype(bool)
    err = rel_err(ours[valid], ref[valid])
    assert 0 < err <= 2e-2  # > 0: the bf16 path really ran in bf16


def test_prefix_cache_equals_full_sequence(converted):
    """A right-padded prompt cached, then a chunk of query embeddings appended (BLIP3-o's latent queries) ==
    the full sequence in one pass, for hidden states and for gradients w.r.t. the chunk."""
    kind, cfg, _, params, _ = converted["vl_untied"]
    module = models.build(kind, cfg)
    rng = np.random.RandomState(4)
    B, Lp, Q = 2, 7, 5
    prompt, pmask = padded_batch(rng, cfg.vocab_size, [7, 4], Lp, left=False)
    n_valid = pmask.sum(-1)
    queries = jnp.asarray(rng.normal(size=(B, Q, cfg.hidden_size)).astype(np.float32))
    cotangent = jnp.asarray(rng.normal(size=(B, Q, cfg.hidden_size)).astype(np.float32))
    qpos = (n_valid[:, None] + np.arange(Q)[None]).astype(np.int32)
    ppos = np.broadcast_to(np.arange(Lp, dtype=np.int32), (B, Lp))
    variables = {"params": params}

    def cached(q):
        cache = qwen.init_cache(cfg, B, Lp + Q)
        _, _, cache = module.apply(variables, prompt, attention_mask=pmask, positions=ppos, cache=cache,
                                   compute_logits=False, method=module.forward)
        hidden, _, cache = module.apply(variables, inputs_embeds=q, positions=qpos, cache=cache,
                                        compute_logits=False, method=module.forward)
        return jnp.sum(hidden * cotangent), (hidden, cache)

    def full(q):
        embeds = jnp.concatenate([module.apply(variables, prompt, method=module.embed), q], axis=1)
        mask = np.concatenate([pmask, np.ones((B, Q), np.int32)], axis=1)
        hidden, _, _ = module.apply(variables, inputs_embeds=embeds, attention_mask=mask,
                                    positions=np.concatenate([ppos, qpos], 1), compute_logits=False,
                                    method=module.forward)
        return jnp.sum(hidden[:, Lp:] * cotangent), hidden[:, Lp:]

    (_, (h_cached, cache)), g_cached = jax.jit(jax.value_and_grad(cached, has_aux=True))(queries)
    (_, h_full), g_full = jax.jit(jax.value_and_grad(full, has_aux=True))(queries)
    assert int(cache["index"]) == Lp + Q
    np.testing.assert_array_equal(np.asarray(cache["mask"]), np.concatenate([pmask, np.ones((B, Q))], 1).astype(bool))
    assert rel_err(h_cached, np.asarray(h_full)) <= 1e-5
    assert float(jnp.max(jnp.abs(g_cached))) > 0
    assert rel_err(g_cached, np.asarray(g_full)) <= 1e-5

    # and both equal each row run alone with its padding removed (no mask at all)
    @jax.jit
    def alone(prompt_ids, q):
        embeds = jnp.concatenate([module.apply(variables, prompt_ids, method=module.embed), q], axis=1)
        return module.apply(variables, inputs_embeds=embeds, compute_logits=False, method=module.forward)[0]

    for b in range(B):
        n = int(n_valid[b])
        h_row = alone(prompt[b:b + 1, :n], queries[b:b + 1])
        assert rel_err(h_cached[b], np.asarray(h_row[0, n:])) <= 1e-5


@pytest.mark.parametrize("layout", ["config", "unrolled_cpu", "unrolled_gpu"])
def test_incremental_decoding_matches_full_forward(converted, layout, monkeypatch):
    """Prefill a left-padded prompt, then feed tokens one by one: logits equal the full-sequence forward. Also in
    the decode layouts of `generation.unrolled`: per-layer cache buffers, and in a CPU program (out, in) weights
    and heads-major caches."""
    from blip3o_jax.generation import unrolled

    kind, cfg, _, params, _ = converted["qwen3_untied"]
    module = models.build(kind, cfg)
    if layout != "config":
        monkeypatch.setenv("BLIP3O_TARGET_PLATFORM", layout.split("_")[1])
        ref_module, ref_params = module, params
        module, params = unrolled(kind, cfg, params)
        assert module.cfg.kernel_layout == ("out_in" if layout == "unrolled_cpu" else "in_out")
        with pytest.raises(ValueError, match="kernel_layout"):
            dataclasses.replace(cfg, kernel_layout="oi")
        cache = qwen.init_cache(module.cfg, 2, 16)
        assert isinstance(cache["k"], tuple) and len(cache["k"]) == cfg.num_hidden_layers
        K, Dh = cfg.num_key_value_heads, cfg.head_dim
        assert cache["k"][0].shape == ((2, K, Dh, 16) if layout == "unrolled_cpu" else (2, 16, K, Dh))
        # a cache of the other layer layout is refused with a clear error
        with pytest.raises(ValueError, match="init_cache"):
            module.apply({"params": params}, np.ones((2, 3), np.int32), method=module.forward,
                         cache=qwen.init_cache(dataclasses.replace(module.cfg, scan_layers=True), 2, 16))
    rng = np.random.RandomState(5)
    ids, mask = padded_batch(rng, cfg.vocab_size, [9, 5], 12)
    extra = rng.randint(3, cfg.vocab_size, (2, 4)).astype(np.int32)
    full_ids = np.concatenate([ids, extra], 1)
    full_mask = np.concatenate([mask, np.ones_like(extra)], 1)
    if layout == "config":
        ref_module, ref_params = module, params
    ref = np.asarray(jax.jit(ref_module.apply)({"params": ref_params}, full_ids, full_mask))  # cumsum positions
    step = jax.jit(lambda p, tok, m, cache: module.apply({"params": p}, tok, attention_mask=m, cache=cache,
                                                         method=module.forward))
    _, logits, cache = step(params, ids, mask, qwen.init_cache(module.cfg, 2, 16))
    got = [np.asarray(logits)]
    for t in range(extra.shape[1]):  # default positions with a cache: valid keys seen so far
        _, logits, cache = step(params, extra[:, t:t + 1], np.ones((2, 1), np.int32), cache)
        got.append(np.asarray(logits))
    got = np.concatenate(got, 1)
    valid = full_mask.astype(bool)
    assert rel_err(got[valid], ref[valid]) <= 1e-5


def test_unscanned_and_remat_agree_with_scanned(converted):
    kind, cfg, _, params, directory = converted["qwen2_untied"]
    ids, mask = padded_batch(np.random.RandomState(6), cfg.vocab_size, [8, 6], 8)

    def loss(module, p):
        return jnp.sum(module.apply({"params": p}, ids, mask) ** 2)

    ref_loss, ref_grad = jax.jit(jax.value_and_grad(lambda p: loss(models.build(kind, cfg), p)))(params)
    # unscanned: one param subtree per layer, converted by per-layer rules
    cfg_loop = dataclasses.replace(cfg, scan_layers=False)
    params_loop = convert.from_torch(kind, text_state_dict(directory), cfg_loop)
    assert "layers_2" in params_loop and "layers" not in params_loop
    np.testing.assert_allclose(jax.jit(lambda p: loss(models.build(kind, cfg_loop), p))(params_loop), ref_loss, rtol=1e-5)
    for policy in ("dots_no_batch",):
        cfg_remat = dataclasses.replace(cfg, remat=True, remat_policy=policy)
        value, grad = jax.jit(jax.value_and_grad(lambda p: loss(models.build(kind, cfg_remat), p)))(params)
        np.testing.assert_allclose(value, ref_loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
            assert rel_err(a, np.asarray(b)) <= 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_exact(converted, name):
    kind, cfg, _, params, directory = converted[name]
    sd = text_state_dict(directory)  # the layout save_pretrained writes
    back = convert.to_torch(kind, params, cfg)
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_qwen2_5_vl_in_memory_layout_and_vision_keys(converted):
    """transformers 5.x in-memory keys (model.language_model.*, model.visual.*) convert to the same params."""
    kind, cfg, model, params, _ = converted["vl_untied"]
    live = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in live)
    assert any(k.startswith("model.visual.") for k in live)
    again = convert.from_torch(kind, live, cfg)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_tied_checkpoint_with_stored_head(converted):
    kind, cfg, model, params, directory = converted["qwen3_tied"]
    sd = text_state_dict(directory)
    assert "lm_head.weight" not in sd
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].copy()  # identical copy: accepted
    convert.from_torch(kind, sd, cfg)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0
    with pytest.raises(ConversionError, match="lm_head.weight"):
        convert.from_torch(kind, sd, cfg)


def test_strict_conversion_errors_name_the_key(converted):
    kind, cfg, _, _, directory = converted["qwen2_tied"]
    sd = text_state_dict(directory)
    missing = dict(sd)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ConversionError, match=r"missing key 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        convert.from_torch(kind, missing, cfg)
    extra = dict(sd, **{"model.layers.0.mlp.extra.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected key 'model\.layers\.0\.mlp\.extra\.weight'"):
        convert.from_torch(kind, extra, cfg)
    extra_layer = dict(sd, **{"model.layers.2.input_layernorm.weight": np.ones((64,), np.float32)})
    with pytest.raises(ConversionError, match=r"model\.layers\.2\.input_layernorm\.weight"):
        convert.from_torch(kind, extra_layer, cfg)
    bad = dict(sd, **{"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 64), np.float32)})
    with pytest.raises(ConversionError, match=r"k_proj\.weight' has shape \(16, 64\) but the config expects \(32, 64\)"):
        convert.from_torch(kind, bad, cfg)


def test_config_from_hf_variants(converted):
    """Full Qwen2.5-VL config dicts (5.x nested, 4.x flat) and Qwen2/3 dicts give our configs back."""
    for name, (kind, cfg, model, _, _) in converted.items():
        got = models.config_from_hf(kind, model.config.to_dict())
        assert got == cfg, name
    # transformers 4.x Qwen2.5-VL config.json: text fields at the top level, rope_scaling, rope_theta
    flat = {
        "model_type": "qwen2_5_vl", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "max_position_embeddings": 128000, "tie_word_embeddings": False, "use_sliding_window": False,
        "sliding_window": 32768, "hidden_act": "silu", "vision_config": {"depth": 32},
    }
    cfg = models.config_from_hf("qwen2_5_vl_text", flat)
    assert (cfg.head_dim, cfg.mrope_section, cfg.rope_theta, cfg.tie_word_embeddings) == (128, (16, 24, 24), 1e6, False)
    with pytest.raises(ValueError, match="yarn"):
        models.config_from_hf("qwen3", dict(flat, model_type="qwen3", rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="sliding"):
        models.config_from_hf("qwen2", dict(flat, model_type="qwen2", use_sliding_window=True))


def test_presets_have_the_released_sizes():
    from blip3o_jax.cli import load_config

    # (kind, total params, non-embedding params) in billions, as published on the model cards
    expected = {
        "qwen2_5_vl_3b": ("qwen2_5_vl_text", 3.09, None), "qwen2_5_vl_7b": ("qwen2_5_vl_text", 7.62, None),
        "qwen3_0_6b": ("qwen3", 0.6, 0.44), "qwen3_1_7b": ("qwen3", 1.7, 1.4), "qwen3_4b": ("qwen3", 4.0, 3.6),
        "qwen3_8b": ("qwen3", 8.2, 6.95), "qwen3_14b": ("qwen3", 14.8, 13.2), "qwen3_32b": ("qwen3", 32.8, 31.2),
    }
    for name, (kind, total, non_embed) in expected.items():
        got_kind, cfg = qwen.from_config_dict(load_config(f"configs/qwen_presets.py:{name}").model)
        assert got_kind == kind
        assert abs(cfg.num_params / 1e9 - total) / total < 0.02, (name, cfg.num_params)
        if non_embed is not None:
            embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
            assert abs((cfg.num_params - embed) / 1e9 - non_embed) / non_embed < 0.02, name
    # exact numbers of the reference (§1.1) for the BLIP3-o backbones
    _, c7 = qwen.from_config_dict(load_config("configs/qwen_presets.py:qwen2_5_vl_7b").model)
    assert (c7.hidden_size, c7.num_hidden_layers, c7.num_attention_heads, c7.num_key_value_heads,
            c7.intermediate_size, c7.vocab_size, c7.mrope_section) == (3584, 28, 28, 4, 18944, 152064, (16, 24, 24))
    # num_params agrees with the actual parameter tree
    kind, tiny = qwen.from_config_dict(load_config("configs/qwen_tiny.py").model)
    shapes = jax.eval_shape(lambda: models.build(kind, tiny).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)) == tiny.num_params
