"""Stage 2: the mask-token temporal retargeter (paper sec. 3.2, eq. 4) and its joint read-out head.

    M_ret = Retarget(M_video ++ T_ref ++ T_mask)

One transformer over the whole clip: the motion tokens of every frame, the reference patch tokens
and one learned mask token per reference patch per output frame. Every token kind gets a learned
type embedding (the mask kind's is the mask token itself: its content is a learned constant).
Positions: a learned embedding per patch of the grid (reference and mask tokens; so a model is
tied to its patch grid, as a ViT is), a learned per-token-index embedding (motion tokens), and
time as a fixed sinusoid (any clip length) scaled to the learned embeddings' width^-0.5: motion
tokens at their frame's time, mask tokens at their output frame's. Both scales matter
(docs/experiments.md, stage 2): with unscaled sinusoids (norm ~sqrt(width/2), nearly the same
vector for every position of a short clip or a small grid) every query looked alike and the model
never read the motion.
Attention spans all tokens.
The outputs at the mask positions are M_ret, one token per reference patch per output frame, so
M_ret lies on the reference patch grid. Reference content reaches M_ret only through attention:
the mask tokens are the bottleneck that keeps the reference's own pose out of the residual stream.

`mode="self_attention"` is the X-UniMotion-style baseline (paper supplement, Table 6): no mask
tokens; the reference tokens themselves, one copy per output frame (plus the frame's time), are
updated by self-attention over [M_video ++ those copies] and read out, so each output patch starts
from the reference patch it replaces (a direct residual path for the reference's pose).

Frames -> output frames (`output_frames`):
  "latent": one output frame per Wan2.2 VAE latent frame, T_out = 1 + (T-1)/4 (T = 4n + 1): latent
      frame 0 is video frame 0 alone, latent frame k >= 1 covers video frames 4k-3 .. 4k (the
      VAE's causal chunking). This is the DiT control grid (channel concat with the noisy latent
      tokens), and needs 4x fewer mask tokens than one per video frame. Its time position is
      the mean of the video frames it covers (0, 2.5, 6.5, ...), on the motion tokens' time axis.
  "video": one output frame per video frame, T_out = T (any T).
Per-frame supervision (eq. 6) works for both: `JointHead` decodes output frame k into joint tokens
for each video frame it covers (one learned slot embedding per position in the group), so the
stage-1 joint decoder turns them into per-video-frame heatmaps.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from im_anim_jax.models import layers

MODES = ("mask_token", "self_attention")
OUTPUT_FRAMES = ("latent", "video")
TEMPORAL_STRIDE = 4  # Wan2.2 VAE: frame 0 alone, then 4 frames per latent frame


# ---------------------------------------------------------------- frames <-> latent frames
def num_latent_frames(num_frames: int) -> int:
    """T video frames -> 1 + (T-1)/4 latent frames; T must be 4n + 1."""
    if num_frames < 1 or (num_frames - 1) % TEMPORAL_STRIDE:
        raise ValueError(f"the Wan VAE needs 4n + 1 frames (1, 5, 9, ..., 81), got {num_frames}")
    return 1 + (num_frames - 1) // TEMPORAL_STRIDE


def frames_to_latent_frames(t):
    """Video frame indices [...] -> (latent frame k [...], slot s [...]: position within k).

    Frame 0 -> (0, 0); frame t >= 1 -> ((t-1)//4 + 1, (t-1) % 4).
    """
    t = np.asarray(t)
    if np.any(t < 0):
        raise ValueError(f"frame indices must be >= 0, got min {t.min()}")
    k = np.where(t == 0, 0, (t - 1) // TEMPORAL_STRIDE + 1)
    s = np.where(t == 0, 0, (t - 1) % TEMPORAL_STRIDE)
    return k, s


def latent_frames_to_frames(k, s=0):
    """Inverse of frames_to_latent_frames: (latent frame k, slot s) [...] -> video frame index."""
    k, s = np.broadcast_arrays(np.asarray(k), np.asarray(s))
    if np.any(k < 0) or np.any(s < 0) or np.any(s >= TEMPORAL_STRIDE) or np.any((k == 0) & (s > 0)):
        raise ValueError("latent frame 0 has slot 0 only; latent frames k >= 1 have slots 0..3")
    return np.where(k == 0, 0, TEMPORAL_STRIDE * (k - 1) + 1 + s)


@dataclasses.dataclass(frozen=True)
class FrameLayout:
    """How T video frames map onto T_out output frames.

    times [T_out]: time of each output frame in video-frame units; slots: video frames per output
    frame (4 for latent frames, 1 per video frame); output [T] and slot [T]: where each video
    frame's joint tokens are read from.
    """
    times: np.ndarray
    slots: int
    output: np.ndarray
    slot: np.ndarray


def frame_layout(num_frames: int, output_frames: str) -> FrameLayout:
    if output_frames not in OUTPUT_FRAMES:
        raise ValueError(f"output_frames {output_frames!r} not in {OUTPUT_FRAMES}")
    t = np.arange(num_frames)
    if output_frames == "video":
        return FrameLayout(t.astype(np.float64), 1, t, np.zeros_like(t))
    n = num_latent_frames(num_frames)
    k = np.arange(n)
    times = np.where(k == 0, 0.0, TEMPORAL_STRIDE * k - (TEMPORAL_STRIDE - 1) / 2)
    out, slot = frames_to_latent_frames(t)
    return FrameLayout(times, TEMPORAL_STRIDE, out, slot)


# ---------------------------------------------------------------- time positions
def sincos(pos, dim: int) -> np.ndarray:
    """Positions [...] (any real) -> [..., dim] float32 = [sin(pos f) | cos(pos f)],
    f_i = 10000^(-i / (dim/2))."""
    half = dim // 2
    ang = np.asarray(pos, np.float64)[..., None] * 10000.0 ** (-np.arange(half) / half)
    return np.concatenate([np.sin(ang), np.cos(ang)], -1).astype(np.float32)


def _check_grid(tokens, grid) -> int:
    hp, wp = (int(g) for g in grid)
    if hp < 1 or wp < 1 or hp * wp != tokens.shape[-2]:
        raise ValueError(f"patch grid {tuple(grid)} does not hold the {tokens.shape[-2]} "
                         f"reference tokens (need Hp * Wp == P)")
    return hp * wp


def _check_width(width: int, num_heads: int) -> None:
    if width % 2 or width % num_heads:
        raise ValueError(f"width {width} must be even (sin/cos time positions) and divisible by "
                         f"num_heads {num_heads}")


# ---------------------------------------------------------------- modules
class Retargeter(nn.Module):
    """M_video [B, T, N_m, C_m] ++ T_ref [B, P, C_ref] (row-major patch grid `grid` = (Hp, Wp),
    static Python ints, P = Hp*Wp) -> M_ret [B, T_out, P, out_dim] (see the module docstring for
    `mode` and `output_frames`)."""
    width: int
    depth: int
    num_heads: int
    out_dim: int
    mode: str = "mask_token"
    output_frames: str = "latent"
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, motion, reference, grid):
        if self.mode not in MODES:
            raise ValueError(f"retargeter mode {self.mode!r} not in {MODES}")
        if motion.ndim != 4 or reference.ndim != 3 or motion.shape[0] != reference.shape[0]:
            raise ValueError(f"expected motion [B, T, N_m, C_m] and reference [B, P, C_ref], got "
                             f"{motion.shape} and {reference.shape}")
        _check_width(self.width, self.num_heads)
        b, t, n, _ = motion.shape
        p, w = _check_grid(reference, grid), self.width
        layout = frame_layout(t, self.output_frames)
        t_out = len(layout.times)
        scale = w ** -0.5
        kinds = layers.embedding_param(self, "token_type_embedding", (2, w), scale, None, "embed")
        index = layers.embedding_param(self, "motion_index_embedding", (n, w), scale, None, "embed")
        space = layers.embedding_param(self, "grid_embedding", (p, w), scale, None,
                                       "embed").astype(self.dtype)                 # [P, W]
        m = layers.dense(w, None, "embed", "motion_embed", self.dtype)(motion.astype(self.dtype))
        m = m + (kinds[0] + index).astype(self.dtype) + jnp.asarray(
            scale * sincos(np.arange(t), w)[:, None], self.dtype)
        r = layers.dense(w, None, "embed", "reference_embed", self.dtype)(
            reference.astype(self.dtype)) + kinds[1].astype(self.dtype) + space
        when = jnp.asarray(scale * sincos(layout.times, w), self.dtype)[:, None]   # [T_out, 1, W]
        if self.mode == "mask_token":
            mask = layers.embedding_param(self, "mask_token", (1, w), scale, None, "embed")
            queries = jnp.broadcast_to(mask.astype(self.dtype) + space + when, (b, t_out, p, w))
            context = [m.reshape(b, t * n, w), r]
        else:
            queries = r[:, None] + when
            context = [m.reshape(b, t * n, w)]
        x = jnp.concatenate(context + [queries.reshape(b, t_out * p, w)], 1)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        x = layers.layer_norm("ln_pre", self.dtype)(x)
        x = layers.Transformer(self.depth, self.num_heads, dtype=self.dtype,
                               attention_impl=self.attention_impl,
                               remat_policy=self.remat_policy, name="transformer")(x)
        x = layers.layer_norm("ln_post", self.dtype)(x[:, -t_out * p:])
        out = layers.dense(self.out_dim, "embed", None, "out_proj", self.dtype)(x)
        return nn.with_logical_constraint(out.reshape(b, t_out, p, self.out_dim),
                                          ("act_batch", "act_frames", "act_length", "act_embed"))


class JointHead(nn.Module):
    """M_ret [B, T_out, P, D] on patch grid (Hp, Wp) -> joint tokens [B, T, J, joint_dim], T video
    frames, for the stage-1 joint decoder (eq. 6 supervision of M_ret).

    Per output frame, a transformer over [J x slots learned queries ++ that frame's M_ret tokens
    (+ a learned embedding per patch)]; query (slot s, joint j) = joint embedding j + slot
    embedding s. Video frame t reads the queries of its (output frame, slot) from `frame_layout`.
    """
    num_joints: int
    width: int
    depth: int
    num_heads: int
    joint_dim: int
    output_frames: str = "latent"
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, m_ret, grid, num_frames: int):
        _check_width(self.width, self.num_heads)
        layout = frame_layout(num_frames, self.output_frames)
        b, t_out, p, _ = m_ret.shape
        if t_out != len(layout.times):
            raise ValueError(f"{num_frames} video frames need {len(layout.times)} "
                             f"{self.output_frames} output frames, M_ret has {t_out}")
        _check_grid(m_ret, grid)
        w, j, s = self.width, self.num_joints, layout.slots
        scale = w ** -0.5
        x = layers.dense(w, None, "embed", "input_embed", self.dtype)(m_ret.astype(self.dtype))
        space = layers.embedding_param(self, "grid_embedding", (p, w), scale, None, "embed")
        x = (x + space.astype(self.dtype)).reshape(b * t_out, p, w)
        joint = layers.embedding_param(self, "joint_query", (j, w), scale, "joints", "embed")
        slot = layers.embedding_param(self, "slot_embedding", (s, w), scale, None, "embed")
        queries = (slot[:, None] + joint[None]).reshape(s * j, w).astype(self.dtype)
        x = jnp.concatenate([jnp.broadcast_to(queries, (b * t_out, s * j, w)), x], 1)
        x = layers.layer_norm("ln_pre", self.dtype)(x)
        x = layers.Transformer(self.depth, self.num_heads, dtype=self.dtype,
                               attention_impl=self.attention_impl,
                               remat_policy=self.remat_policy, name="transformer")(x)
        x = layers.layer_norm("ln_post", self.dtype)(x[:, :s * j])
        x = layers.dense(self.joint_dim, "embed", None, "out_proj", self.dtype)(x)
        x = x.reshape(b, t_out, s, j, self.joint_dim)[:, layout.output, layout.slot]
        return nn.with_logical_constraint(x, ("act_batch", "act_frames", "joints", "act_embed"))
