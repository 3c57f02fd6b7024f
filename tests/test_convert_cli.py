"""`convert_torch_weights.py` and `load_pretrained`: good paths, atomic output, and one-line errors on bad input."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import blip3o_jax
from blip3o_jax import convert, pretrained
from blip3o_jax.convert.common import ConversionError, write_safetensors

from qwen_reference import reference, text_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device is enough for the CLI
    return subprocess.run([sys.executable, os.path.join(REPO, "convert_torch_weights.py"), "--noprogress", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def leftovers(parent):
    return [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]


@pytest.fixture(scope="module")
def qwen3():
    kind, cfg, model, directory = reference("qwen3_untied")
    return kind, cfg, model, directory


def logits_of(module, params, ids):
    return np.asarray(jax.jit(module.apply)({"params": params}, ids))


def torch_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()


def test_cli_converts_and_load_pretrained_reads_both_formats(qwen3, tmp_path):
    kind, cfg, model, directory = qwen3
    dst = tmp_path / "out"
    result = run_cli("--src", directory, "--dst", str(dst))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(dst)) == ["blip3o_jax.json", "config.json", "generation_config.json", "params"]
    meta = json.loads((dst / "blip3o_jax.json").read_text())
    assert meta["kind"] == "qwen3" and meta["dtype"] == "float32"
    assert not leftovers(tmp_path)

    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 7)).astype(np.int32)
    ref = torch_logits(model, ids)
    hf_module, hf_params = blip3o_jax.load_pretrained(directory)  # save_pretrained directory
    ours_module, ours_params = blip3o_jax.load_pretrained(str(dst))  # converted Orbax output
    assert hf_module.cfg == ours_module.cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, ours_params, hf_params)
    expected = convert.from_torch(kind, text_state_dict(directory), cfg)
    jax.tree.map(np.testing.assert_array_equal, ours_params, expected)
    out = logits_of(ours_module, ours_params, ids)
    assert np.max(np.abs(out - ref)) <= 1e-4 * np.max(np.abs(ref))

    # an existing destination is refused without --force and left exactly as it was
    before = {p: os.path.getmtime(os.path.join(dst, p)) for p in os.listdir(dst)}
    again = run_cli("--src", directory, "--dst", str(dst))
    assert again.returncode != 0
    assert again.stderr.strip().splitlines()[-1] == f"error: {dst} already exists; pass --force to overwrite it"
    assert {p: os.path.getmtime(os.path.join(dst, p)) for p in os.listdir(dst)} == before
    # --force replaces it (here with bf16 params)
    forced = run_cli("--src", directory, "--dst", str(dst), "--force", "--dtype", "bfloat16")
    assert forced.returncode == 0, forced.stderr
    assert not leftovers(tmp_path)
    module16, params16 = blip3o_jax.load_pretrained(str(dst))
    assert module16.cfg.param_dtype == "bfloat16" and module16.cfg.dtype == "float32"
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params16))
    out16 = logits_of(module16, params16, ids)
    assert np.max(np.abs(out16 - ref)) <= 2e-2 * np.max(np.abs(ref))


def test_text_model_out_of_a_full_qwen2_5_vl_checkpoint(tmp_path):
    kind, cfg, model, directory = reference("vl_tied")
    assert json.load(open(os.path.join(directory, "config.json")))["model_type"] == "qwen2_5_vl"
    dst = tmp_path / "vl_text"
    result = run_cli("--src", directory, "--dst", str(dst), "--kind", "qwen2_5_vl_text")
    assert result.returncode == 0, result.stderr
    module, params = blip3o_jax.load_pretrained(str(dst))  # kind recorded in blip3o_jax.json
    assert module.cfg == cfg
    module_hf, params_hf = pretrained.load_pretrained(directory, kind="qwen2_5_vl_text")
    jax.tree.map(np.testing.assert_array_equal, params, params_hf)


def test_sharded_safetensors_with_index(qwen3, tmp_path):
    kind, cfg, model, _ = qwen3
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
    module, params = blip3o_jax.load_pretrained(str(sharded))
    _, single = blip3o_jax.load_pretrained(reference("qwen3_untied")[3])
    jax.tree.map(np.testing.assert_array_equal, params, single)


# ------------------------------------------------------------------------------------------------------------
# bad input: one line naming the problem, non-zero exit, destination untouched, nothing left behind


def _copy_with(directory, dst_dir, tensors):
    os.makedirs(dst_dir)
    shutil.copy(os.path.join(directory, "config.json"), dst_dir)
    write_safetensors(tensors, os.path.join(dst_dir, "model.safetensors"))
    return str(dst_dir)


def _bad_sources(directory, root):
    sd = text_state_dict(directory)
    missing = dict(sd)
    del missing["model.layers.1.mlp.up_proj.weight"]
    extra = dict(sd, **{"model.layers.0.self_attn.rotary.inv_freq": np.ones(4, np.float32)})
    shape = dict(sd, **{"model.layers.2.self_attn.k_proj.weight": np.ones((24, 48), np.float32)})
    cases = {
        "nonexistent": (str(root / "does_not_exist"), "does_not_exist: no such file or directory"),
        "missing_key": (_copy_with(directory, root / "missing", missing),
                        "missing key 'model.layers.1.mlp.up_proj.weight'"),
        "extra_key": (_copy_with(directory, root / "extra", extra),
                      "unexpected key 'model.layers.0.self_attn.rotary.inv_freq'"),
        "wrong_shape": (_copy_with(directory, root / "shape", shape),
                        "key 'model.layers.2.self_attn.k_proj.weight' has shape (24, 48) but the config expects (48, 48)"),
    }
    truncated = root / "truncated"
    shutil.copytree(directory, truncated)
    path = truncated / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    cases["truncated"] = (str(truncated), "truncated safetensors file")
    pickled = root / "pickled"
    os.makedirs(pickled)
    shutil.copy(os.path.join(directory, "config.json"), pickled)
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pickled / "pytorch_model.bin")
    cases["pickle"] = (str(pickled), "refusing to unpickle a PyTorch file; convert it to safetensors or pass --allow-pickle")
    unknown = root / "unknown_type"
    shutil.copytree(directory, unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    cases["model_type"] = (str(unknown), "model_type 'llama' is not supported")
    return cases


@pytest.fixture(scope="module")
def bad_sources(qwen3, tmp_path_factory):
    return _bad_sources(qwen3[3], tmp_path_factory.mktemp("bad"))


CASES = ["nonexistent", "missing_key", "extra_key", "wrong_shape", "truncated", "pickle", "model_type"]


@pytest.mark.parametrize("case", CASES)
def test_cli_rejects_bad_input(bad_sources, case, tmp_path):
    src, message = bad_sources[case]
    dst = tmp_path / "out"
    result = run_cli("--src", src, "--dst", str(dst))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr
    assert "Traceback" not in result.stderr
    assert not dst.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("case", CASES)
def test_load_pretrained_rejects_bad_input(bad_sources, case):
    src, message = bad_sources[case]
    with pytest.raises(ConversionError) as info:
        blip3o_jax.load_pretrained(src)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_pickle_with_opt_in(bad_sources, qwen3, tmp_path):
    src, _ = bad_sources["pickle"]
    result = run_cli("--src", src, "--dst", str(tmp_path / "out"), "--allow-pickle")
    assert result.returncode == 0, result.stderr
    _, params = blip3o_jax.load_pretrained(str(tmp_path / "out"))
    _, expected = blip3o_jax.load_pretrained(src, allow_pickle=True)
    jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_failed_force_leaves_the_old_destination(bad_sources, qwen3, tmp_path):
    dst = tmp_path / "out"
    pretrained.convert_checkpoint(qwen3[3], str(dst), progress=False)
    before = sorted(os.listdir(dst))
    result = run_cli("--src", bad_sources["missing_key"][0], "--dst", str(dst), "--force")
    assert result.returncode != 0
    assert sorted(os.listdir(dst)) == before and not leftovers(tmp_path)
    blip3o_jax.load_pretrained(str(dst))  # still readable
