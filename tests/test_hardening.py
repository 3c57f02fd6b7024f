"""Bad inputs against the converter, the weight loader and the data tools (issue 16's campaign): each is refused
with one line naming the file (and key or line), nothing is deleted, and valid data is never read through a stale
index."""
import json
import os
import shutil
import stat
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import blip3o_jax
from blip3o_jax import convert, pretrained
from blip3o_jax.convert.common import ConversionError, load_state_dict, read_safetensors_header, write_safetensors
from blip3o_jax.data import sources, synthetic, tar_index

from qwen_reference import reference, text_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_line(e) -> str:
    text = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in text, text
    return text


@pytest.fixture(scope="module")
def qwen3():
    kind, cfg, model, directory = reference("qwen3_untied")
    return kind, cfg, directory, text_state_dict(directory)


def hf_dir(path, config_src, tensors):
    """A HF-style directory: the reference config.json and one model.safetensors holding `tensors`."""
    os.makedirs(path)
    shutil.copy(os.path.join(config_src, "config.json"), path)
    write_safetensors(tensors, os.path.join(path, "model.safetensors"))
    return str(path)


def tree(path):
    return sorted(os.path.relpath(os.path.join(r, n), path) for r, ds, fs in os.walk(path) for n in ds + fs)


# ---------------------------------------------------------------------------------------------------------------
# convert_torch_weights.py / convert_checkpoint: destinations


@pytest.mark.parametrize("where", ["parent", "same", "inside"])
def test_force_never_replaces_a_destination_that_overlaps_the_source(qwen3, tmp_path, where):
    """--force with --dst the parent of --src used to delete the source weights and every unrelated file there."""
    parent = tmp_path / "models"
    src = parent / "qwen3"
    shutil.copytree(qwen3[2], src)
    (parent / "notes.txt").write_text("unrelated")
    (src / "sub").mkdir()
    dst = {"parent": parent, "same": src, "inside": src / "sub"}[where]
    before = tree(tmp_path)
    with pytest.raises(ConversionError) as e:
        pretrained.convert_checkpoint(str(src), str(dst), force=True, progress=False)
    assert f"--dst {dst}" in one_line(e) and ("source" in str(e.value))
    assert tree(tmp_path) == before
    # through a symlink to the parent as well
    link = tmp_path / "link"
    link.symlink_to(parent)
    with pytest.raises(ConversionError, match="contains the source"):
        pretrained.convert_checkpoint(str(src), str(link), force=True, progress=False)
    assert (parent / "notes.txt").read_text() == "unrelated" and (src / "model.safetensors").exists()


