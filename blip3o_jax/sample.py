"""`blip3o-sample`: offline sampling from a BLIP3-o checkpoint: text -> image, image -> text, image -> image.

    blip3o-sample t2i --model DIR (--prompt TEXT ... | --prompts FILE) --out DIR [--format png|geneval|dpg|wise]
    blip3o-sample i2t --model DIR --images GLOB --question TEXT --out FILE.jsonl
    blip3o-sample i2t --model DIR --images MME.jsonl --format mme --out DIR
    blip3o-sample i2i --model DIR --images GLOB --out DIR [--decoder sdxl|sana|DIR]

`--model` is a released checkpoint (BLIP3o-Model-4B/8B layout: config.json + safetensors with the Qwen2.5-VL,
`model.latent_queries`, the DiT under `model.dit.model.`, the EVA tower under
`model.gen_vision_tower.vision_tower.model.`, the tokenizer, and `diffusion-decoder/`), a directory written by
convert_torch_weights.py (`--kind blip3o`, with the release's config.json and tokenizer), or a training workdir
(latest checkpoint, EMA weights when kept; `--decoder DIR` names the diffusion decoder when the model generates
EVA-CLIP features).

Text to image, as the original's `inference.py` / `eval/geneval/generate.py`: prompt in the chat template ->
LLM with the latent queries -> DiT (30 Euler steps, CFG 3.0, zeros as the null condition) -> EVA-CLIP features
-> SDXL-architecture decoder (50 Euler steps, CFG 3.0) -> PNG. The decoder's negative is `--negative original`
(the DiT's sample for the untemplated empty prompt, as the original, but drawn once from `--seed` instead of
from whatever the global RNG held) or `zeros`.

Reproducibility: image k of prompt i gets its noise (DiT and decoder) from fold_in(fold_in(PRNGKey(seed), i), k)
(`--noise_rule index`; `original` drops i, as GenEval's generator that resets the seed for every prompt), so the
pixels do not depend on the batch size, the device count or where a run was resumed; prompts are padded to a
length bucket of their own (never to their batch's longest). Batches are spread over the local devices
(data-parallel over the mesh's data x fsdp devices); with several processes, process p takes the prompts i with
i % process_count == p. `--mesh` lays out each process's devices: `data=-1` (default) replicates the weights on
every device; `fsdp=N` and/or `tensor=N` shard them by their logical axes as the trainer does (fsdp splits the model
width, tensor the heads and MLP; `fsdp=4` on 8 devices = data 2 x fsdp 4), for a model that does not fit one
device. Outputs are written atomically (a hidden temporary renamed into place) and a rerun skips
every finished output. Each run writes `run.json` (settings, model fingerprint, counts, skipped items and why).

`--out gs://BUCKET/...` writes every output (images, JSONL, run.json) to the bucket and resumes from the bucket's
listing, through the path layer of `blip3o_jax/paths.py`; a training workdir on `gs://` is read the same way
(Orbax reads its checkpoint from the bucket itself).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Sequence

import numpy as np

from blip3o_jax import cli
from blip3o_jax import paths as fs
from blip3o_jax import sample_formats as fmts

COMMANDS = ("t2i", "i2t", "i2i")
DTYPES = ("float32", "bfloat16")
DEFAULT_BUCKET = 64  # shortest prompt length bucket (tokens)
MAX_BUCKET = 4096  # prompts are never padded beyond this (longer ones pad to the model's context)
NEGATIVE_INDEX = 0x7FFFFFFF  # the item index whose noise the `--negative original` DiT sample uses
FINGERPRINT_CHUNK = 1 << 20

# names of the release's config.json fields that carry the DiT and EVA configs when they differ from the
# original's hard-coded ones (the released files have neither: the original builds both from defaults; the tiny
# release of tools/make_tiny_release.py writes them)
DIT_CONFIG_KEY = "dit_config"
EVA_CONFIG_KEY = "gen_vision_tower_config"
BLIP3O_ONLY_PREFIXES = ("model.dit.", "model.gen_vision_tower.", "model.latent_queries", "model.mm_projector.",
                        "model.down_projector.")


def define_flags(fv) -> None:
    from absl import flags

    s, i, f, b, e = (flags.DEFINE_string, flags.DEFINE_integer, flags.DEFINE_float, flags.DEFINE_bool,
                     flags.DEFINE_enum)
    s("model", None, "Released/converted BLIP3-o directory or a training workdir.", flag_values=fv)
    s("decoder", "sdxl", "t2i/i2i: 'sdxl' (the model's diffusion-decoder/), 'sana' (--model is a SigLIP2_SANA "
      "folder) or a decoder directory.", flag_values=fv)
    s("out", None, "Output directory (t2i, i2i, i2t --format mme) or JSONL file (i2t).", flag_values=fv)
    flags.DEFINE_multi_string("prompt", [], "t2i: a prompt (repeatable).", flag_values=fv)
    s("prompts", None, "t2i: prompt file: text (one a line), JSONL (`prompt`), or the --format's benchmark file.",
      flag_values=fv)
    s("format", None, f"t2i: {'|'.join(fmts.T2I_FORMATS)} (default png); i2t: {'|'.join(fmts.I2T_FORMATS)} "
      "(default jsonl).", flag_values=fv)
    e("wise_version", "legacy", list(fmts.WISE_VERSIONS), "WISE prompt release (legacy GPT-4o protocol or "
      "WISE_Verified).", flag_values=fv)
    i("dit_steps", 30, "DiT Euler steps.", flag_values=fv)
    f("dit_guidance", 3.0, "DiT classifier-free guidance scale (1 = off).", flag_values=fv)
    i("decoder_steps", None, "Decoder steps (default 50 for sdxl, 30 for sana).", flag_values=fv)
    f("decoder_guidance", 3.0, "Decoder classifier-free guidance scale (1 = off).", flag_values=fv)
    i("resolution", None, "Output side in pixels (default: the decoder's native size).", flag_values=fv)
    e("negative", "original", ["original", "zeros"], "t2i: the decoder's unconditional features.", flag_values=fv)
    e("noise_rule", "index", ["index", "original"], "t2i: noise from (seed, prompt, image) or (seed, image) as "
      "the original GenEval script.", flag_values=fv)
    e("prompt_format", None, ["train", "chatml"], "t2i prompt layout (default: the training layout).",
      flag_values=fv)
    i("seed", 0, "Base seed.", flag_values=fv)
    i("batch", 4, "Images (t2i, i2i) or questions (i2t) per step, over all local devices.", flag_values=fv)
    i("num_images_per_prompt", None, "t2i: images per prompt (default 4 for geneval/dpg, else 1).", flag_values=fv)
    e("dtype", "float32", list(DTYPES), "Compute and parameter dtype.", flag_values=fv)
    i("devices", None, "Use the first N local devices (default all).", flag_values=fv)
    s("mesh", "data=-1", "t2i, i2i (sdxl): mesh of the local devices, as 'data=N,fsdp=N,tensor=N' (one size may "
      "be -1; data takes the devices left over unless given). data=-1 (default): weights replicated on every "
      "device. fsdp=N / tensor=N: weights sharded by their logical axes (fsdp splits the model width, tensor the "
      "heads and MLP) for models that do not fit one device; the batch is split over data x fsdp.", flag_values=fv)
    i("limit", None, "Only the first N items of the input.", flag_values=fv)
    s("images", None, "i2t/i2i: image glob (comma-separated globs allowed) or, for i2t, a JSONL of {image, "
      "question, ...}.", flag_values=fv)
    s("question", None, "i2t: the question asked about every image of --images GLOB.", flag_values=fv)
    i("max_new_tokens", None, "i2t: answer length limit (default 128; 16 for mme).", flag_values=fv)
    f("temperature", 0.0, "i2t: 0 = greedy, else sampling with --top_p.", flag_values=fv)
    f("top_p", 1.0, "i2t: nucleus sampling mass.", flag_values=fv)
    i("min_pixels", None, "i2t: Qwen2.5-VL smart-resize lower bound (default: preprocessor_config.json; mme: "
      "256*28*28).", flag_values=fv)
    i("max_pixels", None, "i2t: upper bound (default: preprocessor_config.json; mme: 1605632).", flag_values=fv)
    s("system_prompt", "You are a helpful assistant.", "i2t system prompt.", flag_values=fv)
    e("resize", "squash", ["squash", "crop"], "i2i: fit images to the encoder by squashing (the original "
      "reconstruction pipelines) or resize + center crop (the training transform).", flag_values=fv)
    b("progress", True, "Show a progress bar.", flag_values=fv)


# ----------------------------------------------------------------------------------------------------------------
# model fingerprints


def fingerprint(path: str) -> str:
    """sha256 over a checkpoint's files: names, sizes, small files whole, the first and last MiB of large ones
    (reading 16 GB of weights to name them would dominate a short run)."""
    h = hashlib.sha256()
    if fs.isfile(path):
        files, root = [path], fs.dirname(path)
    else:
        files, root = list(fs.walk_files(path, skip_hidden=True)), path
    for fpath in files:
        size = fs.getsize(fpath)
        relpath = fpath[len(root):].lstrip("/" + os.sep).replace(os.sep, "/")  # the same for a local or remote copy
        h.update(f"{relpath}\0{size}\0".encode())
        with fs.open_file(fpath, "rb") as fh:
            if size <= 2 * FINGERPRINT_CHUNK:
                h.update(fh.read())
            else:
                h.update(fh.read(FINGERPRINT_CHUNK))
                fh.seek(size - FINGERPRINT_CHUNK)
                h.update(fh.read(FINGERPRINT_CHUNK))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# loading


def _read_json(path: str) -> dict:
    try:
        return json.loads(fs.read_bytes(path))
    except FileNotFoundError:
        raise cli.UserError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise cli.UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def model_layout(path: str) -> str:
    """'workdir' (a training run), 'converted' (convert_torch_weights.py output) or 'release' (safetensors)."""
    from blip3o_jax import pretrained

    if not path:
        raise cli.UserError("--model is required")
    if not fs.isdir(path):
        raise cli.UserError(f"--model {path}: no such directory")
    config_path = fs.join(path, "config.json")
    if not fs.isfile(config_path):
        raise cli.UserError(f"--model {path}: no config.json; expected a released/converted checkpoint or a "
                            "training workdir")
    hf = _read_json(config_path)
    if isinstance(hf, dict) and "model" in hf and "data" in hf:
        return "workdir"
    if pretrained.is_converted(path):
        return "converted"
    if not any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in fs.listdir(path)):
        raise cli.UserError(f"--model {path}: no safetensors weights (model.safetensors or an index) and no "
                            "converted params/")
    return "release"


def release_eva_config(hf: dict, dtype: str | None = None):
    """The EVA-CLIP tower's config: `gen_vision_tower_config` when present (tiny releases), else the original's
    eva-clip-E-14-plus; pooling stride from `gen_pooling` ("early_pool2d_4")."""
    from blip3o_jax.models import eva_clip

    eva = dict(hf.get(EVA_CONFIG_KEY) or {})
    pooling = str(hf.get("gen_pooling", "early_pool2d_4"))
    if pooling.startswith("early_pool2d_"):
        eva.setdefault("pool_stride", int(pooling.rsplit("_", 1)[1]))
    if dtype is not None:
        eva.update(dtype=dtype, param_dtype=dtype)
    return eva_clip.config_from_hf("eva_clip", eva)


def release_config(hf: dict, *, dtype: str | None = None, gen_encoder: bool = False):
    """Blip3oConfig of a released config.json (a flat Qwen2.5-VL config plus BLIP3-o fields). The DiT comes from
    `dit_config` when present, else the original's `NextDiTCrossAttnConfig` defaults with the LLM width; the EVA
    tower is included only with `gen_encoder=True` (text to image never runs it)."""
    from blip3o_jax.models import blip3o as blip3o_lib
    from blip3o_jax.models import dit as dit_lib

    base = blip3o_lib.config_from_hf("blip3o", {k: v for k, v in hf.items() if k not in (DIT_CONFIG_KEY,
                                                                                          EVA_CONFIG_KEY)})
    backbone = base.backbone
    dit_hf = dict(hf.get(DIT_CONFIG_KEY) or {})
    dit_hf.setdefault("latent_embedding_size", backbone.hidden_size)
    policy = {} if dtype is None else {"dtype": dtype, "param_dtype": dtype}
    dit = dit_lib.config_from_hf("dit", {**dit_hf, **policy})
    backbone = dataclasses.replace(backbone, **policy)
    eva = release_eva_config(hf, dtype) if gen_encoder else None
    return blip3o_lib.Blip3oConfig(
        backbone_kind=base.backbone_kind, backbone=backbone, dit=dit, n_query=base.n_query,
        target="eva_clip" if gen_encoder else "precomputed", gen_encoder=eva,
        image_size=eva.image_size if eva is not None else 448, target_grid=dit.input_size,
        target_channels=dit.in_channels)


def _weight_keys(path: str) -> list[tuple[str, list[str]]]:
    from blip3o_jax import pretrained

    plan = pretrained._tensor_plan(path)
    if plan is None:
        raise cli.UserError(f"{path}: no safetensors weights")
    return plan


def read_release_tensors(path: str, keep) -> dict[str, np.ndarray]:
    """{key: array} of the release's tensors whose key satisfies `keep(key)`, streamed shard by shard."""
    from blip3o_jax.convert.common import iter_safetensors

    out = {}
    for fpath, keys in _weight_keys(path):
        wanted = [k for k in keys if keep(k)]
        if wanted:
            out.update(iter_safetensors(fpath, wanted))
    return out


