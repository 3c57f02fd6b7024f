"""Precomputed targets: blip3o-precompute (blip3o_jax/precompute.py) writes companion shards; the pipeline reads them instead of
images; the train step then has no encoder, and gives the same loss as with in-step targets for the same batch.

A small EVA-CLIP target encoder (2 blocks, 56 px -> 4x4 patches -> 2x2x32 grid) over 3 synthetic tar shards, one
of them holding an undecodable image. Checked: per-host sharding (two simulated processes split the shards), the
resume skips finished shards and ignores leftovers of an interrupted one, bf16 targets equal the in-step encoder
output rounded to bf16 (float32 storage: equal), both pipelines choose the same samples (a bad image is a bad
sample either way, replaced by the same record), and the train step's loss on the precomputed batch equals the
in-step loss.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from blip3o_jax import cli
from blip3o_jax import precompute as precompute_lib
from blip3o_jax import sharding as shd
from blip3o_jax.data import pipeline, synthetic, targets
from blip3o_jax.training import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 8


def eva_config(data_dir: str, targets_dir: str | None = None):
    c = cli.load_config(os.path.join(ROOT, "configs", "tiny.py") + ":" + data_dir)
    c.model.target = "eva_clip"
    c.model.gen_encoder_kind = "eva_clip"
    c.model.gen_encoder = dict(image_size=56, patch_size=14, width=32, layers=2, head_width=16, mlp_ratio=2.0,
                               pool_stride=2)
    c.model.image_size = 56  # -> data.gen_image_size (a shared reference)
    c.model.dit = dict(input_size=2, patch_size=1, in_channels=32, dim=64, n_layers=1, n_heads=4, n_kv_heads=4,
                       multiple_of=32, norm_eps=1e-5, qk_norm=True)
    c.model.backbone = dict(c.model.backbone.to_dict(), num_hidden_layers=1)
    c.data.global_batch_size = B
    c.data.shuffle = False
    if targets_dir:
        c.data.datasets = [dict(c.data.datasets[0], targets_dir=targets_dir)]
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from blip3o_jax.data.tokenizer import build_tiny_tokenizer

    d = tmp_path_factory.mktemp("targets_data")
    synthetic.generate(str(d / "shards"), 24, samples_per_shard=12, image_size=64, max_objects=1, formats=("tar",))
    good = synthetic.sample(0, 100, image_size=64)
    synthetic.write_tar(str(d / "shards" / "shapes-bad.tar"), [
        ("bad-0", {"jpg": b"not a jpeg at all", "txt": "a red circle"}),
        (good["key"], {"jpg": good["jpg"], "txt": good["txt"]}),
    ])
    build_tiny_tokenizer(str(d / "tokenizer"))
    return str(d)


@pytest.fixture(scope="module")
def written(data_dir, tmp_path_factory):
    """Companions in bf16 next to the shards (two simulated hosts) and in float32 in another directory."""
    config = eva_config(data_dir)
    summaries = [precompute_lib.precompute(config, batch_size=B, process_index=p, process_count=2, log=print)
                 for p in range(2)]
    fp32_dir = str(tmp_path_factory.mktemp("targets_fp32"))
    fp32 = precompute_lib.precompute(eva_config(data_dir, fp32_dir), batch_size=B, dtype="float32", log=print)
    return dict(config=config, summaries=summaries, fp32_dir=fp32_dir, fp32=fp32)


def test_written_per_host_and_resumable(data_dir, written):
    shards = sorted(f for f in os.listdir(os.path.join(data_dir, "shards")) if f.endswith(".tar")
                    and not f.endswith(targets.SUFFIX))
    assert len(shards) == 3
    s0, s1 = written["summaries"]
    assert (s0["shards_this_process"], s1["shards_this_process"]) == (2, 1)  # shards 0, 2 | shard 1
    assert s0["shards_done"] + s1["shards_done"] == 3 and s0["samples"] + s1["samples"] == 24 + 1
    fp_id = s0["fingerprint_id"]
    for name in shards:
        shard = os.path.join(data_dir, "shards", name)
        assert targets.is_complete(shard, fp_id)
        meta = targets.read_meta(shard)
        assert meta["shape"] == [2, 2, 32] and meta["dtype"] == "bfloat16"
    bad = targets.read_meta(os.path.join(data_dir, "shards", "shapes-bad.tar"))
    assert [m["key"] for m in bad["missing"]] == ["bad-0"] and bad["num_targets"] == 1

    # a leftover of an interrupted write is ignored; finished shards are skipped (nothing rewritten)
    tar0 = targets.companion_paths(os.path.join(data_dir, "shards", shards[0]))[0]
    with open(tar0 + ".tmp-99999", "wb") as f:
        f.write(b"partial")
    mtime = os.stat(tar0).st_mtime_ns
    again = precompute_lib.precompute(written["config"], batch_size=B, log=print)
    assert again["shards_skipped"] == 3 and again["shards_done"] == 0
    assert os.stat(tar0).st_mtime_ns == mtime
    # another encoder (different weights) has another fingerprint: nothing matches, nothing is reused
    other = eva_config(data_dir)
    other.seed = 1
    assert not targets.check(other).use and "another encoder" in targets.check(other).reason


@pytest.fixture(scope="module")
def steps(written):
    """The image config's step and its params; the precomputed config's step (no encoder)."""
    config = written["config"]
    mesh = shd.make_mesh(dict(config.mesh))
    image_setup = step_lib.make_train_step(config, mesh)
    state, frozen = image_setup.init(jax.random.key(int(config.seed)))
    pre_config, res = targets.resolve(config)
    assert res.use, res.reason
    pre_setup = step_lib.make_train_step(pre_config, mesh)
    return dict(mesh=mesh, image=image_setup, pre=pre_setup, pre_config=pre_config, state=state, frozen=frozen)


def _global(batch, setup):
    return {k: jax.device_put(v, setup.batch_shardings[k]) for k, v in batch.items() if k in setup.batch_shardings}


def test_targets_equal_in_step_encoder_and_same_loss(data_dir, written, steps):
    config, pre_config = written["config"], steps["pre_config"]
    assert pre_config.model.target == "precomputed" and tuple(pre_config.data.target_shape) == (2, 2, 32)
    assert "gen_encoder" not in steps["pre"].abstract_frozen  # no encoder in the step
    image_data = pipeline.build(config.data, process_index=0, process_count=1)
    pre_data = pipeline.build(pre_config.data, process_index=0, process_count=1)
    fp32_config = eva_config(data_dir, written["fp32_dir"])
    fp32_config, res32 = targets.resolve(fp32_config)
    assert res32.use
    fp32_data = pipeline.build(fp32_config.data, process_index=0, process_count=1)

    params = {**steps["state"].params, **steps["frozen"]}
    for step in range(4):  # 32 samples: every record of the 3 shards, with the bad one replaced
        img, pre, f32 = image_data.batch(step), pre_data.batch(step), fp32_data.batch(step)
        assert "gen_image" not in pre and pre["targets"].dtype == ml_dtypes.bfloat16
        for k in ("record_id", "source_id", "input_ids", "query_index", "sample_valid"):
            np.testing.assert_array_equal(pre[k], img[k], err_msg=k)
        in_step = np.asarray(steps["image"].targets_fn(params, _global(img, steps["image"])))
        np.testing.assert_array_equal(pre["targets"], in_step.astype(ml_dtypes.bfloat16))  # exactly bf16(in-step)
        np.testing.assert_allclose(f32["targets"].astype(np.float32), in_step, rtol=1e-5, atol=1e-6)
        assert f32["targets"].dtype == np.float32
        # records in order (no shuffle); record 24 is the undecodable image: replaced, in both pipelines alike
        assert 24 not in img["record_id"].tolist()

    # the same batch through both train steps: same loss (float32 targets); bf16 targets within their rounding
    img = image_data.batch(1)
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731  (the step donates its state)
    frozen_pre = {k: v for k, v in steps["frozen"].items() if k != "gen_encoder"}
    _, m_img = steps["image"].step_fn(copy(steps["state"]), steps["frozen"], _global(img, steps["image"]))
    _, m_f32 = steps["pre"].step_fn(copy(steps["state"]), frozen_pre, _global(fp32_data.batch(1), steps["pre"]))
    _, m_pre = steps["pre"].step_fn(copy(steps["state"]), frozen_pre, _global(pre_data.batch(1), steps["pre"]))
    loss_img, loss_f32, loss_pre = float(m_img["loss"]), float(m_f32["loss"]), float(m_pre["loss"])
    print(f"loss in-step {loss_img:.7f}, precomputed fp32 {loss_f32:.7f}, bf16 {loss_pre:.7f}")
    assert abs(loss_f32 - loss_img) <= 1e-5 * abs(loss_img)
    assert abs(loss_pre - loss_img) <= 1e-2 * abs(loss_img)
    assert np.isfinite(loss_img) and float(m_img["gen_samples"]) == B
