"""Ahead-of-time plan of the full-size BLIP3o-8B text-to-image program: compile what `blip3o-sample t2i` runs for a
TPU topology on this CPU machine (libtpu's compiler, no TPU needed), and print what one chip holds, XLA's estimate
of images/s per chip, and the minutes a pod slice would take for GenEval (553 prompts x 4 images).

    pip install -e .[tpu]      # libtpu, in a venv of its own
    python tools/aot_decoder.py --decoder sdxl --topology v5p:1x1x1 --batch 8 > sdxl_v5p_b8.log   # the decoder
    python tools/aot_sample.py --topology v5p:1x1x1 --batch 8 --decoder_log sdxl_v5p_b8.log
    python tools/aot_sample.py --preset tiny --platform cpu --num_devices 8      # no libtpu (the CPU test)

The model (`--preset full`, abstract parameters only: `jax.eval_shape`, nothing is allocated) is the released
BLIP3o-Model-8B as `blip3o-sample` loads it (`sample.release_config` of the release's config.json): the
Qwen2.5-VL-7B language model (28 layers, 3584 wide, vocabulary 151668 as the release resizes it), 64 latent
queries and the 1.4B Lumina-Next DiT (24 layers, 1792 wide) generating 8 x 8 x 1792 EVA-CLIP features, all in
`--dtype` (bf16 by default, `blip3o-sample --dtype bfloat16`), weights placed by their logical axes over `--mesh`
as `blip3o-sample --mesh` places them.

The t2i program is the sampler's own jitted function (`sample._dit_fn`: the LLM pass over `--batch` prompts padded
to `--prompt_length` tokens with the query slots filled, then 30 Euler steps of the DiT on 2 x batch rows with CFG
3.0 against a zero condition, as the original) followed, in `blip3o-sample`, by the SDXL decoder's program (50
Euler steps of the UNet on 2 x batch rows with CFG, then the VAE decode), which `tools/aot_decoder.py` plans. This
tool compiles:

  pipeline  `sample._dit_fn` as it runs, layers scanned: its memory is what the LLM + DiT part needs on a chip;
  llm       the LLM pass alone, layers unrolled (XLA's cost analysis counts a while loop's body once);
  dit_step  one DiT call on the CFG batch (2 x batch), layers unrolled.

By default (`--cost extrapolate`, as `blip3o-plan`) llm and dit_step are compiled at 1 and at 2 unrolled layers and
their cost extrapolated linearly in depth (the layers are identical: exact for FLOPs, a few shallow compiles instead
of two deep ones); `--cost unrolled` compiles them at full depth. Each program's time is XLA's TPU cost model
(`optimal_seconds`, with libtpu's "-1 s" price of ConcatBitcast custom calls added back, `aot_decoder._cost`),
with the roofline figure max(HLO FLOPs / peak, HLO bytes / HBM bandwidth) next to it.

Seconds per batch = llm + dit_steps x dit_step + decoder_steps x unet_step + vae_decode, the last two from the
decoder's plan (`--decoder_log`, a saved output of aot_decoder.py for the same topology, batch and dtype; without
it the decoder is compiled here). Memory per chip: `blip3o-sample` keeps both programs' weights resident and runs
them one after the other, so the peak is the larger of (each program's peak + the other part's weights).
The pod figure assumes pure data parallelism (every chip runs the per-chip program on its own share of the
prompts, no communication): images/s of the slice = images/s per chip x chips. A `v5p-N` accelerator type counts
TensorCores, two per chip (`v5p-64` = 32 chips, `v4-N` likewise); `v5litepod-N` / `v6e-N` count chips. Not
counted: loading and compiling, the one-off DiT sample of the `--negative original` features, the scheduler's
element-wise arithmetic between steps, host-side PNG encoding, and partial batches (one per prompt-length bucket).
XLA's estimate is a roofline-style model without overlap or launch overheads: a figure to compare plans and to
catch an order-of-magnitude problem, not a promise. `--platform cpu` compiles the same programs for simulated CPU
devices (memory and FLOPs, no time). The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys

_TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_TOOLS))
sys.path.insert(0, _TOOLS)

import aot_decoder  # noqa: E402  (tools/aot_decoder.py; no jax import: the environment is set before jax loads)

from blip3o_jax import plan as plan_lib  # noqa: E402

GiB = plan_lib.GiB
GENEVAL_PROMPTS = 553  # GenEval's evaluation_metadata.jsonl
GENEVAL_IMAGES_PER_PROMPT = 4
# GenEval prompts in BLIP3-o's training template ("<|im_start|>system ... caption: {prompt}<|im_end|> ...") plus
# [IMG] and the 64 query slots are ~100-120 tokens: `blip3o-sample` pads them to its 128-token bucket
PROMPT_LENGTH = 128
TENSORCORES_PER_CHIP = {"v4": 2, "v5p": 2}  # accelerator types count TensorCores for these generations


def _qwen_7b() -> dict:
    """The Qwen2.5-VL-7B text config (configs/qwen_presets.py) as BLIP3o-Model-8B's config.json carries it."""
    path = os.path.join(os.path.dirname(_TOOLS), "configs", "qwen_presets.py")
    spec = importlib.util.spec_from_file_location("_qwen_presets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _, hf = module.PRESETS["qwen2_5_vl_7b"]
    # the release resizes the embedding for its added tokens ([IMG], [/IMG], <image>)
    return {**hf, "model_type": "qwen2_5_vl", "vocab_size": 151668, "n_query": 64, "gen_pooling": "early_pool2d_4"}


def release_hf(preset: str) -> dict:
    """The release's config.json (what `sample.release_config` reads) of the preset."""
    if preset == "full":
        return _qwen_7b()
    import make_tiny_release as tiny  # tools/make_tiny_release.py: the tiny release of the CLI's tests

    return {**tiny.TEXT, "model_type": "qwen2_5_vl", "vocab_size": 512, "n_query": tiny.N_QUERY,
            "gen_pooling": "early_pool2d_2", "dit_config": dict(tiny.DIT)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("full", "tiny"), default="full",
                   help="full: BLIP3o-Model-8B; tiny: the layout of tools/make_tiny_release.py (tests)")
    p.add_argument("--batch", type=int, default=8, help="images per program call (over the mesh's data x fsdp)")
    p.add_argument("--prompt_length", "--prompt-length", type=int, default=None,
                   help=f"prompt tokens with the template, [IMG] and the query slots (default {PROMPT_LENGTH}: "
                        "GenEval's bucket; tiny: 32)")
    p.add_argument("--dit_steps", "--dit-steps", type=int, default=30)
    p.add_argument("--decoder_steps", "--decoder-steps", type=int, default=50)
    p.add_argument("--no-cfg", dest="cfg", action="store_false", help="guidance off in the DiT (one branch)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--platform", choices=("tpu", "cpu"), default="tpu")
    p.add_argument("--topology", default=None, help="TPU topology, e.g. v5p:1x1x1, v5e:1x1, v6e:2x2")
    p.add_argument("--num_devices", "--num-devices", type=int, default=8, help="--platform cpu: simulated devices")
    p.add_argument("--mesh", default=None, help="mesh sizes as `blip3o-sample --mesh` (default data=-1)")
    p.add_argument("--cost", choices=("extrapolate", "unrolled"), default="extrapolate",
                   help="llm / dit_step cost from 1 and 2 unrolled layers (default) or one full-depth compile")
    p.add_argument("--decoder_log", "--decoder-log", default=None,
                   help="saved output of tools/aot_decoder.py --decoder sdxl for the same topology, batch, dtype "
                        "(default: compile the decoder here)")
    p.add_argument("--pod", default="v5p-64", help="accelerator type of the GenEval figure (default v5p-64)")
    p.add_argument("--name", default=None, help="label of the plan in the output")
    p.add_argument("--recombine", metavar="SAVED", default=None,
                   help="compile nothing: a saved output of this tool (e.g. the LLM + DiT part printed when "
                        "--decoder_log was not finished yet) combined with --decoder_log")
    a = p.parse_args(argv)
    if a.platform == "tpu" and not a.topology and not a.recombine:
        p.error("--topology is required with --platform tpu (e.g. v5p:1x1x1)")
    if min(a.batch, a.dit_steps, a.decoder_steps) < 1 or (a.prompt_length is not None and a.prompt_length < 1):
        p.error("--batch, --prompt_length, --dit_steps and --decoder_steps must be positive")
    try:
        pod_chips(a.pod)
    except ValueError as e:
        p.error(str(e))
    return a


def pod_chips(accelerator_type: str) -> int:
    """Chips of a Cloud TPU accelerator type: `v5p-64` -> 32 (the number counts TensorCores), `v6e-64` -> 64."""
    generation, _, n = accelerator_type.rpartition("-")
    generation = "v5e" if generation == "v5litepod" else generation
    if generation not in plan_lib.CHIPS or not n.isdigit() or int(n) < 1:
        raise ValueError(f"--pod {accelerator_type!r}: expected an accelerator type such as v5p-64, v5litepod-16 "
                         "or v6e-64")
    per_chip = TENSORCORES_PER_CHIP.get(generation, 1)
    if int(n) % per_chip:
        raise ValueError(f"--pod {accelerator_type!r}: {generation} types count TensorCores, {per_chip} per chip")
    return int(n) // per_chip


# --------------------------------------------------------------------------------------------------------------
# the programs


def _model(hf: dict, dtype: str, layers: int | None = None):
    """(module, Blip3oConfig) of the release config; `layers` set: both towers unrolled at that depth."""
    from blip3o_jax import sample
    from blip3o_jax.models import blip3o as blip3o_lib

    mcfg = sample.release_config(hf, dtype=None if dtype == "float32" else dtype)
    if layers is not None:
        mcfg = dataclasses.replace(
            mcfg, backbone=dataclasses.replace(mcfg.backbone, num_hidden_layers=layers, scan_layers=False),
            dit=dataclasses.replace(mcfg.dit, n_layers=layers, scan_layers=False))
    return blip3o_lib.build("blip3o", mcfg), mcfg


def _abstract_params(module, mcfg, mesh):
    """Params of the t2i model as ShapeDtypeStructs sharded by their logical axes (nothing allocated)."""
    import flax.linen as nn
    import jax

    from blip3o_jax import sharding
    from blip3o_jax.training import model_setup

    boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *model_setup.init_inputs(mcfg)))["params"]
    shardings = sharding.params_shardings(boxed, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)


