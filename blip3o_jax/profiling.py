"""Per-op profiles of a benchmark's runs, ours and the PyTorch reference side by side (`tools/bench_* --profile DIR`).

For each profiled run `NAME` the directory gets:

- `NAME/` a trace: ours through `jax.profiler.trace` (an XSpace, open it in TensorBoard's profile plugin or
  xprof), the reference through `torch.profiler` (`trace.json`, Chrome trace format: chrome://tracing, Perfetto);
- `NAME.ops.md`: the per-op table, one row per op (ours: an executed HLO instruction of the optimised program,
  each a fusion, a dot, a copy...; the reference: an aten op), with its calls, self time per profiled call, share
  of the total, the op's kind (`dot`, `conv`, `attention`, `norm`, `elementwise`, `reduce`, `copy/layout`,
  `dynamic-slice/update`, `gather/scatter`, `rng`, `control`, `other`) and, for ours, where it comes from (the
  jax/flax name stack of the op, e.g. `.../layers_3/self_attn/...`); then the totals by kind;
- ours only: `hlo/`, every program XLA compiled in the process, as text before and after optimisation
  (`--xla_dump_to`), so a row can be read in its optimised HLO (`NAME.ops.md` names the module file).

Wall: per profiled call, tracing on (the profilers' own cost per op makes it longer than the timed runs, more so for
the reference, whose profiler records every aten call). Self time: an op's own time, less the ops it contains (a `while` holds its body's ops). On XLA:CPU independent
ops may run at the same time on different threads, so the sum of ops' times can exceed the wall time; the table
reports both. The reference's op times are torch's `self_cpu_time_total` on the calling thread (its intra-op
threads work inside the op).
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import time
from typing import Any, Callable

KINDS = ("dot", "conv", "attention", "norm", "softmax", "elementwise", "reduce", "copy/layout",
         "dynamic-slice/update", "gather/scatter", "rng", "control", "other")


def enable_hlo_dump(out_dir: str) -> None:
    """Makes XLA write every program it compiles (before and after optimisation, as text) to `out_dir/hlo`.

    Must run before the process's first compile (XLA reads its flags once); the user's own `XLA_FLAGS` are kept."""
    hlo = os.path.join(os.path.abspath(out_dir), "hlo")
    os.makedirs(hlo, exist_ok=True)
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_dump_to" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_dump_to={hlo} --xla_dump_hlo_as_text".strip()


@dataclasses.dataclass
class OpRow:
    name: str
    kind: str
    calls: int = 0
    self_us: float = 0.0
    where: str = ""
    module: str = ""
    opcode: str = ""
    async_us: float = 0.0  # of self_us: estimated time of an asynchronous op after its launch (see _attribute_gaps)


# ---------------------------------------------------------------------------------------------------------------
# HLO text: instruction -> (opcode, kind, op_name)

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\([^=]*?\)|[\w\[\]{},:.\s\/]*?)\s+([a-z][\w\-]*)\(")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')


def parse_hlo(text: str) -> dict[str, dict]:
    """{instruction name: {opcode, op_name, calls, target, comp}} of an HLO module's text, and per computation the
    opcodes it holds (key `__comp__`)."""
    instrs, comps, comp = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            m = _COMP.match(line)
            comp = m.group(1) if m else None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, opcode = m.group(1), m.group(2)
        calls = _CALLS.search(line)
        op_name = _OPNAME.search(line)
        target = _TARGET.search(line)
        instrs[name] = {"opcode": opcode, "calls": calls.group(1) if calls else None,
                        "op_name": op_name.group(1) if op_name else "", "target": target.group(1) if target else "",
                        "comp": comp}
        if comp:
            comps[comp].append((opcode, op_name.group(1) if op_name else "", target.group(1) if target else "",
                                calls.group(1) if calls else None))
    instrs["__comp__"] = dict(comps)
    return instrs


_PROJECTION = re.compile(r"(proj|dense|linear|fc\d*|qkv|to_[qkv]|to_out[^/]*|out|query|key|value|w[qkvo]|attend|"
                         r"kernel|mlp[^/]*|lm_head|head)/[^/]*$")


_ATTENTION_SCOPE = re.compile(r"attn|attention")  # attn1, self_attn, the VAE's mid-block attentions_0


_TRANSFORM = re.compile(r"^(jit|pjit|jvp|transpose|vmap|remat|checkpoint|while|body|cond|closed_call|core_call)\(")


def _name_stack(op_name: str) -> list[str]:
    """The op's jax/flax name stack without the `jit(...)` wrappers and transform markers."""
    return [p for p in op_name.split("/") if p and not _TRANSFORM.match(p)]


