"""The reference encoder of stage 2: the Wan2.2 VAE encoder, and the training of that VAE.

T_ref: identity image [H, W, 3] -> VAE encoder (image mode: one causal first frame) -> normalised
mean latent [1, H/16, W/16, z] -> 2x2 patches -> T_ref [Hp * Wp, 4 z] on the row-major patch grid
(Hp, Wp) = (H/32, W/32). The weights are a converted Wan2.2 VAE (`config.model.vae.init_from`,
written by `python -m im_anim_jax.convert wan-vae ...`) or, without one, the configured VAE trained
here on the run's train split (reconstruction + KL) into WORKDIR/vae: single frames for
`vae_training.image_steps`, then clips of `clip_frames` = 1 + 4k frames. Stage 3 encodes and
decodes whole clips, so the VAE's temporal path (the earlier taps of its causal convs, the time
down/up-sampling) must learn too: trained on single frames alone, the demo VAE reconstructs
held-out frames at 21.4 dB PSNR* but frames 1-16 of a clip at 14.7.
"""
from __future__ import annotations

import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import pipeline
from im_anim_jax import sharding
from im_anim_jax.convert import common
from im_anim_jax.models.stage1 import to_unit_range
from im_anim_jax.models.wan import vae
from im_anim_jax.training import checkpointing, loop, stage1
from im_anim_jax.training import state as train_state

STAGE = "vae"
ENCODER_PARAMS = ("encoder", "conv1")  # all that WanVAE.encode uses
CONVERTED_KINDS = ("wan-vae", "wan_vae")  # the converter's CLI kind and its module's name
MISSING_HINT = ("train it first (`python train.py --config ... --workdir ... --stages 2` trains "
                "the VAE before stage 2), or set config.model.vae.init_from to a converted Wan2.2 "
                "VAE (`python -m im_anim_jax.convert wan-vae --src Wan2.2_VAE.pth --dst DIR`)")


def video_size(config) -> tuple[int, int]:
    """(H, W) of the reference image and generated clip: model.video_size, or (0, 0) for the
    driving frames' square model.motion_tokenizer.image_size."""
    h, w = (int(x) for x in config.model.video_size)
    if (h, w) == (0, 0):
        s = int(config.model.motion_tokenizer.image_size)
        return s, s
    return h, w


def check_reference_size(config) -> None:
    """ValueError unless the reference image / clip size (video_size) is a multiple of 2x the
    VAE's spatial compression in both sides (32 for Wan2.2: 16x, then 2x2 patches)."""
    h, w = video_size(config)
    patch = config.model.retargeter.reference_patch
    if patch < 1:
        raise ValueError(f"model.retargeter.reference_patch must be >= 1, got {patch}")
    compression = vae.build_vae(config.model.vae).space_factor
    factor = patch * compression
    if h % factor or w % factor or min(h, w) <= 0:
        raise ValueError(f"reference images of {h}x{w} (model.video_size, or "
                         f"model.motion_tokenizer.image_size square) cannot be encoded: H and W "
                         f"must be positive multiples of {factor} (the VAE's {compression}x "
                         f"compression, then {patch}x{patch} patches)")


def reference_tokens(latents, patch: int = 2):
    """Latents [B, 1, h, w, z] -> T_ref [B, (h/p) (w/p), p^2 z]: p x p patches (p = 2: the
    DiT's) in row-major order; channel (p i + j) z + c holds channel c of the patch's latent
    pixel (row i, column j), the layout of the DiT's patch tokens (not vae.patchify's
    channel-major one)."""
    b, t, h, w, z = latents.shape
    if t != 1 or h % patch or w % patch:
        raise ValueError(f"reference_tokens expects latents [B, 1, h, w, z] with h, w divisible "
                         f"by {patch}; got {tuple(latents.shape)}")
    x = latents.reshape(b, h // patch, patch, w // patch, patch, z).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * z)


class ReferenceEncoder(flax.struct.PyTreeNode):
    """Frozen VAE encoder: uint8 images [B, H, W, 3] (or floats in [0, 1]) -> float32 T_ref
    [B, Hp * Wp, 4 z]. A pytree (params are its leaves): close over it or pass it to jit."""
    params: dict
    model: vae.WanVAE = flax.struct.field(pytree_node=False)
    image_size: tuple = flax.struct.field(pytree_node=False)  # (H, W)
    patch: int = flax.struct.field(pytree_node=False, default=2)  # latent pixels per token side

    @property
    def grid(self) -> tuple[int, int]:
        """(Hp, Wp): T_ref's row-major patch grid."""
        factor = self.patch * self.model.space_factor
        return self.image_size[0] // factor, self.image_size[1] // factor

    @property
    def dim(self) -> int:
        """Channels of a token: patch^2 z."""
        return self.patch ** 2 * self.model.z_dim

    def __call__(self, images):
        """images [B, H, W, 3] -> T_ref [B, Hp * Wp, 4 z] float32 (no gradient)."""
        if tuple(images.shape[1:]) != (*self.image_size, 3):
            raise ValueError(f"reference images must be [B, {self.image_size[0]}, "
                             f"{self.image_size[1]}, 3], got {tuple(images.shape)}")
        return _encode_reference(self, images)


@jax.jit
def _encode_reference(encoder: ReferenceEncoder, images):
    video = to_unit_range(images)[:, None] * 2.0 - 1.0
    latents = encoder.model.apply({"params": encoder.params}, video, method=vae.WanVAE.encode)
    return jax.lax.stop_gradient(reference_tokens(latents, encoder.patch))


def encode_video(encoder: ReferenceEncoder, video):
    """video [B, 1 + 4k, H, W, 3] (uint8 or [0, 1]) -> normalised latents [B, 1 + k, h, w, z]
    float32 with the frozen encoder (no gradient)."""
    vae.check_video(encoder.model, video.shape)
    return _encode_video(encoder, video)


@jax.jit
def _encode_video(encoder: ReferenceEncoder, video):
    x = to_unit_range(video) * 2.0 - 1.0
    return jax.lax.stop_gradient(encoder.model.apply({"params": encoder.params}, x,
                                                     method=vae.WanVAE.encode))


def abstract_params(model: vae.WanVAE, mesh, axis_rules) -> tuple[dict, dict]:
    """(ShapeDtypeStructs, NamedShardings) of the VAE's params on `mesh`."""
    s = model.space_factor
    video = jax.ShapeDtypeStruct((1, 1, s, s, 3), jnp.float32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), video)["params"]
    return nn.unbox(boxed), sharding.param_shardings(boxed, mesh, axis_rules)


