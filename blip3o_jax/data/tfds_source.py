"""A random-access source over a TFDS dataset stored as ArrayRecord, read with NumPy decoding (no TensorFlow).

    data.datasets = [dict(kind="tfds", name="blip3o_pretrain", split="train", data_dir="/data/tfds", task="t2i")]

`tfds.data_source` gives random access to an ArrayRecord dataset and parses its records with TFDS' NumPy example
parser, so TensorFlow is never imported (checked with tensorflow-datasets 4.9.10, see docs/ecosystem.md). Image
features are *not* decoded here (`tfds.decode.SkipDecoding`): the encoded bytes go to `transforms` like a tar
member's, so decoding, the size/aspect policy, JPEG draft mode and bad-sample replacement are the same code for
every source, and a TFDS dataset converted from tar shards (data/tfds_builder.py) gives the same batches as the
shards themselves.

Spec fields (besides the pipeline's `task` and `weight`):
  name            the TFDS dataset name (also the source's name in logs and metrics); "name/config:1.0.0" works
  tfds_name       the TFDS name when `name` should be a different label
  builder_dir     a prepared dataset directory (`.../name/1.0.0`) instead of name + data_dir
  split           "train" (default); TFDS slicing such as "train[:90%]" works
  data_dir        where `name` was prepared (default: TFDS' own default, ~/tensorflow_datasets)
  image_field     "image"; caption_field "caption" (None: a dataset without one, e.g. text-only or
                  conversations in `meta_field`); meta_field "json" (a JSON text with `conversations` for
                  image-to-text rows, as a tar shard's `<key>.json`); key_field "key"; image_ext_field "image_ext"
                  and caption_ext_field "caption_ext" (the tar member's extension; "" when the sample had none, so
                  a missing member is reported as missing, not as empty). Optional fields a dataset lacks are
                  ignored; a missing image or caption field is an error naming the dataset's features.
                  Nested features are addressed with "/" ("captions/text"); a field that holds a list gives its
                  first element.

The source pickles to its spec only: Grain worker processes reopen the ArrayRecord files themselves.
"""
from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from blip3o_jax.data.sources import BadSampleError, RawSample

DEFAULT_FIELDS = dict(image_field="image", caption_field="caption", meta_field="json", key_field="key",
                      image_ext_field="image_ext", caption_ext_field="caption_ext")


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError("a dataset with kind='tfds' needs tensorflow-datasets: pip install -e '.[tfds]'") from None
    return tfds


def _get_path(tree: Any, path: str) -> Any:
    for part in path.split("/"):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _feature_at(features, path: str):
    """The FeatureConnector at a "/"-separated path of a FeaturesDict (through Sequence), or None."""
    feature = features
    for part in path.split("/"):
        while hasattr(feature, "feature") and not hasattr(feature, "keys"):  # tfds.features.Sequence
            feature = feature.feature
        if not hasattr(feature, "keys") or part not in feature.keys():
            return None
        feature = feature[part]
    return feature


