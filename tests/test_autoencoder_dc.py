"""DC-AE parity against diffusers `AutoencoderDC` (and its blocks), weight conversion, sharding, config errors.

References are diffusers 0.42.1 modules built from tiny random configs, fp32, eval mode, with every parameter
perturbed away from its init and every BatchNorm given random running statistics; inputs are fresh random
normals. Outputs compared channels-last: max|ours - ref| <= 1e-4 * max|ref|.
"""
from __future__ import annotations

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderDC as TorchAutoencoderDC
from diffusers.models.autoencoders import autoencoder_dc as torch_dc
from jax.sharding import PartitionSpec as P

from blip3o_jax import convert, models, sharding
from blip3o_jax.convert import autoencoder_dc as dc_rules
from blip3o_jax.convert.common import ConversionError, abstract_shapes, from_torch_by_rules
from blip3o_jax.models import autoencoder_dc as dc
from blip3o_jax.models import registry
from conftest import rel_err  # noqa: E402  (tests/ is on sys.path under pytest)

torch.set_num_threads(1)

KIND = "autoencoder_dc"

# A: the diffusers test-suite config (2 stages). B: a 3-stage SANA-like layout (ResBlock, ResBlock, EfficientViT).
# C: pixel (un)shuffle resampling, empty first stages (resampling stems), batch-norm and mixed relu/silu decoder.
CONFIGS = {
    "A": dict(in_channels=3, latent_channels=4, attention_head_dim=2,
              encoder_block_types=("ResBlock", "EfficientViTBlock"),
              decoder_block_types=("ResBlock", "EfficientViTBlock"),
              encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
              encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
              encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
              downsample_block_type="Conv", upsample_block_type="interpolate",
              decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407),
    "B": dict(latent_channels=4, attention_head_dim=8,
              encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
              decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
              encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
              encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
              encoder_layers_per_block=(1, 1, 2), decoder_layers_per_block=(1, 1, 2),
              downsample_block_type="Conv", upsample_block_type="interpolate",
              decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407),
    "C": dict(latent_channels=4, attention_head_dim=8,
              encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
              decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
              encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
              encoder_qkv_multiscales=((), (), ()), decoder_qkv_multiscales=((), (), ()),
              encoder_layers_per_block=(0, 1, 2), decoder_layers_per_block=(0, 2, 2),
              downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
              decoder_norm_types=("batch_norm", "batch_norm", "rms_norm"), decoder_act_fns=("relu", "relu", "silu")),
}
# (config, image size): B at 32 px runs its deepest stage (8x8 = 64 > head_dim 8) on the linear attention path,
# at 8 px (2x2 = 4 <= 8) on the quadratic path
CASES = {"A32": ("A", 32), "B32": ("B", 32), "B8": ("B", 8), "C16": ("C", 16)}


def perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 + 0.5 * torch.rand(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return module.eval()


def state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def randn(shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def assert_close(ours, ref, rel=1e-4, what=""):
    err = rel_err(ours, ref)
    assert err <= rel, f"{what}: max|diff| / max|ref| = {err:.3g} > {rel:g}"
    return err


@pytest.fixture(scope="module")
def models_by_name():
    """name -> (diffusers model, our config, our params, state dict)."""
    out = {}
    for seed, (name, hf) in enumerate(CONFIGS.items()):
        torch.manual_seed(seed)
        ref = perturb(TorchAutoencoderDC(**hf), seed)
        cfg = models.config_from_hf(KIND, dict(ref.config))
        sd = state_dict(ref)
        out[name] = (ref, cfg, convert.from_torch(KIND, sd, cfg), sd)
    return out


@pytest.fixture(scope="module")
def apply_fns():
    """One jitted encode/decode per config (the config is static), reused across tests."""
    fns = {}

    def get(cfg, method):
        key = (cfg, method)
        if key not in fns:
            module = models.build(KIND, cfg)
            fns[key] = jax.jit(lambda p, x: module.apply({"params": p}, x, method=method))
        return fns[key]

    return get


# -------------------------------------------------------------------------------------------------------------
# whole model


@pytest.mark.parametrize("case", list(CASES))
def test_encode_decode_match_diffusers(case, models_by_name, apply_fns):
    name, size = CASES[case]
    ref, cfg, params, _ = models_by_name[name]
    f = cfg.spatial_compression_ratio
    images = randn((2, size, size, cfg.in_channels), seed=10 + size)
    latents = randn((2, size // f, size // f, cfg.latent_channels), seed=20 + size)
    with torch.no_grad():
        want_latent = nhwc(ref.encode(nchw(images)).latent)
        want_image = nhwc(ref.decode(nchw(latents)).sample)
    got_latent = apply_fns(cfg, "encode")(params, images)
    got_image = apply_fns(cfg, "decode")(params, latents)
    assert got_latent.shape == (2, size // f, size // f, cfg.latent_channels)
    assert_close(got_latent, want_latent, what=f"{case} encode")
    assert_close(got_image, want_image, what=f"{case} decode")


def grouped_convs(fn, *args) -> list[int]:
    """feature_group_count of every grouped convolution in fn's program (nested jaxprs included)."""
    counts = re.findall(r"feature_group_count=(\d+)", str(jax.make_jaxpr(fn)(*args)))
    return [int(n) for n in counts if int(n) > 1]


def test_depthwise_shifts_match_diffusers(models_by_name, apply_fns):
    """depthwise_impl="shifts" (the GLUMBConv 3x3 and multiscale 5x5 depthwise convolutions as sums of shifted
    slices, the XLA:CPU form) on B at 32 px: encode and decode as diffusers, with no grouped convolution left."""
    ref, cfg, params, _ = models_by_name["B"]
    shifts = models.config_from_hf(KIND, {**dict(ref.config), "depthwise_impl": "shifts"})
    conv = models.config_from_hf(KIND, {**dict(ref.config), "depthwise_impl": "conv"})
    assert shifts.depthwise_impl == "shifts" and cfg.depthwise_impl == "auto"  # the default: shifts on this CPU
    images = randn((2, 32, 32, cfg.in_channels), seed=42)
    latents = randn((2, 8, 8, cfg.latent_channels), seed=43)
    with torch.no_grad():
        want_latent = nhwc(ref.encode(nchw(images)).latent)
        want_image = nhwc(ref.decode(nchw(latents)).sample)
    err_latent = assert_close(apply_fns(shifts, "encode")(params, images), want_latent, what="B32 shifts encode")
    err_image = assert_close(apply_fns(shifts, "decode")(params, latents), want_image, what="B32 shifts decode")
    print(f"[rel] B32 depthwise shifts: encode {err_latent:.3g}, decode {err_image:.3g}")
    for method, x in (("encode", images), ("decode", latents)):
        def program(c, method=method):
            module = models.build(KIND, c)
            return lambda p, x_: module.apply({"params": p}, x_, method=method)

        assert grouped_convs(program(shifts), params, x) == [], method
        assert grouped_convs(program(cfg), params, x) == [], method  # "auto" on a CPU program
        # B's EfficientViT stage: 2 blocks x (GLUMBConv 3x3 over 8 * 32 channels, multiscale 5x5 over 3 * 32)
        assert sorted(grouped_convs(program(conv), params, x)) == [96, 96, 256, 256], method


def test_call_is_encode_then_decode(models_by_name):
    ref, cfg, params, _ = models_by_name["A"]
    images = randn((1, 8, 8, 3), seed=3)
    with torch.no_grad():
        want = nhwc(ref(nchw(images)).sample)
    assert_close(jax.jit(models.build(KIND, cfg).apply)({"params": params}, images), want, what="__call__")


def test_bf16_compute_policy(models_by_name, apply_fns):
    """bf16 compute (fp32 params) against the fp32 reference. Checked on B's quadratic-attention size: a random-weight
    DC-AE amplifies bf16 rounding to ~1-2% over its depth on every path, and its ReLU linear attention has seeds
    where near-zero normalisers push max|diff| past 10%; diffusers' own bf16 forward (`model.to(torch.bfloat16)`)
    deviates from fp32 just as much on the same modules."""
    ref, cfg, _, sd = models_by_name["B"]
    cfg16 = models.config_from_hf(KIND, {**dict(ref.config), "dtype": "bfloat16"})
    params = convert.from_torch(KIND, sd, cfg16)
    images = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)  # the encoder's input range
    latents = randn((2, 2, 2, 4), seed=7)
    with torch.no_grad():
        want_latent = nhwc(ref.encode(nchw(images)).latent)
        want_image = nhwc(ref.decode(nchw(latents)).sample)
    got_latent = apply_fns(cfg16, "encode")(params, images)
    got_image = apply_fns(cfg16, "decode")(params, latents)
    assert got_latent.dtype == jnp.bfloat16 and got_image.dtype == jnp.bfloat16
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    assert_close(got_latent, want_latent, rel=2e-2, what="bf16 encode")
    assert_close(got_image, want_image, rel=2e-2, what="bf16 decode")
    # and bf16 is really in use: a compute policy that changed nothing would match fp32 to ~1e-7
    assert rel_err(got_image, want_image) > 1e-3


# -------------------------------------------------------------------------------------------------------------
# blocks


def block_params(module, torch_block, rules, x):
    return from_torch_by_rules(rules, state_dict(torch_block), abstract_shapes(module, x), ignore=dc_rules.IGNORED)


def run_block(torch_block, module, rules, x, seed):
    perturb(torch_block, seed)
    params = block_params(module, torch_block, rules, x)
    with torch.no_grad():
        want = nhwc(torch_block(nchw(x)))
    return module.apply({"params": params}, x), want


@pytest.mark.parametrize("norm_type,act_fn", [("rms_norm", "silu"), ("batch_norm", "relu"), ("rms_norm", "gelu")])
def test_resblock(norm_type, act_fn):
    torch.manual_seed(1)
    x = randn((2, 6, 6, 8), seed=1)
    got, want = run_block(torch_dc.ResBlock(8, 8, norm_type, act_fn), dc.ResBlock(8, norm_type, act_fn),
                          dc_rules.resblock_rules("", "", norm_type), x, seed=1)
    assert_close(got, want, what=f"ResBlock {norm_type} {act_fn}")


@pytest.mark.parametrize("size,scales,norm_type", [
    ((8, 8), (5,), "rms_norm"),  # 64 > head_dim 8: linear attention
    ((2, 2), (5,), "rms_norm"),  # 4 <= 8: quadratic attention
    ((2, 4), (3, 5), "batch_norm"),  # 8 == head_dim: still quadratic; two scales; batch-norm attention output
    ((4, 6), (), "rms_norm"),  # no multiscale branch, non-square map
])
def test_efficientvit_block(size, scales, norm_type):
    torch.manual_seed(2)
    x = randn((2, *size, 16), seed=2)
    torch_block = torch_dc.EfficientViTBlock(16, attention_head_dim=8, qkv_multiscales=scales, norm_type=norm_type)
    got, want = run_block(torch_block, dc.EfficientViTBlock(16, 8, scales, norm_type),
                          dc_rules.efficientvit_rules("", "", scales, norm_type), x, seed=2)
    assert_close(got, want, what=f"EfficientViTBlock {size} {scales} {norm_type}")


def test_attention_path_switch(monkeypatch):
    """Linear attention when H*W > head_dim, quadratic otherwise (fp32 results agree either way, so look)."""
    calls = []
    for fn in ("linear_relu_attention", "quadratic_relu_attention"):
        original = getattr(dc, fn)
        monkeypatch.setattr(dc, fn, lambda *a, _f=original, _n=fn: calls.append(_n) or _f(*a))
    module = dc.EfficientViTBlock(16, 8, (5,))
    for size in ((3, 3), (2, 4), (1, 8)):
        jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.ones((1, *size, 16)))  # traces, computes nothing
    assert calls == ["linear_relu_attention", "quadratic_relu_attention", "quadratic_relu_attention"]


def test_attention_kernels_match_diffusers():
    attn = torch_dc.SanaMultiscaleLinearAttention(16, 16, attention_head_dim=8)

    def to_torch(a):  # (B, N, G, d) -> diffusers' (B, G, d, N)
        return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 2, 3, 1))))

    q, k = np.abs(randn((2, 5, 3, 8), seed=0)), np.abs(randn((2, 5, 3, 8), seed=1))  # (B, N, G, d), after ReLU
    v = randn((2, 5, 3, 8), seed=2)
    with torch.no_grad():
        want_lin = attn.apply_linear_attention(to_torch(q), to_torch(k), to_torch(v)).permute(0, 3, 1, 2).numpy()
        want_quad = attn.apply_quadratic_attention(to_torch(q), to_torch(k), to_torch(v)).permute(0, 3, 1, 2).numpy()
    assert_close(dc.linear_relu_attention(q, k, v), want_lin, rel=1e-5, what="linear")
    assert_close(dc.quadratic_relu_attention(q, k, v), want_quad, rel=1e-5, what="quadratic")


