"""DiT training-step and sampling throughput: ours (JAX) vs the original's PyTorch composition, one run.

  ours   models/dit.py + diffusion/flow_matching.py: one jitted train step (flow-matching loss, grad, AdamW,
         donated state), and the 30-step Euler + CFG sampler as one jitted `fori_loop`
  torch  diffusers `PixArtAlphaTextProjection` + `LuminaNextDiT2DModel(cross_attention_dim=dim)` composed as
         BLIP3o's `NextDiTCrossAttn`, the original's training-loss code with
         torch.optim.AdamW, and the original's `sample_images` loop with `FlowMatchEulerDiscreteScheduler`

Both in fp32 on the same inputs and the same machine. Reports median seconds per step after warm-up (first call =
compile reported separately), each side alone and then in rounds that alternate ours and torch (the speed-ups are
the median per-round ratios of those rounds, so load from other processes hits both alike), samples/s, the analytic FLOPs (`dit.flops_per_sample`, backward = 2x forward),
achieved FLOP/s and the fraction of the matmul peak measured in this run. Last line: one JSON object.

  python tools/bench_dit.py                       # ~46M params: dim 512, 8 layers, 8 heads, 64 tokens, batch 16
  python tools/bench_dit.py --layers 2 --iters 3  # quick look
  python tools/bench_dit.py --preset gpu --dtype bfloat16 --attention cudnn   # on a GPU (tools/gpu_check.sh)

On a GPU the PyTorch side runs on CUDA (`torch.cuda.is_available()`). `--dtype bfloat16` is mixed precision on both
sides: fp32 parameters and AdamW state, bf16 compute (ours: the config's `dtype`; torch: `torch.autocast(bfloat16)`,
SDPA attention in diffusers' `LuminaAttnProcessor2_0`); `--attention cudnn` gives ours cuDNN flash attention; the
matmul peaks are then measured in bf16 (8192^3 on a GPU).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from blip3o_jax import benchmarking, profiling  # noqa: E402
from blip3o_jax.diffusion import flow_matching as fm  # noqa: E402
from blip3o_jax.models import dit as dit_lib  # noqa: E402


# `--preset gpu`: the 8B release's DiT width, heads and 8x8x1792 grid at 8 of its 24 layers, 3584-wide conditioning,
# batch 64: a step of ~10 TFLOP, enough that an H100/H200 is not idle; scanned as on the accelerator configs
GPU_PRESET = dict(dim=1792, layers=8, heads=28, in_channels=1792, cond_dim=3584, batch=64, sample_batch=16, iters=10,
                  scan=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dim", type=int, default=512, help="DiT width")
    p.add_argument("--layers", type=int, default=8, help="DiT blocks")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--kv_heads", "--kv-heads", type=int, default=None, help="key/value heads (None: as --heads)")
    p.add_argument("--input_size", "--input-size", type=int, default=8,
                   help="grid side: input_size^2 tokens at patch 1")
    p.add_argument("--patch_size", "--patch-size", type=int, default=1, help="DiT patch side")
    p.add_argument("--in_channels", "--in-channels", type=int, default=512, help="channels of the input grid")
    p.add_argument("--cond_tokens", "--cond-tokens", type=int, default=64, help="conditioning tokens (query states)")
    p.add_argument("--cond_dim", "--cond-dim", type=int, default=512, help="width of the conditioning tokens")
    p.add_argument("--batch", type=int, default=16, help="training batch size")
    p.add_argument("--iters", type=int, default=5, help="timed runs (median reported)")
    p.add_argument("--sample_steps", "--sample-steps", type=int, default=30,
                   help="Euler steps of the sampling benchmark")
    p.add_argument("--sample_batch", "--sample-batch", type=int, default=1,
                   help="images per sampling call (the original: 1)")
    p.add_argument("--remat", action="store_true", help="rematerialise blocks in ours")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=False,
                   help="scan ours' layers (nn.scan; the accelerator configs' default). Default: unrolled, as the CPU "
                        "configs (a scanned step runs ~20%% slower on XLA:CPU)")
    p.add_argument("--skip_torch", "--skip-torch", action="store_true", help="time ours only (no diffusers reference)")
    benchmarking.add_accelerator_flags(
        p, GPU_PRESET, "compute dtype of both sides (parameters and optimizer state stay fp32; torch: autocast)")
    benchmarking.add_profile_flags(p)
    return benchmarking.parse_with_preset(p, argv, GPU_PRESET)


def make_config(a) -> dit_lib.DiTConfig:
    return dit_lib.DiTConfig(
        input_size=a.input_size, patch_size=a.patch_size, in_channels=a.in_channels, dim=a.dim, n_layers=a.layers,
        n_heads=a.heads, n_kv_heads=a.kv_heads or a.heads, latent_embedding_size=a.cond_dim, remat=a.remat,
        scan_layers=a.scan, dtype=a.dtype, attention_impl=a.attention,
    )


# ------------------------------------------------------------------------------------------------------------
# ours


def bench_ours(cfg, a, x0, cond):
    module = dit_lib.DiT(cfg)
    apply_fn = fm.dit_apply_fn(module)
    fm_cfg = fm.FlowMatchingConfig()
    params = jax.tree.map(jnp.asarray, dit_lib.init_params(cfg, jax.random.PRNGKey(0)))
    opt = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    opt_state = opt.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, x0, cond, rng):
        (loss, _), grads = jax.value_and_grad(fm.training_loss, argnums=1, has_aux=True)(
            apply_fn, params, x0, cond, rng, fm_cfg)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    state = {"params": params, "opt": opt_state, "i": 0}

    def run_train():
        state["i"] += 1
        state["params"], state["opt"], loss = train_step(state["params"], state["opt"], x0, cond,
                                                         jax.random.PRNGKey(state["i"]))
        return loss

    train = benchmarking.time_it(run_train, warmup=2, iters=a.iters)

    shape = (a.sample_batch, cfg.input_size, cfg.input_size, cfg.in_channels)
    sampler = jax.jit(functools.partial(fm.sample, apply_fn, shape=shape, cfg=fm_cfg, num_steps=a.sample_steps))
    sample_cond = cond[: a.sample_batch]
    run_sample = lambda: sampler(state["params"], sample_cond, jax.random.PRNGKey(0))  # noqa: E731
    sample = benchmarking.time_it(run_sample, warmup=1, iters=max(3, a.iters // 2))
    return train, sample, dit_lib.count_params(params), {"ours_train": run_train, "ours_sample": run_sample}


# ------------------------------------------------------------------------------------------------------------
# torch reference


def bench_torch(cfg, a, x0, cond):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.models.embeddings import PixArtAlphaTextProjection, get_2d_rotary_pos_embed_lumina
    from diffusers.models.transformers.lumina_nextdit2d import LuminaNextDiT2DModel

    class NextDiTCrossAttn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.caption_projection = PixArtAlphaTextProjection(cfg.latent_embedding_size, cfg.dim)
            self.model = LuminaNextDiT2DModel(
                sample_size=cfg.input_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                hidden_size=cfg.dim, num_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_kv_heads=cfg.kv_heads, multiple_of=cfg.multiple_of, ffn_dim_multiplier=cfg.ffn_dim_multiplier,
                norm_eps=cfg.norm_eps, learn_sigma=False, qk_norm=cfg.qk_norm, cross_attention_dim=cfg.dim)
            self.model.pad_token.data.zero_()  # unused by forward; torch.empty may hold NaNs that AdamW would touch
            self.freqs_cis = get_2d_rotary_pos_embed_lumina(cfg.head_dim, 384, 384)

        def forward(self, x, t, z):
            mask = torch.ones(z.shape[:2], device=z.device)
            return self.model(x, t, self.caption_projection(z), mask, self.freqs_cis, cross_attention_kwargs={}).sample

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # mixed precision as ours: fp32 parameters and AdamW state, bf16 compute
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=a.dtype == "bfloat16")

    def sync(x):
        if device.type == "cuda":
            torch.cuda.synchronize()
        return x

    torch.manual_seed(0)
    model = NextDiTCrossAttn().to(device)
    model.freqs_cis = model.freqs_cis.to(device)  # a plain attribute, not a buffer: .to() leaves it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    latents = torch.from_numpy(np.asarray(x0)).permute(0, 3, 1, 2).contiguous().to(device)
    z = torch.from_numpy(np.asarray(cond)).to(device)

    def train_step():
        # the original's loss (blip3o_qwen.py): u -> index -> timesteps, sigma lookup, mask_drop(0.1)
        bsz = latents.shape[0]
        noise = torch.randn_like(latents)
        u = torch.rand(size=(bsz,))
        indices = (u * sched.config.num_train_timesteps).long()
        timesteps = sched.timesteps[indices].to(device)
        sigmas = (timesteps / 1000.0).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        keep = 1 - torch.bernoulli(torch.zeros(bsz, device=device) + 0.1)
        with autocast():
            pred = model(noisy, timesteps, z * keep.view(-1, 1, 1))
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    train = benchmarking.time_it(train_step, warmup=2, iters=a.iters, sync=lambda x: x)

    zs = z[: a.sample_batch]
    model.eval()

    @torch.no_grad()
    def sample_images():
        s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        cond_in = torch.cat([torch.zeros_like(zs), zs], 0)
        x = torch.randn(a.sample_batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
        s.set_timesteps(a.sample_steps, sigmas=np.linspace(1.0, 1 / a.sample_steps, a.sample_steps))
        for t in s.timesteps:
            x_in = x.repeat(2, 1, 1, 1)
            with autocast():
                v = model(x_in, t.unsqueeze(0).expand(x_in.shape[0]).to(device=device, dtype=torch.long), cond_in)
            v = v.float()  # the Euler update in fp32, as ours
            v_u, v_c = v.chunk(2)
            x = s.step(v_u + 3.0 * (v_c - v_u), t, x).prev_sample
        return x

    sample = benchmarking.time_it(sample_images, warmup=1, iters=max(3, a.iters // 2), sync=sync)

    def train_then_eval():  # the profiled train step runs in train mode, sampling in eval mode, as timed
        model.train()
        out = train_step()
        model.eval()
        return out
    runs = {"torch_train": train_then_eval, "torch_sample": sample_images}
    return train, sample, sum(p.numel() for p in model.parameters() if p is not model.model.pad_token), \
        torch.get_num_threads(), runs, sync


def main(argv=None):
    a = parse_args(argv)
    if a.profile:
        profiling.enable_hlo_dump(a.profile)  # before the first compile
    cfg = make_config(a)
    rs = np.random.RandomState(0)
    x0 = jnp.asarray(rs.randn(a.batch, cfg.input_size, cfg.input_size, cfg.in_channels).astype(np.float32))
    cond = jnp.asarray(rs.randn(a.batch, a.cond_tokens, a.cond_dim).astype(np.float32))
    flops = dit_lib.flops_per_sample(cfg, a.cond_tokens)
    train_flops = flops["train_step"] * a.batch
    sample_flops = flops["forward"] * 2 * a.sample_batch * a.sample_steps

    # in the compute dtype; on a GPU at 8192^3 (2048^3 leaves an H100 mostly idle)
    peak_n = 8192 if jax.devices()[0].platform == "gpu" else 2048
    jax_peak = benchmarking.jax_matmul_peak(n=peak_n, dtype=jnp.dtype(a.dtype))
    t0 = time.perf_counter()
    ours_train, ours_sample, n_params, runs = bench_ours(cfg, a, x0, cond)
    runs = {name: ("jax", fn) for name, fn in runs.items()}
    torch_sync = None
    print(f"ours: {n_params / 1e6:.1f}M params; train step {ours_train['median_s'] * 1e3:.1f} ms "
          f"(compile {ours_train['first_call_s']:.1f} s), {a.sample_steps}-step CFG sampling "
          f"{ours_sample['median_s'] * 1e3:.1f} ms  [{time.perf_counter() - t0:.0f} s]", flush=True)
    result = {
        "benchmark": "dit",
        "config": {"dim": cfg.dim, "layers": cfg.n_layers, "heads": cfg.n_heads, "kv_heads": cfg.kv_heads,
                   "tokens": cfg.num_tokens, "in_channels": cfg.in_channels, "cond": [a.cond_tokens, a.cond_dim],
                   "ffn_dim": cfg.ffn_dim, "batch": a.batch, "remat": a.remat, "params": n_params,
                   "sample_steps": a.sample_steps, "sample_batch": a.sample_batch},
        "device": jax.devices()[0].device_kind,
        "dtype": a.dtype, "attention": a.attention, "preset": a.preset, "scan": a.scan,
        "train_gflops_per_step": train_flops / 1e9,
        "sample_gflops_per_call": sample_flops / 1e9,
        "jax_matmul_peak_gflops": jax_peak / 1e9,
        "ours": {
            "train_step_s": ours_train["median_s"], "train_compile_s": ours_train["first_call_s"],
            "train_samples_per_s": a.batch / ours_train["median_s"],
            "train_gflops": train_flops / ours_train["median_s"] / 1e9,
            "train_frac_of_peak": train_flops / ours_train["median_s"] / jax_peak,
            "sample_s": ours_sample["median_s"], "sample_compile_s": ours_sample["first_call_s"],
            "sample_gflops": sample_flops / ours_sample["median_s"] / 1e9,
        },
    }
    if not a.skip_torch:
        import torch

        torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch_peak = benchmarking.torch_matmul_peak(n=peak_n, dtype=getattr(torch, a.dtype), device=torch_device)
        t0 = time.perf_counter()
        ref_train, ref_sample, ref_params, threads, ref_runs, torch_sync = bench_torch(cfg, a, x0, cond)
        runs.update({name: ("torch", fn) for name, fn in ref_runs.items()})
        print(f"torch: {ref_params / 1e6:.1f}M params; train step {ref_train['median_s'] * 1e3:.1f} ms, "
              f"sampling {ref_sample['median_s'] * 1e3:.1f} ms ({threads} threads)  "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)
        assert ref_params == n_params, (ref_params, n_params)
        result["torch_matmul_peak_gflops"] = torch_peak / 1e9
        result["torch"] = {
            "train_step_s": ref_train["median_s"], "train_samples_per_s": a.batch / ref_train["median_s"],
            "train_gflops": train_flops / ref_train["median_s"] / 1e9,
            "train_frac_of_peak": train_flops / ref_train["median_s"] / torch_peak,
            "sample_s": ref_sample["median_s"], "sample_gflops": sample_flops / ref_sample["median_s"] / 1e9,
            "threads": threads, "torch_version": torch.__version__, "device": str(torch_device),
        }
        # the speed-ups from rounds that alternate ours and torch (the solo timings above ran one side, then the
        # other: load from other processes would hit them unevenly); medians and the median per-round ratio
        sync_t = torch_sync or (lambda x: x)
        paired = {
            "train": benchmarking.paired_times(runs["ours_train"][1], lambda: sync_t(ref_runs["torch_train"]()),
                                               a.iters),
            "sample": benchmarking.paired_times(runs["ours_sample"][1], lambda: sync_t(ref_runs["torch_sample"]()),
                                                max(3, a.iters // 2)),
        }
        result["paired_rounds"] = {k: {"ours_s": v["ours_s"], "torch_s": v["ref_s"], "ratio": v["ratio"]}
                                   for k, v in paired.items()}
        result["train_speedup"] = paired["train"]["ratio"]
        result["sample_speedup"] = paired["sample"]["ratio"]
        result["train_speedup_solo_runs"] = ref_train["median_s"] / ours_train["median_s"]
        result["sample_speedup_solo_runs"] = ref_sample["median_s"] / ours_sample["median_s"]
        print(f"alternating rounds: train step ours {paired['train']['ours_s'] * 1e3:.1f} ms vs torch "
              f"{paired['train']['ref_s'] * 1e3:.1f} ms ({paired['train']['ratio']:.2f}x), sampling ours "
              f"{paired['sample']['ours_s'] * 1e3:.1f} ms vs torch {paired['sample']['ref_s'] * 1e3:.1f} ms "
              f"({paired['sample']['ratio']:.2f}x)", flush=True)
    if a.profile:
        result["profile"] = profiling.profile_runs(a.profile, runs, calls=a.profile_calls,
                                                   torch_sync=torch_sync or (lambda x: x))
    benchmarking.emit(result)


if __name__ == "__main__":
    from blip3o_jax import hostmem

    hostmem.keep_freed_memory()  # both sides share the process: see blip3o_jax/hostmem.py
    main()