def _innermost_scope(op_name: str) -> str:
    """The module an op was traced in: the last component of its name stack before the primitive's own name
    (`.../attentions_0/transformer_blocks_0/ff/net_2/dot_general` -> `net_2`)."""
    parts = _name_stack(op_name.lower())
    return parts[-2] if len(parts) >= 2 else ""


def _is_attention(op_name: str) -> bool:
    """A dot traced directly in an attention module, not in one of its projections or in a module that merely sits
    inside a block named after attention (the UNet's `attentions_0/.../ff`): the scores or the weighted values."""
    return bool(_ATTENTION_SCOPE.search(_innermost_scope(op_name))) and not _PROJECTION.search(op_name.lower())


def _kind_of_opcodes(opcodes: list[tuple]) -> tuple[str, str]:
    """(kind, op_name of the op that decided it) of a list of (opcode, op_name, custom-call target, calls)."""
    ops = {o[0] for o in opcodes}
    names = " ".join(o[1] for o in opcodes).lower()
    first = lambda *codes: next((o[1] for o in opcodes if o[0] in codes), opcodes[-1][1])  # noqa: E731
    for o in opcodes:
        if o[0] == "dot" or (o[0] == "custom-call" and re.search(r"matmul|gemm|dot", o[2].lower())):
            return ("attention" if _is_attention(o[1]) else "dot"), o[1]
    if "convolution" in ops:
        return "conv", first("convolution")
    if ops & {"rng", "rng-bit-generator", "rng-get-and-update-state"} or "threefry" in names:
        return "rng", opcodes[-1][1]
    if ops & {"gather", "scatter"}:
        return "gather/scatter", first("gather", "scatter")
    if ops & {"dynamic-slice", "dynamic-update-slice"}:
        return "dynamic-slice/update", first("dynamic-slice", "dynamic-update-slice")
    if "softmax" in names or any(o[0] == "exponential" and _ATTENTION_SCOPE.search(_innermost_scope(o[1]))
                                 for o in opcodes):
        return "softmax", first("exponential", "reduce")
    if re.search(r"norm|rsqrt", names) and ("reduce" in ops or "rsqrt" in ops):
        return "norm", first("rsqrt", "reduce")
    if "reduce" in ops or "reduce-window" in ops:
        return "reduce", first("reduce", "reduce-window")
    if ops <= {"copy", "transpose", "bitcast", "reshape", "broadcast", "parameter", "tuple", "get-tuple-element",
               "slice", "concatenate", "pad", "constant", "copy-start", "copy-done", "iota"}:
        return "copy/layout", first("copy", "transpose", "concatenate", "pad", "slice")
    return "elementwise", opcodes[-1][1]


def hlo_kind(info: dict, module: dict) -> tuple[str, str]:
    """(kind, op_name) of an executed HLO instruction: by its opcode, or for a fusion by the ops fused into it (a
    fusion holding a dot is a dot, named after the dot, wherever its root comes from)."""
    opcode = info["opcode"]
    if opcode in ("while", "conditional", "call", "async-start", "async-done"):
        return "control", info["op_name"]
    if opcode == "fusion" and info["calls"]:
        # the fused computation's ops, and those of computations it calls in turn (nested fusions)
        seen, stack, inner = set(), [info["calls"]], []
        while stack:
            c = stack.pop()
            if c in seen:
                continue
            seen.add(c)
            ops = module["__comp__"].get(c, [])
            inner.extend(ops)
            stack.extend(o[3] for o in ops if o[3])
        if inner:
            return _kind_of_opcodes(inner)
        return "elementwise", info["op_name"]
    kind, name = _kind_of_opcodes([(opcode, info["op_name"], info["target"], None)])
    if opcode == "custom-call" and kind == "elementwise":
        kind = "other"
    return kind, name


def short_where(op_name: str) -> str:
    """The op's jax/flax name stack without the `jit(...)` wrappers and transform markers, shortened."""
    parts = _name_stack(op_name)
    grad = "transpose(" in op_name
    where = "/".join(parts[-4:])
    return ("bwd: " if grad else "") + where


# ---------------------------------------------------------------------------------------------------------------
# ours


