"""Preprocessing parity: Qwen2.5-VL patches vs transformers' processor; EVA / SigLIP vs reference pipelines.

Tolerances:
- Qwen2.5-VL, and EVA/SigLIP against transformers' processors: 1e-5 on normalized floats. Both sides resample
  with the same PIL call on the same uint8 image, so the only difference is float rounding of the normalisation.
- EVA/SigLIP without JPEG draft against the torchvision recipe written out with PIL: exact (0 levels).
- With JPEG draft mode (decode at 1/2, 1/4, 1/8 scale in the DCT): the DCT's low-pass differs from the bicubic
  kernel, so pixels move. Bound: mean |diff| <= 1 level, 99th percentile <= 4 levels, max <= 12 levels of 255
  (measured on photo-like 1500-2250 px JPEGs: mean 0.47-0.66, p99 2-3, max 5-6, for 2.2-2.5x less time).
- Crop-window resampling of very elongated images: PIL may order its two passes differently for the smaller
  output, which changes the intermediate 8-bit rounding: bound mean <= 0.5 level, max <= 3 levels on smooth
  images.
"""
import io

import numpy as np
import pytest
from PIL import Image

from blip3o_jax import preprocessing as P

RNG = np.random.default_rng(1234)


def smooth_image(w, h, seed=0):
    """Photo-like content: low-frequency colour fields + edges + mild noise (random noise alone would make
    bicubic overshoot and clip everywhere, which no real photo does)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        for _ in range(4):
            fx, fy, ph = rng.uniform(0.5, 6) / w, rng.uniform(0.5, 6) / h, rng.uniform(0, 6.3)
            img[..., c] += rng.uniform(20, 50) * np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)
        img[..., c] += 128
    img[(xx - w / 3) ** 2 + (yy - h / 2) ** 2 < (min(w, h) / 5) ** 2] += 60  # a hard-edged disk
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(arr, quality=90):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def torchvision_resize_center_crop(img, size, resample):
    """torchvision Resize(size) + CenterCrop(size) on a PIL image, written out from torchvision's semantics:
    short side -> size, long side int(size * long / short); crop offset int(round((new - size) / 2))."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    img = img.convert("RGB").resize((new_w, new_h), resample)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)))


def make_mode(mode, w, h, seed):
    rgb = smooth_image(w, h, seed)
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        return Image.fromarray(rgb)
    if mode == "L":
        return Image.fromarray(rgb).convert("L")
    if mode == "RGBA":
        return Image.fromarray(np.concatenate([rgb, rng.integers(0, 256, (h, w, 1), dtype=np.uint8)], -1), "RGBA")
    if mode == "LA":
        return Image.fromarray(rgb).convert("L").convert("LA")
    if mode == "P":
        return Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if mode == "P_transparent":
        im = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        im.info["transparency"] = 3
        return im
    if mode == "CMYK":
        return Image.fromarray(rgb).convert("CMYK")
    raise ValueError(mode)


# ------------------------------------------------------------------------------------------------ Qwen2.5-VL


QWEN_CASES = [
    ("RGB", 300, 200, {}),
    ("L", 57, 91, {}),
    ("RGBA", 640, 480, {}),
    ("P_transparent", 123, 77, {}),
    ("CMYK", 200, 333, {}),
    ("LA", 90, 31, {}),
    ("RGB", 10, 12, {}),  # tiny: smart_resize scales up to min_pixels
    ("RGB", 1200, 900, {"max_pixels": 256 * 28 * 28}),  # downscaled under max_pixels
    ("P", 700, 140, {"min_pixels": 256 * 28 * 28, "max_pixels": 1280 * 28 * 28}),  # lmms-eval-like bounds
]


@pytest.mark.parametrize("mode,w,h,kw", QWEN_CASES)
def test_qwen2_5_vl_matches_transformers(mode, w, h, kw):
    from transformers import Qwen2VLImageProcessorPil

    img = make_mode(mode, w, h, seed=w + h)
    min_pixels = kw.get("min_pixels", P.QWEN_MIN_PIXELS)
    max_pixels = kw.get("max_pixels", P.QWEN_MAX_PIXELS)
    ref_proc = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
                                        temporal_patch_size=2, merge_size=2)
    ref = ref_proc(images=[img.copy()], return_tensors="np")
    patches, grid_thw = P.qwen2_5_vl_preprocess(img, min_pixels=min_pixels, max_pixels=max_pixels)
    np.testing.assert_array_equal(grid_thw, ref["image_grid_thw"][0])
    assert patches.shape == ref["pixel_values"].shape == (int(np.prod(grid_thw)), 1176)
    assert patches.dtype == np.float32
    assert np.abs(patches - ref["pixel_values"]).max() <= 1e-5


def test_qwen2_5_vl_448_crop_gives_1024_patches():
    # BLIP3o's I2I path: 448 bicubic + center crop, then the Qwen processor -> grid (1, 32, 32), 256 merged tokens
    img = Image.fromarray(P.eva_preprocess(Image.fromarray(smooth_image(640, 480)), 448))
    patches, grid = P.qwen2_5_vl_preprocess(img)
    assert tuple(grid) == (1, 32, 32) and patches.shape == (1024, 1176)


