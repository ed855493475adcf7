"""Meshes and logical-axis shardings from the config (`config.mesh.shape`, `config.mesh.rules`).

Mesh axes MESH_AXES = ('data', 'fsdp', 'context', 'tensor'): the batch is split over data x fsdp,
parameters and optimizer moments ZeRO-3 style over fsdp (`embed`) and by heads / mlp over tensor,
the DiT's token axis (`act_length`) over context. A parameter dimension that its mesh axes do not
divide stays unsharded (fit_spec), so any mesh shape places every parameter.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")
# The logical axis names params and activations carry (mesh.rules maps them; Flax leaves a name
# without a rule unsharded, so a misspelt rule would silently replicate what it names).
LOGICAL_AXES = ("act_batch", "act_frames", "act_length", "act_embed", "act_heads", "layers",
                "layer_groups", "embed", "mlp", "heads", "head_dim", "joints", "codebook",
                "conv_in", "conv_out")


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


def parse_mesh(text: str) -> dict[str, int]:
    """"fsdp=16,tensor=4" -> {'data': 1, 'fsdp': 16, 'context': 1, 'tensor': 4} (axes not named
    are 1; one size may be -1). ValueError with one line for anything else."""
    sizes, named = dict.fromkeys(MESH_AXES, 1), set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq or name.strip() not in MESH_AXES:
            raise ValueError(f"--mesh {text!r}: {part!r} is not AXIS=SIZE with AXIS one of "
                             f"{', '.join(MESH_AXES)}")
        if name.strip() in named:
            raise ValueError(f"--mesh {text!r}: {name.strip()} is given twice")
        named.add(name.strip())
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--mesh {text!r}: size {value!r} of {name.strip()} is not an "
                             f"integer") from None
    mesh_shape(sizes, max(1, math.prod(abs(s) for s in sizes.values())))  # validates the sizes
    return sizes


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """Auto-typed mesh over `devices` (default: all) with mesh_cfg.shape's sizes."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg.shape, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def rules(mesh_cfg) -> tuple:
    return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in mesh_cfg.rules)


def fit_spec(shape, spec: P, mesh) -> P:
    """`spec` with every dimension's mesh axes dropped unless their product divides it."""
    out = []
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        out.append(axes if size % math.prod(mesh.shape[a] for a in names) == 0 else None)
    return P(*out)


def param_shardings(boxed_abstract_params, mesh, axis_rules):
    """NamedShardings for (unboxed) params from their logical axis metadata (boxed abstract
    params, e.g. jax.eval_shape(model.init, ...)["params"]), each fitted by fit_spec."""
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_abstract_params), mesh,
                                            axis_rules)
    return jax.tree.map(lambda x, s: NamedSharding(mesh, fit_spec(x.shape, s.spec, mesh)),
                        raw_values(boxed_abstract_params), shardings)


def raw_values(boxed):
    """The values inside logical boxes (nn.unbox without its sharding constraint, which fails
    on abstract values inside a mesh context)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, boxed,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


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
    """Host-local numpy batch (each process its own rows, as the data pipeline shards them) ->
    global jax.Arrays sharded over the batch axes; the global batch is the processes' rows
    together, so a mesh whose batch shards do not span the processes is an error, not replicas
    holding different rows."""
    sharding, p = batch_sharding(mesh), jax.process_count()
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        sharding, np.asarray(x), (x.shape[0] * p, *x.shape[1:])), batch)


def batch_span_problem(batch_shards: int, num_processes: int) -> str | None:
    """Each process loads rows of its own, so the batch axes (data x fsdp = `batch_shards`) must
    split over the processes: with fewer shards than processes (say context or tensor across
    hosts) two processes would hold one shard's replicas, with different rows."""
    if batch_shards % num_processes:
        return (f"the data x fsdp mesh size {batch_shards} must be a multiple of the number of "
                f"processes {num_processes}: each process loads its own rows, so the batch axes "
                f"must span the hosts (put the cross-host factor on data or fsdp)")
    return None


def batch_layout_problem(mesh) -> str | None:
    """The devices of each batch shard (one data x fsdp position, across context and tensor) must
    sit in one process, and every process must hold as many shards: a mesh whose device order
    interleaves the hosts (a TPU slice's physical layout can) passes the count check above yet
    fails at the first batch."""
    names = list(mesh.axis_names)
    devices = np.moveaxis(np.asarray(mesh.devices), [names.index(a) for a in BATCH_AXES], [0, 1])
    owner = np.vectorize(lambda d: d.process_index)(devices).reshape(
        devices.shape[0] * devices.shape[1], -1)
    for i, row in enumerate(owner):
        if len(set(row.tolist())) > 1:
            return (f"batch shard {i} of the data x fsdp axes has devices on processes "
                    f"{sorted(set(row.tolist()))}: each process loads its own rows, so the "
                    f"devices of one batch shard must be on one host (put the cross-host factor "
                    f"on data or fsdp, or order the mesh's devices host by host)")
    shards = np.bincount(owner[:, 0])
    if len(set(shards[shards > 0].tolist())) > 1:
        return (f"processes hold unequal numbers of batch shards {shards.tolist()}: each loads "
                f"the same number of rows")
    return None


def check_batch_size(batch_size: int, mesh, what: str) -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    problem = batch_span_problem(n, jax.process_count()) or batch_layout_problem(mesh)
    if problem:
        raise ValueError(problem)
    if batch_size % n:
        raise ValueError(f"{what}={batch_size} must be divisible by the data x fsdp mesh size {n}")
