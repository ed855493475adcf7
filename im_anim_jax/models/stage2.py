"""Stage 2: driving frames + reference tokens -> M_ret -> heatmaps of the reference identity.

    frames [B, T, H, W, 3] --motion encoder (+ quantizer)--> M_video [B, T, N_m, C_m]
    M_video ++ T_ref [B, P, C_ref] --retargeter--> M_ret [B, T_out, P, D]   (P on grid (Hp, Wp))
    M_ret --joint head--> joint tokens [B, T, J, D_j] --stage-1 joint decoder--> [B, T, J, Hh, Wh]

Submodule names equal Stage1Model's where the parameters come from stage 1 (`motion_encoder`,
`quantize`, `joint_decoder`), so a stage-1 checkpoint's subtrees drop in unchanged. With
`config.model.motion_encoder == "conv"` (the ablation) the encoder is ConvMotionEncoder: a 2D
feature grid, no quantizer. With "pose_indicator" (the Animate-X baseline) it is the Implicit Pose
Indicator: the driving input is then {"frames": [B, T, H, W, 3], "keypoints": [B, T, J, 3]} (the
driving pose, explicit-pose-augmented in training), M_video [B, T, J, W], no quantizer.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from im_anim_jax.models.conv_motion_encoder import ConvMotionEncoder, build_conv_motion_encoder
from im_anim_jax.models.joint_decoder import JointDecoder
from im_anim_jax.models.motion_tokenizer import MotionTokenizer
from im_anim_jax.models.pose_indicator import PoseIndicator, build_pose_indicator
from im_anim_jax.models.quantizer import VectorQuantizer
from im_anim_jax.models.retargeter import JointHead, Retargeter
from im_anim_jax.models.stage1 import build_stage1, to_unit_range

MOTION_ENCODERS = ("tokenizer", "conv", "pose_indicator")


def driving_frames(driving):
    """The frames [B, T, H, W, 3] of a driving input (an array, or the pose indicator's dict)."""
    return driving["frames"] if isinstance(driving, dict) else driving


class Stage2Model(nn.Module):
    motion_encoder: MotionTokenizer | ConvMotionEncoder | PoseIndicator
    quantize: VectorQuantizer | None
    retargeter: Retargeter
    joint_head: JointHead
    joint_decoder: JointDecoder
    grid: tuple[int, int]  # the reference patch grid (Hp, Wp)

    def encode(self, driving):
        """driving frames [B, T, H, W, 3] (the pose indicator: {"frames", "keypoints" [B, T, J,
        3]}) -> M_video [B, T, N_m, C_m], VQ aux (zeros without quantizer)."""
        frames = driving_frames(driving)
        b, t = frames.shape[:2]
        pixels = to_unit_range(frames).reshape((b * t,) + frames.shape[2:])
        if isinstance(self.motion_encoder, PoseIndicator):
            if not isinstance(driving, dict) or "keypoints" not in driving:
                raise ValueError("the pose indicator needs the driving input as {'frames', "
                                 "'keypoints'} (the driving pose), got frames alone")
            kpts = driving["keypoints"]
            z = self.motion_encoder(pixels, kpts.reshape((b * t,) + kpts.shape[2:]))
        else:
            z = self.motion_encoder(pixels)
        if self.quantize is None:
            zero = jnp.zeros((), jnp.float32)
            return z.reshape((b, t) + z.shape[1:]), dict(loss=zero, commitment_loss=zero,
                                                         codebook_loss=zero)
        z_q, aux = self.quantize(z)
        aux = dict(aux, indices=aux["indices"].reshape(b, t, -1))
        return z_q.reshape((b, t) + z_q.shape[1:]), aux

    def decode(self, m_ret, num_frames: int):
        """M_ret [B, T_out, P, D] -> heatmaps [B, T, J, Hh, Wh] (T = num_frames video frames)."""
        joints = self.joint_head(m_ret, self.grid, num_frames)
        b, t = joints.shape[:2]
        heatmaps = self.joint_decoder(joints.reshape((b * t,) + joints.shape[2:]))
        return nn.with_logical_constraint(heatmaps.reshape((b, t) + heatmaps.shape[1:]),
                                          ("act_batch", "act_frames", "joints", None, None))

    def __call__(self, driving, reference):
        """driving frames [B, T, H, W, 3] (or the pose indicator's dict, see `encode`), reference
        tokens [B, P, C_ref] -> heatmaps, aux (VQ terms, `motion` M_video, `m_ret`)."""
        motion, aux = self.encode(driving)
        m_ret = self.retargeter(motion, reference, self.grid)
        return (self.decode(m_ret, driving_frames(driving).shape[1]),
                dict(aux, motion=motion, m_ret=m_ret))


def build_stage2(model_cfg: ml_collections.ConfigDict, grid: tuple[int, int]) -> Stage2Model:
    """Stage2Model from `config.model` for a reference patch grid (Hp, Wp)."""
    kind = model_cfg.motion_encoder
    if kind not in MOTION_ENCODERS:
        raise ValueError(f"config.model.motion_encoder={kind!r}; choose one of {MOTION_ENCODERS}")
    s1 = build_stage1(model_cfg)
    common = dict(dtype=jnp.dtype(model_cfg.dtype), attention_impl=model_cfg.attention_impl,
                  remat_policy=model_cfg.remat_policy)
    rt, jh = model_cfg.retargeter, model_cfg.joint_head
    encoders = {"tokenizer": lambda: s1.motion_encoder,
                "conv": lambda: build_conv_motion_encoder(model_cfg),
                "pose_indicator": lambda: build_pose_indicator(model_cfg)}
    return Stage2Model(
        motion_encoder=encoders[kind](),
        quantize=s1.quantize if kind == "tokenizer" else None,
        retargeter=Retargeter(width=rt.width, depth=rt.depth, num_heads=rt.num_heads,
                              out_dim=rt.out_dim, mode=rt.mode, output_frames=rt.output_frames,
                              **common),
        joint_head=JointHead(num_joints=model_cfg.joint_decoder.num_joints, width=jh.width,
                             depth=jh.depth, num_heads=jh.num_heads,
                             joint_dim=model_cfg.motion_decoder.width,
                             output_frames=rt.output_frames, **common),
        joint_decoder=s1.joint_decoder,
        grid=tuple(int(g) for g in grid))
