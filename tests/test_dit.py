"""DiT parity against the PyTorch composition of the original, weight conversion, sharding.

Reference (as BLIP3o's `NextDiTCrossAttn`, §1.5): diffusers `PixArtAlphaTextProjection(D_llm -> dim)` in front of
`LuminaNextDiT2DModel(cross_attention_dim=dim)`, RoPE table `get_2d_rotary_pos_embed_lumina(head_dim, 384, 384)`,
state dict = caption_projection.* + the model's keys without `pad_token`. Tiny random configs, all parameters
perturbed away from their init (gates, norm weights and biases non-trivial), fp32.
"""
from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import PixArtAlphaTextProjection, get_2d_rotary_pos_embed_lumina
from diffusers.models.transformers.lumina_nextdit2d import LuminaNextDiT2DModel
from jax.sharding import PartitionSpec as P

from blip3o_jax import convert, models, sharding
from blip3o_jax.convert.common import ConversionError
from blip3o_jax.models import dit as dit_lib

torch.set_num_threads(2)

# name -> (hf config dict, number of cond tokens, use a partial cond mask)
CONFIGS = {
    # GQA (kv < heads), conditioning width != dim, patch 1, input 8
    "gqa_p1": (dict(input_size=8, patch_size=1, in_channels=16, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    multiple_of=32, latent_embedding_size=48), 6, False),
    # patch 2 over a 4-channel latent (the vae_fm shape), ffn_dim_multiplier, cond width == dim
    "vae_p2": (dict(input_size=8, patch_size=2, in_channels=4, dim=64, n_layers=2, n_heads=2, n_kv_heads=2,
                    multiple_of=32, ffn_dim_multiplier=1.3, latent_embedding_size=64), 4, False),
    # input 6 (36 tokens), head_dim 24, a partial conditioning mask
    "in6_mask": (dict(input_size=6, patch_size=1, in_channels=12, dim=96, n_layers=1, n_heads=4, n_kv_heads=4,
                      multiple_of=64, latent_embedding_size=40), 5, True),
    # no q/k norm, unscanned + rematerialised layers, patch 3
    "noqk_unscanned": (dict(input_size=6, patch_size=3, in_channels=5, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                            multiple_of=16, qk_norm=False, latent_embedding_size=24, scan_layers=False, remat=True),
                       3, True),
}


