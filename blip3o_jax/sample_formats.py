"""Benchmark inputs and output layouts of `blip3o-sample` (`blip3o_jax/sample.py`): readers and writers only.

Text-to-image (`--format` of `t2i`):

- `png` (default): prompts from `--prompt`, a text file (one a line) or a JSONL file (`prompt` field); writes
  `<index:05d>_<k:02d>.png` per image, `prompts.jsonl` (index, key, prompt) and, when the run is complete, a
  captioned `contact_sheet.png`.
- `geneval`: GenEval's `evaluation_metadata.jsonl` (or BLIP3-o's `geneval_prompt.jsonl`, same order); writes
  `<index:05d>/metadata.jsonl` (the prompt's metadata as ONE JSON object: the scorer reads it with `json.load`)
  and `<index:05d>/samples/<k:04d>.png`. The scorer keeps only all-digit folders and `\\d+.png` samples, so the
  run's own files (run.json) sit beside them harmlessly.
- `dpg`: DPG-Bench's `prompts/` folder (`<stem>.txt`, one paragraph each); writes one 2x2 grid `<stem>.png` of 4
  tiles (left to right, top to bottom: images 0, 1, 2, 3). The scorer reads every file of the folder, so nothing
  else is written there: run.json goes beside the folder as `<folder>.run.json`.
- `wise`: WISE's JSON lists (`{Prompt, prompt_id, Category, ...}`; several files comma-separated or a glob);
  writes `<prompt_id>.png` (no zero padding). `--wise_version legacy|verified` selects the id -> category table
  (the two releases bucket ids 401-1000 differently) and refuses a file of the other release.

Image-to-text (`--format` of `i2t`):

- `jsonl` (default): one row per question, `{index, id, image, question, prediction, ...}`, in input order.
- `mme`: input a JSONL of `{question_id, image, question, answer, category}` (lmms-lab/MME exported); writes
  `predictions.jsonl` and the MME eval tool's `<category>.txt` files: `image_name \\t question \\t answer \\t
  prediction`, the two questions of an image on consecutive lines, tabs/newlines removed from predictions.

Every file is written through `atomic_write` (a hidden temporary beside it, then `os.replace`), so a killed run
never leaves a half-written output; `clean_partials` removes the temporaries a killed run left behind. Outputs go
through the path layer of `blip3o_jax/paths.py`: `--out gs://BUCKET/...` writes every file (images, JSONL, run.json)
to the bucket, each object uploaded whole under its final name (an object appears only once complete), and the
resume scan reads the bucket's listing.
"""
from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import re
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from blip3o_jax import paths as fs

T2I_FORMATS = ("png", "geneval", "dpg", "wise")
I2T_FORMATS = ("jsonl", "mme")
WISE_VERSIONS = ("legacy", "verified")
PARTIAL_SUFFIX = ".partial"

# WISE: prompt_id ranges of each category (PKU-YuanGroup/WISE `Calculate.py`; WISE_Verified re-bucketed 401-1000)
WISE_CATEGORIES = {
    "legacy": (("culture", 1, 400), ("time", 401, 567), ("space", 568, 700), ("biology", 701, 800),
               ("physics", 801, 900), ("chemistry", 901, 1000)),
    "verified": (("culture", 1, 400), ("time", 401, 520), ("space", 521, 640), ("biology", 641, 760),
                 ("physics", 761, 880), ("chemistry", 881, 1000)),
}
# MME's 14 categories (lmms-eval `tasks/mme/utils.py`), perception first
MME_CATEGORIES = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR", "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."


class FormatError(ValueError):
    """An input file that cannot be read as the format says (one sentence naming the file and the problem)."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One unit of work: a prompt (t2i) or an image + question (i2t) or an image (i2i)."""

    index: int  # position in the input (line number among non-blank lines, file order, ...)
    key: str  # the name the outputs are written under (GenEval index, DPG stem, WISE prompt_id, image stem)
    text: str = ""  # prompt (t2i) or question (i2t)
    image: str | None = None  # image path (i2t, i2i)
    meta: dict = dataclasses.field(default_factory=dict)  # the input record, written back where a format wants it


