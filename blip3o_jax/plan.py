"""Ahead-of-time plans: compile the real train step of a config for a TPU topology on this CPU machine, and print
what one chip would hold and how fast XLA thinks the step is, before renting the pod.

    pip install -e .[tpu]     # libtpu: the TPU compiler runs on the CPU, no TPU needed
    blip3o-plan --config configs/blip3o_8b.py --topology v5p:4x4x4 --mesh fsdp=-1 --remat full
    blip3o-plan --config configs/blip3o_4b.py --topology v6e:8x8 --mesh data=2,fsdp=-1 \
        --config.data.global_batch_size=256
    blip3o-plan --config configs/tiny.py --platform cpu --num_devices 8   # no libtpu: CPU plan
    blip3o-plan --markdown plans/*.log      # saved outputs -> the README's Markdown table

(`blip3o-plan` is the console script of this module; `python -m blip3o_jax.plan` and `python tools/aot_compile.py`
run the same thing.)

What it does: builds the mesh over the topology's devices (`jax.experimental.topologies`, the device layout of the
real slice), calls `training.step.make_train_step(config, mesh)` (the same function the trainer jits), lowers
`setup.step_fn` on the abstract state/frozen params/batch (shapes + shardings, nothing is allocated) and compiles it
with XLA's TPU backend. From the compiled executable:

- per-chip memory (`compiled.memory_analysis()`): arguments (trainable params + optimizer state + frozen params +
  batch shard), outputs, the part of the outputs aliased to donated arguments (the new state reuses the old
  state's buffers), temporaries (activations, gradients, collectives' buffers); peak ~ arguments + outputs -
  aliased + temporaries + code, compared with the chip's HBM;
- XLA's cost model (`compiled.cost_analysis()`): HLO FLOPs per chip (recompute included) and `optimal_seconds`,
  its estimate of the step time; the implied MFU = analytic model FLOPs of the global batch (training/metrics.py,
  recompute not counted) / (chips x bf16 peak x estimated time).

- the roofline bound: step >= max(HLO FLOPs / peak, HLO bytes accessed / HBM bandwidth) per chip, and the MFU
  bound it implies; every TPU plan has it (this libtpu gives no `optimal_seconds` for v6e).

XLA's time estimate is a roofline-style model (no overlap accounting, no host input pipeline): use it to compare
plans and to catch an order-of-magnitude problem, not as a promise. The memory figures are exact for the compiled
program (XLA's buffer assignment), which is what decides whether a config fits.

`--platform cpu` compiles the same step for `--num_devices` simulated CPU devices (no libtpu needed): memory per
device and HLO FLOPs as above, no HBM or time estimate. The last line of output is one JSON object.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

from absl import flags


def _pre_parse(argv, name, default):
    """A flag's value before absl parses (environment variables must be set before jax is imported)."""
    for i, a in enumerate(argv):
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return default


def _configure_environment(argv) -> None:
    """Environment for the compile, before jax is first imported; only when this file runs as a program (importing
    it, e.g. from a test, must not leak TPU variables into the importing process)."""
    platform = _pre_parse(argv, "platform", "tpu")
    if platform == "tpu":
        # compile-only: the TPU backend is driven through topology descriptions; the runtime stays on CPU
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # silences libtpu's "no TPU host" init error
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        # compile-only, no TPU touched: several plans may run at once (libtpu otherwise holds /tmp/libtpu_lockfile)
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    elif platform == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
        n = int(_pre_parse(argv, "num-devices", _pre_parse(argv, "num_devices", "8")))
        flags_env = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join(flags_env + [f"--xla_force_host_platform_device_count={n}"])


GiB = 1024**3

# Per chip: HBM, HBM bandwidth and dense bf16 peak (vendor data sheets). A topology's device may be a chip or one of
# its cores (v4 without megacore lists 2 devices per chip): figures are divided by devices per chip.
CHIPS = {
    "v4": dict(name="TPU v4", hbm_gib=32, hbm_gbps=1228, peak_flops=275e12),
    "v5e": dict(name="TPU v5e", hbm_gib=16, hbm_gbps=819, peak_flops=197e12),
    "v5litepod": dict(name="TPU v5e", hbm_gib=16, hbm_gbps=819, peak_flops=197e12),
    "v5p": dict(name="TPU v5p", hbm_gib=95, hbm_gbps=2765, peak_flops=459e12),
    "v6e": dict(name="TPU v6e", hbm_gib=32, hbm_gbps=1640, peak_flops=918e12),
}
CHIP_BY_NAME = {c["name"]: c for c in CHIPS.values()}


