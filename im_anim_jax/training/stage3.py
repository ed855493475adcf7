"""Stage 3: everything end to end with flow matching + 10 x the retarget heatmap loss (eqs. 7-8).

Per pair (stage-2 pairs: identity A drives, the target is identity B performing the same motion,
B's reference image from another moment):
    z_ref = VAE(reference) [B, 1, h, w, z]; x0 = VAE(target clip) [B, F, h, w, z] (frozen VAE)
    s = shift(u) (u ~ U(0, 1), Wan's timestep shift), eps ~ N(0, I), x_s = (1 - s) x0 + s eps
    v = model(driving, [z_ref ++ x_s], t = 1000 s per token (0 on z_ref and on held frames))
    L = mean (v - (eps - x0))^2 over the generated frames + 10 * L_retarget (+ VQ terms)
    (stage3.loss_weighting "x0": each frame's squared error times s^2; loss_scale)
    (L_retarget left out when stage3.frozen holds its whole path: `retarget_loss_trains`)
With probability `context_prob` the first latent frames of x0 (those of sampling.overlap_frames
video frames) are held clean with t = 0 and left out of the loss: how the next window of a long
video starts (generation.py). The prompt context is dropped (zeros) with `text_dropout`, for
classifier-free guidance.

Init: the newest stage-2 (main) checkpoint for the motion encoder, quantizer, retargeter, joint
head and joint decoder; the DiT from model.dit.init_from (a converted Wan2.2 TI2V DiT, regrouped
and widened by zero control channels) or fresh; the expression branch fresh (zero output).
Trained: everything but the quantizer's codebook (kept, as in stage 2: it defines the token space)
and the groups of stage3.frozen, with AdamW at stage3.lr_dit on the DiT (its expression blocks
excepted) and stage3.lr_other on the rest, after one global-norm clip; `ema_decay` > 0 keeps an
EMA of the trained params (used for generation) inside the optimizer state.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import augment, pipeline
from im_anim_jax import sampling, sharding, text
from im_anim_jax.convert import common
from im_anim_jax.models import stage3 as stage3_model
from im_anim_jax.models.retargeter import num_latent_frames
from im_anim_jax.models.wan import dit as dit_lib
from im_anim_jax.training import checkpointing, loop
from im_anim_jax.training import stage1 as stage1_training
from im_anim_jax.training import stage2 as stage2_training
from im_anim_jax.training import state as train_state
from im_anim_jax.training import vae as vae_training

STAGE = 3
GROUPS = ("motion_encoder", "quantize", "retargeter", "joint_head", "joint_decoder", "dit",
          "expression_encoder")
MISSING_HINT = "run `python train.py --config ... --workdir ... --stages 3` first"


def stage_dir(workdir: str) -> str:
    return os.path.join(workdir, "stage3")


def latent_size(config) -> tuple[int, int]:
    """(h, w) of the clip's VAE latents: vae_training.video_size / the VAE's compression."""
    factor = vae_training.vae.build_vae(config.model.vae).space_factor
    return tuple(x // factor for x in vae_training.video_size(config))


def tokens_per_frame(config) -> int:
    """DiT patch tokens per latent frame."""
    (h, w), (_, ph, pw) = latent_size(config), config.model.dit.patch_size
    return (h // ph) * (w // pw)


def dummy_inputs(config, ref_dim: int, grid, frames: int | None = None):
    """Smallest inputs of Stage3Model.__call__ for a clip of `frames` (default stage3.clip_frames)."""
    t = config.stage3.clip_frames if frames is None else frames
    s, (h, w) = config.model.motion_tokenizer.image_size, latent_size(config)
    f = 1 + num_latent_frames(t)
    dit = config.model.dit
    return (jnp.zeros((1, t, s, s, 3), jnp.uint8), jnp.zeros((1, t, 62, 3), jnp.float32),
            jnp.zeros((1, grid[0] * grid[1], ref_dim), jnp.float32),
            jnp.zeros((1, f, h, w, dit.in_dim), jnp.float32),
            jnp.zeros((1, f * tokens_per_frame(config)), jnp.float32),
            jnp.zeros((1, dit.text_len, dit.text_dim), jnp.float32))


def abstract_params(model, config, ref_dim: int, boxed: bool = False):
    out = jax.eval_shape(model.init, jax.random.key(0),
                         *dummy_inputs(config, ref_dim, model.grid))["params"]
    return out if boxed else nn.unbox(out)


def frozen(config) -> tuple[str, ...]:
    """Top-level param groups stage 3 keeps fixed: the quantizer's codebook (it defines the token
    space) and those of stage3.frozen (ValueError naming an unknown one)."""
    extra = tuple(config.stage3.frozen)
    unknown = sorted(set(extra) - set(GROUPS))
    if unknown:
        raise ValueError(f"config.stage3.frozen has unknown param groups {unknown}; choose from "
                         f"{list(GROUPS)}")
    if "dit" in extra:
        raise ValueError("config.stage3.frozen may not hold 'dit': stage 3 trains the DiT")
    return tuple(dict.fromkeys(("quantize",) + extra))


RETARGET_PATH = ("motion_encoder", "retargeter", "joint_head", "joint_decoder")


def retarget_loss_trains(config) -> bool:
    """Whether L_retarget reaches a trained param: not when stage3.frozen holds the whole stage-2
    path to the heatmaps (`RETARGET_PATH`). Then the step skips the heatmap decode, a constant
    term (21% of a demo step), and logs no `retarget_loss`."""
    return not set(RETARGET_PATH) <= set(frozen(config))


def _trained(params: dict, config) -> dict:
    fixed = frozen(config)
    return {k: v for k, v in params.items() if k not in fixed}


def _labels(params: dict) -> dict:
    """"dit" for the DiT's params (its expression blocks excepted), "other" for the rest."""
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict(
        {k: "dit" if k[0] == "dit" and "expression" not in k else "other" for k in flat})