@pytest.mark.parametrize("c_in,c_out,unshuffle,shortcut", [
    (8, 16, False, True),  # strided conv, shortcut mean over groups of 2
    (8, 8, False, True),  # groups of 4
    (8, 16, True, True),  # conv to C/4 + pixel_unshuffle
    (4, 16, True, True),  # groups of 1
    (3, 16, True, False),  # the encoder's resampling stem
    (3, 8, False, False),
])
def test_down_block(c_in, c_out, unshuffle, shortcut):
    torch.manual_seed(3)
    x = randn((2, 6, 4, c_in), seed=3)
    torch_block = torch_dc.DCDownBlock2d(c_in, c_out, downsample=unshuffle, shortcut=shortcut)
    got, want = run_block(torch_block, dc.DCDownBlock2d(c_out, unshuffle, shortcut), dc_rules.resample_rules("", ""),
                          x, seed=3)
    assert got.shape == (2, 3, 2, c_out)
    assert_close(got, want, what=f"DCDownBlock2d {c_in}->{c_out} unshuffle={unshuffle} shortcut={shortcut}")


@pytest.mark.parametrize("c_in,c_out,interpolate,shortcut", [
    (16, 8, True, True),  # nearest x2 + conv; shortcut repeats 2
    (16, 8, False, True),  # conv to 4C + pixel_shuffle
    (8, 8, False, True),  # repeats 4
    (32, 8, True, True),  # repeats 1
    (8, 3, True, False),  # the decoder's resampling head
    (8, 3, False, False),
])
def test_up_block(c_in, c_out, interpolate, shortcut):
    torch.manual_seed(4)
    x = randn((2, 3, 2, c_in), seed=4)
    torch_block = torch_dc.DCUpBlock2d(c_in, c_out, interpolate=interpolate, shortcut=shortcut)
    got, want = run_block(torch_block, dc.DCUpBlock2d(c_out, interpolate, shortcut), dc_rules.resample_rules("", ""),
                          x, seed=4)
    assert got.shape == (2, 6, 4, c_out)
    assert_close(got, want, what=f"DCUpBlock2d {c_in}->{c_out} interpolate={interpolate} shortcut={shortcut}")


