"""Released Qwen backbones of BLIP3-o, with the exact hyper-parameters of their transformers config.json.

BLIP3o-4B / 8B use the text model of Qwen2.5-VL-3B / 7B-Instruct (M-RoPE sections (16, 24, 24),
q/k/v bias); the Qwen3-SigLIP2 branch takes any Qwen3 (run.sh: Qwen3-1.7B). Qwen3 values are those of the
Qwen/Qwen3-* config.json files (head_dim 128, q/k RMSNorm, no bias, max_position_embeddings 40960).

    from blip3o_jax.models import qwen
    cfg = qwen.from_config_dict(get_config("qwen3_1_7b").model)     # -> QwenConfig
    python -m some_cli --config configs/qwen_presets.py:qwen2_5_vl_7b --config.model.policy.dtype=bfloat16

`model.hf` holds transformers field names (read by `qwen.config_from_hf`); `model.policy` our dtype / scan / remat
policy. Vocabulary sizes are those of the base checkpoints; BLIP3-o's released checkpoints resize the embedding to
151668, which their own config.json carries.
"""
import ml_collections

_QWEN25_VL_TEXT = dict(
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    max_position_embeddings=128000,
    hidden_act="silu",
    use_sliding_window=False,
)
_QWEN3 = dict(
    vocab_size=151936,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=40960,
    attention_bias=False,
    hidden_act="silu",
    use_sliding_window=False,
)

PRESETS = {
    "qwen2_5_vl_3b": ("qwen2_5_vl_text", dict(
        _QWEN25_VL_TEXT, vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_5_vl_7b": ("qwen2_5_vl_text", dict(
        _QWEN25_VL_TEXT, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen3_0_6b": ("qwen3", dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True)),
    "qwen3_1_7b": ("qwen3", dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True)),
    "qwen3_4b": ("qwen3", dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)),
    "qwen3_8b": ("qwen3", dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)),
    "qwen3_14b": ("qwen3", dict(_QWEN3, hidden_size=5120, intermediate_size=17408, num_hidden_layers=40,
                                num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False)),
    "qwen3_32b": ("qwen3", dict(_QWEN3, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                                num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False)),
}

# large models: bf16 compute and params, scanned layers rematerialised (what fits an accelerator)
_POLICY = dict(dtype="bfloat16", param_dtype="bfloat16", scan_layers=True, remat=True, remat_policy="dots_no_batch",
               attention_impl="xla")


def get_config(name: str = "qwen2_5_vl_7b"):
    if name not in PRESETS:
        raise ValueError(f"unknown Qwen preset {name!r}; expected one of {sorted(PRESETS)}")
    kind, hf = PRESETS[name]
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.name = name
    c.model.kind = kind
    c.model.hf = dict(hf)
    c.model.policy = dict(_POLICY)
    return c
