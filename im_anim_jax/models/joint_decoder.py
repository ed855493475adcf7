"""Joint decoder: each joint token -> one heatmap, by conv upsampling (shared over joints)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from im_anim_jax.models import layers


class JointDecoder(nn.Module):
    """joint tokens [B, J, D] -> heatmaps [B, J, Hh, Wh].

    A linear map to a [base, base, channels[0]] grid, then one (x2 nearest upsample, 3x3 conv,
    GELU) step per further entry of `channels`, then a 3x3 conv to one channel.
    """
    heatmap_size: int
    channels: Sequence[int] = (64, 32, 16)
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        b, j, _ = tokens.shape
        ups = len(self.channels) - 1
        base = self.heatmap_size // 2 ** ups
        if base * 2 ** ups != self.heatmap_size:
            raise ValueError(f"heatmap_size {self.heatmap_size} must be divisible by 2**{ups} "
                             f"(one x2 upsampling per channels entry after the first)")
        x = layers.dense(base * base * self.channels[0], "embed", "conv_out", "proj", self.dtype)(
            tokens.astype(self.dtype))
        x = nn.gelu(x.reshape(b * j, base, base, self.channels[0]))
        for i, c in enumerate(self.channels[1:]):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = nn.gelu(self._conv(c, f"up_{i}")(x))
        x = self._conv(1, "head")(x)
        return x.reshape(b, j, self.heatmap_size, self.heatmap_size).astype(jnp.float32)

    def _conv(self, features, name):
        return nn.Conv(features, (3, 3), padding="SAME", dtype=self.dtype, name=name,
                       kernel_init=layers.axes(nn.initializers.lecun_normal(),
                                               None, None, "conv_in", "conv_out"),
                       bias_init=layers.axes(nn.initializers.zeros, "conv_out"))
