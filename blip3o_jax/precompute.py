"""Runs the frozen target encoder (EVA-CLIP-E/14+ for the release) once over the image shards of a training config
and writes the target grids into companion shards, so training reads them instead of decoding images and
re-running a 4.35B-parameter encoder on every epoch (~9.4 TFLOPs per image).

    blip3o-precompute --config configs/blip3o_8b.py:/data/shards/*.tar \
        --config.init_from=gen_encoder=/ckpt/eva_clip_e14_plus [--batch 256] [--dtype bfloat16]

(`blip3o-precompute` is the console script of this module; `python -m blip3o_jax.precompute` and
`python tools/precompute_targets.py` run the same thing.)

For each text-to-image tar shard `DIR/name.tar` of `config.data.datasets` it writes `DIR/name.targets.tar`
(`<key>.target.npy` per sample, same keys and order; a dataset's `targets_dir` puts them elsewhere) and then
`DIR/name.targets.json` (fingerprint of the encoder/config, shape, dtype, counts, keys whose image was unusable);
see blip3o_jax/data/targets.py. Afterwards the same training command uses them automatically
(`data.precomputed_targets="auto"`): no image decode, no encoder in the train step.

- Same computation as the train step: the model's own `Blip3o.targets` (normalisation, encoder, 4x4 pooling) on
  the pipeline's own preprocessing (resize + centre crop, JPEG draft mode as configured), with the encoder
  weights the run would use (`init_from`, else the random init of `seed`). No train step is built: the model's
  params and shardings come from `training/model_setup.py`.
- Any mesh: the encoder runs on this host's devices with `--mesh` (default: the config's mesh over the local
  devices, or all local devices on fsdp when it does not fit them; params sharded by their logical axes, the
  batch over data+fsdp).
- Per-host sharded: on a multi-host slice every host runs the command; host p takes shards p, p+P, ...
- Resumable: a shard whose `.targets.json` carries the current fingerprint is skipped; files are written under
  temporary names and renamed, so an interrupted shard is simply redone.
- A dataset's `targets_dir` may be a bucket (`gs://BUCKET/targets`): the companions and their `.targets.json` go
  there through blip3o_jax/paths.py (uploaded whole, the metadata last, so the resume rule above holds); the image
  shards are read from local disk or a gcsfuse mount, and so are the companions at training time.

Prints one line per shard and, last, one JSON object (shards done/skipped, samples, images/s, encoder FLOPs).
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import time

from absl import flags


def _define_flags():
    """CLI flags, defined only when run as a program (importing this module must not touch absl's flag registry)."""
    flags.DEFINE_integer("batch", 64, "Images per encoder call (rounded up to a multiple of the local devices).")
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Storage dtype of the target grids.")
    flags.DEFINE_string("mesh", None, "Mesh over this host's devices, e.g. 'data=-1' or 'fsdp=-1' (default: the "
                        "config's).")
    flags.DEFINE_integer("threads", 8, "Image decoding threads.")


def _log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# the encoder


def _encoder_init_spec(config, gen_kind: str) -> str:
    """The `init_from` entries that load the generation encoder (explicit `gen_encoder=PATH`, or a checkpoint
    whose kind is the encoder's or a whole BLIP3-o)."""
    from blip3o_jax import pretrained
    from blip3o_jax.training import defaults

    keep = []
    for item in [s.strip() for s in str(defaults.option(config, "init_from") or "").split(",") if s.strip()]:
        group, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        if group == "gen_encoder":
            keep.append(item)
        elif not group and os.path.isdir(path) and pretrained.resolve(path)[0] in (gen_kind, "blip3o"):
            keep.append(item)
    return ",".join(keep)


_ENCODERS: dict = {}  # (model/weights config, mesh) -> encoder_setup result: one compile per process


def encoder_setup(config, mesh):
    """(targets function (images uint8 (B,S,S,3) -> grids (B,g,g,C) fp32), model setup, weights description)."""
    key = (json.dumps({k: config.get(k) for k in ("model", "train", "seed", "init_from")}, sort_keys=True,
                      default=lambda v: v.to_dict() if hasattr(v, "to_dict") else str(v)),
           tuple(mesh.devices.flat), tuple(mesh.shape.items()))
    if key not in _ENCODERS:
        _ENCODERS[key] = _encoder_setup(config, mesh)
    return _ENCODERS[key]


def _encoder_params(config, ms) -> tuple[dict, str]:
    """(the generation encoder's params, placed on the mesh; where they come from)."""
    import jax

    from blip3o_jax import train as train_lib

    spec = _encoder_init_spec(config, ms.model_cfg.gen_encoder_kind)
    if not spec:  # the run's own random init (tests, toy runs): the same params the trainer would start from
        _, frozen = ms.init(jax.random.key(int(config.seed)))
        return frozen["gen_encoder"], f"random init, seed {int(config.seed)}"
    loaded = train_lib.load_init_from(spec, ms)
    if "gen_encoder" not in loaded:
        raise ValueError(f"config.init_from={config.init_from!r} does not load the generation encoder")
    enc = train_lib.cast_like(loaded["gen_encoder"], ms.abstract_frozen["gen_encoder"])
    return jax.device_put(enc, ms.frozen_shardings["gen_encoder"]), spec


def _encoder_setup(config, mesh):
    import jax
    import jax.numpy as jnp

    from blip3o_jax.models import blip3o as blip3o_lib
    from blip3o_jax.training import model_setup as ms_lib

    ms = ms_lib.model_setup(config, mesh)
    if ms.model_cfg.target == "pixels":
        raise ValueError("model.target='pixels' is the image itself: nothing to precompute")
    if ms.model_cfg.target not in blip3o_lib.ENCODER_TARGETS:
        raise ValueError(f"model.target={ms.model_cfg.target!r}: nothing to precompute (expected an encoder target)")
    enc, weights = _encoder_params(config, ms)
    queries = ms.abstract_trainable["latent_queries"]  # declared by the module's setup; unused here
    params = {"gen_encoder": enc, "latent_queries": jnp.zeros(queries.shape, queries.dtype)}
    targets = jax.jit(ms.targets)
    return (lambda images: targets(params, {"gen_image": images})), ms, weights


# ---------------------------------------------------------------------------------------------------------------
# one shard


def _preprocess(source, i: int, tcfg):
    """(key, uint8 image or None, reason) of sample i, exactly as the data pipeline prepares `gen_image`."""
    from blip3o_jax import preprocessing as pp
    from blip3o_jax.data import sources, transforms

    try:
        raw = source[i]
    except sources.BadSampleError as e:
        return getattr(e, "key", str(i)), None, e.reason
    try:
        img = transforms.open_checked_image(raw, tcfg, source.name)
        return raw.key, pp.eva_preprocess(img, tcfg.gen_image_size, draft=tcfg.jpeg_draft), ""
    except sources.BadSampleError as e:
        return raw.key, None, e.reason
    except pp.BadImageError as e:
        return raw.key, None, f"undecodable_image: {e}"


def _image_batches(decoded, writer, batch_size: int, side: int):
    """(keys, uint8 images (batch_size, S, S, 3), real rows) from decoded samples in order; an unusable image is
    recorded as skipped in `writer`; the last partial batch is padded with zeros to the compiled shape."""
    import numpy as np

    keys, images = [], []
    for key, image, reason in decoded:
        if image is None:
            writer.skip(key, reason)
            continue
        keys.append(key)
        images.append(image)
        if len(images) == batch_size:
            yield keys, np.stack(images), batch_size
            keys, images = [], []
    if images:
        real = len(images)
        images += [np.zeros((side, side, 3), np.uint8)] * (batch_size - real)
        yield keys, np.stack(images), real


def _encode_into(writer, source, encode, pool, tcfg, batch_size: int, image_sharding) -> None:
    """Encodes every usable image of `source` into `writer`. The host decodes and writes batch k while the device
    encodes batch k + 1 (the grids are read one batch late)."""
    import jax
    import numpy as np

    def flush(keys, grids):
        grids = np.asarray(jax.device_get(grids))
        for k, key in enumerate(keys):
            writer.add(key, grids[k])

    pending = None  # (keys, device grids) of the previous batch
    decoded = pool.map(lambda i: _preprocess(source, i, tcfg), range(len(source)))
    for keys, images, real in _image_batches(decoded, writer, batch_size, tcfg.gen_image_size):
        batch = jax.device_put(images, image_sharding)
        if pending is not None:
            flush(*pending)
        grids = encode(batch)
        pending = (keys, grids if real == batch_size else grids[:real])
    if pending is not None:
        flush(*pending)


def _write_shard(spec: dict, shard: str, fp: dict, run: dict, log) -> dict:
    """Writes the companion shard of one tar shard; returns its metadata."""
    from blip3o_jax.data import sources, targets

    d = run["config"].data
    t0 = time.perf_counter()
    source = sources.TarShardSource([shard], name=spec.get("name", os.path.basename(shard)),
                                    index_cache_dir=spec.get("index_cache_dir", d.get("index_cache_dir")))
    writer = targets.CompanionWriter(shard, fp, shape=run["shape"], dtype=run["dtype"],
                                     targets_dir=spec.get("targets_dir"), num_samples=len(source))
    try:
        _encode_into(writer, source, run["encode"], run["pool"], run["tcfg"], run["batch_size"],
                     run["image_sharding"])
        meta = writer.commit()
    except BaseException:
        writer.abort()
        raise
    dt = time.perf_counter() - t0
    log(f"  {os.path.basename(shard)}: {meta['num_targets']} targets, {len(meta['missing'])} unusable "
        f"images, {dt:.1f} s ({meta['num_targets'] / max(dt, 1e-9):.1f} images/s)")
    return meta


# ---------------------------------------------------------------------------------------------------------------
# every shard of this process


def _local_mesh(config, mesh_sizes: dict | None):
    """`mesh_sizes` over this host's devices; by default the config's mesh, or fsdp over all of them when the
    config's mesh does not fit this host."""
    import jax

    from blip3o_jax import sharding as shd

    local = jax.local_devices()
    if mesh_sizes:
        return shd.make_mesh(mesh_sizes, devices=local)
    try:
        return shd.make_mesh(dict(config.mesh), devices=local)
    except ValueError:
        return shd.make_mesh({"fsdp": -1}, devices=local)


def _encoder_run(config, *, batch_size: int, dtype: str, mesh_sizes: dict | None, pool, log) -> dict:
    """What every shard's encoding needs: the compiled encoder, its mesh, batch and preprocessing settings."""
    import jax

    from blip3o_jax import sharding as shd
    from blip3o_jax.data import transforms
    from blip3o_jax.training import metrics as metrics_lib

    mesh = _local_mesh(config, mesh_sizes)
    encode, ms, weights = encoder_setup(config, mesh)
    mcfg = ms.model_cfg
    n_dev = len(jax.local_devices())
    batch_size = -(-int(batch_size) // n_dev) * n_dev
    tcfg = transforms.TransformConfig.from_data_config(config.data, gen_image_size=int(mcfg.image_size),
                                                       n_query=int(mcfg.n_query))
    flops_per_image = metrics_lib.train_flops_per_sample(mcfg, seq_len=mcfg.n_query + 1, trainable=(),
                                                         text_loss=False).get("gen_encoder", 0.0)
    log(f"encoder {mcfg.gen_encoder_kind} ({weights}) on mesh {dict(mesh.shape)}; {mcfg.target_shape} {dtype} "
        f"targets; batch {batch_size}; {flops_per_image / 1e12:.3g} TFLOPs/image")
    return dict(config=config, encode=encode, pool=pool, tcfg=tcfg, batch_size=batch_size, dtype=dtype,
                shape=mcfg.target_shape, image_sharding=shd.batch_sharding(mesh, 4), flops_per_image=flops_per_image)


def _assigned_shards(config, fp_id: str, process_index: int, process_count: int):
    """(all text-to-image tar shards as (dataset spec, shard), this process's, this process's still to do)."""
    from blip3o_jax.data import targets

    work = [(spec, shard) for spec, shards in targets._t2i_shards(config) for shard in shards]
    if not work:
        raise ValueError("config.data.datasets has no text-to-image tar shards")
    mine = [w for k, w in enumerate(work) if k % process_count == process_index]
    todo = [(spec, shard) for spec, shard in mine if not targets.is_complete(shard, fp_id, spec.get("targets_dir"))]
    return work, mine, todo


def precompute(config, *, batch_size: int = 64, dtype: str = "bfloat16", mesh_sizes: dict | None = None,
               threads: int = 8, process_index: int | None = None, process_count: int | None = None,
               log=_log) -> dict:
    """Writes the companion target shards of every text-to-image tar shard of `config` assigned to this process.
    Returns a summary dict."""
    import jax

    from blip3o_jax.data import targets

    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    fp = targets.fingerprint(config)
    fp_id = targets.fingerprint_id(fp)
    work, mine, todo = _assigned_shards(config, fp_id, process_index, process_count)
    summary = {"fingerprint_id": fp_id, "shards_total": len(work), "shards_this_process": len(mine),
               "shards_skipped": len(mine) - len(todo), "shards_done": 0, "samples": 0, "missing": 0,
               "dtype": dtype, "process_index": process_index, "process_count": process_count}
    log(f"precompute_targets: {len(work)} shards, {len(mine)} for process {process_index}/{process_count}, "
        f"{len(mine) - len(todo)} already done (fingerprint {fp_id})")
    if not todo:
        return summary
    t_start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        run = _encoder_run(config, batch_size=batch_size, dtype=dtype, mesh_sizes=mesh_sizes, pool=pool, log=log)
        for spec, shard in todo:
            meta = _write_shard(spec, shard, fp, run, log)
            summary["shards_done"] += 1
            summary["samples"] += meta["num_targets"]
            summary["missing"] += len(meta["missing"])
    total = time.perf_counter() - t_start
    summary["seconds"] = total
    summary["images_per_s"] = summary["samples"] / max(total, 1e-9)
    summary["encoder_flops_per_image"] = run["flops_per_image"]
    summary["achieved_flops_per_s"] = run["flops_per_image"] * summary["images_per_s"]
    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("precompute_targets done")
    return summary


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _parse_mesh(spec: str) -> dict[str, int]:
    from blip3o_jax.cli import UserError

    sizes = {}
    for item in spec.split(","):
        k, _, v = item.partition("=")
        try:
            sizes[k.strip()] = int(v)
        except ValueError:
            raise UserError(f"--mesh: expected 'data=N,fsdp=N,tensor=N' (one may be -1), got {spec!r}") from None
    return sizes


def _main(argv):
    from blip3o_jax import benchmarking
    from blip3o_jax import sharding as shd
    from blip3o_jax.cli import UserError

    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}")
    F = flags.FLAGS
    if F.config is None:
        raise UserError("--config is required")
    shd.initialize_distributed()
    mesh_sizes = _parse_mesh(F.mesh) if F.mesh else None
    try:
        summary = precompute(F.config, batch_size=F.batch, dtype=F.dtype, mesh_sizes=mesh_sizes, threads=F.threads)
    except ValueError as e:
        raise UserError(str(e)) from None
    benchmarking.emit(summary)


def main():
    from blip3o_jax import cli

    _define_flags()
    cli.define_config_flag()
    cli.run(_main, module=__name__, doc=__doc__)


if __name__ == "__main__":
    main()
