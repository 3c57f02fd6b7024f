"""Test set-up: 8 simulated CPU devices, CPU only, no Hub access. Must run before jax is imported.

`BLIP3O_TEST_PLATFORM=gpu` (opt-in, what tools/gpu_check.sh sets) runs the tests on the GPU instead: JAX_PLATFORMS
is kept (default `cuda`, so that a machine without a GPU fails instead of quietly testing the CPU) and no simulated
devices are made, so the tests that need 8 devices (the `sharded` ones) must be deselected by the caller."""
import os

TEST_PLATFORM = os.environ.get("BLIP3O_TEST_PLATFORM", "cpu")
if TEST_PLATFORM == "gpu":
    os.environ.setdefault("JAX_PLATFORMS", "cuda")
elif TEST_PLATFORM == "cpu":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ["JAX_PLATFORMS"] = "cpu"
else:
    raise ValueError(f"BLIP3O_TEST_PLATFORM={TEST_PLATFORM!r}: expected cpu (the default) or gpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA's persistent compilation cache, fresh for each test session: many tests compile the same programs (the train
# CLI run in-process again and again, the same tiny models in several files), and the cache turns those repeats
# into loads (about a quarter of the CPU time of the training tests). Set in the environment, so that CLI
# subprocesses share it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache_dir = tempfile.mkdtemp(prefix="blip3o_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

import jax  # noqa: E402

# Parity tests compare against fp32 PyTorch; XLA's default CPU matmul precision is already fp32, but make it
# explicit so a changed default cannot loosen the tests (on a GPU it matters: the default there is TF32).
jax.config.update("jax_default_matmul_precision", "highest")


# ---------------------------------------------------------------------------------------------------------------
# helpers shared by several test files (`from conftest import ...`: tests/ is on sys.path under pytest)

import numpy as np  # noqa: E402


def rel_err(got, want) -> float:
    """max|got - want| / max|want| in float64 (the parity tests' figure); the shapes must agree."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


# the tiny BLIP3-o of the model and train-step tests: batch, sequence length, latent queries
TINY_B, TINY_L, TINY_NQ = 4, 14, 4


def tiny_config(**model_overrides):
    """A training config of a tiny BLIP3-o: frozen 2-layer Qwen3-style backbone, 2-layer DiT over 4x4x8
    precomputed targets; `model_overrides` replace fields of `config.model`."""
    import ml_collections

    from blip3o_jax.data import pipeline as data_pipeline

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        backbone_kind="qwen3",
        backbone=dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, rope_theta=10000.0,
                      rms_norm_eps=1e-6),
        n_query=TINY_NQ, target="precomputed", image_size=16, loss="clip_fm", query_path="full",
        dit=dict(input_size=4, patch_size=1, in_channels=8, dim=32, n_layers=2, n_heads=2, n_kv_heads=2,
                 multiple_of=16),
    ))
    c.model.update(model_overrides)
    c.flow = ml_collections.ConfigDict(dict(cond_drop_prob=0.25))
    c.data = data_pipeline.default_config()
    c.data.datasets = [dict(name="x", paths="unused", task="t2i")]
    c.data.global_batch_size = TINY_B
    c.data.seq_buckets = (TINY_L,)
    c.data.n_query = TINY_NQ
    c.train = ml_collections.ConfigDict(dict(total_steps=10, lr=1e-3, min_lr=0.0, warmup_steps=2,
                                             freeze_backbone=True, text_loss_weight=0.0, grad_clip_norm=1.0))
    c.log = ml_collections.ConfigDict(dict(sigma_buckets=5))
    return c


def t2i_batch(rs, batch: int, n: int = 24, n_query: int = 16, task=None) -> dict:
    """A text-to-image batch of random prompts of n tokens ending in n_query query slots, with 4x4x8 targets."""
    return {"input_ids": rs.randint(3, 96, (batch, n)).astype(np.int32),
            "attention_mask": np.ones((batch, n), np.int32),
            "positions": np.tile(np.arange(n, dtype=np.int32), (batch, 1)),
            "query_index": np.tile(np.arange(n - n_query, n, dtype=np.int32), (batch, 1)),
            "task": np.zeros((batch,), np.int32) if task is None else np.asarray(task, np.int32),
            "sample_valid": np.ones((batch,), np.int32),
            "targets": rs.randn(batch, 4, 4, 8).astype(np.float32)}


# ---------------------------------------------------------------------------------------------------------------
# a local folder standing in for a bucket (tests of gs:// workdirs and outputs)

import builtins  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

_GUARDED = ((builtins, "open"), (os, "open"), (os, "makedirs"), (os, "mkdir"), (os, "replace"), (os, "rename"),
            (os, "remove"), (os, "listdir"), (os, "stat"), (os, "scandir"))


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """`gs://bucket` -> tmp_path/bucket; cwd and $TMPDIR are empty folders; `local_calls` lists every local file
    API call that was handed a `gs:` path (each one a file that would have landed on the local disk, or a read
    that would have missed the bucket)."""
    from etils import epath

    root = tmp_path / "bucket"
    root.mkdir()

    def to_bucket(p):
        return str(p).replace("gs://bucket", str(root))

    from blip3o_jax import paths

    monkeypatch.setattr(paths, "_epath", lambda p: epath.Path(to_bucket(p)))
    monkeypatch.setattr(paths, "storage_path", to_bucket)
    local_calls = []

    def guard(fn):
        def wrapped(path, *a, **k):
            if "gs:" in str(path):
                local_calls.append((fn.__name__, str(path)))
            return fn(path, *a, **k)
        return wrapped

    for mod, name in _GUARDED:
        monkeypatch.setattr(mod, name, guard(getattr(mod, name)))
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    state = {"root": root, "local_calls": local_calls, "cwd": cwd, "tmp": tmp}
    yield state
