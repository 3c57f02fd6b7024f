"""Runs the frozen target encoder (EVA-CLIP-E/14+ for the release) once over the image shards of a training config
and writes the target grids into companion shards, so training reads them instead of decoding images and
re-running a 4.35B-parameter encoder on every epoch (~9.4 TFLOPs per image, reference §5.2).

    python tools/precompute_targets.py --config configs/blip3o_8b.py:/data/shards/*.tar \
        --config.init_from=gen_encoder=/ckpt/eva_clip_e14_plus [--batch 256] [--dtype bfloat16]

For each text-to-image tar shard `DIR/name.tar` of `config.data.datasets` it writes `DIR/name.targets.tar`
(`<key>.target.npy` per sample, same keys and order; a dataset's `targets_dir` puts them elsewhere) and then
`DIR/name.targets.json` (fingerprint of the encoder/config, shape, dtype, counts, keys whose image was unusable);
see blip3o_jax/data/targets.py. Afterwards the same training command uses them automatically
(`data.precomputed_targets="auto"`): no image decode, no encoder in the train step.

- Same computation as the train step: the model's own `Blip3o.targets` (normalisation, encoder, 4x4 pooling) on
  the pipeline's own preprocessing (resize + centre crop, JPEG draft mode as configured), with the encoder
  weights the run would use (`init_from`, else the random init of `seed`).
- Any mesh: the encoder runs on this host's devices with `--mesh` (default: the config's mesh over the local
  devices; params sharded by their logical axes, the batch over data+fsdp).
- Per-host sharded: on a multi-host slice every host runs the command; host p takes shards p, p+P, ...
- Resumable: a shard whose `.targets.json` carries the current fingerprint is skipped; files are written under
  temporary names and renamed, so an interrupted shard is simply redone.

Prints one line per shard and, last, one JSON object (shards done/skipped, samples, images/s, encoder FLOPs).
"""
from __future__ import annotations

import concurrent.futures
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402


def _define_flags():
    """CLI flags, defined only when run as a script (importing this module must not touch absl's flag registry)."""
    flags.DEFINE_integer("batch", 64, "Images per encoder call (rounded up to a multiple of the local devices).")
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Storage dtype of the target grids.")
    flags.DEFINE_string("mesh", None, "Mesh over this host's devices, e.g. 'data=-1' or 'fsdp=-1' (default: the "
                        "config's).")
    flags.DEFINE_integer("threads", 8, "Image decoding threads.")


def _log(msg: str) -> None:
    print(msg, flush=True)


def _encoder_init_spec(config, gen_kind: str) -> str:
    """The `init_from` entries that load the generation encoder (explicit `gen_encoder=PATH`, or a checkpoint
    whose kind is the encoder's or a whole BLIP3-o)."""
    from blip3o_jax import pretrained

    keep = []
    for item in [s.strip() for s in str(config.get("init_from", "") or "").split(",") if s.strip()]:
        group, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        if group == "gen_encoder":
            keep.append(item)
        elif not group and os.path.isdir(path) and pretrained.resolve(path)[0] in (gen_kind, "blip3o"):
            keep.append(item)
    return ",".join(keep)


_ENCODERS: dict = {}  # (model/weights config, mesh) -> encoder_setup result: one compile per process


def encoder_setup(config, mesh):
    """(targets function (images uint8 (B,S,S,3) -> grids (B,g,g,C) fp32), train setup, weights description)."""
    import json

    key = (json.dumps({k: config.get(k) for k in ("model", "train", "seed", "init_from")}, sort_keys=True,
                      default=lambda v: v.to_dict() if hasattr(v, "to_dict") else str(v)),
           tuple(mesh.devices.flat), tuple(mesh.shape.items()))
    if key not in _ENCODERS:
        _ENCODERS[key] = _encoder_setup(config, mesh)
    return _ENCODERS[key]


def _encoder_setup(config, mesh):
    import jax
    import jax.numpy as jnp

    from blip3o_jax import train as train_lib
    from blip3o_jax.training import step as step_lib

    setup = step_lib.make_train_step(config, mesh)
    mcfg = setup.model_cfg
    if mcfg.target not in ("eva_clip",) and mcfg.target != "pixels":
        raise ValueError(f"model.target={mcfg.target!r}: nothing to precompute (expected an encoder target)")
    if mcfg.target == "pixels":
        raise ValueError("model.target='pixels' is the image itself: nothing to precompute")
    spec = _encoder_init_spec(config, mcfg.gen_encoder_kind)
    if spec:
        loaded = train_lib.load_init_from(spec, setup)
        if "gen_encoder" not in loaded:
            raise ValueError(f"config.init_from={config.init_from!r} does not load the generation encoder")
        enc = train_lib._cast_like(loaded["gen_encoder"], setup.abstract_frozen["gen_encoder"])
        enc = jax.device_put(enc, setup.frozen_shardings["gen_encoder"])
        weights = spec
    else:  # the run's own random init (tests, toy runs): the same params the trainer would start from
        _, frozen = setup.init(jax.random.key(int(config.seed)))
        enc = frozen["gen_encoder"]
        weights = f"random init, seed {int(config.seed)}"
    queries = setup.abstract_state.params["latent_queries"]  # declared by the module's setup; unused here
    dummy = jnp.zeros(queries.shape, queries.dtype)
    params = {"gen_encoder": enc, "latent_queries": dummy}
    return (lambda images: setup.targets_fn(params, {"gen_image": images})), setup, weights


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


