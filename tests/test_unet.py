"""UNet parity against diffusers 0.42.1 `UNet2DConditionModel` (SDXL family), weight conversion, sharding.

Tiny random diffusers models built from constructor kwargs, every parameter moved off its init, fp32; our
channels-last module gets the converted state dict. Per block (resnet, Transformer2DModel, down block, time + add
embedding) and per model on three configs: 2 levels with text_time at 17x17; 3 levels with a mid block at 18x18
(both odd at some level, so the upsamplers get the skip's size); conv projection, no mid block, no added
embedding, unscanned blocks, non-square 16x12.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from jax.sharding import PartitionSpec as P

from blip3o_jax import convert, models, sharding
from blip3o_jax.convert import common as convert_common
from blip3o_jax.convert.common import ConversionError
from blip3o_jax.models import conv_blocks
from blip3o_jax.models import unet as unet_lib
from conftest import rel_err  # noqa: E402  (tests/ is on sys.path under pytest)

torch.set_num_threads(2)

# name -> (diffusers kwargs, our policy overrides, latent (H, W), batch)
CONFIGS = {
    # 2 levels, SDXL-style text_time, transformer_layers_per_block (1, 2), odd latent: 17 -> 9, up 9 -> 17
    "two_level": (dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                       transformer_layers_per_block=(1, 2), cross_attention_dim=32, norm_num_groups=8,
                       addition_embed_type="text_time", addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=80, use_linear_projection=True, flip_sin_to_cos=True,
                       freq_shift=0),
                  {}, (17, 17), 8),
    # the Emu2-Gen layout shrunk: 3 levels, mid block (the last transformer_layers entry), 18 -> 9 -> 5, up 5 -> 9
    "emu2_shaped": (dict(block_out_channels=(16, 32, 64), layers_per_block=2,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                         mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=(1, 2, 4),
                         transformer_layers_per_block=(1, 1, 2), cross_attention_dim=24, norm_num_groups=8,
                         addition_embed_type="text_time", addition_time_embed_dim=4,
                         projection_class_embeddings_input_dim=48, use_linear_projection=True, sample_size=16),
                    {}, (18, 18), 2),
    # 1x1-conv proj_in/out, no mid block, no added embedding, per-level layers, 3 blocks per attention unrolled
    "conv_proj": (dict(block_out_channels=(16, 32), layers_per_block=(1, 2),
                       down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), mid_block_type=None,
                       attention_head_dim=2, transformer_layers_per_block=(3, 1), cross_attention_dim=12,
                       norm_num_groups=4, use_linear_projection=False, flip_sin_to_cos=False, freq_shift=1,
                       sample_size=16),
                  {"scan_layers": False}, (16, 12), 2),
}


def nhwc(t: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def make_reference(kwargs: dict, seed: int = 0) -> TorchUNet:
    """A diffusers UNet with every parameter moved off its init (zero-init biases would hide a wrong path)."""
    torch.manual_seed(seed)
    ref = TorchUNet(**kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref


def make_inputs(ref: TorchUNet, size, batch: int, seed: int = 1):
    c = ref.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c.in_channels, *size, generator=g)
    ehs = torch.randn(batch, 5, c.cross_attention_dim, generator=g)
    added = {}
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        added = {"text_embeds": torch.randn(batch, pooled, generator=g),
                 # original size, crop, target size: large distinct floats as SDXL's (1024, 1024, 0, 0, 1024, 1024)
                 "time_ids": torch.rand(batch, 6, generator=g) * 1024}
    return x, ehs, added


class Case:
    """A reference UNet, our converted params and both forwards on one set of inputs."""

    def __init__(self, name: str, seed: int = 0):
        kwargs, ours, size, batch = CONFIGS[name]
        self.ref = make_reference(kwargs, seed)
        self.state_dict = {k: v.detach().numpy().copy() for k, v in self.ref.state_dict().items()}
        self.cfg = models.config_from_hf("unet", {**dict(self.ref.config), **ours})
        self.params = convert.from_torch("unet", self.state_dict, self.cfg)
        self.x, self.ehs, self.added = make_inputs(self.ref, size, batch)
        # two_level: one scalar timestep for the batch; the others: one per sample
        self.t = torch.tensor(981.0) if name == "two_level" else torch.linspace(1.0, 999.0, batch)
        with torch.no_grad():
            self.want = self.ref(self.x, self.t, self.ehs, added_cond_kwargs=self.added or None).sample.numpy()
        self._out = None

    def jax_inputs(self):
        kwargs = {k: jnp.asarray(v.numpy()) for k, v in self.added.items()}
        return (nhwc(self.x), jnp.asarray(self.t.numpy()), jnp.asarray(self.ehs.numpy())), kwargs

    def run(self, cfg=None, params=None):
        """Our forward (NCHW numpy); the default-config result is computed once and reused."""
        if cfg is None and self._out is not None:
            return self._out
        args, kwargs = self.jax_inputs()
        out = jax.jit(models.build("unet", cfg or self.cfg).apply)({"params": params or self.params}, *args, **kwargs)
        assert out.dtype == jnp.float32
        if cfg is None:
            self._out = nchw(out)
        return nchw(out)


@pytest.fixture(scope="module")
def cases():
    built = {}

    def get(name):
        if name not in built:
            built[name] = Case(name)
        return built[name]

    return get


# -------------------------------------------------------------------------------------------------------------
# whole model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_matches_diffusers(cases, name):
    case = cases(name)
    err = rel_err(case.run(), case.want)
    print(f"unet {name}: rel err {err:.2e}")
    assert err <= 1e-4, err


def test_unet_bf16_policy(cases):
    case = cases("two_level")
    cfg = dataclasses.replace(case.cfg, dtype="bfloat16", param_dtype="bfloat16")
    params = convert.from_torch("unet", case.state_dict, cfg)
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    err = rel_err(case.run(cfg, params), case.want)
    print(f"unet bf16: rel err {err:.2e}")
    assert err <= 2e-2, err


# -------------------------------------------------------------------------------------------------------------
# per block, against the matching diffusers submodule (emu2_shaped: resnet with shortcut, 2-block attention)


# inputs at unit scale and at 1e-3 (variance 1e-6, the size of the norms' eps): a wrong GroupNorm/LayerNorm eps only
# shows on the small ones
SCALES = (1.0, 1e-3)


def test_resnet_block(cases):
    case = cases("emu2_shaped")
    g = torch.Generator().manual_seed(5)
    x, temb = torch.randn(2, 16, 9, 7, generator=g), torch.randn(2, case.cfg.time_embed_dim, generator=g)
    block = conv_blocks.ResnetBlock2D(32, case.cfg.norm_num_groups, case.cfg.norm_eps)
    fn = jax.jit(block.apply)
    for scale in SCALES:
        with torch.no_grad():
            want = case.ref.down_blocks[1].resnets[0](scale * x, temb).numpy()  # 16 -> 32: 1x1 conv shortcut
        got = fn({"params": case.params["down_blocks_1"]["resnets_0"]}, nhwc(scale * x), jnp.asarray(temb.numpy()))
        err = rel_err(nchw(got), want)
        print(f"ResnetBlock2D (x scale {scale:g}): rel err {err:.2e}")
        assert err <= 1e-4, (scale, err)


def test_transformer_2d(cases):
    case = cases("emu2_shaped")
    g = torch.Generator().manual_seed(6)
    x, ctx = torch.randn(2, 64, 5, 3, generator=g), torch.randn(2, 7, 24, generator=g)
    block = unet_lib.Transformer2DModel(case.cfg, channels=64, heads=4, num_layers=2)
    fn = jax.jit(block.apply)
    for scale in SCALES:
        with torch.no_grad():
            want = case.ref.down_blocks[2].attentions[0](scale * x, encoder_hidden_states=ctx).sample.numpy()
        got = fn({"params": case.params["down_blocks_2"]["attentions_0"]}, nhwc(scale * x), jnp.asarray(ctx.numpy()))
        # the output holds the residual x: compare what the block adds, so the small case is not just x itself
        err = rel_err(nchw(got) - scale * x.numpy(), want - scale * x.numpy())
        print(f"Transformer2DModel (x scale {scale:g}): rel err {err:.2e}")
        assert err <= 1e-4, (scale, err)


def test_basic_transformer_block(cases):
    """Block 1 of a scanned 2-block stack = slice 1 of the stacked params (LayerNorm eps, attention, GEGLU)."""
    case = cases("emu2_shaped")
    g = torch.Generator().manual_seed(8)
    h, ctx = torch.randn(2, 15, 64, generator=g), torch.randn(2, 7, 24, generator=g)
    stacked = case.params["down_blocks_2"]["attentions_0"]["transformer_blocks"]
    block = unet_lib.BasicTransformerBlock(channels=64, heads=4)
    fn = jax.jit(block.apply)
    for scale in SCALES:
        with torch.no_grad():
            want = case.ref.down_blocks[2].attentions[0].transformer_blocks[1](
                scale * h, encoder_hidden_states=ctx).numpy() - scale * h.numpy()
        got, _ = fn({"params": jax.tree.map(lambda a: a[1], stacked)}, jnp.asarray(scale * h.numpy()),
                    jnp.asarray(ctx.numpy()))
        err = rel_err(np.asarray(got) - scale * h.numpy(), want)
        print(f"BasicTransformerBlock (h scale {scale:g}): rel err {err:.2e}")
        assert err <= 1e-4, (scale, err)


def test_cross_attn_down_block(cases):
    case = cases("emu2_shaped")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16, 9, 9, generator=g)
    temb, ctx = torch.randn(2, case.cfg.time_embed_dim, generator=g), torch.randn(2, 3, 24, generator=g)
    with torch.no_grad():
        want_h, want_skips = case.ref.down_blocks[1](hidden_states=x, temb=temb, encoder_hidden_states=ctx)
    got_h, got_skips = jax.jit(unet_lib.DownBlock(case.cfg, 1).apply)(
        {"params": case.params["down_blocks_1"]}, nhwc(x), jnp.asarray(temb.numpy()), jnp.asarray(ctx.numpy()))
    assert len(got_skips) == len(want_skips) == 3  # two resnet+attention outputs and the downsampled map
    errs = [rel_err(nchw(g_), w.numpy()) for g_, w in zip((got_h, *got_skips), (want_h, *want_skips))]
    print(f"CrossAttnDownBlock2D: rel errs {['%.2e' % e for e in errs]}")
    assert got_h.shape[1:3] == (5, 5)  # 9 -> 5: symmetric pad 1 (right/bottom-only padding would give 4)
    assert max(errs) <= 1e-4, errs


def test_time_and_add_embedding(cases):
    case = cases("emu2_shaped")
    with torch.no_grad():
        emb = case.ref.time_embedding(case.ref.get_time_embed(case.x, case.t))
        aug = case.ref.get_aug_embed(emb=emb, encoder_hidden_states=case.ehs, added_cond_kwargs=case.added)
        want = (emb + aug).numpy()
        time_only = emb.numpy()
    module = models.build("unet", case.cfg)
    added = {k: jnp.asarray(v.numpy()) for k, v in case.added.items()}
    got = module.apply({"params": case.params}, jnp.asarray(case.t.numpy()), case.x.shape[0], added["text_embeds"],
                       added["time_ids"], method="embed_time")
    err = rel_err(got, want)
    print(f"time + add embedding: rel err {err:.2e}")
    assert err <= 1e-4, err
    assert rel_err(time_only, want) > 1e-2  # the add embedding contributes: the check above can see it


# -------------------------------------------------------------------------------------------------------------
# conversion


@pytest.mark.parametrize("name", ["two_level", "conv_proj"])  # scanned + unrolled transformer blocks
def test_round_trip_exact(cases, name):
    case = cases(name)
    back = convert.to_torch("unet", case.params, case.cfg)
    assert sorted(back) == sorted(case.state_dict)
    for k, v in case.state_dict.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype and np.array_equal(back[k], v), k


def test_scanned_params_layout(cases):
    params = cases("two_level").params
    # the two BasicTransformerBlocks of down_blocks.1.attentions.0 are stacked on a leading axis
    assert params["down_blocks_1"]["attentions_0"]["transformer_blocks"]["attn1"]["to_q"]["kernel"].shape == (2, 64, 64)
    unrolled = cases("conv_proj").params["down_blocks_0"]["attentions_0"]
    assert {"transformer_blocks_0", "transformer_blocks_1", "transformer_blocks_2"} <= set(unrolled)


def test_missing_and_unexpected_keys(cases):
    case = cases("two_level")
    sd = dict(case.state_dict)
    missing = "up_blocks.0.attentions.1.transformer_blocks.1.attn2.to_k.weight"
    del sd[missing]
    with pytest.raises(ConversionError, match=missing.replace(".", r"\.")):
        convert.from_torch("unet", sd, case.cfg)
    for extra in ("down_blocks.0.resnets.0.conv_shortcut.weight",  # a shortcut this 32 -> 32 resnet does not have
                  "down_blocks.1.attentions.0.transformer_blocks.2.norm1.weight"):  # a third block of a 2-block stack
        sd = dict(case.state_dict)
        sd[extra] = np.zeros((32,), np.float32)
        with pytest.raises(ConversionError, match=extra.replace(".", r"\.")):
            convert.from_torch("unet", sd, case.cfg)
    # the same tensors under a bigger checkpoint's `unet.` prefix load too
    prefixed = {f"unet.{k}": v for k, v in case.state_dict.items()}
    same = convert.from_torch("unet", prefixed, case.cfg)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(case.params)))


# -------------------------------------------------------------------------------------------------------------
# config


def test_config_errors():
    base = dict(CONFIGS["two_level"][0])
    with pytest.raises(ValueError, match="num_attention_heads"):
        models.config_from_hf("unet", {**base, "num_attention_heads": (2, 4)})
    with pytest.raises(ValueError, match="not divisible by its 3 attention heads"):  # diffusers silently uses 63
        models.config_from_hf("unet", {**base, "attention_head_dim": (2, 3)})
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        models.config_from_hf("unet", {**base, "resnet_time_scale_shift": "scale_shift"})
    with pytest.raises(ValueError, match="norm_num_groups=12"):
        models.config_from_hf("unet", {**base, "norm_num_groups": 12})


def test_config_from_json_dict():
    """A config.json as diffusers writes it: lists, `_class_name`, `num_attention_heads: null`."""
    hf = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.21.2", "num_attention_heads": None,
          **{k: list(v) if isinstance(v, tuple) else v for k, v in CONFIGS["emu2_shaped"][0].items()}}
    cfg = models.config_from_hf("unet", hf)
    assert cfg.heads == (1, 2, 4) and cfg.transformer_layers == (1, 1, 2) and cfg.text_embeds_dim == 24
    assert [len(level.resnets) for level in unet_lib.up_levels(cfg)] == [3, 3, 3]
    assert unet_lib.up_levels(cfg)[0].resnets == ((128, 64), (128, 64), (96, 64))  # [h, skip] widths
    assert unet_lib.mid_level(cfg).transformer_layers == 2


def torch_shapes_from_table(kind: str, cfg) -> dict[str, tuple[int, ...]]:
    """{torch key: torch shape} that our rule table and module expect, without allocating any weights."""
    shapes = convert.expected_shapes(kind, cfg)
    out = {}
    for rule in convert_common.converter_module(kind).rules(cfg):
        shape = shapes[rule.flax_path]
        for key, one in ([(rule.torch_key.format(i=i), shape[1:]) for i in range(shape[0])] if rule.stacked
                         else [(rule.torch_key, shape)]):
            out[key] = tuple(rule.to_torch(np.empty(one, np.float32)).shape)  # np.empty + transpose: no copy
    return out


# Emu2-Gen's unet/config.json (baaivision/Emu, Emu2/emu/conf/diffusion_config/unet), the BLIP3-o decoder's UNet
EMU2_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.21.2", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 1792, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 3328, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}


def test_full_size_emu2_layout():
    """The full-size BLIP3-o/Emu2 UNet: every diffusers key and shape (diffusers built on the meta device, nothing
    allocated) is what our table and module expect; 2,525,520,644 parameters, 70 transformer blocks."""
    with torch.device("meta"):
        ref = TorchUNet(**{k: v for k, v in EMU2_UNET.items() if not k.startswith("_")})
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    cfg = models.config_from_hf("unet", EMU2_UNET)
    assert torch_shapes_from_table("unet", cfg) == want
    assert sum(int(np.prod(s)) for s in want.values()) == 2_525_520_644
    assert sum(k.endswith("attn1.to_q.weight") for k in want) == 70


# -------------------------------------------------------------------------------------------------------------
# sharding


def test_sharded_equals_unsharded(cases):
    case = cases("two_level")  # batch 8
    module = models.build("unet", case.cfg)
    args, kwargs = case.jax_inputs()
    boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args, **kwargs)["params"]
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = sharding.params_shardings(boxed, mesh)
    expect = {
        ("down_blocks_1", "attentions_0", "transformer_blocks", "attn1", "to_q", "kernel"): P(None, "fsdp", "tensor"),
        ("down_blocks_1", "attentions_0", "transformer_blocks", "ff", "net_2", "kernel"): P(None, "tensor", "fsdp"),
        ("down_blocks_1", "resnets_0", "conv1", "kernel"): P(None, None, "fsdp", None),
    }
    for path, want in expect.items():
        got = shardings
        for p in path:
            got = got[p]
        assert tuple(got.spec) + (None,) * (len(want) - len(got.spec)) == tuple(want), (path, got.spec)
    sharded = jax.tree.map(jax.device_put, case.params, shardings)
    unsharded = case.run()
    with jax.set_mesh(mesh), sharding.axis_rules():
        x = jax.device_put(args[0], sharding.batch_sharding(mesh, 4))
        out = jax.jit(module.apply, out_shardings=sharding.batch_sharding(mesh, 4))(
            {"params": sharded}, x, *args[1:], **kwargs)
    assert out.sharding.spec[0] == ("data", "fsdp")
    err = rel_err(nchw(out), unsharded)
    print(f"unet sharded vs unsharded: rel err {err:.2e}")
    assert err <= 1e-5, err
