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
device and HLO FLOPs as above, no HBM or time estimate (`--device_spec` gives them a nominal HBM, peak and
bandwidth: then a fit verdict and a roofline bound). The last line of output is one JSON object.

`--search` compiles a set of candidate plans instead of one and ranks them:

    blip3o-plan --config configs/blip3o_8b.py --topology v5p:4x4x4 --search \
        --search_space "mesh=fsdp=-1|data=2,fsdp=-1; remat=config|none; attention=xla|pallas" \
        --results plans/search_8b_v5p.jsonl

The candidates are the product of the `--search_space` dimensions (mesh, remat, global `batch` or `per_chip`
batch, `attention`, layer `scan`; defaults in `search_space`). Each is resolved against the config (a candidate
that equals an earlier one is dropped), then checked without compiling: a global batch that data x fsdp does not
divide is "invalid", and one whose parameters, optimizer state and batch shard alone exceed a device's HBM "does
not fit". The rest are compiled as above (memory, XLA's estimate, roofline; the compiler's own out-of-memory
verdict is a "does not fit"). The fitting plans are ranked by XLA's estimated MFU (by the roofline MFU bound where a
generation has no estimate, v6e here), the others listed after them with the reason; the JSON line holds the
ranking and the best plan. `--results` makes a long search resumable: each finished candidate is appended to the
file at once and a rerun skips what it holds (records of a different config are ignored; single-plan outputs'
JSON lines may be appended to seed it).
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
        # the models' TPU layout choices (layers.target_platform), though jax's default backend here is the CPU
        os.environ["BLIP3O_TARGET_PLATFORM"] = "tpu"
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
                      "arguments, each ending in the JSON line; a search's output gives its best plan) and print "
                      "them as one Markdown table (the README's).")
    flags.DEFINE_enum("cost", "extrapolate", ["extrapolate", "unrolled", "scanned"],
                      "Where the FLOP count and time estimate come from. XLA's cost analysis counts a while loop's "
                      "body once, so a step with `nn.scan`-ned layers reports one layer per tower. 'extrapolate' "
                      "(default): compiles with every scanned tower unrolled at 1 layer and, per tower, at 2 layers, "
                      "and extrapolates linearly in depth (1 + towers extra compiles of shallow programs); "
                      "'unrolled': one fully unrolled compile (exact, slow for deep configs); 'scanned': no extra "
                      "compile (FLOPs and time too low, no MFU). Memory always comes from the config as given.")
    flags.DEFINE_bool("search", False, "Plan search: compile every candidate of --search_space (mesh x remat x batch "
                      "x attention x layer scan), skip the ones whose parameters and optimizer state alone exceed "
                      "the HBM, and print them ranked by estimated MFU among those that fit (see `search`).")
    flags.DEFINE_string("search_space", None, "Candidates, one dimension per ';', values separated by '|': "
                        "'mesh=fsdp=-1|data=2,fsdp=-1|fsdp=-1,tensor=2; remat=config|none|full|backbone=full,"
                        "dit=none; batch=512|1024 (global) or per_chip=8|16; attention=config|xla|pallas; "
                        "scan=config|true|false'. Dimensions left out take the defaults of `search_space`.")
    flags.DEFINE_string("results", None, "--search: JSON-lines file of finished candidates. A search that finds it "
                        "skips those (resume); each finished candidate is appended at once. Saved single-plan "
                        "outputs' last lines may be appended to it too.")
    flags.DEFINE_bool("compile_missing", True, "--search: compile the candidates --results lacks; with "
                      "--nocompile_missing only rank what the file holds and list the rest as pending.")
    flags.DEFINE_string("device_spec", None, "Per-device figures 'hbm_gib=..,peak_tflops=..,hbm_gbps=..' replacing "
                        "the chip's (TPU) or giving --platform cpu a nominal device: then CPU plans have a fit "
                        "verdict and a roofline bound (used by the tests).")


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


def attention_summary(mcfg) -> str:
    """'backbone=xla,dit=pallas,...': the attention kernel of each tower (None, the default of some towers, is
    the XLA path and reads "xla")."""
    parts = []
    for tower in REMAT_TOWERS:
        cfg = getattr(mcfg, tower, None)
        if cfg is not None and hasattr(cfg, "attention_impl"):
            parts.append(f"{tower}={cfg.attention_impl or 'xla'}")
    return ",".join(parts)