def _define_flags():
    """CLI flags, defined only when run as a program (importing this module must not touch absl's flag registry)."""
    flags.DEFINE_string("topology", None, "TPU topology, e.g. v5p:4x4x4, v6e:16x16, v5e:16x16 (--platform tpu).")
    flags.DEFINE_enum("platform", "tpu", ["tpu", "cpu"],
                      "tpu: compile for --topology with libtpu; cpu: simulated devices.")
    flags.DEFINE_integer("num_devices", 8, "--platform cpu: number of simulated CPU devices.")
    flags.DEFINE_string("mesh", None, "Mesh sizes, e.g. 'data=2,fsdp=-1,tensor=1' (default: the config's mesh).")
    flags.DEFINE_string("remat", None, "Rematerialisation of every tower (backbone, DiT, generation encoder): none | "
                        "full | dots | dots_no_batch; per tower: 'backbone=full,dit=dots,gen_encoder=none'. "
                        "Default: the config's.")
    flags.DEFINE_integer("batch", None, "Global batch size override (default: config.data.global_batch_size).")
    flags.DEFINE_string("name", None, "Label of the config in the output (default: the config file's name).")
    flags.DEFINE_bool("markdown", False, "Compile nothing: read this tool's saved outputs (the files given as "
                      "arguments, each ending in the JSON line) and print them as one Markdown table (the README's).")
    flags.DEFINE_enum("cost", "extrapolate", ["extrapolate", "unrolled", "scanned"],
                      "Where the FLOP count and time estimate come from. XLA's cost analysis counts a while loop's "
                      "body once, so a step with `nn.scan`-ned layers reports one layer per tower. 'extrapolate' "
                      "(default): compiles with every scanned tower unrolled at 1 layer and, per tower, at 2 layers, "
                      "and extrapolates linearly in depth (1 + towers extra compiles of shallow programs); "
                      "'unrolled': one fully unrolled compile (exact, slow for deep configs); 'scanned': no extra "
                      "compile (FLOPs and time too low, no MFU). Memory always comes from the config as given.")


REMAT_TOWERS = ("backbone", "dit", "gen_encoder")
LAYER_FIELDS = {"backbone": "num_hidden_layers", "dit": "n_layers", "gen_encoder": "layers"}


# ---------------------------------------------------------------------------------------------------------------
# config edits


def parse_mesh(spec: str | None, default) -> dict[str, int]:
    if not spec:
        return {k: int(v) for k, v in dict(default).items()}
    out = {}
    for item in spec.split(","):
        k, _, v = item.partition("=")
        if k.strip() not in ("data", "fsdp", "tensor") or not v:
            raise ValueError(f"--mesh: expected 'data=N,fsdp=N,tensor=N' (one may be -1), got {spec!r}")
        out[k.strip()] = int(v)
    return out


def parse_remat(spec: str | None) -> dict[str, str]:
    """{tower: policy} from 'full' (all towers) or 'backbone=full,dit=none'."""
    if not spec:
        return {}
    if "=" not in spec:
        return {t: spec for t in REMAT_TOWERS}
    out = {}
    for item in spec.split(","):
        k, _, v = item.partition("=")
        if k not in REMAT_TOWERS:
            raise ValueError(f"--remat: unknown tower {k!r}; expected one of {REMAT_TOWERS}")
        out[k] = v
    return out


def apply_overrides(config, *, mesh: dict | None = None, remat: dict | None = None, batch: int | None = None,
                    scan_layers: bool | None = None):
    """Returns the config with mesh / remat / batch / layer-scan overrides applied (a copy)."""
    import ml_collections

    config = ml_collections.ConfigDict(config.to_dict())
    if mesh:
        config.mesh = ml_collections.ConfigDict(mesh)
    for tower, policy in (remat or {}).items():
        section = config.model.get(tower)
        if section is None:
            continue
        section = dict(section)
        section["remat"] = policy not in ("none", "", None)
        if section["remat"]:
            section["remat_policy"] = policy
        config.model[tower] = section
    if scan_layers is not None:
        for tower in REMAT_TOWERS:
            if config.model.get(tower) is not None:
                config.model[tower] = {**dict(config.model[tower]), "scan_layers": bool(scan_layers)}
    if batch:
        config.data.global_batch_size = int(batch)
    return config


