"""Full Qwen2.5-VL (image understanding): vision tower + Qwen2.5-VL text model with 3-D M-RoPE.

As transformers' `Qwen2_5_VLForConditionalGeneration` for images: the tower's merged tokens replace the embeddings
of the `<|image_pad|>` tokens (in order, row-major over the batch), and every token gets a (t, h, w) position as
`Qwen2_5_VLModel.get_rope_index` computes it: text runs count up by one on all three axes; an image of merged grid
(t, h', w') starting at position p gets (p + t_i, p + h_i, p + w_i); the text after it resumes at p + max(h', w').

All of that depends only on token ids and `grid_thw`, so `prepare_inputs` computes it on the host in NumPy
(positions (3, B, L), the gather index of each image slot, the vision layout); the jitted part only gathers and
selects (`jnp.take` + `jnp.where`, no boolean scatter). The host helpers that run it (`logits`, image-to-text
`generate`: prefill from the spliced `inputs_embeds` at the M-RoPE positions, then decode at `rope_delta`-shifted
1-D positions exactly as transformers does) are `qwen2_5_vl_logits` / `qwen2_5_vl_generate` in `generation.py`.

Note: BLIP3-o's own generation path calls the text model with plain 1-D positions;
this module is the understanding path, which uses the real M-RoPE positions.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from blip3o_jax.models import qwen, registry
from blip3o_jax.models import qwen2_5_vl_vision as qv


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    text: qwen.QwenConfig
    vision: qv.Qwen2_5_VLVisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    # dtype policy for both halves (as every other model config has it, so `pretrained.load_pretrained(dtype=)`
    # works): when set, it overrides the text and vision configs' own `dtype` / `param_dtype`
    dtype: str | None = None
    param_dtype: str | None = None

    def __post_init__(self):
        policy = {k: v for k, v in (("dtype", self.dtype), ("param_dtype", self.param_dtype)) if v is not None}
        if policy:
            object.__setattr__(self, "text", dataclasses.replace(self.text, **policy))
            object.__setattr__(self, "vision", dataclasses.replace(self.vision, **policy))
        if self.text.mrope_section is None:
            raise ValueError("qwen2_5_vl: the text config needs mrope_section (M-RoPE)")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(
                f"qwen2_5_vl: vision out_hidden_size {self.vision.out_hidden_size} must equal the text hidden_size "
                f"{self.text.hidden_size}"
            )


def config_from_hf(kind: str, hf: Mapping[str, Any]) -> Qwen2_5_VLConfig:
    """From a full `qwen2_5_vl` config dict: transformers 5.x (`text_config`/`vision_config`) or the flat 4.x
    config.json of the released checkpoints (text fields at the top level)."""
    if kind != "qwen2_5_vl":
        raise ValueError(f"qwen2_5_vl.config_from_hf: unknown kind {kind!r}")
    hf = {**dict(hf), "model_type": "qwen2_5_vl"}
    if "vision_config" not in hf:
        raise ValueError("qwen2_5_vl config: no `vision_config` (is this a text-only Qwen config?)")
    ids = {k: int(hf[k]) for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
           if hf.get(k) is not None}
    return Qwen2_5_VLConfig(
        text=qwen.config_from_hf("qwen2_5_vl_text", hf),
        vision=qv.config_from_hf("qwen2_5_vl_vision", hf),
        **ids,
    )


# ----------------------------------------------------------------------------------------------------------------
# Host side: M-RoPE positions, image-slot indices, vision layout.


def _runs(is_image: np.ndarray):
    """(is_image, start, end) for each maximal run of equal values (itertools.groupby upstream)."""
    change = np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(is_image)]])
    return [(bool(is_image[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def rope_index(input_ids, attention_mask, image_grid_thw, cfg: Qwen2_5_VLConfig):
    """NumPy port of `Qwen2_5_VLModel.get_rope_index` for images: positions (3, B, L) int32 and rope_deltas (B,).

    Padding (attention_mask 0) gets position 0 on every axis and is skipped when counting, as upstream.
    """
    input_ids = np.asarray(input_ids)
    B, L = input_ids.shape
    mask = np.ones((B, L), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = [] if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3).tolist()
    m = cfg.vision.spatial_merge_size
    positions = np.zeros((3, B, L), np.int64)
    deltas = np.zeros((B,), np.int64)
    next_image = 0
    for b in range(B):
        ids = input_ids[b][mask[b]]
        pieces, current = [], 0
        for is_image, start, end in _runs(ids == cfg.image_token_id) if len(ids) else []:
            if not is_image:
                pieces.append(np.broadcast_to(np.arange(end - start) + current, (3, end - start)))
                current += end - start
                continue
            if next_image >= len(grids):
                raise ValueError(f"row {b}: more runs of image tokens than images in grid_thw ({len(grids)})")
            t, h, w = grids[next_image]
            next_image += 1
            lt, lh, lw = t, h // m, w // m
            if lt * lh * lw != end - start:
                raise ValueError(
                    f"row {b}: a run of {end - start} image tokens does not match grid_thw {[t, h, w]} "
                    f"({lt * lh * lw} merged tokens); separate images with <|vision_start|>/<|vision_end|>"
                )
            tt, hh, ww = np.meshgrid(np.arange(lt), np.arange(lh), np.arange(lw), indexing="ij")
            pieces.append(np.stack([tt, hh, ww]).reshape(3, -1) + current)
            current += max(h, w) // m
        if pieces:
            llm = np.concatenate(pieces, axis=1)
            positions[:, b, mask[b]] = llm
            deltas[b] = llm.max() + 1 - len(ids)
    if next_image != len(grids):
        raise ValueError(f"grid_thw lists {len(grids)} images but the prompts hold {next_image} image-token runs")
    return positions.astype(np.int32), deltas


def image_slot_index(input_ids, cfg: Qwen2_5_VLConfig, n_image_tokens: int) -> np.ndarray:
    """(B, L) row of the concatenated image features that fills each `<|image_pad|>` slot (0 elsewhere), in
    row-major order over the batch (masked_scatter upstream)."""
    is_image = np.asarray(input_ids) == cfg.image_token_id
    if int(is_image.sum()) != n_image_tokens:
        raise ValueError(
            f"image features and image tokens do not match: {int(is_image.sum())} <|image_pad|> tokens in the "
            f"prompts, {n_image_tokens} merged image tokens from grid_thw"
        )
    index = np.cumsum(is_image.reshape(-1)) - 1
    return np.where(is_image.reshape(-1), index, 0).reshape(is_image.shape).astype(np.int32)


def prepare_inputs(cfg: Qwen2_5_VLConfig, input_ids, attention_mask=None, image_grid_thw=None, *,
                   num_tokens: int | None = None, num_windows: int | None = None) -> dict:
    """Everything the jitted forward needs besides ids, mask and pixels, from ids and `grid_thw` on the host.

    Returns {"positions" (3, B, L), "rope_deltas" (B,), "image_index" (B, L), "vision_layout" (dict or None)};
    `num_tokens`/`num_windows` pad the vision tower to a bucket (see `qwen2_5_vl_vision.vision_layout`).
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    if np.any(input_ids == cfg.video_token_id):
        raise ValueError("video inputs (<|video_pad|> tokens) are not supported; only images")
    positions, deltas = rope_index(input_ids, attention_mask, image_grid_thw, cfg)
    layout, n_merged = None, 0
    if image_grid_thw is not None:
        grid = qv.check_grid(image_grid_thw, cfg.vision)
        if np.any(grid[:, 0] != 1):
            raise ValueError(f"image grid_thw must have t = 1 (still images), got {grid.tolist()}")
        layout = qv.vision_layout(grid, cfg.vision, num_tokens=num_tokens, num_windows=num_windows)
        n_merged = qv.num_patches(grid) // cfg.vision.merge_unit
    return {
        "positions": positions,
        "rope_deltas": deltas.astype(np.int32),
        "image_index": image_slot_index(input_ids, cfg, n_merged),
        "vision_layout": layout,
    }


