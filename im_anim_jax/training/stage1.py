"""Stage 1: train motion encoder + quantizer + motion decoder + joint decoder on heatmaps.

loss = mean over visible (clip, frame, joint) of ||H_pred - H_gt||^2 (summed over heatmap pixels,
paper eqs. 5-6) + vq_loss_weight * (commitment + codebook loss) [+ heatmap_ce_weight * the
heatmap cross-entropy, + patch_heatmap_weight * the patch head's loss: training aids].
"""
from __future__ import annotations

import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import augment, pipeline
from im_anim_jax import keypoints as kp
from im_anim_jax import sharding
from im_anim_jax.models.quantizer import codebook_stats, restart_dead_codes
from im_anim_jax.models.stage1 import Stage1Model, build_stage1
from im_anim_jax.training import checkpointing, loop
from im_anim_jax.training import state as train_state

STAGE = 1


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array         # raw uint32 key data
    code_usage: jax.Array  # [K] EMA of per-batch code counts (dead-code restart)


def heatmap_sq_error(pred, target):
    """pred/target [B, T, J, Hh, Wh] -> per-joint summed squared error [B, T, J] (float32)."""
    return jnp.sum((pred.astype(jnp.float32) - target) ** 2, axis=(-2, -1))


def heatmap_ce(pred, target, temperature: float):
    """Per-joint spatial cross-entropy [B, T, J]: the target heatmap normalised to a distribution
    over its Hh x Wh cells against softmax(pred / temperature) (an all-zero target gives 0)."""
    logits = pred.astype(jnp.float32).reshape(pred.shape[:3] + (-1,)) / temperature
    p = target.reshape(logits.shape)
    p = p / jnp.maximum(jnp.sum(p, -1, keepdims=True), 1e-12)
    return -jnp.sum(p * jax.nn.log_softmax(logits, -1), -1)


def heatmap_loss(pred, target, weights):
    """pred/target [B, T, J, Hh, Wh], weights [B, T, J] -> scalar (masked joints excluded)."""
    return jnp.sum(heatmap_sq_error(pred, target) * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def heatmap_cross_entropy(pred, target, weights, temperature: float):
    """heatmap_ce averaged over visible joints (weights [B, T, J]) -> scalar."""
    return (jnp.sum(heatmap_ce(pred, target, temperature) * weights)
            / jnp.maximum(jnp.sum(weights), 1.0))


def schedule(cfg, lr: float | None = None) -> optax.Schedule:
    """Learning rate per step from `cfg` (a stage config), peaking at `lr` (default cfg.lr):
    "constant" (after linear warmup; the paper's setting) or "cosine" (warmup, then cosine decay
    to 1% of the peak at `cfg.steps`)."""
    lr, warmup = cfg.lr if lr is None else lr, cfg.warmup_steps
    if cfg.schedule == "constant":
        if not warmup:
            return optax.constant_schedule(lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    if cfg.schedule == "cosine":
        if not warmup:  # optax's warmup of 0 steps would still start at 0
            return optax.cosine_decay_schedule(lr, max(cfg.steps, 1), alpha=0.01)
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(cfg.steps, warmup + 1),
                                                  end_value=0.01 * lr)
    raise ValueError(f"schedule must be 'constant' or 'cosine', got {cfg.schedule!r}")


def decay_mask(params):
    """Weight decay on the kernels of dense and conv layers only (TiTok's and big_vision's rule):
    never on norms, biases, modulations, learned embeddings, tokens or the codebook. By name, not
    rank: scanned stacks give norm scales and biases a leading `layers` axis."""
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict({k: k[-1] == "kernel" for k in flat})


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW (decay_mask) after global-norm clipping, on `schedule(cfg)`; non-finite steps
    skipped (train_state.guard)."""
    return train_state.guard(optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule(cfg), weight_decay=cfg.weight_decay, mask=decay_mask)))


def dummy_frames(model_cfg):
    s = model_cfg.motion_tokenizer.image_size
    return jnp.zeros((1, 1, s, s, 3), jnp.uint8)


def init_state(model: Stage1Model, tx, config, mesh, axis_rules):
    """Sharded TrainState, its abstract twin (for restores) and its shardings."""
    frames = dummy_frames(config.model)
    boxed = jax.eval_shape(model.init, jax.random.key(0), frames)["params"]
    params_sh = sharding.param_shardings(boxed, mesh, axis_rules)
    abstract_params = nn.unbox(boxed)
    opt_sh = sharding.opt_state_shardings(tx, jax.eval_shape(tx.init, abstract_params),
                                          params_sh, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_sh = TrainState(step=replicated, params=params_sh, opt_state=opt_sh, rng=replicated,
                          code_usage=replicated)

    def create(seed):
        key = jax.random.key(seed)
        params = nn.unbox(model.init(key, frames)["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.key_data(jax.random.fold_in(key, 1)),
                          code_usage=jnp.ones((config.model.quantizer.codebook_size,), jnp.float32))

    with jax.set_mesh(mesh):
        state = jax.jit(create, out_shardings=state_sh)(config.seed)
    return state, checkpointing.abstract_like(state, state_sh), state_sh


def load_params(config, workdir: str):
    """(model, params, step) of the newest checkpoint in WORKDIR/stage1, read-only, checked
    against config.model (missing -> FileNotFoundError; other param shapes, or another
    quantizer.use_l2_norm / motion_tokenizer.is_legacy -> ValueError)."""
    model = build_stage1(config.model)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                       dummy_frames(config.model))["params"])
    params, step = checkpointing.restore_checked_params(
        os.path.join(workdir, "stage1"), abstract, "stage-1",
        "run `python train.py --config ... --workdir ... --stages 1` first", config=config,
        forward_keys=forward_keys())
    return model, params, step


def forward_keys() -> tuple:
    """The config.model keys that change stage 1's maths but no param shape (TiTok's
    is_legacy and use_l2_norm: convert.titok.MATHS_FIELDS); the other keys of its model sections
    are training-only or change a shape, which the architecture check names."""
    from im_anim_jax.convert import titok
    return tuple(f"model.{section}.{key}" for key, section in titok.MATHS_FIELDS.items())


def init_from_titok(path: str, params: dict, shardings: dict, model_cfg) -> dict:
    """`params` with motion_encoder and quantize replaced by a converted TiTok checkpoint (cast to
    the parameter dtype, placed on `shardings`). A size mismatch names the differing params, and
    so does a converted is_legacy / use_l2_norm that is not `model_cfg`'s (config.model)."""
    from im_anim_jax.convert import common, titok
    loaded, meta = common.load_converted(path)
    if meta.get("kind") != "titok":
        raise ValueError(f"stage1.init_from={path} holds a {meta.get('kind')!r} checkpoint; "
                         f"expected one written by `python -m im_anim_jax.convert titok`")
    titok.check_maths(titok.recorded_maths(meta), model_cfg, f"stage1.init_from={path}")
    part = {k: params[k] for k in ("motion_encoder", "quantize")}
    try:
        common.check_tree(loaded, part)
    except AssertionError as e:
        raise ValueError(f"stage1.init_from={path} does not fit config.model: {e}") from None
    loaded = jax.tree.map(lambda x, p, s: jax.device_put(np.asarray(x).astype(p.dtype), s),
                          loaded, part, {k: shardings[k] for k in part})
    return {**params, **loaded}


