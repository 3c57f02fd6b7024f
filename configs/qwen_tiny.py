"""Tiny Qwen language models for CPU runs of the CLIs and tests (built on the fly from random weights).

    python -m some_cli --config configs/qwen_tiny.py            # Qwen3-style (q/k norm, head_dim != hidden/heads)
    python -m some_cli --config configs/qwen_tiny.py:qwen2_5_vl_text --config.generate.max_new_tokens=8

Same layout as `configs/qwen_presets.py` (`model.kind`, `model.hf`, `model.policy`), so
`blip3o_jax.models.qwen.from_config_dict(config.model)` builds either.
"""
import ml_collections

_TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=1024,
    hidden_act="silu",
)
_KINDS = {
    "qwen3": dict(_TINY, head_dim=32, rope_theta=10000.0, attention_bias=False, tie_word_embeddings=True),
    "qwen2": dict(_TINY, rope_theta=10000.0, tie_word_embeddings=False),
    "qwen2_5_vl_text": dict(_TINY, rope_theta=10000.0, tie_word_embeddings=False,
                            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
}


def get_config(kind: str = "qwen3"):
    if kind not in _KINDS:
        raise ValueError(f"unknown tiny Qwen kind {kind!r}; expected one of {sorted(_KINDS)}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict()
    c.model.name = f"tiny_{kind}"
    c.model.kind = kind
    c.model.hf = dict(_KINDS[kind])
    # fp32 is faster than bf16 on CPU; unscanned layers are not needed at this size, but keep the production path
    c.model.policy = dict(dtype="float32", param_dtype="float32", scan_layers=True, remat=False, remat_policy="full",
                          attention_impl="xla")
    c.generate = ml_collections.ConfigDict(dict(max_new_tokens=16, temperature=0.0, top_p=1.0))
    return c
