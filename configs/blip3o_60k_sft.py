"""Instruction tuning on BLIP3o-60k: start from a pretrained BLIP3-o checkpoint, same
optimizer, cosine to 0, >= 10k steps. Argument: `8b` (default) or `4b`, optionally `,SHARDS` (glob of the tars).

    python -m blip3o_jax.train --config 'configs/blip3o_60k_sft.py:8b,gs://BUCKET/BLIP3o-60k/*.tar' \
        --workdir gs://BUCKET/blip3o_8b_sft --config.init_from=/ckpt/blip3o_8b_converted
"""
import importlib.util
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str = "8b"):
    size, _, shards = (arg or "8b").partition(",")
    if size not in ("4b", "8b"):
        raise ValueError(f"configs/blip3o_60k_sft.py takes 4b or 8b, got {arg!r}")
    spec = importlib.util.spec_from_file_location(f"_blip3o_{size}", os.path.join(_HERE, f"blip3o_{size}.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.data.datasets = [dict(name="blip3o_60k", paths=shards or "gs://YOUR_BUCKET/BLIP3o-60k/*.tar", task="t2i")]
    c.train.total_steps = 10_000  # README: >= 10k steps
    c.train.min_lr = 0.0  # `cosine` to 0 (sft.sh)
    c.init_from = f"/ckpt/blip3o_{size}_converted"  # a BLIP3-o checkpoint (ours, or the release converted)
    return c
