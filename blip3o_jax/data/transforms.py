"""Per-sample decoding and per-task transforms, and the collation of samples into static-shape batches.

A transform turns a `RawSample` into unpadded NumPy arrays for one task, or raises `BadSampleError` (with a
short `reason` used as a metric name) for anything unusable: empty/undecodable image, tiny or extremely
elongated image, missing/empty caption, text that is not UTF-8, a broken conversation.

Images leave the host as uint8 (normalisation happens on the device, `preprocessing.normalize`), decoded with
JPEG draft mode by default (DCT-domain downscaling: a 900 px JPEG decodes at 1/2 scale for a 448 px crop);
set `jpeg_draft=False` for pixels bit-identical to the original's full-size decode.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import numpy as np

from blip3o_jax import preprocessing as pp
from blip3o_jax.data import prompts
from blip3o_jax.data.sources import BadSampleError, RawSample

TASKS = {"t2i": 0, "i2t": 1, "text": 2}


@dataclasses.dataclass(frozen=True)
class TransformConfig:
    seq_buckets: tuple[int, ...] = (512,)  # padded lengths; a batch takes the smallest that fits all its rows
    n_query: int = 64  # latent-query slots after [IMG]
    gen_image_size: int = 448  # EVA-CLIP input
    prompt_format: str = "train"  # see prompts.py
    token_names: prompts.TokenNames = prompts.TokenNames()
    system_prompt: str = prompts.SYSTEM_PROMPT
    min_image_size: int = 16  # shorter side, px, of the original image
    max_aspect_ratio: float = 20.0
    jpeg_draft: bool = True
    und_image_size: int = 448  # understanding images: resize + centre crop, then Qwen2.5-VL patches
    # Qwen2.5-VL patch geometry (the tower's config: patch_size, temporal_patch_size, spatial_merge_size)
    und_patch_size: int = 14
    und_temporal_patch_size: int = 2
    und_merge_size: int = 2
    i2t_question: str = "Describe the image."  # used when an image-to-text sample has a caption, not a dialogue
    # (g, g, C): text-to-image samples carry a precomputed target grid (data/targets.py) instead of an image
    target_shape: tuple[int, int, int] | None = None
    target_dtype: str = "bfloat16"  # as stored: "bfloat16" (default) or "float32"

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_buckets)

    @property
    def und_grid(self) -> int:
        return self.und_image_size // self.und_patch_size

    @property
    def und_num_patches(self) -> int:
        return self.und_grid ** 2

    @property
    def und_num_tokens(self) -> int:
        return self.und_num_patches // self.und_merge_size ** 2

    @property
    def und_patch_dim(self) -> int:
        """Values per Qwen2.5-VL patch: RGB x temporal x patch x patch (1176 for the release's 14 px patches)."""
        return 3 * self.und_temporal_patch_size * self.und_patch_size ** 2

    @classmethod
    def from_data_config(cls, d, **fields) -> "TransformConfig":
        """From a `data` config section (data/pipeline.py `default_config`); `fields` override or add (e.g. the
        understanding tower's patch geometry). A key the section leaves out keeps this class's default."""
        def get(key):
            try:
                v = d[key]
            except (KeyError, AttributeError, TypeError):
                return None
            return v

        names = {"seq_buckets": lambda v: tuple(int(n) for n in v), "n_query": int, "gen_image_size": int,
                 "und_image_size": int, "prompt_format": str, "system_prompt": str, "min_image_size": int,
                 "max_aspect_ratio": float, "jpeg_draft": bool, "target_dtype": str,
                 "target_shape": lambda v: tuple(int(n) for n in v)}
        out = {k: cast(get(k)) for k, cast in names.items() if get(k) is not None}
        if get("tokens") is not None:
            out["token_names"] = prompts.TokenNames.from_config(get("tokens"))
        return cls(**{**out, **fields})

    def validate(self):
        if self.und_image_size % (self.und_patch_size * self.und_merge_size):
            raise ValueError(f"und_image_size {self.und_image_size} must be a multiple of "
                             f"{self.und_patch_size * self.und_merge_size}")
        if sorted(self.seq_buckets) != list(self.seq_buckets):
            raise ValueError(f"seq_buckets must be increasing, got {self.seq_buckets}")
        if self.prompt_format not in prompts.PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {prompts.PROMPT_FORMATS}, got {self.prompt_format!r}")


def _bad(raw: RawSample, reason: str, detail: str, source: str) -> BadSampleError:
    return BadSampleError(reason, detail, source=source, shard=raw.shard, key=raw.key)


def decode_text(raw: RawSample, source: str) -> str:
    text = raw.text
    if text is None:
        raise _bad(raw, "missing_caption", "sample has no caption", source)
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise _bad(raw, "bad_text_encoding", f"caption is not UTF-8 ({e.reason} at byte {e.start})",
                       source) from None
    if not isinstance(text, str):
        raise _bad(raw, "bad_record", f"caption is a {type(text).__name__}, not a string", source)
    text = text.strip()
    if not text:
        raise _bad(raw, "empty_caption", "caption is empty", source)
    return text


def open_checked_image(raw: RawSample, cfg: TransformConfig, source: str):
    """Opens the image lazily and applies the size/aspect policy before any pixel is decoded."""
    if raw.image is None:
        raise _bad(raw, "missing_image", "sample has no image", source)
    if len(raw.image) == 0:
        raise _bad(raw, "empty_image", "image has zero bytes", source)
    try:
        img = pp.open_image(raw.image)
    except pp.BadImageError as e:
        raise _bad(raw, "undecodable_image", str(e), source) from None
    w, h = img.size
    try:
        pp.check_image(img, cfg.min_image_size, cfg.max_aspect_ratio)
    except pp.BadImageError as e:
        reason = "image_too_small" if min(w, h) < cfg.min_image_size else "extreme_aspect"
        raise _bad(raw, reason, str(e), source) from None
    return img


def _conversations(raw: RawSample, source: str) -> list | None:
    if raw.conversations is not None:
        return raw.conversations
    meta = raw.meta
    if isinstance(meta, (bytes, bytearray)):
        try:
            meta = json.loads(bytes(meta).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise _bad(raw, "bad_record", "<key>.json member is not valid UTF-8 JSON", source) from None
    if isinstance(meta, dict) and isinstance(meta.get("conversations"), list):
        return meta["conversations"]
    return None


class SampleTransform:
    """RawSample -> unpadded per-task arrays. Picklable (Grain worker processes)."""

    def __init__(self, cfg: TransformConfig, tokenizer):
        cfg.validate()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.ids = prompts.special_ids(tokenizer, cfg.token_names)

    def __getstate__(self):
        return {"cfg": self.cfg, "tokenizer": self.tokenizer, "ids": self.ids}

    def __call__(self, raw: RawSample, task: str, source: str = "") -> dict[str, Any]:
        if task == "t2i":
            return self.t2i(raw, source)
        if task == "i2t":
            return self.i2t(raw, source)
        if task == "text":
            return self.text(raw, source)
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")

    def t2i(self, raw: RawSample, source: str) -> dict[str, Any]:
        cfg = self.cfg
        caption = decode_text(raw, source)  # text first: cheaper than decoding the image
        if cfg.target_shape is not None:  # precomputed target: no image decode at all
            if raw.target is None:
                raise _bad(raw, "missing_target", "sample has no precomputed target", source)
            if tuple(raw.target.shape) != tuple(cfg.target_shape):
                raise _bad(raw, "bad_target", f"target shape {raw.target.shape} != {tuple(cfg.target_shape)}", source)
            image_field = {"targets": raw.target}
        else:
            img = open_checked_image(raw, cfg, source)
            try:
                image_field = {"gen_image": pp.eva_preprocess(img, cfg.gen_image_size, draft=cfg.jpeg_draft)}
            except pp.BadImageError as e:
                raise _bad(raw, "undecodable_image", str(e), source) from None
        ids = prompts.t2i_prompt_ids(self.tokenizer, caption, cfg.n_query, max_length=cfg.max_seq_len,
                                     prompt_format=cfg.prompt_format, names=cfg.token_names,
                                     system_prompt=cfg.system_prompt)
        return {"task": TASKS["t2i"], "input_ids": ids, "query_start": len(ids) - cfg.n_query, **image_field}

    def i2t(self, raw: RawSample, source: str) -> dict[str, Any]:
        cfg = self.cfg
        conv = _conversations(raw, source)
        if conv is None:
            caption = decode_text(raw, source)
            conv = [{"from": "human", "value": prompts.IMAGE_PLACEHOLDER + "\n" + cfg.i2t_question},
                    {"from": "gpt", "value": caption}]
        img = open_checked_image(raw, cfg, source)
        try:
            square = pp.resize_center_crop(img, cfg.und_image_size, draft=cfg.jpeg_draft)
            from PIL import Image

            s = cfg.und_image_size
            patches, grid = pp.qwen2_5_vl_preprocess(Image.fromarray(square), min_pixels=s * s, max_pixels=s * s,
                                                     patch_size=cfg.und_patch_size, merge_size=cfg.und_merge_size,
                                                     temporal_patch_size=cfg.und_temporal_patch_size)
        except pp.BadImageError as e:
            raise _bad(raw, "undecodable_image", str(e), source) from None
        ids, target = self._conversation(raw, conv, cfg.und_num_tokens, source)
        positions = prompts.mrope_positions(ids, [grid], self.ids.image_pad, cfg.und_merge_size)
        return {"task": TASKS["i2t"], "input_ids": ids, "target": target, "und_patches": patches,
                "und_grid_thw": np.asarray(grid, np.int32), "mrope_positions": positions}

    def text(self, raw: RawSample, source: str) -> dict[str, Any]:
        conv = _conversations(raw, source)
        if conv is None:  # plain text: language modelling on every token
            text = decode_text(raw, source)
            ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=False), np.int32)[: self.cfg.max_seq_len]
            return {"task": TASKS["text"], "input_ids": ids, "target": np.ones(len(ids), bool)}
        ids, target = self._conversation(raw, conv, 0, source)
        return {"task": TASKS["text"], "input_ids": ids, "target": target}

    def _conversation(self, raw, conv, n_image_tokens, source):
        try:
            ids, target = prompts.conversation_ids(self.tokenizer, conv, n_image_tokens=n_image_tokens,
                                                   max_length=self.cfg.max_seq_len, names=self.cfg.token_names,
                                                   system_prompt=self.cfg.system_prompt)
        except ValueError as e:
            raise _bad(raw, "bad_record", str(e), source) from None
        if not target.any():
            raise _bad(raw, "bad_record", "no assistant token left after truncation", source)
        return ids, target


