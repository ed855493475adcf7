"""Expression path: face crops -> expression tokens -> frame-wise cross-attention in the DiT.

`crop_faces` cuts a square face crop per frame around the head keypoints; `ExpressionEncoder`
(a compact TiTok-style ViT) turns each crop into `num_tokens` expression tokens;
`latent_frame_tokens` groups them per Wan latent frame (the VAE compresses time 4x: latent frame
0 <- video frame 0, latent frame k >= 1 <- video frames 4k-3..4k); `ExpressionBlock`, inserted
after every few DiT blocks, lets each latent frame's video tokens attend to that frame's
expression tokens and starts as an exact identity (zero-initialised output projection).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from im_anim_jax import skeleton
from im_anim_jax.models import layers
from im_anim_jax.models.wan.dit import RMSNorm

F32 = jnp.float32
HEAD_JOINTS = tuple(skeleton.JOINT_INDEX[n] for n in ("nose", "r_eye", "l_eye", "r_ear", "l_ear"))
NECK = skeleton.JOINT_INDEX["neck"]
MIN_CONFIDENCE = 0.3


def _hw(image_size) -> tuple[int, int]:
    """int or (height, width) -> (height, width)."""
    if np.ndim(image_size) == 0:
        return int(image_size), int(image_size)
    h, w = image_size
    return int(h), int(w)


def face_boxes(keypoints, image_size, scale: float = 1.3, default_size: float = 0.12,
               min_confidence: float = MIN_CONFIDENCE):
    """Square face boxes from the head joints (nose, eyes, ears) of keypoints [..., 62, 3].

    keypoints are (x, y, confidence) in pixels (pixel centres at integers); image_size is an int
    or (height, width). Centre = confidence-weighted mean of the head joints with confidence >=
    `min_confidence`; half size = `scale` * max(farthest such joint from the centre,
    0.6 * |centre - neck|), at least 2 px. Without head joints: the neck (if present) shifted up by
    `default_size` * min(H, W), half size `default_size` * min(H, W); without a neck either: the
    whole image. Returns center [..., 2], half_size [...] (float32).
    """
    kp = jnp.asarray(keypoints, F32)
    if kp.shape[-2:] != (skeleton.NUM_JOINTS, 3):
        raise ValueError(f"keypoints must be [..., {skeleton.NUM_JOINTS}, 3], got {kp.shape}")
    h, w = _hw(image_size)
    head = kp[..., HEAD_JOINTS, :]
    wgt = jnp.where(head[..., 2] >= min_confidence, head[..., 2], 0.0)
    total = wgt.sum(-1)
    has_face = total > 0
    center = (head[..., :2] * wgt[..., None]).sum(-2) / jnp.maximum(total, 1e-6)[..., None]
    spread = jnp.max(jnp.where(wgt > 0, jnp.linalg.norm(head[..., :2] - center[..., None, :],
                                                         axis=-1), 0.0), -1)
    neck, has_neck = kp[..., NECK, :2], kp[..., NECK, 2] >= min_confidence
    spread = jnp.maximum(spread, jnp.where(has_neck, 0.6 * jnp.linalg.norm(center - neck, axis=-1),
                                           0.0))
    face_half = jnp.maximum(scale * spread, 2.0)
    default = default_size * min(h, w)
    neck_center = neck - jnp.array([0.0, default], F32)
    image_center = jnp.broadcast_to(jnp.array([(w - 1) / 2, (h - 1) / 2], F32), center.shape)
    fallback_center = jnp.where(has_neck[..., None], neck_center, image_center)
    fallback_half = jnp.where(has_neck, default, max(h, w) / 2)
    return (jnp.where(has_face[..., None], center, fallback_center),
            jnp.where(has_face, face_half, fallback_half))


def _crop(image, center, half, crop_size: int):
    """image [H, W, C], center [2] (x, y), half [] -> [crop, crop, C]; outside pixels are 0."""
    s = crop_size / (2 * half)
    # keypoint coordinates have pixel centres at integers; scale_and_translate's at +0.5
    origin = center + 0.5 - half                                   # (x, y) of the crop's corner
    return jax.image.scale_and_translate(
        image, (crop_size, crop_size, image.shape[-1]), (0, 1), jnp.stack([s, s]),
        -jnp.stack([origin[1], origin[0]]) * s, method="linear", antialias=True)


def crop_faces(frames, keypoints, crop_size: int, scale: float = 1.3):
    """Face crops (bilinear, antialiased, differentiable w.r.t. frames) of frames [B, T, H, W, C]
    around face_boxes(keypoints [B, T, 62, 3]) -> [B, T, crop_size, crop_size, C] (float; integer
    frames become float32, regions outside the image are 0)."""
    frames = jnp.asarray(frames)
    if frames.ndim != 5:
        raise ValueError(f"frames must be [B, T, H, W, C], got {frames.shape}")
    b, t, h, w, c = frames.shape
    if jnp.shape(keypoints) != (b, t, skeleton.NUM_JOINTS, 3):
        raise ValueError(f"keypoints must be [B={b}, T={t}, {skeleton.NUM_JOINTS}, 3], "
                         f"got {jnp.shape(keypoints)}")
    if not jnp.issubdtype(frames.dtype, jnp.floating):
        frames = frames.astype(F32)
    center, half = jax.lax.stop_gradient(face_boxes(keypoints, (h, w), scale))  # boxes are data
    crops = jax.vmap(lambda im, ce, ha: _crop(im, ce, ha, int(crop_size)))(
        frames.reshape(b * t, h, w, c), center.reshape(b * t, 2), half.reshape(b * t))
    return crops.reshape(b, t, crop_size, crop_size, c)


class ExpressionEncoder(nn.Module):
    """Compact TiTok-style ViT per face crop: crops [B, T, c, c, 3] in [0, 1] -> expression
    tokens [B, T, num_tokens, out_dim] float32.

    Conv patch embed + positional embedding, `num_tokens` learned latent tokens appended, ln_pre,
    `depth` pre-LN blocks (layers.Transformer, scanned, remat by `remat_policy`), the latent
    tokens' outputs -> ln_post -> dense to out_dim.
    """
    num_tokens: int
    width: int
    depth: int
    num_heads: int
    patch_size: int
    out_dim: int
    dtype: layers.Dtype = F32
    attention_impl: str = "xla"
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, crops):
        if crops.ndim != 5 or crops.shape[2] != crops.shape[3] or crops.shape[-1] != 3:
            raise ValueError(f"crops must be [B, T, c, c, 3], got {crops.shape}")
        b, t, c = crops.shape[:3]
        if c % self.patch_size:
            raise ValueError(f"crop size {c} is not a multiple of patch_size {self.patch_size}")
        n, scale = (c // self.patch_size) ** 2, self.width ** -0.5
        x = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                    padding="VALID", dtype=self.dtype, name="patch_embed",
                    kernel_init=layers.axes(nn.initializers.lecun_normal(),
                                            None, None, "conv_in", "embed"),
                    bias_init=layers.axes(nn.initializers.zeros, "embed"))(
            crops.reshape(b * t, c, c, 3).astype(self.dtype))
        pos = layers.embedding_param(self, "positional_embedding", (n, self.width), scale,
                                     None, "embed")
        latent = layers.embedding_param(self, "latent_tokens", (self.num_tokens, self.width),
                                        scale, None, "embed")
        x = x.reshape(b * t, n, self.width) + pos.astype(x.dtype)
        x = jnp.concatenate(
            [x, jnp.broadcast_to(latent.astype(x.dtype), (b * t,) + latent.shape)], 1)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        x = layers.layer_norm("ln_pre", self.dtype)(x)
        x = layers.Transformer(self.depth, self.num_heads, dtype=self.dtype,
                               attention_impl=self.attention_impl,
                               remat_policy=self.remat_policy, name="transformer")(x)
        x = layers.layer_norm("ln_post", self.dtype)(x[:, -self.num_tokens:])
        z = layers.dense(self.out_dim, "embed", None, "proj_out", self.dtype)(x)
        z = nn.with_logical_constraint(z.astype(F32), ("act_batch", "act_length", None))
        return z.reshape(b, t, self.num_tokens, self.out_dim)


def latent_frame_tokens(tokens, temporal_stride: int = 4):
    """Per-video-frame tokens [B, T, N, D] -> per-latent-frame tokens [B, 1 + (T-1)//s, s*N, D]
    (s = temporal_stride): latent frame 0 <- video frame 0 repeated s times, latent frame k >= 1
    <- video frames s(k-1)+1 .. sk in order. T must be 1 + s*m."""
    if tokens.ndim != 4:
        raise ValueError(f"tokens must be [B, T, N, D], got {tokens.shape}")
    b, t, n, d = tokens.shape
    s = int(temporal_stride)
    if (t - 1) % s:
        raise ValueError(f"{t} frames do not map onto latent frames: need T = 1 + {s}*m "
                         f"(e.g. {1 + s * max((t - 1) // s, 1)})")
    first = jnp.tile(tokens[:, :1], (1, 1, s, 1))
    rest = tokens[:, 1:].reshape(b, (t - 1) // s, s * n, d)
    return jnp.concatenate([first, rest], 1)


def _precision(dtype):
    """Full-precision matmuls when computing in float32 (as dit.py)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == F32 else None


class ZeroOutProjection(nn.Module):
    """Attention output projection [B, L, H, D] -> [B, L, features] whose kernel [H, D, features]
    and bias start at exactly zero."""
    features: int
    dtype: layers.Dtype = F32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", layers.axes(nn.initializers.zeros, "heads", "head_dim",
                                                  "embed"), (*x.shape[-2:], self.features))
        bias = self.param("bias", layers.axes(nn.initializers.zeros, "embed"), (self.features,))
        y = jnp.einsum("blhk,hkd->bld", x.astype(self.dtype), kernel.astype(self.dtype),
                       precision=_precision(self.dtype))
        return y + bias.astype(self.dtype)


