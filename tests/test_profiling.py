"""The benches' `--profile` mode (blip3o_jax/profiling.py): per-op tables of ours (XLA trace + optimised HLO) and of
the PyTorch reference, ops classified by kind and named by where they come from."""
import json
import os
import subprocess
import sys
import textwrap

from blip3o_jax import profiling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HLO = """HloModule jit_step, entry_computation_layout={()->f32[4,8]{1,0}}

%fused_computation (param_0: f32[4,16], param_1: f32[16,8]) -> f32[4,8] {
  %param_0 = f32[4,16]{1,0} parameter(0)
  %param_1 = f32[16,8]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,8]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/Model/layers_0/self_attn/q_proj/dot_general" source_file="x.py" source_line=1}
}

%fused_computation.1 (param_0.1: f32[2,4,4], param_1.1: f32[2,4,4]) -> f32[2,4,4] {
  %param_0.1 = f32[2,4,4]{2,1,0} parameter(0)
  %param_1.1 = f32[2,4,4]{2,1,0} parameter(1)
  ROOT %dot.2 = f32[2,4,4]{2,1,0} dot(%param_0.1, %param_1.1), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={2}, metadata={op_name="jit(step)/Model/layers_0/self_attn/dot_general"}
}

%fused_computation.2 (param_0.2: f32[4,8]) -> f32[4] {
  %param_0.2 = f32[4,8]{1,0} parameter(0)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[4]{0} reduce(%param_0.2, %constant.1), dimensions={1}, to_apply=%add, metadata={op_name="jit(step)/Model/layers_0/input_layernorm/reduce_sum"}
}

%fused_computation.3 (param_0.3: f32[4,8]) -> f32[8,4] {
  %param_0.3 = f32[4,8]{1,0} parameter(0)
  ROOT %transpose.1 = f32[8,4]{1,0} transpose(%param_0.3), dimensions={1,0}, metadata={op_name="jit(step)/transpose(jvp(Model))/layers_0/transpose"}
}

ENTRY %main (p0: f32[4,16], p1: f32[16,8]) -> f32[4,8] {
  %p0 = f32[4,16]{1,0} parameter(0)
  %p1 = f32[16,8]{1,0} parameter(1)
  %ynn_fusion = f32[4,8]{1,0} fusion(%p0, %p1), kind=kCustom, calls=%fused_computation, metadata={op_name="jit(step)/Model/layers_0/input_layernorm/mul"}
  %ynn_fusion.1 = f32[2,4,4]{2,1,0} fusion(%p0, %p1), kind=kCustom, calls=%fused_computation.1
  %reduce_fusion = f32[4]{0} fusion(%ynn_fusion), kind=kInput, calls=%fused_computation.2
  %copy_fusion = f32[8,4]{1,0} fusion(%ynn_fusion), kind=kLoop, calls=%fused_computation.3
  ROOT %add.3 = f32[4,8]{1,0} add(%ynn_fusion, %ynn_fusion), metadata={op_name="jit(step)/Model/add"}
}
"""


def test_hlo_ops_are_classified_by_what_they_fuse_and_named_by_their_source():
    module = profiling.parse_hlo(HLO)
    kind = lambda op: profiling.hlo_kind(module[op], module)  # noqa: E731
    # a fusion holding a projection's dot is a dot, named after the dot (not after its root's other ops)
    assert kind("ynn_fusion") == ("dot", "jit(step)/Model/layers_0/self_attn/q_proj/dot_general")
    # a dot in an attention scope that is not a projection: the scores / weighted values
    assert kind("ynn_fusion.1")[0] == "attention"
    assert kind("reduce_fusion")[0] == "norm"
    assert kind("copy_fusion")[0] == "copy/layout"
    assert kind("add.3")[0] == "elementwise"
    assert profiling.short_where("jit(step)/transpose(jvp(Model))/layers_0/mlp/up_proj/dot_general") == \
        "bwd: layers_0/mlp/up_proj/dot_general"


def test_attention_is_the_module_an_op_was_traced_in_not_an_outer_block_named_after_it():
    kind = lambda *ops: profiling._kind_of_opcodes(list(ops))[0]  # noqa: E731
    unet = "jit(f)/UNet2DConditionModel/up_blocks_1/attentions_2/transformer_blocks_0"
    # the UNet's Transformer2DModel blocks are `attentions_N`: their feed-forward is a dot, its GELU elementwise
    assert kind(("dot", f"{unet}/ff/net_2/dot_general", "", None)) == "dot"
    assert kind(("exponential", f"{unet}/ff/net_0/exp", "", None), ("multiply", f"{unet}/ff/net_0/mul", "", None)) \
        == "elementwise"
    assert kind(("dot", "jit(f)/UNet/down_blocks_1/attentions_0/proj_in/dot_general", "", None)) == "dot"
    # the scores / weighted values of its attention modules, and their softmax
    assert kind(("dot", f"{unet}/attn1/dot_general", "", None)) == "attention"
    assert kind(("exponential", f"{unet}/attn2/exp", "", None), ("reduce", f"{unet}/attn2/reduce_max", "", None)) \
        == "softmax"
    # a VAE mid-block attention module is itself named attentions_0; the backward pass keeps the kinds
    assert kind(("dot", "jit(f)/AutoencoderKL/decoder/mid_block/attentions_0/dot_general", "", None)) == "attention"
    assert kind(("dot", "jit(s)/transpose(jvp(DiT))/DiT.blocks/layers_3/attn2/dot_general", "", None)) == "attention"
    assert kind(("dot", "jit(s)/transpose(jvp(DiT))/DiT.blocks/layers_3/attn2/to_q/dot_general", "", None)) == "dot"


