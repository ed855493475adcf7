"""Stage 3: the Wan2.2 DiT driven by the retargeted motion and the driving expressions.

    frames [B, T, H, W, 3] ++ T_ref --stage-2 model--> M_ret [B, F, P, D], heatmaps (L_retarget)
    face crops of frames --expression encoder--> [B, T, N, D_e] --per latent frame--> [B, F, 4N, D_e]
    DiT( [z_ref ++ z_t] [B, 1 + F, h, w, z], t per token, text, control = [0 ++ M_ret],
         expression = [0 ++ E] ) -> velocity [B, 1 + F, h, w, z]

Latent frame 0 is the reference image's own latent (a one-frame VAE clip), held clean with t = 0
as TI2V holds its first frame; frames 1..F are the video being generated (F = 1 + (T-1)/4, a clip
of its own for the VAE). It gets zero control and zero expression tokens. M_ret's grid is the
DiT's patch grid (retargeter.reference_patch = the DiT's patch), and each M_ret token's
D = pt ph pw c channels are the c control channels of its patch's latent pixels. With
`reference_control` (model.reference_control), z more control channels per latent pixel, after
M_ret's, carry z_ref (latent frame 0) to every generated frame (zeros for latent frame 0). With
`prediction="x0"` (model.dit_prediction) the DiT's output is read as the clean latent and turned
into the velocity (x_t - x0) / max(sigma, MIN_SIGMA), so sampler and loss are unchanged; with
`"x0_residual"` the clean latent is z_ref + the output (a fresh, zero-init head: the still
reference on every frame).

Parameter names: the stage-2 model's at the top level (`motion_encoder`, `quantize`,
`retargeter`, `joint_head`, `joint_decoder`), plus `dit` and `expression_encoder`.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections

from im_anim_jax.models import expression as expr_lib
from im_anim_jax.models.stage1 import to_unit_range
from im_anim_jax.models.stage2 import Stage2Model, build_stage2
from im_anim_jax.models.wan.dit import WanDiT, build_dit


class Stage3Model(Stage2Model):
    dit: WanDiT | None = None
    expression_encoder: expr_lib.ExpressionEncoder | None = None
    crop_size: int = 0
    reference_control: bool = False
    prediction: str = "velocity"

    def expressions(self, frames, keypoints):
        """frames [B, T, H, W, 3] (uint8 or [0, 1]), keypoints [B, T, J, 3] (pixels) ->
        expression tokens per latent frame [B, F, 4 N, D_e]."""
        crops = expr_lib.crop_faces(to_unit_range(frames), keypoints, self.crop_size)
        return expr_lib.latent_frame_tokens(self.expression_encoder(crops))

    def retarget(self, frames, reference):
        """The stage-2 model: -> heatmaps [B, T, J, Hh, Wh], aux (with `m_ret` [B, F, P, D])."""
        return Stage2Model.__call__(self, frames, reference)

    def conditions(self, frames, keypoints, reference):
        """(control [B, (1 + F) P, D], expression [B, 1 + F, 4 N, D_e]) for the DiT, with the
        reference latent frame's zeros in front, and the stage-2 outputs (heatmaps, aux)."""
        heatmaps, aux = self.retarget(frames, reference)
        m_ret = aux["m_ret"]
        control = jnp.concatenate([jnp.zeros_like(m_ret[:, :1]), m_ret], 1)
        e = self.expressions(frames, keypoints)
        e = jnp.concatenate([jnp.zeros_like(e[:, :1]), e], 1)
        return control.reshape(control.shape[0], -1, control.shape[-1]), e, heatmaps, aux

    def velocity(self, latents, t, context, control, expression, sigma=None):
        """The DiT alone: latents [B, 1 + F, h, w, z], t [B, L], control [B, L, D] -> velocity
        like latents (with reference_control, z_ref = latents[:, 0] joins the control).

        x0 predictions become velocities by `x0_velocity` with the noise level per token:
        `sigma` [B, L] (a sampler's exact levels, whose t is rounded to an integer; 0 marks held
        tokens) or, by default, t / 1000 (training)."""
        if self.reference_control:
            control = with_reference(control, latents[:, :1], self.dit.patch_size)
        out = self.dit(latents, t, context, control, expression)
        if self.prediction == "velocity":
            return out
        if self.prediction == "x0_residual":  # x0 = z_ref + out on every latent frame
            out = out + latents[:, :1]
        if sigma is None:
            sigma = t.astype(jnp.float32) / 1000.0
        else:  # exact where generated, not t's integer rounding
            sigma = jnp.where(sigma > 0, sigma, 1.0).astype(jnp.float32)
        return x0_velocity(latents, out, token_sigma(sigma, latents.shape, self.dit.patch_size))

    def __call__(self, frames, keypoints, reference, latents, t, context):
        """Driving frames/keypoints [B, T, ...], T_ref [B, P, C_ref], latents [B, 1 + F, h, w, z],
        t [B, L], context [B, text_len, text_dim] -> (velocity, heatmaps, aux)."""
        control, e, heatmaps, aux = self.conditions(frames, keypoints, reference)
        return self.velocity(latents, t, context, control, e), heatmaps, aux


