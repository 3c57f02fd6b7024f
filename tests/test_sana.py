"""SANA transformer and the SigLIP2 -> SANA connector vs their PyTorch references; conversion, sharding, bf16.

References: diffusers 0.42.1 `SanaTransformer2DModel(**kwargs)` (tiny random configs, every parameter perturbed
off its init) and, for the connector, the original BLIP3-o composition: `F.adaptive_avg_pool2d` on the SigLIP
token grid, then `nn.Sequential(Linear, GELU(tanh), Linear, diffusers RMSNorm(eps=1e-5))`. All fp32.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import SanaTransformer2DModel
from diffusers.models.normalization import RMSNorm as TorchRMSNorm
from jax.sharding import PartitionSpec as P

from blip3o_jax import convert, sharding
from blip3o_jax.convert import sana as sana_rules
from blip3o_jax.convert.common import ConversionError, abstract_shapes, from_torch_by_rules
from blip3o_jax.models import registry
from blip3o_jax.models import sana as sana_lib
from conftest import rel_err  # noqa: E402  (tests/ is on sys.path under pytest)

torch.set_num_threads(2)

SANA = registry.get("sana")
CONNECTOR = registry.get("sana_connector")

TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=16,
            mlp_ratio=2.5, attention_bias=False, sample_size=8, patch_size=1, norm_elementwise_affine=False,
            norm_eps=1e-6, interpolation_scale=None)

# name -> (diffusers kwargs, our policy fields, latent (H, W), caption tokens, caption mask with zeros)
CONFIGS = {
    # the SANA-1600M layout in miniature: patch 1, no position embedding, no mask
    "base": (TINY, {}, (8, 8), 6, False),
    # patch 2 on a non-square 6x10 latent (3x5 grid != the 4x4 base grid: the table is recomputed), sincos
    # position embedding, q/k/v biases, affine norm2, out_channels != in_channels, a caption mask
    "p2_pe_rect": (dict(TINY, out_channels=6, caption_channels=12, attention_bias=True, patch_size=2,
                        norm_elementwise_affine=True, norm_eps=1e-5, interpolation_scale=1),
                   {}, (6, 10), 5, True),
    # cross-attention 3 heads x 5 (15 != 8 = self inner dim), SANA 1.5 q/k RMSNorm, interpolation_scale 2 on
    # the default grid, unrolled + rematerialised blocks, a caption mask
    "cross3x5_qk": (dict(TINY, num_cross_attention_heads=3, cross_attention_head_dim=5, mlp_ratio=2.0,
                         qk_norm="rms_norm_across_heads", interpolation_scale=2),
                    dict(scan_layers=False, remat=True), (8, 8), 7, True),
}
# bf16: ReLU linear attention has a kink where every q entry of a head crosses zero (the output jumps from 0 to
# an average of v); with 4-wide heads that happens on many tokens, so bf16 is measured on 16-wide heads (SANA's
# are 32) and gentler perturbations, where torch's own bf16 forward is ~1% off its fp32 one
BF16_CONFIG = (dict(TINY, attention_head_dim=16, cross_attention_head_dim=16, cross_attention_dim=32), {}, (8, 8), 6,
               True)
BATCH = 2


def assert_close(ours, ref, rel=1e-4, what=""):
    err = rel_err(ours, ref)
    print(f"[rel] {what}: {err:.3g}")
    assert err <= rel, f"{what}: max|diff|/max|ref| = {err:.3g} > {rel:g}"
    return err


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.2):
    """Every parameter moved off its init (norm weights start at 1, biases at 0, scale_shift_table random)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def torch_state_dict(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def make_inputs(cfg, hw, n_cap, masked, batch=BATCH, seed=1):
    rs = np.random.RandomState(seed)
    latents = rs.randn(batch, *hw, cfg.in_channels).astype(np.float32)
    timesteps = np.concatenate([[999.0], rs.uniform(0, 1000, batch - 1)]).astype(np.float32)
    captions = (2.0 * rs.randn(batch, n_cap, cfg.caption_channels)).astype(np.float32)
    mask = None
    if masked:
        mask = np.ones((batch, n_cap), np.float32)
        mask[0, -2:] = 0
        mask[-1, 0] = 0
    return latents, timesteps, captions, mask


def torch_forward(ref, latents, timesteps, captions, mask):
    with torch.no_grad():
        out = ref(torch.from_numpy(latents).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(captions),
                  torch.from_numpy(timesteps), encoder_attention_mask=None if mask is None else torch.from_numpy(mask))
    return out.sample.permute(0, 2, 3, 1).numpy()


_CASES: dict = {}


def build_case(name):
    if name not in _CASES:
        kwargs, ours, hw, n_cap, masked = BF16_CONFIG if name == "bf16" else CONFIGS[name]
        torch.manual_seed(0)
        ref = SanaTransformer2DModel(**kwargs).eval()
        perturb_(ref, seed=1, scale=0.05 if name == "bf16" else 0.2)
        cfg = SANA.config_from_hf({**dict(ref.config), **ours})
        sd = torch_state_dict(ref)
        inputs = make_inputs(cfg, hw, n_cap, masked)
        _CASES[name] = dict(name=name, ref=ref, cfg=cfg, sd=sd, params=convert.from_torch("sana", sd, cfg),
                            module=SANA.build(cfg), inputs=inputs, want=torch_forward(ref, *inputs))
    return _CASES[name]


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
    return build_case(request.param)


# ---------------------------------------------------------------------------------------------------------------
# whole model


def test_whole_model_parity(case):
    latents, timesteps, captions, mask = case["inputs"]
    got = jax.jit(case["module"].apply)({"params": case["params"]}, latents, timesteps, captions, mask)
    assert got.dtype == jnp.float32 and got.shape == case["want"].shape
    assert_close(got, case["want"], what=f"model {case['name']}")


def test_caption_mask_changes_the_reference():
    # the masked configs would not test the mask if masking changed nothing
    c = build_case("p2_pe_rect")
    latents, timesteps, captions, mask = c["inputs"]
    unmasked = torch_forward(c["ref"], latents, timesteps, captions, None)
    assert rel_err(unmasked, c["want"]) > 1e-3


def test_position_embedding_is_used():
    # interpolation_scale=1 adds the sincos table: dropping it must change the output
    c = build_case("p2_pe_rect")
    no_pe = SANA.build(dataclasses.replace(c["cfg"], interpolation_scale=None))
    got = no_pe.apply({"params": c["params"]}, *c["inputs"])
    assert rel_err(got, c["want"]) > 1e-3
    ref_table = c["ref"].patch_embed.pos_embed[0].numpy()  # diffusers' buffer for the 4x4 base grid
    ours = sana_lib.sincos_pos_embed(8, 4, 4, 4, 1.0)
    np.testing.assert_allclose(ours, ref_table, rtol=0, atol=1e-6)


def test_bf16_policy_close_to_fp32_reference():
    c = build_case("bf16")
    cfg = dataclasses.replace(c["cfg"], dtype="bfloat16")
    got = jax.jit(SANA.build(cfg).apply)({"params": c["params"]}, *c["inputs"])
    assert got.dtype == jnp.float32
    err = assert_close(got, c["want"], rel=2e-2, what="model bf16 (heads 2x16, caption mask)")
    assert err > 1e-5  # the policy really computes in bf16


def grouped_convs(fn, *args) -> list[int]:
    """feature_group_count of every grouped convolution in fn's program (nested jaxprs included)."""
    counts = re.findall(r"feature_group_count=(\d+)", str(jax.make_jaxpr(fn)(*args)))
    return [int(n) for n in counts if int(n) > 1]


def test_depthwise_shifts_parity_and_gradient():
    """depthwise_impl="shifts" (GLUMBConv's depthwise conv as a sum of shifted slices, the XLA:CPU form): the whole
    model equals diffusers with no grouped convolution left in its program, and its gradient (the shifted sum's own
    VJP, inside scanned and rematerialised blocks) equals that of XLA's grouped convolution."""
    c = build_case("base")
    cfg = dataclasses.replace(c["cfg"], remat=True)
    latents, timesteps, captions, mask = c["inputs"]
    by_impl = {impl: SANA.build(dataclasses.replace(cfg, depthwise_impl=impl)) for impl in ("conv", "shifts")}

    def forward(module):
        return lambda p, x: module.apply({"params": p}, x, timesteps, captions, mask)

    got = jax.jit(forward(by_impl["shifts"]))(c["params"], latents)
    assert_close(got, c["want"], what="model base, depthwise shifts")
    assert grouped_convs(forward(by_impl["shifts"]), c["params"], latents) == []
    assert grouped_convs(forward(by_impl["conv"]), c["params"], latents) == [2 * cfg.ff_hidden]  # one scanned body

    cotangent = np.random.RandomState(7).randn(*c["want"].shape).astype(np.float32)
    grads = {impl: jax.jit(jax.grad(lambda p, x, f=forward(m): jnp.sum(f(p, x) * cotangent), argnums=(0, 1)))(
        c["params"], latents) for impl, m in by_impl.items()}
    # per leaf, max|diff| over max|reference leaf|, floored at 1e-3 of the largest gradient: attn2's key bias has an
    # exactly zero gradient (a softmax is invariant to a shift shared by all keys), here float noise on both sides
    flat_conv = jax.tree_util.tree_leaves_with_path(grads["conv"])
    flat_shifts = jax.tree.leaves(grads["shifts"])
    floor = 1e-3 * max(float(jnp.abs(g).max()) for _, g in flat_conv)
    worst = max((float(jnp.abs(s_ - c_).max()) / max(float(jnp.abs(c_).max()), floor), jax.tree_util.keystr(path))
                for (path, c_), s_ in zip(flat_conv, flat_shifts))
    print(f"[rel] gradient, depthwise shifts vs conv: worst leaf {worst[1]} {worst[0]:.3g}")
    assert worst[0] <= 1e-4, worst


# ---------------------------------------------------------------------------------------------------------------
# per block: one SanaTransformerBlock, the linear attention alone, GLUMBConv alone, the time embedding


def block_case(c, seed=2):
    cfg, ref = c["cfg"], c["ref"]
    block = ref.transformer_blocks[1]
    hp, wp = (s // cfg.patch_size for s in c["inputs"][0].shape[1:3])
    n_cap = c["inputs"][2].shape[1]
    rs = np.random.RandomState(seed)
    grid = rs.randn(BATCH, hp, wp, cfg.inner_dim).astype(np.float32)
    t6 = (0.5 * rs.randn(BATCH, 6 * cfg.inner_dim)).astype(np.float32)
    context = rs.randn(BATCH, n_cap, cfg.inner_dim).astype(np.float32)
    mask = c["inputs"][3]
    bias = np.zeros((BATCH, 1, 1, n_cap), np.float32) if mask is None else np.asarray(sana_lib.mask_to_bias(mask))
    module = sana_lib.SanaTransformerBlock(cfg)
    shapes = abstract_shapes(module, grid, t6, context, bias)
    params = from_torch_by_rules(sana_rules.block_rules(cfg, "", ""), torch_state_dict(block), shapes)
    return dict(block=block, module=module, params=params, grid=grid, t6=t6, context=context, mask=mask, bias=bias)


def test_block_parity(case):
    b = block_case(case)
    got, _ = jax.jit(b["module"].apply)({"params": b["params"]}, b["grid"], b["t6"], b["context"], b["bias"])
    hp, wp = b["grid"].shape[1:3]
    torch_bias = None if b["mask"] is None else (1 - torch.from_numpy(b["mask"])) * -10000.0
    with torch.no_grad():
        want = b["block"](torch.from_numpy(b["grid"]).flatten(1, 2), None, torch.from_numpy(b["context"]),
                          None if torch_bias is None else torch_bias[:, None], torch.from_numpy(b["t6"]), hp, wp)
    assert_close(got, want.numpy().reshape(got.shape), what=f"block {case['name']}")


def test_linear_attention_parity(case):
    b = block_case(case)
    cfg = case["cfg"]
    x = np.random.RandomState(3).randn(BATCH, 64, cfg.inner_dim).astype(np.float32)
    got = jax.jit(sana_lib.LinearAttention(cfg).apply)({"params": b["params"]["attn1"]}, x)
    with torch.no_grad():
        want = b["block"].attn1(torch.from_numpy(x)).numpy()
    assert_close(got, want, what=f"linear attention {case['name']}")


def test_glumbconv_parity(case):
    b = block_case(case)
    cfg = case["cfg"]
    x = np.random.RandomState(4).randn(BATCH, 5, 7, cfg.inner_dim).astype(np.float32)
    got = jax.jit(sana_lib.GLUMBConv(cfg).apply)({"params": b["params"]["ff"]}, x)
    with torch.no_grad():
        want = b["block"].ff(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert_close(got, want, what=f"GLUMBConv {case['name']}")


def test_time_embedding_parity(case):
    cfg = case["cfg"]
    t = np.array([0.0, 1.0, 333.3, 999.0], np.float32)
    got_t6, got_emb = jax.jit(sana_lib.AdaLayerNormSingle(cfg).apply)({"params": case["params"]["time_embed"]}, t)
    with torch.no_grad():
        want_t6, want_emb = case["ref"].time_embed(torch.from_numpy(t), batch_size=4, hidden_dtype=torch.float32)
    assert_close(got_t6, want_t6.numpy(), what=f"time embedding t6 {case['name']}")
    assert_close(got_emb, want_emb.numpy(), what=f"time embedding emb {case['name']}")


# ---------------------------------------------------------------------------------------------------------------
# conversion


def test_round_trip_exact(case):
    back = convert.to_torch("sana", case["params"], case["cfg"])
    assert sorted(back) == sorted(case["sd"])
    for k, v in case["sd"].items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_conversion_errors_name_the_key():
    c = build_case("base")
    sd = dict(c["sd"])
    del sd["transformer_blocks.1.ff.conv_point.weight"]
    with pytest.raises(ConversionError, match=r"missing key 'transformer_blocks\.1\.ff\.conv_point\.weight'"):
        convert.from_torch("sana", sd, c["cfg"])
    # attention_bias=False: a self-attention q bias is not a parameter of this config
    extra = dict(c["sd"], **{"transformer_blocks.0.attn1.to_q.bias": np.zeros(8, np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected key 'transformer_blocks\.0\.attn1\.to_q\.bias'"):
        convert.from_torch("sana", extra, c["cfg"])
    extra_layer = dict(c["sd"], **{"transformer_blocks.2.scale_shift_table": np.zeros((6, 8), np.float32)})
    with pytest.raises(ConversionError, match=r"transformer_blocks\.2\.scale_shift_table"):
        convert.from_torch("sana", extra_layer, c["cfg"])


def test_blip3o_checkpoint_prefixes():
    # the SigLIP2_SANA checkpoint holds both under `transformer.`: the SANA model and the connector
    c = build_case("base")
    ccfg = CONNECTOR.config_from_hf(dict(input_dim=12, output_dim=16, num_pooled_tokens=4))
    conn_sd = {k: np.random.RandomState(0).randn(*v).astype(np.float32)
               for k, v in {"0.weight": (16, 12), "0.bias": (16,), "2.weight": (16, 16), "2.bias": (16,),
                            "3.weight": (16,)}.items()}
    full = {f"transformer.transformer.{k}": v for k, v in c["sd"].items()}
    full.update({f"transformer.connector.{k}": v for k, v in conn_sd.items()})
    full["encoder.model.vision_model.post_layernorm.weight"] = np.ones(4, np.float32)
    params = convert.from_torch("sana", full, c["cfg"])
    jax.tree.map(np.testing.assert_array_equal, params, c["params"])
    assert convert.to_torch("sana_connector", convert.from_torch("sana_connector", full, ccfg), ccfg).keys() == \
        conn_sd.keys()


# ---------------------------------------------------------------------------------------------------------------
# sharding


def test_sharded_equals_unsharded():
    c = build_case("base")
    cfg = c["cfg"]
    module = c["module"]
    latents, timesteps, captions, _ = make_inputs(cfg, (8, 8), 6, False, batch=4, seed=5)
    mask = np.ones((4, 6), np.float32)
    mask[1, 3:] = 0
    boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), latents, timesteps, captions)["params"]
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = sharding.params_shardings(boxed, mesh)
    expect = {
        ("transformer_blocks", "attn1", "to_q", "kernel"): P(None, "fsdp", "tensor"),
        ("transformer_blocks", "attn2", "to_out", "kernel"): P(None, "tensor", "fsdp"),
        ("transformer_blocks", "ff", "conv_inverted", "kernel"): P(None, "fsdp", "tensor"),
        ("transformer_blocks", "ff", "conv_depth", "kernel"): P(None, None, None, None, "tensor"),
        ("transformer_blocks", "ff", "conv_point", "kernel"): P(None, "tensor", "fsdp"),
        ("time_embed", "linear", "kernel"): P("fsdp", "tensor"),
        ("patch_embed", "proj", "kernel"): P(None, None, None, "fsdp"),
    }
    for path, want in expect.items():
        got = spec_of(shardings, path).spec
        assert tuple(got) + (None,) * (len(want) - len(got)) == tuple(want), (path, got, want)

    # the sharded side also rematerialises its scanned blocks (same params): remat must not change values either
    remat_module = SANA.build(dataclasses.replace(cfg, remat=True, remat_policy="dots"))

    def fwd(p, x, t, cap, m, module=module):
        return module.apply({"params": p}, x, t, cap, m)

    want = jax.jit(fwd)(c["params"], latents, timesteps, captions, mask)
    sharded = jax.tree.map(jax.device_put, c["params"], shardings)
    for path in expect:
        assert spec_of(sharded, path).sharding.spec == spec_of(shardings, path).spec
    batch = sharding.batch_sharding(mesh, 4)
    with jax.set_mesh(mesh), sharding.axis_rules():
        got = jax.jit(functools.partial(fwd, module=remat_module), out_shardings=batch)(
            sharded, jax.device_put(latents, batch), timesteps, captions, mask)
    assert got.sharding.spec[0] == ("data", "fsdp")
    assert_close(got, want, rel=1e-5, what="sharded vs unsharded")


def spec_of(tree, path):
    for p in path:
        tree = tree[p]
    return tree


# ---------------------------------------------------------------------------------------------------------------
# config and input checks


def test_odd_latent_with_patch_2_raises():
    c = build_case("p2_pe_rect")
    latents = np.zeros((1, 7, 7, 4), np.float32)
    captions = np.zeros((1, 5, 12), np.float32)
    with pytest.raises(ValueError, match="not divisible by patch_size=2"):
        c["module"].apply({"params": c["params"]}, latents, np.zeros(1, np.float32), captions)
    # diffusers silently drops the last row and column instead
    with torch.no_grad():
        out = c["ref"](torch.zeros(1, 4, 7, 7), torch.zeros(1, 5, 12), torch.zeros(1)).sample
    assert tuple(out.shape[-2:]) == (6, 6)


@pytest.mark.parametrize("change, message", [
    (dict(cross_attention_dim=16), "cross_attention_dim=16 must equal"),
    (dict(guidance_embeds=True), "not supported"),
    (dict(qk_norm="layer_norm"), "qk_norm='layer_norm' is not supported"),
])
def test_unsupported_configs_raise(change, message):
    with pytest.raises(ValueError, match=message):
        SANA.config_from_hf({**TINY, **change, "_class_name": "SanaTransformer2DModel"})


def test_registry_and_full_size_parameter_count():
    assert registry.kind_of_config({"_class_name": "SanaTransformer2DModel"}) == "sana"
    # SANA-1600M (diffusers defaults; Sana_1600M_512px: sample_size 16) and the BLIP3-o connector, never allocated
    shapes = convert.expected_shapes("sana", SANA.config_from_hf({"sample_size": 16}))
    assert sum(math.prod(s) for s in shapes.values()) == 1_604_462_752
    shapes = convert.expected_shapes("sana_connector", CONNECTOR.config_from_hf({}))
    assert sum(math.prod(s) for s in shapes.values()) == 7_969_536


# ---------------------------------------------------------------------------------------------------------------
# the SigLIP2 -> SANA connector


def torch_connector(width, out_dim, seed):
    torch.manual_seed(seed)
    seq = torch.nn.Sequential(torch.nn.Linear(width, out_dim), torch.nn.GELU(approximate="tanh"),
                              torch.nn.Linear(out_dim, out_dim),
                              TorchRMSNorm(out_dim, eps=1e-5, elementwise_affine=True))
    perturb_(seq, seed + 1)
    return seq.eval()


def torch_connector_forward(seq, features, num_pooled_tokens):
    """As the original `Encoder.forward` (pooling) followed by `Sana.connector`."""
    x = torch.from_numpy(features)
    if num_pooled_tokens > 0:
        side = int(x.size(1) ** 0.5)
        x = x.view(-1, side, side, x.size(-1))
        x = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), int(num_pooled_tokens ** 0.5))
        x = x.permute(0, 2, 3, 1).reshape(features.shape[0], -1, features.shape[-1])
    with torch.no_grad():
        return seq(x).numpy()


# (grid side n, num_pooled_tokens): exact 2x2 means, torch's overlapping adaptive windows (6 -> 4), no pooling
CONNECTOR_CASES = [(8, 16), (6, 16), (4, -1)]


@pytest.mark.parametrize("side, pooled", CONNECTOR_CASES, ids=[f"{s}x{s}->{p}" for s, p in CONNECTOR_CASES])
def test_connector_parity(side, pooled):
    width, out_dim = 12, 20
    seq = torch_connector(width, out_dim, seed=side)
    cfg = CONNECTOR.config_from_hf(dict(input_dim=width, output_dim=out_dim, num_pooled_tokens=pooled))
    sd = {f"connector.{k}": v for k, v in torch_state_dict(seq).items()}
    params = convert.from_torch("sana_connector", sd, cfg)
    features = (3.0 * np.random.RandomState(side).randn(BATCH, side * side, width)).astype(np.float32)
    want = torch_connector_forward(seq, features, pooled)
    got = jax.jit(CONNECTOR.build(cfg).apply)({"params": params}, features)
    assert got.shape == (BATCH, pooled if pooled > 0 else side * side, out_dim)
    assert_close(got, want, what=f"connector {side}x{side}->{pooled}")
    if side == 8:
        bf16 = CONNECTOR.build(dataclasses.replace(cfg, dtype="bfloat16"))
        err = assert_close(jax.jit(bf16.apply)({"params": params}, features).astype(jnp.float32), want, rel=2e-2,
                           what="connector bf16")
        assert err > 1e-5


def test_connector_conversion_and_init():
    cfg = CONNECTOR.config_from_hf(dict(input_dim=12, output_dim=20, num_pooled_tokens=16))
    sd = torch_state_dict(torch_connector(12, 20, seed=3))
    params = convert.from_torch("sana_connector", sd, cfg)
    back = convert.to_torch("sana_connector", params, cfg)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    with pytest.raises(ConversionError, match=r"missing key '3\.weight'"):
        convert.from_torch("sana_connector", {k: v for k, v in sd.items() if k != "3.weight"}, cfg)
    with pytest.raises(ConversionError, match=r"unexpected key '1\.weight'"):
        convert.from_torch("sana_connector", dict(sd, **{"1.weight": np.zeros(3, np.float32)}), cfg)
    init = CONNECTOR.build(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 12)))["params"]
    np.testing.assert_allclose(jax.tree.leaves(init["norm"])[0], np.full(20, math.sqrt(5.5), np.float32))


def test_connector_bad_inputs_raise():
    cfg = CONNECTOR.config_from_hf(dict(input_dim=12, output_dim=20, num_pooled_tokens=16))
    params = CONNECTOR.build(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 12)))
    with pytest.raises(ValueError, match="square grid"):
        CONNECTOR.build(cfg).apply(params, jnp.zeros((1, 15, 12)))
    with pytest.raises(ValueError, match="not a square"):
        CONNECTOR.config_from_hf(dict(input_dim=12, output_dim=20, num_pooled_tokens=63))
