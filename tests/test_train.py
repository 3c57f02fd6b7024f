"""Train step, optimizer, checkpoints across meshes, the NaN guard, gradient accumulation, joint text loss, and
tpu_launch.sh's dry run. The kill -9 resume test is in test_train_resume.py."""
from __future__ import annotations

import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from blip3o_jax import sharding as shd
from blip3o_jax.training import checkpoint as ckpt_lib
from blip3o_jax.training import metrics as metrics_lib
from blip3o_jax.training import model_setup as ms_lib
from blip3o_jax.training import optimizer as opt_lib
from blip3o_jax.training import step as step_lib
from conftest import t2i_batch, tiny_config  # noqa: E402  (tests/ is on sys.path under pytest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, L, NQ = 8, 14, 4


def make_batch(rs, *, tasks=None, vocab=96, with_text=False, nan_targets=False):
    tasks = np.zeros((B,), np.int32) if tasks is None else np.asarray(tasks, np.int32)
    lengths = rs.randint(NQ + 3, L + 1, B)
    ids = np.zeros((B, L), np.int32)
    mask = np.zeros((B, L), np.int32)
    pos = np.zeros((B, L), np.int32)
    qidx = np.zeros((B, NQ), np.int32)
    for b, n in enumerate(lengths):
        ids[b, :n] = rs.randint(3, vocab, n)
        mask[b, :n] = 1
        pos[b, :n] = np.arange(n)
        qidx[b] = n - NQ + np.arange(NQ)
    batch = {"input_ids": ids, "attention_mask": mask, "positions": pos, "query_index": qidx, "task": tasks,
             "sample_valid": np.ones((B,), np.int32),
             "targets": rs.randn(B, 4, 4, 8).astype(np.float32) * (np.nan if nan_targets else 1.0)}
    if with_text:
        labels = np.concatenate([ids[:, 1:], np.zeros((B, 1), np.int32)], axis=1)
        loss_mask = (mask * (tasks[:, None] != 0)).astype(np.int32)
        loss_mask[:, -1] = 0
        batch.update(labels=labels, loss_mask=loss_mask)
    return batch


def test_schedule_warmup_then_cosine_to_floor():
    cfg = tiny_config().train
    cfg.update(dict(total_steps=100, lr=1e-4, min_lr=1e-5, warmup_steps=0, warmup_ratio=0.1))
    sched = opt_lib.learning_rate_schedule(cfg)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), 0.5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(sched(10)), 1e-4, rtol=1e-6)
    np.testing.assert_allclose(float(sched(55)), 0.5 * (1e-4 + 1e-5), rtol=1e-5)
    np.testing.assert_allclose(float(sched(100)), 1e-5, rtol=1e-6)


def test_split_merge_and_trainable_groups():
    params = {"backbone": 1, "dit": 2, "latent_queries": 3, "gen_encoder": 4}
    tr, fr = opt_lib.split_params(params, freeze_backbone=True)
    assert set(tr) == {"dit", "latent_queries"} and set(fr) == {"backbone", "gen_encoder"}
    tr, fr = opt_lib.split_params(params, freeze_backbone=False)
    assert set(tr) == {"backbone", "dit", "latent_queries"} and set(fr) == {"gen_encoder"}
    assert opt_lib.merge_params(tr, fr) == params


@pytest.fixture(scope="module")
def sharded():
    """The tiny config's step on a 2x2x2 mesh, initialised; compiled once for the tests below."""
    config = tiny_config()
    config.data.global_batch_size = B
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    setup = step_lib.make_train_step(config, mesh)
    state, frozen = setup.init(jax.random.key(0))
    return dict(config=config, mesh=mesh, setup=setup, state=state, frozen=frozen)


def _global(batch, setup):
    return {k: jax.device_put(v, setup.batch_shardings[k]) for k, v in batch.items() if k in setup.batch_shardings}


def _copy(tree):
    return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)


