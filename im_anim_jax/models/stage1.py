"""Stage 1: motion encoder -> quantizer -> motion decoder -> joint decoder (frames -> heatmaps)."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from im_anim_jax.models import layers
from im_anim_jax.models.joint_decoder import JointDecoder
from im_anim_jax.models.motion_decoder import MotionDecoder
from im_anim_jax.models.motion_tokenizer import MotionTokenizer
from im_anim_jax.models.quantizer import VectorQuantizer


def to_unit_range(frames):
    """uint8 pixels (0..255) or floats already in [0, 1] -> float32 in [0, 1]."""
    if frames.dtype == jnp.uint8:
        return frames.astype(jnp.float32) / 255.0
    return frames.astype(jnp.float32)


class PatchHeatmapHead(nn.Module):
    """Training aid: each encoder patch token predicts its own heatmap cells for all J joints
    (LayerNorm, linear). patches [B, g, g, W] -> heatmaps [B, J, Hh, Wh], Hh = g * cells."""
    num_joints: int
    heatmap_size: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, patches):
        b, g = patches.shape[:2]
        s = self.heatmap_size // g
        if s * g != self.heatmap_size:
            raise ValueError(f"the patch heatmap head needs heatmap_size {self.heatmap_size} to be "
                             f"a multiple of the {g}x{g} patch grid")
        x = layers.layer_norm("norm", self.dtype, eps=1e-6)(patches)
        x = layers.dense(self.num_joints * s * s, "embed", None, "proj", self.dtype)(x)
        x = x.reshape(b, g, g, self.num_joints, s, s).transpose(0, 3, 1, 4, 2, 5)
        return x.reshape(b, self.num_joints, g * s, g * s).astype(jnp.float32)


class Stage1Model(nn.Module):
    motion_encoder: MotionTokenizer
    quantize: VectorQuantizer
    motion_decoder: MotionDecoder
    joint_decoder: JointDecoder
    patch_head: PatchHeatmapHead | None = None

    def encode(self, frames, return_patch_heatmaps: bool = False):
        """frames [B, T, H, W, 3] -> quantized motion tokens M [B, T, N_m, C_m], VQ aux (with
        `return_patch_heatmaps`, plus aux["patch_heatmaps"] [B, T, J, Hh, Wh] from the patch head)."""
        b, t = frames.shape[:2]
        pixels = to_unit_range(frames).reshape((b * t,) + frames.shape[2:])
        if return_patch_heatmaps:
            z, patches = self.motion_encoder(pixels, return_patches=True)
        else:
            z = self.motion_encoder(pixels)
        z_q, aux = self.quantize(z)
        aux = dict(aux, indices=aux["indices"].reshape(b, t, -1))
        if return_patch_heatmaps:
            hm = self.patch_head(patches)
            aux["patch_heatmaps"] = hm.reshape((b, t) + hm.shape[1:])
        return z_q.reshape((b, t) + z_q.shape[1:]), aux

    def decode(self, tokens):
        """motion tokens [B, T, N_m, C_m] -> heatmaps [B, T, J, Hh, Wh]."""
        b, t = tokens.shape[:2]
        joints = self.motion_decoder(tokens.reshape((b * t,) + tokens.shape[2:]))
        heatmaps = self.joint_decoder(joints)
        return nn.with_logical_constraint(heatmaps.reshape((b, t) + heatmaps.shape[1:]),
                                          ("act_batch", "act_frames", "joints", None, None))

    def __call__(self, frames):
        tokens, aux = self.encode(frames, return_patch_heatmaps=self.patch_head is not None)
        return self.decode(tokens), aux


def build_stage1(model_cfg: ml_collections.ConfigDict) -> Stage1Model:
    """Stage1Model from `config.model` (motion_tokenizer, quantizer, motion_decoder, joint_decoder)."""
    dtype = jnp.dtype(model_cfg.dtype)
    common = dict(dtype=dtype, attention_impl=model_cfg.attention_impl,
                  remat_policy=model_cfg.remat_policy)
    enc, q = model_cfg.motion_tokenizer, model_cfg.quantizer
    dec, jd = model_cfg.motion_decoder, model_cfg.joint_decoder
    if enc.image_size % enc.patch_size:
        raise ValueError(f"model.motion_tokenizer.image_size {enc.image_size} is not divisible by "
                         f"patch_size {enc.patch_size}")
    if enc.patch_size % 2 ** len(enc.stem_channels):
        raise ValueError(f"model.motion_tokenizer.stem_channels {tuple(enc.stem_channels)} halve "
                         f"the frame {len(enc.stem_channels)} times, which patch_size "
                         f"{enc.patch_size} must be divisible by")
    return Stage1Model(
        motion_encoder=MotionTokenizer(
            image_size=enc.image_size, patch_size=enc.patch_size, width=enc.width, depth=enc.depth,
            num_heads=enc.num_heads, num_latent_tokens=enc.num_latent_tokens,
            token_size=enc.token_size, is_legacy=enc.is_legacy,
            stem_channels=tuple(enc.stem_channels), stem_blocks=enc.stem_blocks, **common),
        quantize=VectorQuantizer(codebook_size=q.codebook_size, token_size=enc.token_size,
                                 commitment_cost=q.commitment_cost, use_l2_norm=q.use_l2_norm),
        motion_decoder=MotionDecoder(num_joints=jd.num_joints, width=dec.width, depth=dec.depth,
                                     num_heads=dec.num_heads, **common),
        joint_decoder=JointDecoder(heatmap_size=jd.heatmap_size, channels=tuple(jd.channels),
                                   dtype=dtype),
        patch_head=(PatchHeatmapHead(jd.num_joints, jd.heatmap_size, dtype)
                    if enc.patch_heatmap_head else None),
    )