def _load_modules(hlo_dir: str) -> dict[int, tuple[str, dict]]:
    """{program id: (file name, parsed module)} of the after-optimisation dumps in `hlo_dir`."""
    modules = {}
    for path in glob.glob(os.path.join(hlo_dir, "module_*after_optimizations.txt")):
        m = re.match(r"module_(\d+)\.", os.path.basename(path))
        if m:
            with open(path) as f:
                modules[int(m.group(1))] = (os.path.basename(path), parse_hlo(f.read()))
    return modules


def profile_jax(name: str, fn: Callable[[], Any], out_dir: str, *, calls: int = 3) -> dict:
    """Runs `fn` (already warm: compiled) `calls` times under `jax.profiler.trace` into `out_dir/name`, and writes
    `out_dir/name.ops.md`. Returns the summary (wall and op seconds per call, totals by kind)."""
    import jax

    trace_dir = os.path.join(out_dir, name)
    jax.block_until_ready(fn())
    with jax.profiler.trace(trace_dir):
        t0 = time.perf_counter()
        for _ in range(calls):
            jax.block_until_ready(fn())
        wall = (time.perf_counter() - t0) / calls
    return analyze_jax_trace(name, out_dir, wall_s=wall, calls=calls)


def analyze_jax_trace(name: str, out_dir: str, *, wall_s: float, calls: int) -> dict:
    """The per-op table of the trace `profile_jax` wrote to `out_dir/name` (the newest one there)."""
    from jax.profiler import ProfileData

    trace_dir = os.path.join(out_dir, name)
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not paths:
        raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
    data = ProfileData.from_file(paths[-1])
    modules = _load_modules(os.path.join(out_dir, "hlo"))
    rows: dict[tuple, OpRow] = {}
    leaves: list[tuple] = []  # (start, end, key) of every op event, all threads
    windows: list[tuple] = []
    for plane in data.planes:
        for line in plane.lines:
            events = []
            for ev in line.events:
                stats = dict(ev.stats)
                if "hlo_op" in stats:
                    events.append((ev.start_ns, ev.duration_ns, stats))
            events.sort(key=lambda e: (e[0], -e[1]))
            stack: list[list] = []  # [end, key, ...] of enclosing events on this thread
            for start, dur, stats in events:
                while stack and stack[-1][0] <= start:
                    stack.pop()
                key = (stats.get("program_id"), stats.get("hlo_module", ""), stats["hlo_op"])
                row = rows.get(key)
                if row is None:
                    row = rows[key] = _describe(key, modules)
                row.calls += 1
                row.self_us += dur / 1e3
                if stack:
                    rows[stack[-1][1]].self_us -= dur / 1e3
                stack.append([start + dur, key])
                leaves.append((start, start + dur, key))
            for ev in line.events:
                if ev.name.startswith("ThunkExecutor::Execute (wait"):  # a program's execution, as its caller waits
                    windows.append((ev.start_ns, ev.start_ns + ev.duration_ns))
    gaps = _attribute_gaps([e for e in leaves if rows[e[2]].kind != "control"], windows, rows)
    return _write_table(name, list(rows.values()), wall_s, calls, out_dir, framework="jax", gaps=gaps)


# XLA:CPU runs a dot or convolution that YNNPACK does not take (e.g. a weight gradient `x.T @ dy`, whose left
# operand is transposed) on its Eigen threads asynchronously: the trace's event for it ends at the launch.
_ASYNC_OPCODES = ("dot", "convolution")


def _attribute_gaps(leaves: list[tuple], windows: list[tuple], rows: dict) -> dict:
    """Gaps in the trace, while a program runs, where no op runs on any thread. A gap right after an asynchronous
    op's launch is that op computing: its length is added to the op's row (`async_us`, part of `self_us`; a lower
    bound, as the op also runs alongside later ops). Other gaps are idle. Returns the totals in microseconds."""
    def inside(a, b):  # the part of (a, b) within the programs' executions (all of it when none was recorded)
        if not windows:
            return b - a
        return sum(max(0, min(b, we) - max(a, ws)) for ws, we in windows)

    leaves = sorted(leaves)
    async_ns = idle_ns = 0
    cover_end, last = None, None
    for start, end, key in leaves:
        if cover_end is not None and start > cover_end:
            gap = inside(cover_end, start)
            row = rows[last]
            if row.opcode in _ASYNC_OPCODES:
                row.async_us += gap / 1e3
                row.self_us += gap / 1e3
                async_ns += gap
            else:
                idle_ns += gap
        if cover_end is None or end > cover_end:
            cover_end, last = end, key
    return {"async_us": async_ns / 1e3, "idle_us": idle_ns / 1e3,
            "async_ops": sum(1 for r in rows.values() if r.opcode in _ASYNC_OPCODES)}


