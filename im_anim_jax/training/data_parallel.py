"""The legacy data-parallel stage-1 step, for users' pmap-style experiments: every device holds
the whole state, takes B / n clips, and the gradients are summed across devices explicitly.

    from im_anim_jax.training import data_parallel, stage1
    step = data_parallel.make_step(model, tx, config, jax.devices(), kind="shard_map")  # or "pmap"
    state = data_parallel.replicate(state, devices, kind)     # a stage1.init_state state
    state, metrics = step(state, data_parallel.split_batch(batch, devices, kind))

It computes the same step as stage1.make_train_step (tested to float32 rounding in
tests/test_data_parallel.py, with every stage-1 loss term): the heatmap losses (MSE, the
cross-entropy, the patch head's MSE) are global weighted means, so each device divides its
weighted sums by the psum of all weights, and the VQ means are averaged; local
gradients are psum'd, then the (guarded) AdamW update runs identically on every device.
`shard_map` runs it under jit on a 1-D 'data' mesh (the supported way); `pmap` is the legacy
transform (still in jax 0.10: jit + shard_map underneath). The dead-code restart is not part of
this path (model.quantizer.restart_threshold must be 0).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from im_anim_jax.training import stage1
from im_anim_jax.training import state as train_state

KINDS = ("shard_map", "pmap")
AXIS = "data"


def _local_step(model, tx, config):
    """(state, local batch) -> (state, metrics): one device's share; gradients psum'd over AXIS."""
    cfg = config.stage1
    weights = {"heatmap_loss": 1.0, "vq_loss": cfg.vq_loss_weight,
               "heatmap_ce": cfg.heatmap_ce_weight, "patch_heatmap_loss": cfg.patch_heatmap_weight}

    inject = tuple(config.faults.inject_nan_steps)

    def step(state, batch):
        w, target = batch["joint_weights"], batch["heatmaps"]
        total_w = jnp.maximum(jax.lax.psum(jnp.sum(w), AXIS), 1.0)
        share = lambda per_joint: jnp.sum(per_joint * w) / total_w  # noqa: E731 (this device's part)

        def loss_fn(params):
            heatmaps, aux = model.apply({"params": params}, batch["frames"])
            terms = {"heatmap_loss": share(stage1.heatmap_sq_error(heatmaps, target)),
                     "vq_loss": aux["loss"] / jax.lax.psum(1, AXIS)}
            if cfg.heatmap_ce_weight:
                terms["heatmap_ce"] = share(stage1.heatmap_ce(heatmaps, target,
                                                              cfg.heatmap_ce_temperature))
            if "patch_heatmaps" in aux:
                terms["patch_heatmap_loss"] = share(stage1.heatmap_sq_error(
                    aux["patch_heatmaps"], target))
            return sum(weights[k] * v for k, v in terms.items()), terms

        grads, terms = jax.grad(loss_fn, has_aux=True)(state.params)
        grads, terms = jax.lax.psum(grads, AXIS), jax.lax.psum(terms, AXIS)
        loss = sum(weights[k] * v for k, v in terms.items())
        if inject:  # faults.inject_nan_steps (1-based), as train_state.apply_gradients
            loss = jnp.where(jnp.isin(state.step + 1, jnp.asarray(inject)), jnp.nan, loss)
        # A non-finite loss poisons the gradients, so the optimizer's guard skips the step on
        # every device alike (as train_state.apply_gradients does on one).
        grads = jax.tree.map(lambda g: g * jnp.where(jnp.isfinite(loss), 1.0, jnp.nan), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        state = state.replace(step=state.step + 1, opt_state=opt_state,
                              params=optax.apply_updates(state.params, updates))
        return state, {"loss": loss, **terms, "grad_norm": optax.global_norm(grads),
                       **train_state.guard_metrics(opt_state)}
    return step


def make_step(model, tx, config, devices: Sequence, kind: str = "shard_map"):
    """step(state, batch) -> (state, metrics) data-parallel over `devices`; state and batch as
    replicate() and split_batch() place them."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if config.model.quantizer.restart_threshold > 0:
        raise ValueError("the data-parallel stage-1 path has no dead-code restart: set "
                         "model.quantizer.restart_threshold=0")
    local = _local_step(model, tx, config)
    if kind == "pmap":
        return jax.pmap(local, axis_name=AXIS, devices=list(devices), donate_argnums=0)
    mesh = jax.make_mesh((len(devices),), (AXIS,), devices=list(devices),
                         axis_types=(jax.sharding.AxisType.Explicit,))
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXIS)),
                                 out_specs=(P(), P()), check_vma=False), donate_argnums=0)


def replicate(state, devices: Sequence, kind: str = "shard_map"):
    """`state` copied to every device: replicated on the 1-D mesh for shard_map; for pmap host
    copies stacked on a leading device axis (pmap moves them to its devices)."""
    host = jax.device_get(state)
    if kind == "pmap":
        return jax.tree.map(lambda x: np.stack([x] * len(devices)), host)
    mesh = jax.make_mesh((len(devices),), (AXIS,), devices=list(devices),
                         axis_types=(jax.sharding.AxisType.Explicit,))
    return jax.device_put(host, NamedSharding(mesh, P()))


def split_batch(batch: dict, devices: Sequence, kind: str = "shard_map") -> dict:
    """Host batch [B, ...] -> B / n rows per device ([n, B / n, ...] for pmap)."""
    n = len(devices)
    if any(len(x) % n for x in batch.values()):
        raise ValueError(f"the batch size must be divisible by the {n} devices")
    if kind == "pmap":
        return {k: np.asarray(x).reshape(n, len(x) // n, *np.shape(x)[1:])
                for k, x in batch.items()}
    mesh = jax.make_mesh((n,), (AXIS,), devices=list(devices),
                         axis_types=(jax.sharding.AxisType.Explicit,))
    return jax.device_put({k: np.asarray(x) for k, x in batch.items()},
                          NamedSharding(mesh, P(AXIS)))


def unreplicate(state, kind: str = "shard_map"):
    """The state as host numpy arrays (device 0's copy for pmap)."""
    host = jax.device_get(state)
    return jax.tree.map(lambda x: x[0], host) if kind == "pmap" else host
