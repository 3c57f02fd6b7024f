"""Image preprocessing for the three vision towers, in NumPy/PIL only (no torch at run time).

Qwen2.5-VL, EVA-CLIP and SigLIP inputs, as the original BLIP3-o data code and transformers' image processors.
Hosts produce `uint8` arrays (H, W, 3); `normalize` turns them into float32 on the device inside the jitted step
(a quarter of the host-to-device bytes and no float work on the host). Qwen2.5-VL's flattened patches are float32
already, as transformers' processor emits them.

Choices (each matches the original pipeline unless it says otherwise):
- `to_rgb`: transparency (RGBA, LA, PA, P with a transparent index) is composited onto white, as transformers'
  `convert_to_rgb` does inside the EVA, SigLIP and Qwen processors. (The BLIP3o T2I loader calls
  `img.convert("RGB")` first, which instead keeps the colour under transparent pixels; its training shards are
  JPEGs, which have no alpha.) 16-bit and 32-bit integer greyscale (I;16*, I) are scaled to 8 bits (PIL would
  clip everything above 255 to white): I;16* by /257; I by /257 when its maximum exceeds 255, else as is.
  Float (F) images are read as [0, 1] when their maximum is <= 1, else clipped to [0, 255]. EXIF orientation is
  not applied (the original does not either).
- EVA (`eva_preprocess`): torchvision `Resize(448, bicubic)` + `CenterCrop(448)` exactly, i.e. the short side
  becomes 448, the long side `int(448 * long / short)`, and the crop offset `int(round((new - 448) / 2))`.
  (Images more elongated than 8:1, and draft-decoded JPEGs, resample only the crop window instead.)
- JPEG draft mode: JPEG decoding can scale by 1/2, 1/4 or 1/8 inside the DCT (`Image.draft`). With
  `draft=True` we decode at the largest such scale that keeps at least `draft_margin` x the output resolution,
  then resample as above. This is not bit-identical to decoding at full size (DCT scaling is a different
  low-pass filter than the bicubic kernel); see tests/test_preprocessing.py for the measured difference.
  Note: draft mode is a decode-time setting of the `PIL.Image` object passed in (its size changes).
- SigLIP (`siglip_preprocess`): `mode="squash"` is `SiglipImageProcessor` (resize to 512x512 ignoring aspect;
  SigLIP2 fixed-resolution checkpoints ship `resample=2`, bilinear, SigLIP1 ones bicubic);
  `mode="crop"` is the SigLIP2+SANA branch (torchvision v2 `Resize(512)` bilinear + `CenterCrop(512)`, after
  which the processor's 512x512 resize is a no-op).
- Qwen2.5-VL (`qwen2_5_vl_preprocess`): transformers' Qwen2VLImageProcessor (PIL backend): smart resize to
  multiples of patch*merge within [min_pixels, max_pixels] (bicubic, whole image), rescale, CLIP normalize,
  patchify to (grid_h*grid_w, 3*2*14*14) in the (merge-window, channel, time, row, col) order the ViT expects.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

BICUBIC = Image.Resampling.BICUBIC
BILINEAR = Image.Resampling.BILINEAR

# Qwen2.5-VL's preprocessor_config.json: its patches are normalised here, on the host
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 28 * 28 * 16384  # 12,845,056
QWEN_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's
QWEN_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# The EVA-CLIP and SigLIP towers normalise their uint8 inputs on the device, so their constants live with them
# (models/eva_clip.py, models/siglip.py). Re-exported here on first access only: importing this module must not
# import JAX (data workers).
_TOWER_CONSTANTS = {"CLIP_MEAN": "eva_clip", "CLIP_STD": "eva_clip", "SIGLIP_MEAN": "siglip", "SIGLIP_STD": "siglip"}


def __getattr__(name: str):
    if name in _TOWER_CONSTANTS:
        import importlib

        return getattr(importlib.import_module(f"blip3o_jax.models.{_TOWER_CONSTANTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class BadImageError(ValueError):
    """An image that cannot or should not be used; the message says which property failed."""


# ----------------------------------------------------------------------------------------------------------------
# decoding, conversion, checks


def open_image(source) -> Image.Image:
    """Opens a path, bytes or file object lazily (so that `draft` can still act); BadImageError if unreadable."""
    import io

    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            return Image.open(io.BytesIO(bytes(source)))
        return Image.open(source)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f"cannot open image: {e}") from None


def _load(img: Image.Image) -> None:
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f"cannot decode image ({img.format or 'unknown format'}, {img.size}): {e}") from None


def to_rgb(img: Image.Image, background: Sequence[int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is composited onto `background` (white); 16-bit/float scaled to 8 bits."""
    _load(img)
    mode = img.mode
    if mode == "RGB":
        return img
    has_alpha = "A" in img.getbands() or (mode in ("P", "L", "RGB") and img.info.get("transparency") is not None)
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr = arr.astype(np.float64)
            arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
            arr8 = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        else:
            arr = arr.astype(np.int64)
            if mode.startswith("I;16") or (arr.size and arr.max() > 255):
                arr = (np.clip(arr, 0, 65535) + 128) // 257  # 65535 -> 255, rounds to nearest
            arr8 = np.clip(arr, 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(arr8[..., None], 3, axis=-1), "RGB")
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
            return Image.alpha_composite(base, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadImageError(f"cannot convert image mode {mode!r} to RGB: {e}") from None


def check_image(img: Image.Image, min_size: int = 16, max_aspect: float = 20.0) -> None:
    """Rejects images too small or too elongated to give a meaningful 448/512 px crop (data filtering).

    The preprocess functions themselves accept any non-empty image (a 1x1 image is upsampled); this is the
    policy check the data pipeline applies before them.
    """
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadImageError(f"image has an empty size {w}x{h}")
    if min(w, h) < min_size:
        raise BadImageError(f"image is {w}x{h} px; its shorter side must be at least {min_size} px")
    aspect = max(w, h) / min(w, h)
    if aspect > max_aspect:
        raise BadImageError(f"image is {w}x{h} px; aspect ratio {aspect:.1f} exceeds the limit {max_aspect:g}")


# ----------------------------------------------------------------------------------------------------------------
# geometry


def shortest_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision `Resize(size)`: (new_width, new_height) with the short side = size, long side truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop_offset(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision `CenterCrop(size)` offsets (left, top) for an image at least `size` on each side."""
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


# Beyond this aspect ratio the exact resize-then-crop would materialise a huge intermediate (a 10000x10 image
# becomes 448000x448); such images take the crop-window path instead.
_MAX_EXACT_ASPECT = 8


def _apply_draft(img: Image.Image, need_w: float, need_h: float, margin: float) -> tuple[float, float]:
    """Sets JPEG DCT scaling so that the decoded image still has >= margin x (need_w, need_h) pixels.

    Returns the factors mapping original pixel coordinates to decoded ones ((1, 1) when nothing changed).
    """
    if img.format != "JPEG" or getattr(img, "tile", None) is None or len(img.tile) != 1:
        return 1.0, 1.0
    w, h = img.size
    req = (max(1, math.ceil(need_w * margin)), max(1, math.ceil(need_h * margin)))
    if w // req[0] < 2 or h // req[1] < 2:
        return 1.0, 1.0
    res = img.draft(None, req)
    if res is None:
        return 1.0, 1.0
    _, box = res
    return box[2] / w, box[3] / h


def resize_center_crop(
    img: Image.Image, size: int, resample=BICUBIC, *, draft: bool = False, draft_margin: float = 1.0
) -> np.ndarray:
    """torchvision Resize(size) + CenterCrop(size) -> uint8 (size, size, 3)."""
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadImageError(f"image has an empty size {w}x{h}")
    new_w, new_h = shortest_side_size(w, h, size)
    left, top = center_crop_offset(new_w, new_h, size)
    sx, sy = _apply_draft(img, new_w, new_h, draft_margin) if draft else (1.0, 1.0)
    rgb = to_rgb(img)
    if (sx, sy) == (1.0, 1.0) and max(new_w, new_h) <= _MAX_EXACT_ASPECT * size:
        # exactly torchvision: resize the whole image, then crop
        out = rgb.resize((new_w, new_h), resample).crop((left, top, left + size, top + size))
    else:
        # Resample only the crop window: resized pixel j covers source [j * w/new_w, (j+1) * w/new_w). Same
        # geometry and kernel, but PIL may run its two 1-D passes in the other order for the smaller output, so
        # pixels can differ by the 8-bit rounding/clipping of the intermediate (a few levels at hard edges).
        box = (left * w / new_w * sx, top * h / new_h * sy, (left + size) * w / new_w * sx, (top + size) * h / new_h * sy)
        out = rgb.resize((size, size), resample, box=box)
    return np.asarray(out, dtype=np.uint8)


def resize_square(
    img: Image.Image, size: int, resample=BICUBIC, *, draft: bool = False, draft_margin: float = 1.0
) -> np.ndarray:
    """Resize to (size, size) ignoring aspect (transformers' `size={"height", "width"}`) -> uint8 (size, size, 3)."""
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadImageError(f"image has an empty size {w}x{h}")
    sx, sy = _apply_draft(img, size, size, draft_margin) if draft else (1.0, 1.0)
    rgb = to_rgb(img)
    out = rgb.resize((size, size), resample, box=(0.0, 0.0, w * sx, h * sy))
    return np.asarray(out, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# per-tower pipelines


def eva_preprocess(img: Image.Image, image_size: int = 448, *, draft: bool = True, draft_margin: float = 1.0) -> np.ndarray:
    """EvaClipImageTrainProcessor without ToTensor/Normalize: uint8 (image_size, image_size, 3).

    `draft=True` (default) decodes large JPEGs at a reduced DCT scale (2.2-2.5x faster on 1500-2250 px photos;
    mean 0.5-0.7 levels of 255 from the exact result); `draft=False` is bit-exact torchvision.
    """
    return resize_center_crop(img, image_size, BICUBIC, draft=draft, draft_margin=draft_margin)


def siglip_preprocess(
    img: Image.Image, image_size: int = 512, *, mode: str = "squash", resample=BILINEAR, draft: bool = True,
    draft_margin: float = 1.0,
) -> np.ndarray:
    """uint8 (image_size, image_size, 3); mode "squash" (SiglipImageProcessor) or "crop" (SigLIP2+SANA branch).

    `resample`: BILINEAR for the SigLIP2 fixed-resolution checkpoints (their preprocessor_config has resample 2),
    BICUBIC for SigLIP1. `draft` as in `eva_preprocess`.
    """
    if mode == "squash":
        return resize_square(img, image_size, resample, draft=draft, draft_margin=draft_margin)
    if mode == "crop":
        return resize_center_crop(img, image_size, resample, draft=draft, draft_margin=draft_margin)
    raise ValueError(f"siglip_preprocess: mode must be 'squash' or 'crop', got {mode!r}")


def normalize(images, mean: Sequence[float], std: Sequence[float]):
    """uint8 (..., 3) -> float32 (x / 255 - mean) / std. NumPy in, NumPy out; JAX in (e.g. inside jit), JAX out."""
    if isinstance(images, np.ndarray) or np.isscalar(images):
        xp = np
    else:  # imported lazily: data workers that only use NumPy never import JAX
        import jax.numpy as xp
    mean = xp.asarray(mean, dtype=xp.float32)
    std = xp.asarray(std, dtype=xp.float32)
    return (xp.asarray(images).astype(xp.float32) * xp.float32(1.0 / 255.0) - mean) / std


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = QWEN_MIN_PIXELS, max_pixels: int = QWEN_MAX_PIXELS
) -> tuple[int, int]:
    """Qwen2-VL's smart_resize: both sides multiples of `factor`, area within [min_pixels, max_pixels]."""
    if height <= 0 or width <= 0:
        raise BadImageError(f"image has an empty size {width}x{height}")
    aspect = max(height, width) / min(height, width)
    if aspect > 200:
        raise BadImageError(f"image is {width}x{height} px; Qwen2.5-VL needs an aspect ratio below 200, got {aspect:.1f}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen2_5_vl_patchify(
    pixels: np.ndarray, patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Normalized float (H, W, C) -> (grid_h*grid_w, C*T*p*p) patches and grid_thw (1, grid_h, grid_w).

    Token order: merge windows row-major, then the merge_size x merge_size patches inside each window (what the
    ViT's 2x2 merger expects); within a patch (channel, time, row, col), the Conv3d weight's flattening. A still
    image is repeated over the temporal patch.
    """
    h, w, c = pixels.shape
    gh, gw = h // patch_size, w // patch_size
    if gh * patch_size != h or gw * patch_size != w or gh % merge_size or gw % merge_size:
        raise ValueError(f"qwen2_5_vl_patchify: image {h}x{w} is not a multiple of patch*merge = {patch_size * merge_size}")
    x = pixels.reshape(gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size, c)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # (gh/m, gw/m, m, m, C, p, p)
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (temporal_patch_size,) + x.shape[5:])
    patches = np.ascontiguousarray(x.reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size))
    return patches.astype(np.float32, copy=False), np.array([1, gh, gw], dtype=np.int64)


def qwen2_5_vl_preprocess(
    img: Image.Image,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    resample=BICUBIC,
    mean: Sequence[float] = QWEN_IMAGE_MEAN,
    std: Sequence[float] = QWEN_IMAGE_STD,
) -> tuple[np.ndarray, np.ndarray]:
    """== transformers' Qwen2VLImageProcessor on one image: (patches float32 (N, 1176), grid_thw int64 (3,))."""
    w, h = img.size
    rh, rw = smart_resize(h, w, patch_size * merge_size, min_pixels, max_pixels)
    rgb = to_rgb(img)
    resized = rgb if (rw, rh) == rgb.size else rgb.resize((rw, rh), resample)
    pixels = normalize(np.asarray(resized, dtype=np.uint8), mean, std)
    return qwen2_5_vl_patchify(pixels, patch_size, temporal_patch_size, merge_size)
