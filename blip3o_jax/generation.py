"""Autoregressive text generation for the Qwen models: prefill into a KV cache, then a jitted `lax.while_loop`.

The whole loop is one compiled function per (model, batch, prompt length, max_new_tokens, greedy or sampling, number
of EOS ids); it stops as soon as every row has produced an EOS. Transformers' eager `generate` pays Python overhead
per token (reference: performance.md, "Decode"); here a step is one XLA call with a preallocated cache.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from blip3o_jax.models import layers
from blip3o_jax.models import qwen


def sample_top_p(logits, rng, temperature, top_p):
    """Temperature + nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`."""
    logits = logits.astype(jnp.float32) / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token: the first one is always kept
    kept = before < top_p
    threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def _compiled_generate(module, max_new_tokens: int, sample: bool):
    """One jitted program per (module, max_new_tokens, greedy/sampling); shapes retrace inside jax.jit as usual.
    EOS/pad ids, temperature and top_p are traced values, so changing them never recompiles."""
    cfg = module.cfg
    cache_dtype = layers.to_dtype(cfg.dtype)

    def select(logits, rng, temperature, top_p):
        if sample:
            return sample_top_p(logits, rng, temperature, top_p)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def run(params, input_ids, attention_mask, inputs_embeds, positions, position_offsets, rng, temperature, top_p,
            eos, pad_token_id):
        variables = {"params": params}
        B, L = attention_mask.shape
        attention_mask = attention_mask.astype(jnp.int32)
        if positions is None:
            positions = qwen.default_positions(attention_mask)
        if position_offsets is None:
            position_offsets = jnp.sum(attention_mask, axis=-1)  # next position after the last real token
        position_offsets = position_offsets.astype(jnp.int32)
        cache = qwen.init_cache(cfg, B, L + max_new_tokens, cache_dtype)
        # prefill: the prompt is left-padded, so column L-1 holds every row's last real token
        hidden, _, cache = module.apply(
            variables, None if inputs_embeds is not None else input_ids, inputs_embeds=inputs_embeds,
            attention_mask=attention_mask, positions=positions, cache=cache, compute_logits=False,
            method=module.forward,
        )
        logits = module.apply(variables, hidden[:, -1:], method=module.lm_logits)[:, 0]
        rng, key = jax.random.split(rng)
        token = select(logits, key, temperature, top_p)
        done = jnp.isin(token, eos)
        tokens = jnp.full((B, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)

        def cond(state):
            step, _, _, _, done, _ = state
            return (step < max_new_tokens) & ~jnp.all(done)

        def body(state):
            step, tokens, cache, last, done, rng = state
            _, logits, cache = module.apply(
                variables, last[:, None], attention_mask=jnp.ones((B, 1), jnp.int32),
                positions=(position_offsets + step - 1)[:, None], cache=cache, method=module.forward,
            )
            rng, key = jax.random.split(rng)
            token = select(logits[:, -1], key, temperature, top_p)
            token = jnp.where(done, pad_token_id, token)  # finished rows emit padding, as transformers does
            tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
            return step + 1, tokens, cache, token, done | jnp.isin(token, eos), rng

        state = (jnp.int32(1), tokens, cache, token, done, rng)
        return jax.lax.while_loop(cond, body, state)[1]

    return jax.jit(run)


def generate(
    module,
    params,
    input_ids,
    attention_mask,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng=None,
    inputs_embeds=None,
    positions=None,
    position_offsets=None,
):
    """New tokens (B, max_new_tokens) int32 for a left-padded batch; rows that hit EOS continue with padding.

    Greedy when `temperature == 0`, else temperature + top-p sampling with `rng`.
    inputs_embeds (B, L, D) replace `input_ids` in the prefill (e.g. with image embeddings spliced in);
    positions (B, L) or (3, B, L) (M-RoPE) default to cumsum(attention_mask) - 1; position_offsets (B,) is the
    position of the first new token (default: the number of real prompt tokens). Decode step t sits at
    position_offsets + t, like transformers' `rope_deltas` for Qwen2.5-VL.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if eos_token_id is None:
        eos_ids: tuple[int, ...] = ()
    elif isinstance(eos_token_id, int):
        eos_ids = (int(eos_token_id),)
    else:
        eos_ids = tuple(int(e) for e in eos_token_id)
    sample = temperature is not None and float(temperature) > 0
    if sample and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng")
    fn = _compiled_generate(module, int(max_new_tokens), sample)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    attention_mask = jnp.asarray(attention_mask)
    return fn(
        params,
        None if input_ids is None else jnp.asarray(input_ids),
        attention_mask,
        None if inputs_embeds is None else jnp.asarray(inputs_embeds),
        None if positions is None else jnp.asarray(positions),
        None if position_offsets is None else jnp.asarray(position_offsets),
        rng,
        jnp.float32(temperature if sample else 1.0),
        jnp.float32(top_p),
        jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32),  # -1 never matches a token
        jnp.int32(pad_token_id),
    )
