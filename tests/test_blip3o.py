"""BLIP3-o model + loss against a PyTorch re-computation composed the way the original composes it.

Reference (§2.3, §1.5, §1.6): transformers' Qwen3 (frozen) with the latent queries written into the query slots of
the input embeddings, final-norm hidden states at the slots -> diffusers PixArtAlphaTextProjection +
LuminaNextDiT2DModel -> flow-matching MSE against ε − x0, averaged over the text-to-image rows. The torch side gets
the same noise, σ, timesteps and condition-drop draws (from `flow_matching.draw` with the step's key).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers.models.embeddings import PixArtAlphaTextProjection, get_2d_rotary_pos_embed_lumina
from diffusers.models.transformers.lumina_nextdit2d import LuminaNextDiT2DModel

from blip3o_jax import convert
from blip3o_jax import sharding as shd
from blip3o_jax.diffusion import flow_matching
from blip3o_jax.models import blip3o as blip3o_lib
from blip3o_jax.models import qwen as qwen_lib
from blip3o_jax.training import model_setup as ms_lib
from blip3o_jax.training import optimizer as opt_lib
from blip3o_jax.training import step as step_lib
from conftest import TINY_B, TINY_L, TINY_NQ, t2i_batch, tiny_config  # noqa: E402  (tests/ is on sys.path)

torch.set_num_threads(2)

B, L, NQ = TINY_B, TINY_L, TINY_NQ


class TorchBlip3o(torch.nn.Module):
    """The original's T2I training forward (blip3oQwenForCausalLM + NextDiTCrossAttn), from transformers/diffusers."""

    def __init__(self, mcfg: blip3o_lib.Blip3oConfig):
        super().__init__()
        hf = qwen_lib.config_to_hf("qwen3", mcfg.backbone)
        self.lm = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**hf))
        self.latent_queries = torch.nn.Parameter(torch.randn(1, mcfg.n_query, mcfg.backbone.hidden_size))
        d = mcfg.dit
        self.caption_projection = PixArtAlphaTextProjection(d.latent_embedding_size, d.dim)
        self.dit = LuminaNextDiT2DModel(
            sample_size=d.input_size, patch_size=d.patch_size, in_channels=d.in_channels, hidden_size=d.dim,
            num_layers=d.n_layers, num_attention_heads=d.n_heads, num_kv_heads=d.n_kv_heads,
            multiple_of=d.multiple_of, ffn_dim_multiplier=d.ffn_dim_multiplier, norm_eps=d.norm_eps,
            learn_sigma=False, qk_norm=d.qk_norm, cross_attention_dim=d.dim)
        self.freqs_cis = get_2d_rotary_pos_embed_lumina(d.dim // d.n_heads, 384, 384)
        with torch.no_grad():  # move every parameter off its init (zero gates would hide the cross-attention)
            for name, p in self.named_parameters():
                if name.endswith("gate"):
                    p.copy_(torch.randn_like(p))
                elif p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
                elif "lm." in name:
                    p.normal_(0.0, 0.1)
        for p in self.lm.parameters():
            p.requires_grad_(False)  # freeze_backbone: activation gradients still flow to the queries

    def loss(self, batch, targets, draws):
        ids = torch.tensor(np.asarray(batch["input_ids"])).long()
        mask = torch.tensor(np.asarray(batch["attention_mask"])).long()
        pos = torch.tensor(np.asarray(batch["positions"])).long()
        qidx = np.asarray(batch["query_index"])
        gen = (np.asarray(batch["task"]) == 0) & (np.asarray(batch["sample_valid"]) > 0)
        embeds = self.lm.model.embed_tokens(ids)
        rows = []
        for b in range(ids.shape[0]):  # the original's `inputs_embeds[gen_slots] = latent_queries`
            e = embeds[b]
            if gen[b]:
                e = torch.cat([e[: qidx[b, 0]], self.latent_queries[0], e[qidx[b, -1] + 1:]], 0)
            rows.append(e)
        hidden = self.lm.model(inputs_embeds=torch.stack(rows), attention_mask=mask, position_ids=pos).last_hidden_state
        cond = torch.stack([hidden[b, qidx[b]] for b in range(ids.shape[0])])  # states at the slots, no shift
        cond = cond * torch.tensor(np.asarray(draws["cond_keep"]))[:, None, None]
        x0 = torch.tensor(np.asarray(targets)).permute(0, 3, 1, 2)
        noise = torch.tensor(np.asarray(draws["noise"])).permute(0, 3, 1, 2)
        sigma = torch.tensor(np.asarray(draws["sigma"]))[:, None, None, None]
        x_t = (1 - sigma) * x0 + sigma * noise
        enc = self.caption_projection(cond)
        v = self.dit(x_t, torch.tensor(np.asarray(draws["timestep"])), enc,
                     torch.ones(cond.shape[:2], dtype=torch.long), self.freqs_cis, cross_attention_kwargs={}).sample
        per_sample = ((v - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
        w = torch.from_numpy(gen.astype(np.float32))
        return (per_sample * w).sum() / w.sum()

    def our_params(self, mcfg):
        sd = {k: v.detach().numpy().copy() for k, v in self.lm.state_dict().items()}
        dit_sd = {f"caption_projection.{k}": v.detach().numpy().copy()
                  for k, v in self.caption_projection.state_dict().items()}
        dit_sd.update({k: v.detach().numpy().copy() for k, v in self.dit.state_dict().items() if k != "pad_token"})
        return {"backbone": convert.from_torch("qwen3", sd, mcfg.backbone),
                "dit": convert.from_torch("dit", dit_sd, mcfg.dit),
                "latent_queries": self.latent_queries.detach().numpy().copy()}


def make_batch(rs, mcfg, lengths=(14, 11, 9, 12), tasks=(0, 0, 2, 0)):
    ids = np.zeros((B, L), np.int32)
    mask = np.zeros((B, L), np.int32)
    pos = np.zeros((B, L), np.int32)
    qidx = np.zeros((B, NQ), np.int32)
    for b, n in enumerate(lengths):
        ids[b, :n] = rs.randint(3, mcfg.backbone.vocab_size, n)
        mask[b, :n] = 1
        pos[b, :n] = np.arange(n)
        if tasks[b] == 0:
            qidx[b] = n - NQ + np.arange(NQ)
    return {"input_ids": ids, "attention_mask": mask, "positions": pos, "query_index": qidx,
            "task": np.asarray(tasks, np.int32), "sample_valid": np.ones((B,), np.int32)}


@pytest.fixture(scope="module")
def case():
    config = tiny_config()
    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    setup = step_lib.make_train_step(config, mesh)
    torch.manual_seed(0)
    ref = TorchBlip3o(setup.model_cfg)
    params = jax.tree.map(jnp.asarray, ref.our_params(setup.model_cfg))
    rs = np.random.RandomState(0)
    batch = make_batch(rs, setup.model_cfg)
    targets = rs.randn(B, 4, 4, 8).astype(np.float32) * 2.0
    rng = jax.random.key(7)
    return dict(config=config, setup=setup, ref=ref, params=params, batch=batch, targets=targets, rng=rng)


def _loss(setup, params, batch, targets, rng):
    aux = setup.loss_fn(params, batch, targets, rng)
    return aux["gen_loss_sum"] / jnp.maximum(aux["gen_count"], 1.0), aux


def test_param_groups_and_shapes(case):
    setup = case["setup"]
    assert setup.trainable_names == ("dit", "latent_queries")
    assert set(setup.abstract_frozen) == {"backbone"}
    assert setup.abstract_state.params["latent_queries"].shape == (1, NQ, 64)
    # same tree as the converted torch weights
    ours = jax.tree.map(lambda x: x.shape, case["params"])
    want = jax.tree.map(lambda x: x.shape, {**setup.abstract_frozen, **setup.abstract_state.params})
    assert ours == want


@pytest.fixture(scope="module")
def loss_and_grads(case):
    """The loss and its gradients w.r.t. the trainable groups (dit, latent_queries): one compile for two tests."""
    setup, params = case["setup"], case["params"]
    batch, targets, rng = case["batch"], case["targets"], case["rng"]
    trainable, frozen = opt_lib.split_params(params, True)

    def loss_of_trainable(tr):
        return _loss(setup, opt_lib.merge_params(tr, frozen), batch, targets, rng)[0]

    return jax.jit(jax.value_and_grad(loss_of_trainable))(trainable)


def test_loss_and_query_gradients_match_torch(case, loss_and_grads):
    ref = case["ref"]
    batch, targets, rng = case["batch"], case["targets"], case["rng"]
    loss, grads = loss_and_grads
    draws = flow_matching.draw(rng, targets.shape, B, flow_matching.FlowMatchingConfig(cond_drop_prob=0.25))
    ref.zero_grad()
    want = ref.loss(batch, targets, draws)
    want.backward()
    np.testing.assert_allclose(float(loss), float(want.detach()), rtol=1e-5)
    g_ours = np.asarray(grads["latent_queries"])
    g_ref = ref.latent_queries.grad.numpy()
    assert np.max(np.abs(g_ref)) > 0  # gradients reach the queries through the frozen backbone
    assert np.max(np.abs(g_ours - g_ref)) <= 1e-4 * np.max(np.abs(g_ref))
    # and a DiT weight (caption projection: everything downstream of the queries)
    g_cap = np.asarray(grads["dit"]["caption_projection"]["linear_1"]["kernel"])
    g_cap_ref = ref.caption_projection.linear_1.weight.grad.numpy().T
    assert np.max(np.abs(g_cap - g_cap_ref)) <= 1e-4 * np.max(np.abs(g_cap_ref))


@pytest.fixture(scope="module")
def loss_of(case):
    """(params, batch) -> (loss, aux) of the case's targets and rng, jitted: one compile for the tests below."""
    setup, targets, rng = case["setup"], case["targets"], case["rng"]
    return jax.jit(lambda params, batch: _loss(setup, params, batch, targets, rng))


def test_query_gradient_matches_finite_differences(case, loss_and_grads, loss_of):
    """Directional derivative of the loss along a random direction of the queries, by central differences."""
    params, batch = case["params"], case["batch"]
    direction = np.random.RandomState(3).randn(*params["latent_queries"].shape).astype(np.float32)

    def along(eps):
        return loss_of({**params, "latent_queries": params["latent_queries"] + eps * direction}, batch)[0]

    grad = loss_and_grads[1]["latent_queries"]  # d loss / d queries, the backbone frozen: as the train step takes it
    analytic = float(jnp.sum(grad * direction))
    eps = 1e-2
    numeric = (float(along(eps)) - float(along(-eps))) / (2 * eps)
    assert abs(analytic - numeric) <= 2e-2 * abs(analytic) + 1e-5, (analytic, numeric)


def test_rows_without_generation_keep_their_tokens(case):
    setup, params, batch = case["setup"], case["params"], case["batch"]
    model = setup.model
    is_gen = jnp.asarray(batch["task"] == 0)
    embeds = model.apply({"params": params}, jnp.asarray(batch["input_ids"]), method=lambda m, i: m.backbone.embed(i))
    scattered = blip3o_lib.scatter_queries(embeds, jnp.ones((B, NQ, 64)), jnp.asarray(batch["query_index"]), is_gen)
    np.testing.assert_array_equal(np.asarray(scattered[2]), np.asarray(embeds[2]))  # text row untouched
    np.testing.assert_array_equal(np.asarray(scattered[0, -NQ:]), 1.0)
    np.testing.assert_array_equal(np.asarray(scattered[0, :-NQ]), np.asarray(embeds[0, :-NQ]))


def test_batch_without_any_image_gives_zero_generation_loss(case, loss_of):
    """The original crashes on batches without images (§7 item 5); here they are just rows with zero weight."""
    batch = dict(case["batch"], task=np.full((B,), 2, np.int32))
    loss, aux = loss_of(case["params"], batch)
    assert float(loss) == 0.0 and float(aux["gen_count"]) == 0.0


def test_clip_mse_variant_regresses_the_grid():
    config = tiny_config(loss="clip_mse", n_query=16)
    config.data.n_query = 16
    config.data.seq_buckets = (24,)
    mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
    setup = step_lib.make_train_step(config, mesh)
    assert setup.trainable_names == ("latent_queries", "mse_head")
    state, frozen = setup.init(jax.random.key(0))
    batch = t2i_batch(np.random.RandomState(1), B)
    params = opt_lib.merge_params(state.params, frozen)
    aux = jax.jit(setup.loss_fn)(params, batch, batch["targets"], jax.random.key(0))
    @jax.jit  # eager, op by op, costs more than the compile
    def predict(params):
        cond, _ = setup.model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                    batch["positions"], batch["query_index"], jnp.ones((B,), bool),
                                    method=blip3o_lib.Blip3o.encode)
        return setup.model.apply({"params": params}, cond, method=blip3o_lib.Blip3o.mse_prediction)

    pred = predict(params)
    want = np.mean((np.asarray(pred) - batch["targets"]) ** 2)
    np.testing.assert_allclose(float(aux["gen_loss_sum"] / aux["gen_count"]), want, rtol=1e-5)


def test_whole_checkpoint_conversion_round_trip(case):
    from blip3o_jax.convert.common import ConversionError

    mcfg, params = case["setup"].model_cfg, case["params"]
    sd = convert.to_torch("blip3o", params, mcfg)
    assert "model.latent_queries" in sd and any(k.startswith("model.dit.model.layers.") for k in sd)
    sd["visual.blocks.0.attn.qkv.weight"] = np.zeros((3, 3), np.float32)  # the Qwen ViT is skipped, not an error
    back = convert.from_torch("blip3o", sd, mcfg)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
    sd["model.dit.model.unknown.weight"] = np.zeros((2,), np.float32)
    with pytest.raises(ConversionError, match="unknown"):
        convert.from_torch("blip3o", sd, mcfg)


def test_config_from_a_released_checkpoint_config():
    """A released BLIP3o-8B config.json is a Qwen2.5-VL config plus BLIP3-o fields (reference §8)."""
    hf = {"model_type": "blip3o_qwen", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
          "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 151668, "rms_norm_eps": 1e-6,
          "rope_theta": 1e6, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
          "tie_word_embeddings": False, "n_query": 64, "vision_config": {}}
    cfg = blip3o_lib.config_from_hf("blip3o", hf)
    assert cfg.backbone_kind == "qwen2_5_vl_text" and cfg.backbone.hidden_size == 3584
    assert cfg.dit.latent_embedding_size == 3584 and cfg.dit.dim == 1792 and cfg.dit.n_layers == 24
    assert cfg.n_query == 64 and cfg.target_shape == (8, 8, 1792)


def test_understanding_tower_matches_the_full_qwen2_5_vl():
    """Image-to-text rows: our Qwen2.5-VL ViT tokens in the <|image_pad|> slots at 3-D M-RoPE positions give the
    logits of models/qwen2_5_vl.py (the understanding model, itself checked against transformers)."""
    from blip3o_jax.models import qwen2_5_vl as qvl

    vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                  fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    text = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    image_pad, vstart, vend = 90, 91, 92
    config = tiny_config(backbone_kind="qwen2_5_vl_text", backbone=text, und_tower_kind="qwen2_5_vl_vision",
                         und_tower=vision, und_image_size=56)
    mcfg = ms_lib.model_config(config)
    model = blip3o_lib.build("blip3o", mcfg)
    ref_cfg = qvl.Qwen2_5_VLConfig(text=mcfg.backbone, vision=mcfg.und_tower, image_token_id=image_pad,
                                   vision_start_token_id=vstart, vision_end_token_id=vend)
    ref = qvl.build("qwen2_5_vl", ref_cfg)
    rs = np.random.RandomState(4)
    n_img = 4  # 56 px -> 4x4 patches -> 2x2 merged tokens
    rows = [list(rs.randint(3, 80, 3)) + [vstart] + [image_pad] * n_img + [vend] + list(rs.randint(3, 80, 5)),
            list(rs.randint(3, 80, 2)) + [vstart] + [image_pad] * n_img + [vend] + list(rs.randint(3, 80, 3))]
    Lx = max(len(r) for r in rows)
    ids = np.zeros((2, Lx), np.int32)
    mask = np.zeros((2, Lx), np.int32)
    for b, r in enumerate(rows):
        ids[b, :len(r)], mask[b, :len(r)] = r, 1
    patches = rs.randn(2, 16, mcfg.und_tower.patch_dim).astype(np.float32)
    prep = qvl.prepare_inputs(ref_cfg, ids, mask, np.tile([[1, 4, 4]], (2, 1)))
    ref_params = qvl.init_args(ref_cfg)
    ref_params = nn_unbox(jax.jit(ref.init)(jax.random.key(1), *ref_params)["params"])  # eager init: ~3x slower
    ours = {"backbone": ref_params["language_model"], "visual": ref_params["visual"],
            "latent_queries": np.zeros((1, NQ, 64), np.float32)}
    # both sides jitted (eager, op by op, costs more than the two compiles)
    want = jax.jit(lambda: ref.apply({"params": ref_params}, ids, mask, prep["positions"], patches.reshape(32, -1),
                                     prep["vision_layout"], prep["image_index"]))()
    und_index = np.stack([np.flatnonzero(r == image_pad) for r in ids]).astype(np.int32)
    _, got = jax.jit(lambda: model.apply({"params": ours}, ids, mask, jnp.asarray(prep["positions"]), None, None,
                                         compute_logits=True, und_inputs=patches, und_index=und_index,
                                         has_und=jnp.ones((2,), bool), method=blip3o_lib.Blip3o.encode))()
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], rtol=1e-4,
                               atol=1e-4 * float(np.max(np.abs(want))))


def nn_unbox(tree):
    return ms_lib.plain_unbox(tree)
