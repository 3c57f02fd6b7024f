"""Export of a trained run to the release's PyTorch layout: tools/export_release.py on a tiny trained run, read back
by the converter with identical params, the same loss from the transformers + diffusers composition, a base
checkpoint's untrained tensors carried over, and Hub ids (offline message, path passthrough; no network)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip3o_jax import export, hub, pretrained
from blip3o_jax.convert.common import iter_safetensors, read_weight_map, write_safetensors
from conftest import loop_config  # noqa: E402  (tests/ is on sys.path under pytest)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """configs/tiny.py trained for 2 steps (conftest.LOOP_OVERRIDES' smaller model, EMA kept) on synthetic
    shards."""
    from blip3o_jax import sampling
    from blip3o_jax import train as train_lib
    from blip3o_jax.data import synthetic
    from blip3o_jax.data.tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("export")
    synthetic.generate(str(root / "data" / "shards"), 32, samples_per_shard=32, image_size=32, max_objects=1,
                       formats=("tar",))
    build_tiny_tokenizer(str(root / "data" / "tokenizer"))
    config = loop_config(str(root / "data"), {
        "train.total_steps": 2, "checkpoint.every": 2, "checkpoint.async_save": False, "log.every": 1,
        "log.progress_bar": False, "log.tensorboard": False, "train.ema_decay": 0.5})
    workdir = str(root / "run")
    train_lib.train(config, workdir)
    _, params, trained_config = sampling.load_trained(workdir)
    decoder = root / "decoder"  # a stand-in pixel decoder folder (copied as is)
    for sub in ("unet", "vae", "scheduler"):
        (decoder / sub).mkdir(parents=True)
        (decoder / sub / "config.json").write_text(json.dumps({"_class_name": sub}))
    return dict(root=root, workdir=workdir, params=jax.device_get(params), config=trained_config,
                decoder=str(decoder))


@pytest.fixture(scope="module")
def exported(run):
    """tools/export_release.py as a user runs it, with the weights split into several safetensors files."""
    out = str(run["root"] / "release")
    proc = subprocess.run(
        [sys.executable, f"{ROOT}/tools/export_release.py", "--workdir", run["workdir"], "--out", out,
         "--decoder", run["decoder"], "--max_shard_size", "200KB"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return dict(out=out, summary=summary)


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k2: v2 for k, v in tree.items() for k2, v2 in _flat(v, f"{prefix}{k}/").items()}
    return {prefix.rstrip("/"): np.asarray(tree)}


def assert_same_params(got, want):
    got, want = _flat(got), _flat(want)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert got[k].tobytes() == want[k].tobytes(), k


def test_release_layout(run, exported):
    out, summary = exported["out"], exported["summary"]
    files = sorted(os.listdir(out))
    weight_map = read_weight_map(os.path.join(out, "model.safetensors.index.json"))
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 1 and all(f in files for f in shards) and summary["step"] == 2
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    keys = set(weight_map)
    assert "model.latent_queries" in keys and "model.embed_tokens.weight" in keys
    assert any(k.startswith("model.dit.model.layers.0.attn2.") for k in keys)
    assert any(k.startswith("model.dit.model.caption_projection.") for k in keys)
    assert "tokenizer.json" in files and "tokenizer_config.json" in files
    with open(os.path.join(out, "config.json")) as f:
        hf = json.load(f)
    assert hf["architectures"] == ["blip3oQwenForCausalLM"] and hf["model_type"] == "blip3o_qwen"
    assert hf["n_query"] == 16 and hf["hidden_size"] == 64 and hf["backbone_kind"] == "qwen3"
    assert sorted(os.listdir(os.path.join(out, "diffusion-decoder"))) == ["scheduler", "unet", "vae"]
    assert not any(f.startswith(".release.tmp") for f in os.listdir(run["root"]))


def test_converter_reads_the_export_back_with_identical_params(run, exported, tmp_path):
    """convert_torch_weights.py's conversion (--kind blip3o, and without --kind through blip3o_jax.json) gives
    exactly the trained (EMA) params; load_pretrained builds the same model config."""
    for kind in ("blip3o", None):
        dst = str(tmp_path / f"converted_{kind}")
        assert pretrained.convert_checkpoint(exported["out"], dst, kind=kind, progress=False) == "blip3o"
        assert_same_params(pretrained.restore_params(dst), run["params"])
    from blip3o_jax.training import model_setup

    module, params = pretrained.load_pretrained(exported["out"], kind="blip3o")
    assert module.cfg == model_setup.model_config(run["config"])
    assert_same_params(jax.device_get(params), run["params"])


def test_pytorch_composition_gives_the_same_loss(run, exported):
    """The exported config.json and safetensors loaded into transformers' Qwen3 + diffusers' Lumina-Next DiT (as
    the original composes them) give our training loss on a real batch of the run's data."""
    import torch
    import transformers

    from blip3o_jax import sharding as shd
    from blip3o_jax.data import pipeline
    from blip3o_jax.diffusion import flow_matching
    from blip3o_jax.training import model_setup
    from blip3o_jax.training import step as step_lib
    from test_blip3o import TorchBlip3o

    config = run["config"]
    setup = step_lib.make_train_step(config, shd.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    ref = TorchBlip3o(setup.model_cfg)
    hf_config = transformers.Qwen3Config.from_pretrained(exported["out"])
    ref.lm = transformers.Qwen3ForCausalLM(hf_config)  # the architecture as the exported config.json describes it
    sd = {}
    for name in set(read_weight_map(os.path.join(exported["out"], "model.safetensors.index.json")).values()):
        sd.update(dict(iter_safetensors(os.path.join(exported["out"], name))))
    sd = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in sd.items()}
    cap = "model.dit.model.caption_projection."
    with torch.no_grad():
        ref.latent_queries.copy_(sd.pop("model.latent_queries"))
        ref.caption_projection.load_state_dict({k[len(cap):]: sd.pop(k) for k in list(sd) if k.startswith(cap)})
        missing, unexpected = ref.dit.load_state_dict(
            {k[len("model.dit.model."):]: sd.pop(k) for k in list(sd) if k.startswith("model.dit.model.")},
            strict=False)
        assert missing == ["pad_token"] and not unexpected  # diffusers' unused pad token, absent in the original
        missing, unexpected = ref.lm.load_state_dict(sd, strict=False)
        assert not unexpected and missing == (["lm_head.weight"] if hf_config.tie_word_embeddings else [])

    data = pipeline.DataPipeline(config.data, process_index=0, process_count=1)
    batch = {k: v for k, v in data.batch(0).items() if k != "gen_image" and not k.startswith("_")}
    images = data.batch(0)["gen_image"]
    targets = images.astype(np.float32) / 127.5 - 1.0  # target="pixels": Blip3o.targets
    rng = jax.random.key(11)
    aux = jax.jit(setup.loss_fn)(jax.tree.map(jnp.asarray, run["params"]), batch, targets, rng)
    ours = float(aux["gen_loss_sum"] / aux["gen_count"])
    flow_cfg = model_setup.flow_config(config)
    draws = flow_matching.draw(rng, targets.shape, targets.shape[0], flow_cfg)
    with torch.no_grad():
        want = float(ref.loss(batch, targets, draws))
    np.testing.assert_allclose(ours, want, rtol=2e-5)


def test_python_api_carries_base_tensors_and_casts(run, tmp_path):
    """export_release(params, config=...) with a base checkpoint: its config fields and the tensors the run does not
    hold (the Qwen2.5-VL ViT) come along; the run's own tensors win; dtype casts floating tensors."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"vision_config": {"depth": 2}, "hidden_size": 9999,
                                                  "image_token_id": 151655}))
    visual = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_safetensors({"visual.blocks.0.attn.qkv.weight": visual, "model.norm.weight": np.zeros(64, np.float32)},
                      str(base / "model.safetensors"))
    out = str(tmp_path / "bf16")
    summary = export.export_release(run["params"], out, config=run["config"], base=str(base), dtype="bfloat16")
    assert summary["carried_from_base"] == 1 and summary["weight_files"] == ["model.safetensors"]
    sd = dict(iter_safetensors(os.path.join(out, "model.safetensors")))
    np.testing.assert_array_equal(sd["visual.blocks.0.attn.qkv.weight"].astype(np.float32), visual)
    assert sd["model.norm.weight"].dtype.name == "bfloat16"
    np.testing.assert_array_equal(sd["model.norm.weight"].astype(np.float32),
                                  run["params"]["backbone"]["norm"]["scale"].astype(jnp.bfloat16).astype(np.float32))
    with open(os.path.join(out, "config.json")) as f:
        hf = json.load(f)
    assert hf["vision_config"] == {"depth": 2} and hf["image_token_id"] == 151655 and hf["hidden_size"] == 64
    assert hf["torch_dtype"] == "bfloat16"
    _, params = pretrained.load_pretrained(out)  # kind from blip3o_jax.json; visual.* skipped
    # the values are the bf16-rounded params (whatever dtype the loader computes in)
    f32 = lambda tree: jax.tree.map(lambda x: np.asarray(x).astype(np.float32), tree)  # noqa: E731
    want = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), run["params"])
    assert_same_params(f32(jax.device_get(params)), f32(want))
    with pytest.raises(FileExistsError, match="--force"):
        export.export_release(run["params"], out, config=run["config"])


def test_cli_user_errors_are_one_line(run, tmp_path):
    proc = subprocess.run([sys.executable, f"{ROOT}/tools/export_release.py", "--workdir", str(tmp_path / "none"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "not a training workdir" in proc.stderr


def test_hub_ids_offline_and_paths(tmp_path, monkeypatch):
    existing = str(tmp_path)
    assert hub.resolve_path(existing) == existing  # a path is returned as given, never looked up
    rel = os.path.relpath(existing)
    assert hub.resolve_path(rel) == rel
    assert hub.parse_repo_id("BLIP3o/BLIP3o-Model-8B/diffusion-decoder@main") == \
        ("BLIP3o/BLIP3o-Model-8B", "diffusion-decoder", "main")
    assert hub.parse_repo_id("/abs/path") is None and hub.parse_repo_id("a/b--c") is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubUnavailableError) as e:
        hub.resolve_path("BLIP3o/BLIP3o-Model-8B/diffusion-decoder", what="--decoder")
    msg = str(e.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download BLIP3o/BLIP3o-Model-8B --include 'diffusion-decoder/*'" in msg
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        hub.resolve_path(str(tmp_path / "missing" / "dir"))  # absolute: a path, not a repo id
    with pytest.raises(hub.HubUnavailableError, match="HF_HUB_OFFLINE"):  # and through the export API
        export.export_release({}, str(tmp_path / "x"), config={"model": {}}, base="BLIP3o/BLIP3o-Model-8B")


def test_every_checkpoint_argument_takes_a_hub_id_offline_with_one_line(monkeypatch, tmp_path):
    """Repo ids are resolved wherever a checkpoint directory is accepted; offline, one line says how to download."""
    import pytest

    from blip3o_jax import pretrained
    from blip3o_jax.hub import HubUnavailableError
    from blip3o_jax.pipelines import sana_decoder, sdxl_decoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for call in (lambda: pretrained.load_pretrained("BLIP3o/BLIP3o-Model-8B"),
                 lambda: pretrained.convert_checkpoint("BLIP3o/BLIP3o-Model-8B", str(tmp_path / "out")),
                 lambda: sdxl_decoder.load_sdxl_decoder("BLIP3o/BLIP3o-Model-8B/diffusion-decoder"),
                 lambda: sana_decoder.load_sana_decoder("BLIP3o/SigLIP2_SANA")):
        with pytest.raises(HubUnavailableError, match="download it first") as info:
            call()
        assert "\n" not in str(info.value)
    assert pretrained.local_path(str(tmp_path)) == str(tmp_path)  # local paths pass through untouched