def scan_summary(mcfg) -> str:
    parts = []
    for tower in REMAT_TOWERS:
        cfg = getattr(mcfg, tower, None)
        if cfg is not None and hasattr(cfg, "scan_layers"):
            parts.append(f"{tower}={'scan' if cfg.scan_layers else 'unrolled'}")
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


def cpu_target(device_spec: dict | None = None) -> Target:
    """The simulated CPU devices; with `device_spec` ({hbm_gib, peak_flops, hbm_gbps} per device) they get a nominal
    HBM and peak, so a CPU plan has a fit verdict and a roofline bound (what the search tests rank on)."""
    import jax

    devices = jax.devices("cpu")
    chip = None if device_spec is None else dict(name="nominal " + devices[0].device_kind, **device_spec)
    return Target("cpu", f"cpu x{len(devices)}", devices, chip, 1)


def parse_device_spec(spec: str | None, base: dict | None = None) -> dict | None:
    """{hbm_gib, peak_flops, hbm_gbps} from 'hbm_gib=32,peak_tflops=900,hbm_gbps=1600' (missing keys from `base`)."""
    if not spec:
        return None
    out = {k: base[k] for k in ("hbm_gib", "peak_flops", "hbm_gbps")} if base else {}
    for item in spec.split(","):
        k, _, v = item.partition("=")
        k = k.strip()
        try:
            value = float(v)
        except ValueError:
            value = None
        if k not in ("hbm_gib", "peak_tflops", "hbm_gbps") or value is None or value <= 0:
            raise ValueError(f"--device_spec: expected 'hbm_gib=N,peak_tflops=N,hbm_gbps=N' with positive numbers, "
                             f"got {spec!r}")
        out["peak_flops" if k == "peak_tflops" else k] = value * 1e12 if k == "peak_tflops" else value
    missing = {"hbm_gib", "peak_flops", "hbm_gbps"} - set(out)
    if missing:
        raise ValueError(f"--device_spec {spec!r}: missing {', '.join(sorted(missing))}")
    return out


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


def _setup(config, target: Target):
    """The train step of `config` on the target's devices (jitted, not yet lowered)."""
    from blip3o_jax import sharding as shd
    from blip3o_jax.training import step as step_lib

    return step_lib.make_train_step(config, shd.make_mesh(dict(config.mesh), devices=target.devices))


def _compile(config, target: Target, setup=None):
    """(setup, compiled executable, lowering seconds, compile seconds) of the train step of `config`."""
    t0 = time.perf_counter()
    setup = setup if setup is not None else _setup(config, target)
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
    """(HLO cost figures {COST_KEYS}, seconds spent on extra compiles, where the figures come from, the figures
    per tower or None) of the train step: the compiled program's own, or unrolled copies' when layers are scanned
    (see `plan`). With "extrapolate", per tower: its layers' share ({COST_KEYS} x depth), plus "rest" (everything
    outside the scanned layers: embeddings, heads, losses, the optimizer update, the other towers' unscanned
    parts)."""
    cost = {k: float(_cost(compiled).get(k, 0.0)) for k in COST_KEYS}
    t_cost = 0.0
    cost_source = "as configured (no scanned layers)"
    by_tower = None
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
        by_tower = {"rest": dict(u1_cost)}
        for tower, n in scanned.items():
            two = {**ones, tower: {"scan_layers": False, LAYER_FIELDS[tower]: 2}}
            _, u2, _, _ = _compile(_with_towers(config, two), target)
            u2_cost = _cost(u2)
            layer = {k: float(u2_cost.get(k, 0.0)) - u1_cost[k] for k in COST_KEYS}
            by_tower[tower] = {**{k: n * layer[k] for k in COST_KEYS}, "layers": n}
            for k in COST_KEYS:
                cost[k] += (n - 1) * layer[k]
                by_tower["rest"][k] -= layer[k]
        t_cost = time.perf_counter() - t0
        cost_source = "unrolled, extrapolated from 1 and 2 layers of " + ", ".join(
            f"{t} (x{n})" for t, n in scanned.items())
    elif scanned:
        cost_source = "scanned: one layer per tower counted (too low)"
    return cost, t_cost, cost_source, by_tower