def _starts(key: str, prefixes) -> bool:
    return any(key.startswith(p) for p in prefixes)


@dataclasses.dataclass(eq=False)
class Generator:
    """Everything text to image needs, loaded once."""

    model: Any  # models.blip3o.Blip3o
    params: Any
    tokenizer: Any
    data_cfg: Any  # ConfigDict read by sampling.prompt_batch (prompt_format, tokens, system_prompt)
    flow_cfg: Any  # diffusion.flow_matching.FlowMatchingConfig
    max_length: int  # longest prompt (tokens, with [IMG] and the query slots) the model takes
    decoder: Any  # pipelines.sdxl_decoder.SDXLDecoder, or None when the DiT generates pixels
    info: dict  # what run.json records about the model
    _compiled: dict = dataclasses.field(default_factory=dict)

    @property
    def target_shape(self) -> tuple[int, int, int]:
        return self.model.cfg.target_shape


def _tokenizer(path: str):
    """The checkpoint's fast tokenizer straight from tokenizer.json (no transformers config resolution: the
    release's config.json names a model type transformers does not know)."""
    from tokenizers import Tokenizer

    from blip3o_jax.data.tokenizer import FastTokenizer

    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_file):
        raise cli.UserError(f"{path}: no tokenizer.json")
    backend = Tokenizer.from_file(tok_file)
    config_file = os.path.join(path, "tokenizer_config.json")
    pad = _read_json(config_file).get("pad_token") if os.path.isfile(config_file) else None
    if isinstance(pad, dict):  # an AddedToken serialised by older transformers
        pad = pad.get("content")
    pad_id = backend.token_to_id(pad or "<|endoftext|>")
    return FastTokenizer(backend, pad_id, path)


def _t2i_decoder_dir(model: str, decoder: str, layout: str) -> str | None:
    """The SDXL decoder folder of a text-to-image run; None for a workdir whose DiT generates pixels."""
    if layout == "workdir":
        target = _read_json(fs.join(model, "config.json"))["model"].get("target", "eva_clip")
        if target == "pixels":
            return None
        if target not in ("eva_clip", "precomputed"):
            raise cli.UserError(f"{model}: the model generates {target!r} targets; blip3o-sample decodes EVA-CLIP "
                                "features (SDXL decoder) or pixels only")
    if decoder == "sana":
        raise cli.UserError("--decoder sana reconstructs SigLIP2 features (i2i); BLIP3-o's DiT generates EVA-CLIP "
                            "features, which the SDXL decoder turns into pixels")
    return _decoder_dir(model, decoder, layout)