class TorchNextDiTCrossAttn(torch.nn.Module):
    """The original's composition, built from diffusers layers."""

    def __init__(self, cfg: dit_lib.DiTConfig):
        super().__init__()
        self.caption_projection = PixArtAlphaTextProjection(cfg.latent_embedding_size, cfg.dim)
        self.model = LuminaNextDiT2DModel(
            sample_size=cfg.input_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels, hidden_size=cfg.dim,
            num_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_kv_heads=cfg.n_kv_heads,
            multiple_of=cfg.multiple_of, ffn_dim_multiplier=cfg.ffn_dim_multiplier, norm_eps=cfg.norm_eps,
            learn_sigma=False, qk_norm=cfg.qk_norm, cross_attention_dim=cfg.dim,
        )
        self.freqs_cis = get_2d_rotary_pos_embed_lumina(cfg.dim // cfg.n_heads, 384, 384)

    def forward(self, x_nchw, timestep, cond, cond_mask):
        enc = self.caption_projection(cond)
        return self.model(x_nchw, timestep, enc, cond_mask, self.freqs_cis, cross_attention_kwargs={}).sample

    def original_state_dict(self) -> dict[str, np.ndarray]:
        sd = {f"caption_projection.{k}": v for k, v in self.caption_projection.state_dict().items()}
        sd.update({k: v for k, v in self.model.state_dict().items() if k != "pad_token"})
        return {k: v.detach().numpy().copy() for k, v in sd.items()}


def make_reference(cfg: dit_lib.DiTConfig, seed: int = 0) -> TorchNextDiTCrossAttn:
    """Random torch reference with every parameter moved off its init (zero gates would hide cross-attention)."""
    torch.manual_seed(seed)
    ref = TorchNextDiTCrossAttn(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gate"):
                p.copy_(torch.randn_like(p))
            elif p.ndim == 1 and ("norm" in name or "caption_embedder.0" in name):
                p.add_(0.2 * torch.randn_like(p))  # norm weights (init 1) and biases (init 0)
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
    return ref


def make_inputs(cfg: dit_lib.DiTConfig, n_cond: int, partial_mask: bool, batch: int = 3, seed: int = 1):
    rs = np.random.RandomState(seed)
    x = rs.randn(batch, cfg.input_size, cfg.input_size, cfg.in_channels).astype(np.float32)
    t = np.concatenate([[1000.0, 1.0], rs.uniform(0, 1000, batch - 2)]).astype(np.float32)
    cond = (2.0 * rs.randn(batch, n_cond, cfg.latent_embedding_size)).astype(np.float32)
    mask = np.ones((batch, n_cond), np.int32)
    if partial_mask:
        mask[0, -2:] = 0
        mask[-1, 0] = 0
    return x, t, cond, mask


def torch_forward(ref, x, t, cond, mask) -> np.ndarray:
    with torch.no_grad():
        out = ref(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(t), torch.from_numpy(cond),
                  torch.from_numpy(mask))
    return out.permute(0, 2, 3, 1).numpy()


def assert_close(ours, ref, rel=1e-4, what=""):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err, scale = np.max(np.abs(ours - ref)), np.max(np.abs(ref))
    assert err <= rel * scale, f"{what}: max|diff| {err:.3g} > {rel:g} * max|ref| {scale:.3g}"
    return err / scale


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request):
    hf, n_cond, partial = CONFIGS[request.param]
    cfg = models.config_from_hf("dit", hf)
    ref = make_reference(cfg)
    params = convert.from_torch("dit", ref.original_state_dict(), cfg)
    module = models.build("dit", cfg)
    return dict(name=request.param, cfg=cfg, ref=ref, params=params, module=module,
                inputs=make_inputs(cfg, n_cond, partial))


def test_whole_model_parity(case):
    x, t, cond, mask = case["inputs"]
    want = torch_forward(case["ref"], x, t, cond, mask)
    got = jax.jit(case["module"].apply)({"params": case["params"]}, x, t, cond, mask)  # t float in [0, 1000]
    assert got.dtype == jnp.float32
    assert_close(got, want, what=case["name"])


def test_embedding_and_final_parity(case):
    cfg, ref, params = case["cfg"], case["ref"], case["params"]
    x, t, cond, mask = case["inputs"]
    tokens, temb, cond_proj, _ = case["module"].apply({"params": params}, x, t, cond, mask, method="embed")
    m = ref.model
    with torch.no_grad():
        x_t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
        want_tokens, _, _, _ = m.patch_embedder(x_t, ref.freqs_cis)
        want_proj = ref.caption_projection(torch.from_numpy(cond))
        want_temb = m.time_caption_embed(torch.from_numpy(t), want_proj, torch.from_numpy(mask))
    assert_close(tokens, want_tokens.numpy(), what="patch embed")
    assert_close(cond_proj, want_proj.numpy(), what="caption projection")
    assert_close(temb, want_temb.numpy(), what="time+caption embedding")
    rs = np.random.RandomState(5)
    h = rs.randn(*tokens.shape).astype(np.float32)
    got = case["module"].apply({"params": params}, h, np.asarray(temb), x.shape[1], x.shape[2], method="final")
    with torch.no_grad():
        out = m.norm_out(torch.from_numpy(h), want_temb)
        b, p, c = h.shape[0], cfg.patch_size, cfg.out_channels
        hp = x.shape[1] // p
        want = out.view(b, hp, hp, p, p, c).permute(0, 5, 1, 3, 2, 4).flatten(4, 5).flatten(2, 3)
    assert_close(got, want.permute(0, 2, 3, 1).numpy(), what="final layer + unpatchify")


def test_block_by_block_parity(case):
    cfg, ref, params = case["cfg"], case["ref"], case["params"]
    x, t, cond, mask = case["inputs"]
    rs = np.random.RandomState(7)
    hp, wp = x.shape[1] // cfg.patch_size, x.shape[2] // cfg.patch_size
    h = rs.randn(x.shape[0], hp * wp, cfg.dim).astype(np.float32)
    temb = rs.randn(x.shape[0], cfg.temb_dim).astype(np.float32)
    enc = (2 * rs.randn(x.shape[0], cond.shape[1], cfg.dim)).astype(np.float32)
    rope = tuple(jnp.asarray(a) for a in dit_lib.rope_table(hp, wp, cfg.head_dim))
    freqs = ref.freqs_cis[:hp, :wp].flatten(0, 1).unsqueeze(0)
    block_apply = jax.jit(dit_lib.DiTBlock(cfg).apply)
    for i, layer in enumerate(ref.model.layers):
        if cfg.scan_layers:
            block_params = jax.tree.map(lambda a: a[i], params["layers"])
        else:
            block_params = params[f"layers_{i}"]
        got, _ = block_apply({"params": block_params}, h, temb, enc, mask, rope)
        with torch.no_grad():
            want = layer(torch.from_numpy(h), torch.ones(h.shape[:2], dtype=torch.int32), freqs, torch.from_numpy(enc),
                         torch.from_numpy(mask).bool(), temb=torch.from_numpy(temb), cross_attention_kwargs={})
        assert_close(got, want.numpy(), what=f"{case['name']} block {i}")


def test_rope_table_matches_diffusers():
    for head_dim, hgt, wid in ((64, 8, 8), (24, 6, 5), (16, 3, 7)):
        cos, sin = dit_lib.rope_table(hgt, wid, head_dim)
        want = get_2d_rotary_pos_embed_lumina(head_dim, 384, 384)[:hgt, :wid].flatten(0, 1)
        np.testing.assert_allclose(cos, want.real.numpy(), atol=2e-6)
        np.testing.assert_allclose(sin, want.imag.numpy(), atol=2e-6)


def test_config_defaults_and_validation():
    cfg = models.config_from_hf("dit", dict(architectures=["NextDiTCrossAttn"], _gradient_checkpointing=True))
    assert (cfg.input_size, cfg.patch_size, cfg.in_channels, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (
        8, 1, 1792, 1792, 24, 28, 28)
    assert cfg.head_dim == 64 and cfg.temb_dim == 1024 and cfg.ffn_dim == 4864  # §1.5
    assert cfg.latent_embedding_size == 3584 and cfg.qk_norm and cfg.norm_eps == 1e-5
    shapes = convert.expected_shapes("dit", cfg)
    total = sum(int(np.prod(s)) for s in shapes.values())
    assert abs(total - 1.365e9) < 0.01e9, total  # §5.1: 8B release DiT 1.365B
    for bad in (dict(learn_sigma=True), dict(dim=60, n_heads=4), dict(n_heads=28, n_kv_heads=3),
                dict(input_size=7, patch_size=2)):
        with pytest.raises(ValueError):
            dit_lib.DiTConfig(**bad)


# -------------------------------------------------------------------------------------------------------------
# conversion


def test_convert_round_trip_and_prefixes(case):
    cfg, params = case["cfg"], case["params"]
    sd = case["ref"].original_state_dict()
    back = convert.to_torch("dit", params, cfg)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].shape == sd[k].shape and np.array_equal(back[k], sd[k]), k
    again = convert.from_torch("dit", back, cfg)
    flat_a, flat_b = flax.traverse_util.flatten_dict(params), flax.traverse_util.flatten_dict(again)
    assert flat_a.keys() == flat_b.keys()
    assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)
    # a whole BLIP3o checkpoint: the DiT under model.dit.model., other components alongside, pad_token tolerated
    full = {f"model.dit.model.{k}": v for k, v in sd.items()}
    full["model.dit.model.pad_token"] = np.zeros((cfg.dim,), np.float32)
    full["model.latent_queries"] = np.zeros((1, 4, 8), np.float32)
    full["lm_head.weight"] = np.zeros((3, 8), np.float32)
    from_full = flax.traverse_util.flatten_dict(convert.from_torch("dit", full, cfg))
    assert all(np.array_equal(flat_a[k], from_full[k]) for k in flat_a)
    from_dit = flax.traverse_util.flatten_dict(convert.from_torch("dit", {f"dit.model.{k}": v for k, v in sd.items()}, cfg))
    assert all(np.array_equal(flat_a[k], from_dit[k]) for k in flat_a)


