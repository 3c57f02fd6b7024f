"""Text generation: greedy decoding token-identical to transformers, EOS/padding, sampling, embeddings + M-RoPE."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from blip3o_jax import convert, models, pretrained
from blip3o_jax.models import registry
from blip3o_jax.generation import generate, sample_top_p

from qwen_reference import padded_batch, reference, text_state_dict

NEW_TOKENS = 24
PAD = 0
NAMES = ["qwen2_tied", "qwen3_untied", "vl_untied"]  # one per kind


@pytest.fixture(scope="module")
def models_and_prompts():
    out = {}
    for name in NAMES:
        kind, cfg, model, directory = reference(name)
        params = convert.from_torch(kind, text_state_dict(directory), cfg)
        ids, mask = padded_batch(np.random.RandomState(7), cfg.vocab_size, [5, 9, 12], 12)  # left-padded
        out[name] = (kind, cfg, model, params, ids, mask)
    return out


def hf_generate(model, ids, mask, eos):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                             max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    new = out[:, ids.shape[1]:].numpy()
    padded = np.full((ids.shape[0], NEW_TOKENS), PAD)  # transformers stops early once every row is done
    padded[:, :new.shape[1]] = new
    return padded


@pytest.mark.parametrize("name", NAMES)
def test_greedy_matches_transformers(models_and_prompts, name):
    kind, cfg, model, params, ids, mask = models_and_prompts[name]
    module = models.build(kind, cfg)
    # 1) an EOS id that never comes: 24 tokens in every row
    never = [cfg.vocab_size + 5]
    ours = np.asarray(generate(module, params, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=never,
                               pad_token_id=PAD))
    assert ours.shape == (3, NEW_TOKENS) and ours.dtype == np.int32
    np.testing.assert_array_equal(ours, hf_generate(model, ids, mask, never[0]))
    # 2) EOS = a token row 0 emits at step 4: row 0 stops there (EOS, then padding), other rows may too
    eos = int(ours[0, 4])
    first = int(np.argmax(ours[0] == eos))
    ours_eos = np.asarray(generate(module, params, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[eos],
                                   pad_token_id=PAD))
    np.testing.assert_array_equal(ours_eos, hf_generate(model, ids, mask, eos))
    assert ours_eos[0, first] == eos and np.all(ours_eos[0, first + 1:] == PAD)


def test_inputs_embeds_prefill_matches_ids(models_and_prompts):
    kind, cfg, _, params, ids, mask = models_and_prompts["qwen3_untied"]
    module = models.build(kind, cfg)
    embeds = module.apply({"params": params}, jnp.asarray(ids), method=module.embed)
    by_ids = generate(module, params, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[-5], pad_token_id=PAD)
    by_embeds = generate(module, params, None, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[-5], pad_token_id=PAD,
                         inputs_embeds=embeds)
    np.testing.assert_array_equal(np.asarray(by_ids), np.asarray(by_embeds))


def test_mrope_positions_and_offsets_match_uncached_greedy(models_and_prompts):
    """M-RoPE prefill positions (3, B, L) with distinct rows (an image's t/h/w grid) and a per-row offset for
    the new tokens (transformers' rope_deltas) == greedy decoding by full forwards without a cache."""
    kind, cfg, _, params, ids, mask = models_and_prompts["vl_untied"]
    module = models.build(kind, cfg)
    B, L = ids.shape
    steps = 6
    rng = np.random.RandomState(8)
    positions = np.sort(rng.randint(0, 20, (3, B, L)), axis=-1).astype(np.int32)
    offsets = (positions.max(axis=(0, 2)) + 1 + rng.randint(0, 3, B)).astype(np.int32)
    ours = np.asarray(generate(module, params, ids, mask, max_new_tokens=steps, eos_token_id=None, pad_token_id=PAD,
                               positions=positions, position_offsets=offsets))

    @jax.jit
    def next_token(seq, seq_mask, seq_pos):
        return jnp.argmax(module.apply({"params": params}, seq, seq_mask, seq_pos), axis=-1)

    seq = np.concatenate([ids, np.zeros((B, steps), np.int32)], 1)
    seq_mask = np.concatenate([mask, np.zeros((B, steps), np.int32)], 1)
    step_pos = np.broadcast_to((offsets[:, None] + np.arange(steps))[None], (3, B, steps))
    seq_pos = np.concatenate([positions, step_pos], -1).astype(np.int32)
    for t in range(steps):
        token = np.asarray(next_token(seq, seq_mask, seq_pos))[:, L + t - 1]
        seq[:, L + t], seq_mask[:, L + t] = token, 1
    np.testing.assert_array_equal(ours, seq[:, L:])


def test_sampling(models_and_prompts):
    kind, cfg, _, params, ids, mask = models_and_prompts["qwen2_tied"]
    module = models.build(kind, cfg)
    kw = dict(max_new_tokens=NEW_TOKENS, eos_token_id=[cfg.vocab_size + 5], pad_token_id=PAD)
    greedy = np.asarray(generate(module, params, ids, mask, **kw))
    # a vanishing nucleus keeps only the most likely token: sampling == greedy
    nucleus = generate(module, params, ids, mask, temperature=0.7, top_p=1e-6, rng=jax.random.PRNGKey(1), **kw)
    np.testing.assert_array_equal(np.asarray(nucleus), greedy)
    a = np.asarray(generate(module, params, ids, mask, temperature=1.5, rng=jax.random.PRNGKey(1), **kw))
    b = np.asarray(generate(module, params, ids, mask, temperature=1.5, rng=jax.random.PRNGKey(1), **kw))
    c = np.asarray(generate(module, params, ids, mask, temperature=1.5, rng=jax.random.PRNGKey(2), **kw))
    np.testing.assert_array_equal(a, b)  # a pure function of the rng
    assert not np.array_equal(a, c) and not np.array_equal(a, greedy)
    assert a.min() >= 0 and a.max() < cfg.vocab_size
    with pytest.raises(ValueError, match="rng"):
        generate(module, params, ids, mask, temperature=1.0, **kw)


def test_top_p_keeps_the_nucleus_only():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.5 < 0.7 <= 0.8)
    logits = jnp.log(jnp.asarray([[0.15, 0.5, 0.05, 0.3]]))
    draws = jax.vmap(lambda k: sample_top_p(logits, k, 1.0, 0.7))(jax.random.split(jax.random.PRNGKey(0), 4000))
    counts = np.bincount(np.asarray(draws).ravel(), minlength=4) / 4000
    assert counts[0] == 0 and counts[2] == 0
    np.testing.assert_allclose(counts[[1, 3]], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)


@pytest.mark.parametrize("name", NAMES)
def test_unrolled_decode_layout_same_tokens(models_and_prompts, name):
    """generation.unrolled: the per-layer weight layout decodes to the same tokens as transformers (and so as the
    scanned layout above), and really is unrolled; on a CPU the dense kernels are stored in torch's (out, in)
    layout as `weight`s (the tied head reads the embedding as such: no copy)."""
    from blip3o_jax.generation import unrolled

    kind, cfg, model, params, ids, mask = models_and_prompts[name]
    if not cfg.scan_layers:
        cfg = dataclasses.replace(cfg, scan_layers=True)
        params = pretrained.relayout(params, jax.eval_shape(lambda: models.build(kind, cfg).init(
            jax.random.PRNGKey(0), *registry.get(kind).init_args(cfg)[0]))["params"])
    module, flat = unrolled(kind, cfg, params)
    assert not module.cfg.scan_layers
    paths = ["/".join(str(getattr(k, "key", k)) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(flat)[0]]
    assert any("layers_0/" in p for p in paths) and any(f"layers_{cfg.num_hidden_layers - 1}/" in p for p in paths)
    size = lambda tree: sum(a.size for a in jax.tree.leaves(tree))  # noqa: E731
    assert size(flat) == size(params)
    # this session's backend is the CPU: (out, in) weights, no (in, out) kernel left
    assert module.cfg.kernel_layout == "out_in" and not any(p.endswith("kernel") for p in paths)
    np.testing.assert_array_equal(flat["layers_0"]["mlp"]["down_proj"]["weight"],
                                  np.asarray(params["layers"]["mlp"]["down_proj"]["kernel"][0]).T)
    assert module.cfg.tie_word_embeddings == cfg.tie_word_embeddings
    assert ("lm_head" in flat) == (not cfg.tie_word_embeddings)
    never = [cfg.vocab_size + 5]
    ours = np.asarray(generate(module, flat, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=never,
                               pad_token_id=PAD))
    np.testing.assert_array_equal(ours, hf_generate(model, ids, mask, never[0]))
    # already unrolled: returned as is
    module2, flat2 = unrolled(kind, module.cfg, flat)
    assert flat2 is flat and module2.cfg == module.cfg
