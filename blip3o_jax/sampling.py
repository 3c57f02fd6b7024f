"""Text-to-image sampling with a trained BLIP3-o: prompts -> query states -> DiT flow-matching sampler -> target grid.

    model, params, config = load_trained(workdir)           # a training run's workdir (latest checkpoint)
    sampler = Sampler(model, config, tokenizer)
    grids = sampler(params, ["a red circle", ...], rng)    # (B, g, g, C)
    images = sampler.to_images(grids)                      # uint8 (B, S, S, 3) for pixel targets

Prompts are built by `data.prompts.t2i_prompt_ids`, the same function the training data uses, in the same format
(`config.data.prompt_format`), so the model sees at inference what it was trained on.
The sampler is Euler + classifier-free guidance with zero null conditioning.
For EVA-CLIP targets the result is the 8x8x1792 feature grid; turning it into pixels needs the release's separate
SDXL-UNet decoder, not part of this package.
"""
from __future__ import annotations

import json
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blip3o_jax.models import blip3o as blip3o_lib


def prompt_batch(tokenizer, captions: Sequence[str], data_cfg, n_query: int) -> dict[str, np.ndarray]:
    """Right-padded text-to-image inputs for `captions`, laid out exactly as the training batches."""
    from blip3o_jax.data import prompts

    names = prompts.TokenNames.from_config(data_cfg.get("tokens"))
    system = data_cfg.get("system_prompt", prompts.SYSTEM_PROMPT)
    fmt = data_cfg.get("prompt_format", "train")
    buckets = sorted(int(n) for n in data_cfg.seq_buckets)
    rows = [prompts.t2i_prompt_ids(tokenizer, c, n_query, max_length=buckets[-1], prompt_format=fmt, names=names,
                                   system_prompt=system) for c in captions]
    longest = max(len(r) for r in rows)
    length = next(n for n in buckets if n >= longest)
    pad = prompts.special_ids(tokenizer, names).pad
    B = len(rows)
    input_ids = np.full((B, length), pad, np.int32)
    attention_mask = np.zeros((B, length), np.int32)
    positions = np.zeros((B, length), np.int32)
    query_index = np.zeros((B, n_query), np.int32)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        attention_mask[i, : len(r)] = 1
        positions[i, : len(r)] = np.arange(len(r))
        query_index[i] = len(r) - n_query + np.arange(n_query)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "positions": positions,
            "query_index": query_index}