def test_params_are_sharded_by_logical_names(sharded):
    setup, state = sharded["setup"], sharded["state"]
    # a DiT FFN kernel (embed, mlp) -> (fsdp, tensor)
    kernel = state.params["dit"]["layers"]["feed_forward"]["linear_1"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    # optimizer moments follow their params
    mu = state.opt_state[1][0].mu["dit"]["layers"]["feed_forward"]["linear_1"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec
    assert state.params["latent_queries"].dtype == jnp.float32


def test_step_trains_and_reports_metrics(sharded):
    setup = sharded["setup"]
    state, frozen = _copy(sharded["state"]), sharded["frozen"]
    rs = np.random.RandomState(0)
    batch = _global(make_batch(rs), setup)
    losses = []
    for _ in range(6):
        state, m = setup.step_fn(state, frozen, batch)
        losses.append(float(m["loss"]))
    assert int(state.step) == 6 and int(m["nonfinite_total"]) == 0
    assert losses[-1] < losses[0]
    for k in ("grad_norm", "update_norm", "param_norm", "lr", "gen_loss"):
        assert np.isfinite(float(m[k])), k
    assert m["sigma_sum"].shape == (5,) and float(np.sum(m["sigma_count"])) == B


def test_nonfinite_guard_skips_the_update(sharded):
    setup = sharded["setup"]
    state, frozen = _copy(sharded["state"]), sharded["frozen"]
    before = jax.device_get(state.params)
    bad = _global(make_batch(np.random.RandomState(1), nan_targets=True), setup)
    for k in range(2):
        state, m = setup.step_fn(state, frozen, bad)
        assert int(m["nonfinite_streak"]) == k + 1
    assert int(m["nonfinite_total"]) == 2 and int(state.step) == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)  # untouched
    good = _global(make_batch(np.random.RandomState(2)), setup)
    state, m = setup.step_fn(state, frozen, good)
    assert int(m["nonfinite_streak"]) == 0 and int(m["nonfinite_total"]) == 2


def test_checkpoint_saved_on_2x2x2_restores_identically_on_8x1x1(sharded, tmp_path):
    setup, frozen = sharded["setup"], sharded["frozen"]
    state, _ = setup.step_fn(_copy(sharded["state"]), frozen, _global(make_batch(np.random.RandomState(3)), setup))
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), save_every=1)
    ckpt.save(1, state, config={"note": "test"})
    ckpt.close()
    other_mesh = shd.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    other = step_lib.make_train_step(sharded["config"], other_mesh)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), save_every=1)
    restored = ckpt.restore(None, other.abstract_state)
    assert ckpt.read_config()["note"] == "test"
    ckpt.close()
    kernel = restored.params["dit"]["layers"]["feed_forward"]["linear_1"]["kernel"]
    assert kernel.sharding.mesh.shape == other_mesh.shape
    want = other.abstract_state.params["dit"]["layers"]["feed_forward"]["linear_1"]["kernel"].sharding
    assert kernel.sharding == want and kernel.sharding.is_fully_replicated  # fsdp/tensor have size 1 here
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))


def test_grad_accumulation_equals_one_big_batch():
    """clip_mse has no random draws, so 2 micro-batches must give the same update as the whole batch."""
    def run(accum):
        config = tiny_config(loss="clip_mse", n_query=16)
        config.data.update(dict(n_query=16, seq_buckets=(24,), global_batch_size=B))
        config.train.grad_accum_steps = accum
        setup = step_lib.make_train_step(config, shd.make_mesh({"data": 1}, devices=jax.devices()[:1]))
        state, frozen = setup.init(jax.random.key(0))
        batch = t2i_batch(np.random.RandomState(4), B, task=[0, 0, 2, 0, 0, 0, 0, 2])
        state, m = setup.step_fn(state, frozen, batch)
        return jax.device_get(state.params), jax.device_get(m)

    p1, m1 = run(1)
    p2, m2 = run(2)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p1, p2)


def test_joint_training_mixed_and_text_only_batches():
    """Joint mode (backbone trainable, text CE on text rows) on a mixed batch and on a batch without images."""
    config = tiny_config()
    config.data.global_batch_size = B
    config.data.datasets = [dict(name="a", paths="x", task="t2i"), dict(name="b", paths="y", task="text")]
    config.train.update(dict(freeze_backbone=False, text_loss_weight=1.0))
    setup = step_lib.make_train_step(config, shd.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    assert setup.trainable_names == ("backbone", "dit", "latent_queries")
    state, frozen = setup.init(jax.random.key(0))
    rs = np.random.RandomState(5)
    mixed = make_batch(rs, tasks=[0, 2, 0, 2, 0, 0, 2, 0], with_text=True)
    text_only = make_batch(rs, tasks=[2] * B, with_text=True)
    state, m = setup.step_fn(state, frozen, mixed)
    assert float(m["gen_samples"]) == 5 and np.isfinite(float(m["text_loss"])) and float(m["text_loss"]) > 0
    np.testing.assert_allclose(float(m["loss"]), float(m["gen_loss"]) + float(m["text_loss"]), rtol=1e-6)
    # CE against a direct computation on the text rows
    params = opt_lib.merge_params(_copy(state.params), frozen)
    state, m = setup.step_fn(state, frozen, text_only)
    assert float(m["gen_samples"]) == 0 and float(m["gen_loss"]) == 0.0
    from blip3o_jax.models import blip3o as blip3o_lib

    _, logits = jax.jit(lambda p: setup.model.apply(  # jitted: eager, op by op, costs more than the compile
        {"params": p}, text_only["input_ids"], text_only["attention_mask"], text_only["positions"], None, None,
        compute_logits=True, method=blip3o_lib.Blip3o.encode))(params)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, text_only["labels"])
    want = float(np.sum(np.asarray(ce) * text_only["loss_mask"]) / np.sum(text_only["loss_mask"]))
    np.testing.assert_allclose(float(m["text_loss"]), want, rtol=1e-5)
    assert np.isfinite(float(m["grad_norm"])) and float(m["grad_norm"]) > 0