def test_force_replaces_only_an_earlier_output(qwen3, tmp_path):
    """A non-empty directory that is not our output (a home, a data folder) is refused even with --force."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "keep.bin").write_bytes(b"precious")
    with pytest.raises(ConversionError) as e:
        pretrained.convert_checkpoint(qwen3[2], str(data), force=True, progress=False)
    assert "is not an output of convert_torch_weights.py" in one_line(e)
    assert tree(data) == ["keep.bin"]


def test_converted_folder_respects_the_umask(qwen3, tmp_path):
    """mkdtemp's 0700 used to become the output folder's mode whatever the umask; and --force over an earlier
    output (the one replacement allowed) still works."""
    old = os.umask(0o002)
    try:
        dst = tmp_path / "out"
        pretrained.convert_checkpoint(qwen3[2], str(dst), progress=False)
        pretrained.convert_checkpoint(qwen3[2], str(dst), force=True, dtype="bfloat16", progress=False)
    finally:
        os.umask(old)
    modes = {p: stat.S_IMODE(os.stat(dst / p).st_mode) for p in ["."] + tree(dst) if (dst / p).is_dir()}
    assert modes and all(m == 0o775 for m in modes.values()), {p: oct(m) for p, m in modes.items()}
    assert stat.S_IMODE(os.stat(dst / pretrained.META_FILE).st_mode) == 0o664
    assert json.loads((dst / pretrained.META_FILE).read_text())["dtype"] == "bfloat16"
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n]


# ---------------------------------------------------------------------------------------------------------------
# malformed safetensors, pickles and configs


def raw_safetensors(path, header, data=b""):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)
    return str(path)


F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
HEADERS = {
    "list": ([1, 2, 3], 0, "a JSON list, not an object"),
    "string": ("weights", 0, "a JSON str, not an object"),
    "entry_not_object": ({"w": [0, 16]}, 16, "tensor 'w' is described by a JSON list"),
    "no_offsets": ({"w": {"dtype": "F32", "shape": [4]}}, 16, "tensor 'w' has no 'data_offsets'"),
    "bad_shape": ({"w": {**F32_4, "shape": [-4]}}, 16, "tensor 'w' has shape [-4]"),
    "negative_offset": ({"w": {**F32_4, "data_offsets": [-16, 0]}}, 16, "negative or reversed"),
    "reversed": ({"w": {**F32_4, "data_offsets": [16, 0]}}, 16, "negative or reversed"),
    "past_the_end": ({"w": {**F32_4, "data_offsets": [0, 1 << 40]}}, 16, "truncated safetensors file"),
    "size_mismatch": ({"w": {**F32_4, "data_offsets": [0, 12]}}, 16, "needs 16 bytes but its data_offsets span 12"),
    "overlap": ({"a": F32_4, "b": {**F32_4, "data_offsets": [8, 24]}}, 24, "tensors 'a' and 'b' overlap"),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_malformed_safetensors_header_is_one_error_naming_the_file(tmp_path, case):
    header, nbytes, message = HEADERS[case]
    path = raw_safetensors(tmp_path / "model.safetensors", header, b"\0" * nbytes)
    for read in (read_safetensors_header, load_state_dict):
        with pytest.raises(ConversionError) as e:
            read(path)
        assert one_line(e).startswith(path) and message in str(e.value), str(e.value)


def test_sharded_index_that_is_not_an_object_or_points_outside(qwen3, tmp_path):
    src = tmp_path / "sharded"
    shutil.copytree(qwen3[2], src)
    index = src / "model.safetensors.index.json"
    for content, message in [([1, 2], "no 'weight_map' object"),
                             ({"weight_map": {"x": "../../etc/passwd"}}, "not a file name in this directory")]:
        index.write_text(json.dumps(content))
        with pytest.raises(ConversionError) as e:
            blip3o_jax.load_pretrained(str(src))
        assert message in one_line(e) and str(index) in str(e.value)


def test_pickles_that_are_not_flat_tensor_dicts_are_refused_by_name(qwen3, tmp_path):
    """An HF Trainer folder's optimizer.pt (nested dicts, lists, floats) used to end in an AttributeError."""
    trainer = tmp_path / "checkpoint-500"
    trainer.mkdir()
    shutil.copy(os.path.join(qwen3[2], "config.json"), trainer)
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
                 "param_groups": [{"lr": 1e-4, "params": [0]}]}
    torch.save(optimizer, trainer / "optimizer.pt")
    with pytest.raises(ConversionError) as e:
        load_state_dict(str(trainer), allow_pickle=True)
    assert one_line(e).startswith(str(trainer / "optimizer.pt"))
    assert "not a flat state dict of tensors (entry 'state' is a dict)" in str(e.value)
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ConversionError, match=r"list\.pt: holds a list, not a state dict"):
        load_state_dict(str(tmp_path / "list.pt"), allow_pickle=True)
    # with the weights beside it, the trainer-state pickles are not read at all
    sd = qwen3[3]
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, trainer / "pytorch_model.bin")
    torch.save({"lr_lambdas": [None]}, trainer / "scheduler.pt")
    got = load_state_dict(str(trainer), allow_pickle=True)
    assert sorted(got) == sorted(sd) and all(np.array_equal(got[k], sd[k]) for k in sd)


def test_config_json_that_is_a_list_or_missing(qwen3, tmp_path):
    sd = qwen3[3]
    listed = hf_dir(tmp_path / "listed", qwen3[2], sd)
    (tmp_path / "listed" / "config.json").write_text("[1, 2]")
    for kind in (None, "qwen3"):
        with pytest.raises(ConversionError) as e:
            blip3o_jax.load_pretrained(listed, kind=kind)
        assert one_line(e) == f"{listed}/config.json: not a JSON object (a JSON list)"
    missing = hf_dir(tmp_path / "missing", qwen3[2], sd)
    os.remove(os.path.join(missing, "config.json"))
    with pytest.raises(ConversionError) as e:  # with the kind given it was "not a valid qwen3 config (KeyError)"
        blip3o_jax.load_pretrained(missing, kind="qwen3")
    assert one_line(e).startswith(f"{missing}/config.json: missing")
    with pytest.raises(ConversionError, match="config.json: missing, so the model kind is unknown; pass --kind"):
        blip3o_jax.load_pretrained(missing)