def _prompt_batch(batch: int, length: int, n_query: int, mesh) -> dict:
    """The abstract `sample.prompt_batch` of `batch` prompts padded to `length` tokens."""
    import jax.numpy as jnp

    i32 = jnp.int32
    return {"input_ids": aot_decoder._input((batch, length), i32, mesh),
            "attention_mask": aot_decoder._input((batch, length), i32, mesh),
            "positions": aot_decoder._input((batch, length), i32, mesh),
            "query_index": aot_decoder._input((batch, n_query), i32, mesh)}


def _pipeline_program(module, mcfg, params, batch, length, steps, guided, latent_shape, mesh):
    """`sample._dit_fn` (the function `blip3o-sample t2i` jits) with its abstract arguments."""
    import jax
    import jax.numpy as jnp

    from blip3o_jax import sample
    from blip3o_jax.diffusion import flow_matching

    gen = sample.Generator(module, params, None, None, flow_matching.FlowMatchingConfig(), 0, None, {})
    fn = sample._dit_fn(gen, steps, guided, latent_shape)
    u32 = jnp.uint32
    args = (params, _prompt_batch(batch, length, mcfg.n_query, mesh), jax.ShapeDtypeStruct((), u32),
            aot_decoder._input((batch,), u32, mesh), aot_decoder._input((batch,), u32, mesh),
            jax.ShapeDtypeStruct((), jnp.float32))
    return fn, args