@dataclasses.dataclass(frozen=True)
class Skipped:
    index: int
    key: str
    reason: str

    def as_dict(self) -> dict:
        return {"index": self.index, "key": self.key, "reason": self.reason}


# ----------------------------------------------------------------------------------------------------------------
# atomic files


def atomic_write(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    """Writes `path` through a hidden `.<name>.partial` file in the same folder, renamed into place when complete
    (a remote path: the object itself, which appears only when complete)."""
    fs.atomic_write(path, write, tmp_name=f".{fs.basename(path)}{PARTIAL_SUFFIX}")


def write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_json(path: str, obj: Any, indent: int | None = 2) -> None:
    write_bytes(path, (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode())


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes (PIL, default compression: the same array always gives the same bytes)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: str, image: np.ndarray) -> None:
    write_bytes(path, png_bytes(image))


def clean_partials(folder: str) -> int:
    """Removes the temporaries of `atomic_write` left under `folder` by a killed run; returns how many."""
    removed = 0
    if fs.is_remote(folder) or not os.path.isdir(folder):
        return 0  # remote outputs are written whole under their final names: no temporaries to clean
    for root, _, files in os.walk(folder):
        for name in files:
            if name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
                os.remove(os.path.join(root, name))
                removed += 1
    return removed


# ----------------------------------------------------------------------------------------------------------------
# reading inputs


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, expected a file") from None
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jsonl_records(path: str) -> list[tuple[int, Any, str | None]]:
    """[(index among non-blank lines, parsed object or None, error or None)]."""
    out = []
    for line in _read_text(path).splitlines():
        if not line.strip():
            continue
        try:
            out.append((len(out), json.loads(line), None))
        except json.JSONDecodeError as e:
            out.append((len(out), None, f"line is not valid JSON ({e.msg})"))
    return out


def _prompt_of(obj: Any, field: str) -> tuple[str | None, str | None]:
    """(prompt, None) or (None, reason)."""
    if not isinstance(obj, dict):
        return None, "line is not a JSON object"
    value = obj.get(field)
    if value is None:
        return None, f"no {field!r} field"
    if not isinstance(value, str):
        return None, f"{field!r} is not a string"
    if not value.strip():
        return None, f"{field!r} is empty"
    return value.strip(), None


def _expand(spec: str) -> list[str]:
    """Comma-separated paths and globs -> sorted existing paths (a literal path that does not exist is kept, so
    the reader names it)."""
    paths: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        matches = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        paths += matches
    return paths


def read_t2i_items(fmt: str, prompts_path: str | None, prompt_flags: Sequence[str] = (),
                   wise_version: str = "legacy") -> tuple[list[Item], list[Skipped]]:
    """(items, skipped) of a t2i run. Errors that make the whole input unusable raise FormatError."""
    if fmt not in T2I_FORMATS:
        raise FormatError(f"--format {fmt!r} is not a text-to-image format; expected one of {T2I_FORMATS}")
    if prompt_flags and prompts_path:
        raise FormatError("give either --prompt or --prompts, not both")
    if prompt_flags:
        if fmt != "png":
            raise FormatError(f"--format {fmt} reads its benchmark's prompt file; pass it with --prompts")
        items, skipped = [], []
        for i, p in enumerate(prompt_flags):
            (items.append(Item(i, f"{i:05d}", p.strip())) if p.strip()
             else skipped.append(Skipped(i, f"{i:05d}", "empty prompt")))
        return items, skipped
    if not prompts_path:
        raise FormatError("no prompts: pass --prompt TEXT or --prompts FILE")
    reader = {"png": _read_plain, "geneval": _read_geneval, "dpg": _read_dpg,
              "wise": lambda p: _read_wise(p, wise_version)}[fmt]
    items, skipped = reader(prompts_path)
    if not items and not skipped:
        raise FormatError(f"{prompts_path}: no prompts in it")
    if not items:
        raise FormatError(f"{prompts_path}: none of its {len(skipped)} prompts is usable (first: "
                          f"{skipped[0].reason})")
    return items, skipped


def _read_plain(path: str) -> tuple[list[Item], list[Skipped]]:
    if path.endswith(".jsonl"):
        items, skipped = [], []
        for i, obj, err in _jsonl_records(path):
            prompt, why = (None, err) if err else _prompt_of(obj, "prompt")
            if why:
                skipped.append(Skipped(i, f"{i:05d}", why))
            else:
                items.append(Item(i, f"{i:05d}", prompt, meta=obj))
        return items, skipped
    lines = [line.strip() for line in _read_text(path).splitlines()]
    return [Item(i, f"{i:05d}", p) for i, p in enumerate(p for p in lines if p)], []


def _read_geneval(path: str) -> tuple[list[Item], list[Skipped]]:
    if os.path.isdir(path):
        raise FormatError(f"{path}: is a directory; --format geneval reads evaluation_metadata.jsonl")
    items, skipped = [], []
    for i, obj, err in _jsonl_records(path):
        key = f"{i:05d}"  # the folder name the scorer expects: the 0-based line index, 5 digits
        prompt, why = (None, err) if err else _prompt_of(obj, "prompt")
        if why:
            skipped.append(Skipped(i, key, why))
        else:
            items.append(Item(i, key, prompt, meta=obj))
    return items, skipped


def _read_dpg(path: str) -> tuple[list[Item], list[Skipped]]:
    if not os.path.isdir(path):
        raise FormatError(f"{path}: --format dpg reads DPG-Bench's prompts/ folder of <stem>.txt files")
    names = sorted(n for n in os.listdir(path) if n.endswith(".txt"))
    if not names:
        raise FormatError(f"{path}: no .txt prompt files in it")
    items, skipped = [], []
    for i, name in enumerate(names):
        stem = name[: -len(".txt")]
        if "." in stem:  # the scorer keys images by basename.split('.')[0]
            skipped.append(Skipped(i, stem, "the stem contains '.', which the DPG scorer cannot key"))
            continue
        try:
            text = " ".join(_read_text(os.path.join(path, name)).split())
        except FormatError as e:
            skipped.append(Skipped(i, stem, str(e)))
            continue
        (items.append(Item(i, stem, text)) if text else skipped.append(Skipped(i, stem, "empty prompt file")))
    return items, skipped


def _read_wise(spec: str, version: str) -> tuple[list[Item], list[Skipped]]:
    if version not in WISE_VERSIONS:
        raise FormatError(f"--wise_version {version!r}; expected one of {WISE_VERSIONS}")
    paths = _expand(spec)
    if not paths:
        raise FormatError(f"{spec}: matches no file")
    items, skipped, seen = [], [], set()
    for path in paths:
        verified_file = "_verified" in os.path.basename(path) or "data_verified" in path.split(os.sep)
        if verified_file != (version == "verified"):
            other = "verified" if verified_file else "legacy"
            raise FormatError(f"{path}: a WISE {other} prompt file, but --wise_version is {version}; the two "
                              "releases give different prompts for the same ids")
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise FormatError(f"{path}: expected a JSON list of prompts")
        for obj in data:
            index = len(items) + len(skipped)
            pid = obj.get("prompt_id") if isinstance(obj, dict) else None
            key = str(pid) if pid is not None else f"#{index}"
            prompt, why = _prompt_of(obj, "Prompt")
            if pid is None or not re.fullmatch(r"\d+", str(pid)):
                why = why or "no integer 'prompt_id'"
            elif key in seen:
                why = why or f"prompt_id {key} appears twice"
            if why:
                skipped.append(Skipped(index, key, why))
            else:
                seen.add(key)
                items.append(Item(index, key, prompt, meta=obj))
    return items, skipped


def wise_category(prompt_id: int, version: str) -> str | None:
    for name, lo, hi in WISE_CATEGORIES[version]:
        if lo <= int(prompt_id) <= hi:
            return name
    return None


def read_i2t_items(fmt: str, images: str, question: str | None) -> tuple[list[Item], list[Skipped]]:
    """Images from a glob (each asked `question`) or a JSONL of {image, question[, id/question_id, answer,
    category]} (relative image paths resolved against the JSONL's folder)."""
    if fmt not in I2T_FORMATS:
        raise FormatError(f"--format {fmt!r} is not an image-to-text format; expected one of {I2T_FORMATS}")
    if images.endswith(".jsonl"):
        base = os.path.dirname(os.path.abspath(images))
        items, skipped = [], []
        for i, obj, err in _jsonl_records(images):
            key = str(obj.get("question_id", obj.get("id", i))) if isinstance(obj, dict) else str(i)
            q, why = (None, err) if err else _prompt_of(obj, "question")
            if why and question and not err and isinstance(obj, dict) and "question" not in obj:
                q, why = question, None
            if not why and not isinstance(obj.get("image"), str):
                why = "no 'image' path"
            if not why and fmt == "mme" and not all(isinstance(obj.get(k), str) for k in ("answer", "category")):
                why = "MME rows need 'answer' and 'category'"
            if why:
                skipped.append(Skipped(i, key, why))
                continue
            path = obj["image"] if os.path.isabs(obj["image"]) else os.path.join(base, obj["image"])
            items.append(Item(i, key, q, image=path, meta=obj))
        if not items:
            raise FormatError(f"{images}: no usable rows" + (f" (first: {skipped[0].reason})" if skipped else ""))
        return items, skipped
    if fmt == "mme":
        raise FormatError("--format mme reads a JSONL of {question_id, image, question, answer, category}")
    if not question or not question.strip():
        raise FormatError("--images GLOB needs --question TEXT")
    paths = _expand(images)
    if not paths:
        raise FormatError(f"{images}: matches no file")
    return [Item(i, os.path.basename(p), question.strip(), image=p) for i, p in enumerate(paths)], []


def read_i2i_items(images: str) -> list[Item]:
    paths = _expand(images)
    if not paths:
        raise FormatError(f"{images}: matches no file")
    keys = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise FormatError(f"{images}: several images are named {dup[0]!r}; outputs are keyed by file stem")
    return [Item(i, k, image=p) for i, (k, p) in enumerate(zip(keys, paths))]


def mme_question(question: str) -> str:
    """lmms-eval's MME prompt: strip, drop " Please answer yes or no.", ask for a single word or phrase."""
    return question.strip().replace(" Please answer yes or no.", "") + MME_PROMPT_SUFFIX


# ----------------------------------------------------------------------------------------------------------------
# text-to-image layouts


class T2ILayout:
    """Where a t2i run's images go, and which are done. `num_images` images per prompt, k = 0..num_images-1."""

    def __init__(self, fmt: str, out: str, num_images: int):
        if fmt == "dpg" and num_images != 4:
            raise FormatError(f"--format dpg writes 2x2 grids: --num_images_per_prompt must be 4, got {num_images}")
        self.fmt, self.out, self.num_images = fmt, fs.abspath(out), num_images

    @property
    def run_json(self) -> str:
        if self.fmt == "dpg":  # the DPG scorer reads every file of its folder: keep run.json out of it
            return self.out.rstrip(os.sep).rstrip("/") + ".run.json"
        return fs.join(self.out, "run.json")

    def image_path(self, item: Item, k: int) -> str:
        if self.fmt == "png":
            return fs.join(self.out, f"{item.key}_{k:02d}.png")
        if self.fmt == "geneval":
            return fs.join(self.out, item.key, "samples", f"{k:04d}.png")
        if self.fmt == "wise":
            return fs.join(self.out, f"{item.key}.png")
        return fs.join(self.out, f"{item.key}.png")  # dpg: one grid for all k

    def pending(self, item: Item) -> list[int]:
        """The image indices k still to generate for `item` (a DPG grid is all-or-nothing)."""
        if self.fmt in ("dpg", "wise"):
            return [] if fs.exists(self.image_path(item, 0)) else list(range(self.num_images))
        return [k for k in range(self.num_images) if not fs.exists(self.image_path(item, k))]

    def prepare(self, items: Sequence[Item]) -> None:
        """Writes the per-prompt files that come before any image (GenEval metadata, the png prompt index)."""
        fs.makedirs(self.out)
        if self.fmt == "geneval":
            for item in items:
                path = fs.join(self.out, item.key, "metadata.jsonl")
                if not fs.exists(path):
                    write_json(path, item.meta, indent=None)  # one object: the scorer json.load()s it
        elif self.fmt == "png":
            rows = "".join(json.dumps({"index": it.index, "key": it.key, "prompt": it.text}, ensure_ascii=False)
                           + "\n" for it in items)
            path = fs.join(self.out, "prompts.jsonl")
            if not fs.exists(path) or fs.read_text(path) != rows:
                write_bytes(path, rows.encode())

    def write(self, item: Item, images: dict[int, np.ndarray]) -> list[str]:
        """Writes the finished images of `item` ({k: uint8 (H, W, 3)}); returns the paths written."""
        if self.fmt == "dpg":
            tiles = [images[k] for k in range(4)]
            grid = np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)
            path = self.image_path(item, 0)
            write_png(path, grid)
            return [path]
        paths = []
        for k, image in sorted(images.items()):
            path = self.image_path(item, k)
            write_png(path, image)
            paths.append(path)
        return paths

    def finish(self, items: Sequence[Item]) -> None:
        """After a complete run: png writes a captioned contact sheet of (up to 48 of) the images."""
        if self.fmt != "png":
            return
        from PIL import Image

        from blip3o_jax import sampling

        thumbs, captions = [], []
        for item in items:
            for k in range(self.num_images):
                path = self.image_path(item, k)
                if len(thumbs) < 48 and fs.exists(path):
                    with Image.open(io.BytesIO(fs.read_bytes(path))) as img:
                        thumbs.append(np.asarray(img.convert("RGB").resize((96, 96), Image.BICUBIC)))
                    captions.append(item.text)
        if thumbs:
            sheet = sampling.image_grid(np.stack(thumbs), captions, columns=min(6, len(thumbs)), scale=1)
            buf = io.BytesIO()
            sheet.save(buf, format="PNG")
            write_bytes(fs.join(self.out, "contact_sheet.png"), buf.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# image-to-text outputs


def read_jsonl_rows(path: str) -> list[dict]:
    """Rows of a JSONL file this tool wrote; a torn last line (a killed run) is dropped."""
    if not fs.exists(path):
        return []
    rows = []
    # split on "\n" only (a prediction may hold U+2028); a tail torn inside a character decodes as invalid JSON
    for line in io.StringIO(fs.read_bytes(path).decode("utf-8", errors="replace")):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def append_jsonl(path: str, rows: Iterable[dict]) -> None:
    """Appends whole lines, flushed and synced (the resume log of i2t; a torn tail is dropped on reread). An object
    store has no append: a remote log is rewritten whole, with the new lines at its end."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not data:
        return
    if fs.is_remote(path):
        old = fs.read_bytes(path) if fs.exists(path) else b""
        write_bytes(path, old + data.encode("utf-8"))
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def clean_prediction(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())


def write_mme(out_dir: str, rows: Sequence[dict]) -> list[str]:
    """The MME eval tool's per-category files from prediction rows (input order kept; an image's two questions
    made adjacent, as `calculation.py` reads lines in pairs)."""
    by_category: dict[str, dict[str, list[dict]]] = {}
    for row in sorted(rows, key=lambda r: r["index"]):
        by_category.setdefault(row["category"], {}).setdefault(str(row["id"]), []).append(row)
    paths = []
    for category, images in by_category.items():
        lines = []
        for qid, pair in images.items():
            for row in pair:
                question = row["question"].replace("\t", " ").replace("\n", " ").strip()
                lines.append("\t".join([os.path.basename(qid), question, row["answer"].strip(),
                                        clean_prediction(row["prediction"])]))
        path = fs.join(out_dir, f"{category}.txt")
        write_bytes(path, ("\n".join(lines) + "\n").encode())
        paths.append(path)
    return paths
