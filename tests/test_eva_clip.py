"""EVA-CLIP-E vision tower: parity with a torch reference, conversion, pooling, sharding, bf16.

timm cannot be installed here (it needs torchvision), so the reference is built in this file from torch layers,
following BLIP3o's `eva_clip/eva_vit.py` module tree and attribute names exactly (EVAVisionTransformer ->
patch_embed.proj Conv2d, cls_token, pos_embed, blocks[i].{norm1, attn.{qkv, proj}, norm2, mlp.{fc1, fc2}}),
so its state_dict has the original checkpoint's key names. Details taken from the original: fused qkv with bias
reshaped (B, N, 3, H, D); attention scale head_width**-0.5 with a plain softmax (the xformers kernel computes the
same); nn.GELU() (erf); LayerNorm eps 1e-6; post-norm `x + norm1(attn(x))`; output = all tokens, the
EVAEncoderWrapper then drops CLS. The pooling reference is the original `pool_img` (permute, view, avg_pool2d).
"""
import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blip3o_jax import convert, models, sharding
from blip3o_jax.convert.common import ConversionError
from blip3o_jax.models.eva_clip import EvaClipConfig, pool_grid
from conftest import rel_err  # noqa: E402  (tests/ is on sys.path under pytest)

torch.manual_seed(0)


# ------------------------------------------------------------------------------------------ torch reference


