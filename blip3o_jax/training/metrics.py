"""What a run reports and where: stdout, a JSONL file and TensorBoard event files; FLOPs and MFU.

Only process 0 writes. Every metric a user needs to judge a BLIP3-o run is here: the flow-matching loss is flat and
says little, so the step also reports the loss per σ bucket, the gradient,
update and parameter norms (grad-norm spikes precede divergence, issue #75), and throughput as samples/s and MFU.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping

import flax
import jax
import numpy as np
from clu import metrics as clu_metrics

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets. Matched as substrings of `device.device_kind`,
# most specific first.
PEAK_FLOPS_PER_DEVICE: tuple[tuple[str, float], ...] = (
    ("TPU v6", 918e12),  # v6e (Trillium)
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
)


def device_peak_flops(measure_cpu: bool = True) -> tuple[float | None, str]:
    """(total peak FLOP/s of all devices of this process' job, how it was obtained).

    Accelerators: table above × device count. CPU: the matmul peak measured now (all simulated CPU devices share
    the same cores, so the measured figure is already the total).
    """
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", "")
    for key, peak in PEAK_FLOPS_PER_DEVICE:
        if key.lower() in kind.lower():
            return peak * jax.device_count(), f"datasheet bf16 peak of {kind} x {jax.device_count()}"
    if dev.platform == "cpu" and measure_cpu:
        from blip3o_jax.benchmarking import jax_matmul_peak

        return jax_matmul_peak(n=1024, iters=3), "measured fp32 matmul peak of this CPU"
    return None, f"unknown peak for device kind {kind!r}"


# --------------------------------------------------------------------------------------------------------------
# Analytic FLOPs (multiply-add = 2 FLOPs; model FLOPs: activation recompute is not counted, as usual for MFU).

def train_flops_per_sample(mcfg, *, seq_len: int, trainable, text_loss: bool) -> dict[str, float]:
    """Analytic training FLOPs per sample of each part (model FLOPs: multiply-add = 2, recompute not counted).

    backbone: forward over `seq_len` tokens; a frozen backbone still runs the backward for activation gradients
    (to reach the latent queries) ~ 1x forward, a trained one ~ 2x forward. The LM head only with a text loss.
    DiT (or the clip_mse head): forward + backward = 3x forward. Generation encoder: forward only.
    """
    from blip3o_jax.models import dit as dit_lib
    from blip3o_jax.models import qwen as qwen_lib

    out = {}
    bb = mcfg.backbone
    fwd = qwen_lib.count_flops(bb, 1, seq_len, seq_len, logits_tokens=seq_len if text_loss else 0)
    # causal attention: count_flops charges every query against `context` keys; halve that part
    attn = bb.num_hidden_layers * seq_len * 2 * 2 * bb.num_attention_heads * bb.head_dim * seq_len
    fwd -= attn / 2
    out["backbone"] = fwd * (3 if "backbone" in trainable else 2)
    if getattr(mcfg, "query_path", "full") == "prefix_cache" and "backbone" not in trainable:
        # the prompt's forward only, then forward + activation backward of the n_query query tokens
        from blip3o_jax.models import prefix_cache

        out["backbone"] = prefix_cache.backbone_flops_per_sample(bb, seq_len, mcfg.n_query)["prefix_cache"]
    if mcfg.loss == "clip_fm":
        out["dit"] = float(dit_lib.flops_per_sample(mcfg.dit, mcfg.n_query)["train_step"])
    else:
        d = mcfg.dit
        out["mse_head"] = 3 * 2 * mcfg.n_query * (bb.hidden_size * d.dim + d.dim * d.patch_size**2 * d.in_channels)
    if mcfg.target == "eva_clip":
        e = mcfg.gen_encoder
        tokens = e.num_patches + 1
        per_layer = 2 * tokens * (4 * e.width * e.width + 2 * e.width * e.mlp_dim) + 4 * tokens * tokens * e.width
        out["gen_encoder"] = e.layers * per_layer + 2 * e.num_patches * e.patch_size**2 * e.num_channels * e.width
    out["total"] = float(sum(out.values()))
    return out


# --------------------------------------------------------------------------------------------------------------
# Writers


# --------------------------------------------------------------------------------------------------------------
# Step metrics over a log window: clu.metrics, host side (each step's metrics are already on the host, one step
# late; constructing the metrics from numpy keeps the per-step bookkeeping off the device).

AVERAGED = ("loss", "gen_loss", "text_loss", "grad_norm", "update_norm")  # mean over the window
LAST = ("param_norm", "lr", "nonfinite_total")  # value at the window's last step


@flax.struct.dataclass
class BucketAverage(clu_metrics.Metric):
    """The flow-matching loss per σ bucket: per-bucket sums and counts, averaged per bucket (NaN for an empty one)."""

    total: np.ndarray  # (num_buckets,)
    count: np.ndarray  # (num_buckets,)

    @classmethod
    def from_model_output(cls, sigma_sum, sigma_count, **_) -> "BucketAverage":
        return cls(total=np.asarray(sigma_sum, np.float64), count=np.asarray(sigma_count, np.float64))

    def merge(self, other: "BucketAverage") -> "BucketAverage":
        return type(self)(total=self.total + other.total, count=self.count + other.count)

    def compute(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.total / np.maximum(self.count, 1e-30), np.nan)


def step_collection(step_metrics: Mapping[str, Any]) -> clu_metrics.Collection:
    """One step's metrics (host numpy values, training/step.py's dict) as a clu Collection; `a.merge(b)` sums a
    window, `.compute()` gives the window's averages and last values."""
    fields, values = {}, {}
    for k in AVERAGED:
        if k in step_metrics:
            fields[k] = clu_metrics.Average
            values[k] = clu_metrics.Average(total=np.float64(step_metrics[k]), count=np.int64(1))
    for k in LAST:
        if k in step_metrics:
            fields[k] = clu_metrics.LastValue
            values[k] = clu_metrics.LastValue(total=np.float64(step_metrics[k]), count=np.int64(1))
    if "sigma_sum" in step_metrics:
        fields["loss_sigma"] = BucketAverage
        values["loss_sigma"] = BucketAverage.from_model_output(step_metrics["sigma_sum"], step_metrics["sigma_count"])
    # as clu's Collection.create_collection, with a host counter (its jnp.array(1) would be a device put per step)
    return _collection_type(tuple(fields.items()))(_reduction_counter=clu_metrics._ReductionCounter(np.int32(1)),
                                                   **values)