# fields of the batch schema for the host only (bookkeeping, metrics); the train step consumes every other field
HOST_FIELDS = ("source_id", "record_id", "prompt_length", "und_grid_thw")


def batch_schema(cfg: TransformConfig, tasks: Sequence[str], batch_size: int) -> dict[str, tuple]:
    """{field: (shape with L for the bucket length, dtype)} of the batches for a set of tasks (static).

    The one description of a batch: the data pipeline collates into it, and the train step's input layout is
    `step_schema` of it (training/step.py `batch_spec`)."""
    b = batch_size
    schema = {
        "input_ids": ((b, "L"), np.int32),
        "attention_mask": ((b, "L"), np.int32),
        "positions": ((b, "L"), np.int32),
        "task": ((b,), np.int32),
        "sample_valid": ((b,), np.int32),
        "source_id": ((b,), np.int32),
        "record_id": ((b,), np.int32),
    }
    if "t2i" in tasks:
        schema["query_index"] = ((b, cfg.n_query), np.int32)
        schema["prompt_length"] = ((b,), np.int32)
        if cfg.target_shape is not None:  # as stored (bfloat16 by default: half the host-to-device bytes)
            import ml_dtypes

            dtype = ml_dtypes.bfloat16 if cfg.target_dtype == "bfloat16" else np.float32
            schema["targets"] = ((b, *cfg.target_shape), dtype)
        else:
            schema["gen_image"] = ((b, cfg.gen_image_size, cfg.gen_image_size, 3), np.uint8)
    if "i2t" in tasks or "text" in tasks:
        schema["labels"] = ((b, "L"), np.int32)
        schema["loss_mask"] = ((b, "L"), np.int32)
    if "i2t" in tasks:
        schema["und_patches"] = ((b, cfg.und_num_patches, cfg.und_patch_dim), np.float32)
        schema["und_grid_thw"] = ((b, 3), np.int32)
        schema["und_index"] = ((b, cfg.und_num_tokens), np.int32)
        schema["mrope_positions"] = ((b, 3, "L"), np.int32)
    return schema