def test_pixel_shuffle_channel_order():
    x = randn((2, 4, 6, 12), seed=7)
    want_un = nhwc(torch.nn.functional.pixel_unshuffle(nchw(x), 2))
    want_sh = nhwc(torch.nn.functional.pixel_shuffle(nchw(x), 2))
    np.testing.assert_array_equal(np.asarray(dc.pixel_unshuffle(x)), want_un)
    np.testing.assert_array_equal(np.asarray(dc.pixel_shuffle(x)), want_sh)
    np.testing.assert_array_equal(np.asarray(dc.pixel_shuffle(dc.pixel_unshuffle(x))), x)


# -------------------------------------------------------------------------------------------------------------
# conversion


def without_counters(sd):
    return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_exact(name, models_by_name):
    ref, cfg, params, sd = models_by_name[name]
    back = convert.to_torch(KIND, params, cfg)
    want = without_counters(sd)
    assert sorted(back) == sorted(want)
    for k in want:
        assert back[k].shape == want[k].shape and back[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(back[k], want[k], err_msg=k)
    # what to_torch writes loads strictly into diffusers (BatchNorm restores its step counter itself)
    fresh = TorchAutoencoderDC(**CONFIGS[name])
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    assert sum("running_var" in k for k in back) == (2 if name == "C" else 0)


def test_prefixed_checkpoint(models_by_name):
    _, cfg, params, sd = models_by_name["A"]
    again = convert.from_torch(KIND, {f"vae.{k}": v for k, v in sd.items()}, cfg)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_missing_and_unexpected_keys(models_by_name):
    _, cfg, _, sd = models_by_name["C"]
    missing = dict(sd)
    del missing["decoder.up_blocks.1.1.norm.running_var"]
    with pytest.raises(ConversionError, match=r"missing key 'decoder\.up_blocks\.1\.1\.norm\.running_var'"):
        convert.from_torch(KIND, missing, cfg)
    extra = {**sd, "encoder.down_blocks.2.2.conv.weight": np.zeros((32, 32, 3, 3), np.float32)}
    with pytest.raises(ConversionError, match=r"unexpected key 'encoder\.down_blocks\.2\.2\.conv\.weight'"):
        convert.from_torch(KIND, extra, cfg)
    # a checkpoint of a different layout (B's keys for C's config) is refused too
    _, _, _, sd_b = models_by_name["B"]
    with pytest.raises(ConversionError):
        convert.from_torch(KIND, sd_b, cfg)


# -------------------------------------------------------------------------------------------------------------
# sharding


def test_sharded_equals_unsharded(models_by_name, apply_fns):
    _, cfg, params, _ = models_by_name["B"]
    module = models.build(KIND, cfg)
    images = randn((8, 32, 32, 3), seed=8)
    boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), images[:1])["params"]
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = sharding.params_shardings(boxed, mesh)
    expect = {
        ("encoder", "down_blocks_2_0", "attn", "to_q", "kernel"): P("fsdp", "tensor"),
        ("encoder", "down_blocks_2_0", "conv_out", "conv_inverted", "kernel"): P("fsdp", "tensor"),
        ("decoder", "up_blocks_1_1", "conv1", "kernel"): P(None, None, "fsdp", "tensor"),
        # the grouped 1x1 conv, sharded on its output features (XLA's grouped convolution got this wrong)
        ("decoder", "up_blocks_2_1", "attn", "to_qkv_multiscale_0", "proj_out", "kernel"):
            P(None, None, None, "tensor"),
    }
    flat = flax.traverse_util.flatten_dict(shardings)
    for path, want in expect.items():
        assert tuple(flat[path].spec) == tuple(want), (path, flat[path].spec)
    sharded = jax.tree.map(jax.device_put, params, shardings)

    def roundtrip(p, x):
        return module.apply({"params": p}, x)

    want = jax.jit(roundtrip)(params, images)
    batch = sharding.batch_sharding(mesh, 4)
    with jax.set_mesh(mesh), sharding.axis_rules():
        got = jax.jit(roundtrip, out_shardings=batch)(sharded, jax.device_put(images, batch))
    assert got.sharding.spec[0] == ("data", "fsdp")
    assert_close(got, want, rel=1e-5, what="sharded encode+decode")