class EmaState(NamedTuple):
    ema: dict


def ema(decay: float) -> optax.GradientTransformation:
    """Last in a chain: keeps ema <- decay ema + (1 - decay) (params + updates); updates pass."""
    def init(params):
        return EmaState(jax.tree.map(jnp.copy, params))

    def update(updates, state, params):
        new = jax.tree.map(lambda e, p, u: decay * e + (1 - decay) * (p + u), state.ema, params,
                           updates)
        return updates, EmaState(new)
    return optax.GradientTransformation(init, update)


def make_optimizer(cfg, trained_like: dict) -> optax.GradientTransformation:
    """Global-norm clip, then AdamW at lr_dit / lr_other by `_labels`, then the optional EMA.
    Labels and decay masks are trees built from `trained_like` (the trained params or their
    shapes), not callables, so optax.tree_map_params can place the state."""
    decay = stage1_training.decay_mask(trained_like)

    def adamw(lr):
        return optax.adamw(stage1_training.schedule(cfg, lr), weight_decay=cfg.weight_decay,
                           mask=decay)
    parts = [optax.clip_by_global_norm(cfg.grad_clip),
             optax.multi_transform({"dit": adamw(cfg.lr_dit), "other": adamw(cfg.lr_other)},
                                   _labels(trained_like))]
    if cfg.ema_decay:
        parts.append(ema(cfg.ema_decay))
    return train_state.guard(optax.chain(*parts))


def ema_params(opt_state):
    """The EMA of the trained params held by make_optimizer's state (None without EMA)."""
    found = [s for s in opt_state.inner_state if isinstance(s, EmaState)]
    return found[0].ema if found else None


def init_state(model, tx, config, mesh, ref_dim: int):
    inputs = dummy_inputs(config, ref_dim, model.grid)
    return train_state.init_sharded(
        lambda key: nn.unbox(model.init(key, *inputs)["params"]),
        abstract_params(model, config, ref_dim, boxed=True), tx, mesh,
        sharding.rules(config.mesh), config.seed,
        trained=lambda p: _trained(p, config))


def load_converted_dit(config, abstract_dit: dict) -> dict:
    """model.dit.init_from (python -m im_anim_jax.convert wan-dit) as stage-3 DiT params: blocks
    grouped for the expression blocks, zero control channels, fresh expression params left out,
    each cast to its param's dtype (a bf16 checkpoint still trains fp32 master params).
    ValueError naming a param of the wrong shape, or one the checkpoint lacks."""
    path = config.model.dit.init_from
    loaded, meta = common.load_converted(path)
    if meta.get("kind") not in ("wan-dit", "wan_dit"):
        raise ValueError(f"model.dit.init_from={path} holds a {meta.get('kind')!r} checkpoint; "
                         "expected one written by `python -m im_anim_jax.convert wan-dit`")
    every = config.model.expression.every
    params = dit_lib.add_control_channels(loaded, stage3_model.control_dim(config.model))
    params = dit_lib.group_layers(params, every) if every else params
    want = flax.traverse_util.flatten_dict(abstract_dit)
    have = flax.traverse_util.flatten_dict(params)
    bad = [k for k in have if k not in want or tuple(have[k].shape) != tuple(want[k].shape)]
    if bad:
        raise ValueError(f"model.dit.init_from={path} does not fit config.model.dit: e.g. "
                         f"{'/'.join(bad[0])} has shape {tuple(have[bad[0]].shape)}")
    missing = [k for k in want if k not in have and "expression" not in k]
    if missing:
        raise ValueError(f"model.dit.init_from={path} lacks {len(missing)} params of "
                         f"config.model.dit, e.g. {'/'.join(missing[0])}")
    return flax.traverse_util.unflatten_dict(
        {k: np.asarray(v).astype(want[k].dtype, copy=False) for k, v in have.items()})