def tower_breakdown(r: dict) -> list[dict]:
    """Where a plan's step time goes, per tower (plans compiled with `--cost extrapolate`; [] otherwise): XLA's
    estimated seconds, the share of the step, HLO FLOPs and bytes per device, the tower's own roofline (FLOPs /
    peak vs bytes / HBM bandwidth, and which one binds) and its model FLOPs' MFU at XLA's estimate, i.e. how far
    each tower is from the chip's peak and why. Model FLOPs of the parts outside the towers' layers (embeddings,
    heads) are counted with their tower's, so "rest" has none and a tower's MFU is a slight over-estimate. "rest"
    is the 1-layer program less one full layer of each tower, so it comes out negative where a tower's last layer
    is partly dead code (the backbone's prompt pass with prefix-cached queries: of its last layer only what the
    cache needs is computed); the tower's row then counts that last layer in full."""
    parts = r.get("cost_by_tower")
    chip = r.get("chip_spec")
    if not parts or not chip:
        return []
    per_chip = max(1, r["devices"] // r["chips"])
    peak = chip["peak_flops"] / per_chip
    bandwidth = chip["hbm_gbps"] * 1e9 / per_chip
    step = r.get("estimated_step_s")
    rows = []
    for tower, c in sorted(parts.items(), key=lambda item: item[0] == "rest"):  # the towers, then the rest
        compute_s, memory_s = c["flops"] / peak, c["bytes accessed"] / bandwidth
        est = c["optimal_seconds"] if step is not None else None
        model = r["model_flops_per_sample"].get(tower, 0.0) * r["global_batch"] / r["devices"]
        rows.append({
            "tower": tower, "layers": c.get("layers"), "estimated_s": est,
            "share": None if est is None else est / step,
            "hlo_flops": c["flops"], "hlo_bytes": c["bytes accessed"],
            "roofline_s": max(compute_s, memory_s), "bound_by": "compute" if compute_s >= memory_s else "HBM",
            "mfu": model / (peak * est) if est and model else None,
        })
    return rows


def plan(config, target: Target, *, name: str = "config", cost_from: str = "extrapolate", setup=None) -> dict:
    """Compiles the train step of `config` on `target`; returns the plan's figures (bytes per device, seconds).

    Memory comes from the program as configured (what the trainer runs). XLA's cost analysis counts a while
    loop's body once, so with scanned layers the FLOPs and time estimate come from unrolled copies (`cost_from`):
    "extrapolate" compiles every scanned tower unrolled at 1 layer and, per tower, at 2 layers, and extrapolates
    linearly in depth (layers are identical: exact for FLOPs); "unrolled" compiles one fully unrolled copy.
    """
    import jax

    from blip3o_jax.training import defaults
    from blip3o_jax.training import metrics as metrics_lib

    setup, compiled, t_lower, t_compile = _compile(config, target, setup)
    mesh = setup.mesh
    mem = compiled.memory_analysis()
    scanned = _scanned_towers(setup.model_cfg)
    cost, t_cost, cost_source, by_tower = _cost_figures(config, target, compiled, scanned, cost_from)
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
    valid = not (scanned and cost_from == "scanned")  # FLOPs and bytes count every layer
    est = float(est) if est and est > 0 and valid and target.platform == "tpu" else None
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
        "attention": attention_summary(mcfg),
        "scan_layers": scan_summary(mcfg),
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
        "chip_spec": target.chip,  # the figures the fit and the roofline use (--device_spec may replace them)
        "fits": None if target.hbm_per_device is None else bool(peak <= target.hbm_per_device),
        "hlo_flops_per_device": cost["flops"],
        "hlo_bytes_accessed_per_device": cost["bytes accessed"],
        "model_flops_per_sample": flops,
        "model_flops_per_step": model_flops_step,
        "estimated_step_s": est,
        "implied_mfu": None if est is None else model_flops_step / (n_dev * target.peak_per_device * est),
        "estimated_samples_per_s": None if est is None else B / est,
        "cost_source": cost_source,
        "cost_by_tower": by_tower,
        "roofline_step_s": None,
        "roofline_bound_by": None,
        "roofline_mfu_bound": None,
        "lower_s": t_lower,
        "compile_s": t_compile,
        "cost_compile_s": t_cost,
    }
    if valid and target.chip is not None:
        add_roofline(result)
    return result


