"""The kind registry: every registered kind converts, saves and loads back through the one engine, and each
kind has a tiny config here (a new model file without one fails `test_every_kind_is_covered`)."""
import dataclasses
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blip3o_jax
from blip3o_jax import convert, models, pretrained
from blip3o_jax.convert.common import write_safetensors
from blip3o_jax.models import qwen, registry


def _qwen(kind, **kw):
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    if kind == "qwen2_5_vl_text":
        base["mrope_section"] = (1, 1, 2)
    if kind == "qwen3":
        base.update(qk_norm=True, attention_bias=False)
    return lambda: qwen.config_to_hf(kind, qwen.QwenConfig(**{**base, **kw}))


def _qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig

    text = qwen.config_to_hf("qwen2_5_vl_text", qwen.QwenConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, mrope_section=(1, 1, 2)))
    vision = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32, patch_size=4,
                  fullatt_block_indexes=[0], window_size=16)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision).to_dict()


def _diffusers(cls_name, **kw):
    def make():
        import diffusers

        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(getattr(diffusers, cls_name)(**kw).config).items()}
    return make


# kind -> a function returning its tiny config.json dict
TINY = {
    "qwen2": _qwen("qwen2"),
    "qwen3": _qwen("qwen3"),
    "qwen2_5_vl_text": _qwen("qwen2_5_vl_text"),
    "qwen2_5_vl": _qwen2_5_vl,
    "dit": lambda: dict(input_size=4, patch_size=2, in_channels=4, dim=32, n_layers=2, n_heads=2, n_kv_heads=2,
                        multiple_of=16, latent_embedding_size=24),
    "eva_clip": lambda: dict(image_size=16, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=2.0),
    "siglip_vision": lambda: dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=16, patch_size=8, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "qwen2_5_vl_vision": lambda: dict(depth=2, hidden_size=16, num_heads=2, intermediate_size=24, out_hidden_size=20,
                                      patch_size=4, fullatt_block_indexes=[1], window_size=16),
    "unet": _diffusers(
        "UNet2DConditionModel", sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2), cross_attention_dim=16, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=40,
        use_linear_projection=True),
    "autoencoder_kl": _diffusers(
        "AutoencoderKL", block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=16, scaling_factor=0.13025),
    "sana": _diffusers(
        "SanaTransformer2DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4,
        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8,
        caption_channels=16, sample_size=8, patch_size=1, interpolation_scale=None),
    "autoencoder_dc": _diffusers(
        "AutoencoderDC", in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1), downsample_block_type="Conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407),
    "sana_connector": lambda: dict(input_dim=12, output_dim=16, num_pooled_tokens=4),
}
# composites convert through their parts' kinds (tested in test_blip3o.py / test_convert_cli.py)
COMPOSITES = {"blip3o"}


def test_every_kind_is_covered():
    assert set(registry.kinds()) == set(TINY) | COMPOSITES


def test_registry_resolves_names_on_disk():
    assert registry.kind_of_config({"model_type": "qwen3"}) == "qwen3"
    assert registry.kind_of_config({"model_type": "siglip"}) == "siglip_vision"
    assert registry.kind_of_config({"_class_name": "UNet2DConditionModel"}) == "unet"
    assert registry.kind_of_config({"_class_name": "AutoencoderKL"}) == "autoencoder_kl"
    assert registry.kind_of_config({"model_type": "llama"}) is None
    with pytest.raises(ValueError, match="unknown model kind 'nope'"):
        models.build("nope", None)


def _random_like(x, rng):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.asarray(rng.normal(size=x.shape), x.dtype)
    return x


@pytest.mark.parametrize("kind", sorted(TINY))
def test_convert_then_load_pretrained_gives_the_same_model(kind, tmp_path):
    """A kind's weights written in its upstream layout -> convert_checkpoint -> load_pretrained: same params, same
    outputs (this failed for `dit` before the engine: two `expected_shapes` signatures)."""
    hf = TINY[kind]()
    cfg = models.config_from_hf(kind, hf)
    module = models.build(kind, cfg)
    args, kwargs, method = registry.get(kind).init_args(cfg)
    rng = np.random.default_rng(0)
    args = jax.tree.map(lambda x: _random_like(x, rng), args)
    kwargs = jax.tree.map(lambda x: _random_like(x, rng), kwargs)
    # params: random values of the init's shapes, drawn on the host (a jitted init is a compile as costly as the
    # apply's); the apply is jitted (eager, op by op, the conv models cost more than its compile)
    init = lambda a, kw: module.init(jax.random.PRNGKey(1), *a, method=method, **kw)  # noqa: E731
    abstract = jax.eval_shape(init, args, kwargs)
    variables = jax.jit(init)(args, kwargs) if set(abstract) != {"params"} else {}  # other collections: real values
    params = jax.tree.map(lambda p: jnp.asarray(0.1 * rng.normal(size=p.shape), p.dtype),
                          flax.linen.unbox(abstract["params"]))
    state_dict = convert.to_torch(kind, params, cfg)

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(hf))
    write_safetensors(state_dict, str(src / ("diffusion_pytorch_model.safetensors" if "_class_name" in hf
                                            else "model.safetensors")))
    assert pretrained.convert_checkpoint(str(src), str(dst), kind=kind, progress=False) == kind
    extra = {k: v for k, v in variables.items() if k != "params"}
    apply = jax.jit(lambda m, p, a, kw: m.apply({"params": p, **extra}, *a, method=method, **kw), static_argnums=0)
    for path in (str(dst), str(src)):
        loaded_module, loaded = blip3o_jax.load_pretrained(path, kind=kind if path == str(src) else None)
        jax.tree.map(np.testing.assert_array_equal, loaded, params)
        jax.tree.map(np.testing.assert_array_equal, apply(loaded_module, loaded, args, kwargs),
                     apply(module, params, args, kwargs))
