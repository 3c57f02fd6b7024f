"""BLIP3o-4B pretraining: the 8B recipe (configs/blip3o_8b.py) with the Qwen2.5-VL-3B text model (2048 wide, tied
embeddings) as the frozen backbone; the DiT's caption projection takes 2048-wide query states.

    python -m blip3o_jax.train --config configs/blip3o_4b.py --workdir gs://BUCKET/blip3o_4b \
        --config.init_from=backbone=/ckpt/qwen2_5_vl_3b_text,gen_encoder=/ckpt/eva_clip_e14_plus
"""
import importlib.util
import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str = ""):
    spec = importlib.util.spec_from_file_location("_blip3o_8b", os.path.join(_HERE, "blip3o_8b.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config(arg, backbone="qwen2_5_vl_3b")
    c.data.tokenizer = "/ckpt/qwen2_5_vl_3b_text"
    return c
