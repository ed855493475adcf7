"""The 1D motion tokenizer (motion encoder E_motion): a TiTok-style ViT encoder.

Per frame: conv patch embed -> [class ++ patches] + positional embedding -> append N_m learned
latent tokens (+ their positional embedding) -> ln_pre -> pre-LN transformer -> keep the last N_m
tokens -> ln_post -> 1x1 conv (`conv_out`) to the token size. Parameter names follow TiTok's
state dict (`latent_tokens`, `encoder.*`) so pretrained TiTok weights convert one to one.

`stem_channels` (empty: TiTok) puts a convolutional stem before the patch embedding, as in the
ViT paper's hybrids: per entry a stride-2 3x3 conv and `stem_blocks` pre-LN residual blocks, so
the patch embedding covers patch_size / 2**len(stem_channels) stem cells. Trained from scratch
on the demo's budget, the plain ViT did not learn to localise joints; the stem, with stage 1's
patch heatmap head and more identities, does (docs/experiments.md, stage 1). Pretrained TiTok
weights need the plain patch embedding."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from im_anim_jax.models import layers


class MotionTokenizer(nn.Module):
    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    num_latent_tokens: int
    token_size: int
    is_legacy: bool = False  # TiTok legacy checkpoints reinterpret [N, W] as [W, N] before conv_out
    stem_channels: Sequence[int] = ()
    stem_blocks: int = 2
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, pixels, return_patches: bool = False):
        """pixels [B, H, W, 3] in [0, 1] -> continuous latent tokens z [B, N_m, token_size]; with
        `return_patches`, also the transformer's patch-token outputs [B, grid, grid, width]."""
        b, h, w, c = pixels.shape
        if (h, w, c) != (self.image_size, self.image_size, 3):
            raise ValueError(f"motion tokenizer expects frames [B, {self.image_size}, "
                             f"{self.image_size}, 3], got {pixels.shape}")
        grid, scale = self.image_size // self.patch_size, self.width ** -0.5
        x = pixels.astype(self.dtype)
        for i, ch in enumerate(self.stem_channels):
            x = _conv(ch, 3, 2, f"stem_{i}_down", self.dtype)(x)
            for j in range(self.stem_blocks):
                x = StemBlock(self.dtype, name=f"stem_{i}_block_{j}")(x)
        patch = self.patch_size // 2 ** len(self.stem_channels)
        x = nn.Conv(self.width, (patch,) * 2, strides=(patch,) * 2,
                    padding="VALID", dtype=self.dtype, name="patch_embed",
                    kernel_init=layers.axes(nn.initializers.lecun_normal(),
                                            None, None, "conv_in", "embed"),
                    bias_init=layers.axes(nn.initializers.zeros, "embed"))(x)
        x = x.reshape(b, grid * grid, self.width)
        cls = layers.embedding_param(self, "class_embedding", (1, self.width), scale, None, "embed")
        pos = layers.embedding_param(self, "positional_embedding", (grid * grid + 1, self.width),
                                     scale, None, "embed")
        latent = layers.embedding_param(self, "latent_tokens", (self.num_latent_tokens, self.width),
                                        scale, None, "embed")
        latent_pos = layers.embedding_param(self, "latent_token_positional_embedding",
                                            (self.num_latent_tokens, self.width), scale, None, "embed")
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype), x], 1)
        x = x + pos.astype(x.dtype)
        latent = jnp.broadcast_to((latent + latent_pos).astype(x.dtype), (b,) + latent.shape)
        x = jnp.concatenate([x, latent], 1)
        x = layers.layer_norm("ln_pre", self.dtype)(x)
        x = layers.Transformer(self.depth, self.num_heads, dtype=self.dtype,
                               attention_impl=self.attention_impl,
                               remat_policy=self.remat_policy, name="transformer")(x)
        patches = x[:, 1:grid * grid + 1].reshape(b, grid, grid, self.width)
        x = layers.layer_norm("ln_post", self.dtype)(x[:, -self.num_latent_tokens:])
        if self.is_legacy:
            x = x.reshape(b, self.width, self.num_latent_tokens).transpose(0, 2, 1)
        z = layers.dense(self.token_size, "embed", None, "conv_out", self.dtype)(x)
        z = nn.with_logical_constraint(z.astype(jnp.float32), ("act_batch", "act_length", None))
        return (z, patches) if return_patches else z


def _conv(features: int, kernel: int, stride: int, name: str, dtype, zero: bool = False):
    init = nn.initializers.zeros if zero else nn.initializers.lecun_normal()
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                   dtype=dtype, name=name,
                   kernel_init=layers.axes(init, None, None, "conv_in", "conv_out"),
                   bias_init=layers.axes(nn.initializers.zeros, "conv_out"))


class StemBlock(nn.Module):
    """Pre-LN residual block: x + conv(gelu(ln(conv(gelu(ln(x)))))), the last conv zero-initialised.
    x [B, H, W, C] -> [B, H, W, C]."""
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        h = x
        for i in range(2):
            h = nn.LayerNorm(dtype=self.dtype, name=f"norm_{i}",
                             scale_init=layers.axes(nn.initializers.ones, "conv_out"),
                             bias_init=layers.axes(nn.initializers.zeros, "conv_out"))(h)
            h = _conv(c, 3, 1, f"conv_{i}", self.dtype, zero=i == 1)(nn.gelu(h))
        return x + h
