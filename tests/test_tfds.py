"""TFDS: tar shards -> TFDS ArrayRecord dataset (byte-for-byte) -> `kind="tfds"` datasets in the Grain pipeline, with
the tar pipeline's determinism, mixture, bad-sample accounting, exact resume and per-process slices; and a few
training steps of the tiny config from it, resumed exactly. TensorFlow is never imported."""
from __future__ import annotations

import json
import os
import shutil
import sys

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from blip3o_jax.data import pipeline, sources, synthetic, tfds_builder, tfds_source
from blip3o_jax.data import tokenizer as tokenizer_lib
from conftest import loop_config  # noqa: E402  (tests/ is on sys.path under pytest)

N_QUERY = 6


@pytest.fixture(scope="module", autouse=True)
def no_tensorflow():
    """Nothing here imports TensorFlow: without it (the `test` extra does not install it) every test below runs;
    where it is installed, this checks that TFDS left it unimported."""
    assert "tensorflow" not in sys.modules
    yield
    assert "tensorflow" not in sys.modules


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer_lib.build_tiny_tokenizer(str(tmp_path_factory.getbasetemp() / "tiny_tokenizer"))


def _bad_shard(path):
    """Samples the pipeline must skip (each a different reason) plus a member the builder does not carry."""
    good = synthetic.sample(5, 0, image_size=40)
    synthetic.write_tar(path, [
        ("bad-undecodable", {"jpg": b"\xff\xd8 not a jpeg", "txt": "a red circle"}),
        ("bad-empty-caption", {"jpg": good["jpg"], "txt": "   "}),
        ("bad-no-image", {"txt": "a blue square"}),
        ("bad-no-caption", {"jpg": good["jpg"]}),
        ("bad-utf8", {"jpg": good["jpg"], "txt": b"caf\xe9 \xff"}),
        ("good-with-extra", {"jpg": good["jpg"], "txt": good["txt"], "cls": "3"}),
    ])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    synthetic.generate(str(root / "a"), 72, samples_per_shard=24, image_size=40, seed=1, prefix="a",
                       formats=("tar",))
    _bad_shard(str(root / "a" / "a-zz-bad.tar"))
    synthetic.generate(str(root / "b"), 30, samples_per_shard=30, image_size=48, seed=2, prefix="b",
                       formats=("tar",))
    tars = {"a": str(root / "a" / "a-*.tar"), "b": str(root / "b" / "b-*.tar")}
    summary = tfds_builder.build({"train": tars["a"], "extra": tars["b"]}, str(root / "tfds"), name="shapes")
    return dict(root=root, tars=tars, tfds_dir=str(root / "tfds"), summary=summary)


def tar_specs(data, weights=(1.0, 0.5)):
    return [{"name": "a", "paths": data["tars"]["a"], "task": "t2i", "weight": weights[0],
             "index_cache_dir": str(data["root"] / "idx")},
            {"name": "b", "paths": data["tars"]["b"], "task": "t2i", "weight": weights[1],
             "index_cache_dir": str(data["root"] / "idx")}]


def tfds_specs(data, weights=(1.0, 0.5)):
    return [{"kind": "tfds", "name": "shapes", "split": "train", "data_dir": data["tfds_dir"], "task": "t2i",
             "weight": weights[0]},
            {"kind": "tfds", "name": "shapes", "split": "extra", "data_dir": data["tfds_dir"], "task": "t2i",
             "weight": weights[1]}]


def make_cfg(datasets, **kw):
    cfg = pipeline.default_config()
    cfg.datasets = datasets
    cfg.global_batch_size = 8
    cfg.seq_buckets = (64, 96)
    cfg.n_query = N_QUERY
    cfg.gen_image_size = 32
    cfg.num_threads = 0
    cfg.update(kw)
    return cfg


def same(x, y):
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
        assert x[k].tobytes() == y[k].tobytes(), k


