"""Generation: a reference image + a driving video -> that identity performing the motion.

The driving video (any length T) is padded at the end (its last frame repeated) to whole
windows of stage3.clip_frames = 1 + 4m frames. The retargeted motion M_ret is computed once over
the whole padded video (one latent frame per 4 video frames); window w starts at video frame
s_w = w (clip - k), k = sampling.overlap_frames = 1 + 4j, and takes M_ret's latent frames
s_w/4 .. s_w/4 + m (its latent frame 0 is global latent frame s_w/4, whose last video frame is
s_w). Each window is sampled as its own clip [z_ref ++ 1 + m latent frames]: z_ref (the reference
image's latent) is held clean with t = 0, and for w > 0 the first 1 + j latent frames are the
VAE encoding of the last k frames already generated, held clean the same way (stage 3 trains
with such held prefixes). The window is decoded (streaming, one latent frame at a time) and its
first k frames (w > 0) dropped. Expression tokens come from face crops around the driving
keypoints, read by the stage-1 model unless given.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from im_anim_jax import keypoints as kp
from im_anim_jax import sampling, text
from im_anim_jax.models.retargeter import num_latent_frames
from im_anim_jax.models.wan import vae as vae_lib
from im_anim_jax.training import stage1 as stage1_training
from im_anim_jax.training import stage3 as stage3_training
from im_anim_jax.training import vae as vae_training


def windows(num_frames: int, clip: int, overlap: int) -> tuple[int, list[int]]:
    """(padded frame count, window starts) covering `num_frames` with windows of `clip` frames
    that overlap by `overlap`; a video shorter than a clip gets one window of 1 + 4n frames."""
    if num_frames < 1:
        raise ValueError("the driving video has no frames")
    if num_frames <= clip:
        return 1 + 4 * -(-(num_frames - 1) // 4), [0]
    stride = clip - overlap
    n = 1 + -(-(num_frames - clip) // stride)
    return clip + (n - 1) * stride, [w * stride for w in range(n)]


def resolution(config) -> tuple[int, int]:
    """(H, W) of the reference image and driving frames the generator takes."""
    size = int(config.model.motion_tokenizer.image_size)
    return size, size


class Animator:
    """A trained run's generator: `Animator.from_workdir(config, workdir)(reference, driving)`."""

    def __init__(self, config, model, params, vae_model, vae_params, encoder, keypoint_reader,
                 step: int = 0):
        self.config, self.model, self.params, self.step = config, model, params, step
        self.vae_model, self.vae_params, self.encoder = vae_model, vae_params, encoder
        self.read_keypoints = keypoint_reader
        self._m_ret = jax.jit(lambda p, f, r: model.apply({"params": p}, f, r,
                                                          method="retarget")[1]["m_ret"])
        self._expressions = jax.jit(lambda p, f, k: model.apply({"params": p}, f, k,
                                                                method="expressions"))
        self._velocity = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method="velocity"))
        self.context = jnp.asarray(text.context(config))
        self.negative_context = jnp.asarray(text.negative_context(config))
        self.overlap = config.sampling.overlap_frames
        self.held = stage3_training.overlap_latents(config)
        self.resolution = resolution(config)

    @classmethod
    def from_workdir(cls, config, workdir: str, step: int | None = None) -> "Animator":
        """Loads the VAE, the stage-3 model of checkpoint `step` (default the newest; EMA params
        where kept) and the stage-1 keypoint reader of a run (FileNotFoundError / ValueError
        naming what is missing or mismatched)."""
        vae_model, vae_params = vae_training.load_vae(config, workdir)
        encoder = vae_training.reference_encoder(config, vae_model, vae_params)
        model, params, step = stage3_training.load_params(config, workdir, encoder, step)
        s1_model, s1_params, _ = stage1_training.load_params(config, workdir)
        return cls(config, model, params, vae_model, vae_params, encoder,
                   keypoint_reader(s1_model, s1_params, config), step)

    @property
    def clip_frames(self) -> int:
        return self.config.stage3.clip_frames

    def __call__(self, reference, driving, *, seed: int = 0, progress: bool = True,
                 keypoints=None, params=None):
        """reference [H, W, 3], driving [T, H, W, 3] (float [0, 1] or uint8) -> float32
        [T, H, W, 3] in [0, 1]. `keypoints` [T, J, 3] (pixels): the driving keypoints (default:
        read by the stage-1 model); `params`: other stage-3 params (e.g. a baseline's)."""
        self._check(reference, driving, keypoints, batched=False)  # its own shapes in errors
        out = self.generate(np.asarray(reference)[None], np.asarray(driving)[None], seed=seed,
                            progress=progress,
                            keypoints=None if keypoints is None else np.asarray(keypoints)[None],
                            params=params)
        return out[0]

    def generate(self, reference, driving, *, seed: int = 0, progress: bool = False,
                 keypoints=None, params=None):
        """Batched __call__: reference [B, H, W, 3], driving [B, T, H, W, 3] -> [B, T, H, W, 3].
        Element i samples with seed + i, so a clip's video does not depend on the batch it is in
        (callers pass seed + the index of the batch's first clip)."""
        params = self.params if params is None else params
        reference, driving = _unit(reference, "reference image"), _unit(driving, "driving video")
        self._check(reference, driving, keypoints)
        t = driving.shape[1]
        if keypoints is not None:
            keypoints = np.asarray(keypoints, np.float32)
        padded, starts = windows(t, self.clip_frames, self.overlap)
        driving = np.concatenate([driving, np.repeat(driving[:, -1:], padded - t, 1)], 1)
        if keypoints is None:
            keypoints = self.read_keypoints(driving)
        else:
            keypoints = np.concatenate([keypoints, np.repeat(keypoints[:, -1:], padded - t, 1)], 1)
        z_ref = vae_training.encode_video(self.encoder, jnp.asarray(reference)[:, None])
        ref_tokens = vae_training.reference_tokens(z_ref, self.encoder.patch)
        m_ret = self._m_ret(params, jnp.asarray(driving), ref_tokens)  # [B, F_all, P, D]
        keys = [jax.random.key(seed + i) for i in range(reference.shape[0])]
        video = []
        for w, s in enumerate(starts):
            clip = min(self.clip_frames, padded)
            frames = slice(s, s + clip)
            prefix = None if w == 0 else vae_training.encode_video(
                self.encoder, jnp.asarray(np.concatenate(video, 1)[:, -self.overlap:]))
            latents = self._sample_window(
                params, [jax.random.fold_in(k, w) for k in keys], z_ref,
                m_ret[:, s // 4:s // 4 + num_latent_frames(clip)],
                jnp.asarray(driving[:, frames]), jnp.asarray(keypoints[:, frames]), prefix,
                progress, f"window {w + 1}/{len(starts)}")
            out = np.asarray(vae_lib.decode(self.vae_model, self.vae_params, latents[:, 1:],
                                            chunked=True))
            video.append((out[:, 0 if w == 0 else self.overlap:] + 1.0) / 2.0)  # -> [0, 1]
        return np.concatenate(video, 1)[:, :t]

    def reconstruct(self, video):
        """video [B, 1 + 4k, H, W, 3] (uint8 or [0, 1]) -> its VAE reconstruction, float32 in
        [0, 1]: encoded (posterior mean) and decoded as generation decodes, the best any sample
        of the latent generator can be."""
        latents = vae_training.encode_video(self.encoder, jnp.asarray(_unit(video, "video")))
        out = vae_lib.decode(self.vae_model, self.vae_params, latents, chunked=True)
        return (np.asarray(out) + 1.0) / 2.0

    def _sample_window(self, params, keys, z_ref, m_ret, frames, kps, prefix, progress, desc):
        """Latents [B, 1 + F, h, w, z] of one window (frame 0 = z_ref, then `prefix` held);
        keys: one per batch element, for its noise."""
        b, f = m_ret.shape[:2]
        shape = (b, 1 + f) + z_ref.shape[2:]
        held = np.zeros(1 + f, bool)
        held[0] = True
        clean = jnp.zeros(shape, jnp.float32).at[:, :1].set(z_ref)
        if prefix is not None:
            held[1:1 + prefix.shape[1]] = True
            clean = clean.at[:, 1:1 + prefix.shape[1]].set(prefix)
        expression = self._expressions(params, frames, kps)
        expression = jnp.concatenate([jnp.zeros_like(expression[:, :1]), expression], 1)
        control = jnp.concatenate([jnp.zeros_like(m_ret[:, :1]), m_ret], 1)
        control = control.reshape(b, -1, control.shape[-1])
        mask = jnp.asarray(held)[None, :, None, None, None]
        per_frame = control.shape[1] // (1 + f)
        cfg = self.config.sampling
        context, negative = (jnp.broadcast_to(c, (b, *c.shape))
                             for c in (self.context, self.negative_context))

        sigmas, timesteps = sampling.schedule(cfg.method, cfg.steps, cfg.shift)
        step_of = {float(s): i for i, s in enumerate(sigmas[:-1])}

        def per_token(value):  # 0 on held latent frames -> [B, L]
            v = jnp.where(jnp.asarray(held), 0.0, value)
            return jnp.broadcast_to(jnp.repeat(v, per_frame)[None], (b, (1 + f) * per_frame))

        def velocity(x, sigma, cond: bool):
            t = per_token(float(timesteps[step_of[sigma]]))
            return self._velocity(params, x, t, context if cond else negative,
                                  control, expression, per_token(sigma))

        noise = jnp.concatenate([jax.random.normal(k, (1,) + shape[1:], jnp.float32)
                                 for k in keys])
        return sampling.sample(
            sampling.guided(velocity, cfg.guidance), noise, sigmas, method=cfg.method,
            clamp=lambda x: jnp.where(mask, clean, x), progress=progress, desc=desc)

    def _check(self, reference, driving, keypoints, batched: bool = True):
        """ValueError naming the shape given and the one expected ((B, ...) where `batched`)."""
        (h, w), lead = self.resolution, 1 if batched else 0
        b, what = ("B, ", "s") if batched else ("", "")
        reference, driving = np.shape(reference), np.shape(driving)
        if len(reference) != 3 + lead or reference[lead:] != (h, w, 3):
            raise ValueError(f"reference image{what} {'have' if batched else 'has'} shape "
                             f"{reference}; expected ({b}{h}, {w}, 3) (the model's resolution)")
        if len(driving) != 4 + lead or driving[lead + 1:] != (h, w, 3) or driving[lead] < 1:
            raise ValueError(f"driving video{what} {'have' if batched else 'has'} shape "
                             f"{driving}; expected ({b}T >= 1, {h}, {w}, 3)")
        if batched and reference[0] != driving[0]:
            raise ValueError(f"{reference[0]} references for {driving[0]} videos")
        want = driving[:lead + 1] + (self.config.model.joint_decoder.num_joints, 3)
        if keypoints is not None and np.shape(keypoints) != want:
            raise ValueError(f"driving keypoints have shape {np.shape(keypoints)}; expected "
                             f"{want}: (x, y, confidence) in pixels per joint and frame")


def _unit(x, what: str) -> np.ndarray:
    """uint8 (0-255) or float frames in [0, 1] -> float32 in [0, 1] (ValueError otherwise)."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not jnp.issubdtype(x.dtype, jnp.floating):  # bf16 too
        raise ValueError(f"{what} has dtype {x.dtype}; expected uint8 (0-255) or float in [0, 1]")
    x = x.astype(np.float32)
    if x.size and not (np.min(x) >= -1e-3 and np.max(x) <= 1.0 + 1e-3):  # NaN fails too
        raise ValueError(f"{what} has values in [{np.min(x):.4g}, {np.max(x):.4g}]; float frames "
                         f"must lie in [0, 1] (uint8 frames: 0-255)")
    return np.clip(x, 0.0, 1.0)


def keypoint_reader(model, params, config):
    """frames [B, T, H, W, 3] in [0, 1] -> keypoints [B, T, J, 3] (pixels; confidence = the
    heatmap peak) read by the stage-1 model, decoded as stages 1-2 evaluate (eval.subpixel)."""
    size = config.model.motion_tokenizer.image_size
    hm_size = config.model.joint_decoder.heatmap_size

    @jax.jit
    def read(frames):
        heatmaps, _ = model.apply({"params": params}, frames)
        xy = kp.heatmap_to_image(kp.argmax_keypoints(heatmaps, config.eval.subpixel), size,
                                 hm_size)
        return jnp.concatenate([xy, jnp.max(heatmaps, axis=(-2, -1))[..., None]], -1)
    return lambda frames: np.asarray(read(jnp.asarray(frames)))
