"""`gs://` outputs of `blip3o-precompute`, `blip3o-sample` and `convert_torch_weights.py`, through the path layer
(blip3o_jax/paths.py) with a local folder standing in for the bucket: its epath backend and the paths handed to
Orbax are redirected (conftest's `bucket` fixture, which tests/test_train_hardening.py uses for a training workdir).

Each test proves that every file lands in the bucket folder, that no local file API ever sees a `gs:` path (a guard
on open/os.* records any), that the working directory and the temporary directory stay empty (no local `gs:`
folder), and that the remote output is the same as the local one (same bytes, same pixels, same params).
"""
from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np
import pytest
from PIL import Image

from blip3o_jax import cli, pretrained, sample
from blip3o_jax import precompute as precompute_lib
from blip3o_jax import sample_formats as fmts
from blip3o_jax.data import synthetic, targets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import make_tiny_release  # noqa: E402

STEPS = ["--dit_steps", "4", "--decoder_steps", "4", "--batch", "2", "--devices", "1", "--progress=false"]
PROMPTS = ["a red circle", "a small green square"]
def _files(root) -> set[str]:
    return {os.path.relpath(os.path.join(r, n), root) for r, _, ns in os.walk(root) for n in ns}


def assert_nothing_local(state):
    assert state["local_calls"] == []
    assert os.listdir(state["cwd"]) == [] and os.listdir(state["tmp"]) == []


# ---------------------------------------------------------------------------------------------------------------
# blip3o-precompute


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory):
    from blip3o_jax.data.tokenizer import build_tiny_tokenizer

    d = tmp_path_factory.mktemp("remote_targets_data")
    synthetic.generate(str(d / "shards"), 8, samples_per_shard=4, image_size=64, max_objects=1, formats=("tar",))
    build_tiny_tokenizer(str(d / "tokenizer"))
    return str(d)


def eva_config(data_dir: str, targets_dir: str):
    c = cli.load_config(os.path.join(REPO, "configs", "tiny.py") + ":" + data_dir)
    c.model.target = "eva_clip"
    c.model.gen_encoder_kind = "eva_clip"
    c.model.gen_encoder = dict(image_size=56, patch_size=14, width=32, layers=1, head_width=16, mlp_ratio=2.0,
                               pool_stride=2)
    c.model.image_size = 56
    c.model.dit = dict(input_size=2, patch_size=1, in_channels=32, dim=64, n_layers=1, n_heads=4, n_kv_heads=4,
                       multiple_of=32, norm_eps=1e-5, qk_norm=True)
    c.model.backbone = dict(c.model.backbone.to_dict(), num_hidden_layers=1)
    c.data.datasets = [dict(c.data.datasets[0], targets_dir=targets_dir)]
    return c


def test_precompute_to_a_bucket(shards_dir, bucket, tmp_path):
    local_dir = str(tmp_path / "local_targets")
    local = precompute_lib.precompute(eva_config(shards_dir, local_dir), batch_size=4, log=print)
    before = _files(shards_dir)

    config = eva_config(shards_dir, "gs://bucket/targets")
    summary = precompute_lib.precompute(config, batch_size=4, log=print)
    assert summary["shards_done"] == 2 and summary["samples"] == 8
    remote = bucket["root"] / "targets"
    assert sorted(os.listdir(remote)) == sorted(os.listdir(local_dir)) == [
        "shapes-000000.targets.json", "shapes-000000.targets.tar", "shapes-000001.targets.json",
        "shapes-000001.targets.tar"]
    for name in os.listdir(local_dir):  # the same bytes as the local run (tar members carry no mtime)
        if name.endswith(targets.SUFFIX):
            assert (remote / name).read_bytes() == open(os.path.join(local_dir, name), "rb").read()
        else:
            assert json.loads((remote / name).read_text()) == json.load(open(os.path.join(local_dir, name)))
    assert summary["fingerprint_id"] == local["fingerprint_id"]

    # the resume scan reads the bucket: every shard is done, nothing is rewritten
    mtimes = {n: (remote / n).stat().st_mtime_ns for n in os.listdir(remote)}
    again = precompute_lib.precompute(config, batch_size=4, log=print)
    assert again["shards_skipped"] == 2 and again["shards_done"] == 0
    assert {n: (remote / n).stat().st_mtime_ns for n in os.listdir(remote)} == mtimes
    # training reads companions from local files: a bucket targets_dir is declined with the reason, not crashed on
    res = targets.check(config)
    assert not res.use and "gcsfuse" in res.reason

    assert_nothing_local(bucket)
    assert {f for f in _files(shards_dir) - before if not f.endswith(".idx")} == set()


