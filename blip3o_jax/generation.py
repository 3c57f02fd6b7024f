"""Autoregressive text generation for the Qwen models: prefill into a KV cache, then a jitted `lax.while_loop`.

The whole loop is one compiled function per (model, batch, prompt length, max_new_tokens, greedy or sampling, number
of EOS ids); it stops as soon as every row has produced an EOS. Transformers' eager `generate` pays Python overhead
per token; here a step is one XLA call with a preallocated cache.

Also the host side of the full Qwen2.5-VL (`models/qwen2_5_vl.py`): `qwen2_5_vl_logits` and image-to-text
`qwen2_5_vl_generate`, which compute the M-RoPE positions and image slots on the host and run the jitted model.

The jitted functions take the Flax module as a static argument (modules are hashable dataclasses), so JAX's own
cache reuses a compilation for every call with an equal module and equal shapes; nothing else is cached here.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blip3o_jax.models import layers
from blip3o_jax.models import qwen
from blip3o_jax.models import qwen2_5_vl as qvl


def _with_field(cfg, field: str, value):
    """`cfg` with `field=value` in it and in every nested config dataclass that has the field."""
    if not dataclasses.is_dataclass(cfg):
        return cfg
    changes = {f.name: _with_field(getattr(cfg, f.name), field, value) for f in dataclasses.fields(cfg)
               if dataclasses.is_dataclass(getattr(cfg, f.name))}
    if hasattr(cfg, field) and getattr(cfg, field) != value:
        changes[field] = value
    return dataclasses.replace(cfg, **changes) if changes else cfg


def without_scan(cfg):
    """`cfg` with `scan_layers=False` in it and in every nested config dataclass."""
    return _with_field(cfg, "scan_layers", False)


def decode_layout(kind: str, module, params):
    """(module, params) to decode with on this backend: as given on TPU, `unrolled` elsewhere."""
    if jax.default_backend() == "tpu":
        return module, params
    return unrolled(kind, module.cfg, params)


def unrolled(kind: str, cfg, params):
    """(module, params) of registered model `kind` in the unrolled layer layout (`scan_layers=False` throughout):
    the same numbers, one set of weights per layer.

    The layout to decode with outside TPU. In a scanned stack every layer's weights are a dynamic slice of the
    stacked array; XLA:CPU (and GPU) copies that slice out before each matmul, so a decode step, which is bound by
    reading the weights once, reads and writes them three times. The TPU compiler feeds the slice to the matmul
    directly, so there the scanned layout (one compiled layer, faster compiles) costs nothing. Call once after
    loading: the stacked arrays are sliced (copied) here, outside any loop.

    On a CPU the language model's dense kernels are also stored transposed, in torch's (out, in) layout
    (`kernel_layout="out_in"`, parameters named `weight`), and a tied LM head reads the (vocab, hidden) embedding
    as such: a decode step is little else than reading every weight once, and in that layout each product runs on
    the compiled few-row kernel (`blip3o_jax.kernels`, which streams the weight rows at the memory's stream rate),
    or, where that cannot be built, as XLA:CPU's matmul with the weight as the left operand, ~1.5-2x faster than
    as the right one (`layers.matmul_out_in`)."""
    import flax.linen as nn

    from blip3o_jax import models, pretrained
    from blip3o_jax.models import registry

    flat_cfg = without_scan(cfg)
    if layers.target_platform() == "cpu":
        flat_cfg = _with_field(flat_cfg, "kernel_layout", "out_in")
    if flat_cfg == cfg:
        return models.build(kind, cfg), params
    module = models.build(kind, flat_cfg)
    args, kwargs, method = registry.get(kind).init_args(flat_cfg)
    want = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, method=method, **kwargs))["params"]
    want = nn.meta.unbox(want)
    params = _as_out_in(pretrained.relayout(params, _as_in_out(want)), want)
    got = jax.tree.map(lambda a: tuple(a.shape), params)
    if got != jax.tree.map(lambda a: tuple(a.shape), want):
        raise ValueError(f"unrolled({kind!r}): params do not match the config's layout")
    return module, params


def _as_in_out(want):
    """`want` with each `weight` (out, in) named `kernel` again (its shape is not used by `pretrained.relayout`)."""
    if not isinstance(want, dict):
        return want
    return {("kernel" if k == "weight" and "kernel" not in want else k): _as_in_out(v) for k, v in want.items()}


def _as_out_in(params, want):
    """`params` with each dense `kernel` (in, out) that `want` holds as a `weight` (out, in) transposed into it."""
    if not isinstance(want, dict) or not isinstance(params, dict):
        return params
    out = {k: _as_out_in(v, want[k]) if k in want else v for k, v in params.items()}
    if "weight" in want and "weight" not in out and "kernel" in out:
        out["weight"] = jnp.asarray(out.pop("kernel")).T  # eager: a new (out, in) array
    return out


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


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "sample"))
def _generate(module, max_new_tokens: int, sample: bool, params, input_ids, attention_mask, inputs_embeds, positions,
              position_offsets, rng, temperature, top_p, eos, pad_token_id):
    """The prefill and the decode loop, compiled once per (module, max_new_tokens, greedy/sampling) and shapes.
    EOS/pad ids, temperature and top_p are traced values, so changing them never recompiles."""
    cfg = module.cfg
    cache_dtype = layers.to_dtype(cfg.dtype)

    def select(logits, rng, temperature, top_p):
        if sample:
            return sample_top_p(logits, rng, temperature, top_p)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

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

    # RoPE's cos/sin of every decode step, computed once here: inside the loop XLA would fuse their evaluation
    # into each consumer (every layer's q and k, per head)
    step_positions = position_offsets[:, None] + jnp.arange(max_new_tokens, dtype=jnp.int32)[None, :] - 1
    cos_all, sin_all = qwen.rope_cos_sin(step_positions, cfg)  # (B, max_new_tokens, Dh); column 0 is unused

    def cond(state):
        step, _, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tokens, cache, last, done, rng = state
        rope = tuple(jax.lax.dynamic_slice_in_dim(a, step, 1, axis=1) for a in (cos_all, sin_all))
        _, logits, cache = module.apply(
            variables, last[:, None], attention_mask=jnp.ones((B, 1), jnp.int32), rope=rope, cache=cache,
            method=module.forward,
        )
        rng, key = jax.random.split(rng)
        token = select(logits[:, -1], key, temperature, top_p)
        token = jnp.where(done, pad_token_id, token)  # finished rows emit padding, as transformers does
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
        return step + 1, tokens, cache, token, done | jnp.isin(token, eos), rng

    state = (jnp.int32(1), tokens, cache, token, done, rng)
    return jax.lax.while_loop(cond, body, state)[1]


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
    rng = jax.random.PRNGKey(0) if rng is None else rng
    attention_mask = jnp.asarray(attention_mask)
    return _generate(
        module,
        int(max_new_tokens),
        sample,
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


# ----------------------------------------------------------------------------------------------------------------
# Qwen2.5-VL (images in the prompt): logits and image-to-text generation


@functools.partial(jax.jit, static_argnames="module")
def _qwen2_5_vl_apply(module, params, input_ids, attention_mask, positions, pixel_values, vision_layout, image_index):
    return module.apply({"params": params}, input_ids, attention_mask, positions, pixel_values, vision_layout,
                        image_index)


@functools.partial(jax.jit, static_argnames="module")
def _qwen2_5_vl_embed(module, params, input_ids, pixel_values, vision_layout, image_index):
    return module.apply({"params": params}, input_ids, pixel_values, vision_layout, image_index,
                        method=module.embed_inputs)


def qwen2_5_vl_logits(module: qvl.Qwen2_5_VLForConditionalGeneration, params, input_ids, attention_mask=None,
                      pixel_values=None, image_grid_thw=None, **bucket):
    """fp32 logits (B, L, V) for ids (+ images), with positions computed as transformers does; `bucket`
    (num_tokens, num_windows) pads the vision tower (`qwen2_5_vl.prepare_inputs`)."""
    cfg = module.cfg
    attention_mask = np.ones(np.shape(input_ids), np.int32) if attention_mask is None else np.asarray(attention_mask)
    inputs = qvl.prepare_inputs(cfg, input_ids, attention_mask, image_grid_thw, **bucket)
    if pixel_values is not None:
        pixel_values = qvl.pad_pixels(pixel_values, inputs["vision_layout"])
    return _qwen2_5_vl_apply(module, params, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32),
                             inputs["positions"], pixel_values, inputs["vision_layout"], inputs["image_index"])


def qwen2_5_vl_embeddings(module: qvl.Qwen2_5_VLForConditionalGeneration, params, input_ids, pixel_values, inputs):
    """(B, L, D) token embeddings with the image features in the `<|image_pad|>` slots; `inputs` from
    `qwen2_5_vl.prepare_inputs` (pixel rows padded to its vision layout here)."""
    if pixel_values is not None:
        pixel_values = qvl.pad_pixels(pixel_values, inputs["vision_layout"])
    return _qwen2_5_vl_embed(module, params, jnp.asarray(input_ids, jnp.int32), pixel_values, inputs["vision_layout"],
                             inputs["image_index"])


def qwen2_5_vl_generate(module: qvl.Qwen2_5_VLForConditionalGeneration, params, input_ids, attention_mask=None,
                        pixel_values=None, image_grid_thw=None, *, max_new_tokens: int, eos_token_id,
                        pad_token_id: int, temperature: float = 0.0, top_p: float = 1.0, rng=None,
                        num_tokens: int | None = None, num_windows: int | None = None):
    """New tokens (B, max_new_tokens) for left-padded prompts with images (answer a question about an image).

    The prefill sees the spliced embeddings at their M-RoPE positions; decode step s sits at the prompt's last
    position + 1 + s on all three axes (transformers: `rope_deltas` + cache position).
    """
    cfg = module.cfg
    input_ids = np.asarray(input_ids)
    attention_mask = np.ones(input_ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    if not attention_mask[:, -1].all():
        raise ValueError("generate needs left-padded prompts (attention_mask[:, -1] must be 1 for every row)")
    inputs = qvl.prepare_inputs(cfg, input_ids, attention_mask, image_grid_thw, num_tokens=num_tokens,
                                num_windows=num_windows)
    last = inputs["positions"][:, :, -1]  # (3, B)
    if not (last == last[0]).all():
        raise ValueError("generate: a prompt ends with an image token; end it with text (e.g. <|vision_end|>)")
    embeds = qwen2_5_vl_embeddings(module, params, input_ids, pixel_values, inputs)
    text_module = qwen.build("qwen2_5_vl_text", cfg.text)
    return generate(
        text_module, params["language_model"], None, attention_mask, max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, temperature=temperature, top_p=top_p, rng=rng,
        inputs_embeds=embeds, positions=inputs["positions"], position_offsets=last[0] + 1,
    )
