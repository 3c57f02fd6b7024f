"""End-to-end text-to-image throughput of `blip3o-sample t2i`: ours (JAX, jit) vs the PyTorch composition of the
same weights, side by side in one run, on the tiny release (tools/make_tiny_release.py).

One image = the whole chain: prompt in the chat template -> LLM with the latent queries -> DiT (`--dit_steps`
Euler steps, CFG 3.0) -> EVA-CLIP feature grid -> SDXL-architecture decoder (`--decoder_steps` Euler steps, CFG
3.0, the DiT's empty-prompt sample as the negative) -> VAE -> uint8 pixels.

  ours  the CLI's own pipeline functions (`sample.load_generator`, `replicated_generator`, `generate_images`):
        `--batch` prompts per call, one device, jitted, timed after a warm-up call (compile reported apart)
  ref   the original's composition in PyTorch (transformers Qwen2.5-VL, the DiT from diffusers' Lumina-Next
        layers, diffusers UNet2DConditionModel / AutoencoderKL / EulerDiscreteScheduler), one prompt at a time as
        the original's `inference.py` runs it; the class `TorchBlip3o` of tests/test_sample.py, which checks our
        pixels against it

Both sides draw the same initial noise and use the same `--negative original` features, computed once outside
the clock (the CLI computes them once per run). Timing: `--iters` rounds that alternate ours and the reference
(load changes on a shared machine hit both alike), medians; `t2i_speedup` = our images/s / the reference's
images/s (> 1: ours is faster). Also reported: the mean |ours - reference| in grey levels (same weights and noise:
a sanity check that both sides did the same work) and each framework's f32 matmul peak measured in the same run.

The tiny release is toy-sized (LLM width 64, 32 px images): fixed per-call costs (Python, dispatch, the small
matmuls) dominate, so the ratio says how lean each pipeline is, not how the 8B model runs on an accelerator.
On a machine shared with other jobs the absolute figures are noisy, and PyTorch's OpenMP threads suffer most when
the cores are oversubscribed (each small op waits at a barrier for a descheduled thread): there `--torch_threads 1`
gives the reference its fairest figure; both settings are worth a run. Last line: one JSON object.

  python tools/bench_sample.py                      # 30 + 50 steps, batch 4, 3 rounds: a few minutes on 2 cores
  python tools/bench_sample.py --quick              # 2 + 2 steps, batch 2, 1 round (the test)
  python tools/bench_sample.py --release DIR        # an existing tiny release instead of a fresh one
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import numpy as np  # noqa: E402

PROMPTS = ("a red circle", "a small green square", "a blue star on white", "a large yellow hexagon",
           "two purple triangles", "an orange heart on grey", "a cyan cross", "a white moon at night")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--release", default=None, help="an existing tiny release (default: a fresh one in a tempdir)")
    p.add_argument("--dit_steps", type=int, default=30)
    p.add_argument("--decoder_steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=4, help="prompts per call of ours (the reference runs them one by one)")
    p.add_argument("--iters", type=int, default=3, help="timed rounds (each: ours once, the reference once)")
    p.add_argument("--torch_threads", type=int, default=None, help="default: all cores (as XLA's CPU backend)")
    p.add_argument("--quick", action="store_true", help="2 + 2 steps, batch 2, 1 round (a smoke run, not a "
                   "measurement)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="write per-op profiles of ours and the reference to DIR (traces, optimised HLO, per-op tables "
                        "by kind; blip3o_jax/profiling.py), taken after the timed rounds")
    p.add_argument("--profile_calls", "--profile-calls", type=int, default=1, help="profiled calls per run")
    a = p.parse_args(argv)
    if a.profile:
        from blip3o_jax import profiling

        profiling.enable_hlo_dump(a.profile)  # before the first compile
    if a.quick:
        a.dit_steps, a.decoder_steps, a.batch, a.iters = 2, 2, 2, 1
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import jax
    import torch

    from blip3o_jax import benchmarking, sample
    from blip3o_jax.data import prompts as prompts_lib
    import make_tiny_release
    from test_sample import TorchBlip3o, jax_noise

    tmp = None
    release = a.release
    if release is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_sample-")
        release = make_tiny_release.make_tiny_release(os.path.join(tmp.name, "tiny"))
    captions = [PROMPTS[i % len(PROMPTS)] for i in range(a.batch)]
    seed, guidance = 0, 3.0

    # ---- ours: the CLI's pipeline functions
    t0 = time.perf_counter()
    gen = sample.load_generator(release, "sdxl", "float32", "chatml")
    devices = sample.local_devices(1)
    gen = sample.replicated_generator(gen, devices)
    size = sample.decoder_native_resolution(os.path.join(release, "diffusion-decoder"))
    settings = {"seed": seed, "dit_steps": a.dit_steps, "dit_guidance": guidance, "decoder_steps": a.decoder_steps,
                "decoder_guidance": guidance, "resolution": size}
    negative = sample.negative_features(gen, settings)
    load_ours_s = time.perf_counter() - t0
    buckets = sample.length_buckets(gen.max_length)
    length = next(b for b in buckets if b >= max(len(sample._prompt_ids(gen, c)) for c in captions))  # noqa: SLF001
    indices, ks = list(range(a.batch)), [0] * a.batch

    def ours():
        return sample.generate_images(gen, devices, captions, indices, ks, length, settings, negative)

    # ---- the reference: the same weights composed in PyTorch, batch 1
    t0 = time.perf_counter()
    ref = TorchBlip3o(release)
    torch.set_num_threads(a.torch_threads or os.cpu_count() or 1)
    torch.set_flush_denormal(True)  # as XLA's CPU runtime runs its programs (denormals would slow only one side)
    tok = sample._tokenizer(release)  # noqa: SLF001
    nq = ref.queries.shape[1]
    grid = (ref.dit_cfg["input_size"],) * 2 + (ref.dit_cfg["in_channels"],)
    latent = (size // gen.decoder.vae_scale_factor,) * 2 + (int(gen.decoder.unet.cfg.in_channels),)
    ids_special = prompts_lib.special_ids(tok)
    ref_negative = ref.dit_sample(ref.query_states([ids_special.image_start]),
                                  jax_noise(seed, sample.NEGATIVE_INDEX, 0, grid, 0), a.dit_steps, guidance)
    rows = [(prompts_lib.t2i_prompt_ids(tok, c, nq, prompt_format="chatml")[:-nq],  # ... [IMG]
             jax_noise(seed, i, 0, grid, 0), jax_noise(seed, i, 0, latent, 1)) for i, c in enumerate(captions)]
    load_ref_s = time.perf_counter() - t0

    def reference():
        return np.stack([ref.decode(ref.dit_sample(ref.query_states(ids), dit_noise, a.dit_steps, guidance),
                                    ref_negative, dec_noise, a.decoder_steps, guidance, size)
                         for ids, dit_noise, dec_noise in rows])

    t = benchmarking.paired_times(ours, reference, a.iters, sync=lambda x: x)  # both return host numpy arrays
    ours_images, ref_images = ours(), reference()
    diff = np.abs(ours_images.astype(np.int64) - ref_images)
    ours_ips, ref_ips = a.batch / t["ours_s"], a.batch / t["ref_s"]
    peak_n = 512 if a.quick else 2048
    jax_peak, torch_peak = benchmarking.jax_matmul_peak(peak_n), benchmarking.torch_matmul_peak(peak_n)

    print(f"t2i on the tiny release ({size} px; {a.dit_steps} DiT + {a.decoder_steps} decoder steps, CFG {guidance}; "
          f"{jax.devices()[0].platform}, torch {torch.get_num_threads()} threads)")
    print(f"  {'':6} {'s/call':>9} {'images/s':>9} {'first call s':>13} {'load s':>7}")
    print(f"  {'ours':6} {t['ours_s']:9.3f} {ours_ips:9.2f} {t['ours_first_call_s']:13.2f} {load_ours_s:7.2f}"
          f"   (batch {a.batch}, one call)")
    print(f"  {'ref':6} {t['ref_s']:9.3f} {ref_ips:9.2f} {t['ref_first_call_s']:13.2f} {load_ref_s:7.2f}"
          f"   ({a.batch} prompts one by one)")
    print(f"  speed-up {ours_ips / ref_ips:.2f}x (median of per-round ratios {t['ratio']:.2f}x); "
          f"mean |ours - ref| {diff.mean():.3f} grey levels, max {int(diff.max())}")
    print(f"  f32 matmul peak ({peak_n}^3): jax {jax_peak / 1e9:.1f} GFLOP/s, torch {torch_peak / 1e9:.1f} GFLOP/s")
    profile = None
    if a.profile:
        profile = profiling.profile_runs(a.profile, {"ours_t2i": ("jax", ours), "torch_t2i": ("torch", reference)},
                                         calls=a.profile_calls)
    if tmp is not None:
        tmp.cleanup()
    benchmarking.emit({
        "benchmark": "sample_t2i", "quick": a.quick, "platform": jax.devices()[0].platform,
        "resolution": size, "dit_steps": a.dit_steps, "decoder_steps": a.decoder_steps, "guidance": guidance,
        "batch": a.batch, "iters": a.iters, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "ours_s_per_call": t["ours_s"], "ref_s_per_call": t["ref_s"],
        "ours_images_per_s": ours_ips, "ref_images_per_s": ref_ips,
        "ours_first_call_s": t["ours_first_call_s"], "ref_first_call_s": t["ref_first_call_s"],
        "ours_load_s": load_ours_s, "ref_load_s": load_ref_s,
        "mean_abs_diff_grey_levels": float(diff.mean()), "max_abs_diff_grey_levels": int(diff.max()),
        "jax_matmul_peak_gflops": jax_peak / 1e9, "torch_matmul_peak_gflops": torch_peak / 1e9,
        "t2i_speedup_median_of_rounds": t["ratio"],
        "t2i_speedup": ours_ips / ref_ips,
        **({"profile": profile} if profile else {}),
    })


if __name__ == "__main__":
    from blip3o_jax import hostmem

    hostmem.keep_freed_memory()  # both sides share the process: see blip3o_jax/hostmem.py
    main()