# ---------------------------------------------------------------------------------------------------------------
# weight values: integer/bool where the model is float, NaN/Inf


@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
def test_integer_or_bool_weights_are_refused_naming_the_key(qwen3, tmp_path, dtype):
    """Stored as such they used to be accepted without a word (a quantized or damaged checkpoint)."""
    key = "model.layers.1.mlp.up_proj.weight"
    sd = dict(qwen3[3], **{key: (qwen3[3][key] * 100).astype(dtype)})
    src = hf_dir(tmp_path / "ints", qwen3[2], sd)
    with pytest.raises(ConversionError) as e:
        blip3o_jax.load_pretrained(src)
    assert f"tensor {key!r} is stored as {np.dtype(dtype)}" in one_line(e) and "refused, not cast" in str(e.value)
    with pytest.raises(ConversionError, match=key):
        pretrained.convert_checkpoint(src, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_converted_output_holding_integer_params_is_refused(qwen3, tmp_path):
    """An older converter stored integer weights as such, with blip3o_jax.json saying float32."""
    import orbax.checkpoint as ocp

    dst = tmp_path / "out"
    pretrained.convert_checkpoint(qwen3[2], str(dst), progress=False)
    params = pretrained.restore_params(str(dst))
    params["embed_tokens"]["embedding"] = np.asarray(params["embed_tokens"]["embedding"] * 100).astype(np.int32)
    shutil.rmtree(dst / pretrained.PARAMS_DIR)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(str(dst / pretrained.PARAMS_DIR), params)
    with pytest.raises(ConversionError) as e:
        blip3o_jax.load_pretrained(str(dst))
    assert one_line(e) == f"{dst}/params: param 'embed_tokens/embedding' is stored as int32, not a floating-point type"


def test_integer_buffers_the_converter_drops_are_still_accepted():
    """`embeddings.position_ids` (int64) sits in older SigLIP checkpoints and is ignored by the converter."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from blip3o_jax import models

    hf_cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=8)
    torch.manual_seed(0)
    sd = {k: v.numpy() for k, v in SiglipVisionModel(hf_cfg).state_dict().items()}
    cfg = models.config_from_hf("siglip_vision", hf_cfg.to_dict())
    with_buffer = dict(sd, **{"embeddings.position_ids": np.arange(4, dtype=np.int64)[None]})
    got = pretrained._from_torch("siglip_vision", with_buffer, cfg, "siglip")
    want = convert.from_torch("siglip_vision", sd, cfg)
    assert jax_tree_equal(got, want)
    needed = "embeddings.patch_embedding.bias"
    with pytest.raises(ConversionError, match=f"tensor {needed!r} is stored as int64"):
        pretrained._from_torch("siglip_vision", dict(with_buffer, **{needed: sd[needed].astype(np.int64)}), cfg, "s")


def jax_tree_equal(a, b):
    import jax

    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def test_nonfinite_weights_are_refused_unless_allowed(qwen3, tmp_path):
    key = "model.layers.0.self_attn.q_proj.weight"
    bad = qwen3[3][key].copy()
    bad[0, :3] = [np.nan, np.inf, -np.inf]
    src = hf_dir(tmp_path / "nan", qwen3[2], dict(qwen3[3], **{key: bad}))
    with pytest.raises(ConversionError) as e:
        blip3o_jax.load_pretrained(src)
    assert one_line(e) == (f"{src}/model.safetensors: tensor {key!r} holds 3 NaN/Inf values; pass "
                           "--allow_nonfinite to convert it anyway")
    with pytest.raises(ConversionError, match="NaN/Inf"):
        pretrained.convert_checkpoint(src, str(tmp_path / "out"), progress=False)
    with pytest.warns(UserWarning, match=f"{key}.*holds 3 NaN/Inf values"):
        _, params = blip3o_jax.load_pretrained(src, allow_nonfinite=True)
    import jax

    assert sum(int(np.sum(~np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(params)) == 3


def test_init_from_an_unconverted_folder_says_to_convert_first(qwen3):
    """restore_params (what `init_from` calls) on a HF folder used to fail inside Orbax with 'params not found'."""
    with pytest.raises(ConversionError) as e:
        pretrained.restore_params(qwen3[2])
    assert "run convert_torch_weights.py --src" in one_line(e) and "(it is a PyTorch/HF checkpoint)" in str(e.value)


def test_convert_cli_help_and_flag_errors():
    """The one subprocess smoke test of convert_torch_weights.py: `--help`/`-h` exit 0 (absl: 1 and 'unknown flag
    h'), a bad flag is one `error:` line with exit 2."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)

    def cli(*args):
        return subprocess.run([sys.executable, os.path.join(REPO, "convert_torch_weights.py"), *args],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=120)

    for flag in ("--help", "-h"):
        shown = cli(flag)
        assert shown.returncode == 0, shown.stderr
        assert "--[no]allow_nonfinite" in shown.stdout and "--src" in shown.stdout
    bad = cli("--src", "x", "--dst", "y", "--allow-nonfinite", "--frobnicate")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: Unknown command line flag 'frobnicate'"]


# ---------------------------------------------------------------------------------------------------------------
# data: synthetic shards, shards that are not tars, index caches, JSON data sets


@pytest.mark.parametrize("args, message", [
    (["--num-samples", "-5"], "error: --num-samples must be at least 1, got -5"),
    (["--num-samples", "0"], "error: --num-samples must be at least 1, got 0"),
    (["--samples-per-shard", "0"], "error: --samples-per-shard must be at least 1, got 0"),
    (["--max-objects", "0"], "error: --max-objects must be between 1 and 9, got 0"),
])
def test_make_synthetic_shards_rejects_counts_that_make_no_data_set(tmp_path, capsys, args, message):
    """`--num-samples -5` used to exit 0 having written an empty data set."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        synthetic.main(["--out", str(out), *args])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]
    assert not out.exists()
    with pytest.raises(ValueError, match="at least 1"):
        synthetic.generate(str(out), 0)


@pytest.mark.parametrize("junk", [b"hello world\n", b"not a tar " * 300])
def test_a_non_tar_file_among_the_shards_is_named(tmp_path, junk):
    """A short text file named *.tar used to be a warning and an empty shard; a longer one an error without a
    file name, among possibly thousands of shards."""
    synthetic.write_tar(str(tmp_path / "a-000.tar"), [("k0", {"jpg": b"\xff" * 10, "txt": "c"})])
    bad = tmp_path / "a-001.tar"
    bad.write_bytes(junk)
    with pytest.raises(sources.DatasetError) as e:
        sources.TarShardSource(str(tmp_path / "a-*.tar"), name="shapes")
    assert one_line(e).startswith(f"dataset 'shapes': {bad}: not a tar file")
    with pytest.raises(sources.DatasetError, match="a-001.tar: not a tar file"):
        sources.make_source({"name": "shapes", "paths": str(tmp_path / "a-*.tar")})


def samples(sizes, key_prefix="k"):
    return [(f"{key_prefix}{i}", {"jpg": bytes([i + 1]) * n, "txt": f"caption {i}"}) for i, n in enumerate(sizes)]


def test_a_truncated_or_garbled_index_cache_is_rebuilt(tmp_path):
    shard = str(tmp_path / "s.tar")
    synthetic.write_tar(shard, samples([3000] * 20))
    want = list(tar_index.build_index(shard).members())
    idx = shard + ".idx"
    for damage in ("truncate", "garble"):
        tar_index.get_index(shard)
        data = open(idx, "rb").read()
        with open(idx, "wb") as f:
            f.write(data[: len(data) // 2] if damage == "truncate" else data[:8] + b"\xff" * 40 + data[48:])
        tar_index.STATS.update(built=0, reused=0)
        assert list(tar_index.get_index(shard).members()) == want, damage  # was a memmap ValueError
        assert tar_index.STATS == {"built": 1, "reused": 0}
    assert stat.S_IMODE(os.stat(idx).st_mode) == 0o666 & ~_umask()  # was 0600 (mkstemp)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_keeping_size_and_mtime(shard, new_samples):
    st = os.stat(shard)
    tmp = shard + ".new"
    synthetic.write_tar(tmp, new_samples)
    assert os.path.getsize(tmp) == st.st_size
    os.replace(tmp, shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(shard).st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("where", ["head", "middle"])
def test_a_shard_replaced_with_same_size_and_mtime_is_not_read_through_its_stale_index(tmp_path, where):
    """The index was keyed on (size, mtime): other samples of the same padded sizes were read at the old offsets.
    'middle': the first and last 64 KiB are identical, only the members between them moved."""
    shard = str(tmp_path / "s.tar")
    big = 80 * 1024
    if where == "head":
        old, new = samples([700, 1000]), samples([1000, 700])
    else:
        old, new = samples([big, 1000, 3000, big]), samples([big, 3000, 1000, big])
    synthetic.write_tar(shard, old)
    source = sources.TarShardSource(shard)
    assert [len(source[i].image) for i in range(len(source))] == [len(f["jpg"]) for _, f in old]
    _replace_keeping_size_and_mtime(shard, new)
    fresh = sources.TarShardSource(shard)
    for i, (key, fields) in enumerate(new):
        assert fresh[i].key == key and fresh[i].image == fields["jpg"] and fresh[i].text == fields["txt"].encode()


def test_a_copied_shard_keeps_its_index(tmp_path):
    """Keyed on content, a data set copied without its timestamps (cp, gsutil) reuses its indices."""
    shard = str(tmp_path / "s.tar")
    synthetic.write_tar(shard, samples([500] * 5))
    tar_index.get_index(shard)
    os.utime(shard, ns=(10**18, 10**18))
    tar_index.STATS.update(built=0, reused=0)
    assert len(tar_index.get_index(shard)) == 5 and tar_index.STATS == {"built": 0, "reused": 1}


def test_an_invalid_json_data_set_is_one_line_naming_file_and_line(tmp_path):
    bad = tmp_path / "records.json"
    bad.write_text('[\n  {"image": "a.jpg", "caption": "x"},\n  {"image": "b.jpg" "caption": "y"}\n]\n')
    with pytest.raises(sources.DatasetError) as e:  # a plain ValueError before, which the CLIs did not map
        sources.JsonSource(str(bad), name="caps")
    assert one_line(e) == f"dataset 'caps': {bad}: not valid JSON (Expecting ',' delimiter at line 3, column 21)"
    bad.write_bytes(b'[\n{"caption": "\xff"}]')
    with pytest.raises(sources.DatasetError, match=r"records.json: not UTF-8 text \(line 2\)"):
        sources.JsonSource(str(bad), name="caps")
    bad.write_text('"just a string"')
    with pytest.raises(sources.DatasetError, match="must hold a list of records"):
        sources.make_source({"name": "caps", "paths": str(bad)})
    with pytest.raises(sources.DatasetError, match="'paths' must be a glob"):
        sources.make_source({"name": "caps"})


def test_init_from_converts_between_stacked_and_unrolled_layers(tmp_path):
    """A converted Qwen3 with stacked (scanned) layers initialises a config with unrolled ones and back: the same
    numbers. It was refused with a long Orbax dump before."""
    import dataclasses
    import json

    import flax
    import jax

    from blip3o_jax import convert, models, pretrained
    from blip3o_jax.convert.common import write_safetensors
    from blip3o_jax.models import qwen as qwen_lib
    from blip3o_jax.models import registry

    base = qwen_lib.QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, qk_norm=True,
                               attention_bias=False, tie_word_embeddings=False)
    scanned, unrolled = (dataclasses.replace(base, scan_layers=s) for s in (True, False))
    args, kwargs, method = registry.get("qwen3").init_args(scanned)
    params = flax.linen.unbox(models.build("qwen3", scanned).init(jax.random.PRNGKey(0), *args)["params"])
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**qwen_lib.config_to_hf("qwen3", scanned), "scan_layers": True}))
    write_safetensors(convert.to_torch("qwen3", params, scanned), str(src / "model.safetensors"))
    pretrained.convert_checkpoint(str(src), str(tmp_path / "dst"), progress=False)
    stored = pretrained.restore_params(str(tmp_path / "dst"))
    assert "layers" in stored  # the converter kept the stacked layout

    want = jax.eval_shape(lambda: flax.linen.unbox(models.build("qwen3", unrolled).init(
        jax.random.PRNGKey(0), *registry.get("qwen3").init_args(unrolled)[0])["params"]))
    assert "layers_2" in want and "layers" not in want
    got = pretrained.restore_params_as(str(tmp_path / "dst"), want)
    for i in range(3):
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda x: x[i], params["layers"]), got[f"layers_{i}"])
    back = pretrained.relayout(jax.tree.map(np.asarray, got), stored)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, stored))
    wrong = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[:-1] + (s.shape[-1] + 1,), s.dtype), want)
    with pytest.raises(pretrained.ConversionError, match="has shape"):
        pretrained.restore_params_as(str(tmp_path / "dst"), wrong)
