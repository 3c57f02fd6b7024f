r"""WebDataset tar shards (the BLIP3o-Pretrain / BLIP3o-60k layout: `<key>.jpg` + `<key>.txt`, optional `<key>.json`)
-> a TFDS dataset stored as ArrayRecord, readable with `tfds.data_source` and by `kind="tfds"` datasets.

    python -m blip3o_jax.data.tfds_builder --shards '/data/blip3o_pretrain/*.tar' --data_dir /data/tfds \
        --name blip3o_pretrain [--split train] [--version 1.0.0] [--num_workers 8]

Each tar shard becomes one ArrayRecord file, records in the shard's order, so shard i of the TFDS split holds
exactly the samples of tar shard i: the conversion streams (no shuffle buffer, no temporary copy of the data),
runs shards in parallel threads, and resumes after an interruption (finished shards are kept in
`<dataset dir>/.parts/` until the end). The member bytes are stored unchanged: the image (`image`, a
`tfds.features.Image` holding the encoded file, so TFDS users get decoded pixels and we get the bytes), the
caption (`caption`), the `<key>.json` member (`json`), plus `key`, `image_ext`, `caption_ext` ("" when the member
was absent) and `source_shard`. A sample's other members are not carried (counted in the returned summary).

Neither writing nor reading imports TensorFlow: the records are TFDS-serialised `tf.train.Example`s written with
TFDS' own ArrayRecord adapter, and `tfds.folder_dataset.write_metadata` writes `dataset_info.json` and
`features.json` from the known shard lengths (its `check_data` pass would need TensorFlow and is skipped).
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import tempfile
from typing import Sequence

from blip3o_jax.data import sources, tar_index

log = logging.getLogger(__name__)

PARTS_DIR = ".parts"
FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"


def features():
    """The dataset's FeaturesDict (TFDS feature connectors; bytes are stored as given)."""
    import tensorflow_datasets as tfds

    text = tfds.features.Text
    return tfds.features.FeaturesDict({
        # encoding_format=None: the encoded bytes are stored verbatim whatever their format (jpg, png, webp)
        "image": tfds.features.Image(encoding_format=None, doc="the sample's image member, encoded bytes as stored"),
        "image_ext": text(doc="extension of the image member (jpg, png, ...); empty when the sample had no image"),
        "caption": text(doc="the text member's bytes (normally UTF-8)"),
        "caption_ext": text(doc="extension of the text member (txt or caption); empty when the sample had none"),
        "json": text(doc="the <key>.json member's bytes; empty when absent"),
        "key": text(doc="the WebDataset sample key"),
        "source_shard": text(doc="file name of the tar shard the sample came from"),
    })


def _convert_shard(shard: str, part: str, feats, index_cache_dir: str) -> dict:
    """One tar shard -> one ArrayRecord file (written under a temporary name, renamed when complete)."""
    from tensorflow_datasets.core import file_adapters

    src = sources.TarShardSource(shard, name=os.path.basename(shard), index_cache_dir=index_cache_dir)
    index = tar_index.get_index(shard, index_cache_dir)
    wanted = set(src.image_exts) | set(src.text_exts) | set(src.meta_exts)
    stats = {"shard": shard, "samples": 0, "skipped": {}, "other_members": {}}

    def records():
        for j in range(len(src)):
            members = [ext for ext, _, _ in index.sample_members(j)]
            try:
                raw = src[j]
            except sources.BadSampleError as e:  # e.g. a member cut off by a truncated shard
                stats["skipped"][e.reason] = stats["skipped"].get(e.reason, 0) + 1
                log.warning("%s: sample %s not converted (%s)", shard, e.key, e)
                continue
            text_ext = next((ext for ext in members if ext in src.text_exts), "")
            for ext in members:
                if ext not in wanted:
                    stats["other_members"][ext] = stats["other_members"].get(ext, 0) + 1
            stats["samples"] += 1
            yield None, feats.serialize_example({
                "image": raw.image or b"", "image_ext": raw.image_ext or "",
                "caption": raw.text or b"", "caption_ext": text_ext, "json": raw.meta or b"",
                "key": raw.key, "source_shard": os.path.basename(shard)})

    tmp = part + ".tmp"
    file_adapters.ArrayRecordFileAdapter.write_examples(tmp, records())
    with open(part + ".json.tmp", "w") as f:
        json.dump(stats, f)
    os.replace(tmp, part)
    os.replace(part + ".json.tmp", part + ".json")  # the marker that the part is complete
    return stats