def with_reference(control, z_ref, patch: tuple):
    """control [B, (1 + F) P, pt ph pw c] (the DiT's token and channel order), z_ref [B, 1, h, w,
    z] -> [B, (1 + F) P, pt ph pw (c + z)]: each latent pixel's c channels, then z_ref's z at that
    pixel (zeros on latent frame 0, the reference itself). pt = 1."""
    b, n, _ = control.shape
    _, _, h, w, z = z_ref.shape
    _, ph, pw = patch
    p = (h // ph) * (w // pw)
    ref = z_ref.reshape(b, h // ph, ph, w // pw, pw, z).transpose(0, 1, 3, 2, 4, 5)
    ref = ref.reshape(b, 1, p, ph * pw, z).astype(control.dtype)
    later = jnp.broadcast_to(ref, (b, n // p - 1, p, ph * pw, z))
    ref = jnp.concatenate([jnp.zeros_like(ref), later], axis=1).reshape(b, n, ph * pw, z)
    control = control.reshape(b, n, ph * pw, -1)
    return jnp.concatenate([control, ref], -1).reshape(b, n, -1)


MIN_SIGMA = 0.05  # the floor of x0_velocity's noise level


def x0_velocity(x, x0, sigma):
    """The velocity (x - x0) / max(sigma, MIN_SIGMA) of an x0 prediction at noise level sigma
    (broadcast against x), in training and sampling alike. Under the floor the loss-optimal
    output is x - MIN_SIGMA v, not x0, so a sampler that divided by the exact sigma there would
    scale the velocity by MIN_SIGMA / sigma (tests/test_sampling.py)."""
    return (x - x0) / jnp.maximum(sigma, MIN_SIGMA)


def token_sigma(sigma, shape: tuple, patch: tuple):
    """sigma [B, L] per patch token -> per latent pixel [B, F, h, w, 1]."""
    b, f, h, w, _ = shape
    _, ph, pw = patch
    s = sigma.reshape(b, f, h // ph, 1, w // pw, 1)
    return jnp.broadcast_to(s, (b, f, h // ph, ph, w // pw, pw)).reshape(b, f, h, w, 1)


def motion_control_dim(model_cfg: ml_collections.ConfigDict) -> int:
    """M_ret's control channels per latent pixel: retargeter.out_dim / (pt ph pw); ValueError
    unless the retargeter's grid is the DiT's patch grid and out_dim divides evenly."""
    patch = tuple(model_cfg.dit.patch_size)
    if patch[0] != 1 or patch[1] != patch[2] or patch[1] != model_cfg.retargeter.reference_patch:
        raise ValueError(f"stage 3 needs the retargeter's grid on the DiT's patch grid: "
                         f"model.retargeter.reference_patch={model_cfg.retargeter.reference_patch}"
                         f" must equal the DiT's spatial patch, dit.patch_size={patch} (1, p, p)")
    if model_cfg.retargeter.output_frames != "latent":
        raise ValueError("stage 3 needs model.retargeter.output_frames='latent' (one M_ret frame "
                         f"per latent frame), got {model_cfg.retargeter.output_frames!r}")
    out = model_cfg.retargeter.out_dim
    if out % math.prod(patch):
        raise ValueError(f"model.retargeter.out_dim={out} must be a multiple of the DiT patch "
                         f"volume {math.prod(patch)} (its channels fill each patch's pixels)")
    return out // math.prod(patch)


def control_dim(model_cfg: ml_collections.ConfigDict) -> int:
    """The DiT's control channels per latent pixel: M_ret's, plus z with
    model.reference_control."""
    return motion_control_dim(model_cfg) + (model_cfg.dit.in_dim if model_cfg.reference_control
                                            else 0)


def check_prediction(model_cfg: ml_collections.ConfigDict) -> None:
    """ValueError unless model.dit_prediction is 'velocity', 'x0' or 'x0_residual'."""
    if model_cfg.dit_prediction not in ("velocity", "x0", "x0_residual"):
        raise ValueError(f"model.dit_prediction must be 'velocity' (Wan2.2's), 'x0' or "
                         f"'x0_residual', got {model_cfg.dit_prediction!r}")


def build_stage3(model_cfg: ml_collections.ConfigDict, grid: tuple[int, int]) -> Stage3Model:
    """Stage3Model from `config.model` for a reference patch grid (Hp, Wp)."""
    check_prediction(model_cfg)
    s2 = build_stage2(model_cfg, grid)
    ex = model_cfg.expression
    common = dict(dtype=jnp.dtype(model_cfg.dtype), attention_impl=model_cfg.attention_impl,
                  remat_policy=model_cfg.remat_policy)
    return Stage3Model(
        motion_encoder=s2.motion_encoder, quantize=s2.quantize, retargeter=s2.retargeter,
        joint_head=s2.joint_head, joint_decoder=s2.joint_decoder, grid=s2.grid,
        dit=build_dit(model_cfg.dit, model_cfg.dtype, model_cfg.attention_impl,
                      model_cfg.remat_policy, control_dim=control_dim(model_cfg),
                      expression_every=ex.every),
        expression_encoder=expr_lib.ExpressionEncoder(
            num_tokens=ex.num_tokens, width=ex.width, depth=ex.depth, num_heads=ex.num_heads,
            patch_size=ex.patch_size, out_dim=ex.out_dim, **common),
        crop_size=ex.crop_size, reference_control=bool(model_cfg.reference_control),
        prediction=model_cfg.dit_prediction)
