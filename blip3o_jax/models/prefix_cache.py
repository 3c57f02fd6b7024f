"""Exact latent-query states without the prompt's backward pass (BLIP3-o with a frozen backbone).

In a text-to-image row the `n_query` latent queries sit *after* the prompt (chat prompt, [IMG],
64 query slots, padding) in a causal LM, so the prompt's hidden states, and its per-layer keys and values, do not
depend on the queries. With a frozen backbone the only gradient the backbone has to carry is the one reaching the
queries, and it never flows through the prompt's positions. So:

1. run the prompt once, outside the gradient, writing its per-layer K/V into a KV cache (`models/qwen.py`);
2. run only the `n_query` query embeddings with gradient, at their own positions, attending to that cache and
   causally to each other.

The query states equal the full-sequence pass (same keys, same values, same positions, same mask; only the order
of floating-point sums inside the attention may differ), and so do the loss and every gradient of the queries and
the DiT. What disappears is the backward (and any rematerialisation) over the prompt: per sample the backbone
costs forward(L_prompt) + ~2-3 x forward(n_query) instead of ~2-3 x forward(L).

Static shapes: the prompt chunk is the first `L - n_query` tokens of the row for every row (a row's prompt plus
its `n_query` slots fit in L, so its prompt fits in L - n_query); slots at or after a row's first query slot are
masked out as keys. Assumes the data's layout: `query_index[b] = prompt_length[b] + arange(n_query)` (contiguous
slots right after the prompt; `blip3o_jax/data/transforms.py`).

Only valid when the backbone receives no gradient of its own (the prompt's K/V are constants here): the training
step chooses this path for a frozen backbone without a text loss (`query_path="auto"`, training/step.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from blip3o_jax.models import layers
from blip3o_jax.models import qwen as qwen_lib


def take_positions(positions, index):
    """positions (B, L) or (3, B, L) (M-RoPE) at `index` (B, n) along the sequence axis."""
    index = index.astype(jnp.int32)
    if positions.ndim == 3:
        return jnp.take_along_axis(positions, jnp.broadcast_to(index[None], (positions.shape[0], *index.shape)),
                                   axis=-1)
    return jnp.take_along_axis(positions, index, axis=-1)


def prompt_cache(model, input_ids, attention_mask, positions, query_start):
    """The prompt's per-layer K/V (a qwen KV cache with L slots, the first L - n_query filled), no gradient.

    model: a bound `Blip3o`; query_start (B,): index of each row's first query slot (its prompt length).
    """
    cfg = model.cfg
    B, L = input_ids.shape
    prompt_len = L - cfg.n_query  # static; every row's prompt fits (see the module docstring)
    if prompt_len < 0:
        raise ValueError(f"sequence length {L} is shorter than n_query={cfg.n_query}")
    slot = jnp.arange(prompt_len)[None, :]
    prompt_valid = (slot < query_start[:, None]) & (attention_mask[:, :prompt_len] > 0)
    cache = qwen_lib.init_cache(cfg.backbone, B, L, dtype=layers.to_dtype(cfg.backbone.dtype))
    if prompt_len:
        _, _, cache = model.backbone.forward(
            input_ids[:, :prompt_len], attention_mask=prompt_valid.astype(jnp.int32),
            positions=positions[..., :prompt_len], cache=cache, compute_logits=False,
        )
    # constants for the rest of the step: the queries cannot influence them (causal LM), and the backbone is frozen
    return jax.lax.stop_gradient(cache)


def encode_queries(model, input_ids, attention_mask, positions, query_index):
    """Query states (B, n_query, D) after the final norm, equal to `Blip3o.encode` on the full sequence.

    Call inside `model.apply(..., method=encode_queries)` or from a method of the bound `Blip3o`.
    """
    B = input_ids.shape[0]
    cache = prompt_cache(model, input_ids, attention_mask, positions, query_index[:, 0])
    queries = model.query_embeddings(B)  # (B, n_query, D), carries the gradient
    hidden, _, _ = model.backbone.forward(
        inputs_embeds=queries, positions=take_positions(positions, query_index), cache=cache, compute_logits=False,
    )
    return hidden


def backbone_flops_per_sample(bb: qwen_lib.QwenConfig, seq_len: int, n_query: int, *, remat: bool = False) -> dict:
    """Analytic backbone FLOPs per sample of the two query paths (frozen backbone, no LM head).

    full: forward over `seq_len` tokens + backward for activation gradients (~1x forward: dX only, no dW),
    + one more forward with rematerialisation. prefix_cache: forward over the `seq_len - n_query` prompt
    tokens, then the same forward/backward(/recompute) over the `n_query` query tokens attending to `seq_len` keys.
    Causal attention is charged for the keys each token actually sees. The prompt pass needs only the keys and
    values of its last layer (that layer's queries, attention, output projection and MLP over the prompt feed
    nothing; XLA removes them as dead code): not counted.
    """
    D, H, K, Dh, F = (bb.hidden_size, bb.num_attention_heads, bb.num_key_value_heads, bb.head_dim,
                      bb.intermediate_size)
    dense = 2 * (D * H * Dh * 2 + D * K * Dh * 2 + 3 * D * F)
    kv = 2 * D * K * Dh * 2

    def fwd(new_tokens: int, context_start: int, layers: int = bb.num_hidden_layers) -> float:
        # tokens context_start .. context_start + new_tokens - 1, each attending to (its index + 1) keys
        keys = new_tokens * context_start + new_tokens * (new_tokens + 1) / 2
        return layers * (new_tokens * dense + 2 * 2 * H * Dh * keys)

    passes = 3 if remat else 2
    prompt = seq_len - n_query
    full = passes * fwd(seq_len, 0)
    prompt_pass = fwd(prompt, 0, bb.num_hidden_layers - 1) + prompt * kv
    prefix = prompt_pass + passes * fwd(n_query, prompt)
    return {"full": full, "prefix_cache": prefix, "ratio": prefix / full}
