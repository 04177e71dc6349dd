"""The device mesh and the one table that maps logical axis names to mesh axes.

Every weight and every constrained activation in the models carries logical names
(`embed`, `mlp`, `heads`, ...). Nothing outside this module knows which mesh axis a
name lands on, so changing a parallelism strategy is an edit of `LOGICAL_AXIS_RULES`.
"""

import contextlib
import logging
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cxrllava_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP shards the model dimension of every weight; tensor parallelism splits heads and the MLP.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("layers", None),
    ("patch_h", None),
    ("patch_w", None),
    ("channels", None),
    ("classes", None),
    ("clip", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; -1 in one axis (`data` by default) takes the devices the others leave.
    A shape the devices cannot fill is a ConfigError naming `config.mesh` and the device count."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    asked = f"config.mesh {dict(zip(MESH_AXES, shape))}"
    if shape.count(-1) > 1 or any(not isinstance(n, int) or (n < 1 and n != -1) for n in shape):
        raise ConfigError(f"{asked}: each axis is a whole number >= 1, and at most one is -1 (the devices the others "
                          "leave)")
    if -1 in shape:
        rest = int(np.prod([n for n in shape if n != -1]))
        if len(devices) % rest:
            raise ConfigError(f"{asked}: {len(devices)} devices do not divide into it")
        shape[shape.index(-1)] = len(devices) // rest
    if int(np.prod(shape)) != len(devices):
        raise ConfigError(f"{asked} needs {int(np.prod(shape))} devices; this process sees {len(devices)} "
                          f"({devices[0].platform})")
    shape = tuple(shape)
    try:  # JAX's layout follows the chips' physical links (TPU tori); splitting a physical axis beats losing them
        device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (AssertionError, NotImplementedError, ValueError) as e:
        # Its documented refusals: devices that are no contiguous cuboid, megacore chips, shapes with no mapping.
        # The mesh still works in device order; collectives may be slower, so say so.
        logging.warning("%s: no topology-aware layout for these %d %s devices (%s); using device order, which can "
                        "make collectives slower", asked, len(devices), devices[0].platform, e)
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a tree of (boxed) logical-partitioned values, e.g. from `jax.eval_shape(init)`."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """The context to trace and run sharded model code in: the mesh and the logical rules.

    It must be `jax.set_mesh`: the models' activation constraints (`nn.with_logical_constraint`) look
    for the mesh there and silently do nothing under a bare `with mesh:`.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def create_sharded(init_fn: Callable[..., Any], mesh: Mesh, *args, rules=LOGICAL_AXIS_RULES) -> tuple[Any, Any]:
    """Runs `init_fn(*args)` with every output already placed on its shard: no full copy on one device.

    Returns (unboxed variables, their shardings).
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_shardings(abstract, mesh, rules)
    with activate(mesh, rules):
        boxed = jax.jit(init_fn, out_shardings=shardings)(*args)
    return nn.meta.unbox(boxed), nn.meta.unbox(shardings)


def batch_sharding(mesh: Mesh, rank: int) -> NamedSharding:
    """Batch-major arrays split over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (rank - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