def _load_converted(path: str, abstract: dict, shardings: dict) -> dict:
    """Params of a converted Wan2.2 VAE checkpoint, checked against `abstract` (ValueError),
    placed on `shardings`."""
    loaded, meta = common.load_converted(path)
    if meta.get("kind") not in CONVERTED_KINDS:
        raise ValueError(f"model.vae.init_from={path} holds a {meta.get('kind')!r} checkpoint; "
                         f"expected one written by `python -m im_anim_jax.convert wan-vae`")
    try:
        common.check_tree(loaded, abstract)
    except AssertionError as e:
        raise ValueError(f"model.vae.init_from={path} does not fit config.model.vae: {e}") from None
    return jax.tree.map(lambda x, a, s: jax.device_put(np.asarray(x).astype(a.dtype), s),
                        loaded, abstract, shardings)


def load_vae(config, workdir: str) -> tuple[vae.WanVAE, dict]:
    """(model, params) of the run's VAE on the config's mesh: model.vae.init_from, else the newest
    checkpoint in WORKDIR/vae (FileNotFoundError if none; ValueError if it does not fit)."""
    check_reference_size(config)
    model = vae.build_vae(config.model.vae, config.model.dtype, config.model.attention_impl)
    abstract, shardings = abstract_params(model, sharding.make_mesh(config.mesh),
                                          sharding.rules(config.mesh))
    if config.model.vae.init_from:
        return model, _load_converted(config.model.vae.init_from, abstract, shardings)
    params, _ = checkpointing.restore_checked_params(
        os.path.join(workdir, "vae"), checkpointing.abstract_like(abstract, shardings), "VAE",
        MISSING_HINT)
    return model, params


def load_reference_encoder(config, workdir: str) -> ReferenceEncoder:
    """The frozen reference encoder of `config` (load_vae's encoder half)."""
    return reference_encoder(config, *load_vae(config, workdir))


def reference_encoder(config, model: vae.WanVAE, params: dict) -> ReferenceEncoder:
    """ReferenceEncoder over the encoder half of already loaded VAE params."""
    encoder_params = {k: params[k] for k in ENCODER_PARAMS}  # the decoder is not needed
    return ReferenceEncoder(params=encoder_params, model=model, image_size=video_size(config),
                            patch=int(config.model.retargeter.reference_patch))


def losses(module: vae.WanVAE, video, key, kl_weight: float) -> dict:
    """Use as model.apply(..., method=losses). video [B, 1 + 4k, H, W, 3] in [-1, 1], `key` for the
    latent sample -> scalar metrics: loss = L1 + MSE of the reconstruction from z = mu + sigma eps
    + kl_weight * KL(N(mu, sigma^2) || N(0, 1)) of the raw latent (all means over elements)."""
    vae.check_video(module, video.shape)
    x = module.encoder(vae.patchify(video.astype(module.dtype), module.patch_size), True)
    mu, logvar = jnp.split(module.conv1(x).astype(jnp.float32), 2, axis=-1)
    logvar = jnp.clip(logvar, -30.0, 20.0)
    z = mu + jnp.exp(0.5 * logvar) * jax.random.normal(key, mu.shape)
    mean, inv_std = vae.latent_stats(module.z_dim)
    recon = module.decode((z - mean) * inv_std)  # decode's input convention: normalised latents
    err = recon - video
    l1, mse = jnp.mean(jnp.abs(err)), jnp.mean(err ** 2)
    kl = 0.5 * jnp.mean(mu ** 2 + jnp.exp(logvar) - 1.0 - logvar)
    # PSNR on [0, 1] pixels (half the [-1, 1] error) per clip, averaged over clips.
    clipped = (jax.lax.stop_gradient(jnp.clip(recon, -1.0, 1.0)) - video) / 2.0
    psnr = jnp.mean(-10.0 * jnp.log10(jnp.maximum(jnp.mean(clipped ** 2, axis=(1, 2, 3, 4)),
                                                  1e-10)))
    return {"loss": l1 + mse + kl_weight * kl, "l1": l1, "mse": mse, "kl": kl, "psnr": psnr}


