"""The whole system on a laptop CPU in a few minutes: `make demo` (= `python -m blip3o_jax.demo`).

1. writes synthetic WebDataset shards of single coloured shapes with captions ("a large red circle"): the data
   generator's palette, shapes and sizes (blip3o_jax/data/synthetic.py), centred on one background, drawn at 48 px
   and centre-cropped to 32 px; and builds a tiny tokenizer;
2. trains the `tiny` config (configs/tiny.py) with the real train loop: frozen 2-layer Qwen3-style backbone +
   latent queries + a small Lumina-Next DiT, flow matching, Orbax checkpoints;
3. samples held-out prompts (fresh captions and noise, never-seen samples) from the run's latest checkpoint with
   `blip3o-sample t2i --model RUN_DIR` (blip3o_jax/sample.py, the path a user takes after training; one PNG per
   prompt in DIR/samples/) and writes a PNG grid with the prompts as captions;
4. scores prompt following automatically: the dominant colour of each sample (nearest palette colour, background
   excluded) against the prompt's colour, and the shape (best IoU of the coloured region against the six shape
   templates) against the prompt's shape. The same scorer run on real images of the data is printed as the ceiling.

The tiny DiT generates pixels directly (a 32x32 image = 8x8 patches of 4x4x3), not EVA-CLIP features: the release's
second stage (an SDXL UNet decoding the features to pixels, the release's `diffusion-decoder/`) cannot run here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_WORKDIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "blip3o_demo")


# ---------------------------------------------------------------------------------------------------------------
# scoring


def _palette():
    from blip3o_jax.data import synthetic

    names = list(synthetic.COLORS)
    colours = np.array([synthetic.COLORS[n] for n in names], np.float32)
    backgrounds = np.array(synthetic.BACKGROUNDS, np.float32)
    return names, colours, backgrounds


def dominant_colour(image: np.ndarray) -> tuple[str | None, np.ndarray]:
    """(colour name, object mask): the most frequent object colour of an image (each pixel takes its nearest
    palette colour, backgrounds excluded), and the pixels closer to that colour than to the image's background."""
    names, colours, backgrounds = _palette()
    px = image.reshape(-1, 3).astype(np.float32)
    table = np.concatenate([colours, backgrounds])
    dist = ((px[:, None, :] - table[None]) ** 2).sum(-1)
    nearest = np.argmin(dist, axis=1)
    counts = np.bincount(nearest, minlength=len(table))
    if counts[: len(names)].sum() == 0:
        return None, np.zeros(image.shape[:2], bool)
    best = int(np.argmax(counts[: len(names)]))
    background = len(names) + int(np.argmax(counts[len(names):]))
    return names[best], (dist[:, best] < dist[:, background]).reshape(image.shape[:2])


def _render(shape: str, size: int, cx: float, cy: float, radius: float, supersample: int = 4) -> np.ndarray:
    """Soft (anti-aliased) mask of a shape drawn with the data generator's own code, values in [0, 1]."""
    from PIL import Image, ImageDraw

    from blip3o_jax.data import synthetic

    k = supersample
    img = Image.new("L", (size * k, size * k), 0)
    # pixel centres: the generator draws in continuous coordinates on a size x size canvas
    synthetic._draw(ImageDraw.Draw(img), shape, 255, cx * k, cy * k, radius * k)  # noqa: SLF001
    return np.asarray(img.resize((size, size), Image.BOX), np.float32) / 255.0


def classify_shape(mask: np.ndarray) -> str | None:
    """The shape whose template (drawn at the region's centroid, best radius) overlaps the region most (soft IoU)."""
    from blip3o_jax.data import synthetic

    if mask.sum() < 3:
        return None
    size = mask.shape[0]
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    area = float(mask.sum())
    m = mask.astype(np.float32)
    best, best_iou = None, -1.0
    for shape in synthetic.SHAPES:
        for scale in np.linspace(0.8, 1.3, 11):
            radius = scale * np.sqrt(area / np.pi)  # around the radius of a disc of the region's area
            t = _render(shape, size, cx, cy, radius)
            iou = np.minimum(t, m).sum() / max(np.maximum(t, m).sum(), 1e-6)
            if iou > best_iou:
                best, best_iou = shape, iou
    return best


def parse_caption(caption: str) -> tuple[str | None, str | None]:
    from blip3o_jax.data import synthetic

    words = caption.split()
    colour = next((w for w in words if w in synthetic.COLORS), None)
    shape = next((w for w in words if w in synthetic.SHAPES), None)
    return colour, shape


def score(images: np.ndarray, captions) -> dict:
    colour_hits, shape_hits, marks = [], [], []
    for img, cap in zip(images, captions):
        want_colour, want_shape = parse_caption(cap)
        colour, mask = dominant_colour(img)
        shape = classify_shape(mask)
        colour_hits.append(colour == want_colour)
        shape_hits.append(shape == want_shape)
        marks.append("+" if colour == want_colour else "-")
    return {"colour": float(np.mean(colour_hits)), "shape": float(np.mean(shape_hits)), "marks": marks}


