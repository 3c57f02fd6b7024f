"""User mistakes at the train CLI are one `error:` line and exit status 2, never a traceback."""
import os
import subprocess
import sys

import pytest

from blip3o_jax import cli, sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def test_train_without_config_is_one_line_and_exit_2(tmp_path):
    """The one subprocess smoke test of the train CLI (an AttributeError traceback with exit 1 before)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-m", "blip3o_jax.train", "--workdir", str(tmp_path / "w")],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --config is required, e.g. --config configs/tiny.py (see docs/training.md)"]


def test_unknown_override_names_the_valid_keys():
    argv = ["train", "--config", TINY, "--workdir", "w", "--config.mesh.dat=2"]
    assert cli._unknown_override(argv) == \
        "--config.mesh.dat=2: config.mesh has no key 'dat' (valid: data, fsdp, tensor)"
    assert cli._unknown_override(["train", f"--config={TINY}", "--config.train.lr=1e-3"]) is None


def test_unknown_mesh_axis_is_an_error_naming_the_valid_axes():
    # make_mesh ignored the unknown axis before
    with pytest.raises(ValueError, match=r"unknown mesh axis 'dat'; the valid axes are data, fsdp, tensor"):
        sharding.make_mesh({"dat": 2, "fsdp": -1})


def test_image_to_text_rows_with_a_siglip_tower_are_refused():
    """The Qwen3-SigLIP2 config used to train such rows without their images."""
    config = cli.load_config(os.path.join(ROOT, "configs", "qwen3_siglip2.py"))
    config.data.datasets = [dict(name="caps", paths="x/*.tar", task="i2t", weight=1.0)]
    config.data.global_batch_size = 8
    with pytest.raises(cli.UserError, match=r"\['caps'\] are image-to-text rows.*'siglip_vision'"):
        train.check_config(config)


def test_empty_datasets_hint_can_be_followed():
    """The hint used to say `--config.data.datasets=...`, which ml_collections' flags cannot take (a list)."""
    config = cli.load_config(os.path.join(ROOT, "configs", "blip3o_8b.py"))
    config.data.datasets = []
    with pytest.raises(cli.UserError, match=r"configs/blip3o_8b.py:'/data/shards/\*.tar'") as info:
        train.check_config(config)
    assert "--config.data.datasets=" not in str(info.value)
    followed = cli.load_config(os.path.join(ROOT, "configs", "blip3o_8b.py") + ":/data/shards/*.tar")
    assert followed.data.datasets and "/data/shards/*.tar" in str(followed.data.datasets[0]["paths"])
