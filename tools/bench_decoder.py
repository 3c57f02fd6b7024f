"""Image-decoder throughput: ours (jit) vs diffusers (PyTorch), same weights, side by side in one run.

Four pieces of the two BLIP3-o image decoders, each at a mid-size config of the real layout:

  unet_step    one denoising step of the SDXL-architecture decoder: diffusers `UNet2DConditionModel` (Emu2-Gen
               layout: DownBlock2D + 2 CrossAttnDownBlock2D, mid block, text_time conditioning, 64 x 1792 EVA-CLIP
               tokens) on the CFG batch of 2 (cond + uncond), as the sampling loop calls it
  vae_decode   the SDXL `AutoencoderKL` decoder (4 levels, factor 8), one image
  sana_step    one denoising step of the SANA decoder: diffusers `SanaTransformer2DModel` (SANA-1600M layout:
               linear self-attention, 64 x 2304 caption tokens) on the CFG batch of 2
  dcae_decode  the DC-AE `AutoencoderDC` decoder (f32c32 layout: ResBlock x 3 + EfficientViT x 3 stages), one image

The diffusers module is built from constructor kwargs (random weights moved off their init), ours gets its state
dict through `convert.from_torch`; both run in fp32 on the same inputs. Ours computes SANA's and DC-AE's depthwise
convolutions as sums of shifted slices (`depthwise_impl="shifts"`, XLA:CPU's fast form; `--depthwise_impl conv`:
XLA's grouped convolution, the accelerator default). Reported per piece: median seconds per call over `--iters`
rounds that alternate ours and the reference (load changes on a shared machine hit both alike; `block_until_ready`
before the clock stops), the median of the per-round ratios as `<piece>_speedup` = reference time / our time (> 1:
ours is faster), our compile time, the FLOPs of one call from XLA's cost analysis of our compiled program (layers
unrolled, so every layer is counted; 2 FLOPs per multiply-add), the achieved FLOP/s of each side and the fraction of
each framework's f32 matmul peak measured in the same run (before and after; the larger), and the
max |ours - reference| / max |reference| of the outputs (same weights: a sanity check, not a parity test).

On a machine shared with other jobs the absolute figures are noisy; the interleaved rounds keep the ratio fairer.
Last line: one JSON object.

  python tools/bench_decoder.py                  # mid-size configs, ~0.1-1 s per call on 2 cores; a few minutes
  python tools/bench_decoder.py --parts sana_step,dcae_decode --iters 3
  python tools/bench_decoder.py --quick          # tiny configs (the test)
  python tools/bench_decoder.py --depthwise_impl conv   # ours' depthwise convs as XLA's grouped convolution
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from blip3o_jax import benchmarking, convert, models, profiling  # noqa: E402

PARTS = ("unet_step", "vae_decode", "sana_step", "dcae_decode")

# The Emu2-Gen UNet (block widths 320/640/1280, heads 64 wide, 1/2/10 transformer blocks, cross-attention 1792)
# at half width and 1/5 of the deep transformer stacks; the real conditioning (64 x 1792 tokens, text_time with
# 6 x 256 time ids). Latent 32 x 32 (256 px).
UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, block_out_channels=(160, 320, 640), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=(5, 5, 10), transformer_layers_per_block=(1, 2, 2),
    cross_attention_dim=1792, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=1792 + 6 * 256, use_linear_projection=True, norm_num_groups=32,
    flip_sin_to_cos=True, freq_shift=0)
# The SDXL VAE (128/256/512/512) at half width; latent 32 x 32 -> 256 px.
VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(64, 128, 256, 256), layers_per_block=2,
    latent_channels=4, norm_num_groups=32, sample_size=256, scaling_factor=0.13025)
# SANA-1600M (70 x 32 heads = 2240 wide, 20 layers, cross 20 x 112) at 640 wide (20 x 32 heads, cross 5 x 128) and
# 6 layers; the real caption width 2304, 32 latent channels, patch 1, no position embedding. Latent 32 x 32
# (1024 px through DC-AE f32).
SANA = dict(
    in_channels=32, out_channels=32, num_attention_heads=20, attention_head_dim=32, num_layers=6,
    num_cross_attention_heads=5, cross_attention_head_dim=128, cross_attention_dim=640, caption_channels=2304,
    mlp_ratio=2.5, attention_bias=False, sample_size=32, patch_size=1, norm_elementwise_affine=False,
    norm_eps=1e-6, interpolation_scale=None)
# DC-AE f32c32 (widths 128..1024, 3 blocks per decoder stage, multiscale 5 attention in the last three) at 1/4 width;
# latent 8 x 8 -> 256 px.
DCAE = dict(
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(32, 64, 128, 128, 256, 256), decoder_block_out_channels=(32, 64, 128, 128, 256, 256),
    encoder_layers_per_block=(2, 2, 2, 3, 3, 3), decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    downsample_block_type="Conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407)

# name -> (diffusers kwargs, latent side, batch, caption tokens)
MID = {"unet_step": (UNET, 32, 2, 64), "vae_decode": (VAE, 32, 1, 0), "sana_step": (SANA, 32, 2, 64),
       "dcae_decode": (DCAE, 8, 1, 0)}
# the same layouts in miniature: compile in seconds, for the test
QUICK = {
    "unet_step": (dict(UNET, block_out_channels=(16, 32, 64), attention_head_dim=(1, 2, 4),
                       transformer_layers_per_block=(1, 1, 2), cross_attention_dim=24, addition_time_embed_dim=4,
                       projection_class_embeddings_input_dim=24 + 6 * 4, norm_num_groups=8), 8, 2, 4),
    "vae_decode": (dict(VAE, block_out_channels=(8, 16, 16, 16), norm_num_groups=4), 4, 1, 0),
    "sana_step": (dict(SANA, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_cross_attention_heads=2,
                       cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=24, in_channels=8,
                       out_channels=8), 4, 2, 4),
    "dcae_decode": (dict(DCAE, latent_channels=8, attention_head_dim=8, encoder_block_out_channels=(8, 8, 16, 16, 32, 32),
                         decoder_block_out_channels=(8, 8, 16, 16, 32, 32), encoder_layers_per_block=(1,) * 6,
                         decoder_layers_per_block=(1,) * 6), 2, 1, 0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--iters", type=int, default=5, help="timed rounds (ours and the reference alternate)")
    p.add_argument("--quick", action="store_true", help="tiny configs and 2 rounds (a smoke run, not a measurement)")
    p.add_argument("--scan", action="store_true",
                   help="nn.scan the transformer blocks in ours (the accelerator default); default unrolled, as on "
                        "CPU configs")
    p.add_argument("--depthwise_impl", choices=("shifts", "conv"), default="shifts",
                   help="ours' SANA / DC-AE depthwise convolutions (the configs' depthwise_impl): shifts (a sum of "
                        "shifted slices, the fast form on XLA:CPU) or conv (XLA's grouped convolution, the "
                        "accelerator default)")
    benchmarking.add_profile_flags(p)
    a = p.parse_args(argv)
    a.parts = [s.strip() for s in a.parts.split(",") if s.strip()]
    unknown = [s for s in a.parts if s not in PARTS]
    if unknown or not a.parts:
        p.error(f"--parts: unknown {unknown}; expected a comma-separated subset of {','.join(PARTS)}")
    if a.quick:
        a.iters = min(a.iters, 2)
    return a


# ------------------------------------------------------------------------------------------------------------
# one piece: the diffusers module, ours with its weights, the inputs and both call functions


@dataclasses.dataclass
class Piece:
    name: str
    config: dict  # what the JSON reports
    ours: Callable[[], Any]  # () -> jax array (NHWC), our compiled program on device-resident inputs
    ref: Callable[[], Any]  # () -> torch tensor (NCHW)
    compile_s: float
    flops: float  # of one call, from XLA's cost analysis of our unrolled program


def _perturbed(torch_module, seed: int):
    """Every parameter moved off its init (zero-initialised output layers would make a piece trivially cheap to
    match), small enough that activations stay O(1) through the deep stacks."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in torch_module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return torch_module.eval()