def _llm_program(module, mcfg, params, batch, length, mesh):
    """The LLM pass of the sampler (`Blip3o.encode` with the queries in place), alone."""
    import jax
    import jax.numpy as jnp

    from blip3o_jax.models import blip3o as blip3o_lib

    def llm(p, b):
        cond, _ = module.apply({"params": p}, b["input_ids"], b["attention_mask"], b["positions"], b["query_index"],
                               jnp.ones((b["input_ids"].shape[0],), bool), method=blip3o_lib.Blip3o.encode)
        return cond

    return jax.jit(llm), (params, _prompt_batch(batch, length, mcfg.n_query, mesh))


def _dit_step_program(module, mcfg, params, rows, mesh):
    """One DiT call of the sampler on `rows` (2 x batch with CFG), as `flow_matching.sample` makes it."""
    import jax
    import jax.numpy as jnp

    from blip3o_jax.models import blip3o as blip3o_lib

    def step(p, x, t, cond):
        return module.apply({"params": p}, x, t, cond, None, method=blip3o_lib.Blip3o.velocity)

    cond_dtype = jnp.dtype(mcfg.backbone.dtype) if mcfg.backbone.dtype != "float32" else jnp.float32
    args = (params, aot_decoder._input((rows, *mcfg.target_shape), jnp.float32, mesh),
            aot_decoder._input((rows,), jnp.int32, mesh),
            aot_decoder._input((rows, mcfg.n_query, mcfg.backbone.hidden_size), cond_dtype, mesh))
    return jax.jit(step), args


