"""Bad samples are skipped by deterministic replacement, counted per reason, logged once with shard and key,
and never yielded; a source without any usable sample is a clear error."""
import io
import json
import logging

import pytest
from PIL import Image

from blip3o_jax.data import pipeline, sources, synthetic, tar_index, tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer_lib.build_tiny_tokenizer(str(tmp_path_factory.getbasetemp() / "tiny_tokenizer"))


def jpeg(w, h, color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="JPEG")
    return buf.getvalue()


GOOD = {"jpg": jpeg(40, 36), "txt": "a red square"}
# key -> (fields, reason the pipeline must report)
BAD = {
    "zero_byte": ({"jpg": b"", "txt": "a caption"}, "empty_image"),
    "garbage": ({"jpg": b"this is not an image at all" * 10, "txt": "a caption"}, "undecodable_image"),
    "cut_jpeg": ({"jpg": jpeg(64, 64)[:300], "txt": "a caption"}, "undecodable_image"),
    "no_caption": ({"jpg": jpeg(40, 40)}, "missing_caption"),
    "empty_caption": ({"jpg": jpeg(40, 40), "txt": "  \n "}, "empty_caption"),
    "latin1": ({"jpg": jpeg(40, 40), "txt": "caf\xe9 au lait".encode("latin-1")}, "bad_text_encoding"),
    "tiny": ({"jpg": jpeg(8, 8), "txt": "a tiny image"}, "image_too_small"),
    "panorama": ({"jpg": jpeg(420, 18), "txt": "a thin strip"}, "extreme_aspect"),
    "no_image": ({"txt": "a caption without image"}, "missing_image"),
}


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    members, bad_records = [], {}
    for i in range(24):
        if i % 2 == 1 and BAD:
            name = list(BAD)[i // 2] if i // 2 < len(BAD) else None
            if name is not None:
                members.append((f"{i:03d}_{name}", BAD[name][0]))
                bad_records[i] = BAD[name][1]
                continue
        members.append((f"{i:03d}_good", GOOD))
    synthetic.write_tar(str(root / "s-000.tar"), members)
    # second shard, truncated inside its last sample's image
    trunc = str(root / "s-001.tar")
    synthetic.write_tar(trunc, [(f"t{i}", {"jpg": jpeg(48, 40), "txt": "a red square"}) for i in range(4)])
    ix = tar_index.build_index(trunc)
    with open(trunc, "r+b") as f:
        f.truncate(ix.sample_members(3)[0][1] + 100)
    bad_records[len(members) + 3] = "truncated"
    # JSONL with its own failures
    img_dir = root / "images"
    img_dir.mkdir()
    (img_dir / "ok.jpg").write_bytes(jpeg(40, 40))
    lines = [json.dumps({"image": "images/ok.jpg", "caption": f"good {i}"}).encode() for i in range(6)]
    lines.insert(1, b'{"image": "images/ok.jpg", "caption": "broken json"')
    lines.insert(3, json.dumps({"image": "images/ok.jpg", "caption": "x"}).encode().replace(b"x", b"\xff\xfe"))
    lines.insert(5, json.dumps({"image": "images/missing.jpg", "caption": "a caption"}).encode())
    lines.insert(7, json.dumps({"image": "images/ok.jpg"}).encode())
    (root / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n\n")
    json_bad = {1: "bad_record", 3: "bad_text_encoding", 5: "missing_image", 7: "missing_caption"}
    return {"tar": str(root / "s-*.tar"), "jsonl": str(root / "data.jsonl"), "tar_bad": bad_records,
            "json_bad": json_bad, "root": root}


def make_cfg(datasets, **kw):
    cfg = pipeline.default_config()
    cfg.datasets = datasets
    cfg.global_batch_size = 8
    cfg.seq_buckets = (64,)
    cfg.n_query = 4
    cfg.gen_image_size = 32
    cfg.num_threads = 0
    cfg.update(kw)
    return cfg


def test_every_bad_case_is_skipped_counted_and_logged_once(bad_data, tok, caplog):
    cfg = make_cfg([{"name": "tars", "paths": bad_data["tar"], "task": "t2i", "weight": 2},
                    {"name": "lines", "paths": bad_data["jsonl"], "task": "t2i", "weight": 1}])
    p = pipeline.DataPipeline(cfg, tok, process_index=0, process_count=1)
    n_tar, n_json = len(p.sources[0]), len(p.sources[1])
    assert (n_tar, n_json) == (28, 10)
    bad = {0: bad_data["tar_bad"], 1: bad_data["json_bad"]}
    caplog.set_level(logging.WARNING, logger="blip3o_jax.data.pipeline")
    it = p.iterator()
    steps = 3 * (n_tar + n_json) // 8  # about two epochs of each source
    seen = set()
    for _ in range(steps):
        b = next(it)
        assert b["sample_valid"].all() and (b["gen_image"].reshape(8, -1).max(1) > 0).all()
        for d, r in zip(b["source_id"].tolist(), b["record_id"].tolist()):
            assert r not in bad[d], f"bad record {r} of source {d} was yielded"
            seen.add((d, r))
    metrics = it.metrics()
    expected_reasons = set(bad[0].values()) | set(bad[1].values())
    for reason in expected_reasons:
        assert metrics.get(f"data/bad/{reason}", 0) >= 1, (reason, metrics)
    assert metrics["data/bad_samples"] == sum(v for k, v in metrics.items() if k.startswith("data/bad/"))
    assert metrics["data/bad_samples"] >= len(bad[0]) + len(bad[1])
    # each bad record was met at least twice (two epochs) but logged once, with its shard and key
    messages = [r.getMessage() for r in caplog.records if "skipped bad sample" in r.getMessage()]
    assert len(messages) == len(set(messages)) == len(bad[0]) + len(bad[1])
    assert any("s-001.tar" in m and "key t3" in m and "truncated" in m for m in messages)
    assert any("key 001_zero_byte" in m and "empty_image" in m for m in messages)
    assert any("data.jsonl" in m and "key line 3" in m for m in messages)
    # replacement is deterministic: a fresh pipeline gives the same bytes and counts
    p2 = pipeline.DataPipeline(cfg, tok, process_index=0, process_count=1)
    it2 = p2.iterator()
    for step in range(steps):
        b2 = next(it2)
        assert b2["record_id"].tobytes() == p.batch(step)["record_id"].tobytes()
    assert it2.metrics() == metrics


def test_source_without_valid_sample_raises(tmp_path, tok):
    path = str(tmp_path / "all-bad.tar")
    synthetic.write_tar(path, [(f"k{i}", BAD[name][0]) for i, name in enumerate(["zero_byte", "latin1", "tiny"])])
    cfg = make_cfg([{"name": "hopeless", "paths": path, "task": "t2i"}])
    p = pipeline.DataPipeline(cfg, tok, process_index=0, process_count=1)
    with pytest.raises(sources.NoValidSampleError, match="dataset 'hopeless': none of its 3 samples is usable"):
        p.batch(0)
    cfg.num_threads = 2
    it = pipeline.DataPipeline(cfg, tok, process_index=0, process_count=1).iterator()
    with pytest.raises(sources.NoValidSampleError, match="hopeless"):
        next(it)
    it.close()


def test_large_source_gives_up_after_max_retries(tmp_path, tok):
    path = str(tmp_path / "many-bad.tar")
    synthetic.write_tar(path, [(f"k{i}", {"jpg": b"", "txt": "c"}) for i in range(50)])
    cfg = make_cfg([{"name": "junk", "paths": path, "task": "t2i"}], max_retries=5)
    p = pipeline.DataPipeline(cfg, tok, process_index=0, process_count=1)
    p.loader.scan_limit = 10  # pretend the source is too large to scan
    with pytest.raises(sources.NoValidSampleError, match="6 samples in a row were unusable"):
        p.batch(0)


def test_empty_dataset_is_an_error(tmp_path, tok):
    path = str(tmp_path / "empty.jsonl")
    open(path, "w").close()
    with pytest.raises(sources.NoValidSampleError, match="has no samples"):
        pipeline.DataPipeline(make_cfg([{"name": "e", "paths": path, "task": "t2i"}]), tok, process_index=0,
                              process_count=1)