def step_schema(cfg: TransformConfig, tasks: Sequence[str], batch_size: int, *, seq_len: int,
                understanding: bool = True) -> dict[str, tuple]:
    """{field: (shape, dtype)} of the batch fields a train step consumes, at sequence length `seq_len`: the batch
    schema without the host-only fields (and without the understanding inputs when the model has no understanding
    tower: its image-to-text rows are then text rows)."""
    und = ("und_patches", "und_index", "mrope_positions")
    return {k: (tuple(seq_len if n == "L" else n for n in shape), dtype)
            for k, (shape, dtype) in batch_schema(cfg, tasks, batch_size).items()
            if k not in HOST_FIELDS and (understanding or k not in und)}


class Collator:
    """Pads samples to the smallest fitting length bucket and stacks them into the batch schema."""

    def __init__(self, cfg: TransformConfig, tasks: Sequence[str], pad_id: int, image_pad_id: int):
        self.cfg, self.tasks, self.pad_id, self.image_pad_id = cfg, tuple(tasks), int(pad_id), int(image_pad_id)

    def __call__(self, samples: Sequence[dict | None], source_ids: Sequence[int],
                 record_ids: Sequence[int]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        b = len(samples)
        longest = max([len(s["input_ids"]) for s in samples if s is not None] + [1])
        length = next(n for n in cfg.seq_buckets if n >= longest)
        schema = batch_schema(cfg, self.tasks, b)
        out = {k: np.zeros(tuple(length if d == "L" else d for d in shape), dtype)
               for k, (shape, dtype) in schema.items()}
        out["input_ids"][:] = self.pad_id
        if "labels" in out:
            out["labels"][:] = self.pad_id
        arange = np.arange(length, dtype=np.int32)
        for i, s in enumerate(samples):
            out["source_id"][i], out["record_id"][i] = source_ids[i], record_ids[i]
            if s is None:  # padding row (end of a finite epoch)
                continue
            n = len(s["input_ids"])
            out["sample_valid"][i] = 1
            out["task"][i] = s["task"]
            out["input_ids"][i, :n] = s["input_ids"]
            out["attention_mask"][i, :n] = 1
            out["positions"][i, :n] = arange[:n]
            if "query_start" in s:
                out["query_index"][i] = s["query_start"] + np.arange(cfg.n_query, dtype=np.int32)
                out["prompt_length"][i] = s["query_start"]
                if "targets" in s:
                    out["targets"][i] = s["targets"]
                else:
                    out["gen_image"][i] = s["gen_image"]
            if "target" in s:  # labels pre-shifted: position t predicts token t+1
                out["labels"][i, : n - 1] = s["input_ids"][1:]
                out["loss_mask"][i, : n - 1] = s["target"][1:]
            if "mrope_positions" in out:
                if "mrope_positions" in s:
                    out["mrope_positions"][i, :, :n] = s["mrope_positions"]
                else:
                    out["mrope_positions"][i, :, :n] = arange[:n]
            if "und_patches" in s:
                out["und_patches"][i] = s["und_patches"]
                out["und_grid_thw"][i] = s["und_grid_thw"]
                slots = np.nonzero(s["input_ids"] == self.image_pad_id)[0]
                out["und_index"][i, : len(slots)] = slots
        return out