def test_interrupted_remote_companion_is_not_complete(bucket):
    """The bucket has no rename: the tar goes straight to its final name, so the old metadata is removed first and
    an aborted write leaves neither a tar nor metadata claiming it."""
    shard = "/data/shapes-000000.tar"
    fp = {"x": 1}
    done = targets.CompanionWriter(shard, fp, shape=(2, 2, 4), targets_dir="gs://bucket/t", num_samples=1)
    done.add("k0", np.ones((2, 2, 4), np.float32))
    done.commit()
    fp_id = targets.fingerprint_id(fp)
    assert targets.is_complete(shard, fp_id, "gs://bucket/t")
    writer = targets.CompanionWriter(shard, fp, shape=(2, 2, 4), targets_dir="gs://bucket/t", num_samples=1)
    assert not targets.is_complete(shard, fp_id, "gs://bucket/t")  # the tar is being replaced
    writer.add("k0", np.zeros((2, 2, 4), np.float32))
    writer.abort()
    assert os.listdir(bucket["root"] / "t") == [] and not targets.is_complete(shard, fp_id, "gs://bucket/t")
    assert_nothing_local(bucket)


# ---------------------------------------------------------------------------------------------------------------
# blip3o-sample


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_tiny_release.make_tiny_release(str(tmp_path_factory.mktemp("remote_release") / "tiny"))


@pytest.fixture(scope="module")
def local_t2i(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("remote_t2i") / "local"
    args = ["t2i", "--model", release, "--out", str(out), *STEPS]
    sample.run(args + sum((["--prompt", p] for p in PROMPTS), []))
    return str(out)


def t2i(release, out):
    return sample.run(["t2i", "--model", release, "--out", out, *STEPS]
                      + sum((["--prompt", p] for p in PROMPTS), []))


def test_t2i_to_a_bucket_and_resume(release, local_t2i, bucket):
    before = _files(release)
    record = t2i(release, "gs://bucket/t2i")
    out = bucket["root"] / "t2i"
    assert record["complete"] and record["images_written"] == 2
    assert sorted(os.listdir(out)) == ["00000_00.png", "00001_00.png", "contact_sheet.png", "prompts.jsonl",
                                       "run.json"]
    for name in ("00000_00.png", "00001_00.png"):  # the same pixels as the local run
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)),
                                      np.asarray(Image.open(os.path.join(local_t2i, name))))
    assert (out / "prompts.jsonl").read_text() == open(os.path.join(local_t2i, "prompts.jsonl")).read()
    run = json.loads((out / "run.json").read_text())
    assert run["complete"] and run["images_written"] == 2

    # resume from the bucket's listing: one image deleted -> only it is generated, the other is not rewritten
    (out / "00001_00.png").unlink()
    kept = (out / "00000_00.png").stat().st_mtime_ns
    record = t2i(release, "gs://bucket/t2i")
    assert record["images_done_before"] == 1 and record["images_written"] == 1
    assert (out / "00000_00.png").stat().st_mtime_ns == kept
    np.testing.assert_array_equal(np.asarray(Image.open(out / "00001_00.png")),
                                  np.asarray(Image.open(os.path.join(local_t2i, "00001_00.png"))))
    record = t2i(release, "gs://bucket/t2i")
    assert record["images_done_before"] == 2 and record["images_written"] == 0

    assert_nothing_local(bucket)
    assert _files(release) == before


def test_benchmark_layouts_and_jsonl_on_a_bucket(bucket):
    """GenEval's folders, DPG's run.json beside its folder, and the i2t resume log (rewritten whole: an object
    store has no append), all in the bucket and scanned there."""
    items = [fmts.Item(0, "00000", "a cat", meta={"prompt": "a cat", "tag": "single_object"}),
             fmts.Item(1, "00001", "two dogs", meta={"prompt": "two dogs", "tag": "counting"})]
    layout = fmts.T2ILayout("geneval", "gs://bucket/geneval", 2)
    layout.prepare(items)
    image = np.full((4, 4, 3), 7, np.uint8)
    assert layout.write(items[0], {0: image}) == ["gs://bucket/geneval/00000/samples/0000.png"]
    assert layout.pending(items[0]) == [1] and layout.pending(items[1]) == [0, 1]
    root = bucket["root"] / "geneval"
    assert json.loads((root / "00001" / "metadata.jsonl").read_text()) == items[1].meta
    np.testing.assert_array_equal(np.asarray(Image.open(root / "00000" / "samples" / "0000.png")), image)
    assert fmts.T2ILayout("dpg", "gs://bucket/dpg/", 4).run_json == "gs://bucket/dpg.run.json"

    fmts.append_jsonl("gs://bucket/answers.jsonl", [{"index": 0, "prediction": "a\u2028b"}])
    fmts.append_jsonl("gs://bucket/answers.jsonl", [{"index": 1, "prediction": "c"}])
    assert [r["index"] for r in fmts.read_jsonl_rows("gs://bucket/answers.jsonl")] == [0, 1]
    assert fmts.read_jsonl_rows("gs://bucket/absent.jsonl") == []
    assert fmts.clean_partials("gs://bucket/geneval") == 0
    assert_nothing_local(bucket)


