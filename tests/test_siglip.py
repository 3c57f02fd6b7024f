"""SigLIP vision tower vs transformers' SiglipVisionModel: both output choices, conversion, sharding, bf16."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import SiglipConfig, SiglipVisionConfig, SiglipVisionModel

from blip3o_jax import convert, models, sharding
from blip3o_jax.convert.common import ConversionError
from conftest import rel_err  # noqa: E402  (tests/ is on sys.path under pytest)

# odd grids: 5x5 (image 40, patch 8) and 3x3 (image 21, patch 7)
HF_CONFIGS = {
    "grid5": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=40,
                  patch_size=8, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "grid3_unrolled": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
                           image_size=21, patch_size=7, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}
CASES = [(name, out) for name in sorted(HF_CONFIGS) for out in ("last", "penultimate")]


@functools.lru_cache(maxsize=None)
def reference(name):
    torch.manual_seed(0)
    hf_cfg = SiglipVisionConfig(**HF_CONFIGS[name])
    hf_cfg._attn_implementation = "eager"
    ref = SiglipVisionModel(hf_cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial norms and biases (HF initialises them to 1 and 0)
        for pname, p in ref.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    images = np.random.default_rng(0).normal(size=(2, hf_cfg.image_size, hf_cfg.image_size, 3)).astype(np.float32)
    with torch.no_grad():
        out = ref(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2), output_hidden_states=True)
    want = {"last": out.last_hidden_state.numpy(), "penultimate": out.hidden_states[-2].numpy()}
    # the published checkpoint layout carries the `vision_model.` level (transformers 5 drops it in memory)
    sd = {"vision_model." + k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
    return hf_cfg, ref, sd, images, want


@functools.lru_cache(maxsize=None)
def build_case(name, output_layer):
    hf_cfg, ref, sd, images, want = reference(name)
    cfg = models.config_from_hf("siglip_vision", {**hf_cfg.to_dict(), "output_layer": output_layer,
                                                  "scan_layers": name != "grid3_unrolled"})
    params = convert.from_torch("siglip_vision", sd, cfg)
    return dict(cfg=cfg, ref=ref, sd=sd, params=params, images=images, want=want[output_layer])


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def case(request):
    return build_case(*request.param)


def apply_fn(cfg):
    module = models.build("siglip_vision", cfg)
    return jax.jit(lambda p, x: module.apply({"params": p}, x))


def test_parity_fp32(case):
    cfg = case["cfg"]
    got = apply_fn(cfg)(case["params"], jnp.asarray(case["images"]))
    assert got.shape == (2, cfg.num_patches, cfg.hidden_size)
    assert rel_err(got, case["want"]) <= 1e-4, rel_err(got, case["want"])


def test_round_trip_and_layouts(case):
    cfg, sd, params = case["cfg"], case["sd"], case["params"]
    back = convert.to_torch("siglip_vision", params, cfg)
    skipped = {k for k in sd if ".head." in k}
    if cfg.output_layer == "penultimate":
        skipped |= {k for k in sd if f"encoder.layers.{cfg.num_hidden_layers - 1}." in k or "post_layernorm" in k}
    assert sorted(back) == sorted(set(sd) - skipped)
    for k, v in back.items():
        assert v.dtype == sd[k].dtype
        np.testing.assert_array_equal(v, sd[k], err_msg=k)
    jax.tree.map(np.testing.assert_array_equal, convert.from_torch("siglip_vision", back, cfg), params)
    # transformers 5 in-memory names (no `vision_model.`), the Qwen3-SigLIP2 and SANA checkpoint prefixes
    for layout in (
        {k[len("vision_model."):]: v for k, v in sd.items()},
        {"model.vision_tower." + k: v for k, v in sd.items()} | {"model.layers.0.mlp.up_proj.weight": np.zeros(1)},
        {"encoder." + k: v for k, v in sd.items()} | {"transformer.proj_out.weight": np.zeros(1)},
        sd | {"text_model.embeddings.token_embedding.weight": np.zeros(1), "logit_scale": np.zeros(1)},
    ):
        jax.tree.map(np.testing.assert_array_equal, convert.from_torch("siglip_vision", layout, cfg), params)


def test_strict_key_checks(case):
    cfg, sd = case["cfg"], case["sd"]
    with pytest.raises(ConversionError, match=r"unexpected key 'vision_model\.embeddings\.patch_embedding\.extra'"):
        convert.from_torch("siglip_vision", {**sd, "vision_model.embeddings.patch_embedding.extra": np.zeros(1)}, cfg)
    missing = dict(sd)
    del missing["vision_model.encoder.layers.0.self_attn.k_proj.bias"]
    with pytest.raises(ConversionError, match=r"missing key 'vision_model\.encoder\.layers\.0\.self_attn\.k_proj\.bias'"):
        convert.from_torch("siglip_vision", missing, cfg)
    bad = {**sd, "vision_model.embeddings.position_embedding.weight": np.zeros((7, cfg.hidden_size), np.float32)}
    with pytest.raises(ConversionError, match=r"position_embedding\.weight' has shape \(7, \d+\) but the config expects"):
        convert.from_torch("siglip_vision", bad, cfg)
    fewer = dataclasses.replace(cfg, num_hidden_layers=cfg.num_hidden_layers - 1 if cfg.num_hidden_layers > 2 else 4)
    with pytest.raises(ConversionError, match="encoder layers but the config says"):
        convert.from_torch("siglip_vision", sd, fewer)


def test_config_from_full_siglip_config():
    hf = SiglipConfig(vision_config=HF_CONFIGS["grid5"], text_config=dict(hidden_size=32, intermediate_size=37,
                      num_hidden_layers=1, num_attention_heads=2)).to_dict()
    cfg = models.config_from_hf("siglip_vision", {**hf, "output_layer": "penultimate"})
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.image_size, cfg.patch_size) == (64, 3, 40, 8)
    assert cfg.output_layer == "penultimate" and cfg.num_layers_run == 2 and cfg.dtype == "float32"
    with pytest.raises(ValueError, match="output_layer"):
        models.config_from_hf("siglip_vision", {**HF_CONFIGS["grid5"], "output_layer": "middle"})
    # so400m-patch16-512 defaults
    default = models.config_from_hf("siglip_vision", {})
    assert (default.num_patches, default.hidden_size, default.num_hidden_layers) == (1024, 1152, 27)


def test_sharded_equals_unsharded():
    case = build_case("grid5", "last")
    cfg = dataclasses.replace(case["cfg"], remat=True)
    module = models.build("siglip_vision", cfg)
    images = np.random.default_rng(1).normal(size=(4, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.asarray(images)))["params"]
    p_shard = sharding.params_shardings(abstract, mesh)
    assert p_shard["encoder"]["layers"]["mlp"]["fc1"]["kernel"].spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    x_shard = sharding.batch_sharding(mesh, 4)

    def fwd(p, x):
        with sharding.axis_rules():
            return module.apply({"params": p}, x)

    with jax.set_mesh(mesh):
        got = jax.jit(fwd, in_shardings=(p_shard, x_shard), out_shardings=sharding.batch_sharding(mesh, 3))(
            sharding.shard_params(case["params"], p_shard), jax.device_put(images, x_shard))
    want = apply_fn(case["cfg"])(case["params"], jnp.asarray(images))
    assert rel_err(got, np.asarray(want)) <= 1e-5


def test_bf16_inference(case):
    cfg = dataclasses.replace(case["cfg"], dtype="bfloat16", param_dtype="bfloat16")
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), case["params"])
    got = apply_fn(cfg)(params, jnp.asarray(case["images"]))
    assert got.dtype == jnp.bfloat16
    assert rel_err(got, case["want"]) <= 2e-2, rel_err(got, case["want"])


@pytest.mark.parametrize("full_model", [False, True], ids=["SiglipVisionModel", "SiglipModel"])
def test_load_pretrained_from_save_pretrained(tmp_path, full_model):
    """A transformers directory (config.json + safetensors) through blip3o_jax.load_pretrained, both the vision
    model alone (model_type siglip_vision_model) and a full SiglipModel (model_type siglip, e.g. siglip2-so400m)."""
    import blip3o_jax
    from transformers import SiglipModel

    hf_cfg, ref, sd, images, want = reference("grid5")
    if full_model:
        full = SiglipModel(SiglipConfig(vision_config=HF_CONFIGS["grid5"], text_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)))
        full.vision_model.load_state_dict(ref.state_dict())
        full.save_pretrained(tmp_path)
    else:
        ref.save_pretrained(tmp_path)
    module, params = blip3o_jax.load_pretrained(str(tmp_path))
    assert module.cfg.output_layer == "last" and module.cfg.num_hidden_layers == 3
    got = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, jnp.asarray(images))
    assert rel_err(got, want["last"]) <= 1e-4
