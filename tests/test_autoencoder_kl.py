"""AutoencoderKL parity against diffusers 0.42.1 `AutoencoderKL`, weight conversion (incl. legacy attention names).

Tiny random diffusers VAEs built from constructor kwargs, every parameter moved off its init, fp32. encode ->
(mean, logvar of the latent Gaussian) and decode on two configs: 2 levels x 32/64 channels, and the SDXL layout
(4 levels, 2 resnets per level) shrunk to 8/16 channels, on non-square images.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from blip3o_jax import convert, models
from blip3o_jax.convert import common as convert_common
from blip3o_jax.convert.common import ConversionError
from blip3o_jax.models import autoencoder_kl as vae_lib
from blip3o_jax.models import conv_blocks
from conftest import rel_err  # noqa: E402  (tests/ is on sys.path under pytest)

torch.set_num_threads(2)

# name -> (diffusers kwargs, image (H, W))
CONFIGS = {
    "two_level": (dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                       latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=0.13025),
                  (32, 24)),
    # SDXL-VAE layout: 4 levels (factor 8), 2 resnets per encoder level, 3 per decoder level; odd map sizes on the way
    # down (40 x 56 -> 20 x 28 -> 10 x 14 -> 5 x 7)
    "sdxl_shaped": (dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                         layers_per_block=2, latent_channels=4, norm_num_groups=4, sample_size=32,
                         scaling_factor=0.13025),
                    (40, 56)),
}


def nhwc(t: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


class Case:
    def __init__(self, name: str, seed: int = 0):
        kwargs, (height, width) = CONFIGS[name]
        torch.manual_seed(seed)
        self.ref = TorchAutoencoderKL(**kwargs).eval()
        with torch.no_grad():
            for p in self.ref.parameters():  # every parameter off its init (norm weights 1, biases 0, ...)
                p.add_(0.1 * torch.randn_like(p))
        self.state_dict = {k: v.detach().numpy().copy() for k, v in self.ref.state_dict().items()}
        self.cfg = models.config_from_hf("autoencoder_kl", dict(self.ref.config))
        self.params = convert.from_torch("autoencoder_kl", self.state_dict, self.cfg)
        g = torch.Generator().manual_seed(seed + 1)
        self.images = torch.rand(2, 3, height, width, generator=g) * 2 - 1
        f = self.cfg.downsample_factor
        self.latents = torch.randn(2, 4, height // f, width // f, generator=g)
        with torch.no_grad():
            posterior = self.ref.encode(self.images).latent_dist
            self.want_mean, self.want_logvar = posterior.mean.numpy(), posterior.logvar.numpy()
            self.want_images = self.ref.decode(self.latents).sample.numpy()
        self._fns = {}

    def _jitted(self, cfg, method):
        """One compiled function per (config, method), reused across tests (params are an argument)."""
        key = (cfg, method)
        if key not in self._fns:
            module = models.build("autoencoder_kl", cfg)
            self._fns[key] = jax.jit(lambda p, x: module.apply({"params": p}, x, method=method))
        return self._fns[key]

    def encode(self, cfg=None, params=None):
        return self._jitted(cfg or self.cfg, "encode")(params or self.params, nhwc(self.images))

    def decode(self, cfg=None, params=None):
        return self._jitted(cfg or self.cfg, "decode")(params or self.params, nhwc(self.latents))


@pytest.fixture(scope="module")
def cases():
    built = {}

    def get(name):
        if name not in built:
            built[name] = Case(name)
        return built[name]

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_matches_diffusers(cases, name):
    case = cases(name)
    mean, logvar = case.encode()
    assert mean.dtype == logvar.dtype == jnp.float32
    errs = rel_err(nchw(mean), case.want_mean), rel_err(nchw(logvar), case.want_logvar)
    print(f"vae {name} encode: rel err mean {errs[0]:.2e}, logvar {errs[1]:.2e}")
    assert max(errs) <= 1e-4, errs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_matches_diffusers(cases, name):
    case = cases(name)
    images = case.decode()
    assert images.dtype == jnp.float32
    err = rel_err(nchw(images), case.want_images)
    print(f"vae {name} decode: rel err {err:.2e}")
    assert err <= 1e-4, err


def test_decode_bf16_policy(cases):
    case = cases("two_level")
    cfg = dataclasses.replace(case.cfg, dtype="bfloat16", param_dtype="bfloat16")
    params = convert.from_torch("autoencoder_kl", case.state_dict, cfg)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    err = rel_err(nchw(case.decode(cfg, params)), case.want_images)
    print(f"vae bf16 decode: rel err {err:.2e}")
    assert err <= 2e-2, err


def test_logvar_clamped(cases):
    """diffusers clamps logvar to [-30, 20]: a quant_conv bias pushed far out must saturate exactly there."""
    case = cases("two_level")
    params = jax.tree.map(np.copy, case.params)
    bias = params["quant_conv"]["bias"]
    bias[4:6], bias[6:] = 1e3, -1e3  # logvar channels are the second half of the moments
    _, logvar = case.encode(params=params)
    assert np.all(np.asarray(logvar[..., :2]) == 20.0) and np.all(np.asarray(logvar[..., 2:]) == -30.0)


def test_mid_block_attention(cases):
    """The single-head, 64-wide mid-block attention (group_norm, biased q/k/v/out, residual) on its own, at unit
    scale and at 1e-3 (variance near the GroupNorm eps 1e-6: a wrong eps shows there)."""
    case = cases("two_level")
    x = torch.randn(2, 64, 6, 5, generator=torch.Generator().manual_seed(3))
    block = conv_blocks.SpatialAttention(heads=1, groups=32, eps=1e-6)
    fn = jax.jit(block.apply)
    for scale in (1.0, 1e-3):
        with torch.no_grad():
            want = case.ref.decoder.mid_block.attentions[0](scale * x).numpy() - scale * x.numpy()
        got = fn({"params": case.params["decoder"]["mid_block"]["attentions_0"]}, nhwc(scale * x))
        err = rel_err(nchw(got) - scale * x.numpy(), want)  # what the block adds to its residual input
        print(f"vae mid attention (x scale {scale:g}): rel err {err:.2e}")
        assert err <= 1e-4, (scale, err)


def test_up_decoder_block(cases):
    """The last UpDecoderBlock2D as the model builds it (3 resnets without temb, the first 16 -> 8 with a shortcut,
    GroupNorm eps 1e-6), on unit-scale and tiny inputs."""
    case = cases("sdxl_shaped")
    x = torch.randn(2, 16, 6, 5, generator=torch.Generator().manual_seed(4))
    fn = jax.jit(vae_lib.UpDecoderBlock2D(case.cfg, 3).apply)
    for scale in (1.0, 1e-3):
        with torch.no_grad():
            want = case.ref.decoder.up_blocks[3](scale * x).numpy()
        got = fn({"params": case.params["decoder"]["up_blocks_3"]}, nhwc(scale * x))
        err = rel_err(nchw(got), want)
        print(f"vae UpDecoderBlock2D (x scale {scale:g}): rel err {err:.2e}")
        assert err <= 1e-4, (scale, err)


def test_asymmetric_downsample_padding():
    """The encoder's stride-2 conv pads one row/column at the bottom/right only (diffusers' VAE Downsample2D)."""
    torch.manual_seed(0)
    ref = TorchAutoencoderKL(**CONFIGS["two_level"][0]).encoder.down_blocks[0].downsamplers[0].eval()
    x = torch.randn(1, 32, 7, 6)
    with torch.no_grad():
        want = ref(x).numpy()
    params = {"conv": {"kernel": ref.conv.weight.detach().numpy().transpose(2, 3, 1, 0),
                       "bias": ref.conv.bias.detach().numpy()}}
    got = nchw(conv_blocks.Downsample2D(32, padding=0).apply({"params": params}, nhwc(x)))
    assert got.shape == want.shape == (1, 32, 3, 3)
    assert rel_err(got, want) <= 1e-5
    symmetric = nchw(conv_blocks.Downsample2D(32, padding=1).apply({"params": params}, nhwc(x)))
    assert symmetric.shape != want.shape or rel_err(symmetric, want) > 1e-2  # the padding is really asymmetric


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_exact(cases, name):
    case = cases(name)
    back = convert.to_torch("autoencoder_kl", case.params, case.cfg)
    assert sorted(back) == sorted(case.state_dict)
    for k, v in case.state_dict.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype and np.array_equal(back[k], v), k


def test_legacy_attention_names_load(cases):
    case = cases("two_level")
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in case.state_dict.items():
        for new, old in legacy.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        sd[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in sd and "decoder.mid_block.attentions.0.query.bias" in sd
    params = convert.from_torch("autoencoder_kl", sd, case.cfg)
    flat_new, flat_old = jax.tree_util.tree_leaves_with_path(case.params), jax.tree_util.tree_leaves_with_path(params)
    assert [p for p, _ in flat_new] == [p for p, _ in flat_old]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(flat_new, flat_old))
    # both spellings of one tensor: refused rather than silently picking one
    both = dict(case.state_dict)
    both["encoder.mid_block.attentions.0.query.weight"] = both["encoder.mid_block.attentions.0.to_q.weight"]
    with pytest.raises(ConversionError, match="same tensor"):
        convert.from_torch("autoencoder_kl", both, case.cfg)


def test_missing_and_unexpected_keys(cases):
    case = cases("sdxl_shaped")
    sd = dict(case.state_dict)
    missing = "decoder.up_blocks.3.resnets.0.conv_shortcut.weight"  # 16 -> 8 channels: this resnet has a shortcut
    del sd[missing]
    with pytest.raises(ConversionError, match=missing.replace(".", r"\.")):
        convert.from_torch("autoencoder_kl", sd, case.cfg)
    sd = dict(case.state_dict)
    extra = "encoder.down_blocks.3.downsamplers.0.conv.weight"  # the last encoder level has no downsampler
    sd[extra] = np.zeros((16, 16, 3, 3), np.float32)
    with pytest.raises(ConversionError, match=extra.replace(".", r"\.")):
        convert.from_torch("autoencoder_kl", sd, case.cfg)


def test_without_quant_convs():
    """use_quant_conv / use_post_quant_conv false: no such params, and the table still matches the module."""
    kwargs = dict(CONFIGS["two_level"][0], use_quant_conv=False, use_post_quant_conv=False)
    torch.manual_seed(0)
    ref = TorchAutoencoderKL(**kwargs).eval()
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    cfg = models.config_from_hf("autoencoder_kl", dict(ref.config))
    params = convert.from_torch("autoencoder_kl", sd, cfg)
    assert "quant_conv" not in params and "post_quant_conv" not in params
    back = convert.to_torch("autoencoder_kl", params, cfg)
    assert sorted(back) == sorted(sd)


def test_full_size_sdxl_vae_layout():
    """The full-size SDXL/Emu2 VAE: every diffusers key and shape (meta device) is what our table and module expect."""
    hf = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
              sample_size=1024, scaling_factor=0.13025)
    with torch.device("meta"):
        ref = TorchAutoencoderKL(**hf)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    cfg = models.config_from_hf("autoencoder_kl", hf)
    shapes = convert.expected_shapes("autoencoder_kl", cfg)
    got = {rule.torch_key: tuple(rule.to_torch(np.empty(shapes[rule.flax_path], np.float32)).shape)
           for rule in convert_common.converter_module("autoencoder_kl").rules(cfg)}
    assert got == want
    assert sum(int(np.prod(s)) for s in want.values()) == 83_653_863


def test_config_fields():
    hf = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.21.2", "act_fn": "silu",
          "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
          "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.13025,
          "force_upcast": True}
    cfg = models.config_from_hf("autoencoder_kl", hf)
    assert cfg.scaling_factor == 0.13025 and cfg.shift_factor is None and cfg.downsample_factor == 8
    assert cfg.block_out_channels == (128, 256, 512, 512)
    with pytest.raises(ValueError, match="norm_num_groups=32"):
        models.config_from_hf("autoencoder_kl", {**hf, "block_out_channels": [8, 16, 16, 16]})
    with pytest.raises(ValueError, match="DownBlock2D"):
        models.config_from_hf("autoencoder_kl", {**hf, "down_block_types": ["DownBlock2D"] * 4})