_COLLECTIONS: dict = {}


def _collection_type(fields: tuple) -> type:
    if fields not in _COLLECTIONS:  # one class per set of metric names (flax dataclasses compare by type)
        _COLLECTIONS[fields] = clu_metrics.Collection.create(**dict(fields))
    return _COLLECTIONS[fields]


def window_summary(collection: clu_metrics.Collection) -> dict[str, float]:
    """The log line's metrics from a window's merged collection; σ buckets as `loss_sigma_<lo>_<hi>`."""
    out = {}
    for k, v in collection.compute().items():
        if k == "loss_sigma":
            n = len(v)
            for b in range(n):
                out[f"loss_sigma_{b / n:.1f}_{(b + 1) / n:.1f}"] = float(v[b])
        elif k == "nonfinite_total":
            out[k] = int(round(float(v)))
        else:
            out[k] = float(v)
    return out


# --------------------------------------------------------------------------------------------------------------
# Writers


class MetricWriter:
    """stdout + JSONL + TensorBoard (tensorboardX, so TensorFlow stays optional); only process 0 writes.

    The method names are clu's `metric_writers.MetricWriter` interface (write_scalars / write_images / write_texts /
    flush / close; clu 0.0.12's own writers import TensorFlow), so clu-style code can write to it.
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True, stdout: bool = True):
        from blip3o_jax.training import workdir as wd

        self.enabled = jax.process_index() == 0
        self.stdout = stdout
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        wd.makedirs(workdir)
        self._jsonl = wd.open_file(wd.join(workdir, "metrics.jsonl"), "a")
        if tensorboard:
            self._tb = wd.summary_writer(wd.join(workdir, "tensorboard"))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One line of metrics.jsonl, the finite scalars to TensorBoard, a short line on stdout."""
        if not self.enabled:
            return
        clean = {k: _to_python(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))
        if self.stdout:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in clean.items() if not k.startswith("loss_sigma"))
            _print(f"step {int(step)}: {shown}")

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """uint8 (H, W, C) or (N, H, W, C) images (N > 1: one event per image, `key/i`) to TensorBoard."""
        if not self.enabled or self._tb is None:
            return
        for k, img in images.items():
            img = np.asarray(img)
            if img.ndim == 3:
                self._tb.add_image(k, img, int(step), dataformats="HWC")
            else:
                for i, one in enumerate(img):
                    self._tb.add_image(f"{k}/{i}", one, int(step), dataformats="HWC")

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Text summaries to TensorBoard (not printed)."""
        if self.enabled and self._tb is not None:
            for k, t in texts.items():
                self._tb.add_text(k, t, int(step))

    def write_text(self, line: str) -> None:
        """A line on stdout (process 0)."""
        if self.enabled:
            _print(line)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
        if self._jsonl is not None:
            self._jsonl.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _print(line: str) -> None:
    from tqdm import tqdm  # writes above a progress bar instead of through it

    tqdm.write(line, file=sys.stdout)


def _to_python(v):
    if isinstance(v, (np.ndarray, jax.Array)):
        v = np.asarray(v)
        return v.item() if v.size == 1 else v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
