"""Checkpoint writing details of training/checkpoint.py (the round trips of whole runs are in test_train*.py)."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from blip3o_jax.training import checkpoint


def test_small_replicated_arrays_are_written_whole_and_large_ones_split(tmp_path, monkeypatch):
    """Orbax's replica-parallel save slices every replicated array into one part per replica (a dispatched op each);
    under `REPLICA_PARALLEL_MIN_SLICE_BYTES` per part one replica writes the array whole. Both restore exactly."""
    devices = np.array(jax.devices()[:8])
    assert devices.size == 8  # conftest's simulated CPU devices
    replicated = NamedSharding(Mesh(devices, ("data",)), P())
    limit = checkpoint.REPLICA_PARALLEL_MIN_SLICE_BYTES
    small = jax.device_put(jnp.arange(1024, dtype=jnp.float32), replicated)  # 4 KiB, 512 B per replica
    large = jax.device_put(jnp.arange(8 * limit // 4, dtype=jnp.float32).reshape(64, -1), replicated)  # limit each
    state = {"small": small, "large": large}

    sliced = []
    original = jax.lax.slice_in_dim

    def counting_slice(operand, *args, **kwargs):
        sliced.append(operand.size)
        return original(operand, *args, **kwargs)

    monkeypatch.setattr(jax.lax, "slice_in_dim", counting_slice)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run"), save_every=1, async_save=False)
    ckpt.save(1, state)
    ckpt.wait()
    assert sliced == [large.size] * 8, sliced  # the large array split over the 8 replicas, the small one whole

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    restored = ckpt.restore(1, abstract)
    ckpt.close()
    for key in state:
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(state[key]))