def _decoder_dir(model: str, decoder: str, layout: str) -> str:
    """The decoder folder `--decoder` names; an SDXL one is checked for its three parts."""
    if decoder == "sdxl":
        if layout == "workdir":
            raise cli.UserError("a training workdir has no diffusion-decoder/; pass --decoder DIR")
        path = os.path.join(model, "diffusion-decoder")
        if not os.path.isdir(path):
            raise cli.UserError(f"{model}: no diffusion-decoder/ folder; pass --decoder DIR")
    elif not os.path.isdir(decoder):
        raise cli.UserError(f"--decoder {decoder}: expected sdxl, sana or a decoder directory")
    else:
        path = decoder
    if not _is_sana_dir(path):
        for part, file in (("unet", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
            if not os.path.isfile(os.path.join(path, part, file)):
                raise cli.UserError(f"{path}: no {part}/{file}; a diffusion decoder needs unet/, vae/ and "
                                    "scheduler/")
    return path


def vae_factor(decoder_dir: str) -> int:
    """The SDXL decoder's pixel/latent factor from vae/config.json, read before any weight is loaded."""
    cfg = _read_json(os.path.join(decoder_dir, "vae", "config.json"))
    return 2 ** (len(cfg.get("block_out_channels", (128, 256, 512, 512))) - 1)


def decoder_native_resolution(decoder_dir: str) -> int:
    cfg = _read_json(os.path.join(decoder_dir, "unet", "config.json"))
    return int(cfg.get("sample_size", 128)) * vae_factor(decoder_dir)


def _load_sdxl(decoder_dir: str, dtype: str):
    """The SDXL decoder of a folder, loaded once per process (its compiled programs live on the object, so every
    model that uses the folder shares them)."""
    from blip3o_jax.pipelines import sdxl_decoder

    key = ("sdxl", os.path.abspath(decoder_dir), dtype)
    if key not in _LOADED:
        _LOADED[key] = sdxl_decoder.load_sdxl_decoder(decoder_dir, dtype=None if dtype == "float32" else dtype)
    return _LOADED[key]


_LOADED: dict = {}  # loaded models and decoders, per process
_FUNCTIONS: dict = {}  # jitted samplers, per model config


def load_generator(model: str, decoder: str, dtype: str, prompt_format: str | None) -> Generator:
    """The text-to-image model (+ decoder) of `--model`; cached per process (repeated in-process runs reuse the
    weights and compiled programs, whatever the prompt format: prompts are inputs of the programs)."""
    key = ("t2i", fs.abspath(model), decoder, dtype)
    if key not in _LOADED:
        _LOADED[key] = _load_generator(model, decoder, dtype)
    gen = _LOADED[key]
    if prompt_format and prompt_format != gen.data_cfg.get("prompt_format", "train"):
        data_cfg = gen.data_cfg.copy_and_resolve_references()
        data_cfg.prompt_format = prompt_format
        gen = dataclasses.replace(gen, data_cfg=data_cfg, _compiled=gen._compiled)
    return gen


def _load_generator(model: str, decoder: str, dtype: str) -> Generator:
    import ml_collections

    from blip3o_jax import pretrained
    from blip3o_jax.diffusion import flow_matching
    from blip3o_jax.models import blip3o as blip3o_lib

    layout = model_layout(model)
    info = {"path": fs.abspath(model), "layout": layout}
    if layout == "workdir":
        from blip3o_jax import sampling

        module, params, config = sampling.load_trained(model)
        mcfg = module.cfg
        if dtype != "float32":
            import jax

            from blip3o_jax.models import layers

            policy = {"dtype": dtype, "param_dtype": dtype}
            mcfg = dataclasses.replace(mcfg, backbone=dataclasses.replace(mcfg.backbone, **policy),
                                       dit=dataclasses.replace(mcfg.dit, **policy))
            module = blip3o_lib.build("blip3o", mcfg)
            params = jax.tree.map(lambda a: a.astype(layers.to_dtype(dtype)) if a.dtype.kind == "f" else a, params)
        tokenizer = _tokenizer(config.data.tokenizer)
        data_cfg = ml_collections.ConfigDict(dict(config.data))
        flow_cfg = flow_matching.FlowMatchingConfig(**dict(config.get("flow", {})))
        max_length = max(int(n) for n in config.data.seq_buckets)
        info["step_dir"] = _latest_checkpoint(model)
        info["fingerprint"] = fingerprint(info["step_dir"] or model)
    else:
        hf = _read_json(os.path.join(model, "config.json"))
        mcfg = release_config(hf, dtype=None if dtype == "float32" else dtype)
        tokenizer = _tokenizer(model)
        if layout == "converted":
            meta = _read_json(os.path.join(model, pretrained.META_FILE))
            if meta.get("kind") != "blip3o":
                raise cli.UserError(f"{model}: converted as {meta.get('kind')!r}; text to image needs a BLIP3-o "
                                    "checkpoint (convert_torch_weights.py --kind blip3o)")
            restored = pretrained.restore_params(model)
            params = {k: restored[k] for k in ("backbone", "latent_queries", "dit")}
        else:
            from blip3o_jax import convert

            sd = read_release_tensors(model, lambda k: not _starts(k, ("visual.", "model.visual.",
                                                                       "model.gen_vision_tower.")))
            params = convert.from_torch("blip3o", sd, mcfg)
            del sd
        module = blip3o_lib.build("blip3o", mcfg)
        params = pretrained._cast(params, mcfg.backbone.param_dtype)
        data_cfg = ml_collections.ConfigDict({"prompt_format": "train"})
        flow_cfg = flow_matching.FlowMatchingConfig()
        max_length = int(mcfg.backbone.max_position_embeddings)
        info["fingerprint"] = fingerprint(model)
    dec = None
    decoder_dir = _t2i_decoder_dir(model, decoder, layout)
    if decoder_dir is not None:
        dec = _load_sdxl(decoder_dir, dtype)
        info["decoder"] = {"path": os.path.abspath(decoder_dir), "fingerprint": fingerprint(decoder_dir)}
        if dec.feature_width != mcfg.target_channels:
            raise cli.UserError(f"{decoder_dir}: the decoder cross-attends to {dec.feature_width}-wide features but "
                                f"the DiT generates {mcfg.target_channels}-wide ones")
    import jax

    return Generator(module, jax.tree.map(np.asarray, params), tokenizer, data_cfg, flow_cfg, max_length, dec, info)


def _latest_checkpoint(workdir: str) -> str | None:
    ckpt = fs.join(workdir, "checkpoints")
    if not fs.isdir(ckpt):
        return None
    steps = sorted((int(n) for n in fs.listdir(ckpt) if n.isdigit()), reverse=True)
    return fs.join(ckpt, str(steps[0])) if steps else None


# ----------------------------------------------------------------------------------------------------------------
# devices


@dataclasses.dataclass(frozen=True)
class Devices:
    mesh: Any  # (data, fsdp, tensor) over this process's devices
    count: int

    @property
    def batch_parallel(self) -> int:
        """Devices the batch is split over: data x fsdp (the devices of one tensor group share their rows)."""
        return int(self.mesh.shape["data"] * self.mesh.shape["fsdp"])

    @property
    def shards_weights(self) -> bool:
        return self.mesh.shape["fsdp"] * self.mesh.shape["tensor"] > 1

    def replicate(self, tree):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec as P

        return jax.device_put(tree, NamedSharding(self.mesh, P()))

    def place(self, tree, boxed):
        """Weights on the mesh: replicated on a data-only mesh, else sharded by their logical axes as the trainer
        shards them (`sharding.params_shardings` of the module's boxed abstract params; `boxed` is a callable that
        makes them, called only when needed). Leaves the boxed tree does not name are replicated."""
        if not self.shards_weights:
            return self.replicate(tree)
        import flax
        import jax

        from blip3o_jax import sharding

        shardings = flax.traverse_util.flatten_dict(sharding.params_shardings(boxed(), self.mesh))
        flat = flax.traverse_util.flatten_dict(tree)
        placed = {path: jax.device_put(leaf, shardings.get(path) or self._replicated()) for path, leaf in flat.items()}
        return flax.traverse_util.unflatten_dict(placed)

    def _replicated(self):
        from jax.sharding import NamedSharding, PartitionSpec as P

        return NamedSharding(self.mesh, P())

    def shard_batch(self, tree):
        """Leading axis over the mesh's data x fsdp devices (data-parallel)."""
        import jax

        from blip3o_jax import sharding

        return jax.tree.map(lambda a: jax.device_put(a, sharding.batch_sharding(self.mesh, np.ndim(a))), tree)

    def round_batch(self, batch: int) -> int:
        return max(1, math.ceil(batch / self.batch_parallel)) * self.batch_parallel


def parse_mesh(spec: str | None) -> dict[str, int]:
    """`--mesh` sizes: {"data": -1} by default; axes not named are 1, except data, which takes the devices left
    over unless it is named or another axis is -1 (`fsdp=4` on 8 devices: data=2, fsdp=4)."""
    from blip3o_jax import plan as plan_lib

    try:
        sizes = plan_lib.parse_mesh(spec, {"data": -1})
    except ValueError:
        raise ValueError(f"--mesh {spec!r}: expected 'data=N,fsdp=N,tensor=N' (one size may be -1)") from None
    if "data" not in sizes and -1 not in sizes.values():
        sizes["data"] = -1
    return sizes


def local_devices(n: int | None, mesh: str | None = None) -> Devices:
    """The first `n` (default all) devices of this process on the `--mesh` of `mesh` (default data=-1)."""
    import jax

    from blip3o_jax import sharding

    devices = jax.local_devices()
    if n is not None:
        if not 1 <= n <= len(devices):
            raise cli.UserError(f"--devices {n}: this process has {len(devices)} local devices")
        devices = devices[:n]
    try:
        return Devices(sharding.make_mesh(parse_mesh(mesh), devices=devices), len(devices))
    except ValueError as e:
        raise cli.UserError(f"--mesh {mesh}: {e}") from None


def _boxed_params(module, args, kwargs=None, method=None):
    """The module's params with their logical axis names, as ShapeDtypeStructs (nothing is allocated)."""
    import jax

    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, method=method, **(kwargs or {})))["params"]