class RefAttention(nn.Module):
    def __init__(self, dim, num_heads, head_dim, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, head_dim * num_heads * 3, bias=qkv_bias)
        self.proj = nn.Linear(head_dim * num_heads, dim)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, num_heads, head_dim, mlp_ratio, postnorm):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, num_heads, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RefMlp(dim, int(dim * mlp_ratio))
        self.postnorm = postnorm

    def forward(self, x):
        if self.postnorm:
            x = x + self.norm1(self.attn(x))
            return x + self.norm2(self.mlp(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class RefEVAVisionTransformer(nn.Module):
    def __init__(self, cfg: EvaClipConfig):
        super().__init__()
        self.patch_embed = RefPatchEmbed(cfg.patch_size, cfg.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.width))
        self.blocks = nn.ModuleList(
            [RefBlock(cfg.width, cfg.num_heads, cfg.head_width, cfg.mlp_ratio, cfg.postnorm) for _ in range(cfg.layers)]
        )

    def forward(self, x):  # (B, 3, H, W) -> (B, N, C) without CLS, as EVAEncoderWrapper
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return x[:, 1:, :]


def ref_pool_img(image_features, stride):
    """BLIP3o `pool_img` (blip3o_arch.py): (B, N, C) -> (B, C, n/stride, n/stride)."""
    num_img, n, c = image_features.shape
    sqrt_n = int(n**0.5)
    image_features = image_features.permute(0, 2, 1).view(num_img, c, sqrt_n, sqrt_n)
    return F.avg_pool2d(image_features, kernel_size=(stride, stride), stride=stride)


def randomize(module, std=0.1):
    """Non-trivial values everywhere (the original initialises cls/pos to zeros and LN to ones). Deep, wide
    stacks want the original's std 0.02: at 0.1 a 12-layer 768-wide tower is chaotic, so fp32 rounding is
    amplified to percent-level differences."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return module


# ------------------------------------------------------------------------------------------ configs, fixtures

# odd grids: 3x3 (image 42, patch 14) and 5x5 (image 35, patch 7); post-norm (the real tower) and pre-norm.
CONFIGS = {
    "postnorm_grid3": EvaClipConfig(image_size=42, patch_size=14, width=64, layers=2, head_width=16,
                                    mlp_ratio=8.571428571428571, pool_stride=1),
    "prenorm_grid5_unrolled": EvaClipConfig(image_size=35, patch_size=7, width=96, layers=3, head_width=32,
                                            mlp_ratio=4.0, postnorm=False, scan_layers=False),
}


def torch_sd_numpy(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


@functools.lru_cache(maxsize=None)
def build_case(name):
    cfg = CONFIGS[name]
    ref = randomize(RefEVAVisionTransformer(cfg)).eval()
    sd = torch_sd_numpy(ref)
    params = convert.from_torch("eva_clip", sd, cfg)
    images = np.random.default_rng(0).normal(size=(2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    return dict(name=name, cfg=cfg, ref=ref, sd=sd, params=params, images=images, want=want)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    return build_case(request.param)


def apply_fn(cfg):
    module = models.build("eva_clip", cfg)
    return jax.jit(lambda p, x: module.apply({"params": p}, x))


# ------------------------------------------------------------------------------------------ tests


def test_parity_fp32(case):
    cfg = case["cfg"]
    got = apply_fn(cfg)(case["params"], jnp.asarray(case["images"]))
    assert got.shape == (2, cfg.num_patches, cfg.width)
    assert rel_err(got, case["want"]) <= 1e-4, rel_err(got, case["want"])


def test_round_trip_and_prefixes(case):
    cfg, sd, params = case["cfg"], case["sd"], case["params"]
    back = convert.to_torch("eva_clip", params, cfg)
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert back[k].shape == sd[k].shape and back[k].dtype == sd[k].dtype
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    again = convert.from_torch("eva_clip", back, cfg)
    jax.tree.map(np.testing.assert_array_equal, again, params)
    # the copy inside a BLIP3o checkpoint, next to the LLM / Qwen ViT / DiT tensors
    blip3o = {"model.gen_vision_tower.vision_tower.model." + k: v for k, v in sd.items()}
    blip3o.update({"model.layers.0.mlp.up_proj.weight": np.zeros(2), "visual.blocks.0.attn.qkv.weight": np.zeros(2),
                   "model.dit.x_embedder.weight": np.zeros(2), "model.latent_queries": np.zeros(2)})
    jax.tree.map(np.testing.assert_array_equal, convert.from_torch("eva_clip", blip3o, cfg), params)
    # BAAI EVA-CLIP layout: `visual.` prefix plus a final norm / head the BLIP3o tower does not use
    baai = {"visual." + k: v for k, v in sd.items()}
    baai.update({"visual.norm.weight": np.ones(cfg.width), "visual.head.weight": np.zeros((8, cfg.width)),
                 "text.token_embedding.weight": np.zeros(3)})
    jax.tree.map(np.testing.assert_array_equal, convert.from_torch("eva_clip", baai, cfg), params)


def test_strict_key_checks(case):
    cfg, sd = case["cfg"], case["sd"]
    with pytest.raises(ConversionError, match=r"unexpected key 'blocks\.0\.attn\.q_bias'"):
        convert.from_torch("eva_clip", {**sd, "blocks.0.attn.q_bias": np.zeros(cfg.width)}, cfg)
    missing = dict(sd)
    del missing["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match=r"missing key 'blocks\.1\.mlp\.fc2\.bias'"):
        convert.from_torch("eva_clip", missing, cfg)
    bad = dict(sd)
    bad["pos_embed"] = np.zeros((1, cfg.num_patches + 2, cfg.width), np.float32)
    with pytest.raises(ConversionError, match=r"'pos_embed' has shape \(1, \d+, \d+\) but the config expects"):
        convert.from_torch("eva_clip", bad, cfg)
    extra_layer = {**sd, **{k.replace("blocks.0.", f"blocks.{cfg.layers}."): v for k, v in sd.items() if k.startswith("blocks.0.")}}
    with pytest.raises(ConversionError, match=f"blocks.{cfg.layers}"):
        convert.from_torch("eva_clip", extra_layer, cfg)


def test_pool_grid_matches_original_pool_img():
    rng = np.random.default_rng(3)
    for grid, stride in ((8, 4), (9, 4), (6, 3)):
        feats = rng.normal(size=(2, grid * grid, 5)).astype(np.float32)
        want = ref_pool_img(torch.from_numpy(feats), stride).numpy().transpose(0, 2, 3, 1)  # channels-last
        got_np = pool_grid(feats, stride)
        got_jax = jax.jit(lambda f: pool_grid(f, stride))(jnp.asarray(feats))
        assert got_np.shape == want.shape == (2, grid // stride, grid // stride, 5)
        np.testing.assert_allclose(got_np, want, atol=1e-6)
        np.testing.assert_allclose(np.asarray(got_jax), want, atol=1e-6)
    with pytest.raises(ValueError, match="square grid"):
        pool_grid(np.zeros((1, 10, 3)), 2)


def test_sharded_equals_unsharded_and_remat():
    case = build_case("postnorm_grid3")  # the scanned, post-norm layout of the real tower
    cfg = dataclasses.replace(case["cfg"], remat=True, remat_policy="dots")
    module = models.build("eva_clip", cfg)
    images = np.random.default_rng(1).normal(size=(4, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    with torch.no_grad():
        want = case["ref"](torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.asarray(images)))["params"]
    p_shard = sharding.params_shardings(abstract, mesh)
    # at least the big matrices must really be split across devices
    assert p_shard["blocks"]["mlp"]["fc1"]["kernel"].spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    params = sharding.shard_params(case["params"], p_shard)
    x_shard = sharding.batch_sharding(mesh, 4)

    def fwd(p, x):
        with sharding.axis_rules():
            return module.apply({"params": p}, x)

    with jax.set_mesh(mesh):
        got = jax.jit(fwd, in_shardings=(p_shard, x_shard), out_shardings=sharding.batch_sharding(mesh, 3))(
            params, jax.device_put(images, x_shard))
    unsharded = apply_fn(case["cfg"])(case["params"], jnp.asarray(images))
    assert rel_err(got, np.asarray(unsharded)) <= 1e-5
    assert rel_err(got, want) <= 1e-4


def test_bf16_inference(case):
    cfg = dataclasses.replace(case["cfg"], dtype="bfloat16", param_dtype="bfloat16")
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), case["params"])
    got = apply_fn(cfg)(params, jnp.asarray(case["images"]))
    assert got.dtype == jnp.bfloat16
    assert rel_err(got, case["want"]) <= 2e-2, rel_err(got, case["want"])


def test_full_size_config_shapes():
    """The released tower, abstractly: (B, 1024, 1792) out, 4.3506B parameters (reference §5.1), 8x8 pooled."""
    import json

    eva_clip_e = {"embed_dim": 1024, "vision_cfg": {"drop_path_rate": 0, "eva_model_name": "eva-clip-E-14-plus",
                  "head_width": 112, "image_size": 448, "layers": 64, "mlp_ratio": 8.571428571428571, "patch_size": 14,
                  "postnorm": True, "qkv_bias": True, "width": 1792, "xattn": True}}
    cfg = models.config_from_hf("eva_clip", json.loads(json.dumps(eva_clip_e)))
    assert cfg == EvaClipConfig()
    assert (cfg.num_heads, cfg.mlp_dim, cfg.num_patches) == (16, 15360, 1024)
    module = models.build("eva_clip", cfg)
    images = jax.ShapeDtypeStruct((2, 448, 448, 3), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
    n_params = sum(np.prod(x.shape) for x in jax.tree.leaves(flax.linen.unbox(variables["params"])))
    per_block = (1792 * 5376 + 5376) + (1792 * 1792 + 1792) + (1792 * 15360 + 15360) + (15360 * 1792 + 1792) + 4 * 1792
    assert per_block == 67_926_784  # reference §5.1: 67.93M
    assert n_params == 64 * per_block + (588 * 1792 + 1792) + 1025 * 1792 + 1792 == 4_350_208_256
    out = jax.eval_shape(lambda v, x: pool_grid(module.apply(v, x), cfg.pool_stride), flax.linen.unbox(variables), images)
    assert out.shape == (2, 8, 8, 1792)
    with pytest.raises(ValueError, match="rope"):
        models.config_from_hf("eva_clip", {"vision_cfg": {**eva_clip_e["vision_cfg"], "rope": True}})


def test_load_pretrained_standalone_tower_file(tmp_path):
    """The layout of jiuhai/eva_clip_vision_tower: a pickled pytorch_model.bin of the bare transformer, next to
    which we put the EVA-CLIP model json as config.json (it has no model_type, so the kind is named)."""
    import json

    from blip3o_jax import pretrained

    case = build_case("postnorm_grid3")
    cfg = case["cfg"]
    vision_cfg = {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "width": cfg.width, "layers": cfg.layers,
                  "head_width": cfg.head_width, "mlp_ratio": cfg.mlp_ratio, "postnorm": True, "qkv_bias": True,
                  "xattn": True, "eva_model_name": "eva-clip-tiny", "pool_stride": 1}
    (tmp_path / "config.json").write_text(json.dumps({"embed_dim": 16, "vision_cfg": vision_cfg}))
    torch.save({k: torch.from_numpy(v) for k, v in case["sd"].items()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="refusing to unpickle"):
        pretrained.load_pretrained(str(tmp_path), kind="eva_clip")
    module, params = pretrained.load_pretrained(str(tmp_path), kind="eva_clip", allow_pickle=True)
    got = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, jnp.asarray(case["images"]))
    assert rel_err(got, case["want"]) <= 1e-4
