"""Meshes and logical sharding, declared once.

Model code never names mesh axes. Parameters carry logical axis names through
`nn.with_logical_partitioning`, activations through `nn.with_logical_constraint`; the table
`LOGICAL_AXIS_RULES` maps each logical name to mesh axes (as in maxtext). The mesh has the axes
`data`, `fsdp`, `tensor` (sizes from the config, -1 fills the rest). A multi-slice DCN axis can be
added in front of them later without touching model code.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # parameters
    ("embed", "fsdp"),  # model width: FSDP shards every large matrix along it
    ("vocab", "tensor"),
    ("heads", "tensor"),  # flattened heads * head_dim of a projection
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),  # the nn.scan axis of stacked layers
    ("norm", None),
    ("cond", None),  # conditioning width (e.g. the LLM width entering the DiT)
    ("patch", None),  # flattened patch inputs of vision towers
    ("time", None),  # timestep-embedding width
)


def parse_mesh_shape(axis_sizes: dict[str, int] | Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Resolves sizes for (data, fsdp, tensor); one size may be -1 and takes what is left."""
    if isinstance(axis_sizes, dict) or hasattr(axis_sizes, "get"):
        unknown = sorted(set(axis_sizes) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"unknown mesh axis {unknown[0]!r}; the valid axes are {', '.join(MESH_AXES)}")
        sizes = [int(axis_sizes.get(a, 1)) for a in MESH_AXES]
    else:
        sizes = [int(s) for s in axis_sizes]
    if len(sizes) != len(MESH_AXES):
        raise ValueError(f"mesh needs {len(MESH_AXES)} sizes for {MESH_AXES}, got {sizes}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices cannot be split into mesh {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but {num_devices} are available"
        )
    return tuple(sizes)


def make_mesh(axis_sizes: dict[str, int] | Sequence[int] | None = None, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh with auto (GSPMD) axis types. Default: all devices on `fsdp`."""
    devices = list(jax.devices() if devices is None else devices)
    shape = parse_mesh_shape(axis_sizes if axis_sizes is not None else {"fsdp": -1}, len(devices))
    from jax.experimental import mesh_utils

    try:  # the physical topology's order (TPU torus): collectives along each axis stay on neighbouring chips
        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError) as e:  # a shape the topology cannot tile
        logging.getLogger(__name__).warning("mesh %s does not map onto the device topology (%s); using the devices "
                                            "in their listed order", shape, e)
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical_axes: Sequence[str | None] | None, rules=LOGICAL_AXIS_RULES) -> P:
    if logical_axes is None:
        return P()
    # a name repeated within one array (e.g. a square ("time", "time") kernel) shards only its first dimension
    seen, names = set(), []
    for name in logical_axes:
        names.append(None if name is not None and name in seen else name)
        seen.add(name)
    return nn.logical_to_mesh_axes(tuple(names), rules)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops mesh axes from dims they do not divide (tiny configs, odd head counts): replicate instead of fail."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fitted.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        keep = []
        size = 1
        for a in axes_t:
            if dim % (size * mesh.shape[a]) == 0:
                keep.append(a)
                size *= mesh.shape[a]
        fitted.append(None if not keep else (keep[0] if len(keep) == 1 else tuple(keep)))
    return P(*fitted)


def logical_sharding(logical_axes, shape, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
    return NamedSharding(mesh, _fit_spec(logical_to_spec(logical_axes, rules), shape, mesh))


def params_shardings(abstract_params, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Shardings for a (possibly boxed) param tree from `jax.eval_shape(module.init, ...)`.

    Leaves boxed with `nn.LogicallyPartitioned` use their names; plain leaves are replicated.
    Returns an unboxed tree of NamedSharding matching `nn.unbox(abstract_params)`.
    """

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            value = leaf.value
            return logical_sharding(leaf.names, value.shape, mesh, rules)
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension over data+fsdp, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def shard_params(params, shardings):
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)


def axis_rules(rules=LOGICAL_AXIS_RULES):
    """Context manager that activates the logical rules (for `nn.with_logical_constraint`)."""
    return nn.logical_axis_rules(rules)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    heartbeat_timeout_seconds: int | None = None,
    initialization_timeout: int | None = None,
) -> None:
    """Starts JAX's multi-controller runtime from the environment.

    - explicit `coordinator_address` (e.g. "127.0.0.1:12345" for CPU loopback) with process count and id;
    - `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` environment variables;
    - otherwise `jax.distributed.initialize()` auto-detects TPU pods and SLURM/Open MPI GPU clusters.
    A single process with nothing configured is left alone.

    Failure detection: when a process dies, the coordination service notices its missing heartbeats after
    `heartbeat_timeout_seconds` (env `BLIP3O_HEARTBEAT_TIMEOUT_S`; JAX's default 100 s) and terminates every
    other process with "Terminating process because the JAX distributed service detected fatal errors ...
    another task died", instead of leaving them blocked in a collective. `initialization_timeout` (env
    `BLIP3O_INIT_TIMEOUT_S`; default 300 s) bounds the wait for all processes to connect.
    """
    timeouts = {}
    heartbeat = heartbeat_timeout_seconds or os.environ.get("BLIP3O_HEARTBEAT_TIMEOUT_S")
    if heartbeat:
        timeouts["heartbeat_timeout_seconds"] = int(heartbeat)
    init_timeout = initialization_timeout or os.environ.get("BLIP3O_INIT_TIMEOUT_S")
    if init_timeout:
        timeouts["initialization_timeout"] = int(init_timeout)
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator_address:
        # CPU collectives across processes (loopback tests, CPU clusters); only the CPU client reads this. Not
        # conditional on jax.default_backend(): asking for the backend would initialise it, and
        # jax.distributed.initialize must come before that.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids=local_device_ids,
                                   **timeouts)
    elif any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")) and (
        os.environ.get("BLIP3O_NO_DISTRIBUTED") != "1"
    ):
        jax.distributed.initialize(**timeouts)
    else:
        return
    logging.info("JAX distributed: process %d of %d", jax.process_index(), jax.process_count())