def forward_metrics(model: Stage1Model, params, batch, cfg_model, vq_weight: float,
                    patch_weight: float = 0.0, ce_weight: float = 0.0, ce_temperature: float = 0.1,
                    subpixel: bool = True):
    """Loss and metrics of one batch (used by training and evaluation); `patch_weight` weighs
    the patch heatmap head's loss (a model built with one), `ce_weight` the decoded heatmaps'
    cross-entropy (heatmap_cross_entropy at `ce_temperature`); train PCK reads the joints with
    the quarter-pixel refinement where `subpixel` (as evaluation does: eval.subpixel)."""
    heatmaps, aux = model.apply({"params": params}, batch["frames"])
    hm = heatmap_loss(heatmaps, batch["heatmaps"], batch["joint_weights"])
    size = cfg_model.joint_decoder.heatmap_size
    pred_xy = kp.argmax_keypoints(jax.lax.stop_gradient(heatmaps), subpixel)
    gt_xy = kp.image_to_heatmap(batch["keypoints"][..., :2], cfg_model.motion_tokenizer.image_size,
                                size)
    pck = kp.pck(pred_xy, gt_xy, batch["joint_weights"], size, (0.1,))
    metrics = {"loss": hm + vq_weight * aux["loss"], "heatmap_loss": hm, "vq_loss": aux["loss"],
               "commitment_loss": aux["commitment_loss"], "codebook_loss": aux["codebook_loss"],
               "train_pck@0.1": pck[0.1],
               **codebook_stats(aux["indices"], cfg_model.quantizer.codebook_size)}
    if ce_weight:
        ce = heatmap_cross_entropy(heatmaps, batch["heatmaps"], batch["joint_weights"],
                                   ce_temperature)
        metrics.update(loss=metrics["loss"] + ce_weight * ce, heatmap_ce=ce)
    if "patch_heatmaps" in aux:  # a model with the patch heatmap head
        patch_hm = heatmap_loss(aux["patch_heatmaps"], batch["heatmaps"], batch["joint_weights"])
        metrics.update(loss=metrics["loss"] + patch_weight * patch_hm, patch_heatmap_loss=patch_hm)
    return metrics, heatmaps, aux