class Sampler:
    """Jitted prompt -> grid sampling for one model; compiled once per (batch, bucket) shape."""

    def __init__(self, model: blip3o_lib.Blip3o, config, tokenizer, *, num_steps: int | None = None,
                 guidance_scale: float | None = None):
        from blip3o_jax.diffusion import flow_matching

        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.mcfg = model.cfg
        self.flow_cfg = flow_matching.FlowMatchingConfig(**dict(config.get("flow", {})))
        self.num_steps = num_steps or self.flow_cfg.num_inference_steps
        self.guidance_scale = self.flow_cfg.guidance_scale if guidance_scale is None else float(guidance_scale)
        self._fn = jax.jit(self._sample)

    def _sample(self, params, batch, rng):
        from blip3o_jax.diffusion import flow_matching

        model, mcfg = self.model, self.mcfg
        B = batch["input_ids"].shape[0]
        cond, _ = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["positions"],
                              batch["query_index"], jnp.ones((B,), bool), method=blip3o_lib.Blip3o.encode)
        if mcfg.loss == "clip_mse":
            return model.apply({"params": params}, cond, method=blip3o_lib.Blip3o.mse_prediction)

        def velocity(dit_params, x_t, t, c, cond_mask=None):
            return model.apply({"params": {**params, "dit": dit_params}}, x_t, t, c, cond_mask,
                               method=blip3o_lib.Blip3o.velocity)

        return flow_matching.sample(velocity, params["dit"], cond, rng, (B, *mcfg.target_shape), self.flow_cfg,
                                    num_steps=self.num_steps, guidance_scale=self.guidance_scale)

    def __call__(self, params, captions: Sequence[str], rng) -> jax.Array:
        batch = prompt_batch(self.tokenizer, captions, self.config.data, self.mcfg.n_query)
        return self._fn(params, batch, rng)

    def to_images(self, grids) -> np.ndarray:
        """uint8 (B, S, S, 3) from generated pixel grids in [-1, 1]."""
        if self.mcfg.target != "pixels":
            raise ValueError(f"target {self.mcfg.target!r} generates features; decoding them to pixels needs the "
                             "release's separate diffusion decoder")
        x = np.asarray(grids, np.float32)
        return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def load_trained(workdir: str, step: int | None = None, config=None):
    """(model, params (all groups merged; the EMA weights if kept), config) from a training workdir: latest (or
    `step`) checkpoint + frozen weights. No train step is built: the checkpoint's layout comes from the model's
    abstract params (training/model_setup.py) and the optimizer's state shapes."""
    import ml_collections

    from blip3o_jax import sharding as shd
    from blip3o_jax.training import checkpoint as ckpt_lib
    from blip3o_jax.training import defaults
    from blip3o_jax.training import model_setup as ms_lib
    from blip3o_jax.training import optimizer as opt_lib
    from blip3o_jax.training import state as state_lib

    from blip3o_jax import paths as fs

    workdir = fs.abspath(workdir)  # a gs:// workdir stays one
    if config is None:
        config = ml_collections.ConfigDict(json.loads(fs.read_bytes(fs.join(workdir, "config.json"))))
    ms = ms_lib.model_setup(config, shd.make_mesh({"data": -1}))
    tx, _ = opt_lib.make_optimizer(config.train)
    abstract_state, _ = state_lib.layout(ms, tx, ema=bool(defaults.option(config, "train.ema_decay")))
    checkpointer = ckpt_lib.Checkpointer(workdir, save_every=0)
    try:
        state = checkpointer.restore(step, abstract_state)
    finally:
        checkpointer.close()
    frozen = {}
    if ms.abstract_frozen:
        frozen = ckpt_lib.restore_params(fs.join(workdir, "frozen"), ms.abstract_frozen)
    # the moving average of the weights when the run kept one (config.train.ema_decay): it samples better
    trainable = state.params if state.ema_params is None else state.ema_params
    return ms.model, opt_lib.merge_params(trainable, frozen), config


# ---------------------------------------------------------------------------------------------------------------
# pictures


def image_grid(images: np.ndarray, captions: Sequence[str], *, columns: int = 6, scale: int = 3,
               marks: Sequence[str] | None = None) -> "PIL.Image.Image":  # noqa: F821
    """A PNG-ready grid of images (nearest-neighbour upscaled) with each caption written under its image."""
    from PIL import Image, ImageDraw

    B, S = images.shape[0], images.shape[1]
    cell = S * scale
    text_h = 26
    rows = (B + columns - 1) // columns
    canvas = Image.new("RGB", (columns * (cell + 8) + 8, rows * (cell + text_h + 8) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(B):
        r, c = divmod(i, columns)
        x, y = 8 + c * (cell + 8), 8 + r * (cell + text_h + 8)
        canvas.paste(Image.fromarray(images[i]).resize((cell, cell), Image.NEAREST), (x, y))
        words = captions[i].split()
        line1, line2 = " ".join(words[:3]), " ".join(words[3:])
        draw.text((x, y + cell + 1), line1, fill=(0, 0, 0))
        if line2:
            draw.text((x, y + cell + 12), line2, fill=(0, 0, 0))
        if marks is not None:
            draw.text((x + cell - 10, y + cell + 1), marks[i], fill=(0, 140, 0) if marks[i] == "+" else (200, 0, 0))
    return canvas