def _compile(fn, args, mesh, platform: str, label: str) -> dict:
    compiled, times = aot_decoder._lower_compile(fn, args, mesh)
    print(f"  compiled {label}: lowering {times['lower_s']:.1f} s, compile {times['compile_s']:.1f} s",
          file=sys.stderr, flush=True)
    return {"memory_per_device": aot_decoder._memory(compiled), **aot_decoder._cost(compiled, platform), **times}


COST_FIELDS = ("hlo_flops_per_device", "hlo_bytes_accessed_per_device", "optimal_seconds")


def extrapolate(one: dict, two: dict, depth: int) -> dict:
    """Cost of a `depth`-layer program from its 1- and 2-layer unrolled compiles: c1 + (depth - 1) (c2 - c1)."""
    out = {}
    for k in COST_FIELDS:
        if one.get(k) is None or two.get(k) is None:
            out[k] = None
        else:
            out[k] = one[k] + (depth - 1) * (two[k] - one[k])
    return out


def _last_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError) as e:
        raise ValueError(f"{path}: not a finished output of {what} ({e})") from None


def load_decoder_log(path: str, r: dict, decoder_steps: int) -> dict:
    """A saved tools/aot_decoder.py output, checked against this plan `r` (same topology, batch, dtype)."""
    d = _last_json(path, "tools/aot_decoder.py")
    want = {"decoder": "sdxl", "batch": r["batch"], "dtype": r["dtype"], "topology": r["topology"],
            "steps": decoder_steps, "cfg": True}
    for key, value in want.items():
        if d.get(key) != value:
            raise ValueError(f"--decoder_log {path}: {key} is {d.get(key)!r}, this plan needs {value!r}")
    return d


def _decoder_plan(a, target, r: dict) -> dict:
    """The SDXL decoder's plan: the saved output named by --decoder_log, or compiled here."""
    if a.decoder_log:
        return load_decoder_log(a.decoder_log, r, a.decoder_steps)
    print("  compiling the SDXL decoder (tools/aot_decoder.py)", file=sys.stderr, flush=True)
    from blip3o_jax import sample

    mesh = ",".join(f"{k}={v}" for k, v in sample.parse_mesh(a.mesh).items())  # data takes what is left, as here
    return aot_decoder.plan("sdxl", target, preset=a.preset, steps=a.decoder_steps, batch=a.batch, dtype=a.dtype,
                            mesh_spec=mesh)