def pad_pixels(pixel_values, layout):
    """Zero rows appended to (N, patch_dim) patches up to the layout's bucket size."""
    n = layout["token_order"].shape[0]
    pixel_values = jnp.asarray(pixel_values)
    if pixel_values.shape[0] > n:
        raise ValueError(f"{pixel_values.shape[0]} patch rows but the vision layout holds {n}")
    return jnp.pad(pixel_values, ((0, n - pixel_values.shape[0]), (0, 0)))


# ----------------------------------------------------------------------------------------------------------------
# Module


class Qwen2_5_VLForConditionalGeneration(nn.Module):
    """params: {"visual": vision tower, "language_model": `qwen.QwenForCausalLM` (embeddings, layers, head)}."""

    cfg: Qwen2_5_VLConfig

    def setup(self):
        self.visual = qv.Qwen2_5_VisionTransformer(self.cfg.vision)
        self.language_model = qwen.build("qwen2_5_vl_text", self.cfg.text)

    def encode_images(self, pixel_values, vision_layout):
        """Merged image tokens (n_tokens / merge², D) in grid_thw order (padding rows last)."""
        return self.visual(pixel_values, vision_layout)

    def embed_inputs(self, input_ids, pixel_values=None, vision_layout=None, image_index=None):
        """(B, L, D) token embeddings with the image features in the <|image_pad|> slots."""
        embeds = self.language_model.embed(input_ids)
        if pixel_values is None:
            return embeds
        features = self.encode_images(pixel_values, vision_layout).astype(embeds.dtype)
        gathered = jnp.take(features, image_index, axis=0)  # (B, L, D)
        return jnp.where((input_ids == self.cfg.image_token_id)[..., None], gathered, embeds)

    def forward(self, input_ids, *, attention_mask=None, positions=None, pixel_values=None, vision_layout=None,
                image_index=None, cache=None, compute_logits=True):
        """(hidden (B, L, D), fp32 logits (B, L, V) or None, cache) as `qwen.QwenForCausalLM.forward`."""
        embeds = self.embed_inputs(input_ids, pixel_values, vision_layout, image_index)
        return self.language_model.forward(inputs_embeds=embeds, attention_mask=attention_mask, positions=positions,
                                           cache=cache, compute_logits=compute_logits)

    def __call__(self, input_ids, attention_mask=None, positions=None, pixel_values=None, vision_layout=None,
                 image_index=None):
        """fp32 logits (B, L, vocab)."""
        return self.forward(input_ids, attention_mask=attention_mask, positions=positions, pixel_values=pixel_values,
                            vision_layout=vision_layout, image_index=image_index)[1]