# -------------------------------------------------------------------------------------------------------------
# config


def test_registered_and_config_from_hf(models_by_name):
    ref, cfg, _, _ = models_by_name["C"]
    hf = {**dict(ref.config), "_class_name": "AutoencoderDC", "_diffusers_version": "0.42.1"}
    assert registry.kind_of_config(hf) == KIND
    assert registry.get(KIND).converter == "autoencoder_dc"
    assert models.config_from_hf(KIND, hf) == cfg
    assert cfg.decoder_norm_types == ("batch_norm", "batch_norm", "rms_norm")
    assert cfg.encoder_block_types == ("ResBlock", "ResBlock", "EfficientViTBlock")
    assert cfg.spatial_compression_ratio == 4 and cfg.shift_factor is None
    a = models.config_from_hf(KIND, {**CONFIGS["A"], "shift_factor": 0.5})
    assert a.scaling_factor == 0.41407 and a.shift_factor == 0.5
    # a single string stands for every stage, as in diffusers
    assert models.config_from_hf(KIND, {**CONFIGS["B"], "decoder_act_fns": "gelu"}).decoder_act_fns == ("gelu",) * 3


@pytest.mark.parametrize("change,match", [
    (dict(latent_channels=5), "latent_channels=5 does not divide"),
    (dict(encoder_block_out_channels=(8, 24, 32), decoder_block_out_channels=(8, 24, 32)),
     "4 \\* 8 to be divisible by 24"),
    (dict(encoder_block_types=("ResBlock", "ResBlock", "EViTS5_GLU")), "'EViTS5_GLU' is not supported"),
    (dict(attention_head_dim=12), "attention_head_dim=12 does not divide"),
    (dict(decoder_norm_types="layer_norm"), "'layer_norm' is not supported"),
    (dict(decoder_act_fns="relu6"), "'relu6' is not supported"),
    (dict(encoder_layers_per_block=(1, 0, 2)), r"encoder_layers_per_block\[1\] = 0"),
    (dict(decoder_qkv_multiscales=((), (), (4,))), "kernel sizes \\(4,\\) must be odd"),
    (dict(decoder_block_out_channels=(8, 16)), "decoder_layers_per_block has 3 entries but there are 2 stages"),
    (dict(downsample_block_type="pixel_unshuffle", encoder_block_out_channels=(8, 6, 12),
          encoder_layers_per_block=(0, 1, 2), attention_head_dim=2), "pixel_unshuffle downsampling to width 6"),
])
def test_config_errors(change, match):
    with pytest.raises(ValueError, match=match):
        models.config_from_hf(KIND, {**CONFIGS["B"], **change})


def test_input_size_and_channel_errors(models_by_name):
    _, cfg, params, _ = models_by_name["B"]
    module = models.build(KIND, cfg)
    with pytest.raises(ValueError, match="image size 30x32 is not a multiple of the spatial compression ratio 4"):
        module.apply({"params": params}, jnp.ones((1, 30, 32, 3)), method="encode")
    with pytest.raises(ValueError, match=r"expected images \(B, H, W, 3\)"):
        module.apply({"params": params}, jnp.ones((1, 32, 32, 4)), method="encode")
    with pytest.raises(ValueError, match=r"expected latents \(B, h, w, 4\)"):
        module.apply({"params": params}, jnp.ones((1, 8, 8, 3)), method="decode")