def add_roofline(r: dict) -> dict:
    """The roofline bound of a TPU plan, in place: step time >= max(HLO FLOPs / peak, HLO bytes / HBM bandwidth)
    per device, and the MFU bound it implies. Next to XLA's estimate (which adds its own per-op model and is not
    available for every generation, e.g. none from this libtpu for v6e), it is the one time figure every TPU plan has.
    """
    chip = r.get("chip_spec") or (CHIP_BY_NAME.get(r.get("chip")) if r.get("platform") == "tpu" else None)
    if chip is None or not r.get("hlo_flops_per_device"):
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
    return f"{b / GiB:8.2f} GiB" if abs(b) >= GiB else f"{b / 1024**2:8.2f} MiB"


def _flops(f: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if abs(f) >= scale:
            return f"{f / scale:.3g} {unit}"
    return f"{f / 1e6:.3g} MFLOP"


def tower_lines(r: dict) -> list[str]:
    """The plan's `tower_breakdown` as indented text lines ([] when it has none)."""
    towers = tower_breakdown(r)
    if not towers:
        return []
    lines = ["  per tower (XLA est. per step, share, HLO FLOPs and bytes per device, the tower's roofline, its model "
             "FLOPs' MFU at XLA's estimate):"]
    for t in towers:
        depth = f" x{t['layers']}" if t["layers"] else ""
        est = "-" if t["estimated_s"] is None else f"{t['estimated_s']:.3f} s ({100 * t['share']:.0f}%)"
        mfu = "-" if t["mfu"] is None else f"{100 * t['mfu']:.1f}%"
        lines.append(f"    {t['tower'] + depth:<16} {est:>16}  {_flops(t['hlo_flops']):>11}  "
                     f"{_bytes(t['hlo_bytes']).strip():>11}  roofline {t['roofline_s']:.3f} s ({t['bound_by']})  "
                     f"MFU {mfu}")
    return lines


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
    lines += tower_lines(r)
    lines.append(f"  lowering {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s"
                 + (f", cost compile {r['cost_compile_s']:.1f} s" if r["cost_compile_s"] else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# plan search

MESH_AXES = ("data", "fsdp", "tensor")
ATTENTION_IMPLS = ("xla", "pallas", "cudnn")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One point of the search space: overrides of the base config ("config" keeps the config's own value)."""

    mesh: tuple[int, int, int]  # (data, fsdp, tensor), resolved
    remat: str = "config"  # a --remat spec: one policy for every tower or 'backbone=..,dit=..'
    batch: int | None = None  # global batch; None = the config's
    attention: str = "config"  # attention_impl of every tower that has one
    scan: str = "config"  # "true" | "false" | "config": nn.scan over each tower's layers

    def label(self) -> str:
        parts = ["mesh " + ",".join(f"{a}={n}" for a, n in zip(MESH_AXES, self.mesh))]
        parts += [f"{k} {v}" for k, v in (("remat", self.remat), ("batch", self.batch), ("attention", self.attention),
                                          ("scan", self.scan)) if v not in ("config", None)]
        return "; ".join(parts)


def default_meshes(num_devices: int) -> list[tuple[int, int, int]]:
    """FSDP over everything, then 2 and 4 data-parallel replicas, each with tensor parallelism 1 and 2."""
    return [(d, num_devices // (d * t), t) for t in (1, 2) for d in (1, 2, 4) if num_devices % (d * t) == 0]


def search_space(spec: str | None, config, num_devices: int) -> list[Candidate]:
    """The candidates of a `--search_space` spec: the product of its dimensions (module docstring's syntax).

    Defaults: `default_meshes`, remat config|none|full (one policy for every tower), the config's global batch,
    attention and layer scan. `per_chip=N` sets the global batch to N x data x fsdp for each mesh (the tensor axis
    holds replicas of the same rows). Duplicates are dropped, order kept.
    """
    from blip3o_jax import sharding as shd

    dims: dict[str, list] = {"mesh": default_meshes(num_devices), "remat": ["config", "none", "full"],
                             "batch": [None], "per_chip": None, "attention": ["config"], "scan": ["config"]}
    for part in (spec or "").split(";"):
        if not part.strip():
            continue
        name, _, values = part.strip().partition("=")
        name = name.strip()
        values = [v.strip() for v in values.split("|") if v.strip()]
        if name not in dims or not values:
            raise ValueError(f"--search_space: expected 'NAME=V1|V2' with NAME one of {', '.join(dims)}, got "
                             f"{part.strip()!r}")
        if name == "mesh":
            dims["mesh"] = [shd.parse_mesh_shape(parse_mesh(v, None), num_devices) for v in values]
        elif name == "remat":
            from blip3o_jax.models import layers

            for v in values:
                for policy in parse_remat(v).values() if v != "config" else ():
                    layers.remat_policy(policy)  # raises for an unknown policy name
            dims["remat"] = values
        elif name in ("batch", "per_chip"):
            try:
                numbers = [int(v) for v in values]
            except ValueError:
                raise ValueError(f"--search_space {name}: expected integers, got {values}") from None
            if any(n <= 0 for n in numbers):
                raise ValueError(f"--search_space {name}: sizes must be positive, got {numbers}")
            dims[name] = numbers
        elif name == "attention":
            bad = [v for v in values if v != "config" and v not in ATTENTION_IMPLS]
            if bad:
                raise ValueError(f"--search_space attention: {bad[0]!r} is not one of config, "
                                 f"{', '.join(ATTENTION_IMPLS)}")
            dims["attention"] = values
        elif name == "scan":
            bad = [v for v in values if v not in ("config", "true", "false")]
            if bad:
                raise ValueError(f"--search_space scan: expected config, true or false, got {bad[0]!r}")
            dims["scan"] = values
    if dims["per_chip"] is not None and dims["batch"] != [None]:
        raise ValueError("--search_space: give batch (global) or per_chip, not both")
    out = []
    for mesh in dims["mesh"]:
        batches = dims["batch"] if dims["per_chip"] is None else [n * mesh[0] * mesh[1] for n in dims["per_chip"]]
        for remat in dims["remat"]:
            for batch in batches:
                for attention in dims["attention"]:
                    for scan in dims["scan"]:
                        c = Candidate(tuple(int(n) for n in mesh), remat, batch, attention, scan)
                        if c not in out:
                            out.append(c)
    return out


def apply_candidate(config, cand: Candidate):
    """The base config with a candidate's overrides (a copy)."""
    config = apply_overrides(config, mesh=dict(zip(MESH_AXES, cand.mesh)),
                             remat=None if cand.remat == "config" else parse_remat(cand.remat), batch=cand.batch,
                             scan_layers=None if cand.scan == "config" else cand.scan == "true")
    if cand.attention != "config":
        for tower in REMAT_TOWERS:
            if config.model.get(tower) is not None:
                config.model[tower] = {**dict(config.model[tower]), "attention_impl": cand.attention}
    return config


def config_fingerprint(config) -> str:
    """A short hash of a config: results of another config in the same results file are not reused."""
    import hashlib

    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def candidate_key(config, name: str, target: Target) -> dict:
    """What identifies a plan, resolved from the config with the candidate applied (the fields a plan's JSON has)."""
    from blip3o_jax.training import model_setup

    mcfg = model_setup.model_config(config)
    sizes = {a: int(dict(config.mesh).get(a, 1)) for a in MESH_AXES}
    return {"config": name, "topology": target.label, "mesh": sizes, "remat": remat_summary(mcfg),
            "global_batch": int(config.data.global_batch_size), "attention": attention_summary(mcfg),
            "scan_layers": scan_summary(mcfg)}


def _matches(key: dict, have: dict) -> bool:
    """Whether a stored record's key is the candidate's. A plan saved before plans recorded their attention kernel
    used XLA's (the only TPU one then); one without `scan_layers` matches any."""
    for field, value in key.items():
        if field == "attention" and field not in have:
            if any(part.partition("=")[2] != "xla" for part in value.split(",")):
                return False
        elif field in have and have[field] != value:
            return False
    return True


def _record_of_plan(r: dict) -> dict:
    """A single plan's JSON output as a search record (so saved `blip3o-plan` outputs can seed a search)."""
    key = {k: r[k] for k in ("config", "topology", "mesh", "remat", "global_batch", "attention", "scan_layers")
           if k in r}
    return {"key": key, "status": _plan_status(r), "reason": None, "plan": r}


def _plan_status(r: dict) -> str:
    return {True: "fits", False: "does not fit", None: "compiled"}[r.get("fits")]


def load_results(path: str | None, fingerprint: str) -> tuple[list[dict], int]:
    """(records of `path` usable for this config, number skipped because another config made them)."""
    if not path or not os.path.exists(path):
        return [], 0
    records, foreign = [], 0
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"--results {path}: line {n} is not JSON ({e})") from None
            if "key" not in record:  # a plan's own output line
                if "mesh" not in record or "config" not in record:
                    raise ValueError(f"--results {path}: line {n} is neither a search record nor a plan output")
                record = _record_of_plan(record)
            elif record.get("fingerprint") not in (None, fingerprint):
                foreign += 1
                continue
            records.append(record)
    return records, foreign


def evaluate(config, target: Target, name: str, *, cost_from: str = "extrapolate") -> dict:
    """One candidate's record: "invalid" (the mesh cannot take the batch...), "does not fit" (parameters, optimizer
    state and batch alone exceed the HBM: not compiled; or XLA's own out-of-memory verdict), "fits" / "compiled"
    (no HBM figure: CPU without --device_spec) with the plan, or "failed" with the compiler's message."""
    from blip3o_jax.cli import _one_line

    sizes = dict(config.mesh)
    batch_shards = int(sizes.get("data", 1)) * int(sizes.get("fsdp", 1))
    B = int(config.data.global_batch_size)
    if B % batch_shards:
        return {"status": "invalid", "reason": f"global batch {B} is not divisible by data x fsdp = {batch_shards}"}
    t0 = time.perf_counter()
    try:
        setup = _setup(config, target)
    except ValueError as e:
        return {"status": "invalid", "reason": _one_line(e)}
    # arguments of the step: what a device holds before any activation (a lower bound of its peak)
    resident = _shard_bytes(setup.abstract_state) + _shard_bytes(setup.abstract_frozen) + \
        _shard_bytes(setup.abstract_batch)
    hbm = target.hbm_per_device
    if hbm is not None and resident > hbm:
        return {"status": "does not fit", "resident_bytes": resident,
                "reason": f"parameters, optimizer state and batch alone take {resident / GiB:.2f} GiB per device, "
                          f"over the {hbm / GiB:.2f} GiB HBM (not compiled)"}
    try:
        r = plan(config, target, name=name, cost_from=cost_from, setup=setup)
    except Exception as e:  # noqa: BLE001 - the compiler's verdict is the result (out of memory, unsupported op)
        msg = _one_line(e)
        oom = "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()
        return {"status": "does not fit" if oom else "failed", "resident_bytes": resident, "reason": msg[:500]}
    return {"status": _plan_status(r), "resident_bytes": resident, "reason": None, "plan": r,
            "search_s": time.perf_counter() - t0}


def ranking_metric(records: list[dict]) -> str:
    """What the fitting plans are ranked by: XLA's MFU estimate where every one has it, else the roofline MFU bound,
    else (CPU without a device spec) the peak memory."""
    plans = [r["plan"] for r in records if r["status"] in ("fits", "compiled")]
    if plans and all(p.get("implied_mfu") for p in plans):
        return "xla_estimate"
    if plans and all(p.get("roofline_mfu_bound") for p in plans):
        return "roofline"
    return "memory"


def rank(records: list[dict]) -> tuple[list[dict], list[dict], str]:
    """(fitting plans best first, the others, the metric): highest MFU first (samples/s per chip at the peak the
    MFU is relative to, so plans of different global batch compare), ties by lower peak memory."""
    metric = ranking_metric(records)
    ok = [r for r in records if r["status"] in ("fits", "compiled")]
    rest = [r for r in records if r["status"] not in ("fits", "compiled")]
    for r in ok:
        add_roofline(r["plan"])

    def score(r):
        p = r["plan"]
        mfu = {"xla_estimate": p.get("implied_mfu"), "roofline": p.get("roofline_mfu_bound")}.get(metric) or 0.0
        return (-mfu, p["memory_per_device"]["peak"])

    return sorted(ok, key=score), rest, metric


def _summary(r: dict, rank_: int | None) -> dict:
    """One row of the search's JSON ranking."""
    p = r.get("plan") or {}
    key = r["key"]
    return {"rank": rank_, "status": r["status"], "reason": r.get("reason"), "mesh": key["mesh"],
            "remat": key.get("remat"), "global_batch": key.get("global_batch"), "attention": key.get("attention"),
            "scan_layers": key.get("scan_layers"),
            "per_device_batch": key.get("global_batch", 0) // max(1, key["mesh"].get("data", 1) *
                                                                   key["mesh"].get("fsdp", 1)),
            "peak_bytes": (p.get("memory_per_device") or {}).get("peak"), "hbm_per_device": p.get("hbm_per_device"),
            "resident_bytes": r.get("resident_bytes"),
            "estimated_step_s": p.get("estimated_step_s"), "implied_mfu": p.get("implied_mfu"),
            "roofline_step_s": p.get("roofline_step_s"), "roofline_mfu_bound": p.get("roofline_mfu_bound"),
            "roofline_bound_by": p.get("roofline_bound_by")}


def search_table(ranked: list[dict], rest: list[dict], metric: str) -> str:
    """The ranked plans as a Markdown table (fitting plans by `metric`, then the others with the reason)."""
    by = {"xla_estimate": "XLA estimated MFU", "roofline": "roofline MFU bound", "memory": "peak memory"}[metric]
    rows = [f"ranked by {by}",
            "| rank | mesh (data,fsdp,tensor) | remat | batch (per device) | attention | peak / HBM per device "
            "| XLA est. step (MFU) | roofline step >= (MFU <=) | status |",
            "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(ranked + rest):
        s = _summary(r, i + 1 if i < len(ranked) else None)
        attention = ",".join(sorted({part.partition("=")[2] for part in (s["attention"] or "xla").split(",")}))
        mem = "-"
        if s["peak_bytes"] is not None:
            mem = f"{s['peak_bytes'] / GiB:.2f}" + (f" / {s['hbm_per_device'] / GiB:.0f} GiB" if s["hbm_per_device"]
                                                     else " GiB")
        elif s["resident_bytes"] is not None:
            mem = f">= {s['resident_bytes'] / GiB:.2f} GiB"
        est = "-" if s["estimated_step_s"] is None else f"{s['estimated_step_s']:.3g} s ({100 * s['implied_mfu']:.1f}%)"
        roof = "-" if s["roofline_step_s"] is None else \
            f"{s['roofline_step_s']:.3g} s, {s['roofline_bound_by']} ({100 * s['roofline_mfu_bound']:.1f}%)"
        status = s["status"] + (f": {s['reason']}" if s["reason"] else "")
        rows.append(f"| {s['rank'] or '-'} | {','.join(str(v) for v in s['mesh'].values())} | {s['remat']} "
                    f"| {s['global_batch']} ({s['per_device_batch']}) | {attention} | {mem} | {est} | {roof} "
                    f"| {status} |")
    return "\n".join(rows)


def search(config, target: Target, candidates: list[Candidate], *, name: str = "config",
           results_path: str | None = None, cost_from: str = "extrapolate", compile_missing: bool = True,
           log=print) -> dict:
    """Compiles every candidate not already in `results_path` (each appended to it as soon as it is done) and ranks
    them all. Returns the search's JSON: the ranking (fitting plans best first, then the others with the reason)
    and `best`, the whole plan of the first (None when nothing fits). With `compile_missing=False` nothing is
    compiled: the candidates the file lacks are listed as "pending" (the standings of a search still running)."""
    fingerprint = config_fingerprint(config)
    stored, foreign = load_results(results_path, fingerprint)
    if foreign:
        log(f"{results_path}: {foreign} record(s) of another config ignored")
    records, compiled, resumed = [], 0, 0
    for i, cand in enumerate(candidates, 1):
        applied = apply_candidate(config, cand)
        try:
            key = candidate_key(applied, name, target)
        except ValueError as e:  # a remat policy or attention kernel the model configs reject
            from blip3o_jax.cli import _one_line
            key = {"config": name, "topology": target.label, "mesh": dict(zip(MESH_AXES, cand.mesh)),
                   "remat": cand.remat, "global_batch": cand.batch, "attention": cand.attention,
                   "scan_layers": cand.scan}
            records.append({"key": key, "status": "invalid", "reason": _one_line(e)})
            log(f"[{i}/{len(candidates)}] {cand.label()}: invalid ({records[-1]['reason']})")
            continue
        if any(r["key"] == key for r in records):  # another spelling of a plan already in the list
            log(f"[{i}/{len(candidates)}] {cand.label()}: the same plan as an earlier candidate")
            continue
        previous = next((r for r in stored if _matches(key, r["key"])), None)
        if previous is not None:
            records.append({**previous, "key": key})
            resumed += 1
            log(f"[{i}/{len(candidates)}] {cand.label()}: {previous['status']} (from {results_path})")
            continue
        if not compile_missing:
            records.append({"key": key, "status": "pending", "reason": f"not in {results_path} yet"})
            log(f"[{i}/{len(candidates)}] {cand.label()}: pending")
            continue
        log(f"[{i}/{len(candidates)}] {cand.label()}: compiling ...")
        record = {"key": key, "fingerprint": fingerprint, "candidate": dataclasses.asdict(cand),
                  **evaluate(applied, target, name, cost_from=cost_from)}
        if "plan" in record:
            compiled += 1
        records.append(record)
        if results_path:
            with open(results_path, "a") as f:
                f.write(json.dumps(record, default=float) + "\n")
                f.flush()
                os.fsync(f.fileno())
        p = record.get("plan")
        extra = ""
        if p is not None:
            extra = f", peak {p['memory_per_device']['peak'] / GiB:.2f} GiB"
            if p.get("implied_mfu"):
                extra += f", XLA est. {p['estimated_step_s']:.3g} s (MFU {100 * p['implied_mfu']:.1f}%)"
            if p.get("roofline_mfu_bound"):
                extra += f", roofline MFU <= {100 * p['roofline_mfu_bound']:.1f}%"
        log(f"[{i}/{len(candidates)}] {cand.label()}: {record['status']}{extra}"
            + (f" ({record['reason']})" if record.get("reason") else ""))
    ranked, rest, metric = rank(records)
    log(search_table(ranked, rest, metric))
    best_towers = tower_lines(ranked[0]["plan"]) if ranked else []
    if best_towers:
        log("\n".join(["best plan:", *best_towers]))
    return {"search": True, "config": name, "topology": target.label, "metric": metric,
            "candidates": len(candidates), "compiled": compiled, "resumed": resumed,
            "ranking": [_summary(r, i + 1) for i, r in enumerate(ranked)] + [_summary(r, None) for r in rest],
            "best": ranked[0]["plan"] if ranked else None}


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
                    r = json.loads(f.read().strip().splitlines()[-1])
                if r.get("search"):  # a search's output: its best plan (none when nothing fit)
                    r = r["best"]
                    if r is None:
                        continue
                missing = {"config", "topology", "chips", "mesh", "memory_per_device"} - set(r)
                if missing:
                    raise ValueError(f"no {', '.join(sorted(missing))} in its JSON line")
            except (OSError, ValueError, IndexError, TypeError, AttributeError) as e:
                raise UserError(f"--markdown {path}: not an output of this tool ({e})") from None
            results.append(r)
        print(markdown_table(results))
        return
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}")
    if F.config is None:
        raise UserError("--config is required")
    try:
        device_spec = parse_device_spec(F.device_spec, CHIPS.get((F.topology or "").partition(":")[0]))
    except ValueError as e:
        raise UserError(str(e)) from None
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
        if device_spec is not None:
            target.chip = dict(target.chip, **device_spec)
    else:
        target = cpu_target(device_spec)
    try:
        config = apply_overrides(F.config, mesh=parse_mesh(F.mesh, F.config.mesh), remat=parse_remat(F.remat),
                                 batch=F.batch)
    except ValueError as e:
        raise UserError(str(e)) from None
    name = F.name or os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    if F.search:
        try:
            candidates = search_space(F.search_space, config, len(target.devices))
            result = search(config, target, candidates, name=name, results_path=F.results, cost_from=F.cost,
                            compile_missing=F.compile_missing)
        except ValueError as e:  # a malformed --search_space or --results file
            raise UserError(str(e)) from None
        benchmarking.emit(result)
        return
    if F.search_space or F.results:
        raise UserError("--search_space and --results need --search")
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
