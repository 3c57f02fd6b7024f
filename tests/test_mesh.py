"""Mesh construction from config sizes, and the rule that non-divisible dims fall back to replication."""
import jax
import pytest
from jax.sharding import PartitionSpec as P

from blip3o_jax import sharding


def test_parse_fills_minus_one():
    assert sharding.parse_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    assert sharding.parse_mesh_shape({"fsdp": -1}, 8) == (1, 8, 1)
    assert sharding.parse_mesh_shape([1, 1, -1], 4) == (1, 1, 4)


@pytest.mark.parametrize(
    "sizes,msg",
    [
        ({"data": -1, "fsdp": -1}, "at most one"),
        ({"data": 3, "fsdp": -1}, "cannot be split"),
        ({"data": 2, "fsdp": 2, "tensor": 1}, "has 4 devices but 8"),
        ({"data": 0}, "positive"),
    ],
)
def test_parse_errors(sizes, msg):
    with pytest.raises(ValueError, match=msg):
        sharding.parse_mesh_shape(sizes, 8)


def test_make_mesh_axes_and_fit():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert mesh.axis_names == sharding.MESH_AXES
    assert mesh.devices.size == len(jax.devices()) == 8
    # "embed" -> fsdp, "mlp" -> tensor; 6 is not divisible by tensor=2? it is; 3 is not -> replicated
    s = sharding.logical_sharding(("embed", "mlp"), (4, 6), mesh)
    assert s.spec == P("fsdp", "tensor")
    s = sharding.logical_sharding(("embed", "mlp"), (3, 6), mesh)
    assert s.spec == P(None, "tensor")
    s = sharding.logical_sharding(("activation_batch", None), (8, 5), mesh)
    assert s.spec == P(("data", "fsdp"), None)
    s = sharding.logical_sharding(("activation_batch", None), (2, 5), mesh)
    assert s.spec == P("data", None)