def build(kind: str, cfg: Qwen2_5_VLConfig) -> Qwen2_5_VLForConditionalGeneration:
    if kind != "qwen2_5_vl":
        raise ValueError(f"qwen2_5_vl.build: unknown kind {kind!r}")
    return Qwen2_5_VLForConditionalGeneration(cfg)


def init_args(cfg: Qwen2_5_VLConfig, grid_thw=((1, 4, 4),)):
    """Example (input_ids, attention_mask, positions, pixel_values, vision_layout, image_index) for `init`."""
    n_merged = qv.num_patches(grid_thw) // cfg.vision.merge_unit
    input_ids = np.full((1, n_merged + 2), cfg.image_token_id, np.int64)
    input_ids[0, 0] = input_ids[0, -1] = 0
    inputs = prepare_inputs(cfg, input_ids, None, grid_thw)
    pixel_values = jnp.zeros((qv.num_patches(grid_thw), cfg.vision.patch_dim), jnp.float32)
    return (jnp.asarray(input_ids, jnp.int32), jnp.ones(input_ids.shape, jnp.int32), inputs["positions"],
            pixel_values, inputs["vision_layout"], inputs["image_index"])


registry.register(registry.Kind(
    name="qwen2_5_vl",
    config_from_hf=lambda hf: config_from_hf("qwen2_5_vl", hf),
    build=lambda cfg: build("qwen2_5_vl", cfg),
    init_args=lambda cfg: (init_args(cfg), {}, None),
    converter="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
))
