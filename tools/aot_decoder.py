"""Ahead-of-time plans of the two image decoders: compile the real sampling program for a TPU topology on this CPU
machine (libtpu's compiler, no TPU needed) and print what one chip holds and how long XLA thinks an image takes.

    pip install -e .[tpu]      # libtpu, in a venv of its own
    python tools/aot_decoder.py --decoder sdxl --topology v5e:1x1                     # 1024 px, 50 steps, CFG
    python tools/aot_decoder.py --decoder sana --topology v6e:1x1 --resolution 512    # 30 steps, CFG
    python tools/aot_decoder.py --decoder sana --resolution 1024 --topology v5p:2x2x1 --batch 8 --mesh data=-1
    python tools/aot_decoder.py --decoder sdxl --preset tiny --platform cpu --num_devices 8   # no libtpu
    python tools/aot_decoder.py --markdown docs/aot_plans/*.log     # saved outputs -> one Markdown table

The decoders (`--preset full`, abstract parameters only: `jax.eval_shape`, nothing is allocated):

  sdxl  BLIP3-o's `diffusion-decoder/`: the Emu2-Gen UNet2DConditionModel (2.53B params, cross-attention 1792,
        text_time) + the SDXL AutoencoderKL, Euler discrete (scaled_linear, leading, steps_offset 1), 50 steps,
        CFG 3.0, 64 x 1792 EVA-CLIP tokens, 1024 px (128 x 128 x 4 latents)
  sana  BLIP3o/SigLIP2_SANA: SanaTransformer2DModel SANA-1600M (2240 wide, 20 layers) + DC-AE f32c32, flow-match
        Euler, 30 steps, CFG 3.0, 64 x 2304 connector tokens, 512 px (16 x 16 x 32 latents) or 1024 px (32 x 32)

Three programs are compiled for the target, each with the parameters and inputs sharded by their logical axes over
`--mesh` (default: every device on fsdp):

  pipeline  the pipeline's own jitted function (`pipelines.sdxl_decoder` / `pipelines.sana_decoder`: the CFG loop as
            one `lax.fori_loop` of batched denoiser calls, then the VAE decode), the transformer blocks scanned as
            the model configs ship: its memory is what the decoder needs on a chip (XLA's buffer assignment,
            exact for the compiled program; peak = arguments + outputs + temporaries + code);
  step      one denoiser call on the CFG batch (2 x batch), blocks unrolled so that XLA's cost analysis counts every
            layer (it counts a while loop's body once);
  decode    the VAE / DC-AE decode of `batch` latents.

Seconds per image = (steps x step + decode) / batch, each term from XLA's TPU cost model (`optimal_seconds`, with
libtpu's "-1 s = unknown" price of its ConcatBitcast custom calls added back: see `_cost`), and the roofline figure
max(HLO FLOPs / peak, HLO bytes / HBM bandwidth) per program next to it (as `blip3o-plan`; HLO bytes also count the
copies of weights into on-chip memory, so the HBM term over-counts and is no strict lower bound). The scheduler's
arithmetic between steps (a few element-wise ops on the latents) is not counted. XLA's estimate is a roofline-style
model without overlap or launch overheads: a figure to compare plans and to catch an order-of-magnitude problem,
not a promise. `--platform cpu` compiles the same programs for simulated CPU devices (memory and FLOPs, no time).
The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blip3o_jax import plan as plan_lib  # noqa: E402  (no jax import: the environment is set before jax loads)

GiB = plan_lib.GiB

# --------------------------------------------------------------------------------------------------------------
# the decoders (diffusers config.json dicts)

# Emu2-Gen's unet/config.json (BLIP3-o's diffusion-decoder/unet), as diffusers reads it
EMU2_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280], layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], mid_block_type="UNetMidBlock2DCrossAttn",
    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], num_attention_heads=None,
    cross_attention_dim=1792, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=3328, use_linear_projection=True, flip_sin_to_cos=True, freq_shift=0,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, downsample_padding=1, mid_block_scale_factor=1,
    conv_in_kernel=3, conv_out_kernel=3)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
    act_fn="silu", sample_size=1024, scaling_factor=0.13025, force_upcast=True)
EMU2_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)
# Efficient-Large-Model/Sana_1600M_512px_diffusers transformer/ (the 1024 px checkpoint differs only in sample_size)
SANA_1600M = dict(
    in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
    num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
    mlp_ratio=2.5, attention_bias=False, sample_size=16, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
    interpolation_scale=None)
DCAE_F32C32 = dict(
    in_channels=3, latent_channels=32, attention_head_dim=32,
    encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024], decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    encoder_layers_per_block=[2, 2, 2, 3, 3, 3], decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
    encoder_qkv_multiscales=[[], [], [], [5], [5], [5]], decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    downsample_block_type="Conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=0.41407)
FLOW_MATCH_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0)  # the Reconstruction branch's (see sana_decoder)

# the same layouts in miniature (the CPU test)
TINY_UNET = dict(EMU2_UNET, sample_size=8, block_out_channels=[16, 32, 64], transformer_layers_per_block=[1, 1, 2],
                 attention_head_dim=[1, 2, 4], cross_attention_dim=24, addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=24 + 6 * 4, norm_num_groups=8)
TINY_VAE = dict(SDXL_VAE, block_out_channels=[8, 16, 16, 16], norm_num_groups=4, sample_size=64)
TINY_SANA = dict(SANA_1600M, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_cross_attention_heads=2,
                 cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=24, in_channels=8,
                 out_channels=8, sample_size=2)
TINY_DCAE = dict(DCAE_F32C32, latent_channels=8, attention_head_dim=8,
                 encoder_block_out_channels=[8, 8, 16, 16, 32, 32], decoder_block_out_channels=[8, 8, 16, 16, 32, 32],
                 encoder_layers_per_block=[1] * 6, decoder_layers_per_block=[1] * 6)

# decoder -> denoiser kind, VAE kind, their configs per preset, tokens, default resolution and steps
DECODERS = {
    "sdxl": dict(denoiser="unet", vae="autoencoder_kl", full=(EMU2_UNET, SDXL_VAE), tiny=(TINY_UNET, TINY_VAE),
                 tokens=64, resolution=1024, tiny_resolution=64, steps=50),
    "sana": dict(denoiser="sana", vae="autoencoder_dc", full=(SANA_1600M, DCAE_F32C32), tiny=(TINY_SANA, TINY_DCAE),
                 tokens=64, resolution=512, tiny_resolution=64, steps=30),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decoder", choices=sorted(DECODERS))
    p.add_argument("--preset", choices=("full", "tiny"), default="full",
                   help="full: the released decoders' configs; tiny: the same layouts in miniature (tests)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: sdxl 1024, sana 512)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: sdxl 50, sana 30)")
    p.add_argument("--batch", type=int, default=1, help="images per call (the denoiser sees 2 x batch with CFG)")
    p.add_argument("--no-cfg", dest="cfg", action="store_false", help="guidance off: one branch, batch images")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="params and compute of both models (the released decoders run in bf16)")
    p.add_argument("--platform", choices=("tpu", "cpu"), default="tpu")
    p.add_argument("--topology", default=None, help="TPU topology, e.g. v5e:1x1, v6e:2x2, v5p:2x2x1")
    p.add_argument("--num_devices", "--num-devices", type=int, default=8, help="--platform cpu: simulated devices")
    p.add_argument("--mesh", default=None, help="mesh sizes, e.g. 'data=2,fsdp=-1' (default: fsdp=-1)")
    p.add_argument("--name", default=None, help="label of the plan in the output")
    p.add_argument("--markdown", nargs="+", metavar="LOG", default=None,
                   help="compile nothing: print the saved outputs of this tool (each ending in its JSON line) as one "
                        "Markdown table")
    a = p.parse_args(argv)
    if a.markdown is None:
        if a.decoder is None:
            p.error("--decoder is required (sdxl or sana)")
        if a.platform == "tpu" and not a.topology:
            p.error("--topology is required with --platform tpu (e.g. v5e:1x1)")
        if a.batch < 1 or (a.steps is not None and a.steps < 1):
            p.error("--batch and --steps must be positive")
    return a


# --------------------------------------------------------------------------------------------------------------
# target devices


def tpu_target(topology: str):
    """plan_lib's TPU target, also for slices smaller than one host (v5e:1x1, v6e:1x2, v5p:1x1x1): libtpu wants
    the chips per host spelled out for those."""
    from jax.experimental import topologies

    generation, _, dims = topology.partition(":")
    if generation not in plan_lib.CHIPS or not dims:
        raise ValueError(f"--topology {topology!r}: expected GENERATION:AxB[xC] with GENERATION one of "
                         f"{sorted(plan_lib.CHIPS)}")
    try:
        sizes = [int(x) for x in dims.split("x")]
    except ValueError:
        raise ValueError(f"--topology {topology!r}: expected GENERATION:AxB[xC]") from None
    chips = math.prod(sizes)
    if chips >= 4:
        return plan_lib.tpu_target(topology)
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                            chips_per_host_bounds=(sizes + [1, 1])[:3])
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--topology {topology!r}: libtpu does not know it ({e})") from e
    devices = list(topo.devices)
    return plan_lib.Target("tpu", topology, devices, plan_lib.CHIPS[generation], max(1, len(devices) // chips))


# --------------------------------------------------------------------------------------------------------------
# the programs


def _configs(decoder: str, preset: str, dtype: str, scan: bool):
    from blip3o_jax import models

    spec = DECODERS[decoder]
    den_hf, vae_hf = spec[preset]
    policy = {"dtype": dtype, "param_dtype": dtype}
    den = models.config_from_hf(spec["denoiser"], {**den_hf, **policy, "scan_layers": scan})
    vae = models.config_from_hf(spec["vae"], {**vae_hf, **policy})
    return den, vae


def _abstract_params(kind: str, cfg, mesh):
    """(module, params as ShapeDtypeStructs sharded by their logical axes) without allocating anything."""
    import flax.linen as nn
    import jax

    from blip3o_jax import models, sharding
    from blip3o_jax.models import registry

    module = models.build(kind, cfg)
    args, kwargs, method = registry.get(kind).init_args(cfg)
    boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, method=method, **kwargs))["params"]
    shardings = sharding.params_shardings(boxed, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)
    return module, params


def _input(shape, dtype, mesh):
    """An abstract input, its leading (batch) dimension over data + fsdp where it divides."""
    import jax

    from blip3o_jax import sharding

    axes = ("activation_batch",) + (None,) * (len(shape) - 1)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.logical_sharding(axes, shape, mesh))


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    arg, out = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
    alias, temp = int(m.alias_size_in_bytes), int(m.temp_size_in_bytes)
    code = int(getattr(m, "generated_code_size_in_bytes", 0))
    return {"arguments": arg, "outputs": out, "aliased": alias, "temporaries": temp, "code": code,
            "peak": arg + out - alias + temp + code}


UNKNOWN_COST_TARGETS = ("ConcatBitcast",)


def _cost(compiled, platform: str) -> dict:
    """HLO FLOPs, bytes and XLA's time estimate of a compiled program.

    libtpu's cost model prices a `ConcatBitcast` custom call (a weight it reassembles from slices prefetched into
    on-chip memory) at -1 s, "unknown"; a bf16 SANA block has 7 of them, so the raw `optimal_seconds` of a whole
    model comes out at minus tens or hundreds of seconds. Those calls only rename bytes, so the estimate adds 1 s
    back per call. Checked on single SANA modules and on every plan in docs/aot_plans: the count is exactly the
    integer part of the negative raw figure, and what remains is a few ms to a few hundred ms. The raw figure and
    the count are reported next to the estimate.
    """
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    out = {"hlo_flops_per_device": float(cost.get("flops", 0.0)),
           "hlo_bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)), "optimal_seconds": None}
    raw = cost.get("optimal_seconds")
    if platform == "tpu" and raw is not None:
        text = compiled.as_text()
        unknown = sum(text.count(f'custom_call_target="{t}"') for t in UNKNOWN_COST_TARGETS)
        corrected = float(raw) + unknown
        out.update(optimal_seconds=corrected if corrected > 0 else None, optimal_seconds_raw=float(raw),
                   unknown_cost_custom_calls=unknown)
    return out


def _lower_compile(fn, args, mesh):
    import jax

    from blip3o_jax import sharding

    t0 = time.perf_counter()
    with jax.set_mesh(mesh), sharding.axis_rules():
        lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, {"lower_s": t1 - t0, "compile_s": time.perf_counter() - t1}


def _sdxl_programs(den_cfg, vae_cfg, den_unrolled, steps, height, width, batch, guided, mesh, f32):
    import jax

    from blip3o_jax.diffusion import schedulers
    from blip3o_jax.pipelines import sdxl_decoder

    unet, unet_params = _abstract_params("unet", den_cfg, mesh)
    vae, vae_params = _abstract_params("autoencoder_kl", vae_cfg, mesh)
    # the step program unrolls the blocks (for the cost model): its params are stored per block, not stacked
    unrolled, unrolled_params = _abstract_params("unet", den_unrolled, mesh)
    f = 2 ** (len(vae_cfg.block_out_channels) - 1)
    latent = (height // f, width // f, den_cfg.in_channels)
    tokens, width_ctx = DECODERS["sdxl"]["tokens"], den_cfg.cross_attention_dim
    decoder = sdxl_decoder.SDXLDecoder(unet, None, vae, None, schedulers.euler_config_from_dict(EMU2_SCHEDULER))
    # the pipeline's own jitted denoise + decode (sdxl_decoder.decode_clip_features calls it with these arguments)
    pipeline = sdxl_decoder._decode_fn(decoder, steps, height, width, guided)
    features = _input((batch, tokens, width_ctx), f32, mesh)
    pipeline_args = (unet_params, vae_params, _input((batch, *latent), f32, mesh), features, features,
                     jax.ShapeDtypeStruct((), f32))
    n = 2 * batch if guided else batch

    def step(p, x, t, states, pooled, time_ids):
        return unrolled.apply({"params": p}, x, t, states, text_embeds=pooled, time_ids=time_ids)

    step_args = (unrolled_params, _input((n, *latent), f32, mesh), _input((n,), f32, mesh),
                 _input((n, tokens, width_ctx), f32, mesh), _input((n, width_ctx), f32, mesh),
                 _input((n, 6), f32, mesh))

    def decode(p, z):
        return vae.apply({"params": p}, z, method="decode")

    decode_args = (vae_params, _input((batch, *latent), f32, mesh))
    return {"pipeline": (pipeline, pipeline_args), "step": (jax.jit(step), step_args),
            "decode": (jax.jit(decode), decode_args)}, (unet_params, vae_params), latent


def _sana_programs(den_cfg, vae_cfg, den_unrolled, steps, height, width, batch, guided, mesh, f32):
    import jax

    from blip3o_jax.diffusion import schedulers
    from blip3o_jax.pipelines import sana_decoder

    sana, sana_params = _abstract_params("sana", den_cfg, mesh)
    dc, dc_params = _abstract_params("autoencoder_dc", vae_cfg, mesh)
    unrolled, unrolled_params = _abstract_params("sana", den_unrolled, mesh)  # per block, not stacked
    f = vae_cfg.spatial_compression_ratio
    latent = (height // f, width // f, den_cfg.in_channels)
    tokens, caption = DECODERS["sana"]["tokens"], den_cfg.caption_channels
    decoder = sana_decoder.SanaDecoder(None, None, None, None, sana, None, dc, None, float(vae_cfg.scaling_factor),
                                       schedulers.flow_match_config_from_dict(FLOW_MATCH_SCHEDULER))
    # the pipeline's own jitted denoise + decode (sana_decoder.decode_features calls it with these arguments)
    pipeline = sana_decoder._sample_fn(decoder, steps, guided, "uint8")
    features = _input((batch, tokens, caption), f32, mesh)
    pipeline_args = (sana_params, dc_params, _input((batch, *latent), f32, mesh), features, features,
                     jax.ShapeDtypeStruct((), f32))
    n = 2 * batch if guided else batch

    def step(p, x, t, context):
        return unrolled.apply({"params": p}, x, t, context)

    step_args = (unrolled_params, _input((n, *latent), f32, mesh), _input((n,), f32, mesh),
                 _input((n, tokens, caption), f32, mesh))

    def decode(p, z):
        return dc.apply({"params": p}, z, method="decode")

    decode_args = (dc_params, _input((batch, *latent), f32, mesh))
    return {"pipeline": (pipeline, pipeline_args), "step": (jax.jit(step), step_args),
            "decode": (jax.jit(decode), decode_args)}, (sana_params, dc_params), latent


def _decode_side(vae_params) -> dict:
    """The VAE params a decode reads (jit drops the unused encoder from the compiled program's arguments)."""
    return {k: v for k, v in vae_params.items() if k not in ("encoder", "quant_conv")}


def _param_count(tree) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def plan(decoder: str, target, *, preset: str = "full", resolution: int | None = None, steps: int | None = None,
         batch: int = 1, guided: bool = True, dtype: str = "bfloat16", mesh_spec: str | None = None,
         name: str | None = None) -> dict:
    """Compiles the decoder's pipeline, step and decode programs on `target`; returns the plan's figures."""
    import jax
    import jax.numpy as jnp

    from blip3o_jax import sharding

    spec = DECODERS[decoder]
    resolution = resolution or (spec["resolution"] if preset == "full" else spec["tiny_resolution"])
    steps = steps or spec["steps"]
    den_cfg, vae_cfg = _configs(decoder, preset, dtype, scan=True)
    factor = 2 ** (len(vae_cfg.block_out_channels) - 1) if decoder == "sdxl" else vae_cfg.spatial_compression_ratio
    if resolution <= 0 or resolution % factor:
        raise ValueError(f"resolution {resolution} is not a positive multiple of the VAE's factor {factor}")
    den_unrolled, _ = _configs(decoder, preset, dtype, scan=False)
    mesh_sizes = plan_lib.parse_mesh(mesh_spec, {"fsdp": -1})
    mesh = sharding.make_mesh(mesh_sizes, devices=target.devices)
    build = _sdxl_programs if decoder == "sdxl" else _sana_programs
    programs, (den_params, vae_params), latent = build(den_cfg, vae_cfg, den_unrolled, steps, resolution, resolution,
                                                       batch, guided, mesh, jnp.float32)
    result = {
        "decoder": decoder, "name": name or f"{decoder} {resolution}px", "preset": preset, "resolution": resolution,
        "latent": list(latent), "steps": steps, "cfg": guided, "batch": batch, "denoiser_batch": 2 * batch if guided
        else batch, "dtype": dtype, "platform": target.platform, "topology": target.label,
        "devices": len(target.devices), "chips": target.num_chips,
        "chip": target.chip["name"] if target.chip else jax.devices("cpu")[0].device_kind,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "params": {"denoiser": _param_count(den_params), "vae_decoder": _param_count(_decode_side(vae_params))},
        "params_bytes_per_device": {"denoiser": plan_lib._shard_bytes(den_params),
                                    "vae_decoder": plan_lib._shard_bytes(_decode_side(vae_params))},
        "hbm_per_device": target.hbm_per_device, "programs": {},
    }
    for label, (fn, args) in programs.items():
        compiled, times = _lower_compile(fn, args, mesh)
        entry = {"memory_per_device": _memory(compiled), **_cost(compiled, target.platform), **times}
        if label == "pipeline":  # the cost model counts its loop body once: memory only
            for key in ("optimal_seconds", "optimal_seconds_raw", "unknown_cost_custom_calls"):
                entry.pop(key, None)
        result["programs"][label] = entry
        print(f"  compiled {label}: lowering {times['lower_s']:.1f} s, compile {times['compile_s']:.1f} s",
              file=sys.stderr, flush=True)
    peak = result["programs"]["pipeline"]["memory_per_device"]["peak"]
    result["memory_per_device"] = result["programs"]["pipeline"]["memory_per_device"]
    result["fits"] = None if target.hbm_per_device is None else bool(peak <= target.hbm_per_device)
    add_estimates(result)
    return result


def add_estimates(r: dict) -> dict:
    """Seconds per image from the step and decode programs, in place: XLA's estimate and the roofline bound
    (max(HLO FLOPs / peak, HLO bytes / HBM bandwidth) per device); the MFU each implies (HLO FLOPs of one image's
    steps + decode over the chips' bf16 peak x time). None where the platform has no cost model (CPU)."""
    chip = plan_lib.CHIP_BY_NAME.get(r.get("chip")) if r.get("platform") == "tpu" else None
    step, decode = r["programs"]["step"], r["programs"]["decode"]
    per_chip = max(1, r["devices"] // r["chips"])
    for p in (step, decode):
        if chip is None:
            p["roofline_s"], p["roofline_bound_by"] = None, None
            continue
        compute_s = p["hlo_flops_per_device"] / (chip["peak_flops"] / per_chip)
        memory_s = p["hlo_bytes_accessed_per_device"] / (chip["hbm_gbps"] * 1e9 / per_chip)
        p["roofline_s"] = max(compute_s, memory_s)
        p["roofline_bound_by"] = "compute" if compute_s >= memory_s else "HBM"
    flops_call = r["devices"] * (r["steps"] * step["hlo_flops_per_device"] + decode["hlo_flops_per_device"])
    r["hlo_flops_per_image"] = flops_call / r["batch"]
    for key, field in (("estimated", "optimal_seconds"), ("roofline", "roofline_s")):
        if chip is None or step.get(field) is None or decode.get(field) is None:
            r[f"{key}_s_per_image"] = r[f"{key}_images_per_s"] = r[f"{key}_mfu"] = None
            continue
        call_s = r["steps"] * step[field] + decode[field]
        r[f"{key}_s_per_image"] = call_s / r["batch"]
        r[f"{key}_images_per_s"] = r["batch"] / call_s
        r[f"{key}_mfu"] = flops_call / (r["chips"] * chip["peak_flops"] * call_s)
    return r


# --------------------------------------------------------------------------------------------------------------
# output


def _b(x: float) -> str:
    return f"{x / GiB:.2f} GiB" if x >= GiB else f"{x / 1024**2:.1f} MiB"


def _s(x) -> str:
    return "-" if x is None else (f"{x:.3f} s" if x >= 0.01 else f"{1e3 * x:.2f} ms")


def format_table(r: dict) -> str:
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    hbm = f" of {r['hbm_per_device'] / GiB:.1f} GiB HBM" if r["hbm_per_device"] else ""
    fits = "" if r["fits"] is None else ("  -> fits" if r["fits"] else "  -> DOES NOT FIT")
    lines = [f"{r['name']} ({r['preset']}) on {r['topology']} ({r['chips']} chips, {r['devices']} devices, {r['chip']}); "
             f"mesh {mesh}; {r['dtype']}; batch {r['batch']} ({r['denoiser_batch']} per denoiser call), {r['steps']} "
             f"steps, latents {'x'.join(map(str, r['latent']))}",
             f"  params: denoiser {r['params']['denoiser'] / 1e9:.3f}B ({_b(r['params_bytes_per_device']['denoiser'])}"
             f" per device), VAE decoder {r['params']['vae_decoder'] / 1e6:.1f}M "
             f"({_b(r['params_bytes_per_device']['vae_decoder'])})"]
    for label, p in r["programs"].items():
        m = p["memory_per_device"]
        line = (f"  {label:8s}  peak {_b(m['peak'])} (arguments {_b(m['arguments'])}, temporaries "
                f"{_b(m['temporaries'])}, outputs {_b(m['outputs'])})")
        if label == "pipeline":
            line += hbm + fits
        else:
            line += (f"; {p['hlo_flops_per_device'] / 1e12:.3f} TFLOP/device, XLA est. {_s(p.get('optimal_seconds'))}, "
                     f"roofline >= {_s(p.get('roofline_s'))}" + (f" ({p['roofline_bound_by']})" if p.get(
                         "roofline_bound_by") else ""))
        lines.append(line)
    if r["estimated_s_per_image"] is not None or r["roofline_s_per_image"] is not None:
        est = "-" if r["estimated_s_per_image"] is None else \
            f"{r['estimated_s_per_image']:.3f} s ({r['estimated_images_per_s']:.2f} img/s, MFU {100 * r['estimated_mfu']:.0f}%)"
        roof = "-" if r["roofline_s_per_image"] is None else \
            f"{r['roofline_s_per_image']:.3f} s (MFU <= {100 * r['roofline_mfu']:.0f}%)"
        lines.append(f"  per image ({r['steps']} steps + decode): XLA estimate {est}; roofline >= {roof}")
    else:
        lines.append("  per image: no time estimate on this platform (compile for a TPU topology)")
    lines.append(f"  HLO FLOPs per image {r['hlo_flops_per_image'] / 1e12:.2f} TFLOP")
    return "\n".join(lines)


def markdown_table(results: list[dict]) -> str:
    rows = ["| decoder | px | steps | topology (chips) | batch | peak / HBM per chip | fits | step: XLA est. "
            "(roofline) | decode: XLA est. (roofline) | s / image: XLA est. (MFU) | images/s per chip: XLA est. | "
            "roofline s / image |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        hbm = r.get("hbm_per_device")
        peak = r["memory_per_device"]["peak"]
        mem = f"{peak / GiB:.2f} / {hbm / GiB:.0f} GiB" if hbm else f"{peak / GiB:.3f} GiB"
        fits = {True: "yes", False: "**no**", None: "-"}[r.get("fits")]
        st, de = r["programs"]["step"], r["programs"]["decode"]
        est = "-" if r.get("estimated_s_per_image") is None else \
            f"{r['estimated_s_per_image']:.2f} s ({100 * r['estimated_mfu']:.0f}%)"
        ips = "-" if r.get("estimated_images_per_s") is None else f"{r['estimated_images_per_s'] / r['chips']:.2f}"
        roof = "-" if r.get("roofline_s_per_image") is None else f"{r['roofline_s_per_image']:.2f} s"
        rows.append(f"| {r['decoder']} | {r['resolution']} | {r['steps']} | {r['topology']} ({r['chips']}) | "
                    f"{r['batch']} | {mem} | {fits} | {_s(st.get('optimal_seconds'))} ({_s(st.get('roofline_s'))}) | "
                    f"{_s(de.get('optimal_seconds'))} ({_s(de.get('roofline_s'))}) | {est} | {ips} | {roof} |")
    return "\n".join(rows)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.markdown is not None:
        results = []
        for path in a.markdown:
            try:
                with open(path) as f:
                    results.append(json.loads(f.read().strip().splitlines()[-1]))
            except (OSError, ValueError, IndexError) as e:
                sys.exit(f"aot_decoder: --markdown {path}: not an output of this tool ({e})")
        print(markdown_table(results))
        return
    plan_lib._configure_environment(["--platform", a.platform, "--num_devices", str(a.num_devices)])
    if a.platform == "tpu":
        try:
            import libtpu  # noqa: F401
        except ImportError:
            sys.exit("aot_decoder: libtpu is not installed: `pip install -e .[tpu]` (in a venv of its own), or use "
                     "--platform cpu")
        try:
            target = tpu_target(a.topology)
        except ValueError as e:
            sys.exit(f"aot_decoder: {e}")
    else:
        target = plan_lib.cpu_target()
    try:
        result = plan(a.decoder, target, preset=a.preset, resolution=a.resolution, steps=a.steps, batch=a.batch,
                      guided=a.cfg, dtype=a.dtype, mesh_spec=a.mesh, name=a.name)
    except ValueError as e:  # a mesh that does not divide the devices, a resolution the VAE cannot take, ...
        sys.exit(f"aot_decoder: {a.decoder} on {target.label}: {e}")
    except Exception as e:  # noqa: BLE001  (the TPU compiler refuses a program larger than the chip's HBM)
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        message = str(e).strip().splitlines()[0].rstrip(".")
        sys.exit(f"aot_decoder: {a.decoder} ({a.preset}) at batch {a.batch} does not fit on {target.label}: "
                 f"{message}. Use a smaller --batch or more chips (--topology, --mesh).")
    print(format_table(result), flush=True)
    from blip3o_jax import benchmarking

    benchmarking.emit(result)


if __name__ == "__main__":
    main()
