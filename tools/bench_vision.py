"""Vision-tower forward throughput: ours (jit) vs the PyTorch reference, side by side in one run.

  eva     blip3o_jax.models.eva_clip at a mid-size EVA-CLIP-E-shaped config (post-norm, fused qkv, MLP ratio
          8.57, exact GELU) vs the torch module tree of BLIP3o's eva_vit.py (the reference built in
          tests/test_eva_clip.py; attention through torch SDPA, the CPU counterpart of the original's xformers
          kernel), same weights.
  siglip  blip3o_jax.models.siglip vs transformers' SiglipVisionModel (sdpa), same weights, last-layer output
          (`--siglip_depth 0` skips it).

Reports images/s after warm-up (median of --iters rounds that alternate ours and the reference, so load on a shared
machine hits both alike; block_until_ready), the median per-round speedup, first-call (compile) time, analytic
FLOPs (2 per multiply-add; patch embed, qkv/proj, attention scores and values, MLP), achieved GFLOP/s and the
fraction of the machine's f32 matmul peak measured in the same run (before and after; the larger) per framework. Also the analytic cost of
the real EVA-CLIP-E/14-plus at 448 px and the time per image it implies at our measured rate. Last line: one
JSON object.

  python tools/bench_vision.py                      # ~1-2 min on 2 CPU cores
  python tools/bench_vision.py --width 512 --depth 8 --batch 4 --iters 3
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from blip3o_jax import convert, models, profiling  # noqa: E402
from blip3o_jax.benchmarking import emit, jax_matmul_peak, paired_times, torch_matmul_peak  # noqa: E402
from blip3o_jax.models.eva_clip import EvaClipConfig  # noqa: E402


def max_rel_diff(ours, ref) -> float:
    """max|ours - ref| / max|ref|: both sides ran the same weights on the same images."""
    ours, ref = np.asarray(ours, np.float32), ref.float().numpy()
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def vit_flops(tokens, width, depth, mlp_dim, patch_in, patches):
    """Forward FLOPs per image of a ViT with fused qkv: 2 x multiply-adds."""
    per_block = 2 * tokens * width * 3 * width + 4 * tokens * tokens * width + 2 * tokens * width * width
    per_block += 4 * tokens * width * mlp_dim
    return depth * per_block + 2 * patches * patch_in * width


def bench_eva(args, torch):
    import test_eva_clip as ref_lib

    cfg = EvaClipConfig(image_size=args.image_size, patch_size=args.patch, width=args.width, layers=args.depth,
                        head_width=args.head_width, mlp_ratio=args.mlp_ratio, dtype=args.dtype, param_dtype=args.dtype,
                        scan_layers=args.scan)
    ref = ref_lib.randomize(ref_lib.RefEVAVisionTransformer(cfg), std=0.02).eval()

    def sdpa_forward(self, x):  # same math as the reference's explicit softmax, through torch's fused kernel
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))

    for m in ref.modules():
        if isinstance(m, ref_lib.RefAttention):
            m.forward = sdpa_forward.__get__(m)
    params = convert.from_torch("eva_clip", {k: v.detach().numpy() for k, v in ref.state_dict().items()}, cfg)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.dtype(args.dtype)), params)
    images = np.random.default_rng(0).normal(size=(args.batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    module = models.build("eva_clip", cfg)
    fwd = jax.jit(lambda p, x: module.apply({"params": p}, x))
    x = jax.device_put(images)
    images_t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    with torch.inference_mode():
        times = paired_times(lambda: fwd(params, x), lambda: ref(images_t), args.iters)
        max_rel = max_rel_diff(fwd(params, x), ref(images_t))
    flops = vit_flops(cfg.num_patches + 1, cfg.width, cfg.layers, cfg.mlp_dim, 3 * cfg.patch_size**2, cfg.num_patches)
    full = EvaClipConfig()
    full_flops = vit_flops(full.num_patches + 1, full.width, full.layers, full.mlp_dim, 3 * full.patch_size**2, full.num_patches)
    runs = {"ours_eva": ("jax", lambda: fwd(params, x)), "torch_eva": ("torch", torch.inference_mode()(lambda: ref(images_t)))}
    return cfg, times, flops, full_flops, max_rel, runs


def bench_siglip(args, torch):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    hf_cfg = SiglipVisionConfig(hidden_size=args.width, intermediate_size=args.siglip_mlp, num_hidden_layers=args.siglip_depth,
                                num_attention_heads=args.width // args.head_width, image_size=args.siglip_image_size,
                                patch_size=args.siglip_patch, vision_use_head=False)
    hf_cfg._attn_implementation = "sdpa"
    ref = SiglipVisionModel(hf_cfg).eval()
    cfg = models.config_from_hf("siglip_vision", hf_cfg.to_dict())
    cfg = dataclasses.replace(cfg, dtype=args.dtype, param_dtype=args.dtype, scan_layers=args.scan)
    params = convert.from_torch("siglip_vision", {k: v.detach().numpy() for k, v in ref.state_dict().items()}, cfg)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.dtype(args.dtype)), params)
    images = np.random.default_rng(0).normal(size=(args.batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    module = models.build("siglip_vision", cfg)
    fwd = jax.jit(lambda p, x: module.apply({"params": p}, x))
    x = jax.device_put(images)
    images_t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    with torch.inference_mode():
        times = paired_times(lambda: fwd(params, x), lambda: ref(pixel_values=images_t).last_hidden_state, args.iters)
        max_rel = max_rel_diff(fwd(params, x), ref(pixel_values=images_t).last_hidden_state)
    n = cfg.num_patches
    # separate q/k/v projections have the same FLOPs as a fused one
    flops = vit_flops(n, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, 3 * cfg.patch_size**2, n)
    runs = {"ours_siglip": ("jax", lambda: fwd(params, x)),
            "torch_siglip": ("torch", torch.inference_mode()(lambda: ref(pixel_values=images_t).last_hidden_state))}
    return cfg, times, flops, max_rel, runs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--width", type=int, default=768, help="EVA-CLIP width")
    ap.add_argument("--depth", type=int, default=12, help="EVA-CLIP blocks")
    ap.add_argument("--head_width", "--head-width", type=int, default=64, help="EVA-CLIP head width")
    ap.add_argument("--mlp_ratio", "--mlp-ratio", type=float, default=8.571428571428571,
                    help="EVA-CLIP MLP width / width")
    ap.add_argument("--image_size", "--image-size", type=int, default=224, help="EVA-CLIP input side, px")
    ap.add_argument("--patch", type=int, default=14, help="EVA-CLIP patch side, px")
    ap.add_argument("--batch", type=int, default=4, help="images per call")
    ap.add_argument("--iters", type=int, default=3, help="timed calls (median reported)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="ours; the reference is f32")
    ap.add_argument("--siglip_depth", "--siglip-depth", type=int, default=6, help="0 skips the SigLIP comparison")
    ap.add_argument("--siglip_mlp", "--siglip-mlp", type=int, default=3072, help="SigLIP MLP width")
    ap.add_argument("--siglip_image_size", "--siglip-image-size", type=int, default=224, help="SigLIP input side, px")
    ap.add_argument("--siglip_patch", "--siglip-patch", type=int, default=16, help="SigLIP patch side, px")
    ap.add_argument("--scan", action=argparse.BooleanOptionalAction, default=False,
                    help="scan ours' layers (nn.scan; the accelerator configs' default). Default: unrolled, as the CPU "
                         "configs: in a scanned stack XLA:CPU copies each layer's weights out of the stack")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="write per-op profiles of ours and the reference to DIR (traces, optimised HLO, per-op "
                         "tables by kind; blip3o_jax/profiling.py), taken after the timed runs")
    ap.add_argument("--profile_calls", "--profile-calls", type=int, default=3, help="profiled calls per run")
    args = ap.parse_args()
    if args.profile:
        profiling.enable_hlo_dump(args.profile)  # before the first compile

    import torch

    result = {"bench": "vision", "scan": args.scan, "device": str(jax.devices()[0].device_kind), "jax_backend": jax.default_backend(),
              "torch_threads": torch.get_num_threads(), "dtype": args.dtype, "batch": args.batch, "iters": args.iters}
    peaks = [(jax_matmul_peak(dtype=jnp.dtype(args.dtype)), torch_matmul_peak())]

    def section(cfg_desc, times, flops):
        ips_o, ips_t = args.batch / times["ours_s"], args.batch / times["ref_s"]
        return {"config": cfg_desc, "gflops_per_image": flops / 1e9,
                "ours_images_per_s": ips_o, "ref_images_per_s": ips_t, "speedup_median_of_rounds": times["ratio"],
                "ours_gflops_per_s": ips_o * flops / 1e9, "ref_gflops_per_s": ips_t * flops / 1e9,
                "ours_first_call_s": times["ours_first_call_s"], "ref_first_call_s": times["ref_first_call_s"]}

    cfg, times, flops, full_flops, max_rel, runs = bench_eva(args, torch)
    eva = section({"width": cfg.width, "depth": cfg.layers, "heads": cfg.num_heads, "mlp": cfg.mlp_dim,
                   "image": cfg.image_size, "patch": cfg.patch_size, "tokens": cfg.num_patches + 1}, times, flops)
    eva.update(max_rel_diff_vs_ref=max_rel, eva_clip_e_448_gflops_per_image=full_flops / 1e9,
               eva_clip_e_448_s_per_image_at_ours_rate=full_flops / (eva["ours_gflops_per_s"] * 1e9))
    result["eva"] = eva
    if args.siglip_depth > 0:
        scfg, stimes, sflops, smax_rel, siglip_runs = bench_siglip(args, torch)
        runs.update(siglip_runs)
        result["siglip"] = section({"width": scfg.hidden_size, "depth": scfg.num_hidden_layers,
                                    "mlp": scfg.intermediate_size, "image": scfg.image_size, "patch": scfg.patch_size,
                                    "tokens": scfg.num_patches}, stimes, sflops)
        result["siglip"]["max_rel_diff_vs_ref"] = smax_rel
    # peaks again after the work: on a shared machine the larger of the two is the better estimate of the hardware
    peaks.append((jax_matmul_peak(dtype=jnp.dtype(args.dtype)), torch_matmul_peak()))
    jax_peak, torch_peak = max(p[0] for p in peaks), max(p[1] for p in peaks)
    result.update(jax_matmul_peak_gflops=jax_peak / 1e9, torch_matmul_peak_gflops=torch_peak / 1e9)
    for name in ("eva", "siglip"):
        if name in result:
            r = result[name]
            r["ours_frac_of_jax_peak"] = r["ours_gflops_per_s"] * 1e9 / jax_peak
            r["ref_frac_of_torch_peak"] = r["ref_gflops_per_s"] * 1e9 / torch_peak
            print(f"{name:7s} {r['config']['width']}w x {r['config']['depth']}L @ {r['config']['image']}px batch "
                  f"{args.batch}: ours {r['ours_images_per_s']:.2f} img/s ({r['ours_gflops_per_s']:.0f} GFLOP/s, "
                  f"{100 * r['ours_frac_of_jax_peak']:.0f}% of jax peak), reference {r['ref_images_per_s']:.2f} img/s "
                  f"({r['ref_gflops_per_s']:.0f} GFLOP/s, {100 * r['ref_frac_of_torch_peak']:.0f}% of torch peak), "
                  f"speedup {r['speedup_median_of_rounds']:.2f}x", flush=True)
    if args.profile:
        result["profile"] = profiling.profile_runs(args.profile, runs, calls=args.profile_calls)
    emit(result)


if __name__ == "__main__":
    from blip3o_jax import hostmem

    hostmem.keep_freed_memory()  # both sides share the process: see blip3o_jax/hostmem.py
    main()