# ---------------------------------------------------------------------------------------------------------------
# the demo


IMAGE_SIZE = 32  # the tiny config's image side
ZOOM = 1.5  # scenes are drawn on a 1.5x larger canvas and centre-cropped: bigger shapes, more pixels on their outline


BACKGROUND = (120, 120, 120)  # one of the data generator's backgrounds (the scorer excludes it)


def demo_scene(seed: int, i: int) -> tuple[np.ndarray, str]:
    """(uint8 image (32, 32, 3), caption) of scene i: one shape of the data generator's palette, shapes and sizes
    (blip3o_jax/data/synthetic.py), centred on one grey background, drawn at 48 px and centre-cropped to 32 px
    (shapes fill more of the image: a small star is 10 px wide instead of 6).

    Each caption names exactly one image: the demo asks whether a generated image follows its caption, not whether
    the model reproduces position and background variety, which a 3-layer DiT cannot also learn in minutes (with
    random positions and backgrounds the shapes stayed blobs; see the README)."""
    from PIL import Image, ImageDraw

    from blip3o_jax.data import synthetic

    rng = np.random.default_rng([seed, i])
    colour = list(synthetic.COLORS)[rng.integers(len(synthetic.COLORS))]
    shape = synthetic.SHAPES[rng.integers(len(synthetic.SHAPES))]
    size = list(synthetic.SIZES)[rng.integers(len(synthetic.SIZES))]
    canvas = int(round(IMAGE_SIZE * ZOOM))
    image = Image.new("RGB", (canvas, canvas), BACKGROUND)
    synthetic._draw(ImageDraw.Draw(image), shape, synthetic.COLORS[colour], canvas / 2, canvas / 2,  # noqa: SLF001
                    synthetic.SIZES[size] * canvas / 2)
    off = (canvas - IMAGE_SIZE) // 2
    return np.asarray(image)[off:off + IMAGE_SIZE, off:off + IMAGE_SIZE], f"a {size} {colour} {shape}"


def _jpeg(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_shards(out: str, num_samples: int, seed: int = 0, per_shard: int = 1000) -> list[str]:
    """WebDataset shards of `demo_scene`s (`<key>.jpg` + `<key>.txt`), as the data pipeline reads them."""
    from blip3o_jax.data import synthetic

    os.makedirs(out, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, num_samples, per_shard)):
        members = []
        for i in range(start, min(num_samples, start + per_shard)):
            image, caption = demo_scene(seed, i)
            members.append((f"{i:08d}", {"jpg": _jpeg(image), "txt": caption}))
        paths.append(os.path.join(out, f"shapes-{shard:06d}.tar"))
        synthetic.write_tar(paths[-1], members)
    return paths


def held_out_prompts(n: int, seed: int = 999_999) -> tuple[list[str], np.ndarray]:
    """Captions and real images of fresh scenes (another seed than the training shards)."""
    import io

    from PIL import Image

    captions, images = [], []
    for i in range(n):
        image, caption = demo_scene(seed, i)
        captions.append(caption)
        images.append(np.asarray(Image.open(io.BytesIO(_jpeg(image))).convert("RGB")))  # as the training images
    return captions, np.stack(images)


def sample_with_cli(run_dir: str, captions, out: str, config) -> tuple[np.ndarray, dict]:
    """(uint8 images (N, 32, 32, 3) in prompt order, the CLI's run record): the held-out prompts through
    `blip3o-sample t2i --model RUN_DIR` (the path a user takes after training; in-process, so the warm JAX runtime
    is reused), with the run's own sampler settings (config.flow). The tiny DiT generates pixels: the CLI writes
    its pixel grid as the image, no decoder involved."""
    import shutil

    from PIL import Image

    from blip3o_jax import sample

    if os.path.isdir(out):  # the CLI skips finished outputs: a rerun must not keep an older checkpoint's images
        shutil.rmtree(out)
    os.makedirs(out)
    prompts_file = os.path.join(os.path.dirname(out), "held_out_prompts.txt")
    with open(prompts_file, "w") as f:
        f.write("".join(c + "\n" for c in captions))
    flow = config.get("flow", {})
    args = ["t2i", "--model", run_dir, "--prompts", prompts_file, "--out", out,
            "--dit_steps", str(int(flow.get("num_inference_steps", 30))),
            "--dit_guidance", str(float(flow.get("guidance_scale", 3.0))), "--batch", str(len(captions)),
            "--seed", "1234", "--progress=false"]
    print("[demo]   blip3o-sample " + " ".join(args), flush=True)
    record = sample.run(args)
    images = np.stack([np.asarray(Image.open(os.path.join(out, f"{i:05d}_00.png")).convert("RGB"))
                       for i in range(len(captions))])
    return images, {**record, "out": out}