def test_qwen2_5_vl_rejects_extreme_aspect():
    with pytest.raises(P.BadImageError, match="aspect ratio below 200"):
        P.qwen2_5_vl_preprocess(Image.new("RGB", (4020, 20)))


# ------------------------------------------------------------------------------------------------ EVA / SigLIP


@pytest.mark.parametrize("w,h", [(640, 480), (480, 640), (451, 448), (448, 448), (300, 1000), (97, 61), (3, 2)])
def test_eva_equals_torchvision_recipe(w, h):
    img = Image.fromarray(smooth_image(w, h, seed=w * h))
    out = P.eva_preprocess(img, 448, draft=False)
    assert out.shape == (448, 448, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, torchvision_resize_center_crop(img, 448, Image.Resampling.BICUBIC))


@pytest.mark.parametrize("w,h", [(640, 480), (480, 652), (300, 220)])
def test_eva_equals_clip_image_processor(w, h):
    """transformers' CLIPImageProcessor configured as EvaClipImageTrainProcessor. Its center crop offset is
    `(new - size) // 2` where torchvision's is `round((new - size) / 2)`: they agree unless new - size = 3 mod 4,
    which these sizes avoid (the torchvision recipe is the one the original uses; see the test above)."""
    from transformers import CLIPImageProcessorPil

    img = Image.fromarray(smooth_image(w, h, seed=7))
    size = 224
    new_long = int(size * max(w, h) / min(w, h))
    assert (new_long - size) % 4 != 3
    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 resample=Image.Resampling.BICUBIC, image_mean=list(P.CLIP_MEAN), image_std=list(P.CLIP_STD))
    ref = proc(images=[img], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = P.normalize(P.eva_preprocess(img, size, draft=False), P.CLIP_MEAN, P.CLIP_STD)
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize("resample", [Image.Resampling.BILINEAR, Image.Resampling.BICUBIC])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_siglip_squash_equals_siglip_image_processor(resample, mode):
    from transformers import SiglipImageProcessorPil

    img = make_mode(mode, 333, 190, seed=3)
    size = 96
    proc = SiglipImageProcessorPil(size={"height": size, "width": size}, resample=resample)
    ref = proc(images=[img], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = P.normalize(P.siglip_preprocess(img, size, mode="squash", resample=resample, draft=False), P.SIGLIP_MEAN, P.SIGLIP_STD)
    assert np.abs(ours - ref).max() <= 1e-5


def test_siglip_crop_equals_torchvision_recipe():
    img = Image.fromarray(smooth_image(700, 530, seed=5))
    out = P.siglip_preprocess(img, 512, mode="crop", draft=False)
    np.testing.assert_array_equal(out, torchvision_resize_center_crop(img, 512, Image.Resampling.BILINEAR))
    with pytest.raises(ValueError, match="squash"):
        P.siglip_preprocess(img, 512, mode="pad")


@pytest.mark.parametrize("w,h", [(2250, 1500), (1500, 2000)])
def test_jpeg_draft_within_tolerance(w, h):
    data = jpeg(smooth_image(w, h, seed=11))
    exact = P.eva_preprocess(Image.open(io.BytesIO(data)), 448, draft=False).astype(int)
    img = Image.open(io.BytesIO(data))
    fast = P.eva_preprocess(img, 448, draft=True).astype(int)
    assert img.size == ((w + 1) // 2, (h + 1) // 2)  # decoded at 1/2 scale in the DCT
    diff = np.abs(fast - exact)
    assert diff.mean() <= 1.0 and np.percentile(diff, 99) <= 4 and diff.max() <= 12, (diff.mean(), diff.max())
    # SigLIP squash through the same mechanism
    s_exact = P.siglip_preprocess(Image.open(io.BytesIO(data)), 512, draft=False).astype(int)
    s_fast = P.siglip_preprocess(Image.open(io.BytesIO(data)), 512, draft=True).astype(int)
    d = np.abs(s_fast - s_exact)
    assert d.mean() <= 1.0 and d.max() <= 12
    # draft never applies when it would decode below the output size (1024x768 -> 448 keeps full decode)
    small = jpeg(smooth_image(1024, 768, seed=2))
    im = Image.open(io.BytesIO(small))
    np.testing.assert_array_equal(P.eva_preprocess(im, 448, draft=True), P.eva_preprocess(Image.open(io.BytesIO(small)), 448, draft=False))
    assert im.size == (1024, 768)


def test_elongated_images_use_crop_window_within_tolerance():
    img = Image.fromarray(smooth_image(4000, 100, seed=9))  # 40:1 -> crop-window path
    out = P.eva_preprocess(img, 64, draft=False).astype(int)
    ref = torchvision_resize_center_crop(img, 64, Image.Resampling.BICUBIC).astype(int)
    diff = np.abs(out - ref)
    assert diff.mean() <= 0.5 and diff.max() <= 3


# ------------------------------------------------------------------------------------------------ modes, checks


def test_mode_conversions():
    # transparency composited on white
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # one opaque red-ish pixel, the rest fully transparent
    out = np.asarray(P.to_rgb(Image.fromarray(rgba, "RGBA")))
    assert tuple(out[0, 0]) == (200, 0, 0) and (out[1:] == 255).all()
    la = Image.fromarray(np.stack([np.full((3, 3), 10, np.uint8), np.zeros((3, 3), np.uint8)], -1), "LA")
    assert (np.asarray(P.to_rgb(la)) == 255).all()
    # palette with and without a transparent index
    pal = Image.fromarray(smooth_image(8, 8)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    np.testing.assert_array_equal(np.asarray(P.to_rgb(pal)), np.asarray(pal.convert("RGB")))
    pal.info["transparency"] = int(np.asarray(pal)[0, 0])
    assert (np.asarray(P.to_rgb(pal))[0, 0] == 255).all()
    pa = Image.fromarray(smooth_image(8, 8)).convert("P").convert("PA")
    assert P.to_rgb(pa).mode == "RGB"
    # CMYK, 1-bit
    cmyk = Image.fromarray(smooth_image(8, 8)).convert("CMYK")
    np.testing.assert_array_equal(np.asarray(P.to_rgb(cmyk)), np.asarray(cmyk.convert("RGB")))
    one = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    np.testing.assert_array_equal(np.asarray(P.to_rgb(one))[0, :, 0], [0, 255])
    # 16-bit greyscale is scaled, not clipped (PIL's convert would make every value > 255 white)
    v16 = np.array([[0, 257, 257 * 100, 65535]], np.uint16)
    im16 = Image.fromarray(v16)
    assert im16.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(P.to_rgb(im16))[0, :, 1], [0, 1, 100, 255])
    buf = io.BytesIO()
    im16.save(buf, "PNG")
    np.testing.assert_array_equal(np.asarray(P.to_rgb(Image.open(io.BytesIO(buf.getvalue()))))[0, :, 2], [0, 1, 100, 255])
    # 32-bit int: 16-bit range when it exceeds 255, else taken as 8-bit
    np.testing.assert_array_equal(np.asarray(P.to_rgb(Image.fromarray(v16.astype(np.int32))))[0, :, 0], [0, 1, 100, 255])
    np.testing.assert_array_equal(np.asarray(P.to_rgb(Image.fromarray(np.array([[0, 7, 255]], np.int32))))[0, :, 0], [0, 7, 255])
    # float: [0, 1] when it fits, else clipped to [0, 255]
    np.testing.assert_array_equal(np.asarray(P.to_rgb(Image.fromarray(np.array([[0, 0.5, 1]], np.float32))))[0, :, 0], [0, 128, 255])
    np.testing.assert_array_equal(np.asarray(P.to_rgb(Image.fromarray(np.array([[-3, 30, 300]], np.float32))))[0, :, 0], [0, 30, 255])
    for im in (im16, cmyk, la, pal, one):
        assert P.eva_preprocess(im, 16, draft=False).shape == (16, 16, 3)


def test_check_image_and_bad_inputs():
    P.check_image(Image.new("RGB", (64, 48)))
    with pytest.raises(P.BadImageError, match="shorter side must be at least 16"):
        P.check_image(Image.new("RGB", (100, 8)))
    with pytest.raises(P.BadImageError, match="aspect ratio 25.0 exceeds the limit 20"):
        P.check_image(Image.new("RGB", (1000, 40)))
    with pytest.raises(P.BadImageError, match="cannot open image"):
        P.open_image(b"definitely not an image")
    data = jpeg(smooth_image(64, 64))
    truncated = data[: len(data) // 2]
    with pytest.raises(P.BadImageError, match="cannot decode image"):
        P.eva_preprocess(P.open_image(truncated), 32)
    # tiny images are upsampled rather than rejected by the preprocess functions themselves
    assert P.eva_preprocess(Image.new("RGB", (1, 1), (9, 8, 7)), 32).shape == (32, 32, 3)
    assert (P.siglip_preprocess(Image.new("RGB", (1, 1), (9, 8, 7)), 32) == [9, 8, 7]).all()


def test_normalize_numpy_and_jax():
    import jax
    import jax.numpy as jnp

    x = RNG.integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    want = (x.astype(np.float64) / 255 - np.array(P.CLIP_MEAN)) / np.array(P.CLIP_STD)
    got_np = P.normalize(x, P.CLIP_MEAN, P.CLIP_STD)
    assert isinstance(got_np, np.ndarray) and got_np.dtype == np.float32
    assert np.abs(got_np - want).max() < 1e-5
    got_jax = jax.jit(lambda a: P.normalize(a, P.CLIP_MEAN, P.CLIP_STD))(jnp.asarray(x))
    assert got_jax.dtype == jnp.float32
    assert np.abs(np.asarray(got_jax) - want).max() < 1e-5


def test_no_torch_or_jax_import_at_module_level():
    import subprocess
    import sys

    code = "import sys, blip3o_jax.preprocessing as P; print('torch' in sys.modules, 'jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"], out