def _describe(key, modules) -> OpRow:
    program_id, module_name, op = key
    file, module = modules.get(program_id, ("", None)) if program_id is not None else ("", None)
    if module is None or op not in module:
        return OpRow(op, "other", module=file or module_name)
    kind, op_name = hlo_kind(module[op], module)
    return OpRow(op, kind, where=short_where(op_name or module[op]["op_name"]), module=file,
                 opcode=module[op]["opcode"])


# ---------------------------------------------------------------------------------------------------------------
# the reference


_TORCH_KINDS = [
    ("attention", r"scaled_dot_product|flash_attention|_efficient_attention|sdpa"),
    ("dot", r"::(mm|addmm|bmm|baddbmm|matmul|linear|einsum|addmv|mv|dot)$"),
    ("conv", r"conv|mkldnn_convolution"),
    ("norm", r"norm"),
    ("softmax", r"softmax"),
    ("copy/layout", r"::(copy_|clone|contiguous|to|_to_copy|transpose|permute|reshape|view|t|cat|"
                    r"_unsafe_view|expand|as_strided|stack|slice|select|unsqueeze|squeeze|flatten|empty_like|"
                    r"empty|empty_strided|zeros|zeros_like|ones|ones_like|fill_|zero_|resize_)$"),
    ("gather/scatter", r"index|gather|scatter|embedding|masked"),
    ("reduce", r"::(sum|mean|max|min|amax|argmax|norm|var|std|all|any)$"),
    ("rng", r"rand|normal_|uniform_|bernoulli"),
]


def torch_kind(op: str) -> str:
    for kind, pattern in _TORCH_KINDS:
        if re.search(pattern, op):
            return kind
    if op.startswith("aten::"):
        return "elementwise"
    return "other"


