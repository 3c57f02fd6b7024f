"""Prefill and greedy-decode throughput of our Qwen LM vs transformers, same weights, same machine, one run.

    python tools/bench_llm.py                       # ~88M-param Qwen3-style model, fp32, batch 4
    python tools/bench_llm.py --layers 2 --decode_tokens 16 --iters 2     # quick
    python tools/bench_llm.py --preset gpu --dtype bfloat16 --attention cudnn    # on a GPU (tools/gpu_check.sh)

Prefill: a batch of `prefill_len`-token prompts into a fresh KV cache, logits of the last token (what generation
needs; transformers: `use_cache=True, logits_to_keep=1`). Decode: greedy generation of `decode_tokens` new tokens
from a `decode_prompt`-token prompt, EOS disabled (transformers: `generate(do_sample=False, min_new_tokens=N)`;
ours: `blip3o_jax.generation.generate`, one jitted `lax.while_loop`). Ours prefills and decodes on the weights in
the unrolled layout that `generation.unrolled` gives and the sampler generates with off TPU (`--decode_layout
config` keeps `--scan_layers` for both). `--profile DIR` adds per-op profiles of the four runs.
Times are medians over rounds that alternate ours and transformers (a shared machine's load then hits both alike);
the first call (compile for us) is reported separately. Analytic FLOPs count matmuls only (2 per multiply-add;
causal attention counts the keys each query actually sees); the matmul peaks are measured in the same run. Decode
is bound by memory, not FLOPs: the run also samples the machine's read bandwidth (next to each timed decode and once
after the rounds; the median bounds) and reports each side's decode time over the bound of reading every weight once
per new token. The last line is one JSON object.

On a GPU, transformers runs on CUDA too (`torch.cuda.is_available()`); `--dtype bfloat16` puts both sides' weights
and KV caches in bf16 (transformers: the model cast to `torch.bfloat16`, SDPA attention), `--attention cudnn` gives
ours cuDNN flash attention, and the matmul peaks are measured in the compute dtype at 8192^3.
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_integer("batch", 4, "Batch size for prefill and decode.")
flags.DEFINE_integer("prefill_len", 256, "Prompt length for the prefill benchmark.")
flags.DEFINE_integer("decode_prompt", 16, "Prompt length before decoding.")
flags.DEFINE_integer("decode_tokens", 64, "New tokens per row in the decode benchmark.")
flags.DEFINE_integer("hidden", 768, "Hidden size.")
flags.DEFINE_integer("layers", 10, "Decoder layers.")
flags.DEFINE_integer("heads", 12, "Query heads.")
flags.DEFINE_integer("kv_heads", 4, "Key/value heads.")
flags.DEFINE_integer("head_dim", 64, "Head dim.")
flags.DEFINE_integer("intermediate", 2048, "MLP width.")
flags.DEFINE_integer("vocab", 32000, "Vocabulary size.")
flags.DEFINE_integer("iters", 3, "Timed rounds after the first call (median reported).")
flags.DEFINE_bool("scan_layers", True, "Use nn.scan over layers (False: a Python loop of layers).")
flags.DEFINE_enum("decode_layout", "unrolled", ["unrolled", "config"],
                  "Layer layout of ours' prefill and decode: `unrolled` (generation.unrolled: what the sampler "
                  "generates with off TPU) or `config` (as --scan_layers says).")
flags.DEFINE_enum("preset", "cpu", ["cpu", "gpu"],
                  "Size preset: `cpu` (the defaults above) or `gpu` (a ~0.9B-param 2048x16 model, batch 16, 1024-token "
                  "prefill, 64 decoded tokens, 5 rounds: enough work that an H100/H200 is not idle); flags given "
                  "explicitly win over the preset.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                  "Weights, activations and KV cache of both sides (transformers: the model cast to this dtype).")
flags.DEFINE_enum("attention", "xla", ["xla", "cudnn"],
                  "Ours' attention kernel (the models' `attention_impl`): xla, or cudnn (GPU flash attention, bf16 "
                  "only). transformers uses SDPA either way.")
flags.DEFINE_string("profile", None,
                    "Directory for per-op profiles of ours and transformers (traces, optimised HLO, per-op tables by "
                    "kind: blip3o_jax/profiling.py), taken after the timed rounds; the timings are unaffected.")
flags.DEFINE_integer("profile_calls", 3, "Profiled calls per run with --profile.")
FLAGS = flags.FLAGS

GPU_PRESET = dict(batch=16, prefill_len=1024, decode_prompt=64, decode_tokens=64, hidden=2048, layers=16, heads=16,
                  kv_heads=8, head_dim=128, intermediate=6144, vocab=32000, iters=5)


def apply_preset():
    """The `--preset gpu` sizes, for every flag not given on the command line."""
    if FLAGS.preset == "gpu":
        for name, value in GPU_PRESET.items():
            if not FLAGS[name].present:
                setattr(FLAGS, name, value)


def main(_):
    if FLAGS.profile:
        from blip3o_jax import profiling

        profiling.enable_hlo_dump(FLAGS.profile)  # before the first compile
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from blip3o_jax import benchmarking, convert, kernels, models
    from blip3o_jax.generation import generate, unrolled
    from blip3o_jax.models import layers, qwen

    apply_preset()
    cfg = qwen.QwenConfig(
        vocab_size=FLAGS.vocab, hidden_size=FLAGS.hidden, intermediate_size=FLAGS.intermediate,
        num_hidden_layers=FLAGS.layers, num_attention_heads=FLAGS.heads, num_key_value_heads=FLAGS.kv_heads,
        head_dim=FLAGS.head_dim, attention_bias=False, qk_norm=True, tie_word_embeddings=True,
        rope_theta=1_000_000.0, max_position_embeddings=4096, scan_layers=FLAGS.scan_layers,
        dtype=FLAGS.dtype, param_dtype=FLAGS.dtype, attention_impl=FLAGS.attention,
    )
    kind = "qwen3"
    B, L, P, N = FLAGS.batch, FLAGS.prefill_len, FLAGS.decode_prompt, FLAGS.decode_tokens
    if N < 2:
        raise app.UsageError(f"--decode_tokens must be >= 2 (a decode step's time is (decode - prompt pass) / "
                             f"(N - 1)), got {N}")
    on_gpu = jax.devices()[0].platform == "gpu"
    torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, FLAGS.dtype)
    print(f"config: {cfg.num_params / 1e6:.1f}M params, {FLAGS.dtype}, attention {FLAGS.attention}; jax "
          f"{jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} on {torch_device} with "
          f"{torch.get_num_threads()} threads", flush=True)

    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**qwen.config_to_hf(kind, cfg))).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    state_dict = {k: v.detach().numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    params = jax.device_put(convert.from_torch(kind, state_dict, cfg))  # cast to cfg.param_dtype
    hf = hf.to(device=torch_device, dtype=torch_dtype)
    hf.config._attn_implementation = "sdpa"
    module = models.build(kind, cfg)
    dec_module, dec_params = (unrolled(kind, cfg, params) if FLAGS.decode_layout == "unrolled"
                              else (module, params))

    rng = np.random.RandomState(0)
    prefill_ids = rng.randint(1, cfg.vocab_size, (B, L)).astype(np.int32)
    decode_ids = rng.randint(1, cfg.vocab_size, (B, P)).astype(np.int32)
    decode_mask = np.ones_like(decode_ids)

    # ---------------- ours
    @jax.jit
    def prefill(p, ids):
        cache = qwen.init_cache(dec_module.cfg, ids.shape[0], ids.shape[1] + N, layers.to_dtype(cfg.dtype))
        hidden, _, cache = dec_module.apply({"params": p}, ids, cache=cache, compute_logits=False,
                                            method=dec_module.forward)
        return dec_module.apply({"params": p}, hidden[:, -1:], method=dec_module.lm_logits)[:, 0], cache

    ids_dev = jnp.asarray(prefill_ids)
    prefill_t = torch.tensor(prefill_ids, dtype=torch.long, device=torch_device)
    decode_t = torch.tensor(decode_ids, dtype=torch.long, device=torch_device)

    def torch_sync(x):
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        return x

    def hf_prefill():
        with torch.no_grad():
            return torch_sync(hf(input_ids=prefill_t, use_cache=True, logits_to_keep=1).logits)

    def hf_generate(n):
        with torch.no_grad():
            return torch_sync(hf.generate(input_ids=decode_t, attention_mask=torch.ones_like(decode_t),
                                          max_new_tokens=n, min_new_tokens=n, do_sample=False))

    def ours_generate(n):
        return jax.block_until_ready(generate(
            dec_module, dec_params, decode_ids, decode_mask, max_new_tokens=n, eos_token_id=None, pad_token_id=0))

    runs = {
        "ours_prefill": lambda: jax.block_until_ready(prefill(dec_params, ids_dev)),
        "hf_prefill": hf_prefill,
        "ours_decode": lambda: ours_generate(N),
        "hf_decode": lambda: hf_generate(N),
        # the prompt pass alone (one new token): a decode step takes (decode - prompt) / (N - 1)
        "ours_prompt": lambda: ours_generate(1),
        "hf_prompt": lambda: hf_generate(1),
    }
    # first calls (compile for us), then timed rounds alternating ours and transformers, so that the load of a
    # shared machine falls on both alike; medians over rounds
    first, times, last = {}, {name: [] for name in runs}, {}
    for name, fn in runs.items():
        t0 = time.perf_counter()
        last[name] = fn()
        first[name] = time.perf_counter() - t0
    # the decode's bound: the read bandwidth sampled next to each timed decode (and once after the rounds), median
    meter = benchmarking.BandwidthMeter(nbytes=(4 << 30) if on_gpu else (512 << 20))
    for _ in range(FLAGS.iters):
        for name, fn in runs.items():
            if name == "ours_decode":
                meter.sample()
            t0 = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - t0)
    timing = {name: {"first_call_s": first[name], "median_s": float(np.median(times[name]))} for name in runs}
    step_s = {side: (timing[f"{side}_decode"]["median_s"] - timing[f"{side}_prompt"]["median_s"]) / (N - 1)
              for side in ("ours", "hf")}
    round_speedup = {kind_: float(np.median(np.asarray(times[f"hf_{kind_}"]) / np.asarray(times[f"ours_{kind_}"])))
                     for kind_ in ("prefill", "decode")}
    ours_last_logits = np.asarray(last["ours_prefill"][0], np.float32)
    ours_tokens = np.asarray(last["ours_decode"])
    hf_last_logits = last["hf_prefill"][:, -1].float().cpu().numpy()
    hf_tokens = last["hf_decode"][:, P:].cpu().numpy()

    # ---------------- peaks and FLOPs
    # in the compute dtype; on a GPU at 8192^3 (2048^3 leaves an H100 mostly idle) and over 4 GiB
    peak_n = 8192 if on_gpu else 2048
    jax_peak = benchmarking.jax_matmul_peak(n=peak_n, dtype=layers.to_dtype(FLAGS.dtype))
    torch_peak = benchmarking.torch_matmul_peak(n=peak_n, dtype=torch_dtype, device=torch_device)
    meter.sample()
    meter.release()
    bandwidth = meter.median()
    # a decode step reads every weight once (the tied embedding as the LM head; the input embedding is a gather).
    # N new tokens take N passes on both sides: the short prefill gives the first, N - 1 decode steps the rest
    weight_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
    cpu_kernel = kernels.isa() if kernels.applies(FLAGS.batch, FLAGS.dtype) else None
    decode_passes = N
    step_bound_s = weight_bytes / bandwidth  # one read of the weights
    decode_bound_s = decode_passes * step_bound_s
    prefill_flops = qwen.count_flops(cfg, B, L, context=(L + 1) / 2, logits_tokens=B)
    # N - 1 one-token steps after the prompt pass (step t sees P + t + 1 keys), + the prompt pass
    decode_flops = sum(qwen.count_flops(cfg, B, 1, context=P + t + 1) for t in range(N - 1))
    decode_flops += qwen.count_flops(cfg, B, P, context=(P + 1) / 2, logits_tokens=B)

    def rates(t, flops, tokens, peak):
        s = t["median_s"]
        return {"tokens_per_s": tokens / s, "median_s": s, "first_call_s": t["first_call_s"],
                "gflops_per_s": flops / s / 1e9, "fraction_of_matmul_peak": flops / s / peak}

    result = {
        "benchmark": "qwen_lm_prefill_decode",
        "params_m": cfg.num_params / 1e6,
        "dtype": FLAGS.dtype,
        "attention": FLAGS.attention,
        "preset": FLAGS.preset,
        "device": jax.devices()[0].device_kind,
        "torch_device": str(torch_device),
        "batch": B, "prefill_len": L, "decode_prompt": P, "decode_tokens": N,
        "prefill_gflop": prefill_flops / 1e9,
        "ours_prefill": rates(timing["ours_prefill"], prefill_flops, B * L, jax_peak),
        "hf_prefill": rates(timing["hf_prefill"], prefill_flops, B * L, torch_peak),
        "ours_decode": rates(timing["ours_decode"], decode_flops, B * N, jax_peak),
        "hf_decode": rates(timing["hf_decode"], decode_flops, B * N, torch_peak),
        "jax_matmul_peak_gflops": jax_peak / 1e9,
        "memory_bandwidth_gb_s": bandwidth / 1e9,
        "memory_bandwidth_samples_gb_s": [round(b / 1e9, 2) for b in meter.samples],
        "decode_layout": FLAGS.decode_layout,
        "weight_bytes": weight_bytes,
        # the compiled few-row kernel that runs the decode's products ("avx512" / "avx2"), or None: XLA's matmul
        "cpu_decode_kernel": cpu_kernel,
        "decode_weight_passes": decode_passes,
        "decode_bandwidth_bound_s": decode_bound_s,
        "ours_decode_over_bandwidth_bound": timing["ours_decode"]["median_s"] / decode_bound_s,
        "hf_decode_over_bandwidth_bound": timing["hf_decode"]["median_s"] / decode_bound_s,
        # one decode step (the prompt pass, which computes B * P tokens, left out) over one read of the weights
        "ours_prompt_s": timing["ours_prompt"]["median_s"],
        "hf_prompt_s": timing["hf_prompt"]["median_s"],
        "ours_decode_step_s": step_s["ours"],
        "hf_decode_step_s": step_s["hf"],
        "decode_step_bandwidth_bound_s": step_bound_s,
        "ours_decode_step_over_bandwidth_bound": step_s["ours"] / step_bound_s,
        "hf_decode_step_over_bandwidth_bound": step_s["hf"] / step_bound_s,
        "torch_matmul_peak_gflops": torch_peak / 1e9,
        "prefill_speedup": timing["hf_prefill"]["median_s"] / timing["ours_prefill"]["median_s"],
        "decode_speedup": timing["hf_decode"]["median_s"] / timing["ours_decode"]["median_s"],
        "prefill_speedup_median_of_rounds": round_speedup["prefill"],
        "rounds_s": {name: [round(t, 4) for t in ts] for name, ts in times.items()},
        "decode_speedup_median_of_rounds": round_speedup["decode"],
        "greedy_tokens_match": bool(np.array_equal(ours_tokens, hf_tokens)),
        "prefill_last_logits_max_rel_diff": float(np.abs(ours_last_logits - hf_last_logits).max()
                                                  / np.abs(hf_last_logits).max()),
    }
    for name in ("ours_prefill", "hf_prefill", "ours_decode", "hf_decode"):
        r = result[name]
        print(f"{name:13s} {r['tokens_per_s']:9.1f} tokens/s  median {r['median_s']:.3f}s  first call "
              f"{r['first_call_s']:.2f}s  {r['gflops_per_s']:.1f} GFLOP/s ({100 * r['fraction_of_matmul_peak']:.0f}% "
              "of matmul peak)", flush=True)
    print(f"decode bound: {weight_bytes / 1e6:.0f} MB of weights per step at {bandwidth / 1e9:.1f} GB/s measured "
          f"-> {decode_bound_s:.3f}s; ours {result['ours_decode_over_bandwidth_bound']:.2f}x the bound, transformers "
          f"{result['hf_decode_over_bandwidth_bound']:.2f}x", flush=True)
    print(f"decode step, the prompt pass left out (ours {result['ours_prompt_s']:.3f}s, transformers "
          f"{result['hf_prompt_s']:.3f}s): ours {step_s['ours'] * 1e3:.1f} ms, "
          f"{result['ours_decode_step_over_bandwidth_bound']:.2f}x the bound of {step_bound_s * 1e3:.1f} ms; "
          f"transformers {step_s['hf'] * 1e3:.1f} ms, {result['hf_decode_step_over_bandwidth_bound']:.2f}x; "
          f"few-row products on {'the ' + cpu_kernel + ' CPU kernel' if cpu_kernel else 'XLA matmuls'}", flush=True)
    if FLAGS.profile:
        from blip3o_jax import profiling

        result["profile"] = profiling.profile_runs(
            FLAGS.profile, {name: ("jax" if name.startswith("ours") else "torch", fn) for name, fn in runs.items()
                            if not name.endswith("_prompt")},
            calls=FLAGS.profile_calls, torch_sync=torch_sync)
    benchmarking.emit(result)


if __name__ == "__main__":
    from blip3o_jax import hostmem

    hostmem.keep_freed_memory()  # both sides share the process: see blip3o_jax/hostmem.py
    app.run(main)