def _kind_boxed(kind: str, module):
    """`_boxed_params` of a registered kind's module, from the registry's shape-only init arguments."""
    from blip3o_jax.models import registry

    def boxed():
        args, kwargs, method = registry.get(kind).init_args(module.cfg)
        return _boxed_params(module, args, kwargs, method)

    return boxed


def placed_generator(gen: Generator, devices: Devices) -> Generator:
    """`gen` with its weights on the devices of the mesh: replicated on a data-only mesh, sharded by their logical
    axes when the mesh has fsdp or tensor devices (placed once per mesh, shared by the generators of other prompt
    formats)."""
    key = ("placed", devices.mesh)
    if key not in gen._compiled:
        from blip3o_jax.training import model_setup

        dec = gen.decoder
        if dec is not None:
            dec = dataclasses.replace(dec, unet_params=devices.place(dec.unet_params, _kind_boxed("unet", dec.unet)),
                                      vae_params=devices.place(dec.vae_params, _kind_boxed("autoencoder_kl", dec.vae)))
        params = devices.place(gen.params, lambda: _boxed_params(gen.model, model_setup.init_inputs(gen.model.cfg)))
        gen._compiled[key] = (params, dec)
    params, dec = gen._compiled[key]
    return dataclasses.replace(gen, params=params, decoder=dec, _compiled=gen._compiled)


replicated_generator = placed_generator  # the name of the data-only (replicated) days; tools/bench_sample.py


# ----------------------------------------------------------------------------------------------------------------
# text to image


def length_buckets(max_length: int) -> list[int]:
    """64, 128, ... up to MAX_BUCKET, then the context itself: a prompt pads to the first bucket that holds it."""
    buckets, n = [], DEFAULT_BUCKET
    while n < min(max_length, MAX_BUCKET):
        buckets.append(n)
        n *= 2
    return buckets + [max_length]


def _prompt_ids(gen: Generator, caption: str) -> np.ndarray:
    from blip3o_jax.data import prompts

    names = prompts.TokenNames.from_config(gen.data_cfg.get("tokens"))
    return prompts.t2i_prompt_ids(gen.tokenizer, caption, gen.model.cfg.n_query,
                                  prompt_format=gen.data_cfg.get("prompt_format", "train"), names=names,
                                  system_prompt=gen.data_cfg.get("system_prompt", prompts.SYSTEM_PROMPT))


def prompt_batch(gen: Generator, captions: Sequence[str], length: int) -> dict[str, np.ndarray]:
    """`sampling.prompt_batch` padded to exactly `length` (the prompts' own bucket, not the batch's longest)."""
    from blip3o_jax import sampling

    data_cfg = gen.data_cfg.copy_and_resolve_references()
    data_cfg.seq_buckets = (length,)
    return sampling.prompt_batch(gen.tokenizer, captions, data_cfg, gen.model.cfg.n_query)


def _row_noise(seed, item_indices, ks, shape, stream: int):
    """(B, *shape) unit noise of images (item i, image k): normal(fold_in(fold_in(fold_in(PRNGKey(seed), i), k),
    stream)); stream 0 = the DiT's, 1 = the decoder's. Traced inside the jitted sampler (no extra compile)."""
    import jax

    def one(i, k):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), i), k)
        return jax.random.normal(jax.random.fold_in(key, stream), shape, np.float32)

    return jax.vmap(one)(item_indices, ks)


def _dit_fn(gen: Generator, steps: int, guided: bool, latent_shape: tuple | None):
    """Jitted (params, prompt batch, seed, item indices (B,), image indices (B,), guidance) -> (grids (B, g, g, C)
    fp32, the decoder's initial noise (B, *latent_shape) or None): the LLM pass with the latent queries, then the
    flow-matching sampler (the machinery of `sampling.Sampler`, with each row's noise from its indices)."""
    # shared by every generator of the same model config (a release and its converted copy compile once)
    key = ("dit", gen.model, gen.flow_cfg, steps, guided, latent_shape)
    if key in _FUNCTIONS:
        return _FUNCTIONS[key]
    import jax
    import jax.numpy as jnp

    from blip3o_jax.diffusion import flow_matching
    from blip3o_jax.models import blip3o as blip3o_lib

    model, mcfg, flow_cfg = gen.model, gen.model.cfg, gen.flow_cfg

    def run(params, batch, seed, item_indices, ks, guidance):
        B = batch["input_ids"].shape[0]
        cond, _ = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["positions"],
                              batch["query_index"], jnp.ones((B,), bool), method=blip3o_lib.Blip3o.encode)
        latents = None if latent_shape is None else _row_noise(seed, item_indices, ks, latent_shape, 1)
        if mcfg.loss == "clip_mse":
            return model.apply({"params": params}, cond, method=blip3o_lib.Blip3o.mse_prediction), latents

        def velocity(dit_params, x_t, t, c, cond_mask=None):
            return model.apply({"params": {**params, "dit": dit_params}}, x_t, t, c, cond_mask,
                               method=blip3o_lib.Blip3o.velocity)

        noise = _row_noise(seed, item_indices, ks, mcfg.target_shape, 0)
        grids = flow_matching.sample(velocity, params["dit"], cond, None, noise.shape, flow_cfg, num_steps=steps,
                                     guidance_scale=guidance if guided else 1.0, initial_noise=noise)
        return grids, latents

    fn = jax.jit(run)
    _FUNCTIONS[key] = fn
    return fn


def _split(tree) -> bool:
    """Whether some leaf of `tree` is split over devices (weights placed on an fsdp / tensor mesh)."""
    import jax

    return any(not getattr(getattr(x, "sharding", None), "is_fully_replicated", True) for x in jax.tree.leaves(tree))


def negative_features(gen: Generator, settings: dict) -> np.ndarray:
    """`--negative original`: the DiT's sample for the empty prompt without chat template (the original's
    `generate_image([""])`), from a fixed noise of `--seed`; shape (1, g*g, C)."""
    from blip3o_jax.data import prompts

    key = ("negative", settings["seed"], settings["dit_steps"], settings["dit_guidance"])
    if key in gen._compiled:
        return gen._compiled[key]
    ids_special = prompts.special_ids(gen.tokenizer, prompts.TokenNames.from_config(gen.data_cfg.get("tokens")))
    nq = gen.model.cfg.n_query
    ids = np.asarray([[ids_special.image_start] + [ids_special.query] * nq], np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "positions": np.arange(ids.shape[1])[None],
             "query_index": (1 + np.arange(nq))[None].astype(np.int32)}
    import jax

    # one row: on one device, unless the weights are sharded (they may not fit one device): then on their mesh
    params = gen.params if _split(gen.params) else jax.tree.map(np.asarray, gen.params)
    guided = settings["dit_guidance"] != 1.0
    # the noise of a row no prompt has: item index 2**31 - 1
    grid, _ = _dit_fn(gen, settings["dit_steps"], guided, None)(
        params, batch, np.uint32(settings["seed"]), np.asarray([NEGATIVE_INDEX], np.uint32),
        np.zeros((1,), np.uint32), np.float32(settings["dit_guidance"]))
    out = np.asarray(grid, np.float32).reshape(1, -1, gen.target_shape[-1])
    gen._compiled[key] = out
    return out