def profile_torch(name: str, fn: Callable[[], Any], out_dir: str, *, calls: int = 3,
                  sync: Callable[[Any], Any] = lambda x: x) -> dict:
    """As `profile_jax` for the PyTorch reference: `torch.profiler` over `calls` runs of `fn`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    trace_dir = os.path.join(out_dir, name)
    os.makedirs(trace_dir, exist_ok=True)
    sync(fn())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            sync(fn())
        wall = (time.perf_counter() - t0) / calls
    prof.export_chrome_trace(os.path.join(trace_dir, "trace.json"))
    rows = []
    for ev in prof.key_averages():
        if ev.self_cpu_time_total <= 0 or not ev.key.startswith("aten::"):
            continue
        rows.append(OpRow(ev.key, torch_kind(ev.key), calls=ev.count, self_us=ev.self_cpu_time_total))
    return _write_table(name, rows, wall, calls, out_dir, framework="torch")


def profile_python(name: str, fn: Callable[[], Any], out_dir: str, *, top: int = 30) -> dict:
    """A host-side (Python) run, e.g. a data pipeline, under `cProfile`: `out_dir/name.pstats` (for `snakeviz`,
    `python -m pstats`) and `out_dir/name.functions.md`, the functions by own time (in-process threads only: a
    run whose work happens in worker processes shows only the waiting)."""
    import cProfile
    import pstats

    os.makedirs(out_dir, exist_ok=True)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    wall = time.perf_counter() - t0
    path = os.path.join(out_dir, f"{name}.pstats")
    prof.dump_stats(path)
    stats = pstats.Stats(path)
    rows = sorted(((key, v) for key, v in stats.stats.items()), key=lambda kv: -kv[1][2])  # own (total) time
    total = sum(v[2] for _, v in rows) or 1.0
    lines = [f"# {name}: host profile (cProfile)", "", f"wall {wall:.2f} s; profiled own time {total:.2f} s", "",
             "| function | calls | own s | share | cumulative s |", "|---|---|---|---|---|"]
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in rows[:top]:
        where = f"{os.path.basename(file)}:{line} {func}" if line else func
        lines.append(f"| `{where}` | {ncalls} | {tottime:.3f} | {100 * tottime / total:.1f}% | {cumtime:.3f} |")
    table = os.path.join(out_dir, f"{name}.functions.md")
    with open(table, "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"wall_s": wall, "pstats": path, "table": table}


# ---------------------------------------------------------------------------------------------------------------
# tables


def _write_table(name: str, rows: list[OpRow], wall_s: float, calls: int, out_dir: str, *, framework: str,
                 top: int = 60, gaps: dict | None = None) -> dict:
    rows = sorted(rows, key=lambda r: -r.self_us)
    total_us = sum(r.self_us for r in rows) or 1.0
    by_kind = collections.Counter()
    for r in rows:
        by_kind[r.kind] += r.self_us
    per_call = lambda us: us / calls / 1e3  # noqa: E731  (ms per profiled call)
    lines = [f"# {name}: per-op profile ({framework})", "",
             f"{calls} profiled calls; wall {1e3 * wall_s:.1f} ms per call; ops' self time "
             f"{per_call(total_us):.1f} ms per call (summed over threads)", "",
             "| kind | ms per call | share |", "|---|---|---|"]
    if gaps is not None:
        lines[4:4] = [
            f"Asynchronous ops: XLA:CPU runs the dots and convolutions YNNPACK does not take ({gaps['async_ops']} "
            "ops here, e.g. weight gradients `x.T @ dy`) on its Eigen threads, and the trace records only their "
            "launch. Their time is estimated from the gaps in which no op runs that follow a launch, and included "
            f"in their rows (marked `async`): {per_call(gaps['async_us']):.1f} ms per call, a lower bound (they "
            f"also run alongside later ops). Other gaps while the program runs: {per_call(gaps['idle_us']):.1f} "
            "ms per call.", ""]
    for kind, us in by_kind.most_common():
        lines.append(f"| {kind} | {per_call(us):.2f} | {100 * us / total_us:.1f}% |")
    lines += ["", f"Top {min(top, len(rows))} of {len(rows)} ops:", "",
              "| op | kind | calls per call | ms per call | share | where |", "|---|---|---|---|---|---|"]
    for r in rows[:top]:
        mark = f" (async: {per_call(r.async_us):.3f} after the launch)" if r.async_us else ""
        lines.append(f"| `{r.name}` | {r.kind} | {r.calls / calls:g} | {per_call(r.self_us):.3f}{mark} | "
                     f"{100 * r.self_us / total_us:.1f}% | {r.where.replace('|', '/')} |")
    modules = sorted({r.module for r in rows[:top] if r.module.endswith(".txt")})
    if modules:
        lines += ["", "Optimised HLO: " + ", ".join(f"`hlo/{m}`" for m in modules)]
    path = os.path.join(out_dir, f"{name}.ops.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    summary = {"wall_ms": 1e3 * wall_s, "ops_ms": per_call(total_us), "table": path,
               "by_kind_ms": {k: round(per_call(v), 3) for k, v in by_kind.most_common()}}
    if gaps is not None:
        summary.update(async_est_ms=round(per_call(gaps["async_us"]), 3), idle_ms=round(per_call(gaps["idle_us"]), 3))
    return summary


def print_side_by_side(summaries: dict[str, dict]) -> None:
    """One line per kind: ms per call of each profiled run (ours and the reference next to each other)."""
    names = list(summaries)
    kinds = [k for k in KINDS if any(k in s["by_kind_ms"] for s in summaries.values())]
    w = max([16] + [len(n) + 2 for n in names])
    print("profile (ms per call, ops' self time by kind):", flush=True)
    print(f"  {'kind':22s}" + "".join(f"{n:>{w}s}" for n in names))
    for k in kinds:
        print(f"  {k:22s}" + "".join(f"{summaries[n]['by_kind_ms'].get(k, 0.0):{w}.2f}" for n in names))
    print(f"  {'all ops':22s}" + "".join(f"{summaries[n]['ops_ms']:{w}.2f}" for n in names))
    print(f"  {'wall':22s}" + "".join(f"{summaries[n]['wall_ms']:{w}.2f}" for n in names))
    for n in names:
        print(f"  {n}: {summaries[n]['table']}", flush=True)


def profile_runs(out_dir: str, runs: dict[str, tuple[str, Callable[[], Any]]], *, calls: int = 3,
                 torch_sync: Callable[[Any], Any] = lambda x: x) -> dict[str, dict]:
    """Profiles each run, `{name: ("jax" | "torch", fn)}`, prints the side-by-side totals by kind and returns the
    summaries (for the bench's JSON line)."""
    os.makedirs(out_dir, exist_ok=True)
    summaries = {}
    for name, (framework, fn) in runs.items():
        if framework == "jax":
            summaries[name] = profile_jax(name, fn, out_dir, calls=calls)
        else:
            summaries[name] = profile_torch(name, fn, out_dir, calls=calls, sync=torch_sync)
    print_side_by_side(summaries)
    return summaries
