"""Procedurally generated scenes of coloured shapes with compositional captions, written as WebDataset tar
shards and/or JSONL, for tests, benchmarks and the demo.

Each sample has `<key>.jpg` (the scene), `<key>.txt` (e.g. "a small red circle above a blue square") and
`<key>.json` (the scene's structure: shapes, colours, sizes, centres, relation), so a trainer can score whether a
generated image follows its prompt. Sample i depends only on (seed, i), not on the shard layout.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import time
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
COLORS = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (40, 75, 215),
    "yellow": (240, 205, 30),
    "purple": (135, 55, 175),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SIZES = {"small": 0.2, "medium": 0.3, "large": 0.42}  # object diameter as a fraction of the short side
RELATIONS = ("above", "below", "to the left of", "to the right of")
BACKGROUNDS = ((200, 200, 200), (120, 120, 120), (225, 215, 190), (170, 200, 215))
I2T_QUESTIONS = ("What is in the image?", "Describe the image.", "Which shapes do you see?")
TEXT_QUESTIONS = ("What colour is the {shape} in this scene: {caption}?",)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.94, cy + r * 0.8), (cx - r * 0.94, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if shape == "hexagon":
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.arange(6) * np.pi / 3]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a)))
        return pts
    raise ValueError(shape)


def _draw(draw: ImageDraw.ImageDraw, shape: str, color, cx: float, cy: float, r: float) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=color)


def _describe(obj: dict, with_size: bool) -> str:
    words = ([obj["size"]] if with_size else []) + [obj["color"], obj["shape"]]
    return "a " + " ".join(words)


def make_scene(rng: np.random.Generator, width: int, height: int, max_objects: int = 2,
               size_words: bool = True) -> tuple[Image.Image, str, dict]:
    """One scene: 1..max_objects shapes of distinct (colour, shape), a caption, and its structure."""
    n = int(rng.integers(1, max_objects + 1))
    colors, shapes = list(COLORS), list(SHAPES)
    short = min(width, height)
    objects = []
    used = set()
    while len(objects) < n:
        color = colors[rng.integers(len(colors))]
        shape = shapes[rng.integers(len(shapes))]
        if (color, shape) in used:
            continue
        used.add((color, shape))
        size = list(SIZES)[rng.integers(len(SIZES))]
        objects.append({"shape": shape, "color": color, "size": size})
    bg_choices = [b for b in BACKGROUNDS if all(np.abs(np.subtract(b, COLORS[o["color"]])).sum() > 90
                                               for o in objects)]
    background = bg_choices[rng.integers(len(bg_choices))] if bg_choices else BACKGROUNDS[0]
    relation = None
    if n == 1:
        centres = [(0.5 + rng.uniform(-0.08, 0.08), 0.5 + rng.uniform(-0.08, 0.08))]
    elif n == 2:
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        a, b = rng.uniform(0.22, 0.3), rng.uniform(0.7, 0.78)  # first object's and second's coordinate
        o = (rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65))
        centres = {
            "above": [(o[0], a), (o[1], b)], "below": [(o[0], b), (o[1], a)],
            "to the left of": [(a, o[0]), (b, o[1])], "to the right of": [(b, o[0]), (a, o[1])],
        }[relation]
    else:  # several objects spread over a grid of cells, no relation words
        cells = rng.permutation(9)[:n]
        centres = [((c % 3 + 0.5) / 3 + rng.uniform(-0.05, 0.05), (c // 3 + 0.5) / 3 + rng.uniform(-0.05, 0.05))
                   for c in cells]
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    for obj, (cx, cy) in zip(objects, centres):
        radius = SIZES[obj["size"]] * short / 2 * (0.8 if n > 2 else 1.0)
        obj["center"] = [round(float(cx), 4), round(float(cy), 4)]
        obj["radius"] = round(float(radius / short), 4)
        _draw(draw, obj["shape"], COLORS[obj["color"]], cx * width, cy * height, radius)
    parts = [_describe(o, size_words) for o in objects]
    if n == 1:
        caption = parts[0]
    elif n == 2:
        caption = f"{parts[0]} {relation} {parts[1]}"
    else:
        caption = ", ".join(parts[:-1]) + " and " + parts[-1]
    meta = {"caption": caption, "objects": objects, "relation": relation, "width": width, "height": height,
            "background": list(background)}
    return image, caption, meta


def sample(seed: int, i: int, *, image_size: int | None = 64, min_size: int = 400, max_size: int = 900,
           max_objects: int = 2, size_words: bool = True, quality: int = 90) -> dict:
    """Sample i of the generator seeded by `seed`: {"key", "jpg" (bytes), "txt", "json"}."""
    rng = np.random.default_rng([seed, i])
    if image_size:
        width = height = image_size
    else:
        width, height = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    image, caption, meta = make_scene(rng, width, height, max_objects, size_words)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return {"key": f"{i:08d}", "jpg": buf.getvalue(), "txt": caption, "json": meta}


def write_tar(path: str, samples: Iterable[tuple[str, dict[str, bytes | str]]]) -> None:
    """A WebDataset shard: for each (key, {ext: payload}) the members `<key>.<ext>`, in order."""
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for key, fields in samples:
            for ext, payload in fields.items():
                data = payload.encode("utf-8") if isinstance(payload, str) else payload
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def generate(out: str, num_samples: int, *, samples_per_shard: int = 1000, image_size: int | None = 64,
             min_size: int = 400, max_size: int = 900, seed: int = 0, max_objects: int = 2,
             size_words: bool = True, formats: Sequence[str] = ("tar", "jsonl"), prefix: str = "shapes") -> dict:
    """Writes `out/<prefix>-NNNNNN.tar` shards and/or `out/jsonl/{t2i,i2t,text}.jsonl` + `out/jsonl/images/`.
    Returns {"shards": [...], "jsonl": {...}}. A count or size that cannot make a data set is a ValueError."""
    check_options(num_samples=num_samples, samples_per_shard=samples_per_shard, image_size=image_size or 0,
                  min_size=min_size, max_size=max_size, max_objects=max_objects)
    unknown = sorted(set(formats) - {"tar", "jsonl"})
    if unknown or not formats:
        raise ValueError(f"formats must be 'tar' and/or 'jsonl', got {list(formats)}")
    os.makedirs(out, exist_ok=True)
    opts = dict(image_size=image_size, min_size=min_size, max_size=max_size, max_objects=max_objects,
                size_words=size_words)
    result: dict = {"shards": [], "jsonl": {}}
    json_dir = os.path.join(out, "jsonl")
    files = {}
    if "jsonl" in formats:
        os.makedirs(os.path.join(json_dir, "images"), exist_ok=True)
        for task in ("t2i", "i2t", "text"):
            result["jsonl"][task] = os.path.join(json_dir, f"{task}.jsonl")
            files[task] = open(result["jsonl"][task], "w", encoding="utf-8")
    try:
        for shard_id, start in enumerate(range(0, num_samples, samples_per_shard)):
            members = []
            for i in range(start, min(num_samples, start + samples_per_shard)):
                s = sample(seed, i, **opts)
                meta_bytes = json.dumps(s["json"], sort_keys=True)
                members.append((s["key"], {"jpg": s["jpg"], "txt": s["txt"], "json": meta_bytes}))
                if files:
                    rel = f"images/{s['key']}.jpg"
                    with open(os.path.join(json_dir, rel), "wb") as f:
                        f.write(s["jpg"])
                    q = I2T_QUESTIONS[i % len(I2T_QUESTIONS)]
                    obj = s["json"]["objects"][0]
                    files["t2i"].write(json.dumps({"id": s["key"], "image": rel, "caption": s["txt"]}) + "\n")
                    files["i2t"].write(json.dumps({"id": s["key"], "image": rel, "conversations": [
                        {"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": s["txt"]}]}) + "\n")
                    files["text"].write(json.dumps({"id": s["key"], "conversations": [
                        {"from": "human", "value": TEXT_QUESTIONS[0].format(shape=obj["shape"], caption=s["txt"])},
                        {"from": "gpt", "value": obj["color"]}]}) + "\n")
            if "tar" in formats:
                path = os.path.join(out, f"{prefix}-{shard_id:06d}.tar")
                write_tar(path, members)
                result["shards"].append(path)
    finally:
        for f in files.values():
            f.close()
    return result


def check_options(*, num_samples: int, samples_per_shard: int, image_size: int, min_size: int, max_size: int,
                  max_objects: int) -> None:
    """ValueError, as one sentence naming the option, for values that cannot make a data set (checked before
    anything is written)."""
    if num_samples < 1:
        raise ValueError(f"--num-samples must be at least 1, got {num_samples}")
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    if image_size < 0:
        raise ValueError(f"--image-size must be 0 (random sizes) or a positive side in px, got {image_size}")
    if image_size == 0 and not 1 <= min_size <= max_size:
        raise ValueError(f"--min-size/--max-size must satisfy 1 <= min <= max, got {min_size} and {max_size}")
    if not 1 <= max_objects <= 9:  # make_scene spreads 3+ objects over a 3x3 grid of cells
        raise ValueError(f"--max-objects must be between 1 and 9, got {max_objects}")


def caption_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Captions (no images drawn) covering the generator's vocabulary, e.g. to train a tiny tokenizer."""
    texts = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 7])
        _, caption, meta = make_scene(rng, 32, 32, max_objects=3 if i % 3 == 0 else 2, size_words=i % 2 == 0)
        texts.append(caption)
        obj = meta["objects"][0]
        texts.append(TEXT_QUESTIONS[0].format(shape=obj["shape"], caption=caption))
    texts.extend(I2T_QUESTIONS)
    return texts