def initial_params(state, state_sh, tx, config, workdir: str, ref_encoder):
    """`state` with the stage-2 main model's params and, with model.dit.init_from, the converted
    DiT's (its expression blocks stay fresh); the optimizer state re-initialised."""
    s2 = stage2_training.stage_dir(workdir)
    s2_model = stage2_training.build_stage2(config.model, ref_encoder.grid)
    loaded, _ = checkpointing.restore_checked_params(
        s2, stage2_training.abstract_params(s2_model, config, ref_encoder.dim), "stage-2",
        "run `python train.py --config ... --workdir ... --stages 2` first")
    params = dict(state.params)
    place = lambda tree, sh: jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), tree, sh)
    for k, v in loaded.items():
        params[k] = place(v, state_sh.params[k])
    if config.model.dit.init_from:
        dit = flax.traverse_util.flatten_dict(params["dit"])
        dit.update(flax.traverse_util.flatten_dict(load_converted_dit(config, params["dit"])))
        params["dit"] = place(flax.traverse_util.unflatten_dict(dit), state_sh.params["dit"])
    opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(_trained(params, config))
    return state.replace(params=params, opt_state=opt_state)


def per_token(t_frames, tokens_per_frame: int):
    """[B, F] -> [B, F * tokens_per_frame] (token order f, h, w)."""
    return jnp.repeat(t_frames, tokens_per_frame, axis=1)


def overlap_latents(config) -> int:
    """Latent frames of sampling.overlap_frames (1 + 4j) video frames."""
    k = config.sampling.overlap_frames
    if k < 1 or (k - 1) % 4 or k >= config.stage3.clip_frames:
        raise ValueError(f"sampling.overlap_frames={k} must be 1 + 4j and below "
                         f"stage3.clip_frames={config.stage3.clip_frames}")
    return num_latent_frames(k)


def flow_inputs(key, x0, z_ref, cfg, held_frames: int):
    """Noised inputs of one batch: (latents [B, 1 + F, ...], t per frame [B, 1 + F], target
    eps - x0 [B, F, ...], loss weight per frame [B, F])."""
    b, f = x0.shape[:2]
    k_s, k_eps, k_held = jax.random.split(key, 3)
    s = sampling.shift_timesteps(jax.random.uniform(k_s, (b,)), cfg.timestep_shift)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    held = (jnp.arange(f)[None] < held_frames) & (
        jax.random.uniform(k_held, (b, 1)) < cfg.context_prob)
    bcast = held[:, :, None, None, None]
    xs = jnp.where(bcast, x0, (1 - s[:, None, None, None, None]) * x0
                   + s[:, None, None, None, None] * eps)
    t = jnp.where(held, 0.0, 1000.0 * s[:, None])
    latents = jnp.concatenate([z_ref, xs], 1)
    t = jnp.concatenate([jnp.zeros((b, 1)), t], 1)
    return latents, t, eps - x0, (~held).astype(jnp.float32)


def flow_loss(v, target, weight, scale=1.0):
    """Mean squared error over the weighted (generated) frames; v [B, 1 + F, ...] (frame 0 is
    the reference, never in the loss), target [B, F, ...], weight [B, F] (1 generated, 0 held),
    scale [B, F]: each frame's error times `scale` (loss_scale), still divided by the frame
    count."""
    err = jnp.mean(jnp.square(v[:, 1:].astype(jnp.float32) - target), axis=(2, 3, 4))
    return jnp.sum(err * weight * scale) / jnp.maximum(jnp.sum(weight), 1.0)


def loss_scale(t_frames, weighting: str):
    """Per generated frame [B, F] from t [B, 1 + F] (0-1000): 1 ("velocity": Wan's flow loss) or
    sigma^2 ("x0": the velocity error times sigma is the error of the clean latent it implies,
    x0 = x_s - sigma v, so every noise level weighs alike instead of low noise 1/sigma^2 more)."""
    check_loss_weighting(weighting)
    if weighting == "x0":
        return jnp.square(t_frames[:, 1:].astype(jnp.float32) / 1000.0)
    return jnp.ones_like(t_frames[:, 1:])


