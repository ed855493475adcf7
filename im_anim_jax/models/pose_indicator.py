"""Animate-X's Implicit Pose Indicator (IPI, sec. 3.2), the motion encoder of the stage-2
`pose_indicator` baseline: its output tokens take the place of the 1D motion tokens.

Per driving frame, with J = 62 keypoints (x, y, conf in pixels; the DWPose query) and the frame:

    keypoints --normalise to [-1, 1], zeroed where conf < threshold, (x, y, visible)--> Dense
      + per-joint embedding --keypoint transformer (pre-LN self-attention)--> q_p [J, W]
    q_m = q_p + q_l (learnable query [J, W])
    frame [H, W, 3] in [0, 1] --resize to the CLIP size, CLIP-normalise--> CLIP ViT
      --> f_phi = last_hidden_state [1 + N, W_clip]                         (clip_vit.py)
    `depth` scanned layers: q += CrossAttn(LN(q), LN(f_phi)); q += FFN(LN(q))  (K, V = f_phi)
    --ln_out--> tokens [J, W]

One query per joint: the query transformer of the paper gets one token per DWPose keypoint, and
the learnable query complements it token by token (q_m = q_p + q_l). The explicit half (EPI:
pose realignment and rescaling) acts on the keypoints during training (data_pipelines/epi.py).

Logical axes: as layers.py (embed, mlp, heads, head_dim, layers); the per-joint embeddings and the
learnable query (joints, embed).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from im_anim_jax.models import clip_vit, layers


class CrossAttentionLayer(nn.Module):
    """x [B, Lq, W], context [B, Lk, C] -> x + CrossAttn(LN(x), LN(context)), then + FFN."""
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, context):
        w, c = x.shape[-1], context.shape[-1]
        h, d = self.num_heads, w // self.num_heads
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

        def proj(name, y, dim):
            return layers.Projection("blc,chd->blhd", (dim, h, d), ("embed", "heads", "head_dim"),
                                     (h, d), ("heads", "head_dim"), fan_in=(0,), fan_out=(1, 2),
                                     dtype=self.dtype, name=name)(y)

        kv = layers.layer_norm("ln_context", self.dtype)(context)
        q = nn.with_logical_constraint(
            proj("q_proj", layers.layer_norm("ln_query", self.dtype)(x), w),
            ("act_batch", "act_length", "act_heads", None))
        out = layers.attention(q, proj("k_proj", kv, c), proj("v_proj", kv, c),
                               self.attention_impl)
        x = x + layers.Projection("blhd,hdw->blw", (h, d, w), ("heads", "head_dim", "embed"), (w,),
                                  ("embed",), fan_in=(0, 1), fan_out=(2,), dtype=self.dtype,
                                  name="out_proj")(out)
        y = layers.layer_norm("ln_mlp", self.dtype)(x)
        y = nn.gelu(layers.dense(int(w * self.mlp_ratio), "embed", "mlp", "fc1", self.dtype)(y),
                    approximate=False)
        return x + layers.dense(w, "mlp", "embed", "fc2", self.dtype)(y), None


class PoseIndicator(nn.Module):
    """(pixels [B, H, W, 3] in [0, 1], keypoints [B, J, 3] pixels of those frames) -> motion
    tokens [B, J, width] float32. `image_size` is H = W of the frames (keypoints are normalised by
    it); the CLIP ViT sees them resized to its own `image_size`."""
    clip: clip_vit.CLIPVisionTransformer
    image_size: int
    num_joints: int
    width: int
    depth: int
    num_heads: int
    keypoint_depth: int
    conf_threshold: float = 0.3
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"
    remat_policy: str = "none"

    def features(self, pixels):
        """pixels [B, H, W, 3] in [0, 1] -> CLIP last_hidden_state [B, 1 + N, W_clip]."""
        s = self.clip.image_size
        if pixels.shape[1:3] != (s, s):
            pixels = jax.image.resize(pixels.astype(jnp.float32), pixels.shape[:1] + (s, s, 3),
                                      "linear")
        return self.clip(clip_vit.normalise(pixels))[0]

    def query(self, keypoints):
        """keypoints [B, J, 3] (pixels) -> q_m = q_p + q_l [B, J, width]."""
        visible = (keypoints[..., 2:] >= self.conf_threshold).astype(jnp.float32)
        xy = (keypoints[..., :2] + 0.5) / self.image_size * 2.0 - 1.0  # the frame spans [-1, 1]
        x = layers.dense(self.width, None, "embed", "keypoint_embed", self.dtype)(
            jnp.concatenate([xy * visible, visible], -1).astype(self.dtype))
        scale = self.width ** -0.5
        joint = layers.embedding_param(self, "joint_embedding", (self.num_joints, self.width),
                                       scale, "joints", "embed")
        q_p = layers.Transformer(self.keypoint_depth, self.num_heads, dtype=self.dtype,
                                 attention_impl=self.attention_impl,
                                 remat_policy=self.remat_policy,
                                 name="keypoint_encoder")(x + joint.astype(x.dtype))
        q_l = layers.embedding_param(self, "learnable_query", (self.num_joints, self.width),
                                     scale, "joints", "embed")
        return q_p + q_l.astype(q_p.dtype)

    @nn.compact
    def __call__(self, pixels, keypoints):
        if pixels.ndim != 4 or pixels.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"pose indicator expects frames [B, {self.image_size}, "
                             f"{self.image_size}, 3], got {pixels.shape}")
        if keypoints.shape != (pixels.shape[0], self.num_joints, 3):
            raise ValueError(f"pose indicator expects keypoints [{pixels.shape[0]}, "
                             f"{self.num_joints}, 3] (x, y, conf) for frames {pixels.shape}, got "
                             f"{keypoints.shape}")
        if self.width % self.num_heads:
            raise ValueError(f"pose indicator width {self.width} is not divisible by num_heads "
                             f"{self.num_heads}")
        context = self.features(pixels)
        x = self.query(keypoints.astype(jnp.float32))
        layer = CrossAttentionLayer
        policy = layers.REMAT_POLICIES[self.remat_policy]
        if policy is not None:
            layer = nn.remat(layer, prevent_cse=False, policy=None if policy == "full" else policy)
        stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast,), length=self.depth,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = stack(self.num_heads, dtype=self.dtype, attention_impl=self.attention_impl,
                     name="layers")(x, context.astype(self.dtype))
        x = layers.layer_norm("ln_out", self.dtype)(x).astype(jnp.float32)
        return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))


def build_clip_vit(cfg: ml_collections.ConfigDict, dtype=jnp.float32, attention_impl="xla",
                   remat_policy="none") -> clip_vit.CLIPVisionTransformer:
    """CLIPVisionTransformer from `config.model.pose_indicator.clip`."""
    return clip_vit.CLIPVisionTransformer(
        image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, hidden_act=cfg.hidden_act, dtype=dtype,
        attention_impl=attention_impl, remat_policy=remat_policy)


def build_pose_indicator(model_cfg: ml_collections.ConfigDict) -> PoseIndicator:
    """PoseIndicator from `config.model` (pose_indicator block; frame size from
    motion_tokenizer.image_size, J from joint_decoder.num_joints)."""
    cfg = model_cfg.pose_indicator
    common = dict(dtype=jnp.dtype(model_cfg.dtype), attention_impl=model_cfg.attention_impl,
                  remat_policy=model_cfg.remat_policy)
    return PoseIndicator(
        clip=build_clip_vit(cfg.clip, **common), image_size=model_cfg.motion_tokenizer.image_size,
        num_joints=model_cfg.joint_decoder.num_joints, width=cfg.width, depth=cfg.depth,
        num_heads=cfg.num_heads, keypoint_depth=cfg.keypoint_depth,
        conf_threshold=cfg.conf_threshold, **common)