def _state_dict(torch_module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in torch_module.state_dict().items()}


def _compile(fn, args, unrolled=None):
    """(compiled, seconds, FLOPs). The FLOPs come from XLA's cost analysis of an unrolled program: `unrolled` =
    (fn, args) of the same model with unrolled blocks when `fn` scans them (a while loop's body is counted once)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t0
    counted = compiled if unrolled is None else jax.jit(unrolled[0]).lower(*unrolled[1]).compile()
    cost = counted.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled, seconds, float(cost["flops"])


def _nchw(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def build_piece(name: str, spec, scan: bool, seed: int, depthwise_impl: str = "shifts") -> Piece:
    import diffusers
    import torch

    kwargs, side, batch, tokens = spec
    rs = np.random.RandomState(seed)
    if name in ("unet_step", "sana_step"):
        kind, cls = ("unet", diffusers.UNet2DConditionModel) if name == "unet_step" else \
            ("sana", diffusers.SanaTransformer2DModel)
        torch.manual_seed(seed)
        ref = _perturbed(cls(**kwargs), seed)
        hf = dict(ref.config)
        if kind == "sana":
            hf["depthwise_impl"] = depthwise_impl
        cfg, cfg_unrolled = (models.config_from_hf(kind, {**hf, "scan_layers": s}) for s in (scan, False))
        params = jax.device_put(convert.from_torch(kind, _state_dict(ref), cfg))
        module = models.build(kind, cfg)
        latents = rs.randn(batch, side, side, kwargs["in_channels"]).astype(np.float32)
        timesteps = np.full((batch,), 981.0, np.float32)  # the first step of the 50-step leading Euler schedule
        width = kwargs["cross_attention_dim"] if kind == "unet" else kwargs["caption_channels"]
        context = rs.randn(batch, tokens, width).astype(np.float32)
        lt, tt, ct = _nchw(latents), torch.from_numpy(timesteps), torch.from_numpy(context)
        if kind == "unet":
            # BLIP3-o's pipeline: pooled text_embeds = mean of the tokens, time_ids = (H, W, 0, 0, H, W) in pixels
            pooled = context.mean(axis=1)
            px = 8 * side
            time_ids = np.tile(np.asarray([px, px, 0, 0, px, px], np.float32), (batch, 1))
            args = (params, latents, timesteps, context, pooled, time_ids)

            def fwd(m):
                return lambda p, x, t, c, te, ti: m.apply({"params": p}, x, t, c, text_embeds=te, time_ids=ti)

            added = {"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)}
            ref_fn = lambda: ref(lt, tt, ct, added_cond_kwargs=added).sample  # noqa: E731
        else:
            args = (params, latents, timesteps, context)

            def fwd(m):
                return lambda p, x, t, c: m.apply({"params": p}, x, t, c)

            ref_fn = lambda: ref(lt, ct, tt).sample  # noqa: E731
        unrolled = None
        if scan:  # the same weights stored per block (the scanned module stacks them)
            unrolled_params = convert.from_torch(kind, _state_dict(ref), cfg_unrolled)
            unrolled = (fwd(models.build(kind, cfg_unrolled)), (unrolled_params, *args[1:]))
        compiled, seconds, flops = _compile(fwd(module), args, unrolled)
        config = {k: kwargs[k] for k in (("block_out_channels", "transformer_layers_per_block", "attention_head_dim",
                                           "cross_attention_dim") if kind == "unet" else
                                          ("num_attention_heads", "attention_head_dim", "num_layers",
                                           "num_cross_attention_heads", "cross_attention_head_dim", "caption_channels"))}
    else:
        kind, cls = ("autoencoder_kl", diffusers.AutoencoderKL) if name == "vae_decode" else \
            ("autoencoder_dc", diffusers.AutoencoderDC)
        torch.manual_seed(seed)
        ref = _perturbed(cls(**kwargs), seed)
        hf = dict(ref.config)
        if kind == "autoencoder_dc":
            hf["depthwise_impl"] = depthwise_impl
        cfg = models.config_from_hf(kind, hf)
        params = jax.device_put(convert.from_torch(kind, _state_dict(ref), cfg))
        module = models.build(kind, cfg)
        latents = rs.randn(batch, side, side, kwargs["latent_channels"]).astype(np.float32)
        args = (params, latents)
        lt = _nchw(latents)
        ref_fn = lambda: ref.decode(lt).sample  # noqa: E731
        compiled, seconds, flops = _compile(lambda p, z: module.apply({"params": p}, z, method="decode"), args)
        config = {k: kwargs[k] for k in (("block_out_channels", "layers_per_block") if kind == "autoencoder_kl" else
                                          ("decoder_block_out_channels", "decoder_layers_per_block",
                                           "decoder_block_types"))}
    device_args = jax.device_put(args)
    config.update(latent=[batch, side, side], tokens=tokens or None, params=sum(p.numel() for p in ref.parameters()))
    return Piece(name, config, lambda: compiled(*device_args), ref_fn, seconds, flops)


def run_piece(piece: Piece, iters: int) -> dict:
    import torch

    with torch.inference_mode():
        times = benchmarking.paired_times(piece.ours, piece.ref, iters)
        ours, want = np.asarray(piece.ours()), piece.ref().permute(0, 2, 3, 1).numpy()
    return {
        "config": piece.config, "gflops_per_call": piece.flops / 1e9, "ours_s": times["ours_s"],
        "ref_s": times["ref_s"], "speedup": times["ratio"], "speedup_of_medians": times["ref_s"] / times["ours_s"],
        "ours_compile_s": piece.compile_s, "ours_first_call_s": times["ours_first_call_s"],
        "ref_first_call_s": times["ref_first_call_s"],
        "ours_gflops_per_s": piece.flops / times["ours_s"] / 1e9, "ref_gflops_per_s": piece.flops / times["ref_s"] / 1e9,
        "max_rel_diff_vs_ref": float(np.abs(ours - want).max() / np.abs(want).max()),
    }


def main(argv=None):
    a = parse_args(argv)
    if a.profile:
        profiling.enable_hlo_dump(a.profile)  # before the first compile
    import torch

    specs = QUICK if a.quick else MID
    result = {"benchmark": "decoder", "quick": a.quick, "device": jax.devices()[0].device_kind,
              "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__, "iters": a.iters,
              "scan_layers": a.scan, "depthwise_impl": a.depthwise_impl,
              "flops_source": "XLA cost analysis of our compiled program (unrolled)"}
    n = 1024 if a.quick else 2048  # matmul side of the peak measurement
    peaks = [(benchmarking.jax_matmul_peak(n), benchmarking.torch_matmul_peak(n))]
    for i, name in enumerate(a.parts):
        t0 = time.perf_counter()
        piece = build_piece(name, specs[name], a.scan, seed=i, depthwise_impl=a.depthwise_impl)
        r = run_piece(piece, a.iters)
        result[name] = r
        print(f"{name:12s} {r['gflops_per_call']:7.2f} GFLOP/call: ours {1e3 * r['ours_s']:8.1f} ms "
              f"({r['ours_gflops_per_s']:5.0f} GFLOP/s, compile {r['ours_compile_s']:.1f} s), diffusers "
              f"{1e3 * r['ref_s']:8.1f} ms ({r['ref_gflops_per_s']:5.0f} GFLOP/s), speed-up {r['speedup']:.2f}x, "
              f"max rel diff {r['max_rel_diff_vs_ref']:.1e}  [{time.perf_counter() - t0:.0f} s]", flush=True)
        if a.profile:
            with torch.inference_mode():
                r["profile"] = profiling.profile_runs(
                    a.profile, {f"ours_{name}": ("jax", piece.ours), f"torch_{name}": ("torch", piece.ref)},
                    calls=a.profile_calls)
    # the peaks again after the work: on a shared machine the larger of the two is the better hardware estimate
    peaks.append((benchmarking.jax_matmul_peak(n), benchmarking.torch_matmul_peak(n)))
    jax_peak, torch_peak = max(p[0] for p in peaks), max(p[1] for p in peaks)
    result.update(jax_matmul_peak_gflops=jax_peak / 1e9, torch_matmul_peak_gflops=torch_peak / 1e9)
    for name in a.parts:
        r = result[name]
        r["ours_frac_of_jax_peak"] = r["ours_gflops_per_s"] * 1e9 / jax_peak
        r["ref_frac_of_torch_peak"] = r["ref_gflops_per_s"] * 1e9 / torch_peak
        result[f"{name}_speedup"] = r["speedup"]
    benchmarking.emit(result)


if __name__ == "__main__":
    from blip3o_jax import hostmem

    hostmem.keep_freed_memory()  # both sides share the process: see blip3o_jax/hostmem.py
    main()
