"""The train state of stages without extra state (the VAE, stage 2) and its sharded creation."""
from __future__ import annotations

from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from im_anim_jax import sharding
from im_anim_jax.training import checkpointing


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data


def init_sharded(init_params: Callable, boxed_abstract: dict, tx, mesh, axis_rules, seed: int,
                 trained: Callable = lambda params: params):
    """(state, abstract state for restores, state shardings) of a fresh TrainState.

    init_params(key) -> unboxed params; boxed_abstract: their abstract, logically boxed twin;
    trained(params) -> the subtree the optimizer updates (its state covers only that)."""
    params_sh = sharding.param_shardings(boxed_abstract, mesh, axis_rules)
    abstract = nn.unbox(boxed_abstract)
    opt_sh = sharding.opt_state_shardings(tx, jax.eval_shape(tx.init, trained(abstract)),
                                          trained(params_sh), mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_sh = TrainState(step=replicated, params=params_sh, opt_state=opt_sh, rng=replicated)

    def create(seed):
        key = jax.random.key(seed)
        params = init_params(key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(trained(params)),
                          rng=jax.random.key_data(jax.random.fold_in(key, 1)))

    with jax.set_mesh(mesh):
        state = jax.jit(create, out_shardings=state_sh)(seed)
    return state, checkpointing.abstract_like(state, state_sh), state_sh


def guard(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` skipping every update whose gradients are not finite (optax.apply_if_finite, which
    never gives up here: the training loop stops the run after config.faults.
    max_nonfinite_in_a_row skipped steps). Its state counts the streak and the total. A skipped
    step leaves the inner optimizer's step count as it was, so the learning-rate schedule runs one
    step behind `state.step` per skipped step (a cosine run ends that many steps short of its
    final rate)."""
    return optax.apply_if_finite(tx, max_consecutive_errors=np.iinfo(np.int32).max)


def guard_metrics(opt_state) -> dict:
    """nonfinite_in_a_row (0: this step was applied) and nonfinite_total from guard()'s state."""
    return {"nonfinite_in_a_row": opt_state.notfinite_count,
            "nonfinite_total": opt_state.total_notfinite}


def apply_gradients(state, tx, loss_fn: Callable, trained: dict, inject_nan_steps=()):
    """One step of `tx` (a guard()ed optimizer) on the `trained` subtree of state.params:
    loss_fn(trained) -> (loss, metrics). A non-finite loss poisons the gradients, so the guard
    skips the step too; the steps in `inject_nan_steps` (1-based) get a NaN loss (fault tests).
    Returns (state with step + 1, metrics + grad_norm + guard_metrics)."""
    step = state.step + 1

    def guarded(p):
        loss, metrics = loss_fn(p)
        if inject_nan_steps:
            loss = jnp.where(jnp.isin(step, jnp.asarray(inject_nan_steps)), jnp.nan, loss)
        return loss, dict(metrics, loss=loss)

    grads, metrics = jax.grad(guarded, has_aux=True)(trained)
    poison = jnp.where(jnp.isfinite(metrics["loss"]), 1.0, jnp.nan)
    grads = jax.tree.map(lambda g: g * poison.astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state.opt_state, trained)
    metrics.update(grad_norm=optax.global_norm(grads), **guard_metrics(opt_state))
    params = {**state.params, **optax.apply_updates(trained, updates)}
    return state.replace(step=step, opt_state=opt_state, params=params), metrics