class ExpressionBlock(nn.Module):
    """x + o(cross_attention(LN(x), expr)) frame by frame; `o` starts at zero (exact identity).

    __call__(x [B, L, dim] float32 residual stream, L = F*h*w tokens in (f, h, w) order,
    expr [B, F, M, dim_e]) -> [B, L, dim]: the tokens of latent frame f attend only to expr[:, f].
    q from LN_affine(x), k and v from expr, q and k RMS-normed over the full width (as Wan's
    attention), no RoPE, no mask; computed in `dtype`, LayerNorm and residual in float32.
    A frame whose tokens are all zero has no expression (the reference latent frame) and is left
    unchanged: attending to keys and values that are only projection biases would add the same
    learned offset to all its tokens once `o` has trained.
    """
    num_heads: int
    eps: float = 1e-6
    dtype: layers.Dtype = F32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, expr):
        if x.ndim != 3 or expr.ndim != 4 or expr.shape[0] != x.shape[0]:
            raise ValueError(f"expected x [B, L, dim] and expr [B, F, M, dim_e], got {x.shape} "
                             f"and {expr.shape}")
        b, length, dim = x.shape
        f, m, dim_e = expr.shape[1:]
        h = self.num_heads
        if length % f:
            raise ValueError(f"{length} tokens do not split into {f} latent frames")
        if dim % h:
            raise ValueError(f"dim {dim} is not divisible by num_heads {h}")

        def proj(name, width):
            return layers.Projection("bld,dhk->blhk", (width, h, dim // h),
                                     ("embed", "heads", "head_dim"), (h, dim // h),
                                     ("heads", "head_dim"), fan_in=(0,), fan_out=(1, 2),
                                     dtype=self.dtype, precision=_precision(self.dtype), name=name)

        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        y = layers.layer_norm("norm", F32, self.eps)(x).reshape(b * f, length // f, dim)
        ctx = expr.reshape(b * f, m, dim_e)
        q = RMSNorm(self.eps, self.dtype, name="norm_q")(proj("q", dim)(y))
        k = RMSNorm(self.eps, self.dtype, name="norm_k")(proj("k", dim_e)(ctx))
        v = proj("v", dim_e)(ctx)
        q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", None))
        k, v = (nn.with_logical_constraint(a, ("act_batch", None, "act_heads", None))
                for a in (k, v))
        out = layers.attention(q, k, v, self.attention_impl)
        out = ZeroOutProjection(dim, self.dtype, name="o")(out).reshape(b, f, length // f, dim)
        present = jnp.any(expr != 0, axis=(-2, -1))[:, :, None, None]       # [B, F, 1, 1]
        return x + jnp.where(present, out, 0).reshape(b, length, dim).astype(x.dtype)