def remat_summary(mcfg) -> str:
    parts = []
    for tower in REMAT_TOWERS:
        cfg = getattr(mcfg, tower, None)
        if cfg is None or not hasattr(cfg, "remat"):
            continue
        parts.append(f"{tower}={(cfg.remat_policy or 'full') if cfg.remat else 'none'}")
    return ",".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# devices


@dataclasses.dataclass
class Target:
    platform: str
    label: str  # "v5p:4x4x4" or "cpu x8"
    devices: list
    chip: dict | None  # CHIPS entry (TPU)
    devices_per_chip: int

    @property
    def num_chips(self) -> int:
        return len(self.devices) // self.devices_per_chip

    @property
    def hbm_per_device(self) -> float | None:
        return None if self.chip is None else self.chip["hbm_gib"] * GiB / self.devices_per_chip

    @property
    def peak_per_device(self) -> float | None:
        return None if self.chip is None else self.chip["peak_flops"] / self.devices_per_chip


def tpu_target(topology: str) -> Target:
    from jax.experimental import topologies

    generation, _, dims = topology.partition(":")
    if generation not in CHIPS or not dims:
        raise ValueError(f"--topology {topology!r}: expected GENERATION:AxB[xC] with GENERATION one of "
                         f"{sorted(CHIPS)}")
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except (RuntimeError, ValueError) as e:  # libtpu's error for a topology it cannot describe
        raise ValueError(f"--topology {topology!r}: libtpu does not know it ({e})") from e
    devices = list(topo.devices)
    chips = math.prod(int(x) for x in dims.split("x"))
    per_chip = max(1, len(devices) // chips)
    return Target("tpu", topology, devices, CHIPS[generation], per_chip)


def cpu_target() -> Target:
    import jax

    devices = jax.devices("cpu")
    return Target("cpu", f"cpu x{len(devices)}", devices, None, 1)


# ---------------------------------------------------------------------------------------------------------------
# the plan


def _shard_bytes(abstract_tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (largest shard over devices)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(abstract_tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def _compile(config, target: Target):
    """(setup, compiled executable, lowering seconds, compile seconds) of the train step of `config`."""
    from blip3o_jax import sharding as shd
    from blip3o_jax.training import step as step_lib

    mesh = shd.make_mesh(dict(config.mesh), devices=target.devices)
    t0 = time.perf_counter()
    setup = step_lib.make_train_step(config, mesh)
    lowered = setup.step_fn.lower(setup.abstract_state, setup.abstract_frozen, setup.abstract_batch)
    t_lower = time.perf_counter() - t0
    compiled = lowered.compile()
    return setup, compiled, t_lower, time.perf_counter() - t0 - t_lower


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    return cost[0] if isinstance(cost, (list, tuple)) else (cost or {})


def _scanned_towers(mcfg) -> dict[str, int]:
    """{tower: n_layers} of the towers whose layers are `nn.scan`-ned (with more than one layer)."""
    out = {}
    for tower, field in LAYER_FIELDS.items():
        cfg = getattr(mcfg, tower, None)
        if cfg is not None and getattr(cfg, "scan_layers", False) and int(getattr(cfg, field)) > 1:
            out[tower] = int(getattr(cfg, field))
    return out


def _with_towers(config, fields_by_tower: dict[str, dict]):
    import ml_collections

    config = ml_collections.ConfigDict(config.to_dict())
    for tower, fields in fields_by_tower.items():
        config.model[tower] = {**dict(config.model[tower]), **fields}
    return config


COST_KEYS = ("flops", "optimal_seconds", "bytes accessed")


def _cost_figures(config, target: Target, compiled, scanned: dict[str, int], cost_from: str):
    """(HLO cost figures {COST_KEYS}, seconds spent on extra compiles, where the figures come from) of the train
    step: the compiled program's own, or unrolled copies' when layers are scanned (see `plan`)."""
    cost = {k: float(_cost(compiled).get(k, 0.0)) for k in COST_KEYS}
    t_cost = 0.0
    cost_source = "as configured (no scanned layers)"
    if scanned and cost_from == "unrolled":
        t0 = time.perf_counter()
        _, unrolled, _, _ = _compile(apply_overrides(config, scan_layers=False), target)
        cost = {k: float(_cost(unrolled).get(k, 0.0)) for k in COST_KEYS}
        t_cost = time.perf_counter() - t0
        cost_source = "unrolled copy (scan_layers=False)"
    elif scanned and cost_from == "extrapolate":
        # Every scanned tower unrolled at 1 layer (U1), then one tower at a time at 2 layers (U2_X): U2_X - U1 is
        # exactly one layer of X. Both are unrolled, so dead-code elimination treats them alike (the prompt pass
        # of the prefix cache leaves most of its last layer unused: a difference against the scanned program,
        # whose loop body cannot be pruned, would miss that part of every layer). Cost = U1 + sum (n_X - 1) x
        # layer_X: the unrolled program's cost, linear in each tower's depth.
        t0 = time.perf_counter()
        ones = {tower: {"scan_layers": False, LAYER_FIELDS[tower]: 1} for tower in scanned}
        _, u1, _, _ = _compile(_with_towers(config, ones), target)
        u1_cost = {k: float(_cost(u1).get(k, 0.0)) for k in COST_KEYS}
        cost = dict(u1_cost)
        for tower, n in scanned.items():
            two = {**ones, tower: {"scan_layers": False, LAYER_FIELDS[tower]: 2}}
            _, u2, _, _ = _compile(_with_towers(config, two), target)
            u2_cost = _cost(u2)
            for k in COST_KEYS:
                cost[k] += (n - 1) * (float(u2_cost.get(k, 0.0)) - u1_cost[k])
        t_cost = time.perf_counter() - t0
        cost_source = "unrolled, extrapolated from 1 and 2 layers of " + ", ".join(
            f"{t} (x{n})" for t, n in scanned.items())
    elif scanned:
        cost_source = "scanned: one layer per tower counted (too low)"
    return cost, t_cost, cost_source


def plan(config, target: Target, *, name: str = "config", cost_from: str = "extrapolate") -> dict:
    """Compiles the train step of `config` on `target`; returns the plan's figures (bytes per device, seconds).

    Memory comes from the program as configured (what the trainer runs). XLA's cost analysis counts a while
    loop's body once, so with scanned layers the FLOPs and time estimate come from unrolled copies (`cost_from`):
    "extrapolate" compiles every scanned tower unrolled at 1 layer and, per tower, at 2 layers, and extrapolates
    linearly in depth (layers are identical: exact for FLOPs); "unrolled" compiles one fully unrolled copy.
    """
    import jax

    from blip3o_jax.training import defaults
    from blip3o_jax.training import metrics as metrics_lib

    setup, compiled, t_lower, t_compile = _compile(config, target)
    mesh = setup.mesh
    mem = compiled.memory_analysis()
    scanned = _scanned_towers(setup.model_cfg)
    cost, t_cost, cost_source = _cost_figures(config, target, compiled, scanned, cost_from)
    arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    code = int(getattr(mem, "generated_code_size_in_bytes", 0))
    peak = arg + out - alias + temp + code

    mcfg = setup.model_cfg
    B = int(config.data.global_batch_size)
    seq_len = max(int(n) for n in config.data.seq_buckets)
    flops = metrics_lib.train_flops_per_sample(mcfg, seq_len=seq_len, trainable=setup.trainable_names,
                                               text_loss=bool(defaults.option(config, "train.text_loss_weight")))
    model_flops_step = flops["total"] * B
    est = cost.get("optimal_seconds")
    valid = target.platform == "tpu" and not (scanned and cost_from == "scanned")
    est = float(est) if est and est > 0 and valid else None
    n_dev = len(target.devices)
    result = {
        "config": name,
        "platform": target.platform,
        "topology": target.label,
        "devices": n_dev,
        "chips": target.num_chips,
        "chip": target.chip["name"] if target.chip else jax.devices("cpu")[0].device_kind,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "remat": remat_summary(mcfg),
        "query_path": getattr(mcfg, "query_path", "full"),
        "target": mcfg.target,
        "global_batch": B,
        "seq_len": seq_len,
        "trainable": list(setup.trainable_names),
        "params_bytes_per_device": {
            "trainable+optimizer": _shard_bytes(setup.abstract_state),  # + step, rng, counters (a few bytes)
            "frozen": _shard_bytes(setup.abstract_frozen),
            "batch": _shard_bytes(setup.abstract_batch),
        },
        "memory_per_device": {"arguments": arg, "outputs": out, "aliased": alias, "temporaries": temp,
                              "code": code, "peak": peak},
        "hbm_per_device": target.hbm_per_device,
        "fits": None if target.hbm_per_device is None else bool(peak <= target.hbm_per_device),
        "hlo_flops_per_device": cost["flops"],
        "hlo_bytes_accessed_per_device": cost["bytes accessed"],
        "model_flops_per_sample": flops,
        "model_flops_per_step": model_flops_step,
        "estimated_step_s": est,
        "implied_mfu": None if est is None else model_flops_step / (n_dev * target.peak_per_device * est),
        "estimated_samples_per_s": None if est is None else B / est,
        "cost_source": cost_source,
        "roofline_step_s": None,
        "roofline_bound_by": None,
        "roofline_mfu_bound": None,
        "lower_s": t_lower,
        "compile_s": t_compile,
        "cost_compile_s": t_cost,
    }
    if valid:
        add_roofline(result)
    return result


def add_roofline(r: dict) -> dict:
    """The roofline bound of a TPU plan, in place: step time >= max(HLO FLOPs / peak, HLO bytes / HBM bandwidth)
    per device, and the MFU bound it implies. Next to XLA's estimate (which adds its own per-op model and is not
    available for every generation, e.g. none from this libtpu for v6e), it is the one time figure every TPU plan has.
    """
    chip = CHIP_BY_NAME.get(r.get("chip"))
    if r.get("platform") != "tpu" or chip is None or not r.get("hlo_flops_per_device"):
        return r
    per_chip = max(1, r["devices"] // r["chips"])
    compute_s = r["hlo_flops_per_device"] / (chip["peak_flops"] / per_chip)
    memory_s = r["hlo_bytes_accessed_per_device"] / (chip["hbm_gbps"] * 1e9 / per_chip)
    bound = max(compute_s, memory_s)
    r["roofline_step_s"] = bound
    r["roofline_bound_by"] = "compute" if compute_s >= memory_s else "HBM"
    r["roofline_mfu_bound"] = r["model_flops_per_step"] / (r["devices"] * chip["peak_flops"] / per_chip * bound)
    return r


def markdown_table(results: list[dict]) -> str:
    """One Markdown row per plan (the README's TPU table)."""
    rows = ["| config | topology (chips) | mesh | remat | peak / HBM per chip | fits | XLA est. step (MFU) "
            "| roofline step >= (MFU <=) | samples/s (XLA est.) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        add_roofline(r)
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
        hbm = r.get("hbm_per_device")
        mem = f"{r['memory_per_device']['peak'] / GiB:.2f} / {hbm / GiB:.0f} GiB" if hbm else \
            f"{r['memory_per_device']['peak'] / GiB:.2f} GiB"
        fits = {True: "yes", False: "**no**", None: "-"}[r.get("fits")]
        est = "-" if r.get("estimated_step_s") is None else \
            f"{r['estimated_step_s']:.3f} s ({100 * r['implied_mfu']:.0f}%)"
        roof = "-" if r.get("roofline_step_s") is None else \
            f"{r['roofline_step_s']:.3f} s, {r['roofline_bound_by']} ({100 * r['roofline_mfu_bound']:.0f}%)"
        sps = "-" if r.get("estimated_samples_per_s") is None else f"{r['estimated_samples_per_s']:.0f}"
        rows.append(f"| {r['config']} | {r['topology']} ({r['chips']}) | {mesh} | {r['remat']} | {mem} | {fits} "
                    f"| {est} | {roof} | {sps} |")
    return "\n".join(rows)


def _bytes(b: float) -> str:
    return f"{b / GiB:8.2f} GiB" if b >= GiB else f"{b / 1024**2:8.2f} MiB"


def _flops(f: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if f >= scale:
            return f"{f / scale:.3g} {unit}"
    return f"{f / 1e6:.3g} MFLOP"


def format_table(r: dict) -> str:
    g = _bytes
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    hbm = f" of {r['hbm_per_device'] / GiB:.1f} GiB HBM" if r["hbm_per_device"] else ""
    chips = f"{r['chips']} chips, " if r["platform"] == "tpu" else ""
    lines = [
        f"{r['config']} on {r['topology']} ({chips}{r['devices']} devices, {r['chip']}); mesh {mesh}; "
        f"remat {r['remat']}; query path {r['query_path']}; target {r['target']}; global batch {r['global_batch']} "
        f"x {r['seq_len']} tokens",
        f"  per device:   arguments {g(r['memory_per_device']['arguments'])}   "
        f"(trainable+optimizer {g(r['params_bytes_per_device']['trainable+optimizer']).strip()}, "
        f"frozen {g(r['params_bytes_per_device']['frozen']).strip()}, "
        f"batch {g(r['params_bytes_per_device']['batch']).strip()})",
        f"                outputs   {g(r['memory_per_device']['outputs'])}   "
        f"(aliased to donated arguments {g(r['memory_per_device']['aliased']).strip()})",
        f"                temporaries {g(r['memory_per_device']['temporaries'])}",
        f"                peak      {g(r['memory_per_device']['peak'])}{hbm}"
        + ("" if r["fits"] is None else ("  -> fits" if r["fits"] else "  -> DOES NOT FIT")),
        f"  FLOPs:        model {_flops(r['model_flops_per_sample']['total'])}/sample "
        f"({', '.join(f'{k} {_flops(v)}' for k, v in r['model_flops_per_sample'].items() if k != 'total')}); "
        f"HLO {_flops(r['hlo_flops_per_device'])}/device/step (recompute included; {r['cost_source']})",
    ]
    if r["estimated_step_s"] is not None:
        lines.append(f"  XLA estimate: {r['estimated_step_s']:.3f} s/step, {r['estimated_samples_per_s']:.1f} "
                     f"samples/s, implied MFU {100 * r['implied_mfu']:.1f}%")
    else:
        lines.append("  XLA estimate: none on this platform (compile for a TPU topology for a time estimate)")
    if r.get("roofline_step_s") is not None:
        lines.append(f"  roofline:     step >= {r['roofline_step_s']:.3f} s ({r['roofline_bound_by']}-bound: HLO FLOPs / "
                     f"peak vs HLO bytes / HBM bandwidth), MFU <= {100 * r['roofline_mfu_bound']:.1f}%")
    lines.append(f"  lowering {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s"
                 + (f", cost compile {r['cost_compile_s']:.1f} s" if r["cost_compile_s"] else ""))
    return "\n".join(lines)


def _main(argv):
    from blip3o_jax import benchmarking
    from blip3o_jax.cli import UserError

    F = flags.FLAGS
    if F.markdown:
        if len(argv) < 2:
            raise UserError("--markdown: give the saved outputs of this tool as arguments")
        results = []
        for path in argv[1:]:
            try:
                with open(path) as f:
                    results.append(json.loads(f.read().strip().splitlines()[-1]))
            except (OSError, ValueError, IndexError) as e:
                raise UserError(f"--markdown {path}: not an output of this tool ({e})") from None
        print(markdown_table(results))
        return
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}")
    if F.config is None:
        raise UserError("--config is required")
    if F.platform == "tpu":
        if not F.topology:
            raise UserError("--topology is required with --platform tpu (e.g. v5p:4x4x4)")
        try:
            import libtpu  # noqa: F401
        except ImportError:
            raise UserError("libtpu is not installed: `pip install -e .[tpu]`, or use --platform cpu") from None
        try:
            target = tpu_target(F.topology)
        except ValueError as e:
            raise UserError(str(e)) from None
    else:
        target = cpu_target()
    try:
        config = apply_overrides(F.config, mesh=parse_mesh(F.mesh, F.config.mesh), remat=parse_remat(F.remat),
                                 batch=F.batch)
    except ValueError as e:
        raise UserError(str(e)) from None
    name = F.name or os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    try:
        result = plan(config, target, name=name, cost_from=F.cost)
    except ValueError as e:  # mesh does not divide the devices, batch does not divide the mesh, ...
        raise UserError(f"{name} on {target.label}: {e}") from None
    print(format_table(result), flush=True)
    benchmarking.emit(result)


def main():
    _configure_environment(sys.argv)
    from blip3o_jax import cli

    _define_flags()
    cli.define_config_flag()
    cli.run(_main, module=__name__, doc=__doc__)


if __name__ == "__main__":
    main()
