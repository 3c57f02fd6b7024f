"""Qwen2.5-VL vision tower: parity with transformers' Qwen2_5_VisionTransformerPretrainedModel, bucketed padding,
weight conversion (round trip, strict keys), sharded == unsharded, bf16 path."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from blip3o_jax import convert, models, sharding
from blip3o_jax.convert.common import ConversionError
from blip3o_jax.models import qwen2_5_vl_vision as qv
from conftest import rel_err  # noqa: E402  (tests/ is on sys.path under pytest)

# Two tiny towers: small patches with 2x2-unit windows, and the real patch/window geometry (14 px, 112 px ->
# 4x4-unit windows) with a full-attention first block.
HF_CONFIGS = {
    "p4_w2": dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=40,
                  fullatt_block_indexes=[1], window_size=16, patch_size=4),
    "p14_w4": dict(depth=2, hidden_size=48, num_heads=4, intermediate_size=64, out_hidden_size=24,
                   fullatt_block_indexes=[0], window_size=112, patch_size=14),
}
# odd grids: 6x10 patches (3x5 merged units: partial windows), several images packed, a 2-frame video entry
GRIDS = {
    "6x10": [[1, 6, 10]],
    "multi": [[1, 6, 10], [1, 4, 4], [2, 8, 6]],
    "18x10": [[1, 18, 10]],
}


class Tower:
    def __init__(self, name):
        torch.manual_seed(len(name))
        self.hf_config = Qwen2_5_VLVisionConfig(**HF_CONFIGS[name])
        self.torch_model = Qwen2_5_VisionTransformerPretrainedModel._from_config(self.hf_config).eval()
        with torch.no_grad():  # random weights of a useful scale (default init is 0.02 normal, biases 0)
            for p in self.torch_model.parameters():
                p.normal_(0.0, 0.3)
        self.cfg = models.config_from_hf("qwen2_5_vl_vision", self.hf_config.to_dict())
        self.state_dict = {"visual." + k: v.numpy() for k, v in self.torch_model.state_dict().items()}
        self.params = jax.tree.map(jnp.asarray, convert.from_torch("qwen2_5_vl_vision", self.state_dict, self.cfg))
        self.module = models.build("qwen2_5_vl_vision", self.cfg)
        self.apply = jax.jit(lambda p, x, lay: self.module.apply({"params": p}, x, lay))

    def reference(self, patches, grid):
        with torch.no_grad():
            out = self.torch_model(torch.from_numpy(patches), grid_thw=torch.tensor(grid))
        return out.pooler_output.numpy().astype(np.float64)


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def tower(request):
    return Tower(request.param)


def random_patches(grid, cfg, seed=0):
    return np.random.RandomState(seed).randn(qv.num_patches(grid), cfg.patch_dim).astype(np.float32)


@pytest.mark.parametrize("grid_name", sorted(GRIDS))
def test_matches_transformers(tower, grid_name):
    grid = GRIDS[grid_name]
    patches = random_patches(grid, tower.cfg)
    ref = tower.reference(patches, grid)
    out = qv.encode(tower.module, tower.params, patches, grid, jit_fn=tower.apply)
    assert out.shape == ref.shape == (qv.num_patches(grid) // 4, tower.cfg.out_hidden_size)
    assert rel_err(out, ref) <= 1e-4


def test_padded_bucket_matches_unpadded(tower):
    """Padding patches and windows to a bucket changes nothing for the real tokens; two grids share one bucket."""
    outs = []
    for grid in (GRIDS["6x10"], [[1, 8, 8]]):
        patches = random_patches(grid, tower.cfg, seed=1)
        exact = np.asarray(qv.encode(tower.module, tower.params, patches, grid, jit_fn=tower.apply))
        padded = np.asarray(qv.encode(tower.module, tower.params, patches, grid, num_tokens=80, num_windows=24,
                                      jit_fn=tower.apply))
        assert padded.shape == exact.shape
        assert rel_err(padded, exact) <= 1e-5
        outs.append(padded)
    with pytest.raises(ValueError, match="num_tokens"):
        qv.vision_layout(GRIDS["6x10"], tower.cfg, num_tokens=58)  # not a multiple of 4
    with pytest.raises(ValueError, match="num_windows"):
        qv.vision_layout(GRIDS["6x10"], tower.cfg, num_windows=1)


def test_layout_matches_transformers_window_index(tower):
    from transformers.vision_utils import get_vision_window_index

    grid = GRIDS["multi"]
    layout = qv.vision_layout(grid, tower.cfg)
    window_index, cu = get_vision_window_index(torch.tensor(grid), tower.cfg.spatial_merge_size,
                                               tower.cfg.window_size, tower.cfg.patch_size)
    unit_order = layout["token_order"][::4] // 4
    np.testing.assert_array_equal(unit_order, window_index.numpy())
    lengths = layout["window_valid"].sum(-1)
    np.testing.assert_array_equal(np.cumsum(lengths), cu.numpy()[1:])


def test_bad_grid_is_rejected(tower):
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        qv.vision_layout([[1, 5, 4]], tower.cfg)
    with pytest.raises(ValueError, match="patches have shape"):
        qv.encode(tower.module, tower.params, np.ones((10, tower.cfg.patch_dim), np.float32), [[1, 4, 4]])


def test_config_from_full_and_legacy_dicts():
    full = Qwen2_5_VLConfig(vision_config=HF_CONFIGS["p14_w4"]).to_dict()
    cfg = models.config_from_hf("qwen2_5_vl_vision", full)
    assert (cfg.depth, cfg.hidden_size, cfg.window_size, cfg.fullatt_block_indexes) == (2, 48, 112, (0,))
    # the config.json of the released Qwen2.5-VL checkpoints (reference §1.2) uses `in_chans`
    legacy = {"depth": 32, "hidden_size": 1280, "hidden_act": "silu", "intermediate_size": 3420, "num_heads": 16,
              "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
              "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
              "tokens_per_second": 2, "temporal_patch_size": 2}
    cfg = models.config_from_hf("qwen2_5_vl_vision", legacy)
    assert (cfg.in_channels, cfg.patch_dim, cfg.head_dim, cfg.window_units) == (3, 1176, 80, 4)
    with pytest.raises(ValueError, match="fullatt_block_indexes"):
        models.config_from_hf("qwen2_5_vl_vision", dict(legacy, fullatt_block_indexes=[40]))


def test_convert_round_trip_and_prefixes(tower):
    back = convert.to_torch("qwen2_5_vl_vision", tower.params, tower.cfg)
    assert set(back) == set(tower.state_dict)
    for k, v in tower.state_dict.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    # transformers 5.x module names (`model.visual.`) and a bare tower state dict load to the same params
    for prefix in ("model.visual.", ""):
        sd = {prefix + k[len("visual."):]: v for k, v in tower.state_dict.items()}
        sd.update({"model.language_model.norm.weight": np.ones(3)} if prefix else {})
        params = convert.from_torch("qwen2_5_vl_vision", sd, tower.cfg)
        assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), params, jax.tree.map(np.asarray, tower.params)))


def test_convert_is_strict(tower):
    sd = dict(tower.state_dict)
    with pytest.raises(ConversionError, match="unexpected key 'visual.blocks.0.attn.extra'"):
        convert.from_torch("qwen2_5_vl_vision", dict(sd, **{"visual.blocks.0.attn.extra": np.zeros(2)}), tower.cfg)
    missing = dict(sd)
    del missing["visual.merger.mlp.2.bias"]
    with pytest.raises(ConversionError, match="missing key 'visual.merger.mlp.2.bias'"):
        convert.from_torch("qwen2_5_vl_vision", missing, tower.cfg)
    bad = dict(sd, **{"visual.blocks.1.attn.qkv.weight": np.zeros((5, 5), np.float32)})
    with pytest.raises(ConversionError, match=r"blocks.1.attn.qkv.weight.*shape \(5, 5\)"):
        convert.from_torch("qwen2_5_vl_vision", bad, tower.cfg)
    extra = dict(sd, **{f"visual.blocks.{tower.cfg.depth}.norm1.weight": np.ones(tower.cfg.hidden_size, np.float32)})
    with pytest.raises(ConversionError, match="only"):
        convert.from_torch("qwen2_5_vl_vision", extra, tower.cfg)


def test_sharded_equals_unsharded(tower):
    grid = GRIDS["multi"]
    patches = random_patches(grid, tower.cfg, seed=2)
    layout = qv.vision_layout(grid, tower.cfg)
    unsharded = np.asarray(tower.apply(tower.params, patches, layout))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract = jax.eval_shape(lambda: tower.module.init(jax.random.PRNGKey(0), *qv.init_args(tower.cfg)))["params"]
    shardings = sharding.params_shardings(abstract, mesh)
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(shardings))  # something is sharded
    with jax.set_mesh(mesh), sharding.axis_rules():
        params = sharding.shard_params(tower.params, shardings)
        out = jax.jit(lambda p, x, lay: tower.module.apply({"params": p}, x, lay))(params, patches, layout)
    assert rel_err(out, unsharded.astype(np.float64)) <= 1e-5


def test_bf16_path(tower):
    cfg16 = tower.cfg.__class__(**{**tower.cfg.__dict__, "dtype": "bfloat16", "param_dtype": "bfloat16"})
    module = models.build("qwen2_5_vl_vision", cfg16)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), tower.params)
    grid = GRIDS["6x10"]
    patches = random_patches(grid, tower.cfg, seed=3)
    out = qv.encode(module, params, patches, grid)
    assert out.dtype == jnp.bfloat16
    ref = tower.reference(patches, grid)
    assert rel_err(np.asarray(out, np.float32), ref) <= 5e-2


def remat_module(cfg):
    return models.build("qwen2_5_vl_vision", cfg.__class__(**{**cfg.__dict__, "remat": True, "remat_policy": "dots"}))


def test_remat_matches(tower):
    grid = GRIDS["6x10"]
    patches = random_patches(grid, tower.cfg, seed=4)
    out = qv.encode(remat_module(tower.cfg), tower.params, patches, grid)
    assert rel_err(out, tower.reference(patches, grid)) <= 1e-4


@pytest.mark.parametrize("tower", ["p4_w2"], indirect=True)  # one config: the backward compile is the slow part
def test_gradients_flow(tower):
    """Gradients pass through the gathers and both branches of the per-layer window/full switch."""
    module = remat_module(tower.cfg)
    grid = GRIDS["6x10"]
    patches = random_patches(grid, tower.cfg, seed=5)
    layout = qv.vision_layout(grid, tower.cfg)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(module.apply({"params": p}, patches, layout) ** 2)))(tower.params)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and min(norms) > 0