def precompute(config, *, batch_size: int = 64, dtype: str = "bfloat16", mesh_sizes: dict | None = None,
               threads: int = 8, process_index: int | None = None, process_count: int | None = None,
               log=_log) -> dict:
    """Writes the companion target shards of every text-to-image tar shard of `config` assigned to this process.
    Returns a summary dict."""
    import jax
    import numpy as np

    from blip3o_jax import sharding as shd
    from blip3o_jax.data import sources, targets, transforms
    from blip3o_jax.training import metrics as metrics_lib

    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    fp = targets.fingerprint(config)
    fp_id = targets.fingerprint_id(fp)
    work = [(spec, shard) for spec, shards in targets._t2i_shards(config) for shard in shards]
    if not work:
        raise ValueError("config.data.datasets has no text-to-image tar shards")
    mine = [w for k, w in enumerate(work) if k % process_count == process_index]
    todo = [(spec, shard) for spec, shard in mine if not targets.is_complete(shard, fp_id, spec.get("targets_dir"))]
    summary = {"fingerprint_id": fp_id, "shards_total": len(work), "shards_this_process": len(mine),
               "shards_skipped": len(mine) - len(todo), "shards_done": 0, "samples": 0, "missing": 0,
               "dtype": dtype, "process_index": process_index, "process_count": process_count}
    log(f"precompute_targets: {len(work)} shards, {len(mine)} for process {process_index}/{process_count}, "
        f"{len(mine) - len(todo)} already done (fingerprint {fp_id})")
    if not todo:
        return summary

    local = jax.local_devices()
    sizes = mesh_sizes or dict(config.mesh)
    try:
        mesh = shd.make_mesh(sizes, devices=local)
    except ValueError:
        mesh = shd.make_mesh({"fsdp": -1}, devices=local)
    encode, setup, weights = encoder_setup(config, mesh)
    mcfg = setup.model_cfg
    shape = mcfg.target_shape
    n_dev = len(local)
    batch_size = -(-int(batch_size) // n_dev) * n_dev
    image_sharding = shd.batch_sharding(mesh, 4)
    d = config.data
    tcfg = transforms.TransformConfig(gen_image_size=int(mcfg.image_size), n_query=int(mcfg.n_query),
                                      seq_buckets=tuple(int(n) for n in d.seq_buckets),
                                      jpeg_draft=bool(d.get("jpeg_draft", True)),
                                      min_image_size=int(d.get("min_image_size", 16)),
                                      max_aspect_ratio=float(d.get("max_aspect_ratio", 20.0)))
    S = int(mcfg.image_size)
    flops_per_image = metrics_lib.train_flops_per_sample(mcfg, seq_len=mcfg.n_query + 1, trainable=(),
                                                         text_loss=False).get("gen_encoder", 0.0)
    log(f"encoder {mcfg.gen_encoder_kind} ({weights}) on mesh {dict(mesh.shape)}; {shape} {dtype} targets; "
        f"batch {batch_size}; {flops_per_image / 1e12:.3g} TFLOPs/image")

    t_start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        for spec, shard in todo:
            t0 = time.perf_counter()
            source = sources.TarShardSource([shard], name=spec.get("name", os.path.basename(shard)),
                                            index_cache_dir=spec.get("index_cache_dir", d.get("index_cache_dir")))
            writer = targets.CompanionWriter(shard, fp, shape=shape, dtype=dtype, targets_dir=spec.get("targets_dir"),
                                             num_samples=len(source))
            try:
                pending = None  # (keys, device grids) of the previous batch: host work overlaps the device

                def flush(item):
                    keys, grids = item
                    grids = np.asarray(jax.device_get(grids))
                    for k, key in enumerate(keys):
                        writer.add(key, grids[k])

                decoded = pool.map(lambda i: _preprocess(source, i, tcfg), range(len(source)))
                keys, images = [], []
                for key, image, reason in decoded:
                    if image is None:
                        writer.skip(key, reason)
                        continue
                    keys.append(key)
                    images.append(image)
                    if len(images) == batch_size:
                        batch = jax.device_put(np.stack(images), image_sharding)
                        if pending is not None:
                            flush(pending)
                        pending = (keys, encode(batch))
                        keys, images = [], []
                if images:  # last partial batch: pad to the compiled shape
                    real = len(images)
                    images += [np.zeros((S, S, 3), np.uint8)] * (batch_size - real)
                    batch = jax.device_put(np.stack(images), image_sharding)
                    if pending is not None:
                        flush(pending)
                    pending = (keys, encode(batch)[:real])
                if pending is not None:
                    flush(pending)
                meta = writer.commit()
            except BaseException:
                writer.abort()
                raise
            dt = time.perf_counter() - t0
            summary["shards_done"] += 1
            summary["samples"] += meta["num_targets"]
            summary["missing"] += len(meta["missing"])
            log(f"  {os.path.basename(shard)}: {meta['num_targets']} targets, {len(meta['missing'])} unusable "
                f"images, {dt:.1f} s ({meta['num_targets'] / max(dt, 1e-9):.1f} images/s)")
    total = time.perf_counter() - t_start
    summary["seconds"] = total
    summary["images_per_s"] = summary["samples"] / max(total, 1e-9)
    summary["encoder_flops_per_image"] = flops_per_image
    summary["achieved_flops_per_s"] = flops_per_image * summary["images_per_s"]
    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("precompute_targets done")
    return summary


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
    mesh_sizes = None
    if F.mesh:
        mesh_sizes = {}
        for item in F.mesh.split(","):
            k, _, v = item.partition("=")
            mesh_sizes[k.strip()] = int(v)
    try:
        summary = precompute(F.config, batch_size=F.batch, dtype=F.dtype, mesh_sizes=mesh_sizes, threads=F.threads)
    except ValueError as e:
        raise UserError(str(e)) from None
    benchmarking.emit(summary)


def main():
    from blip3o_jax import cli

    _define_flags()
    cli.define_config_flag()
    cli.run(_main)


if __name__ == "__main__":
    main()
