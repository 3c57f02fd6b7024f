"""What a run reports and where: stdout, a JSONL file and TensorBoard event files; FLOPs and MFU.

Only process 0 writes. Every metric a user needs to judge a BLIP3-o run is here: the flow-matching loss is flat and
says little (reference §6.5, issues #16/#17/#82), so the step also reports the loss per σ bucket, the gradient,
update and parameter norms (grad-norm spikes precede divergence, issue #75), and throughput as samples/s and MFU.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping

import jax
import numpy as np

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
    (to reach the latent queries) ~ 1x forward, a trained one ~ 2x forward. The LM head only with a text loss
    (reference §7.4). DiT (or the clip_mse head): forward + backward = 3x forward. Generation encoder: forward only.
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


class MetricWriter:
    """stdout + JSONL + TensorBoard; only process 0 writes."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, stdout: bool = True):
        self.enabled = jax.process_index() == 0
        self.stdout = stdout
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _to_python(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, int(step))
        if self.stdout:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in clean.items() if not k.startswith("loss_sigma"))
            _print(f"step {int(step)}: {shown}")

    def write_text(self, line: str) -> None:
        if self.enabled:
            _print(line)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


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