def _set_path(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _first(value):
    """A scalar from a TFDS value: bytes stay bytes; a list or 1-D array gives its first element (None if empty)."""
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            value = value.item()
        elif value.dtype == object or value.dtype.kind in "SU":
            value = value.reshape(-1)[0] if value.size else None
        else:
            return value
    elif isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value


class TfdsSource:
    """`__len__` / `__getitem__` -> `RawSample` over one split of a TFDS ArrayRecord dataset."""

    def __init__(self, name: str | None = None, *, split: str = "train", data_dir: str | None = None,
                 builder_dir: str | None = None, label: str | None = None, image_field: str = "image",
                 caption_field: str = "caption", meta_field: str | None = "json", key_field: str | None = "key",
                 image_ext_field: str | None = "image_ext", caption_ext_field: str | None = "caption_ext"):
        if not name and not builder_dir:
            raise ValueError("a dataset with kind='tfds' needs a TFDS `name` (with `data_dir`) or a `builder_dir`")
        self.tfds_name, self.split = name, split
        self.data_dir = os.path.expanduser(data_dir) if data_dir else None
        self.builder_dir = os.path.expanduser(builder_dir) if builder_dir else None
        self.name = label or name or os.path.basename(os.path.dirname(os.path.normpath(builder_dir)))
        self.fields = dict(image_field=image_field, caption_field=caption_field, meta_field=meta_field,
                           key_field=key_field, image_ext_field=image_ext_field,
                           caption_ext_field=caption_ext_field)
        self._lock = threading.Lock()
        self._ds = None
        ds = self._source()  # open once here: a wrong name, split or field is an error now, not in a worker
        self._length = len(ds)
        self._check_fields(ds.dataset_info.features)
        self.shard = f"tfds:{ds.dataset_info.full_name}/{split}"

    @classmethod
    def from_spec(cls, spec: dict) -> "TfdsSource":
        known = {"kind", "name", "tfds_name", "builder_dir", "split", "data_dir", "task", "weight", *DEFAULT_FIELDS}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(f"dataset {spec.get('name')!r} (kind='tfds'): unknown field(s) {unknown}; expected some "
                             f"of {sorted(known)}")
        tfds_name = spec.get("tfds_name") or spec.get("name")
        return cls(tfds_name if not spec.get("builder_dir") else None, split=spec.get("split", "train"),
                   data_dir=spec.get("data_dir"), builder_dir=spec.get("builder_dir"), label=spec.get("name"),
                   **{k: spec.get(k, v) for k, v in DEFAULT_FIELDS.items()})

    # -- opening -------------------------------------------------------------------------------------------------

    def _decoders(self, features) -> dict:
        """SkipDecoding for the image field: the transform decodes the encoded bytes itself."""
        tfds = _import_tfds()
        decoders: dict = {}
        path = self.fields["image_field"]
        if path and isinstance(_feature_at(features, path), tfds.features.Image):
            _set_path(decoders, path, tfds.decode.SkipDecoding())
        return decoders

    def _open(self):
        tfds = _import_tfds()
        if self.builder_dir:
            builder = tfds.builder_from_directory(self.builder_dir)
        else:  # an unregistered name is read from the files under data_dir; nothing is downloaded
            builder = tfds.builder(self.tfds_name, data_dir=self.data_dir, try_gcs=False)
        return builder.as_data_source(split=self.split, decoders=self._decoders(builder.info.features))

    def _source(self):
        ds = self._ds
        if ds is None:
            with self._lock:
                if self._ds is None:
                    try:
                        self._ds = self._open()
                    except (FileNotFoundError, ValueError, AssertionError) as e:  # tfds' "not found"/bad split
                        where = self.builder_dir or f"{self.tfds_name!r} in {self.data_dir or 'the TFDS data_dir'}"
                        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                        raise FileNotFoundError(f"dataset {self.name!r}: cannot open TFDS dataset {where}, split "
                                                f"{self.split!r} ({first})") from None
                ds = self._ds
        return ds

    def _check_fields(self, features) -> None:
        available = sorted(features.keys())
        for key in ("image_field", "caption_field"):
            path = self.fields[key]
            if path and _feature_at(features, path) is None:
                raise ValueError(f"dataset {self.name!r}: TFDS dataset has no feature {path!r} ({key}); its features "
                                 f"are {available}; set {key!r} in the dataset spec")
        for key in ("meta_field", "key_field", "image_ext_field", "caption_ext_field"):
            path = self.fields[key]
            if path and _feature_at(features, path) is None:
                self.fields[key] = None  # optional: absent in datasets not made by data/tfds_builder.py

    # -- access --------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._length

    def __repr__(self):
        return f"TfdsSource({self.name!r}, {self.shard}, samples={len(self)})"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ds"], state["_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __getitem__(self, i: int) -> RawSample:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range for {self!r}")
        ds = self._source()
        try:
            record = ds[i]
        except (RuntimeError, ValueError, OSError, TypeError) as e:  # a damaged record or ArrayRecord chunk
            raise BadSampleError("bad_record", f"cannot read or parse the record ({type(e).__name__}: {e})",
                                 source=self.name, shard=self.shard, key=f"record {i}") from None
        f = self.fields
        key = _first(_get_path(record, f["key_field"])) if f["key_field"] else None
        key = key.decode("utf-8", "replace") if isinstance(key, bytes) else (str(key) if key else f"record {i}")
        sample = RawSample(shard=self.shard, key=key)
        image_ext = self._text(record, "image_ext_field")
        image = _first(_get_path(record, f["image_field"])) if f["image_field"] else None
        if isinstance(image, np.ndarray):  # a decoded image tensor (not a tfds.features.Image)
            raise BadSampleError("bad_record", f"field {f['image_field']!r} holds a decoded {image.dtype} array, "
                                 "not encoded image bytes", source=self.name, shard=self.shard, key=key)
        if image is not None and image_ext != "":  # "": converted from a tar sample without an image member
            sample.image = bytes(image)
            sample.image_ext = image_ext or "jpg"
        text = _first(_get_path(record, f["caption_field"])) if f["caption_field"] else None
        if self._text(record, "caption_ext_field") != "":
            sample.text = bytes(text) if isinstance(text, (bytes, np.bytes_)) else text
        if f["meta_field"]:
            meta = _first(_get_path(record, f["meta_field"]))
            if isinstance(meta, (bytes, np.bytes_)) and len(meta):
                sample.meta = bytes(meta)
        return sample

    def _text(self, record, field: str) -> str | None:
        """An optional text field as str; None when the dataset has no such feature."""
        path = self.fields[field]
        if not path:
            return None
        value = _first(_get_path(record, path))
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else (None if value is None else str(value))