def test_flops_accounting_matches_the_reference_table():
    """The DiT of the 8B release: ~0.46 TFLOPs per training sample (reference §5.2)."""
    from blip3o_jax.cli import load_config

    config = load_config(os.path.join(ROOT, "configs", "blip3o_8b.py"))
    config.model.query_path = "full"  # the reference's recipe: backward through the whole sequence (§5.2)
    mcfg = ms_lib.model_config(config)
    flops = metrics_lib.train_flops_per_sample(mcfg, seq_len=512, trainable=("dit", "latent_queries"),
                                               text_loss=False)
    assert 0.42e12 < flops["dit"] < 0.50e12
    assert 9.0e12 < flops["gen_encoder"] < 9.8e12  # EVA-CLIP-E target: ~9.4 TFLOPs
    assert 2 * 12e9 * 512 < flops["backbone"] < 2 * 16e9 * 512  # frozen 7B: fwd + activation bwd, ~13 GF/token


def test_tpu_launch_dry_run_prints_the_commands():
    cmd = [os.path.join(ROOT, "tpu_launch.sh"), "--name", "pod", "--zone", "us-east5-a", "--accelerator-type",
           "v5p-32", "--num-workers", "4", "--env", "XLA_FLAGS=--a=1 --b=2", "--dry-run", "--",
           "--config", "configs/blip3o_8b.py", "--workdir", "gs://bucket/run"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    lines = [l for l in out.splitlines() if l.startswith("+ ")]
    assert lines[0].startswith("+ gcloud compute tpus tpu-vm describe pod --zone=us-east5-a")
    assert any("tpu-vm create pod --zone=us-east5-a --accelerator-type=v5p-32" in l for l in lines)
    run = [l for l in lines if "--worker=all" in l and "blip3o_jax.train" in l]
    assert len(run) == 1 and "configs/blip3o_8b.py" in run[0] and "gs://bucket/run" in run[0]
    assert "XLA_FLAGS=--a=1" in run[0]
    logs = [l for l in lines if "scp pod:blip3o_train.log" in l]
    assert len(logs) == 4 and "--worker=3" in logs[-1]
    bad = subprocess.run([os.path.join(ROOT, "tpu_launch.sh"), "--zone", "z", "--dry-run"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "--name is required" in bad.stderr


def test_init_from_converted_weights(tmp_path):
    """`--config.init_from=DIR` with convert_torch_weights.py output: the backbone group comes from the checkpoint,
    the rest from the seed; a wrong checkpoint is one clear error."""
    import torch
    import transformers

    from blip3o_jax import pretrained
    from blip3o_jax import train as train_lib
    from blip3o_jax.cli import UserError
    from blip3o_jax.models import qwen as qwen_lib

    config = tiny_config()
    config.data.global_batch_size = B
    setup = step_lib.make_train_step(config, shd.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**qwen_lib.config_to_hf("qwen3", setup.model_cfg.backbone)))
    hf.save_pretrained(str(tmp_path / "hf"))
    pretrained.convert_checkpoint(str(tmp_path / "hf"), str(tmp_path / "converted"), progress=False)
    config.init_from = str(tmp_path / "converted")
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "run"), save_every=10)
    state, frozen, start = train_lib.initial_state(config, setup, str(tmp_path / "run"), ckpt)
    ckpt.close()
    assert start == 0
    want = hf.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(frozen["backbone"]["embed_tokens"]["embedding"]), want)
    fresh_state, fresh_frozen = setup.init(jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(fresh_state.params))
    assert os.path.isdir(tmp_path / "run" / "frozen")  # written once, read back on resume

    config.init_from = f"dit={tmp_path / 'converted'}"
    with pytest.raises(UserError, match="does not fit"):
        train_lib.load_init_from(config.init_from, setup)


def test_ema_weights_follow_the_params_and_survive_a_checkpoint(tmp_path):
    config = tiny_config(loss="clip_mse", n_query=16)
    config.data.update(dict(n_query=16, seq_buckets=(24,), global_batch_size=B))
    config.train.ema_decay = 0.75
    setup = step_lib.make_train_step(config, shd.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    state, frozen = setup.init(jax.random.key(0))
    start = jax.device_get(state.params)
    batch = t2i_batch(np.random.RandomState(6), B)
    state, _ = setup.step_fn(state, frozen, batch)
    new = jax.device_get(state.params)
    jax.tree.map(lambda e, a, b: np.testing.assert_allclose(e, 0.75 * a + 0.25 * b, rtol=1e-5, atol=1e-7),
                 jax.device_get(state.ema_params), start, new)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), save_every=1)
    ckpt.save(1, state)
    restored = ckpt.restore(1, setup.abstract_state)
    ckpt.close()
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.ema_params), jax.device_get(state.ema_params))