DEFAULT_MAX_TRAIN_SECONDS = 480.0  # `make demo` stays within 10 minutes on a slow or busy machine


def run(workdir: str = DEFAULT_WORKDIR, *, steps: int | None = None, num_samples: int = 4000, num_prompts: int = 24,
        overrides: dict | None = None, fresh: bool = True, max_train_seconds: float | None = None) -> dict:
    import shutil

    import jax

    from blip3o_jax.cli import load_config
    from blip3o_jax.data import synthetic
    from blip3o_jax.data.tokenizer import build_tiny_tokenizer
    from blip3o_jax import sampling, train as train_lib

    t_start = time.perf_counter()
    if fresh and os.path.isdir(workdir):
        shutil.rmtree(workdir)
    data_dir = os.path.join(workdir, "data")
    run_dir = os.path.join(workdir, "run")
    print(f"[demo] 1/4 synthetic data: {num_samples} single-shape scenes (32x32) + tiny tokenizer in {data_dir}",
          flush=True)
    if not os.path.isdir(os.path.join(data_dir, "shards")):
        write_shards(os.path.join(data_dir, "shards"), num_samples, seed=0)
        build_tiny_tokenizer(os.path.join(data_dir, "tokenizer"))
    config = load_config(os.path.join(HERE, "configs", "tiny.py") + ":" + data_dir, overrides or {})
    if steps is not None:
        config.train.total_steps = int(steps)
    if max_train_seconds is not None:
        config.train.max_seconds = float(max_train_seconds)
    print(f"[demo] 2/4 training configs/tiny.py for {config.train.total_steps} steps on "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s) -> {run_dir}", flush=True)
    t_train = time.perf_counter()
    last = train_lib.train(config, run_dir)
    train_s = time.perf_counter() - t_train

    print("[demo] 3/4 sampling held-out prompts from the checkpoint with blip3o-sample t2i", flush=True)
    from blip3o_jax.training import checkpoint as ckpt_lib

    checkpointer = ckpt_lib.Checkpointer(run_dir, save_every=0)
    trained_steps = checkpointer.latest_step()
    checkpointer.close()
    if trained_steps < int(config.train.total_steps):
        print(f"[demo] the training time budget ran out after {trained_steps} of {config.train.total_steps} steps "
              "(a slow or busy machine): the samples will be weaker", flush=True)
    captions, real = held_out_prompts(num_prompts)
    images, sample_record = sample_with_cli(run_dir, captions, os.path.join(workdir, "samples"), config)

    print("[demo] 4/4 scoring prompt following", flush=True)
    result = score(images, captions)
    ceiling = score(real, captions)
    png = os.path.join(workdir, "samples.png")
    sampling.image_grid(images, captions, marks=result["marks"]).save(png)
    sampling.image_grid(real, captions).save(os.path.join(workdir, "real.png"))
    total_s = time.perf_counter() - t_start
    summary = {
        "colour_match": result["colour"], "shape_match": result["shape"],
        "colour_match_real_images": ceiling["colour"], "shape_match_real_images": ceiling["shape"],
        "chance_colour": 1 / len(synthetic.COLORS), "chance_shape": 1 / len(synthetic.SHAPES),
        "final_loss": last.get("loss"), "train_steps": int(trained_steps), "train_s": round(train_s, 1),
        "total_s": round(total_s, 1), "samples_png": png, "samples_dir": sample_record["out"],
        "sample_images_per_s": sample_record["images_per_s"],
    }
    with open(os.path.join(workdir, "score.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"[demo] samples: {png} (real images of the same prompts: {os.path.join(workdir, 'real.png')})")
    print(f"[demo] prompt-following score: colour {result['colour']:.0%} (chance {summary['chance_colour']:.0%}, "
          f"real images {ceiling['colour']:.0%}), shape {result['shape']:.0%} (chance {summary['chance_shape']:.0%}, "
          f"real images {ceiling['shape']:.0%}); {total_s:.0f} s in all, {train_s:.0f} s training")
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=DEFAULT_WORKDIR)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: configs/tiny.py)")
    p.add_argument("--num-samples", type=int, default=4000)
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--max-train-seconds", type=float, default=DEFAULT_MAX_TRAIN_SECONDS,
                   help="stop training (with a checkpoint) after this long, so that the demo ends within 10 minutes "
                        "on a busy machine (default: %(default)s; 0 = no limit)")
    args = p.parse_args(argv)
    import logging

    logging.getLogger("absl").setLevel(logging.WARNING)
    run(args.workdir, steps=args.steps, num_samples=args.num_samples, num_prompts=args.num_prompts,
        max_train_seconds=args.max_train_seconds or None)


if __name__ == "__main__":
    sys.exit(main())