def main(argv: Sequence[str] | None = None) -> None:
    """The CLI. A bad option is one `error: ...` line on stderr with exit status 2 (argparse's usage is not
    repeated: `--help` shows it), as for every CLI of the package."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            self.exit(2, f"error: {message}\n")

    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64,
                   help="square image side in px; 0 = random width/height in [--min-size, --max-size]")
    p.add_argument("--min-size", type=int, default=400)
    p.add_argument("--max-size", type=int, default=900)
    p.add_argument("--max-objects", type=int, default=2, help="1 = a single centred shape per image")
    p.add_argument("--no-size-words", action="store_true", help="captions without small/medium/large")
    p.add_argument("--format", choices=("tar", "jsonl", "both"), default="both")
    p.add_argument("--prefix", default="shapes")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        check_options(num_samples=a.num_samples, samples_per_shard=a.samples_per_shard, image_size=a.image_size,
                      min_size=a.min_size, max_size=a.max_size, max_objects=a.max_objects)
    except ValueError as e:
        p.error(str(e))
    if not a.prefix or os.sep in a.prefix or a.prefix.startswith("."):
        p.error(f"--prefix must be a plain file-name prefix, got {a.prefix!r}")
    t0 = time.perf_counter()
    formats = ("tar", "jsonl") if a.format == "both" else (a.format,)
    try:
        res = generate(a.out, a.num_samples, samples_per_shard=a.samples_per_shard, image_size=a.image_size or None,
                       min_size=a.min_size, max_size=a.max_size, seed=a.seed, max_objects=a.max_objects,
                       size_words=not a.no_size_words, formats=formats, prefix=a.prefix)
    except OSError as e:  # --out under a file, not writable, disk full
        p.error(f"--out {a.out}: {e.strerror or e}" + (f" ({e.filename})" if e.filename else ""))
    print(json.dumps({"num_samples": a.num_samples, "shards": len(res["shards"]), "jsonl": res["jsonl"],
                      "seconds": round(time.perf_counter() - t0, 2)}))
