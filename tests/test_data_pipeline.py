"""Data pipeline: determinism, exact resume through Orbax, per-process slices, mixture proportions, epochs,
batch schema for every task, global-array assembly, worker processes."""
import json

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from blip3o_jax.data import pipeline, prompts, synthetic, tokenizer as tokenizer_lib
from blip3o_jax.sharding import make_mesh

N_QUERY = 6


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer_lib.build_tiny_tokenizer(str(tmp_path_factory.getbasetemp() / "tiny_tokenizer"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    a = synthetic.generate(str(root / "a"), 240, samples_per_shard=80, image_size=40, seed=1, prefix="a")
    b = synthetic.generate(str(root / "b"), 60, samples_per_shard=60, image_size=48, seed=2, prefix="b",
                           formats=("tar",))
    return {"a": str(root / "a" / "a-*.tar"), "b": str(root / "b" / "b-*.tar"), "jsonl": a["jsonl"]}


def make_cfg(datasets, **kw):
    cfg = pipeline.default_config()
    cfg.datasets = datasets
    cfg.global_batch_size = 8
    cfg.seq_buckets = (64, 96)
    cfg.n_query = N_QUERY
    cfg.gen_image_size = 32
    cfg.und_image_size = 56
    cfg.num_threads = 0
    cfg.update(kw)
    return cfg


def same(x, y):
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
        assert x[k].tobytes() == y[k].tobytes(), k


def t2i(data):
    return [{"name": "a", "paths": data["a"], "task": "t2i"}]


def test_same_seed_same_batches_and_iterator_matches_pure_function(data, tok):
    p1 = pipeline.DataPipeline(make_cfg(t2i(data), seed=3, num_threads=2), tok, process_index=0, process_count=1)
    p2 = pipeline.DataPipeline(make_cfg(t2i(data), seed=3), tok, process_index=0, process_count=1)
    p3 = pipeline.DataPipeline(make_cfg(t2i(data), seed=4), tok, process_index=0, process_count=1)
    it = p1.iterator()
    for step in range(4):
        batch = next(it)
        same(batch, p2.batch(step))
    assert not np.array_equal(p2.batch(0)["record_id"], p3.batch(0)["record_id"])
    it.close()


def test_resume_through_orbax_gives_identical_bytes(data, tok, tmp_path):
    cfg = make_cfg(t2i(data) + [{"name": "b", "paths": data["b"], "task": "t2i", "weight": 0.5}], num_threads=2)
    n, k = 7, 3
    uninterrupted = pipeline.DataPipeline(cfg, tok, process_index=0, process_count=1).iterator()
    expected = [next(uninterrupted) for _ in range(n)]
    uninterrupted.close()

    it = pipeline.DataPipeline(cfg, tok, process_index=0, process_count=1).iterator()
    for _ in range(k):
        next(it)
    state = {"w": np.arange(4.0, dtype=np.float32)}
    mgr = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("state", "data"))
    mgr.save(k, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        data=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
    it.close()
    saved = json.loads((tmp_path / "ckpt" / str(k) / "data" / "process_0-of-1.json").read_text())
    assert saved["step"] == k

    fresh = pipeline.DataPipeline(cfg, tok, process_index=0, process_count=1).iterator()
    restored = mgr.restore(k, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(jax.tree.map(np.zeros_like, state)),
        data=grain.checkpoint.CheckpointRestore(fresh)))
    np.testing.assert_array_equal(restored["state"]["w"], state["w"])
    assert fresh.step == k
    for step in range(k, n):
        same(next(fresh), expected[step])
    fresh.close()
    mgr.close()
    other = pipeline.DataPipeline(make_cfg(t2i(data), seed=9), tok, process_index=0, process_count=1).iterator()
    with pytest.raises(ValueError, match="seed"):
        other.set_state(saved)


def test_two_processes_are_disjoint_and_complete(data, tok):
    cfg = make_cfg(t2i(data) + [{"name": "b", "paths": data["b"], "task": "t2i", "weight": 0.5}])
    whole = pipeline.DataPipeline(cfg, tok, process_index=0, process_count=1)
    parts = [pipeline.DataPipeline(cfg, tok, process_index=p, process_count=2) for p in range(2)]
    for step in (0, 5):
        full = whole.batch(step)
        halves = [p.batch(step) for p in parts]
        ids = [set(zip(h["source_id"].tolist(), h["record_id"].tolist())) for h in halves]
        assert not ids[0] & ids[1]
        assert ids[0] | ids[1] == set(zip(full["source_id"].tolist(), full["record_id"].tolist()))
        for key in ("input_ids", "gen_image", "query_index", "record_id"):
            # global row 4p+j lives on process p as row j (contiguous blocks, as make_global_batch lays them out);
            # pad both to the same bucket first
            got = np.stack([halves[j // 4][key][j % 4] for j in range(8)]) if key != "input_ids" else None
            if key == "input_ids":
                length = full[key].shape[1]
                rows = [np.pad(halves[j // 4][key][j % 4], (0, length - halves[j // 4][key].shape[1]),
                               constant_values=tok.pad_token_id) for j in range(8)]
                got = np.stack(rows)
            np.testing.assert_array_equal(got, full[key])


def test_mixture_proportions_within_two_percent(data, tok):
    weights = [0.6, 0.3, 0.1]
    cfg = make_cfg([{"name": "a", "paths": data["a"], "task": "t2i", "weight": weights[0]},
                    {"name": "b", "paths": data["b"], "task": "t2i", "weight": weights[1]},
                    {"name": "j", "paths": data["jsonl"]["t2i"], "task": "t2i", "weight": weights[2]}])
    p = pipeline.DataPipeline(cfg, tok, process_index=0, process_count=1)
    counts = np.bincount([p.elements[g][0] for g in range(10_000)], minlength=3) / 10_000
    np.testing.assert_allclose(counts, weights, atol=0.02)
    # and through actual batches
    sources = np.concatenate([p.batch(s)["source_id"] for s in range(10)])
    np.testing.assert_allclose(np.bincount(sources, minlength=3) / len(sources), weights, atol=0.1)


def test_epochs_cover_every_record_and_reshuffle(data, tok):
    p = pipeline.DataPipeline(make_cfg(t2i(data)), tok, process_index=0, process_count=1)
    n = len(p.sources[0])
    epoch0 = [p.elements[g][1] for g in range(n)]
    epoch1 = [p.elements[g][1] for g in range(n, 2 * n)]
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1 and epoch0 != list(range(n))


def test_finite_epoch_pads_last_batch(data, tok):
    cfg = make_cfg([{"name": "b", "paths": data["b"], "task": "t2i"}], num_epochs=1, shuffle=False)
    p = pipeline.DataPipeline(cfg, tok, process_index=0, process_count=1)
    assert p.num_steps == 8  # 60 samples / 8
    batches = list(p.iterator())
    assert len(batches) == 8
    valid = np.concatenate([b["sample_valid"] for b in batches])
    records = np.concatenate([b["record_id"] for b in batches])[valid == 1]
    assert valid.sum() == 60 and list(records) == list(range(60))
    assert batches[-1]["sample_valid"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert batches[-1]["input_ids"][4:].max() == tok.pad_token_id
    # two processes: as many batches each, together every record exactly once
    parts = [list(pipeline.DataPipeline(cfg, tok, process_index=i, process_count=2).iterator()) for i in range(2)]
    assert [len(x) for x in parts] == [8, 8]
    records = np.concatenate([b["record_id"][b["sample_valid"] == 1] for x in parts for b in x])
    assert sorted(records.tolist()) == list(range(60))


def test_mixed_task_batch_schema(data, tok):
    cfg = make_cfg([{"name": "a", "paths": data["a"], "task": "t2i", "weight": 2},
                    {"name": "und", "paths": data["jsonl"]["i2t"], "task": "i2t"},
                    {"name": "txt", "paths": data["jsonl"]["text"], "task": "text"}],
                   seq_buckets=(64, 128))
    p = pipeline.DataPipeline(cfg, tok, process_index=0, process_count=1)
    special = prompts.special_ids(tok)
    b = p.batch(0)
    schema = p.schema
    assert set(b) == set(schema)
    L = b["input_ids"].shape[1]
    assert L in (64, 128)
    for k, (shape, dtype) in schema.items():
        assert b[k].shape == tuple(L if d == "L" else d for d in shape) and b[k].dtype == dtype, k
    task = b["task"]
    assert set(task.tolist()) == {0, 1, 2}
    rows = np.arange(8)
    for i in rows[task == 0]:
        q = b["query_index"][i]
        assert (b["input_ids"][i, q] == special.query).all()
        assert b["input_ids"][i, b["prompt_length"][i] - 1] == special.image_start
        assert b["attention_mask"][i].sum() == b["prompt_length"][i] + N_QUERY
        assert b["loss_mask"][i].sum() == 0 and b["gen_image"][i].max() > 0
    for i in rows[task == 1]:
        assert (b["input_ids"][i, b["und_index"][i]] == special.image_pad).all()
        assert b["und_grid_thw"][i].tolist() == [1, 4, 4] and b["und_patches"][i].shape == (16, 1176)
        assert b["gen_image"][i].max() == 0
    for i in rows[task != 0]:
        n = b["attention_mask"][i].sum()
        m = b["loss_mask"][i].astype(bool)
        np.testing.assert_array_equal(b["labels"][i, : n - 1], b["input_ids"][i, 1:n])
        assert tok.decode(b["labels"][i][m]).endswith("<|im_end|>") and not m[n - 1:].any()
    i = rows[task == 2][0]
    np.testing.assert_array_equal(b["mrope_positions"][i], np.broadcast_to(b["positions"][i], (3, L)))


def test_make_global_batch_on_mesh(data, tok):
    p = pipeline.DataPipeline(make_cfg(t2i(data)), tok, process_index=0, process_count=1)
    host = p.batch(0)
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    glob = pipeline.make_global_batch(host, mesh)
    for k, v in host.items():
        assert glob[k].shape == v.shape and glob[k].dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(glob[k]), v)
        assert glob[k].sharding.spec[0] == ("data", "fsdp")
    assert len(glob["gen_image"].addressable_shards) == 8
    assert glob["gen_image"].addressable_shards[0].data.shape == (1, 32, 32, 3)


def test_worker_processes_give_the_same_batches(data, tok):
    """mp_prefetch (2 Grain worker processes) yields exactly the in-process batches, and resumes."""
    cfg = make_cfg(t2i(data), worker_count=2, num_threads=1)
    p = pipeline.DataPipeline(cfg, tok, process_index=0, process_count=1)
    it = p.iterator(start_step=2)
    try:
        for step in range(2, 6):
            same(next(it), p.batch(step))
    finally:
        it.close()


def test_json_list_source_with_image_root(data, tok, tmp_path):
    import os

    lines = [json.loads(x) for x in open(data["jsonl"]["t2i"])][:10]
    path = tmp_path / "list.json"
    path.write_text(json.dumps(lines))
    root = os.path.dirname(data["jsonl"]["t2i"])
    cfg = make_cfg([{"name": "list", "paths": str(path), "task": "t2i", "image_root": root},
                    {"name": "tar_i2t", "paths": data["b"], "task": "i2t"}], shuffle=False)
    p = pipeline.DataPipeline(cfg, tok, process_index=0, process_count=1)
    assert len(p.sources[0]) == 10
    b = p.batch(0)
    rows = b["task"] == 0
    captions = [tok.decode(ids[m]) for ids, m in zip(b["input_ids"][rows], b["attention_mask"][rows].astype(bool))]
    expected = [lines[r]["caption"] for r in b["record_id"][rows]]
    assert all(e in c for c, e in zip(captions, expected)) and rows.sum() == 4
    # image-to-text from a caption-only tar shard: the caption becomes the answer to a fixed question
    i = np.nonzero(b["task"] == 1)[0][0]
    text = tok.decode(b["input_ids"][i][b["attention_mask"][i] == 1])
    assert "Describe the image.<|im_end|>\n<|im_start|>assistant\na " in text