def plan(a, target) -> dict:
    import jax
    import jax.numpy as jnp

    from blip3o_jax import sample, sharding

    hf = release_hf(a.preset)
    length = a.prompt_length or (PROMPT_LENGTH if a.preset == "full" else 32)
    module, mcfg = _model(hf, a.dtype)
    if length < mcfg.n_query + 2:
        raise ValueError(f"--prompt_length {length} cannot hold [IMG], {mcfg.n_query} query slots and a prompt")
    mesh = sharding.make_mesh(sample.parse_mesh(a.mesh), devices=target.devices)
    parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if a.batch % parallel:
        raise ValueError(f"--batch {a.batch} is not a multiple of the mesh's data x fsdp = {parallel} devices")
    latent = decoder_latent(a.preset)
    params = _abstract_params(module, mcfg, mesh)
    rows = 2 * a.batch if a.cfg else a.batch
    programs = {"pipeline": _compile(*_pipeline_program(module, mcfg, params, a.batch, length, a.dit_steps, a.cfg,
                                                        latent, mesh), mesh, target.platform, "pipeline")}
    for key in ("optimal_seconds", "optimal_seconds_raw", "unknown_cost_custom_calls"):  # loop bodies counted once
        programs["pipeline"].pop(key, None)
    depths = {"llm": mcfg.backbone.num_hidden_layers, "dit_step": mcfg.dit.n_layers}

    def build(label, m, c, p):
        if label == "llm":
            return _llm_program(m, c, p, a.batch, length, mesh)
        return _dit_step_program(m, c, p, rows, mesh)

    for label, depth in depths.items():
        if a.cost == "unrolled":
            m, c = _model(hf, a.dtype, depth)
            entry = _compile(*build(label, m, c, _abstract_params(m, c, mesh)), mesh, target.platform, label)
            entry["cost_source"] = f"unrolled, {depth} layers"
        else:
            shallow = []
            for d in (1, 2):
                m, c = _model(hf, a.dtype, d)
                shallow.append(_compile(*build(label, m, c, _abstract_params(m, c, mesh)), mesh, target.platform,
                                        f"{label} at {d} layer{'s' if d > 1 else ''}"))
            entry = {**extrapolate(shallow[0], shallow[1], depth),
                     "cost_source": f"unrolled, extrapolated from 1 and 2 layers to {depth}",
                     "compile_s": sum(s["compile_s"] for s in shallow),
                     "unknown_cost_custom_calls": [s.get("unknown_cost_custom_calls") for s in shallow]}
        programs[label] = entry

    def count(tree):
        return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))

    t2i_params = {k: params[k] for k in ("backbone", "latent_queries", "dit")}
    result = {
        "name": a.name or f"BLIP3o-8B t2i ({'full' if a.preset == 'full' else 'tiny'})", "preset": a.preset,
        "platform": target.platform, "topology": target.label, "devices": len(target.devices),
        "chips": target.num_chips, "chip": target.chip["name"] if target.chip else jax.devices("cpu")[0].device_kind,
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "dtype": a.dtype, "batch": a.batch,
        "prompt_length": length, "n_query": mcfg.n_query, "dit_steps": a.dit_steps, "dit_cfg": a.cfg,
        "dit_batch": rows, "latent": list(latent),
        "params": {"llm": count(params["backbone"]), "latent_queries": count(params["latent_queries"]),
                   "dit": count(params["dit"])},
        # what blip3o-sample holds on a device: every LLM + DiT weight (the unused lm_head too)
        "resident_bytes_per_device": {"llm_dit": plan_lib._shard_bytes(t2i_params)},
        "hbm_per_device": target.hbm_per_device, "programs": programs, "cost": a.cost,
    }
    return result


