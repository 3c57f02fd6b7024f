"""BLIP3-o train-step throughput: ours (JAX) vs a PyTorch step composed the way the original composes it, one run.

  ours   blip3o_jax.training.step.make_train_step: one jitted step with the frozen Qwen3-style backbone (latent
         queries scattered into the prompt, final-norm states at the query slots), the DiT's flow-matching loss,
         AdamW (+ clipping) on the DiT and the queries, donated state
  torch  transformers `Qwen3ForCausalLM` (frozen; requires_grad False, activation gradients still flow to the
         queries) + `latent_queries` + diffusers `PixArtAlphaTextProjection` + `LuminaNextDiT2DModel
         (cross_attention_dim=dim)` (the original's `NextDiTCrossAttn`), the original's loss code,
         `clip_grad_norm_(1.0)` and `torch.optim.AdamW` over the trainable parameters

Same shapes, fp32, targets given (precomputed: no encoder in either step). Rounds alternate ours and torch so that
load on a shared machine hits both alike; medians after warm-up (first call = compile, reported separately),
`block_until_ready`. Reports steps/s, samples/s, the analytic FLOPs per step (training/metrics.py:
backbone forward + activation backward, DiT forward + backward), achieved FLOP/s and the fraction of each
framework's f32 matmul peak measured in the same run. Last line: one JSON object.

  python tools/bench_train.py                            # ~2-3 min on 2 CPU cores
  python tools/bench_train.py --hidden 256 --layers 2 --dit_layers 2 --iters 3
  python tools/bench_train.py --modes full,prefix,precomputed   # where the FLOPs go (issue 7), ours only
  python tools/bench_train.py --preset gpu --dtype bfloat16 --attention cudnn   # on a GPU (tools/gpu_check.sh)

On a GPU the PyTorch step runs on CUDA (`torch.cuda.is_available()`). `--dtype bfloat16` is bf16 compute on both
sides with the frozen backbone's weights in bf16 and the trainable parameters and AdamW state in fp32 (ours: the
configs' `dtype` and `train.frozen_param_dtype`, as the 8B recipe; torch: the backbone cast to `torch.bfloat16` and
`torch.autocast(bfloat16)`, SDPA attention); `--attention cudnn` gives ours cuDNN flash attention; the matmul peaks
are then measured in bf16 (8192^3 on a GPU).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from blip3o_jax import benchmarking, profiling  # noqa: E402
from blip3o_jax import sharding as shd  # noqa: E402
from blip3o_jax.data import pipeline as data_pipeline  # noqa: E402
from blip3o_jax.training import metrics as metrics_lib  # noqa: E402
from blip3o_jax.training import step as step_lib  # noqa: E402


# `--preset gpu`: a 2048x8 Qwen3-style backbone (16 heads of 128, 8 kv heads) over 256 tokens, the 8B release's DiT
# width and 8x8x1792 grid at 8 of its 24 layers, batch 32: ~18 TFLOP a step, enough that an H100/H200 is not idle;
# scanned as on the accelerator configs
GPU_PRESET = dict(batch=32, prompt_len=191, n_query=64, vocab=32000, hidden=2048, layers=8, heads=16, kv_heads=8,
                  head_dim=128, intermediate=6144, dit_dim=1792, dit_layers=8, dit_heads=28, grid=8, channels=1792,
                  iters=10, scan=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="global batch size")
    p.add_argument("--prompt_len", "--prompt-len", type=int, default=63,
                   help="prompt tokens before [IMG] and the query slots")
    p.add_argument("--n_query", "--n-query", type=int, default=64, help="latent queries")
    p.add_argument("--vocab", type=int, default=8192, help="backbone vocabulary size")
    p.add_argument("--hidden", type=int, default=512, help="backbone width")
    p.add_argument("--layers", type=int, default=4, help="backbone layers")
    p.add_argument("--heads", type=int, default=8, help="backbone attention heads")
    p.add_argument("--kv_heads", "--kv-heads", type=int, default=4, help="backbone key/value heads")
    p.add_argument("--head_dim", "--head-dim", type=int, default=64, help="backbone head dim")
    p.add_argument("--intermediate", type=int, default=1536, help="backbone MLP width")
    p.add_argument("--dit_dim", "--dit-dim", type=int, default=512, help="DiT width")
    p.add_argument("--dit_layers", "--dit-layers", type=int, default=4, help="DiT blocks")
    p.add_argument("--dit_heads", "--dit-heads", type=int, default=8, help="DiT attention heads")
    p.add_argument("--grid", type=int, default=8, help="target grid side (grid^2 DiT tokens)")
    p.add_argument("--channels", type=int, default=256, help="target channels (1792 for EVA-CLIP)")
    p.add_argument("--iters", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--skip_torch", "--skip-torch", action="store_true", help="time ours only (no PyTorch reference)")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=False,
                   help="scan ours' layers (nn.scan; the accelerator configs' default). Default: unrolled, as the CPU "
                        "configs (a scanned step runs ~20%% slower on XLA:CPU)")
    # issue 7: where a frozen-backbone step spends its FLOPs, ours only
    p.add_argument("--modes", default=None,
                   help="comma list of full,prefix,precomputed: time our step in each mode instead of ours vs "
                        "torch. full = full-sequence backbone pass + in-step EVA-CLIP targets; prefix = "
                        "prefix-cached queries + in-step targets; precomputed = prefix-cached queries + targets "
                        "read from the batch (no encoder)")
    p.add_argument("--image_size", "--image-size", type=int, default=112, help="--modes: EVA input side (patch 14)")
    p.add_argument("--eva_layers", "--eva-layers", type=int, default=6, help="--modes: EVA blocks (width = --channels)")
    p.add_argument("--eva_head_width", "--eva-head-width", type=int, default=64, help="--modes: EVA head width")
    benchmarking.add_accelerator_flags(
        p, GPU_PRESET, "compute dtype of both sides; bfloat16 also stores the frozen backbone in bf16 (trainable "
                        "parameters and optimizer state stay fp32)")
    benchmarking.add_profile_flags(p)
    return benchmarking.parse_with_preset(p, argv, GPU_PRESET)


def make_config(a) -> ml_collections.ConfigDict:
    seq = a.prompt_len + 1 + a.n_query
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        backbone_kind="qwen3",
        backbone=dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      head_dim=a.head_dim, tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                      scan_layers=a.scan, dtype=a.dtype, attention_impl=a.attention),
        n_query=a.n_query, target="precomputed", image_size=16, loss="clip_fm", query_path="full",
        dit=dict(input_size=a.grid, patch_size=1, in_channels=a.channels, dim=a.dit_dim, n_layers=a.dit_layers,
                 n_heads=a.dit_heads, n_kv_heads=a.dit_heads, multiple_of=256, scan_layers=a.scan, dtype=a.dtype,
                 attention_impl=a.attention),
    ))
    c.flow = ml_collections.ConfigDict(dict(cond_drop_prob=0.1))
    c.data = data_pipeline.default_config()
    c.data.datasets = [dict(name="bench", paths="unused", task="t2i")]
    c.data.global_batch_size = a.batch
    c.data.seq_buckets = (seq,)
    c.data.n_query = a.n_query
    c.train = ml_collections.ConfigDict(dict(total_steps=1000, lr=1e-4, min_lr=1e-5, warmup_steps=0,
                                             freeze_backbone=True, text_loss_weight=0.0, grad_clip_norm=1.0,
                                             frozen_param_dtype=a.dtype))
    c.log = ml_collections.ConfigDict(dict(sigma_buckets=5))
    return c


def make_batch(a, rs):
    seq = a.prompt_len + 1 + a.n_query
    ids = rs.randint(3, a.vocab, (a.batch, seq)).astype(np.int32)
    return {
        "input_ids": ids,
        "attention_mask": np.ones((a.batch, seq), np.int32),
        "positions": np.tile(np.arange(seq, dtype=np.int32), (a.batch, 1)),
        "query_index": np.tile(np.arange(seq - a.n_query, seq, dtype=np.int32), (a.batch, 1)),
        "task": np.zeros((a.batch,), np.int32),
        "sample_valid": np.ones((a.batch,), np.int32),
        "targets": rs.randn(a.batch, a.grid, a.grid, a.channels).astype(np.float32),
    }


# ------------------------------------------------------------------------------------------------------------
# torch


def torch_step_fn(a, mcfg, batch):
    import torch
    import transformers
    from diffusers.models.embeddings import PixArtAlphaTextProjection, get_2d_rotary_pos_embed_lumina
    from diffusers.models.transformers.lumina_nextdit2d import LuminaNextDiT2DModel

    from blip3o_jax.models import qwen as qwen_lib

    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = a.dtype == "bfloat16"
    torch.manual_seed(0)
    lm = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**qwen_lib.config_to_hf("qwen3", mcfg.backbone)))
    lm.config._attn_implementation = "sdpa"
    lm = lm.to(device=device, dtype=torch.bfloat16 if bf16 else torch.float32)  # frozen: stored in the compute dtype
    for p in lm.parameters():
        p.requires_grad_(False)
    d = mcfg.dit
    queries = torch.nn.Parameter(torch.randn(1, mcfg.n_query, d.latent_embedding_size))
    caption_projection = PixArtAlphaTextProjection(d.latent_embedding_size, d.dim)
    dit = LuminaNextDiT2DModel(
        sample_size=d.input_size, patch_size=d.patch_size, in_channels=d.in_channels, hidden_size=d.dim,
        num_layers=d.n_layers, num_attention_heads=d.n_heads, num_kv_heads=d.n_kv_heads, multiple_of=d.multiple_of,
        ffn_dim_multiplier=d.ffn_dim_multiplier, norm_eps=d.norm_eps, learn_sigma=False, qk_norm=d.qk_norm,
        cross_attention_dim=d.dim)
    freqs_cis = get_2d_rotary_pos_embed_lumina(d.dim // d.n_heads, 384, 384)
    queries = torch.nn.Parameter(queries.data.to(device))
    caption_projection, dit, freqs_cis = caption_projection.to(device), dit.to(device), freqs_cis.to(device)
    trainable = [queries, *caption_projection.parameters(), *dit.parameters()]
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = torch.from_numpy(batch["input_ids"]).long().to(device)
    mask = torch.from_numpy(batch["attention_mask"]).long().to(device)
    x0 = torch.from_numpy(batch["targets"]).permute(0, 3, 1, 2).contiguous().to(device)
    start = a.prompt_len + 1
    B = ids.shape[0]

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            embeds = lm.model.embed_tokens(ids)
            # as the original: the query slots' embeddings are replaced by the latent queries
            embeds = torch.cat([embeds[:, :start], queries.expand(B, -1, -1).to(embeds.dtype)], dim=1)
            hidden = lm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            cond = hidden[:, start:start + mcfg.n_query]
            cond = cond * (torch.rand(B, 1, 1, device=device) > 0.1).to(cond.dtype)  # mask_drop(cond, 0.1)
            t = torch.randint(1, 1001, (B,), device=device).float()
            sigma = (t / 1000.0)[:, None, None, None]
            noise = torch.randn_like(x0)
            x_t = (1 - sigma) * x0 + sigma * noise
            v = dit(x_t, t, caption_projection(cond), torch.ones(B, mcfg.n_query, dtype=torch.long, device=device),
                    freqs_cis, cross_attention_kwargs={}).sample
        loss = torch.mean((v.float() - (noise - x0).float()) ** 2)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss.detach()

    return step


# ------------------------------------------------------------------------------------------------------------


MODES = {  # mode -> (model.target, model.query_path)
    "full": ("eva_clip", "full"),
    "prefix": ("eva_clip", "prefix_cache"),
    "precomputed": ("precomputed", "prefix_cache"),
}


def make_mode_config(a, mode: str) -> ml_collections.ConfigDict:
    c = make_config(a)
    target, path = MODES[mode]
    c.model.query_path = path
    c.model.target = target
    if target == "eva_clip":
        side = a.image_size // 14
        if side % a.grid:
            raise SystemExit(f"--image_size {a.image_size} gives {side}x{side} patches, not a multiple of --grid")
        c.model.gen_encoder_kind = "eva_clip"
        c.model.gen_encoder = dict(image_size=a.image_size, patch_size=14, width=a.channels, layers=a.eva_layers,
                                   head_width=a.eva_head_width, mlp_ratio=4.0, pool_stride=side // a.grid)
        c.model.image_size = a.image_size
        c.data.gen_image_size = a.image_size
    return c


def run_modes(a):
    """Our step in each mode, alternating modes every round; model FLOPs per sample (analytic) next to time."""
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"--modes: unknown {sorted(unknown)}; expected some of {list(MODES)}")
    import ml_dtypes

    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    seq = a.prompt_len + 1 + a.n_query
    rs = np.random.RandomState(0)
    base = make_batch(a, rs)
    images = rs.randint(0, 256, (a.batch, a.image_size, a.image_size, 3)).astype(np.uint8)
    runs = {}
    for mode in modes:
        config = make_mode_config(a, mode)
        setup = step_lib.make_train_step(config, mesh)
        host = dict(base)
        if MODES[mode][0] == "eva_clip":
            host.pop("targets")
            host["gen_image"] = images
        else:
            host["targets"] = base["targets"].astype(ml_dtypes.bfloat16)
        batch = {k: jax.device_put(v, setup.batch_shardings[k]) for k, v in host.items()}
        state, frozen = setup.init(jax.random.key(0))
        flops = metrics_lib.train_flops_per_sample(setup.model_cfg, seq_len=seq, trainable=setup.trainable_names,
                                                   text_loss=False)
        holder = {"state": state}

        def step(setup=setup, frozen=frozen, batch=batch, holder=holder):
            holder["state"], m = setup.step_fn(holder["state"], frozen, batch)
            return m["loss"]

        t0 = time.perf_counter()
        benchmarking.block(step())
        runs[mode] = dict(step=step, flops=flops, compile_s=time.perf_counter() - t0, times=[],
                          query_path=setup.model_cfg.query_path, target=setup.model_cfg.target)
        benchmarking.block(step())
    peak = benchmarking.jax_matmul_peak()
    for _ in range(a.iters):  # rounds: shared-machine load hits every mode alike
        for mode in modes:
            t0 = time.perf_counter()
            benchmarking.block(runs[mode]["step"]())
            runs[mode]["times"].append(time.perf_counter() - t0)
    peak = max(peak, benchmarking.jax_matmul_peak())
    ref = "full" if "full" in runs else modes[0]
    out = {}
    for mode in modes:
        r = runs[mode]
        med = statistics.median(r["times"])
        per_sample = r["flops"]["total"]
        out[mode] = {"target": r["target"], "query_path": r["query_path"], "median_s": med,
                     "samples_per_s": a.batch / med, "compile_s": r["compile_s"],
                     "model_gflops_per_sample": per_sample / 1e9,
                     "model_gflops_per_sample_parts": {k: v / 1e9 for k, v in r["flops"].items() if k != "total"},
                     "gflops_per_s": per_sample * a.batch / med / 1e9,
                     "fraction_of_peak": per_sample * a.batch / med / peak,
                     "time_ratio_vs_" + ref: med / statistics.median(runs[ref]["times"]),
                     "flops_ratio_vs_" + ref: per_sample / runs[ref]["flops"]["total"]}
        print(f"{mode:12s} {med * 1e3:8.1f} ms/step  {a.batch / med:7.1f} samples/s  "
              f"{per_sample / 1e9:8.2f} GFLOPs/sample ({', '.join(f'{k} {v / 1e9:.2f}' for k, v in r['flops'].items() if k != 'total')})  "
              f"time x{out[mode]['time_ratio_vs_' + ref]:.3f}, FLOPs x{out[mode]['flops_ratio_vs_' + ref]:.3f} vs {ref}  "
              f"({out[mode]['fraction_of_peak']:.0%} of the f32 matmul peak)")
    benchmarking.emit({
        "bench": "train_step_modes",
        "config": {"batch": a.batch, "seq_len": seq, "n_query": a.n_query, "backbone": f"qwen3 {a.hidden}x{a.layers}",
                   "dit": f"{a.dit_dim}x{a.dit_layers}", "grid": f"{a.grid}x{a.grid}x{a.channels}",
                   "gen_encoder": f"eva {a.channels}x{a.eva_layers} @{a.image_size}px"},
        "modes": out,
        "jax_matmul_peak_gflops": peak / 1e9,
    })


def main(argv=None):
    a = parse_args(argv)
    if a.profile:
        profiling.enable_hlo_dump(a.profile)  # before the first compile
    if a.modes:
        return run_modes(a)
    config = make_config(a)
    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    setup = step_lib.make_train_step(config, mesh)
    mcfg = setup.model_cfg
    seq = a.prompt_len + 1 + a.n_query
    flops = metrics_lib.train_flops_per_sample(mcfg, seq_len=seq, trainable=setup.trainable_names, text_loss=False)
    flops_step = flops["total"] * a.batch
    rs = np.random.RandomState(0)
    host_batch = make_batch(a, rs)
    state, frozen = setup.init(jax.random.key(0))
    batch = {k: jax.device_put(v, setup.batch_shardings[k]) for k, v in host_batch.items()}
    holder = {"state": state}

    def ours():
        holder["state"], m = setup.step_fn(holder["state"], frozen, batch)
        return m["loss"]

    # in the compute dtype; on a GPU at 8192^3 (2048^3 leaves an H100 mostly idle)
    peak_kw = dict(n=8192 if jax.devices()[0].platform == "gpu" else 2048)
    peak_jax = benchmarking.jax_matmul_peak(dtype=jnp.dtype(a.dtype), **peak_kw)
    t0 = time.perf_counter()
    benchmarking.block(ours())
    first_ours = time.perf_counter() - t0
    ref = None
    first_ref = None
    if not a.skip_torch:
        import torch

        torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        peak_kw_torch = dict(peak_kw, dtype=getattr(torch, a.dtype), device=torch_device)
        peak_torch = benchmarking.torch_matmul_peak(**peak_kw_torch)
        ref = torch_step_fn(a, mcfg, host_batch)
        t0 = time.perf_counter()
        ref()
        first_ref = time.perf_counter() - t0
        ref()  # second warm-up: torch allocator caches
    benchmarking.block(ours())
    t_ours, t_ref = [], []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        benchmarking.block(ours())
        t_ours.append(time.perf_counter() - t0)
        if ref is not None:
            t0 = time.perf_counter()
            ref()
            t_ref.append(time.perf_counter() - t0)
    peak_jax = max(peak_jax, benchmarking.jax_matmul_peak(dtype=jnp.dtype(a.dtype), **peak_kw))
    s_ours = statistics.median(t_ours)
    result = {
        "bench": "train_step",
        "config": {"batch": a.batch, "seq_len": seq, "n_query": a.n_query, "backbone": f"qwen3 {a.hidden}x{a.layers}",
                   "dit": f"{a.dit_dim}x{a.dit_layers}", "grid": f"{a.grid}x{a.grid}x{a.channels}",
                   "trainable": list(setup.trainable_names), "dtype": a.dtype, "attention": a.attention,
                   "preset": a.preset, "scan": a.scan},
        "device": jax.devices()[0].device_kind,
        "gflops_per_step": flops_step / 1e9,
        "gflops_per_step_parts": {k: v * a.batch / 1e9 for k, v in flops.items() if k != "total"},
        "ours": {"steps_per_s": 1 / s_ours, "samples_per_s": a.batch / s_ours, "median_s": s_ours,
                 "compile_s": first_ours, "gflops_per_s": flops_step / s_ours / 1e9,
                 "fraction_of_peak": flops_step / s_ours / peak_jax},
        "jax_matmul_peak_gflops": peak_jax / 1e9,
    }
    if ref is not None:
        peak_torch = max(peak_torch, benchmarking.torch_matmul_peak(**peak_kw_torch))
        s_ref = statistics.median(t_ref)
        result["torch"] = {"steps_per_s": 1 / s_ref, "samples_per_s": a.batch / s_ref, "median_s": s_ref,
                           "first_call_s": first_ref, "gflops_per_s": flops_step / s_ref / 1e9,
                           "fraction_of_peak": flops_step / s_ref / peak_torch, "device": str(torch_device)}
        result["torch_matmul_peak_gflops"] = peak_torch / 1e9
        result["speedup_vs_torch"] = statistics.median([r / o for o, r in zip(t_ours, t_ref)])
    print(f"ours: {1 / s_ours:.2f} steps/s ({flops_step / s_ours / 1e9:.1f} GFLOP/s, "
          f"{flops_step / s_ours / peak_jax:.0%} of the {a.dtype} matmul peak); compile {first_ours:.1f} s")
    if ref is not None:
        print(f"torch: {1 / s_ref:.2f} steps/s ({flops_step / s_ref / 1e9:.1f} GFLOP/s, "
              f"{flops_step / s_ref / peak_torch:.0%} of peak); speedup {result['speedup_vs_torch']:.2f}x")
    if a.profile:
        runs = {"ours_step": ("jax", ours)}
        if ref is not None:
            runs["torch_step"] = ("torch", ref)
        result["profile"] = profiling.profile_runs(a.profile, runs, calls=a.profile_calls)
    benchmarking.emit(result)


if __name__ == "__main__":
    from blip3o_jax import hostmem

    hostmem.keep_freed_memory()  # both sides share the process: see blip3o_jax/hostmem.py
    main()
