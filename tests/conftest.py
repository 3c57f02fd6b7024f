"""Test set-up: 8 simulated CPU devices, CPU only, no Hub access. Must run before jax is imported.

`BLIP3O_TEST_PLATFORM=gpu` (opt-in, what tools/gpu_check.sh sets) runs the tests on the GPU instead: JAX_PLATFORMS
is kept (default `cuda`, so that a machine without a GPU fails instead of quietly testing the CPU) and no simulated
devices are made, so the tests that need 8 devices (the `sharded` ones) must be deselected by the caller."""
import os

TEST_PLATFORM = os.environ.get("BLIP3O_TEST_PLATFORM", "cpu")
CPU_TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_PLATFORM == "gpu":
    os.environ.setdefault("JAX_PLATFORMS", "cuda")
elif TEST_PLATFORM == "cpu":
    # XLA:CPU's LLVM backend at optimisation level 0 (CPU_TEST_XLA_FLAGS): the suite is bound by compiles, of tiny
    # programs that mostly run a few times, and -O0 halves many of them (the tiny SANA training run's init program:
    # 21 -> 11 s). Every test passes at the same tolerances (no fast-math at either level; the bitwise tests compare
    # runs under the same flags). The CLIs and subprocesses the tests start inherit XLA_FLAGS; outside the tests
    # (a user's runs, the benchmarks) XLA compiles at its default level.
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 " + CPU_TEST_XLA_FLAGS)
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
# the compiled CPU kernels (blip3o_jax/kernels) are built once per test session into a fresh directory, so that the
# suite always exercises the build, never a library a user's earlier runs left in ~/.cache
if "BLIP3O_KERNEL_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _kernel_dir = tempfile.mkdtemp(prefix="blip3o_jax_test_kernels_")
    os.environ["BLIP3O_KERNEL_CACHE"] = _kernel_dir
    atexit.register(shutil.rmtree, _kernel_dir, ignore_errors=True)

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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/tiny.py made smaller still for the tests of the train loop (checkpoints, resume, signals, logging, remote
# workdirs), which train a few steps through `train.train` on the 8 devices: one backbone and one DiT layer, batch
# 8, and a learning-rate schedule that does not depend on total_steps. Runs of different lengths then compile the
# same programs (init, train step, sampler), which XLA's compilation cache (above) compiles once per session: keep
# these fields as they are in every such test (a changed lr, batch or layer count is a new program).
LOOP_OVERRIDES = {"model.backbone.num_hidden_layers": 1, "model.dit.n_layers": 1, "data.global_batch_size": 8,
                  "train.schedule": "constant", "train.warmup_steps": 1}


def loop_config(data_dir: str, overrides: dict | None = None):
    """configs/tiny.py on the shards and tokenizer under `data_dir`, with LOOP_OVERRIDES then `overrides`."""
    from blip3o_jax import cli

    return cli.load_config(f"{ROOT}/configs/tiny.py:{data_dir}", {**LOOP_OVERRIDES, **(overrides or {})})


def t2i_batch(rs, batch: int, n: int = 24, n_query: int = 16, task=None) -> dict:
    """A text-to-image batch of random prompts of n tokens ending in n_query query slots, with 4x4x8 targets."""
    return {"input_ids": rs.randint(3, 96, (batch, n)).astype(np.int32),
            "attention_mask": np.ones((batch, n), np.int32),
            "positions": np.tile(np.arange(n, dtype=np.int32), (batch, 1)),
            "query_index": np.tile(np.arange(n - n_query, n, dtype=np.int32), (batch, 1)),
            "task": np.zeros((batch,), np.int32) if task is None else np.asarray(task, np.int32),
            "sample_valid": np.ones((batch,), np.int32),
            "targets": rs.randn(batch, 4, 4, 8).astype(np.float32)}


def tensorboard_image_events(tb_dir: str) -> list[tuple[int, str, int, int]]:
    """(step, tag, width, height) of every image summary in the TensorBoard event files under `tb_dir`, sorted."""
    import glob
    import struct

    from tensorboardX.proto import event_pb2

    found = []
    for path in glob.glob(os.path.join(tb_dir, "events.out.tfevents.*")):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):  # TFRecord framing: length, crc, payload, crc
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("image"):
                    found.append((event.step, v.tag, v.image.width, v.image.height))
    return sorted(found)


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


# ---------------------------------------------------------------------------------------------------------------
# scheduling over pytest-xdist workers (`make test`: -n 2 --dist loadfile --no-loadscope-reorder)
#
# Files are the units (a file's module fixtures are built once), except that the files of a shared group form one
# unit: they run the same programs, so on one worker one after the other they compile those programs once (the
# compilation cache above; on two workers at once both would compile them). Units are handed out slowest first
# (xdist's default order is by test count): the run then ends on small files instead of one worker finishing a long
# file alone. The seconds are one file run alone on 2 busy cores; the order only has to be roughly right (a file not
# listed runs after these, in collection order).

_SHARED_GROUPS = {
    # the train-loop tests on LOOP_OVERRIDES: one init, train step and sampler compile between them
    "test_train_hardening.py": "tiny_train_loop", "test_train_clu.py": "tiny_train_loop",
    "test_tfds.py": "tiny_train_loop", "test_demo.py": "tiny_train_loop",
    # t2i of tools/make_tiny_release.py's release on one device: programs in common
    "test_sample.py": "tiny_release_t2i", "test_remote_paths.py": "tiny_release_t2i"}
_SLOWEST_FIRST = (  # ~seconds: 125-80
    "tiny_release_t2i", "test_multihost.py", "test_train_resume.py", "test_vae_targets.py", "test_train.py",
    "test_sana_training.py", "tiny_train_loop",
    # 60-40
    "test_prefix_cache.py", "test_precomputed_targets.py", "test_aot.py", "test_dit.py", "test_unet.py",
    "test_qwen.py", "test_autoencoder_dc.py", "test_flow_matching.py", "test_sana.py", "test_qwen2_5_vl.py",
    "test_bench_decoder.py", "test_qwen2_5_vl_vision.py", "test_blip3o.py", "test_export.py",
    # 40-15
    "test_pallas_attention.py", "test_registry.py", "test_convert_cli.py", "test_sdxl_decoder.py",
    "test_bench_sample.py", "test_generation.py", "test_sana_decoder.py", "test_autoencoder_kl.py",
    "test_aot_sample.py", "test_hardening.py", "test_gpu_check.py", "test_siglip.py",
)


def _unit(file_name: str) -> str:
    return _SHARED_GROUPS.get(file_name, file_name)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(_unit(item.path.name), len(rank)))  # stable: a file's tests keep their order


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile with the shared groups as units. (Not --dist loadgroup with xdist_group marks: pytest-xdist
    3.8 renames the node ids of grouped tests through a private attribute that pytest 9 no longer reads, so the
    marks are ignored and every test becomes its own unit.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            group = _SHARED_GROUPS.get(os.path.basename(path))
            return group or path

    return Scheduling(config, log)
