"""Motion decoder (stage 1 only): a transformer over [J joint mask tokens ++ quantized motion tokens].

The single learned mask token is repeated J times and told apart by a per-joint positional
embedding; motion tokens are embedded (token_size -> width) plus their own positional embedding.
The outputs at the J mask positions are the joint tokens fed to the joint decoder. Names follow
TiTok's decoder (`decoder_embed`, `mask_token`, `latent_token_positional_embedding`, ...).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from im_anim_jax.models import layers


class MotionDecoder(nn.Module):
    num_joints: int
    width: int
    depth: int
    num_heads: int
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, tokens):
        """tokens [B, N_m, C_m] -> joint tokens [B, J, width]."""
        b, n, _ = tokens.shape
        scale = self.width ** -0.5
        x = layers.dense(self.width, None, "embed", "decoder_embed", self.dtype)(
            tokens.astype(self.dtype))
        x = x + layers.embedding_param(self, "latent_token_positional_embedding", (n, self.width),
                                       scale, None, "embed").astype(x.dtype)
        mask = layers.embedding_param(self, "mask_token", (1, self.width), scale, None, "embed")
        joint_pos = layers.embedding_param(self, "joint_positional_embedding",
                                           (self.num_joints, self.width), scale, "joints", "embed")
        mask = jnp.broadcast_to((mask + joint_pos).astype(x.dtype), (b, self.num_joints, self.width))
        x = jnp.concatenate([mask, x], 1)
        x = layers.layer_norm("ln_pre", self.dtype)(x)
        x = layers.Transformer(self.depth, self.num_heads, dtype=self.dtype,
                               attention_impl=self.attention_impl,
                               remat_policy=self.remat_policy, name="transformer")(x)
        return layers.layer_norm("ln_post", self.dtype)(x[:, :self.num_joints])
