"""Full Qwen2.5-VL: M-RoPE positions, logits with images in the prompt and greedy image-to-text generation vs
transformers' Qwen2_5_VLForConditionalGeneration; checkpoint conversion; sharded == unsharded."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from blip3o_jax import convert, generation, models, pretrained, sharding
from blip3o_jax.convert.common import ConversionError, load_state_dict
from blip3o_jax.models import qwen
from blip3o_jax.models import qwen2_5_vl as qvl
from blip3o_jax.models import qwen2_5_vl_vision as qv

VOCAB = 300
VISION_START, VISION_END, IMAGE, VIDEO = 288, 289, 290, 291
TEXT = dict(vocab_size=VOCAB, eos_token_id=5, bos_token_id=0, pad_token_id=0)
# two tiny models: untied head with small patches / 2x2-unit windows; tied head (as the 3B) with the real
# 14 px patches, 112 px windows and GQA 4:1
HF_CONFIGS = {
    "untied_p4": dict(
        vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                           fullatt_block_indexes=[1], window_size=16, patch_size=4),
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, **TEXT),
    ),
    "tied_p14": dict(
        vision_config=dict(depth=3, hidden_size=48, num_heads=4, intermediate_size=64, out_hidden_size=96,
                           fullatt_block_indexes=[0, 2], window_size=112, patch_size=14),
        text_config=dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                         intermediate_size=128, rope_scaling={"type": "mrope", "mrope_section": [4, 4, 4]},
                         tie_word_embeddings=True, **TEXT),
        tie_word_embeddings=True,
    ),
}
GRIDS = [[1, 6, 10], [1, 8, 8]]  # 15 and 16 merged tokens; 6x10 patches leave partial windows


def tt(a):
    return torch.from_numpy(np.asarray(a))


class Model:
    def __init__(self, name):
        torch.manual_seed(len(name))
        self.hf_config = Qwen2_5_VLConfig(**HF_CONFIGS[name], image_token_id=IMAGE, video_token_id=VIDEO,
                                          vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
        self.torch_model = Qwen2_5_VLForConditionalGeneration(self.hf_config).eval()
        with torch.no_grad():  # a scale that makes greedy decoding wander (0.02 init gives constant tokens)
            for name_, p in self.torch_model.named_parameters():
                p.normal_(0.0, 0.3 if "visual" in name_ else 0.4)
        self.cfg = models.config_from_hf("qwen2_5_vl", self.hf_config.to_dict())
        self.state_dict = {k: v.numpy() for k, v in self.torch_model.state_dict().items()}  # 5.x in-memory names
        self.params = jax.tree.map(jnp.asarray, convert.from_torch("qwen2_5_vl", self.state_dict, self.cfg))
        self.module = models.build("qwen2_5_vl", self.cfg)

    def reference_logits(self, ids, mask, pixels, grid):
        with torch.no_grad():
            return self.torch_model(
                input_ids=tt(ids), attention_mask=tt(mask), pixel_values=tt(pixels), image_grid_thw=tt(grid),
                mm_token_type_ids=tt((ids == IMAGE).astype(np.int64)),
            ).logits.numpy().astype(np.float64)


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def model(request):
    return Model(request.param)


def image_prompt(rs, images, pre, post):
    ids = list(rs.randint(1, 280, pre))
    for n in images:
        ids += [VISION_START] + [IMAGE] * n + [VISION_END] + list(rs.randint(1, 280, 2))
    return ids + list(rs.randint(1, 280, post))


def left_pad(prompts):
    L = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), L), np.int64)
    mask = np.zeros((len(prompts), L), np.int64)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = p
        mask[b, L - len(p):] = 1
    return ids, mask


def batch(cfg, seed=0):
    """Two left-padded rows: one image each (6x10 and 8x8 patch grids); random pixels."""
    rs = np.random.RandomState(seed)
    ids, mask = left_pad([image_prompt(rs, [15], 3, 5), image_prompt(rs, [16], 6, 7)])
    pixels = rs.randn(qv.num_patches(GRIDS), cfg.vision.patch_dim).astype(np.float32)
    return ids, mask, pixels


def rel_err(out, ref, where):
    return float(np.abs(np.asarray(out, np.float64)[where] - ref[where]).max() / np.abs(ref[where]).max())


def test_rope_index_matches_transformers(model):
    rs = np.random.RandomState(1)
    grids = [[1, 6, 10], [1, 8, 8], [1, 4, 12], [1, 10, 6]]
    prompts = [
        image_prompt(rs, [15, 16], 2, 3),  # two images in one row
        [IMAGE] * 12 + [VISION_END] + list(rs.randint(1, 280, 4)),  # image first
        list(rs.randint(1, 280, 9)),  # text only
        image_prompt(rs, [15], 0, 1),
    ]
    ids, mask = left_pad(prompts)
    ours, deltas = qvl.rope_index(ids, mask, grids, model.cfg)
    ref, ref_deltas = model.torch_model.model.get_rope_index(
        tt(ids), mm_token_type_ids=tt((ids == IMAGE).astype(np.int64)), image_grid_thw=tt(grids),
        attention_mask=tt(mask))
    np.testing.assert_array_equal(ours, ref.numpy())
    np.testing.assert_array_equal(deltas, ref_deltas.numpy().reshape(-1))


def test_logits_match_transformers(model):
    ids, mask, pixels = batch(model.cfg)
    ref = model.reference_logits(ids, mask, pixels, GRIDS)
    out = generation.qwen2_5_vl_logits(model.module, model.params, ids, mask, pixels, GRIDS)
    real = mask.astype(bool)  # padded rows are garbage on both sides
    assert rel_err(out, ref, real) <= 1e-4


def test_logits_two_images_in_one_row_and_bucket(model):
    rs = np.random.RandomState(2)
    ids, mask = left_pad([image_prompt(rs, [15, 16], 4, 3)])
    pixels = rs.randn(qv.num_patches(GRIDS), model.cfg.vision.patch_dim).astype(np.float32)
    ref = model.reference_logits(ids, mask, pixels, GRIDS)
    real = mask.astype(bool)
    out = generation.qwen2_5_vl_logits(model.module, model.params, ids, mask, pixels, GRIDS)
    assert rel_err(out, ref, real) <= 1e-4
    padded = generation.qwen2_5_vl_logits(model.module, model.params, ids, mask, pixels, GRIDS, num_tokens=160,
                                          num_windows=48)
    assert rel_err(padded, ref, real) <= 1e-4


def test_greedy_generation_matches_transformers(model):
    ids, mask, pixels = batch(model.cfg, seed=3)
    L = ids.shape[1]
    kw = dict(input_ids=tt(ids), attention_mask=tt(mask), pixel_values=tt(pixels), image_grid_thw=tt(GRIDS),
              mm_token_type_ids=tt((ids == IMAGE).astype(np.int64)), max_new_tokens=16, do_sample=False,
              pad_token_id=0)
    with torch.no_grad():
        free = model.torch_model.generate(**kw, eos_token_id=None)[:, L:].numpy()
        eos = int(free[0, 6])  # a token row 0 emits: that row stops early and is padded
        ref = model.torch_model.generate(**kw, eos_token_id=eos)[:, L:].numpy()
    ref = np.pad(ref, ((0, 0), (0, 16 - ref.shape[1])))  # transformers stops when every row is done
    ours = np.asarray(generation.qwen2_5_vl_generate(model.module, model.params, ids, mask, pixels, GRIDS,
                                                     max_new_tokens=16, eos_token_id=eos, pad_token_id=0))
    np.testing.assert_array_equal(ours, ref)
    assert len(set(free.reshape(-1).tolist())) > 4  # the reference decodes something non-trivial

    # the test can fail: decoding at 1-D positions without the M-RoPE delta changes the answer
    inputs = qvl.prepare_inputs(model.cfg, ids, mask, GRIDS)
    embeds = generation.qwen2_5_vl_embeddings(model.module, model.params, ids, pixels, inputs)
    no_delta = generation.generate(qwen.build("qwen2_5_vl_text", model.cfg.text), model.params["language_model"],
                                   None, mask, max_new_tokens=16, eos_token_id=None, pad_token_id=0,
                                   inputs_embeds=embeds, positions=inputs["positions"])
    assert not np.array_equal(np.asarray(no_delta), free)


@pytest.mark.parametrize("model", ["tied_p14"], indirect=True)
def test_text_only_generation_matches_transformers(model):
    rs = np.random.RandomState(5)
    ids, mask = left_pad([list(rs.randint(1, 280, 7)), list(rs.randint(1, 280, 11))])
    with torch.no_grad():
        ref = model.torch_model.generate(input_ids=tt(ids), attention_mask=tt(mask), max_new_tokens=8,
                                         do_sample=False, pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:]
    ours = generation.qwen2_5_vl_generate(model.module, model.params, ids, mask, max_new_tokens=8, eos_token_id=None,
                                          pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(ours), ref.numpy())


def test_input_errors(model):
    ids, mask, pixels = batch(model.cfg)
    with pytest.raises(ValueError, match="does not match grid_thw"):
        qvl.prepare_inputs(model.cfg, ids, mask, [[1, 6, 10], [1, 8, 12]])
    with pytest.raises(ValueError, match="grid_thw lists 3 images"):
        qvl.prepare_inputs(model.cfg, ids, mask, GRIDS + [[1, 4, 4]])
    with pytest.raises(ValueError, match="image features and image tokens do not match"):
        qvl.image_slot_index(ids, model.cfg, 30)
    with pytest.raises(ValueError, match="video"):
        qvl.prepare_inputs(model.cfg, np.where(ids == IMAGE, VIDEO, ids), mask, None)
    with pytest.raises(ValueError, match="left-padded"):  # row 0 is shorter: reversed, its padding is on the right
        generation.qwen2_5_vl_generate(model.module, model.params, ids, mask[:, ::-1], pixels, GRIDS,
                                       max_new_tokens=2, eos_token_id=None, pad_token_id=0)


def test_config_from_flat_released_layout():
    """The released config.json (transformers 4.x) keeps text fields at the top level (reference §1.1)."""
    flat = {"model_type": "qwen2_5_vl", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
            "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "tie_word_embeddings": True, "max_position_embeddings": 128000, "hidden_act": "silu",
            "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653, "use_sliding_window": False,
            "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                              "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                              "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                              "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                              "temporal_patch_size": 2}}
    cfg = models.config_from_hf("qwen2_5_vl", flat)
    assert (cfg.text.hidden_size, cfg.text.mrope_section, cfg.text.tie_word_embeddings) == (2048, (16, 24, 24), True)
    assert (cfg.vision.out_hidden_size, cfg.vision.depth, cfg.image_token_id) == (2048, 32, 151655)
    with pytest.raises(ValueError, match="out_hidden_size"):
        models.config_from_hf("qwen2_5_vl", {**flat, "vision_config": {**flat["vision_config"], "out_hidden_size": 8}})


def test_convert_round_trip_on_disk_layout(model, tmp_path):
    model.torch_model.save_pretrained(tmp_path)
    on_disk = load_state_dict(str(tmp_path))
    assert any(k.startswith("visual.") for k in on_disk) and not any(k.startswith("model.visual.") for k in on_disk)
    params = convert.from_torch("qwen2_5_vl", on_disk, model.cfg)
    # the in-memory (model.visual / model.language_model) and on-disk layouts give the same params
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params, model.params)
    assert all(jax.tree.leaves(same))
    back = convert.to_torch("qwen2_5_vl", params, model.cfg)
    assert set(back) == set(on_disk)
    for k, v in on_disk.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


@pytest.mark.parametrize("model", ["tied_p14"], indirect=True)
def test_load_pretrained_and_bf16(model, tmp_path):
    """`pretrained.load_pretrained` reads a transformers directory (config.json model_type `qwen2_5_vl`) and our
    converted output; dtype="bfloat16" gives a bf16 model whose logits stay close to fp32."""
    model.torch_model.save_pretrained(tmp_path / "hf")
    module, params = pretrained.load_pretrained(str(tmp_path / "hf"))
    assert module.cfg == model.cfg
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(a, b), params, model.params)))
    pretrained.convert_checkpoint(str(tmp_path / "hf"), str(tmp_path / "ours"), progress=False)
    module16, params16 = pretrained.load_pretrained(str(tmp_path / "ours"), dtype="bfloat16")
    assert module16.cfg.text.dtype == module16.cfg.vision.param_dtype == "bfloat16"
    assert {a.dtype for a in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    ids, mask, pixels = batch(model.cfg)
    ref = model.reference_logits(ids, mask, pixels, GRIDS)
    out = generation.qwen2_5_vl_logits(module16, params16, ids, mask, pixels, GRIDS)
    # bf16 weights and activations (8-bit mantissa) through 3 vision + 3 text layers of large random weights: measured
    # 4.4e-2 here; the bound only guards against a broken bf16 path (wrong casts give O(1) errors or NaN)
    assert rel_err(out, ref, mask.astype(bool)) <= 1e-1


def test_convert_is_strict(model):
    sd = dict(model.state_dict)
    with pytest.raises(ConversionError, match="model.visual.blocks.0.attn.bogus"):
        convert.from_torch("qwen2_5_vl", dict(sd, **{"model.visual.blocks.0.attn.bogus": np.zeros(1)}), model.cfg)
    missing = {k: v for k, v in sd.items() if k != "model.visual.blocks.1.mlp.up_proj.bias"}
    with pytest.raises(ConversionError, match="missing key 'model.visual.blocks.1.mlp.up_proj.bias'"):
        convert.from_torch("qwen2_5_vl", missing, model.cfg)
    with pytest.raises(ConversionError, match="no vision tower keys"):
        convert.from_torch("qwen2_5_vl", {k: v for k, v in sd.items() if "visual" not in k}, model.cfg)
    with pytest.raises(ConversionError, match="unexpected key"):
        convert.from_torch("qwen2_5_vl", dict(sd, **{"model.language_model.extra.weight": np.zeros(1)}), model.cfg)


@pytest.mark.parametrize("model", ["untied_p4"], indirect=True)  # one config: the sharded compile is the slow part
def test_sharded_equals_unsharded(model):
    ids, mask, pixels = batch(model.cfg, seed=4)
    inputs = qvl.prepare_inputs(model.cfg, ids, mask, GRIDS)
    args = (jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), inputs["positions"], pixels,
            inputs["vision_layout"], inputs["image_index"])
    unsharded = np.asarray(jax.jit(lambda p, *a: model.module.apply({"params": p}, *a))(model.params, *args),
                           np.float64)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract = jax.eval_shape(lambda: model.module.init(jax.random.PRNGKey(0), *qvl.init_args(model.cfg)))["params"]
    shardings = sharding.params_shardings(abstract, mesh)
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(shardings))
    with jax.set_mesh(mesh), sharding.axis_rules():
        params = sharding.shard_params(model.params, shardings)
        out = jax.jit(lambda p, *a: model.module.apply({"params": p}, *a))(params, *args)
    real = mask.astype(bool)
    assert rel_err(out, unsharded, real) <= 1e-5