def generate_images(gen: Generator, devices: Devices, captions: Sequence[str], item_indices, ks, length: int,
                    settings: dict, negative) -> np.ndarray:
    """uint8 (B, H, W, 3) for rows (caption, item index, image index k); B a multiple of the device count."""
    import jax.numpy as jnp

    from blip3o_jax.pipelines import sdxl_decoder

    batch = devices.shard_batch(prompt_batch(gen, captions, length))
    item_indices, ks = devices.shard_batch((np.asarray(item_indices, np.uint32), np.asarray(ks, np.uint32)))
    latent_shape = None
    if gen.decoder is not None:
        f = gen.decoder.vae_scale_factor
        latent_shape = (settings["resolution"] // f, settings["resolution"] // f, int(gen.decoder.unet.cfg.in_channels))
    guided = settings["dit_guidance"] != 1.0
    grids, noise = _dit_fn(gen, settings["dit_steps"], guided, latent_shape)(
        gen.params, batch, np.uint32(settings["seed"]), item_indices, ks, np.float32(settings["dit_guidance"]))
    if gen.decoder is None:  # the DiT generated pixels in [-1, 1]
        return np.clip(np.round((np.asarray(grids, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    features = grids.reshape(grids.shape[0], -1, grids.shape[-1])  # (B, g*g, C), row-major over the grid
    images = sdxl_decoder.decode_clip_features(
        gen.decoder, features, negative=negative if negative is not None else "zeros",
        steps=settings["decoder_steps"], guidance_scale=settings["decoder_guidance"],
        resolution=settings["resolution"], noise=noise)
    return np.asarray(jnp.asarray(images))


def _progress(total: int, enabled: bool, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=not enabled, dynamic_ncols=True, smoothing=0.1)


def _shares(items: Sequence[fmts.Item]):
    """This process's share of the items: index % process_count == process_index."""
    import jax

    n, p = jax.process_count(), jax.process_index()
    return [it for it in items if it.index % n == p]


def _run_json_path(path: str) -> str:
    import jax

    if jax.process_index() == 0:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.host{jax.process_index()}{ext}"


def run_t2i(fv) -> dict:
    fmt = fv.format or "png"
    if fmt not in fmts.T2I_FORMATS:
        raise cli.UserError(f"--format {fmt!r}: t2i writes one of {', '.join(fmts.T2I_FORMATS)}")
    if not fv.out:
        raise cli.UserError("--out DIR is required")
    num_images = fv.num_images_per_prompt or (4 if fmt in ("geneval", "dpg") else 1)
    if num_images < 1:
        raise cli.UserError(f"--num_images_per_prompt must be >= 1, got {num_images}")
    if fmt == "wise" and num_images != 1:
        raise cli.UserError("--format wise writes one image per prompt id: --num_images_per_prompt must be 1")
    for name in ("dit_steps", "batch"):
        if getattr(fv, name) < 1:
            raise cli.UserError(f"--{name} must be >= 1, got {getattr(fv, name)}")
    items, skipped = fmts.read_t2i_items(fmt, fv.prompts, fv.prompt, fv.wise_version)
    layout = fmts.T2ILayout(fmt, fv.out, num_images)
    if fv.limit is not None:
        items = [it for it in items if it.index < fv.limit]
        skipped = [s for s in skipped if s.index < fv.limit]
    model_kind = model_layout(fv.model)
    resolution = fv.resolution
    decoder_dir = _t2i_decoder_dir(fv.model, fv.decoder, model_kind)
    if decoder_dir is not None:  # validated before any weight is read
        factor = vae_factor(decoder_dir)
        resolution = resolution or decoder_native_resolution(decoder_dir)
        if resolution <= 0 or resolution % factor:
            raise cli.UserError(f"--resolution {resolution} is not a positive multiple of {factor}, the decoder's "
                                "VAE downsampling factor")
    decoder_steps = fv.decoder_steps or 50

    gen = load_generator(fv.model, fv.decoder, fv.dtype, fv.prompt_format)
    if gen.decoder is None:
        side = gen.target_shape[0]
        if resolution not in (None, side):
            raise cli.UserError(f"--resolution {resolution}: this model generates {side}x{side} pixels directly")
        resolution = side
    settings = {"seed": fv.seed, "dit_steps": fv.dit_steps, "dit_guidance": float(fv.dit_guidance),
                "decoder_steps": decoder_steps, "decoder_guidance": float(fv.decoder_guidance),
                "resolution": int(resolution), "negative": fv.negative, "noise_rule": fv.noise_rule,
                "num_images_per_prompt": num_images, "batch": fv.batch, "dtype": fv.dtype, "format": fmt,
                "prompt_format": gen.data_cfg.get("prompt_format", "train"), "wise_version": fv.wise_version,
                "prompts": fv.prompts, "limit": fv.limit}

    # prompts the model cannot take are skipped (and recorded), never truncated silently
    buckets = length_buckets(gen.max_length)
    lengths, usable = {}, []
    for it in items:
        n = len(_prompt_ids(gen, it.text))
        if n > gen.max_length:
            skipped.append(fmts.Skipped(it.index, it.key, f"prompt has {n} tokens with the template and "
                                        f"{gen.model.cfg.n_query + 1} generation slots; the model takes "
                                        f"{gen.max_length}"))
            continue
        lengths[it.index] = next(b for b in buckets if b >= n)
        usable.append(it)
    items = usable
    if not items:
        raise cli.UserError(f"no usable prompts ({len(skipped)} skipped; first: {skipped[0].reason})")

    devices = local_devices(fv.devices, fv.mesh)
    gen = placed_generator(gen, devices)
    mine = _shares(items)
    fs.makedirs(layout.out)
    fmts.clean_partials(layout.out)
    layout.prepare(mine)
    jobs = [(it, k) for it in mine for k in layout.pending(it)]
    done_before = sum(num_images for _ in mine) - len(jobs)
    started = time.time()
    run_path = _run_json_path(layout.run_json)
    record = {"command": "t2i", "settings": settings, "model": gen.info, "devices": devices.count,
              "mesh": {k: int(v) for k, v in devices.mesh.shape.items()},
              "processes": _process_count(), "items": len(items), "skipped": [s.as_dict() for s in skipped],
              "images_total": len(mine) * num_images, "images_done_before": done_before, "images_written": 0,
              "complete": False}
    fmts.write_json(run_path, record)

    negative = None
    if gen.decoder is not None and fv.negative == "original":
        negative = negative_features(gen, settings)
    global_batch = devices.round_batch(fv.batch)
    by_bucket: dict[int, list] = {}
    for job in jobs:
        by_bucket.setdefault(lengths[job[0].index], []).append(job)
    expected = {it.index: set(layout.pending(it)) for it in mine}
    by_index = {it.index: it for it in mine}
    pending: dict[int, dict[int, np.ndarray]] = {}
    written = 0
    bar = _progress(len(jobs), fv.progress, "img")
    try:
        for length, bucket_jobs in sorted(by_bucket.items()):
            for start in range(0, len(bucket_jobs), global_batch):
                chunk = bucket_jobs[start:start + global_batch]
                rows = chunk + [chunk[-1]] * (global_batch - len(chunk))  # pad rows: copies, discarded
                indices = [0 if fv.noise_rule == "original" else it.index for it, _ in rows]
                images = generate_images(gen, devices, [it.text for it, _ in rows], indices, [k for _, k in rows],
                                         length, settings, negative)
                for (it, k), image in zip(chunk, images):
                    if fmt != "dpg":
                        written += len(layout.write(it, {k: image}))
                        continue
                    got = pending.setdefault(it.index, {})  # a DPG grid needs all 4 tiles
                    got[k] = image
                    if set(got) == expected[it.index]:
                        layout.write(by_index[it.index], pending.pop(it.index))
                        written += len(got)
                bar.update(len(chunk))
    finally:
        bar.close()
    elapsed = time.time() - started
    layout.finish(mine)
    record.update(images_written=written, complete=True, elapsed_s=round(elapsed, 3),
                  images_per_s=round(written / elapsed, 4) if elapsed > 0 and written else None)
    if fmt == "wise":
        cats: dict[str, int] = {}
        for it in items:
            c = fmts.wise_category(int(it.key), fv.wise_version) or "unknown"
            cats[c] = cats.get(c, 0) + 1
        record["wise_categories"] = cats
    fmts.write_json(run_path, record)
    return record


def _process_count() -> int:
    import jax

    return jax.process_count()


# ----------------------------------------------------------------------------------------------------------------
# image to text


@dataclasses.dataclass(eq=False)
class Reader:
    module: Any  # models.qwen2_5_vl.Qwen2_5_VLForConditionalGeneration
    params: Any
    tokenizer: Any
    eos_ids: tuple[int, ...]
    pad_id: int
    pixels: tuple[int, int]  # (min_pixels, max_pixels) of the checkpoint's preprocessor_config.json
    info: dict


def load_reader(model: str, dtype: str) -> Reader:
    key = ("i2t", os.path.abspath(model), dtype)
    if key in _LOADED:
        return _LOADED[key]
    import jax

    from blip3o_jax import convert, generation, models, pretrained, preprocessing
    from blip3o_jax.data import prompts

    layout = model_layout(model)
    policy = None if dtype == "float32" else dtype
    if layout == "workdir":
        raise cli.UserError(f"{model}: a training workdir holds no Qwen2.5-VL vision tower; image to text needs "
                            "the released (or converted, --kind qwen2_5_vl) checkpoint")
    if layout == "converted":
        meta = _read_json(os.path.join(model, pretrained.META_FILE))
        if meta.get("kind") != "qwen2_5_vl":
            raise cli.UserError(f"{model}: converted as {meta.get('kind')!r}, which has no understanding tower; "
                                "convert the release with --kind qwen2_5_vl for image to text")
        module, params = pretrained.load_pretrained(model, dtype=policy)
        module, params = generation.decode_layout("qwen2_5_vl", module, params)
    else:
        hf = _read_json(os.path.join(model, "config.json"))
        try:
            cfg = models.config_from_hf("qwen2_5_vl", {**hf, "model_type": "qwen2_5_vl"})
        except (KeyError, TypeError, ValueError) as e:
            raise cli.UserError(f"{model}/config.json: not a Qwen2.5-VL config ({e})") from None
        if policy:
            cfg = dataclasses.replace(cfg, dtype=policy, param_dtype=policy)
        if jax.default_backend() != "tpu":  # decode with one set of weights per layer (generation.decode_layout)
            cfg = generation.without_scan(cfg)
        sd = read_release_tensors(model, lambda k: not _starts(k, BLIP3O_ONLY_PREFIXES))
        params = convert.from_torch("qwen2_5_vl", sd, cfg)
        del sd
        module = models.build("qwen2_5_vl", cfg)
        import jax.numpy as jnp

        params = jax.tree.map(jnp.asarray, pretrained._cast(params, cfg.text.param_dtype))
        module, params = generation.decode_layout("qwen2_5_vl", module, params)  # a CPU's (out, in) kernels
    tokenizer = _tokenizer(model)
    ids = prompts.special_ids(tokenizer)
    eos = [ids.im_end]
    gen_cfg_path = os.path.join(model, "generation_config.json")
    if os.path.isfile(gen_cfg_path):
        e = _read_json(gen_cfg_path).get("eos_token_id")
        eos = sorted(set(eos) | set([e] if isinstance(e, int) else (e or [])))
    pre = os.path.join(model, "preprocessor_config.json")
    pix = _read_json(pre) if os.path.isfile(pre) else {}
    pixels = (int(pix.get("min_pixels", preprocessing.QWEN_MIN_PIXELS)),
              int(pix.get("max_pixels", preprocessing.QWEN_MAX_PIXELS)))
    reader = Reader(module, params, tokenizer, tuple(eos), ids.pad, pixels,
                    {"path": os.path.abspath(model), "layout": layout, "fingerprint": fingerprint(model)})
    _LOADED[key] = reader
    return reader


def _pow2_bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _understanding_prompt(reader: Reader, question: str, n_image_tokens: int, system: str) -> list[int]:
    from blip3o_jax.data import prompts

    names = prompts.TokenNames()
    image = names.vision_start + names.image_pad * n_image_tokens + names.vision_end
    text = (prompts.chat_turn("system", system, names) + prompts.chat_turn("user", image + question, names)
            + f"{names.im_start}assistant\n")
    return reader.tokenizer.encode(text)


def _answers(reader: Reader, rows: list[dict], settings: dict, rng_seed: int) -> list[str]:
    """Generates the answers of one batch: rows hold ids (list), patches (N, 1176), grid (3,)."""
    import jax

    from blip3o_jax import generation

    cfg = reader.module.cfg
    B = len(rows)
    L = _pow2_bucket(max(len(r["ids"]) for r in rows), 32)
    ids = np.full((B, L), reader.pad_id, np.int32)
    mask = np.zeros((B, L), np.int32)
    for b, r in enumerate(rows):  # left padding: generation continues every row at column L
        ids[b, L - len(r["ids"]):] = r["ids"]
        mask[b, L - len(r["ids"]):] = 1
    patches = np.concatenate([r["patches"] for r in rows])
    grids = np.stack([r["grid"] for r in rows])
    num_tokens = _pow2_bucket(len(patches), 64)
    from blip3o_jax.models import qwen2_5_vl_vision as qv

    windows = len(qv.vision_layout(grids, cfg.vision, num_tokens=num_tokens)["window_valid"])
    tokens = generation.qwen2_5_vl_generate(
        reader.module, reader.params, ids, mask, patches, grids, max_new_tokens=settings["max_new_tokens"],
        eos_token_id=list(reader.eos_ids), pad_token_id=reader.pad_id, temperature=settings["temperature"],
        top_p=settings["top_p"], rng=jax.random.PRNGKey(rng_seed), num_tokens=num_tokens,
        num_windows=_pow2_bucket(windows, 4))
    out = []
    for row in np.asarray(tokens):
        stop = next((i for i, t in enumerate(row) if int(t) in reader.eos_ids), len(row))
        out.append(reader.tokenizer.decode(row[:stop], skip_special_tokens=True).strip())
    return out


def run_i2t(fv) -> dict:
    from blip3o_jax import preprocessing

    fmt = fv.format or "jsonl"
    if fmt not in fmts.I2T_FORMATS:
        raise cli.UserError(f"--format {fmt!r}: i2t writes one of {', '.join(fmts.I2T_FORMATS)}")
    if not fv.images:
        raise cli.UserError("--images GLOB|JSONL is required")
    if not fv.out:
        raise cli.UserError("--out is required")
    items, skipped = fmts.read_i2t_items(fmt, fv.images, fv.question)
    if fv.limit is not None:
        items = [it for it in items if it.index < fv.limit]
    if fmt == "mme":
        out_dir = fv.out
        log_path = fs.join(out_dir, "predictions.jsonl")
        run_path = fs.join(out_dir, "run.json")
    else:
        if fs.isdir(fv.out):
            raise cli.UserError(f"--out {fv.out} is a directory; i2t --format jsonl writes a .jsonl file")
        log_path = fv.out
        run_path = os.path.splitext(fv.out)[0] + ".run.json"
    max_new = fv.max_new_tokens or (16 if fmt == "mme" else 128)
    settings = {"format": fmt, "max_new_tokens": max_new, "temperature": float(fv.temperature),
                "top_p": float(fv.top_p), "seed": fv.seed, "batch": fv.batch, "dtype": fv.dtype,
                "system_prompt": fv.system_prompt, "images": fv.images, "question": fv.question}
    reader = load_reader(fv.model, fv.dtype)
    min_px = fv.min_pixels or (256 * 28 * 28 if fmt == "mme" else reader.pixels[0])
    max_px = fv.max_pixels or (1605632 if fmt == "mme" else reader.pixels[1])
    settings.update(min_pixels=min_px, max_pixels=max_px)
    mine = _shares(items)
    done = {int(r["index"]): r for r in fmts.read_jsonl_rows(log_path)}
    if fs.exists(log_path):  # drop a torn last line of a killed run before appending
        fmts.write_bytes(log_path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                           for r in done.values()).encode())
    todo = [it for it in mine if it.index not in done]
    record = {"command": "i2t", "settings": settings, "model": reader.info, "items": len(items),
              "done_before": len(mine) - len(todo), "written": 0, "complete": False}
    bad: list[fmts.Skipped] = list(skipped)
    vcfg = reader.module.cfg.vision
    context = reader.module.cfg.text.max_position_embeddings
    scanned = []  # (item, prompt ids): sizes from the image headers; pixels are decoded batch by batch
    for it in todo:
        try:
            with preprocessing.open_image(it.image) as img:
                width, height = img.size
            rh, rw = preprocessing.smart_resize(height, width, vcfg.patch_size * vcfg.spatial_merge_size, min_px,
                                                max_px)
        except (preprocessing.BadImageError, OSError) as e:
            bad.append(fmts.Skipped(it.index, it.key, f"{it.image}: {e}"))
            continue
        question = fmts.mme_question(it.text) if fmt == "mme" else it.text
        n_tokens = (rh // vcfg.patch_size) * (rw // vcfg.patch_size) // vcfg.merge_unit
        ids = _understanding_prompt(reader, question, n_tokens, fv.system_prompt)
        if len(ids) + max_new > context:
            bad.append(fmts.Skipped(it.index, it.key, f"prompt of {len(ids)} tokens + {max_new} new ones exceeds "
                                    f"the model's context {context}"))
            continue
        scanned.append((it, ids))
    if not scanned and not done:
        raise cli.UserError(f"no usable inputs: {bad[0].reason}" if bad else "no inputs")
    record["skipped"] = [s.as_dict() for s in bad]
    fmts.write_json(_run_json_path(run_path), record)
    # length buckets: similar prompts (image size, question length) share a batch and a compilation
    scanned.sort(key=lambda p: (len(p[1]), p[0].index))
    started, written = time.time(), 0
    bar = _progress(len(scanned), fv.progress, "q")
    try:
        for start in range(0, len(scanned), fv.batch):
            chunk = []
            for it, ids in scanned[start:start + fv.batch]:
                try:
                    with preprocessing.open_image(it.image) as img:
                        patches, grid = preprocessing.qwen2_5_vl_preprocess(
                            img, min_pixels=min_px, max_pixels=max_px, patch_size=vcfg.patch_size,
                            temporal_patch_size=vcfg.temporal_patch_size, merge_size=vcfg.spatial_merge_size)
                except (preprocessing.BadImageError, OSError) as e:
                    bad.append(fmts.Skipped(it.index, it.key, f"{it.image}: {e}"))
                    continue
                chunk.append((it, {"ids": ids, "patches": patches, "grid": grid}))
            # padded to --batch with copies of the last row (discarded): one compilation per length bucket
            batch = [r for _, r in chunk] + [chunk[-1][1]] * (fv.batch - len(chunk)) if chunk else []
            answers = _answers(reader, batch, settings, fv.seed + start)[:len(chunk)] if chunk else []
            rows = []
            for (it, _), answer in zip(chunk, answers):
                row = {"index": it.index, "id": it.key, "image": it.image, "question": it.text, "prediction": answer}
                for extra in ("answer", "category"):
                    if extra in it.meta:
                        row[extra] = it.meta[extra]
                rows.append(row)
            fmts.append_jsonl(log_path, rows)
            written += len(rows)
            bar.update(len(rows))
    finally:
        bar.close()
    record["skipped"] = [s.as_dict() for s in bad]
    rows = sorted({int(r["index"]): r for r in fmts.read_jsonl_rows(log_path)}.values(), key=lambda r: r["index"])
    fmts.write_bytes(log_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    if fmt == "mme":
        record["category_files"] = [os.path.basename(p) for p in fmts.write_mme(out_dir, rows)]
    elapsed = time.time() - started
    record.update(written=written, complete=True, elapsed_s=round(elapsed, 3),
                  questions_per_s=round(written / elapsed, 4) if elapsed > 0 and written else None)
    fmts.write_json(_run_json_path(run_path), record)
    return record


# ----------------------------------------------------------------------------------------------------------------
# image to image


def _load_eva(model: str, dtype: str):
    """(EVA module, params) of the model's generation tower (release safetensors or a converted blip3o)."""
    from blip3o_jax import convert, models, pretrained

    layout = model_layout(model)
    if layout == "workdir":
        raise cli.UserError(f"{model}: reconstruction needs the released EVA-CLIP tower; pass the released or "
                            "converted checkpoint as --model")
    hf = _read_json(os.path.join(model, "config.json"))
    cfg = release_eva_config(hf, None if dtype == "float32" else dtype)
    if layout == "converted":
        restored = pretrained.restore_params(model)
        if "gen_encoder" not in restored:
            raise cli.UserError(f"{model}: the converted checkpoint has no EVA-CLIP tower (gen_encoder)")
        params = restored["gen_encoder"]
    else:
        from blip3o_jax.convert import blip3o as blip3o_convert

        sd = read_release_tensors(model, lambda k: _starts(k, blip3o_convert.GEN_ENCODER_PREFIXES))
        if not sd:
            raise cli.UserError(f"{model}: no EVA-CLIP tower in the weights "
                                "(model.gen_vision_tower.vision_tower.model.*)")
        params = convert.from_torch("eva_clip", sd, cfg)
    import jax
    import jax.numpy as jnp

    return models.build("eva_clip", cfg), jax.tree.map(jnp.asarray, pretrained._cast(params, cfg.param_dtype))


def _is_sana_dir(path: str) -> bool:
    return all(os.path.isdir(os.path.join(path, p)) for p in ("encoder", "connector", "transformer"))


def _sdxl_reconstructor(model: str, decoder_dir: str, dtype: str, devices: Devices, settings: dict):
    """(jitted (images uint8 (B, S, S, 3), noise) -> uint8 reconstructions, S): EVA-CLIP features -> the SDXL
    decoder through `sdxl_decoder.reconstruct`, weights placed on the `--mesh` (replicated by default); cached per
    process."""
    import jax

    from blip3o_jax.pipelines import sdxl_decoder

    key = ("i2i-sdxl", os.path.abspath(model), os.path.abspath(decoder_dir), dtype, devices.mesh)
    if key not in _LOADED:
        eva_module, eva_params = _load_eva(model, dtype)
        decoder = _load_sdxl(decoder_dir, dtype)
        _LOADED[key] = (eva_module, devices.place(eva_params, _kind_boxed("eva_clip", eva_module)), decoder,
                        (devices.place(decoder.unet_params, _kind_boxed("unet", decoder.unet)),
                         devices.place(decoder.vae_params, _kind_boxed("autoencoder_kl", decoder.vae))), {})
    eva_module, eva_params, decoder, (unet_params, vae_params), fns = _LOADED[key]
    steps, guidance, resolution = settings["decoder_steps"], settings["decoder_guidance"], settings["resolution"]
    if (steps, guidance, resolution) not in fns:
        def run(unet_params, vae_params, eva_params, images, noise):
            dec = dataclasses.replace(decoder, unet_params=unet_params, vae_params=vae_params)
            return sdxl_decoder.reconstruct(dec, eva_module, eva_params, images, noise=noise, steps=steps,
                                            guidance_scale=guidance, resolution=resolution)

        fns[(steps, guidance, resolution)] = jax.jit(run)
    fn = fns[(steps, guidance, resolution)]
    latent = (resolution // decoder.vae_scale_factor,) * 2 + (int(decoder.unet.cfg.in_channels),)

    def reconstruct(images, indices):
        noise = sdxl_decoder.initial_noise(settings["seed"], indices, latent)
        images, noise = devices.shard_batch((images, np.asarray(noise)))
        return fn(unet_params, vae_params, eva_params, images, noise)

    return reconstruct


def _is_sana_workdir(path: str) -> bool:
    """A training workdir of the SigLIP2 -> SANA decoder recipe (config.model.kind "sana_decoder")."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return False
    hf = _read_json(config_path)
    return isinstance(hf, dict) and isinstance(hf.get("model"), dict) and hf["model"].get("kind") == "sana_decoder"


def _load_sana_workdir(workdir: str):
    """The SANA decoder trained in `workdir`: latest checkpoint (the EMA weights when kept) + frozen SigLIP and
    DC-AE, sampled by the flow-matching Euler scheduler with the run's flow settings (num_train_timesteps, shift)."""
    from blip3o_jax import models, sampling
    from blip3o_jax.diffusion import schedulers
    from blip3o_jax.pipelines import sana_decoder
    from blip3o_jax.training import model_setup as ms_lib

    model, params, config = sampling.load_trained(workdir)
    flow = ms_lib.flow_config(config)
    parts = {g: models.build(kind, getattr(model.cfg, g)) for g, kind in ms_lib.SANA_GROUPS.items()}
    return sana_decoder.from_parts(
        **parts, **{f"{g}_params": params[g] for g in parts},
        scheduler=schedulers.FlowMatchEuler(num_train_timesteps=flow.num_train_timesteps, shift=flow.shift))


def _sana_reconstructor(decoder_dir: str, dtype: str, settings: dict):
    from blip3o_jax.pipelines import sana_decoder

    key = ("i2i-sana", os.path.abspath(decoder_dir), dtype)
    if key not in _LOADED:
        _LOADED[key] = (_load_sana_workdir(decoder_dir) if _is_sana_workdir(decoder_dir) else
                        sana_decoder.load_sana_decoder(decoder_dir, dtype=None if dtype == "float32" else dtype))
    decoder = _LOADED[key]

    def reconstruct(images, indices):
        return sana_decoder.reconstruct(decoder, images, steps=settings["decoder_steps"],
                                        guidance_scale=settings["decoder_guidance"], seed=settings["seed"],
                                        indices=indices)

    return reconstruct


def run_i2i(fv) -> dict:
    from blip3o_jax import preprocessing

    if not fv.images:
        raise cli.UserError("--images GLOB is required")
    if not fv.out:
        raise cli.UserError("--out DIR is required")
    items = fmts.read_i2i_items(fv.images)
    if fv.limit is not None:
        items = items[: fv.limit]
    if not fv.model or not os.path.isdir(fv.model):
        raise cli.UserError(f"--model {fv.model}: no such directory")
    if fv.decoder == "sana":
        kind, decoder_dir = "sana", fv.model
    elif fv.decoder == "sdxl":
        kind, decoder_dir = "sdxl", _decoder_dir(fv.model, "sdxl", model_layout(fv.model))
    else:
        kind, decoder_dir = ("sana" if _is_sana_dir(fv.decoder) else "sdxl"), _decoder_dir(fv.model, fv.decoder, "")
    steps = fv.decoder_steps or (50 if kind == "sdxl" else 30)
    if kind == "sana" and _is_sana_workdir(decoder_dir):  # a configs/siglip2_sana.py training run
        size = int(_read_json(os.path.join(decoder_dir, "config.json"))["model"]["image_size"])
        resolution = None
    elif kind == "sana":
        if not _is_sana_dir(decoder_dir):
            raise cli.UserError(f"{decoder_dir}: not a SigLIP2 -> SANA decoder folder (encoder/, connector/, "
                                "transformer/, vae/, scheduler/) or training workdir")
        size = int(_read_json(os.path.join(decoder_dir, "encoder", "config.json")).get("image_size", 512))
        resolution = None  # the SANA transformer's sample_size x the DC-AE's factor
    else:
        factor = vae_factor(decoder_dir)
        resolution = fv.resolution or decoder_native_resolution(decoder_dir)
        if resolution <= 0 or resolution % factor:
            raise cli.UserError(f"--resolution {resolution} is not a positive multiple of {factor}, the decoder's "
                                "VAE downsampling factor")
        size = release_eva_config(_read_json(os.path.join(fv.model, "config.json"))).image_size
    settings = {"decoder": kind, "decoder_steps": steps, "decoder_guidance": float(fv.decoder_guidance),
                "resolution": resolution, "seed": fv.seed, "batch": fv.batch, "dtype": fv.dtype,
                "resize": fv.resize, "images": fv.images, "encoder_size": size}
    mine = _shares(items)
    todo, bad = [], []
    for it in mine:  # headers only: an unreadable file is known before anything is loaded or written
        if fs.exists(fs.join(fv.out, f"{it.key}.png")):
            continue
        try:
            preprocessing.open_image(it.image).close()
        except preprocessing.BadImageError as e:
            bad.append(fmts.Skipped(it.index, it.key, f"{it.image}: {e}"))
            continue
        todo.append(it)
    if not todo and bad:
        raise cli.UserError(f"no readable images: {bad[0].reason}")
    devices = local_devices(fv.devices, fv.mesh)
    reconstruct = (_sdxl_reconstructor(fv.model, decoder_dir, fv.dtype, devices, settings) if kind == "sdxl"
                   else _sana_reconstructor(decoder_dir, fv.dtype, settings))
    fs.makedirs(fv.out)
    fmts.clean_partials(fv.out)
    info = {"path": os.path.abspath(fv.model), "decoder": os.path.abspath(decoder_dir),
            "fingerprint": fingerprint(decoder_dir if kind == "sana" else fv.model)}
    record = {"command": "i2i", "settings": settings, "model": info, "devices": devices.count if kind == "sdxl"
              else 1, "items": len(items), "done_before": len(mine) - len(todo) - len(bad), "written": 0,
              "skipped": [s.as_dict() for s in bad], "complete": False}
    run_path = _run_json_path(fs.join(fv.out, "run.json"))
    fmts.write_json(run_path, record)
    global_batch = devices.round_batch(fv.batch) if kind == "sdxl" else fv.batch
    started, written = time.time(), 0
    bar = _progress(len(todo), fv.progress, "img")
    try:
        for start in range(0, len(todo), global_batch):
            chunk = []
            for it in todo[start:start + global_batch]:
                try:
                    with preprocessing.open_image(it.image) as img:
                        if kind == "sana":  # SiglipImageProcessor's bilinear resize (or resize + center crop)
                            arr = preprocessing.siglip_preprocess(img, size, mode=fv.resize, draft=False)
                        elif fv.resize == "squash":  # the eva-clip-reconstruct pipeline: Resize((448, 448))
                            arr = preprocessing.resize_square(img, size)
                        else:  # the training transform: Resize(448) + CenterCrop(448)
                            arr = preprocessing.eva_preprocess(img, size, draft=False)
                except (preprocessing.BadImageError, OSError) as e:
                    bad.append(fmts.Skipped(it.index, it.key, f"{it.image}: {e}"))
                    continue
                chunk.append((it, arr))
            if not chunk:
                continue
            rows = chunk + [chunk[-1]] * (global_batch - len(chunk))  # pad rows: copies, discarded
            out = reconstruct(np.stack([a for _, a in rows]), [it.index for it, _ in rows])
            for (it, _), image in zip(chunk, np.asarray(out)):
                fmts.write_png(fs.join(fv.out, f"{it.key}.png"), image)
                written += 1
            bar.update(len(chunk))
    finally:
        bar.close()
    elapsed = time.time() - started
    record.update(written=written, complete=True, elapsed_s=round(elapsed, 3), skipped=[s.as_dict() for s in bad],
                  images_per_s=round(written / elapsed, 4) if elapsed > 0 and written else None)
    fmts.write_json(run_path, record)
    return record


# ----------------------------------------------------------------------------------------------------------------
# entry points


def execute(argv: Sequence[str], fv) -> dict:
    """Runs the subcommand named by argv[1] with parsed flag values `fv`; returns what run.json records."""
    from blip3o_jax import sharding

    commands = list(argv[1:])
    if len(commands) != 1 or commands[0] not in COMMANDS:
        raise cli.UserError(f"expected one subcommand ({', '.join(COMMANDS)}), got {commands or 'none'}")
    if fv.batch < 1:
        raise cli.UserError(f"--batch must be >= 1, got {fv.batch}")
    sharding.initialize_distributed()
    try:
        return {"t2i": run_t2i, "i2t": run_i2t, "i2i": run_i2i}[commands[0]](fv)
    except fmts.FormatError as e:
        raise cli.UserError(str(e)) from None


def run(args: Sequence[str]) -> dict:
    """In-process entry point (tests, notebooks): `run(["t2i", "--model", ...])`; raises cli.UserError."""
    from absl import flags

    fv = flags.FlagValues()
    define_flags(fv)
    try:
        rest = fv(["blip3o-sample", *args])
    except flags.Error as e:
        raise cli.UserError(str(e)) from None
    return execute(rest, fv)


def main():
    from absl import flags, logging

    define_flags(flags.FLAGS)

    def _main(argv):
        logging.set_verbosity(logging.WARNING)
        execute(argv, flags.FLAGS)

    cli.run(_main)


if __name__ == "__main__":
    main()