def decoder_latent(preset: str) -> tuple[int, int, int]:
    """The SDXL decoder's latent shape at its native resolution (the DiT program draws the decoder's noise)."""
    spec = aot_decoder.DECODERS["sdxl"]
    unet, vae = spec[preset]
    resolution = spec["resolution"] if preset == "full" else spec["tiny_resolution"]
    side = resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    return (side, side, int(unet["in_channels"]))


def attach_decoder(r: dict, decoder: dict, log: str | None = None) -> dict:
    """The SDXL decoder's plan (aot_decoder.py's result) into this plan, in place."""
    if tuple(decoder["latent"]) != tuple(r["latent"]):
        raise ValueError(f"the decoder plan's latents are {decoder['latent']}, the DiT program draws {r['latent']}")
    r.update(decoder_steps=decoder["steps"], resolution=decoder["resolution"], decoder_log=log)
    r["params"].update(unet=decoder["params"]["denoiser"], vae_decoder=decoder["params"]["vae_decoder"])
    # the decoder's weights blip3o-sample holds (its program's arguments: the UNet and the VAE's decoder half)
    r["resident_bytes_per_device"]["decoder"] = sum(decoder["params_bytes_per_device"].values())
    r["decoder_plan"] = {k: decoder.get(k) for k in ("name", "topology", "batch", "steps", "resolution", "dtype")}
    r["decoder_programs"] = {k: decoder["programs"][k] for k in ("pipeline", "step", "decode")}
    return r