def check_loss_weighting(weighting: str) -> None:
    """ValueError unless `weighting` (stage3.loss_weighting) is 'velocity' or 'x0'."""
    if weighting not in ("velocity", "x0"):
        raise ValueError(f"stage3.loss_weighting must be 'velocity' (Wan2.2's) or 'x0', got "
                         f"{weighting!r}")


def make_train_step(model, tx, config, mesh, axis_rules, state_sh, vae_encoder, context):
    cfg, per_frame = config.stage3, tokens_per_frame(config)
    held_frames = overlap_latents(config)
    with_retarget = retarget_loss_trains(config)

    def step(state: train_state.TrainState, batch, z_ref, x0):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_flow, k_text = jax.random.split(key)
        latents, t_frames, target, weight = flow_inputs(k_flow, x0, z_ref, cfg, held_frames)
        b = x0.shape[0]
        keep = jax.random.uniform(k_text, (b, 1, 1)) >= cfg.text_dropout
        ctx = jnp.where(keep, jnp.broadcast_to(context, (b, *context.shape)), 0.0)
        ref_tokens = vae_training.reference_tokens(z_ref, vae_encoder.patch)
        trained = _trained(state.params, config)
        fixed = jax.lax.stop_gradient({k: v for k, v in state.params.items()
                                       if k not in trained})

        def loss_fn(trained):
            v, heatmaps, aux = model.apply(
                {"params": {**fixed, **trained}}, batch["driving"], batch["driving_keypoints"],
                ref_tokens, latents, per_token(t_frames, per_frame), ctx)
            fl = flow_loss(v, target, weight, loss_scale(t_frames, cfg.loss_weighting))
            metrics = {"flow_loss": fl, "vq_loss": aux["loss"]}
            if with_retarget:  # else `heatmaps` is unused and XLA drops the decode
                hm = stage1_training.heatmap_loss(heatmaps, batch["heatmaps"],
                                                  batch["joint_weights"])
                # This order of the sum matters to XLA's schedule: adding the retarget term last
                # raised the paper stage-3 step's temporaries on 64 devices from 66.4 to 81.9 GiB
                # (it no longer fit 80 GiB; README, "Planner"; `python -m im_anim_jax.plan`).
                loss = fl + cfg.retarget_loss_weight * hm + cfg.vq_loss_weight * aux["loss"]
                metrics["retarget_loss"] = hm
            else:
                loss = fl + cfg.vq_loss_weight * aux["loss"]
            return loss, {"loss": loss, **metrics}

        return train_state.apply_gradients(state, tx, loss_fn, trained,
                                           tuple(config.faults.inject_nan_steps))

    keys = ("driving", "driving_keypoints", "heatmaps", "joint_weights")
    batch_sh = sharding.batch_sharding(mesh)
    jitted = jax.jit(step, in_shardings=(state_sh, {k: batch_sh for k in keys}, batch_sh,
                                         batch_sh),
                     out_shardings=(state_sh, None), donate_argnums=0)

    def run_step(state, batch):
        z_ref = vae_training.encode_video(vae_encoder, batch["reference"][:, None])
        x0 = vae_training.encode_video(vae_encoder, batch["target"])
        with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
            return jitted(state, {k: batch[k] for k in keys}, z_ref, x0)
    return run_step


def build(config, ref_encoder):
    return stage3_model.build_stage3(config.model, ref_encoder.grid)