def init_state(model: vae.WanVAE, tx, config, mesh):
    """Sharded TrainState, its abstract twin (for restores) and its shardings."""
    s = model.space_factor
    video = jnp.zeros((1, 1, s, s, 3), jnp.float32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), video)["params"]
    return train_state.init_sharded(lambda key: nn.unbox(model.init(key, video)["params"]), boxed,
                                    tx, mesh, sharding.rules(config.mesh), config.seed)


def make_train_step(model, tx, kl_weight: float, mesh, axis_rules, state_sh,
                    inject_nan_steps=()):
    """jit(step)(state, batch) -> (state, metrics); batch["frames"] [B, 1 + 4k, H, W, 3] uint8."""

    def step(state: train_state.TrainState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        video = to_unit_range(batch["frames"]) * 2.0 - 1.0

        def loss_fn(params):
            metrics = model.apply({"params": params}, video, key, kl_weight, method=losses)
            return metrics["loss"], metrics

        return train_state.apply_gradients(state, tx, loss_fn, state.params, inject_nan_steps)

    jitted = jax.jit(step, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                     out_shardings=(state_sh, None), donate_argnums=0)

    def run_step(state, batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
            return jitted(state, batch)
    return run_step


def phases(cfg) -> list[tuple[int, int, int]]:
    """(last step, frames per clip, clips per batch) of each training phase: single frames up to
    step `image_steps` (Wan's VAE also learns on images first), then clips of `clip_frames`."""
    out = [(min(cfg.image_steps, cfg.steps), 1, cfg.batch_size)] if cfg.image_steps else []
    if cfg.steps > cfg.image_steps:
        out.append((cfg.steps, cfg.clip_frames, cfg.clip_batch_size))
    return out


def train(config, workdir: str, data_path: str, log=print) -> dict:
    """Trains (or resumes) the configured VAE into WORKDIR/vae on the train split (`phases`);
    nothing when model.vae.init_from names a converted VAE. Returns the last logged metrics."""
    if config.model.vae.init_from:
        log(f"[vae] not trained: the reference encoder uses {config.model.vae.init_from}")
        return {}
    cfg = config.vae_training
    check_reference_size(config)  # frames the reference encoder cannot take: fail early
    mesh = sharding.make_mesh(config.mesh)
    axis_rules = sharding.rules(config.mesh)
    for field in ("batch_size", "clip_batch_size"):
        sharding.check_batch_size(cfg[field], mesh, f"vae_training.{field}")
    model = vae.build_vae(config.model.vae, config.model.dtype, config.model.attention_impl)
    tx = stage1.make_optimizer(cfg)
    state, abstract_state, state_sh = init_state(model, tx, config, mesh)
    train_step = make_train_step(model, tx, cfg.kl_weight, mesh, axis_rules, state_sh,
                                 tuple(config.faults.inject_nan_steps))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    size = config.model.motion_tokenizer.image_size
    stage_dir = os.path.join(workdir, "vae")

    def run_phase(phase, first_step):
        end, frames, batch_size = phase
        # One shuffled order throughout: a phase resumes the previous phase's data position.
        data_iter = iter(pipeline.train_dataset(
            data_path, "train", clip_frames=frames,
            batch_size=batch_size // jax.process_count(), targets=stage1.targets(config),
            seed=config.seed, read_threads=config.data.read_threads,
            num_workers=config.data.num_workers, max_bad_records=config.faults.max_bad_records))
        log(f"[vae] {n_params / 1e6:.2f}M params on mesh {dict(mesh.shape)}; up to step {end} of "
            f"{cfg.steps}: batches of {batch_size} x {frames} frame(s) {size}x{size}")
        return loop.run(
            name="vae", stage_dir=stage_dir, state=state, abstract_state=abstract_state,
            train_step=train_step, data_iter=data_iter, mesh=mesh, total_steps=end,
            log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
            ckpt_cfg=config.checkpoint,
            max_nonfinite_in_a_row=config.faults.max_nonfinite_in_a_row,
            meta=checkpointing.meta_for(config, STAGE, state.params), log=log,
            console_keys=("loss", "l1", "kl", "psnr"), first_step=first_step)[1]

    return loop.run_phases(stage_dir, phases(cfg), cfg.steps, run_phase)