def combine(r: dict, *, pod: str = "v5p-64") -> dict:
    """Per-chip memory, seconds per batch (by stage), images/s per chip and GenEval minutes on `pod`, in place."""
    chip = plan_lib.CHIP_BY_NAME.get(r.get("chip")) if r.get("platform") == "tpu" else None
    per_chip = max(1, r["devices"] // r["chips"])
    progs, dec = r["programs"], r["decoder_programs"]
    for p in (progs["llm"], progs["dit_step"], dec["step"], dec["decode"]):
        if chip is None or p.get("hlo_flops_per_device") is None:
            p["roofline_s"] = None
            continue
        p["roofline_s"] = max(p["hlo_flops_per_device"] / (chip["peak_flops"] / per_chip),
                              p["hlo_bytes_accessed_per_device"] / (chip["hbm_gbps"] * 1e9 / per_chip))
    resident = r["resident_bytes_per_device"]
    dit_peak = progs["pipeline"]["memory_per_device"]["peak"] + resident["decoder"]
    # the decoder's program holds only the VAE's decoder half as arguments; blip3o-sample keeps the whole decoder
    dec_peak = dec["pipeline"]["memory_per_device"]["peak"] + resident["llm_dit"]
    r["memory_per_device"] = {"llm_dit_program": dit_peak, "decoder_program": dec_peak, "peak": max(dit_peak, dec_peak)}
    r["fits"] = None if r.get("hbm_per_device") is None else bool(max(dit_peak, dec_peak) <= r["hbm_per_device"])
    stages = {"llm": (1, progs["llm"]), "dit": (r["dit_steps"], progs["dit_step"]),
              "unet": (r["decoder_steps"], dec["step"]), "vae_decode": (1, dec["decode"])}
    flops = r["devices"] * sum(n * p["hlo_flops_per_device"] for n, p in stages.values())
    r["hlo_flops_per_image"] = flops / r["batch"]
    geneval_images = GENEVAL_PROMPTS * GENEVAL_IMAGES_PER_PROMPT
    chips_pod = pod_chips(pod)
    for key, field in (("estimated", "optimal_seconds"), ("roofline", "roofline_s")):
        if chip is None or any(p.get(field) is None for _, p in stages.values()):
            r[f"{key}_s_per_batch"] = r[f"{key}_stages_s"] = r[f"{key}_images_per_s_per_chip"] = None
            r[f"{key}_mfu"] = r[f"{key}_geneval_minutes"] = None
            continue
        by_stage = {name: n * p[field] for name, (n, p) in stages.items()}
        batch_s = sum(by_stage.values())
        r[f"{key}_stages_s"] = by_stage
        r[f"{key}_s_per_batch"] = batch_s
        r[f"{key}_images_per_s_per_chip"] = r["batch"] / batch_s / r["chips"]
        r[f"{key}_mfu"] = flops / (r["chips"] * chip["peak_flops"] * batch_s)
        # every chip of the pod runs this program on its own prompts: ceil(images / (batch per chip x chips)) calls
        per_call = r["batch"] // r["chips"] * chips_pod
        r[f"{key}_geneval_minutes"] = math.ceil(geneval_images / per_call) * batch_s / 60
    r["geneval"] = {"prompts": GENEVAL_PROMPTS, "images_per_prompt": GENEVAL_IMAGES_PER_PROMPT,
                    "images": geneval_images, "pod": pod, "pod_chips": chips_pod}
    return r


# --------------------------------------------------------------------------------------------------------------
# output


def _b(x: float) -> str:
    return aot_decoder._b(x)


def _s(x) -> str:
    return aot_decoder._s(x)


def format_table(r: dict) -> str:
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    hbm = f" of {r['hbm_per_device'] / GiB:.1f} GiB HBM" if r["hbm_per_device"] else ""
    fits = "" if r["fits"] is None else ("  -> fits" if r["fits"] else "  -> DOES NOT FIT")
    p = r["params"]
    lines = [
        f"{r['name']} on {r['topology']} ({r['chips']} chips, {r['devices']} devices, {r['chip']}); mesh {mesh}; "
        f"{r['dtype']}; batch {r['batch']} prompts x {r['prompt_length']} tokens; DiT {r['dit_steps']} steps on "
        f"{r['dit_batch']} rows; decoder {r['decoder_steps']} steps, {r['resolution']} px",
        f"  params: LLM {p['llm'] / 1e9:.3f}B, DiT {p['dit'] / 1e9:.3f}B, UNet {p['unet'] / 1e9:.3f}B, VAE decoder "
        f"{p['vae_decoder'] / 1e6:.1f}M; resident per device: LLM+DiT "
        f"{_b(r['resident_bytes_per_device']['llm_dit'])}, decoder {_b(r['resident_bytes_per_device']['decoder'])}",
        "  program       peak       arguments  temporaries  HLO TFLOP/dev  XLA est.    roofline >=  x calls",
    ]
    rows = [("pipeline", r["programs"]["pipeline"], None), ("llm", r["programs"]["llm"], 1),
            ("dit_step", r["programs"]["dit_step"], r["dit_steps"]),
            ("unet_step", r["decoder_programs"]["step"], r["decoder_steps"]),
            ("vae_decode", r["decoder_programs"]["decode"], 1), ("sdxl pipe", r["decoder_programs"]["pipeline"], None)]
    for label, prog, calls in rows:
        m = prog.get("memory_per_device")
        mem = f"{_b(m['peak']):>10s} {_b(m['arguments']):>11s} {_b(m['temporaries']):>12s}" if m else \
            f"{'-':>10s} {'-':>11s} {'-':>12s}"
        cost = "" if calls is None else (f"  {prog['hlo_flops_per_device'] / 1e12:13.3f}  "
                                         f"{_s(prog.get('optimal_seconds')):>10s}  {_s(prog.get('roofline_s')):>11s}  "
                                         f"{calls}")
        lines.append(f"  {label:10s} {mem}{cost}")
    mem = r["memory_per_device"]
    lines.append(f"  peak per device {_b(mem['peak'])}{hbm}{fits} (LLM+DiT program + resident decoder "
                 f"{_b(mem['llm_dit_program'])}; decoder program + resident LLM+DiT {_b(mem['decoder_program'])})")
    g = r["geneval"]
    if r["estimated_s_per_batch"] is not None:
        st = r["estimated_stages_s"]
        lines.append(f"  per batch of {r['batch']} (XLA estimate): " + " + ".join(
            f"{k} {v:.2f} s" for k, v in st.items()) + f" = {r['estimated_s_per_batch']:.2f} s")
        lines.append(f"  images/s per chip: XLA estimate {r['estimated_images_per_s_per_chip']:.3f} (MFU "
                     f"{100 * r['estimated_mfu']:.0f}%), roofline <= {r['roofline_images_per_s_per_chip']:.3f}")
        lines.append(f"  GenEval {g['prompts']} x {g['images_per_prompt']} = {g['images']} images on {g['pod']} "
                     f"({g['pod_chips']} chips, data-parallel): {r['estimated_geneval_minutes']:.1f} min (XLA "
                     f"estimate), >= {r['roofline_geneval_minutes']:.1f} min (roofline)")
    else:
        lines.append("  per batch: no time estimate on this platform (compile for a TPU topology)")
    lines.append(f"  HLO FLOPs per image {r['hlo_flops_per_image'] / 1e12:.2f} TFLOP; llm/dit_step cost: "
                 f"{r['programs']['llm']['cost_source']}")
    return "\n".join(lines)


def recombine(saved: str, decoder_log: str, pod: str, decoder_steps: int) -> dict:
    """A saved output of this tool (its JSON line) with the decoder figures of `decoder_log`: compiles nothing."""
    r = _last_json(saved, "tools/aot_sample.py")
    return combine(attach_decoder(r, load_decoder_log(decoder_log, r, decoder_steps), decoder_log), pod=pod)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.recombine:
        if not a.decoder_log:
            sys.exit("aot_sample: --recombine needs --decoder_log")
        try:
            result = recombine(a.recombine, a.decoder_log, a.pod, a.decoder_steps)
        except ValueError as e:
            sys.exit(f"aot_sample: {e}")
        print(format_table(result), flush=True)
        from blip3o_jax import benchmarking

        benchmarking.emit(result)
        return
    plan_lib._configure_environment(["--platform", a.platform, "--num_devices", str(a.num_devices)])
    if a.platform == "tpu":
        try:
            import libtpu  # noqa: F401
        except ImportError:
            sys.exit("aot_sample: libtpu is not installed: `pip install -e .[tpu]` (in a venv of its own), or use "
                     "--platform cpu")
        try:
            target = aot_decoder.tpu_target(a.topology)
        except ValueError as e:
            sys.exit(f"aot_sample: {e}")
    else:
        target = plan_lib.cpu_target()
    try:
        result = plan(a, target)
        try:
            attach_decoder(result, _decoder_plan(a, target, result), a.decoder_log)
        except ValueError as e:  # the decoder's log is not there yet: keep what was compiled
            print(json.dumps(result), flush=True)
            sys.exit(f"aot_sample: {e}. The LLM + DiT plan is the JSON line above: save it and run "
                     f"`tools/aot_sample.py --recombine SAVED --decoder_log DECODER_LOG`")
        combine(result, pod=a.pod)
    except ValueError as e:  # a mesh or batch that does not divide the devices, a mismatched decoder log, ...
        sys.exit(f"aot_sample: {e}")
    except Exception as e:  # noqa: BLE001  (the TPU compiler refuses a program larger than the chip's HBM)
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        message = str(e).strip().splitlines()[0].rstrip(".")
        sys.exit(f"aot_sample: batch {a.batch} does not fit on {target.label}: {message}. Use a smaller --batch or "
                 "shard the weights (--mesh fsdp=N over more chips).")
    print(format_table(result), flush=True)
    from blip3o_jax import benchmarking

    benchmarking.emit(result)


if __name__ == "__main__":
    main()
