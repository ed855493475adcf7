"""Stage 2: train the motion encoder + mask-token retargeter (+ joint head) so that the stage-1
joint decoder, reading M_ret, draws the REFERENCE identity performing the driving motion (eq. 6).

Init: motion encoder, quantizer and joint decoder from the newest stage-1 checkpoint in
WORKDIR/stage1 (read-only; a missing checkpoint or one of another architecture is refused). The
quantizer's codebook and the joint decoder stay frozen (they define the token and heatmap spaces
stage 1 learned; the optimizer state covers only the trained params); the rest trains with AdamW.
Reference tokens come from the frozen VAE encoder (training/vae.py). Data: pairs.PairSource pairs
(cross-identity, plus self pairs), the driving clip colour-jittered and cropped / scaled / padded,
the target never moved; the first stage2.self_pair_steps steps take the self pairs alone,
un-augmented (`phases`).

The ablations (`config.stage2.baselines`) train the same way on the same data order, each into
WORKDIR/stage2_<name>:
  self_attention         retargeter mode "self_attention" (X-UniMotion-style fusion, Table 6)
  conv                   ConvMotionEncoder instead of the 1D tokenizer, from scratch (Table 2 A)
  no_middle_supervision  no heatmap signal reaches the motion encoder or the retargeter (both stay
                         at their stage-1 / initial weights); only the joint head is fitted, as a
                         read-out probe of what M_ret carries without middle supervision.
  pose_indicator         Animate-X's Pose Indicator instead of the 1D tokenizer: the Implicit Pose
                         Indicator (keypoint queries cross-attending to CLIP ViT features of the
                         frame; the CLIP from model.pose_indicator.clip.init_from or from scratch)
                         reads the driving frames and keypoints, the Explicit Pose Indicator
                         (data_pipelines/epi.py, config.stage2.epi) realigns and rescales those
                         keypoints in training; the driving input is {"frames", "keypoints"}.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines import augment, epi, pipeline
from im_anim_jax import keypoints as kp
from im_anim_jax import sharding
from im_anim_jax.models.quantizer import codebook_stats
from im_anim_jax.models.stage2 import Stage2Model, build_stage2
from im_anim_jax.training import checkpointing, loop
from im_anim_jax.training import stage1 as stage1_training
from im_anim_jax.training import state as train_state
from im_anim_jax.training import vae as vae_training

STAGE = 2
MAIN = "main"
BASELINES = {
    "self_attention": lambda c: c.model.retargeter.update(dict(mode="self_attention")),
    "conv": lambda c: c.model.update(dict(motion_encoder="conv")),
    "no_middle_supervision": lambda c: c.stage2.update(dict(middle_supervision=False)),
    "pose_indicator": lambda c: c.model.update(dict(motion_encoder="pose_indicator")),
}


def variants(config) -> tuple[str, ...]:
    """"main" and the configured baselines, in training order."""
    unknown = [b for b in config.stage2.baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"config.stage2.baselines has unknown entries {unknown}; "
                         f"choose from {sorted(BASELINES)}")
    return (MAIN,) + tuple(config.stage2.baselines)


def variant_config(config, name: str) -> ml_collections.ConfigDict:
    """A copy of `config` with the overrides of baseline `name` ("main": none)."""
    c = config.copy_and_resolve_references()
    if name != MAIN:
        BASELINES[name](c)
    return c


def stage_dir(workdir: str, name: str = MAIN) -> str:
    return os.path.join(workdir, "stage2" if name == MAIN else f"stage2_{name}")


def trainable(config) -> tuple[str, ...]:
    """Top-level params updated by stage 2. `stage2.train_motion_encoder=False` keeps a stage-1
    motion encoder; the `conv` and `pose_indicator` encoders do not come from stage 1, so they
    train regardless."""
    if not config.stage2.middle_supervision:
        return ("joint_head",)
    if not config.stage2.train_motion_encoder and config.model.motion_encoder == "tokenizer":
        return ("retargeter", "joint_head")
    return ("motion_encoder", "retargeter", "joint_head")


def driving_input(config, frames, keypoints):
    """The driving input of `config`'s model: the frames [B, T, H, W, 3], or with the pose
    indicator {"frames", "keypoints" [B, T, J, 3]}."""
    if config.model.motion_encoder == "pose_indicator":
        return {"frames": frames, "keypoints": keypoints}
    return frames


def dummy_inputs(config, ref_dim: int, grid):
    s, t = config.model.motion_tokenizer.image_size, config.stage2.clip_frames
    driving = driving_input(config, jnp.zeros((1, t, s, s, 3), jnp.uint8),
                            jnp.zeros((1, t, config.model.joint_decoder.num_joints, 3)))
    return driving, jnp.zeros((1, grid[0] * grid[1], ref_dim), jnp.float32)


def abstract_params(model: Stage2Model, config, ref_dim: int, boxed: bool = False):
    out = jax.eval_shape(model.init, jax.random.key(0),
                         *dummy_inputs(config, ref_dim, model.grid))["params"]
    return out if boxed else nn.unbox(out)


def _trained(params: dict, config) -> dict:
    return {k: params[k] for k in trainable(config)}


def init_state(model: Stage2Model, tx, config, mesh, ref_dim: int):
    """Sharded TrainState (fresh init), its abstract twin and its shardings. `params` holds every
    parameter; the optimizer state only the trainable ones."""
    inputs = dummy_inputs(config, ref_dim, model.grid)
    return train_state.init_sharded(
        lambda key: nn.unbox(model.init(key, *inputs)["params"]),
        abstract_params(model, config, ref_dim, boxed=True), tx, mesh,
        sharding.rules(config.mesh), config.seed, trained=lambda p: _trained(p, config))


def from_stage1(state: train_state.TrainState, s1: dict, state_sh: train_state.TrainState, tx,
                config) -> train_state.TrainState:
    """`state` with every subtree it shares with stage 1 set to the stage-1 params: motion encoder,
    quantizer and joint decoder (the joint decoder only, with the conv motion encoder or the pose
    indicator, whose CLIP ViT comes from model.pose_indicator.clip.init_from when set). The same
    config builds both models, so shapes match."""
    params = dict(state.params)
    shared = ("motion_encoder", "quantize", "joint_decoder")
    if config.model.motion_encoder != "tokenizer":
        shared = ("joint_decoder",)
    for k in shared:
        params[k] = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), s1[k],
                                 state_sh.params[k])
    clip_from = (config.model.pose_indicator.clip.init_from
                 if config.model.motion_encoder == "pose_indicator" else "")
    if clip_from:
        params["motion_encoder"] = dict(params["motion_encoder"], clip=load_clip(
            clip_from, params["motion_encoder"]["clip"], state_sh.params["motion_encoder"]["clip"]))
    opt_state = jax.jit(tx.init, out_shardings=state_sh.opt_state)(_trained(params, config))
    return state.replace(params=params, opt_state=opt_state)


def load_clip(path: str, params: dict, shardings: dict) -> dict:
    """A converted CLIP vision checkpoint (`python -m im_anim_jax.convert clip-vit`) in place of
    `params` (cast to their dtypes, placed on `shardings`); a size mismatch names the params."""
    from im_anim_jax.convert import common
    loaded, meta = common.load_converted(path)
    if meta.get("kind") != "clip-vit":
        raise ValueError(f"model.pose_indicator.clip.init_from={path} holds a "
                         f"{meta.get('kind')!r} checkpoint; expected one written by "
                         f"`python -m im_anim_jax.convert clip-vit`")
    try:
        common.check_tree(loaded, params)
    except AssertionError as e:
        raise ValueError(f"model.pose_indicator.clip.init_from={path} does not fit "
                         f"config.model.pose_indicator.clip: {e}") from None
    return jax.tree.map(lambda x, p, s: jax.device_put(np.asarray(x).astype(p.dtype), s),
                        loaded, params, shardings)


def forward_metrics(model: Stage2Model, params, batch, ref_tokens, config):
    """Loss and metrics of one batch."""
    heatmaps, aux = model.apply({"params": params}, batch["driving"], ref_tokens)
    hm = stage1_training.heatmap_loss(heatmaps, batch["heatmaps"], batch["joint_weights"])
    size = config.model.joint_decoder.heatmap_size
    pred = kp.argmax_keypoints(jax.lax.stop_gradient(heatmaps), config.eval.subpixel)
    gt = kp.image_to_heatmap(batch["target_keypoints"][..., :2],
                             config.model.motion_tokenizer.image_size, size)
    pck = kp.pck(pred, gt, batch["joint_weights"], size, (0.1,))
    vq = aux["loss"] if config.stage2.middle_supervision else jnp.zeros((), jnp.float32)
    metrics = {"loss": hm + config.stage2.vq_loss_weight * vq, "heatmap_loss": hm,
               "vq_loss": vq, "train_pck@0.1": pck[0.1]}
    if "indices" in aux:  # code usage of the motion tokens: a collapse shows as perplexity -> 1
        metrics.update(codebook_stats(aux["indices"], config.model.quantizer.codebook_size))
    return metrics, heatmaps, aux


def make_train_step(model, tx, config, mesh, axis_rules, state_sh, ref_encoder):
    """(state, batch) -> (state, metrics): reference tokens from the frozen VAE encoder (its own
    jit), then one AdamW step."""
    def step(state: train_state.TrainState, batch, ref_tokens):
        trained = _trained(state.params, config)
        frozen = jax.lax.stop_gradient({k: v for k, v in state.params.items() if k not in trained})

        def loss_fn(trained):
            metrics, _, _ = forward_metrics(model, {**frozen, **trained}, batch, ref_tokens,
                                            config)
            return metrics["loss"], metrics

        return train_state.apply_gradients(state, tx, loss_fn, trained,
                                           tuple(config.faults.inject_nan_steps))

    keys = ("driving", "heatmaps", "joint_weights", "target_keypoints")
    batch_sh = sharding.batch_sharding(mesh)
    jitted = jax.jit(step, in_shardings=(state_sh, {k: batch_sh for k in keys}, batch_sh),
                     out_shardings=(state_sh, None), donate_argnums=0)

    def run_step(state, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
            return jitted(state, {k: batch[k] for k in keys}, ref_encoder(batch["reference"]))
    return run_step


def train_dataset(config, data_path: str, log=print, self_only: bool = False):
    """The variant's training batches: stage-2 pairs, the driving clip colour-jittered and
    cropped / scaled / padded; for the pose indicator its keypoints also transformed by the
    Explicit Pose Indicator (pose pool from the train split) and the driving input packed as
    {"frames", "keypoints"} (`driving_input`). `self_only`: the self pairs alone, un-augmented,
    so the target is the driving pose itself (the first stage2.self_pair_steps steps); the pose
    indicator keeps its Explicit Pose Indicator there, since it reads the driving keypoints,
    which would otherwise be the answer."""
    cfg = config.stage2
    clip_aug = None if self_only else augment.clip_augment(cfg.augment, supervise_original=True)
    pose_indicator = config.model.motion_encoder == "pose_indicator"
    if pose_indicator:
        pool = epi.pose_pool(data_path, "train", cfg.epi.pool_size, cfg.epi.pool_stride,
                             seed=config.seed)
        log(f"[stage2:pose_indicator] EPI: pose pool of {len(pool)} anchor clips, "
            f"transformation probability {cfg.epi.prob}")
        clip_aug = epi.explicit_pose_indicator(cfg.epi, pool, clip_aug)
    ds = pipeline.pair_train_dataset(
        data_path, "train", clip_frames=cfg.clip_frames,
        batch_size=cfg.batch_size // jax.process_count(), targets=stage1_training.targets(config),
        seed=config.seed, partners_per_clip=0 if self_only else cfg.partners_per_clip,
        self_pairs=self_only or cfg.self_pairs, augment=clip_aug,
        read_threads=config.data.read_threads,
        num_workers=config.data.num_workers, max_bad_records=config.faults.max_bad_records,
        log=log)
    if pose_indicator:
        ds = ds.map(lambda b: dict(b, driving=driving_input(config, b["driving"],
                                                            b["driving_keypoints"])))
    return ds


def train_variant(config, workdir: str, data_path: str, name: str, ref_encoder,
                  log=print) -> dict:
    """Trains (or resumes) one stage-2 variant into stage_dir(workdir, name)."""
    config = variant_config(config, name)
    cfg = config.stage2
    mesh = sharding.make_mesh(config.mesh)
    axis_rules = sharding.rules(config.mesh)
    sharding.check_batch_size(cfg.batch_size, mesh, "stage2.batch_size")
    model = build_stage2(config.model, ref_encoder.grid)
    tx = stage1_training.make_optimizer(cfg)
    state, abstract_state, state_sh = init_state(model, tx, config, mesh, ref_encoder.dim)
    directory = stage_dir(workdir, name)
    tag = "stage2" if name == MAIN else f"stage2:{name}"
    if checkpointing.latest_step(directory) is None:
        state = from_stage1(state, stage1_training.load_params(config, workdir)[1], state_sh, tx,
                           config)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    n_train = sum(int(np.prod(x.shape)) for k in trainable(config)
                  for x in jax.tree.leaves(state.params[k]))
    log(f"[{tag}] {n_params / 1e6:.2f}M params ({n_train / 1e6:.2f}M trained) on mesh "
        f"{dict(mesh.shape)}; reference grid {ref_encoder.grid}; {cfg.steps} steps of "
        f"{cfg.batch_size} pairs x {cfg.clip_frames} frames")
    meta = dict(checkpointing.meta_for(config, STAGE, state.params, trainable(config)),
                variant=name)
    train_step = make_train_step(model, tx, config, mesh, axis_rules, state_sh, ref_encoder)

    def run_phase(phase, first_step):
        end, self_only = phase
        if self_only:
            log(f"[{tag}] steps 1-{end}: self pairs alone, un-augmented (the target is the "
                f"driving pose; stage2.self_pair_steps)")
        # Each phase shuffles its own pairs; phase 2 restores phase 1's iterator position.
        return loop.run(
            name=tag, stage_dir=directory, state=state, abstract_state=abstract_state,
            train_step=train_step,
            data_iter=iter(train_dataset(config, data_path, log=log, self_only=self_only)),
            mesh=mesh, total_steps=end, log_every=cfg.log_every,
            checkpoint_every=cfg.checkpoint_every, ckpt_cfg=config.checkpoint,
            max_nonfinite_in_a_row=config.faults.max_nonfinite_in_a_row, meta=meta, log=log,
            console_keys=("loss", "heatmap_loss", "vq_loss", "train_pck@0.1",
                          "codebook_perplexity"), first_step=first_step)[1]

    return loop.run_phases(directory, phases(cfg), cfg.steps, run_phase)


def phases(cfg) -> list[tuple[int, bool]]:
    """(last step, self pairs alone) of each training phase: the self pairs alone, un-augmented,
    up to step `self_pair_steps` (the retargeter first learns to read the motion, a task it
    learns within the demo's steps), then every pair with the augmentation (the motion moved
    into the reference's framing)."""
    first = min(cfg.self_pair_steps, cfg.steps)
    return ([(first, True)] if first else []) + ([(cfg.steps, False)] if cfg.steps > first else [])


def train(config, workdir: str, data_path: str, log=print) -> dict:
    """The reference encoder (VAE, trained here unless model.vae.init_from), then stage 2's main
    model and every baseline. Returns {variant: last logged metrics}."""
    names = variants(config)
    vae_training.train(config, workdir, data_path, log=log)
    ref_encoder = vae_training.load_reference_encoder(config, workdir)
    return {n: train_variant(config, workdir, data_path, n, ref_encoder, log=log) for n in names}