def train(config, workdir: str, data_path: str, log=print) -> dict:
    """Trains (or resumes) stage 3 into WORKDIR/stage3; returns the last logged metrics."""
    cfg = config.stage3
    overlap_latents(config)
    check_loss_weighting(cfg.loss_weighting)
    mesh = sharding.make_mesh(config.mesh)
    axis_rules = sharding.rules(config.mesh)
    sharding.check_batch_size(cfg.batch_size, mesh, "stage3.batch_size")
    ref_encoder = vae_training.load_reference_encoder(config, workdir)
    model = build(config, ref_encoder)
    tx = make_optimizer(cfg, _trained(abstract_params(model, config, ref_encoder.dim), config))
    state, abstract_state, state_sh = init_state(model, tx, config, mesh, ref_encoder.dim)
    directory = stage_dir(workdir)
    if checkpointing.latest_step(directory) is None:
        state = initial_params(state, state_sh, tx, config, workdir, ref_encoder)
    data_iter = iter(pipeline.pair_train_dataset(
        data_path, "train", clip_frames=cfg.clip_frames,
        batch_size=cfg.batch_size // jax.process_count(), targets=stage1_training.targets(config),
        seed=config.seed, partners_per_clip=cfg.partners_per_clip, self_pairs=cfg.self_pairs,
        augment=augment.clip_augment(cfg.augment, supervise_original=True),
        read_threads=config.data.read_threads, num_workers=config.data.num_workers,
        max_bad_records=config.faults.max_bad_records, log=log))
    n = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v))
         for k, v in state.params.items()}
    log(f"[stage3] {sum(n.values()) / 1e6:.2f}M params (DiT {n['dit'] / 1e6:.2f}M, expression "
        f"{n['expression_encoder'] / 1e6:.2f}M) on mesh {dict(mesh.shape)}; {cfg.steps} steps of "
        f"{cfg.batch_size} pairs x {cfg.clip_frames} frames; DiT "
        + ("from " + config.model.dit.init_from if config.model.dit.init_from else "from scratch"))
    meta = checkpointing.meta_for(config, STAGE, state.params, _trained(state.params, config))
    _, last = loop.run(
        name="stage3", stage_dir=directory, state=state, abstract_state=abstract_state,
        train_step=make_train_step(model, tx, config, mesh, axis_rules, state_sh, ref_encoder,
                                   jnp.asarray(text.context(config))),
        data_iter=data_iter, mesh=mesh, total_steps=cfg.steps, log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every, ckpt_cfg=config.checkpoint,
        max_nonfinite_in_a_row=config.faults.max_nonfinite_in_a_row, meta=meta, log=log,
        console_keys=("loss", "flow_loss", "retarget_loss", "grad_norm"))
    return last


def forward_keys() -> tuple:
    """The config keys that change stage 3's maths but no param shape: what the DiT's output
    means, its LayerNorm epsilon, and stage 1's (its motion encoder and quantizer run here)."""
    return ("model.dit_prediction", "model.dit.eps") + stage1_training.forward_keys()


def load_params(config, workdir: str, ref_encoder, step: int | None = None):
    """(model, params for generation, step) of WORKDIR/stage3 checkpoint `step` (default the
    newest), checked against the config (architecture and forward_keys). Where the run that
    wrote it kept an EMA (its stage3.ema_decay > 0), the EMA of its trained groups replaces
    them, whatever this config's ema_decay."""
    model = build(config, ref_encoder)
    abstract = abstract_params(model, config, ref_encoder.dim)
    ckpt_dir = stage_dir(workdir)
    params, step, meta = checkpointing.restore_checked_params(
        ckpt_dir, abstract, "stage-3", MISSING_HINT, step, config=config,
        forward_keys=forward_keys(), with_meta=True)
    trained_cfg = json.loads(meta["config"])["stage3"] if "config" in meta else config.stage3
    if trained_cfg.get("ema_decay"):
        groups = meta.get("trained_groups") or sorted(_trained(abstract, config))
        trained = {k: abstract[k] for k in groups}
        cfg = config.stage3.copy_and_resolve_references()
        cfg.ema_decay = trained_cfg["ema_decay"]
        params = {**params, **_restore_ema(ckpt_dir, step, abstract, trained,
                                           make_optimizer(cfg, trained))}
    return model, params, step


def _restore_ema(directory: str, step: int, abstract: dict, trained: dict, tx) -> dict:
    """The EMA params in the optimizer state of checkpoint `step`, read alone (host arrays, as
    restore_params gives): not the Adam moments beside them, 3x the params' bytes. ValueError
    where the checkpoint holds none that fits."""
    inner = jax.eval_shape(tx.init, trained).inner_state  # the guard's chain
    at = [i for i, s in enumerate(inner) if isinstance(s, EmaState)][0]
    ema = {k: abstract[k] for k in trained}
    chain = [{"ema": ema} if i == at else None for i in range(len(inner))]
    for target in ({"inner_state": chain}, chain):  # a checkpoint from before the guard: bare
        ckpt = checkpointing.Checkpointer(directory, async_save=False)
        try:
            part = ckpt.restore_part(step, {"opt_state": target})["opt_state"]
            return (part["inner_state"] if isinstance(part, dict) else part)[at]["ema"]
        except (ValueError, TypeError, KeyError) as e:
            if target is chain:
                raise ValueError(
                    f"the stage-3 checkpoint of step {step} in {directory} holds no EMA of the "
                    f"param groups {sorted(trained)} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]}); it was written by another version of "
                    f"the code or another stage3.frozen") from None
        finally:
            ckpt.close()
