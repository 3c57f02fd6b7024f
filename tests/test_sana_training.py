"""The SigLIP2 -> SANA decoder's training recipe (`model.kind="sana_decoder"`, configs/siglip2_sana.py) at toy
scale (configs/tiny_siglip2_sana.py) through the train entry point on synthetic shards.

Checked: the flow-matching loss falls; only the connector and SANA are in the train state (params, AdamW moments)
and the frozen SigLIP and DC-AE weights the run trained against are bit for bit the ones it saved; the
black-image null condition hits ~10 % of the rows, drawn from the step's rng, and replaces exactly those rows'
SigLIP features; a rerun resumes from the last checkpoint; a bad value is one line before anything is written;
the full-size recipe's config builds (shapes only); the training workdir samples through the reconstruction path.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip3o_jax import cli
from blip3o_jax import sharding as shd
from blip3o_jax.data import synthetic
from blip3o_jax.training import checkpoint as ckpt_lib
from blip3o_jax.training import model_setup as ms_lib
from blip3o_jax.training import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_siglip2_sana.py")
FULL = os.path.join(ROOT, "configs", "siglip2_sana.py")
STEPS, EVERY, WINDOW = 60, 30, 20
BATCH = 8


def tiny_config(data_dir: str = "", **overrides):
    # a constant learning rate after the warm-up (the recipe's is cosine): the schedule then does not depend on
    # total_steps, so the resumed run below (STEPS + 10) reuses the first run's compiled step
    base = {"train.total_steps": STEPS, "checkpoint.every": EVERY, "log.every": 1, "log.progress_bar": False,
            "log.tensorboard": False, "data.global_batch_size": BATCH, "train.schedule": "constant"}
    return cli.load_config(f"{TINY}:{data_dir}", {**base, **overrides})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from blip3o_jax.data.tokenizer import build_tiny_tokenizer

    d = tmp_path_factory.mktemp("sana_data")
    synthetic.generate(str(d / "shards"), 64, samples_per_shard=32, image_size=32, max_objects=1, formats=("tar",))
    build_tiny_tokenizer(str(d / "tokenizer"))
    return str(d)


def read_losses(workdir: str) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {rec["step"]: rec["loss"] for rec in map(json.loads, f) if "loss" in rec}


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """One tiny training run through `train.train`, with the frozen params it was handed copied to the host."""
    from blip3o_jax import train as train_lib

    workdir = str(tmp_path_factory.mktemp("sana_run") / "run")
    seen = {}
    initial_state = train_lib.initial_state

    def spy(*args, **kwargs):
        state, frozen, start = initial_state(*args, **kwargs)
        seen["frozen"] = frozen
        seen["frozen_copy"] = jax.tree.map(np.array, frozen)
        return state, frozen, start

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_lib, "initial_state", spy)
        train_lib.train(tiny_config(data_dir), workdir)
    return {"workdir": workdir, **seen}


def test_loss_falls_through_the_train_entry_point(run):
    losses = read_losses(run["workdir"])
    assert sorted(losses) == list(range(1, STEPS + 1))
    first = np.mean([losses[s] for s in range(1, WINDOW + 1)])
    last = np.mean([losses[s] for s in range(STEPS - WINDOW + 1, STEPS + 1)])
    print(f"sana decoder: mean loss of steps 1-{WINDOW} {first:.4f}, of steps {STEPS - WINDOW + 1}-{STEPS} {last:.4f}")
    assert np.isfinite(last) and last < 0.7 * first, (first, last)


def _restore(workdir: str, config, step: int):
    from blip3o_jax.training import optimizer as opt_lib
    from blip3o_jax.training import state as state_lib

    ms = ms_lib.model_setup(config, shd.make_mesh(dict(config.mesh)))
    tx, _ = opt_lib.make_optimizer(config.train)
    abstract_state, _ = state_lib.layout(ms, tx, ema=False)
    checkpointer = ckpt_lib.Checkpointer(workdir, save_every=0)
    try:
        return ms, checkpointer.restore(step, abstract_state)
    finally:
        checkpointer.close()


def test_only_connector_and_sana_train(run, data_dir):
    config = tiny_config(data_dir)
    ms, state = _restore(run["workdir"], config, STEPS)
    assert ms.trainable_names == ("connector", "transformer")
    assert set(state.params) == {"connector", "transformer"}
    # AdamW's moments mirror the trainable params only: no SigLIP or DC-AE leaf in the optimizer state
    opt_shapes = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim)
    param_shapes = sorted(x.shape for x in jax.tree.leaves(state.params))
    assert opt_shapes == sorted(param_shapes * 2)
    _, early = _restore(run["workdir"], config, EVERY)
    assert int(state.step) == STEPS and int(early.step) == EVERY
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), state.params, early.params)
    assert any(jax.tree.leaves(moved["transformer"])) and any(jax.tree.leaves(moved["connector"]))
    # the frozen weights the step ran with: unchanged after STEPS steps (not donated, not updated), and saved as such
    frozen = run["frozen"]
    assert set(frozen) == {"encoder", "vae"}
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), run["frozen_copy"])
    saved = ckpt_lib.restore_params(os.path.join(run["workdir"], "frozen"), ms.abstract_frozen)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, saved), run["frozen_copy"])


def test_null_condition_rows(run, data_dir):
    # ~10 % of the rows, a pure function of (state rng, step): the same draw on a rerun or a resume
    rng = jax.random.key_data(jax.random.key(3))
    masks = jax.vmap(lambda k: step_lib.sana_null_mask(step_lib.sana_step_rngs(rng, k)[0], 16, 0.1))(
        jnp.arange(1000))
    rate = float(jnp.mean(masks))
    print(f"null condition: {rate:.4f} of 16000 rows")
    assert 0.09 <= rate <= 0.11
    again = step_lib.sana_null_mask(step_lib.sana_step_rngs(rng, 7)[0], 16, 0.1)
    np.testing.assert_array_equal(masks[7], again)
    assert not bool(jnp.all(masks == masks[0]))  # a fresh draw every step
    # the masked rows see the SigLIP features of an all-black image, the others their own image's
    config = tiny_config(data_dir)
    ms = ms_lib.model_setup(config, shd.make_mesh(dict(config.mesh)))
    frozen = ckpt_lib.restore_params(os.path.join(run["workdir"], "frozen"), ms.abstract_frozen)
    images = np.random.RandomState(0).randint(1, 256, (4, 32, 32, 3)).astype(np.uint8)
    null = jnp.asarray([True, False, True, False])
    got = np.asarray(jax.jit(ms.conditions)(frozen, jnp.asarray(images), null))
    black = np.asarray(jax.jit(ms.conditions)(frozen, jnp.zeros_like(images), jnp.zeros((4,), bool)))
    own = np.asarray(jax.jit(ms.conditions)(frozen, jnp.asarray(images), jnp.zeros((4,), bool)))
    np.testing.assert_array_equal(got[0::2], black[0::2])
    np.testing.assert_array_equal(got[1::2], own[1::2])
    assert np.abs(own[0] - black[0]).max() > 1e-3


def test_resume_continues_the_step_count(run, data_dir, capsys):
    from blip3o_jax import train as train_lib

    train_lib.train(tiny_config(data_dir, **{"train.total_steps": STEPS + 10}), run["workdir"])
    losses = read_losses(run["workdir"])
    assert sorted(losses) == list(range(1, STEPS + 11))  # STEPS + 1 .. STEPS + 10 appended, nothing redone
    assert f"training {STEPS + 10} steps from step {STEPS} " in capsys.readouterr().out
    checkpointer = ckpt_lib.Checkpointer(run["workdir"], save_every=0)
    try:
        assert checkpointer.latest_step() == STEPS + 10
    finally:
        checkpointer.close()


def test_bad_values_are_one_line(data_dir, tmp_path):
    from blip3o_jax import train as train_lib

    cases = {
        "flow.cond_drop_prob": (1.5, r"config\.flow\.cond_drop_prob=1\.5: the probability of the black-image null"),
        "model.image_size": (48, r"model\.encoder\.image_size=32 but model\.image_size=48"),
        "model.kind": ("sdxl", r"config\.model\.kind='sdxl'; expected one of"),
    }
    for key, (value, message) in cases.items():
        workdir = tmp_path / key
        with pytest.raises(cli.UserError, match=message) as info:
            train_lib.train(tiny_config(data_dir, **{key: value}), str(workdir))
        assert "\n" not in str(info.value)
        assert not workdir.exists()  # refused before anything is written


def test_full_size_recipe_builds():
    """configs/siglip2_sana.py: SigLIP2-so400m (26 layers run) -> connector -> SANA-1600M on 16x16x32 DC-AE f32c32
    latents of 512 px images; shapes only."""
    config = cli.load_config(FULL, None)
    ms = ms_lib.model_setup(config, shd.make_mesh({"data": -1}))
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    sizes = {g: count(ms.abstract_params[g]) for g in ms_lib.SANA_GROUPS}
    print("full-size parameter counts:", sizes)
    assert ms.model_cfg.latent_shape == (16, 16, 32)
    assert ms.trainable_names == ("connector", "transformer")
    assert sizes["connector"] == 7_969_536
    assert 1.5e9 < sizes["transformer"] < 1.7e9
    assert ms.model_cfg.encoder.output_layer == "penultimate" and ms.model_cfg.vae.scaling_factor == 0.41407


def test_workdir_samples_through_the_reconstruction_path(run):
    from blip3o_jax import sample as sample_lib
    from blip3o_jax.pipelines import sana_decoder

    assert sample_lib._is_sana_workdir(run["workdir"])
    decoder = sample_lib._load_sana_workdir(run["workdir"])
    assert decoder.image_size == 32 and decoder.default_latent_size == 8
    images = np.random.RandomState(1).randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    out = np.asarray(sana_decoder.reconstruct(decoder, images, steps=2))
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