def test_gaps_after_an_asynchronous_launch_are_that_ops_time():
    rows = {"dot.1": profiling.OpRow("dot.1", "dot", self_us=1.0, opcode="dot"),
            "fusion.1": profiling.OpRow("fusion.1", "elementwise", self_us=1.0, opcode="fusion"),
            "fusion.2": profiling.OpRow("fusion.2", "elementwise", self_us=1.0, opcode="fusion")}
    # ns: the dot's launch 0-1000, nothing runs until 5000 (the dot computing), the fusion 5000-6000, idle until
    # 8000, a last fusion; a second program call after a pause (not inside any execution window: not counted)
    leaves = [(0, 1000, "dot.1"), (5000, 6000, "fusion.1"), (8000, 9000, "fusion.2"),
              (20000, 21000, "dot.1"), (30000, 31000, "fusion.1")]
    gaps = profiling._attribute_gaps(leaves, [(0, 9000), (20000, 31000)], rows)
    assert gaps == {"async_us": 4.0 + 9.0, "idle_us": 2.0, "async_ops": 1}
    assert rows["dot.1"].async_us == 13.0 and rows["dot.1"].self_us == 14.0
    assert rows["fusion.1"].self_us == 1.0 and rows["fusion.1"].async_us == 0.0
    # no execution windows recorded: every gap counts
    rows["dot.1"].async_us = 0.0
    assert profiling._attribute_gaps(leaves[:3], [], rows)["async_us"] == 4.0


def test_torch_ops_are_classified():
    assert profiling.torch_kind("aten::addmm") == "dot"
    assert profiling.torch_kind("aten::mm") == "dot"
    assert profiling.torch_kind("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert profiling.torch_kind("aten::native_layer_norm") == "norm"
    assert profiling.torch_kind("aten::_softmax") == "softmax"
    assert profiling.torch_kind("aten::copy_") == "copy/layout"
    assert profiling.torch_kind("aten::mkldnn_convolution") == "conv"
    assert profiling.torch_kind("aten::gelu") == "elementwise"


SCRIPT = textwrap.dedent("""
    import json, sys
    from blip3o_jax import profiling
    out = sys.argv[1]
    profiling.enable_hlo_dump(out)  # before the first compile
    import jax, jax.numpy as jnp, torch

    x, w = jnp.ones((64, 256)), jnp.ones((256, 512)) * 0.01
    f = jax.jit(lambda x, w: jax.nn.gelu(x @ w).sum(-1))
    xt, wt = torch.ones(64, 256), torch.ones(256, 512) * 0.01
    g = lambda: torch.nn.functional.gelu(xt @ wt).sum(-1)
    summaries = profiling.profile_runs(out, {"ours": ("jax", lambda: f(x, w)), "ref": ("torch", g)}, calls=2)
    print(json.dumps(summaries))
""")


def test_profile_runs_write_per_op_tables_traces_and_optimised_hlo(tmp_path):
    out = str(tmp_path / "prof")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)  # the test session's simulated devices are not wanted here
    proc = subprocess.run([sys.executable, "-c", SCRIPT, out], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summaries) == {"ours", "ref"}
    # ours: the matmul is the largest op, found in the trace, classified from the optimised HLO
    assert summaries["ours"]["by_kind_ms"]["dot"] > 0
    assert summaries["ref"]["by_kind_ms"]["dot"] > 0
    for s in summaries.values():
        assert s["wall_ms"] > 0 and s["ops_ms"] > 0
    table = open(os.path.join(out, "ours.ops.md")).read()
    assert "| dot |" in table and "dot_general" in table and "Optimised HLO: `hlo/module_" in table
    assert "aten::" in open(os.path.join(out, "ref.ops.md")).read()
    hlo = os.listdir(os.path.join(out, "hlo"))
    assert any(n.endswith("after_optimizations.txt") for n in hlo)
    traces = [f for _, _, fs in os.walk(os.path.join(out, "ours")) for f in fs]
    assert any(f.endswith(".xplane.pb") for f in traces)
    assert os.path.exists(os.path.join(out, "ref", "trace.json"))
    # the side-by-side totals by kind are printed
    assert "profile (ms per call" in proc.stdout


def test_profile_python_tables_functions_by_own_time(tmp_path):
    def work():
        return sum(sorted(range(200000), key=lambda i: -i)[:10])

    s = profiling.profile_python("work", work, str(tmp_path))
    table = open(s["table"]).read()
    assert os.path.exists(s["pstats"]) and "| function |" in table and "sorted" in table