def test_convert_is_strict():
    hf, _, _ = CONFIGS["gqa_p1"]
    cfg = models.config_from_hf("dit", hf)
    sd = make_reference(cfg).original_state_dict()
    missing = dict(sd)
    del missing["layers.1.attn2.to_out.0.weight"]
    with pytest.raises(ConversionError, match=r"missing key 'layers\.1\.attn2\.to_out\.0\.weight'"):
        convert.from_torch("dit", missing, cfg)
    unknown = dict(sd, **{"layers.0.attn1.to_out.0.weight": np.zeros((64, 64), np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected key 'layers\.0\.attn1\.to_out\.0\.weight'"):
        convert.from_torch("dit", unknown, cfg)
    extra_layer = dict(sd, **{k.replace("layers.1.", "layers.2."): v for k, v in sd.items() if k.startswith("layers.1.")})
    with pytest.raises(ConversionError, match=r"layers\.2\..*only 2 layers"):
        convert.from_torch("dit", extra_layer, cfg)
    wrong = dict(sd, **{"caption_projection.linear_1.weight": np.zeros((64, 40), np.float32)})
    with pytest.raises(ConversionError, match=r"caption_projection\.linear_1\.weight.*\(64, 40\).*\(64, 48\)"):
        convert.from_torch("dit", wrong, cfg)
    # a checkpoint for another width is refused with the key named
    other = models.config_from_hf("dit", dict(hf, latent_embedding_size=32))
    with pytest.raises(ConversionError, match="caption_projection.linear_1.weight"):
        convert.from_torch("dit", sd, other)


def test_bf16_policy_runs_close_to_fp32():
    hf, n_cond, partial = CONFIGS["gqa_p1"]
    cfg32 = models.config_from_hf("dit", hf)
    cfg = dataclasses.replace(cfg32, dtype="bfloat16", param_dtype="bfloat16")
    sd = make_reference(cfg32).original_state_dict()
    params = convert.from_torch("dit", sd, cfg)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    x, t, cond, mask = make_inputs(cfg32, n_cond, partial)
    got = jax.jit(models.build("dit", cfg).apply)({"params": params}, x, t, cond, mask)
    want = jax.jit(models.build("dit", cfg32).apply)({"params": convert.from_torch("dit", sd, cfg32)}, x, t, cond, mask)
    assert got.dtype == jnp.float32
    rel = np.max(np.abs(np.asarray(got) - np.asarray(want))) / np.max(np.abs(np.asarray(want)))
    assert rel < 0.1, rel


# -------------------------------------------------------------------------------------------------------------
# sharding


def test_sharded_equals_unsharded_with_annotated_params():
    hf, n_cond, _ = CONFIGS["gqa_p1"]
    cfg = models.config_from_hf("dit", hf)
    module = models.build("dit", cfg)
    x, t, cond, mask = make_inputs(cfg, n_cond, True, batch=8, seed=3)
    boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), x, t, cond)["params"]
    params = dit_lib.init_params(cfg, jax.random.PRNGKey(0))
    rs = np.random.RandomState(1)  # perturbed on the host (jax.random compiles a sampler per shape)
    params = jax.tree.map(lambda p: jnp.asarray(np.asarray(p) + 0.05 * rs.standard_normal(p.shape), p.dtype), params)

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = sharding.params_shardings(boxed, mesh)
    expect = {
        ("layers", "attn1", "to_q", "kernel"): P(None, "fsdp", "tensor"),
        ("layers", "attn1", "to_k", "kernel"): P(None, "fsdp", "tensor"),
        ("layers", "attn2", "to_out", "kernel"): P(None, "tensor", "fsdp"),
        ("layers", "feed_forward", "linear_1", "kernel"): P(None, "fsdp", "tensor"),
        ("layers", "feed_forward", "linear_2", "kernel"): P(None, "tensor", "fsdp"),
        ("layers", "attn1", "norm_q", "scale"): P(None, "tensor"),
        ("layers", "norm1", "linear", "kernel"): P(None, None, "fsdp"),
        ("caption_projection", "linear_1", "kernel"): P(None, "tensor"),
        ("patch_embedder", "proj", "kernel"): P(None, "fsdp"),
    }
    for path, want in expect.items():
        got = spec_tree(shardings, path).spec
        assert tuple(got) + (None,) * (len(want) - len(got)) == tuple(want), (path, got, want)
    sharded = jax.tree.map(jax.device_put, params, shardings)
    for path, want in expect.items():
        assert spec_tree(sharded, path).sharding.spec == spec_tree(shardings, path).spec

    # the sharded side also rematerialises its blocks (same params): remat must not change values either
    remat_module = models.build("dit", dataclasses.replace(cfg, remat=True, remat_policy="dots"))

    def fwd(p, x, t, cond, mask, m=module):
        return m.apply({"params": p}, x, t, cond, mask)

    def loss(p, x, t, cond, mask, m=module):
        return jnp.mean(jnp.square(fwd(p, x, t, cond, mask, m)))

    want_out = jax.jit(fwd)(params, x, t, cond, mask)
    want_grad = jax.jit(jax.grad(loss))(params, x, t, cond, mask)
    batch = sharding.batch_sharding(mesh, 4)
    with jax.set_mesh(mesh), sharding.axis_rules():
        xs = jax.device_put(x, batch)
        got_out = jax.jit(fwd, out_shardings=batch)(sharded, xs, t, cond, mask)
        got_grad = jax.jit(functools.partial(jax.grad(loss), m=remat_module), out_shardings=shardings)(
            sharded, xs, t, cond, mask)
    assert got_out.sharding.spec[0] == ("data", "fsdp")
    assert_close(got_out, want_out, rel=1e-5, what="sharded forward")
    flat_w, flat_g = flax.traverse_util.flatten_dict(want_grad), flax.traverse_util.flatten_dict(got_grad)
    global_scale = max(float(np.max(np.abs(g))) for g in flat_w.values())
    for k in flat_w:
        # q/k-norm biases of the keys have an analytically zero gradient (softmax shift invariance): measure
        # every leaf against the largest gradient too, so rounding noise there does not count as a difference
        err = np.max(np.abs(np.asarray(flat_g[k]) - np.asarray(flat_w[k])))
        assert err <= 1e-4 * np.max(np.abs(flat_w[k])) + 1e-6 * global_scale, ("/".join(k), err)


def spec_tree(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def test_vae_fm_config_shapes():
    # vae_fm = the same DiT over a VAE latent: 16 channels, 16x16 grid, patch 2 (64 tokens)
    cfg = models.config_from_hf("dit", dict(input_size=16, patch_size=2, in_channels=16, dim=32, n_layers=1, n_heads=2,
                                            n_kv_heads=2, multiple_of=16, latent_embedding_size=24))
    module = models.build("dit", cfg)
    params = dit_lib.init_params(cfg, jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 16))
    cond = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 24))
    out = jax.jit(module.apply)({"params": params}, x, jnp.array([10, 900]), cond)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    assert cfg.num_tokens == 64
    with pytest.raises(ValueError, match="expected"):
        module.apply({"params": params}, x[..., :8], jnp.array([1, 2]), jnp.zeros((2, 7, 24)))
