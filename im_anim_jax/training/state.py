"""The train state of stages without extra state (the VAE, stage 2) and its sharded creation."""
from __future__ import annotations

from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
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


def apply_gradients(state: TrainState, tx, loss_fn: Callable, trained: dict):
    """One optimizer step on the `trained` subtree of state.params: loss_fn(trained) ->
    (loss, metrics). Returns (state with step + 1, metrics + grad_norm)."""
    grads, metrics = jax.grad(loss_fn, has_aux=True)(trained)
    updates, opt_state = tx.update(grads, state.opt_state, trained)
    metrics["grad_norm"] = optax.global_norm(grads)
    params = {**state.params, **optax.apply_updates(trained, updates)}
    return state.replace(step=state.step + 1, opt_state=opt_state, params=params), metrics