def build(shards: str | Sequence[str] | dict[str, str | Sequence[str]], data_dir: str, *,
          name: str = "blip3o_pretrain", version: str = "1.0.0", split: str = "train", num_workers: int = 4,
          description: str = "", overwrite: bool = False) -> dict:
    """Converts tar shards into `data_dir/name/version/`. `shards`: glob(s) of one split, or {split: glob(s)}.
    Returns {"dir", "splits": {split: {"samples", "shards", "skipped", "other_members"}}}."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import file_adapters

    splits = shards if isinstance(shards, dict) else {split: shards}
    dataset_dir = os.path.join(os.path.expanduser(data_dir), name, version)
    if os.path.exists(os.path.join(dataset_dir, "dataset_info.json")):
        if not overwrite:
            raise FileExistsError(f"{dataset_dir} already holds a prepared dataset; pass overwrite=True (--overwrite) "
                                  "to replace it")
        for entry in os.listdir(dataset_dir):
            if entry != PARTS_DIR:
                path = os.path.join(dataset_dir, entry)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    parts_dir = os.path.join(dataset_dir, PARTS_DIR)
    os.makedirs(parts_dir, exist_ok=True)
    feats = features()
    index_cache_dir = tempfile.mkdtemp(prefix="tar_index-", dir=parts_dir)  # never next to read-only shards
    summary: dict = {"dir": dataset_dir, "splits": {}}
    split_infos = []
    try:
        for split_name, patterns in splits.items():
            shard_paths = [s for s in sources.expand_paths(patterns, f"split {split_name!r}")
                           if not s.endswith((".idx", ".targets.tar"))]
            jobs = []
            for i, shard in enumerate(shard_paths):
                part = os.path.join(parts_dir, f"{split_name}-{i:05d}.array_record")
                jobs.append((shard, part))

            def run(job):
                shard, part = job
                if os.path.exists(part + ".json") and os.path.exists(part):  # done before an interruption
                    with open(part + ".json") as f:
                        done = json.load(f)
                    if done.get("shard") == shard:
                        return done
                return _convert_shard(shard, part, feats, index_cache_dir)

            with concurrent.futures.ThreadPoolExecutor(max(1, min(num_workers, len(jobs)))) as pool:
                results = list(pool.map(run, jobs))
            # empty shards get no file (TFDS shards hold at least one record); the rest are numbered in order
            kept = [(part, r) for (_, part), r in zip(jobs, results) if r["samples"] > 0]
            lengths = []
            for k, (part, r) in enumerate(kept):
                final = os.path.join(dataset_dir, f"{name}-{split_name}.array_record-{k:05d}-of-{len(kept):05d}")
                os.replace(part, final)
                lengths.append(file_adapters.ArrayRecordFileAdapter.num_examples(final))
                if lengths[-1] != r["samples"]:
                    raise RuntimeError(f"{final}: holds {lengths[-1]} records, {r['samples']} were written")
            if not lengths:
                raise ValueError(f"split {split_name!r}: the shards hold no sample")
            num_bytes = sum(os.path.getsize(os.path.join(dataset_dir, f"{name}-{split_name}.array_record-"
                                                                      f"{k:05d}-of-{len(kept):05d}"))
                            for k in range(len(kept)))
            split_infos.append(tfds.core.SplitInfo(name=split_name, shard_lengths=lengths, num_bytes=num_bytes,
                                                   filename_template=None))
            merged = {"samples": sum(lengths), "shards": len(lengths), "skipped": {}, "other_members": {}}
            for r in results:
                for field in ("skipped", "other_members"):
                    for k, v in r[field].items():
                        merged[field][k] = merged[field].get(k, 0) + v
            summary["splits"][split_name] = merged
        text = description or (f"WebDataset tar shards converted by blip3o_jax.data.tfds_builder: "
                               f"{json.dumps({k: v for k, v in splits.items()}, default=str)}")
        tfds.folder_dataset.write_metadata(data_dir=dataset_dir, features=feats, split_infos=split_infos,
                                           version=version, filename_template=FILE_TEMPLATE, check_data=False,
                                           description=text)
    finally:
        shutil.rmtree(index_cache_dir, ignore_errors=True)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return summary


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _main(argv):
    from absl import flags

    from blip3o_jax.cli import UserError

    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; use --shards, --data_dir and --name")
    f = flags.FLAGS
    if not f.shards or not f.data_dir:
        raise UserError("--shards and --data_dir are required")
    logging.basicConfig(level=logging.WARNING)
    summary = build(list(f.shards), f.data_dir, name=f.name, version=f.version, split=f.split,
                    num_workers=f.num_workers, overwrite=f.overwrite)
    print(json.dumps(summary))


def main():
    from absl import flags

    from blip3o_jax import cli

    flags.DEFINE_multi_string("shards", None, "Glob(s) of the tar shards (quote them).")
    flags.DEFINE_string("data_dir", None, "TFDS data directory; the dataset goes to DATA_DIR/NAME/VERSION.")
    flags.DEFINE_string("name", "blip3o_pretrain", "TFDS dataset name.")
    flags.DEFINE_string("version", "1.0.0", "Dataset version.")
    flags.DEFINE_string("split", "train", "Split name.")
    flags.DEFINE_integer("num_workers", 4, "Shards converted in parallel.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing prepared dataset.")
    cli.run(_main, module=__name__, doc=__doc__)


if __name__ == "__main__":
    main()