def test_builder_round_trips_every_sample_byte_for_byte(data):
    summary = data["summary"]["splits"]
    assert summary["train"]["samples"] == 72 + 6 and summary["train"]["shards"] == 4
    assert summary["train"]["other_members"] == {"cls": 1} and summary["extra"]["samples"] == 30
    for split, name in (("train", "a"), ("extra", "b")):
        tar = sources.TarShardSource(data["tars"][name], index_cache_dir=str(data["root"] / "idx"))
        src = tfds_source.TfdsSource("shapes", split=split, data_dir=data["tfds_dir"])
        assert len(src) == len(tar)
        for i in range(len(tar)):
            want, got = tar[i], src[i]
            assert (got.key, got.image, got.image_ext, got.text, got.meta) == \
                   (want.key, want.image, want.image_ext, want.text, want.meta), (split, i)
    assert tar[0].meta and tar[0].text  # the synthetic shards carry .json and .txt members: compared above
    # the source pickles to its spec (Grain worker processes reopen the files) and reads the same there
    import pickle

    clone = pickle.loads(pickle.dumps(src))
    assert clone._ds is None and len(pickle.dumps(src)) < 2000
    assert clone[7].image == src[7].image
    # a TFDS user reading it the usual way gets the decoded pixels of the stored JPEG
    import tensorflow_datasets as tfds

    decoded = tfds.data_source("shapes", split="extra", data_dir=data["tfds_dir"])[3]["image"]
    assert decoded.shape == (48, 48, 3) and decoded.dtype == np.uint8


def test_tfds_pipeline_gives_the_tar_pipelines_batches_and_bad_sample_counts(data, tok):
    """Same records in the same order: the TFDS datasets give the tar datasets' batches byte for byte (mixture
    included), and the same bad samples are skipped for the same reasons."""
    cfg_tar = make_cfg(tar_specs(data), seed=3)
    cfg_tfds = make_cfg(tfds_specs(data), seed=3, num_threads=2)
    p_tar = pipeline.DataPipeline(cfg_tar, tok, process_index=0, process_count=1)
    p_tfds = pipeline.DataPipeline(cfg_tfds, tok, process_index=0, process_count=1)
    it_tar, it_tfds = p_tar.iterator(), p_tfds.iterator()
    for step in range(14):  # 112 samples: every record of `a` (the bad ones included) is met
        same(next(it_tfds), next(it_tar))
    assert it_tfds.counters == it_tar.counters
    assert it_tfds.counters["bad_samples"] >= 5
    for reason in ("undecodable_image", "empty_caption", "missing_image", "missing_caption", "bad_text_encoding"):
        assert it_tfds.counters.get(f"bad/{reason}", 0) >= 1, (reason, it_tfds.counters)
    it_tar.close()
    it_tfds.close()
    other = pipeline.DataPipeline(make_cfg(tfds_specs(data), seed=4), tok, process_index=0, process_count=1)
    assert not np.array_equal(other.batch(0)["record_id"], p_tfds.batch(0)["record_id"])


def test_resume_through_orbax_gives_identical_bytes(data, tok, tmp_path):
    cfg = make_cfg(tfds_specs(data), num_threads=2)
    n, k = 6, 3
    uninterrupted = pipeline.DataPipeline(cfg, tok, process_index=0, process_count=1).iterator()
    expected = [next(uninterrupted) for _ in range(n)]
    uninterrupted.close()
    it = pipeline.DataPipeline(cfg, tok, process_index=0, process_count=1).iterator()
    for _ in range(k):
        next(it)
    mgr = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",))
    mgr.save(k, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
    it.close()
    fresh = pipeline.DataPipeline(cfg, tok, process_index=0, process_count=1).iterator()
    mgr.restore(k, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert fresh.step == k
    for step in range(k, n):
        same(next(fresh), expected[step])
    fresh.close()
    mgr.close()


def test_two_processes_are_disjoint_and_complete(data, tok):
    cfg = make_cfg(tfds_specs(data))
    whole = pipeline.DataPipeline(cfg, tok, process_index=0, process_count=1)
    parts = [pipeline.DataPipeline(cfg, tok, process_index=p, process_count=2) for p in range(2)]
    for step in (0, 5):
        full = whole.batch(step)
        halves = [p.batch(step) for p in parts]
        ids = [set(zip(h["source_id"].tolist(), h["record_id"].tolist())) for h in halves]
        assert not ids[0] & ids[1]
        assert ids[0] | ids[1] == set(zip(full["source_id"].tolist(), full["record_id"].tolist()))
        # global row 4p+j is row j of process p (the contiguous blocks make_global_batch lays out)
        for key in ("gen_image", "record_id", "source_id"):
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), full[key])