def make_train_step(model, tx, config, mesh, axis_rules, state_sh):
    """jit(step)(state, batch) -> (state, metrics); then, if enabled, the dead-code restart.

    The restart runs as its own small jitted update: fused into the step it made XLA:CPU's
    schedule of the whole step ~3x slower (measured 3.3 s vs 1.2 s per demo step).
    """
    q = config.model.quantizer

    def step(state: TrainState, batch):
        def loss_fn(params):
            metrics, _, aux = forward_metrics(model, params, batch, config.model,
                                              config.stage1.vq_loss_weight,
                                              config.stage1.patch_heatmap_weight,
                                              config.stage1.heatmap_ce_weight,
                                              config.stage1.heatmap_ce_temperature,
                                              config.eval.subpixel)
            return metrics["loss"], dict(metrics, vq_indices=aux["indices"], vq_z=aux["z"])

        state, metrics = train_state.apply_gradients(state, tx, loss_fn, state.params,
                                                     tuple(config.faults.inject_nan_steps))
        return state, metrics, {k: metrics.pop(f"vq_{k}") for k in ("indices", "z")}

    def restart(state: TrainState, vq):
        """Skipped (state unchanged) after a step the guard skipped: its z may be non-finite."""
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        book, usage, restarted = restart_dead_codes(
            state.params["quantize"]["embedding"], state.code_usage, vq["indices"], vq["z"], key,
            decay=q.restart_decay, threshold=q.restart_threshold)
        ok = state.opt_state.last_finite
        book = jnp.where(ok, book, state.params["quantize"]["embedding"])
        params = {**state.params, "quantize": {**state.params["quantize"], "embedding": book}}
        return (state.replace(params=params, code_usage=jnp.where(ok, usage, state.code_usage)),
                jnp.where(ok, restarted, 0))

    jitted = jax.jit(step, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                     out_shardings=(state_sh, None, None), donate_argnums=0)
    jitted_restart = jax.jit(restart, out_shardings=(state_sh, None), donate_argnums=0)

    def run_step(state, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
            state, metrics, vq = jitted(state, batch)
            if q.restart_threshold > 0:
                state, metrics["codes_restarted"] = jitted_restart(state, vq)
        return state, metrics
    return run_step


def targets(config) -> pipeline.Targets:
    return pipeline.Targets(image_size=config.model.motion_tokenizer.image_size,
                            heatmap_size=config.model.joint_decoder.heatmap_size,
                            sigma=config.data.heatmap_sigma,
                            conf_threshold=config.data.conf_threshold)


def train(config, workdir: str, data_path: str, log=print) -> dict:
    """Runs (or resumes) stage 1 into WORKDIR/stage1. Returns the last logged metrics."""
    cfg = config.stage1
    mesh = sharding.make_mesh(config.mesh)
    axis_rules = sharding.rules(config.mesh)
    sharding.check_batch_size(cfg.batch_size, mesh, "stage1.batch_size")
    model = build_stage1(config.model)
    tx = make_optimizer(cfg)
    state, abstract_state, state_sh = init_state(model, tx, config, mesh, axis_rules)
    if cfg.init_from:
        state = state.replace(params=init_from_titok(cfg.init_from, state.params,
                                                     state_sh.params, config.model))
        log(f"[stage1] motion encoder and codebook initialised from {cfg.init_from}")
    data_iter = iter(pipeline.train_dataset(
        data_path, "train", clip_frames=cfg.clip_frames,
        batch_size=cfg.batch_size // jax.process_count(), targets=targets(config),
        seed=config.seed, read_threads=config.data.read_threads,
        num_workers=config.data.num_workers, max_bad_records=config.faults.max_bad_records,
        augment=augment.clip_augment(cfg.augment, supervise_original=False)))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    log(f"[stage1] {n_params / 1e6:.2f}M params on mesh {dict(mesh.shape)}; "
        f"{cfg.steps} steps of {cfg.batch_size} clips x {cfg.clip_frames} frames")
    _, last = loop.run(
        name="stage1", stage_dir=os.path.join(workdir, "stage1"), state=state,
        abstract_state=abstract_state,
        train_step=make_train_step(model, tx, config, mesh, axis_rules, state_sh),
        data_iter=data_iter, mesh=mesh, total_steps=cfg.steps, log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every, ckpt_cfg=config.checkpoint,
        max_nonfinite_in_a_row=config.faults.max_nonfinite_in_a_row,
        meta=checkpointing.meta_for(config, STAGE, state.params), log=log,
        console_keys=("loss", "heatmap_loss", "vq_loss", "train_pck@0.1", "codebook_perplexity"))
    return last
