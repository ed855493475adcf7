"""Meshes and logical-axis shardings from the config (`config.mesh.shape`, `config.mesh.rules`)."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(shape_cfg, num_devices: int) -> tuple[int, ...]:
    """Sizes of MESH_AXES from {axis: size}; one size may be -1 (= the remaining devices)."""
    unknown = set(dict(shape_cfg)) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh.shape has unknown axes {sorted(unknown)}; axes are {MESH_AXES}")
    sizes = [int(shape_cfg.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh.shape {dict(shape_cfg)}: sizes must be positive, at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh.shape {dict(shape_cfg)} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh.shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                         f"devices, but {num_devices} are available")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg.shape, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def rules(mesh_cfg) -> tuple:
    return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in mesh_cfg.rules)


def param_shardings(boxed_abstract_params, mesh, axis_rules):
    """NamedShardings for (unboxed) params from their logical axis metadata."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_abstract_params), mesh,
                                       axis_rules)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state, params_sh, mesh):
    """Optimizer moments follow their params; scalars (counts) are replicated; the MaskedNodes
    of masked / multi-transform states stay as they are."""
    replicated = NamedSharding(mesh, P())
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    return optax.tree_map_params(tx, lambda p, s: p if masked(p) else s, abstract_opt_state,
                                 params_sh, transform_non_params=lambda _: replicated,
                                 is_leaf=masked)


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(batch: dict, mesh) -> dict:
    """Host-local numpy batch -> global jax.Arrays sharded over the batch axes (multi-host safe)."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        batch)


def check_batch_size(batch_size: int, mesh, what: str) -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n or batch_size % jax.process_count():
        raise ValueError(f"{what}={batch_size} must be divisible by the data x fsdp mesh size {n} "
                         f"and by the number of processes {jax.process_count()}")