def test_worker_processes_give_the_same_batches(data, tok):
    """Grain worker processes (the source travels as its spec and reopens the files there) from a resumed step."""
    p = pipeline.DataPipeline(make_cfg(tfds_specs(data), worker_count=2, num_threads=1), tok, process_index=0,
                              process_count=1)
    it = p.iterator(start_step=2)
    try:
        for step in range(2, 5):
            same(next(it), p.batch(step))
    finally:
        it.close()


def test_spec_errors_are_one_clear_sentence(data, tok):
    base = tfds_specs(data)[0]
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['paths'\]"):
        pipeline.DataPipeline(make_cfg([{**base, "paths": "x"}]), tok, process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"no feature 'img' \(image_field\).*'caption'.*'image'"):
        pipeline.DataPipeline(make_cfg([{**base, "image_field": "img"}]), tok, process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="cannot open TFDS dataset 'nope'"):
        pipeline.DataPipeline(make_cfg([{**base, "name": "nope"}]), tok, process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="split 'test'"):
        pipeline.DataPipeline(make_cfg([{**base, "split": "test"}]), tok, process_index=0, process_count=1)
    # builder_dir instead of name + data_dir; TFDS split slicing
    direct = tfds_source.TfdsSource(builder_dir=os.path.join(data["tfds_dir"], "shapes", "1.0.0"), split="extra[:10]")
    assert len(direct) == 10 and direct.name == "shapes"


def test_tiny_config_trains_from_tfds_and_resumes_exactly(data, tmp_path):
    """A few steps of configs/tiny.py from the TFDS dataset; the checkpoint of step 2 resumed gives the losses of
    steps 3-4 of the uninterrupted run bit for bit."""
    from blip3o_jax import train as train_lib

    root = tmp_path / "tiny"
    synthetic.generate(str(root / "shards"), 48, samples_per_shard=24, image_size=32, max_objects=1,
                       formats=("tar",))
    tokenizer_lib.build_tiny_tokenizer(str(root / "tokenizer"))
    tfds_builder.build(str(root / "shards" / "*.tar"), str(root / "tfds"), name="tiny_shapes")
    config = loop_config(str(root), {  # the train-loop tests' programs (conftest.LOOP_OVERRIDES)
        "train.total_steps": 4, "checkpoint.every": 2, "checkpoint.async_save": False, "log.every": 1,
        "log.progress_bar": False, "log.tensorboard": False})
    config.data.datasets = [{"kind": "tfds", "name": "tiny_shapes", "data_dir": str(root / "tfds"), "task": "t2i"}]
    workdir = str(tmp_path / "run")
    train_lib.train(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        first = {r["step"]: r["loss"] for r in map(json.loads, f)}
    assert sorted(first) == [1, 2, 3, 4] and all(np.isfinite(v) for v in first.values())
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    train_lib.train(config, workdir)  # resumes from step 2
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 3, 4]
    assert [r["loss"] for r in lines[4:]] == [first[3], first[4]]  # exact float equality
    state = json.loads(open(os.path.join(workdir, "checkpoints", "4", "data", "process_0-of-1.json")).read())
    assert state["step"] == 4