def test_training_workdir_on_a_bucket_is_read_there(bucket, tmp_path):
    """`--model gs://.../run` (a training workdir): recognised, its latest checkpoint found and fingerprinted in the
    bucket (the same fingerprint as a local copy of the same files)."""
    run = bucket["root"] / "run"
    for step in (2, 10):
        (run / "checkpoints" / str(step) / "state").mkdir(parents=True)
        (run / "checkpoints" / str(step) / "state" / "data.bin").write_bytes(bytes(range(step)) * 3)
        (run / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").write_text(json.dumps({"step": step}))
    (run / "checkpoints" / "10" / ".hidden").write_text("not part of the fingerprint")
    (run / "config.json").write_text(json.dumps({"model": {"target": "eva_clip"}, "data": {}}))
    assert sample.model_layout("gs://bucket/run") == "workdir"
    latest = sample._latest_checkpoint("gs://bucket/run")
    assert latest == "gs://bucket/run/checkpoints/10"
    remote_fp = sample.fingerprint(latest)
    assert remote_fp == sample.fingerprint(str(run / "checkpoints" / "10"))
    assert remote_fp != sample.fingerprint(str(run / "checkpoints" / "2"))
    with pytest.raises(cli.UserError, match="no diffusion-decoder"):  # read the run's config.json in the bucket
        sample._t2i_decoder_dir("gs://bucket/run", "sdxl", "workdir")
    assert_nothing_local(bucket)


# ---------------------------------------------------------------------------------------------------------------
# convert_torch_weights.py


@pytest.fixture(scope="module")
def qwen3_src():
    from qwen_reference import reference

    return reference("qwen3_untied")[3]  # built before `bucket` empties $TMPDIR (it lives in a temporary folder)


def test_converter_to_a_bucket_and_force(qwen3_src, bucket):
    import jax

    src = qwen3_src
    before = _files(src)
    assert pretrained.convert_checkpoint(src, "gs://bucket/qwen3", progress=False) == "qwen3"
    out = bucket["root"] / "qwen3"
    assert sorted(os.listdir(out)) == ["blip3o_jax.json", "config.json", "generation_config.json", "params"]
    assert json.loads((out / "blip3o_jax.json").read_text())["kind"] == "qwen3"
    assert pretrained.is_converted("gs://bucket/qwen3")
    _, params = pretrained.load_pretrained(str(out))
    _, expected = pretrained.load_pretrained(src)
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    assert_nothing_local(bucket)  # the checks below raise on purpose; the writes above were all remote

    # the --force rules hold on a bucket: no overwrite without it; an earlier output is replaced with it
    with pytest.raises(FileExistsError, match="--force"):
        pretrained.convert_checkpoint(src, "gs://bucket/qwen3", progress=False)
    pretrained.convert_checkpoint(src, "gs://bucket/qwen3", progress=False, force=True, dtype="bfloat16")
    assert json.loads((out / "blip3o_jax.json").read_text())["dtype"] == "bfloat16"
    assert sorted(os.listdir(out)) == ["blip3o_jax.json", "config.json", "generation_config.json", "params"]
    # a folder that is not ours is never replaced; an interrupted output of ours (its marker) is
    (bucket["root"] / "mine").mkdir()
    (bucket["root"] / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(pretrained.ConversionError, match="not an output of convert_torch_weights.py"):
        pretrained.convert_checkpoint(src, "gs://bucket/mine", progress=False, force=True)
    assert (bucket["root"] / "mine" / "notes.txt").read_text() == "keep me"
    (bucket["root"] / "cut" / "params").mkdir(parents=True)
    (bucket["root"] / "cut" / pretrained.INCOMPLETE_FILE).write_text("{}")
    assert not pretrained.is_converted("gs://bucket/cut")
    pretrained.convert_checkpoint(src, "gs://bucket/cut", progress=False, force=True)
    assert pretrained.is_converted("gs://bucket/cut")
    assert not (bucket["root"] / "cut" / pretrained.INCOMPLETE_FILE).exists()
    assert_nothing_local(bucket)
    assert _files(src) == before


# ---------------------------------------------------------------------------------------------------------------
# the workdir lock


def test_remote_workdir_lock_is_a_warning(bucket, caplog):
    from blip3o_jax.training import workdir as wd

    with caplog.at_level(logging.WARNING, logger="blip3o_jax.training.workdir"):
        with wd.WorkdirLock("gs://bucket/run") as lock:
            assert not lock.held
    lines = [r.getMessage() for r in caplog.records if "object store" in r.getMessage()]
    assert lines == ["--workdir gs://bucket/run is on an object store, which cannot hold a lock file: make sure no "
                     "other run uses it"]
    assert os.listdir(bucket["root"]) == []
    assert_nothing_local(bucket)
