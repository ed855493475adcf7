"""The convolutional motion-encoder baseline (paper Table 2 exp. A, Table 5).

Replaces the 1D motion tokenizer in stage 2 with a plain conv encoder whose output is the 2D
feature grid itself: per level a stride-2 3x3 conv then a 3x3 conv (each followed by GroupNorm +
SiLU), then a 1x1 conv (`proj`) to `features`; tokens are the final [H/s, W/s] grid flattened
row-major (token index = row * (W/s) + col), s = 2**len(channels). There is deliberately no pooling
and no learned latent queries: the spatial layout (and hence the driving identity's body shape)
survives into the tokens, which is what the ablation measures.

Logical axes: conv kernels (None, None, "conv_in", "conv_out"), GroupNorm scale/bias and conv
biases "conv_out"; the 1x1 projection kernel (None, None, "conv_in", "embed") and bias "embed".
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from im_anim_jax.models import layers


def num_groups(width: int, max_groups: int = 32) -> int:
    """The largest group count <= `max_groups` dividing `width` (GroupNorm needs an exact split)."""
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    return max(g for g in range(1, min(width, max_groups) + 1) if width % g == 0)


class ConvMotionEncoder(nn.Module):
    """pixels [B, H, W, 3] in [0, 1] -> tokens [B, (H/s) * (W/s), features] float32.

    s = 2**len(channels); H and W must be divisible by s. Pixels are mapped to [-1, 1] first.
    """
    channels: Sequence[int] = (64, 128, 256, 512)
    features: int = 512
    dtype: layers.Dtype = jnp.float32
    max_groups: int = 32

    @property
    def stride(self) -> int:
        return 2 ** len(self.channels)

    @nn.compact
    def __call__(self, pixels):
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"conv motion encoder expects frames [B, H, W, 3], got {pixels.shape}")
        if not self.channels:
            raise ValueError("conv motion encoder needs at least one level (channels is empty)")
        b, h, w, _ = pixels.shape
        s = self.stride
        if h % s or w % s:
            raise ValueError(f"conv motion encoder with {len(self.channels)} stride-2 levels needs "
                             f"frame height and width divisible by {s}, got {h}x{w}")
        x = pixels.astype(self.dtype) * 2.0 - 1.0
        for i, c in enumerate(self.channels):
            x = self._block(x, c, 2, f"level_{i}_down")
            x = self._block(x, c, 1, f"level_{i}_conv")
        x = nn.Conv(self.features, (1, 1), padding="VALID", dtype=self.dtype, name="proj",
                    kernel_init=layers.axes(nn.initializers.lecun_normal(),
                                            None, None, "conv_in", "embed"),
                    bias_init=layers.axes(nn.initializers.zeros, "embed"))(x)
        tokens = x.reshape(b, (h // s) * (w // s), self.features).astype(jnp.float32)
        return nn.with_logical_constraint(tokens, ("act_batch", "act_length", "act_embed"))

    def _block(self, x, width: int, stride: int, name: str):
        """3x3 conv (symmetric padding 1, so stride 2 halves even sizes) -> GroupNorm -> SiLU."""
        x = nn.Conv(width, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                    dtype=self.dtype, name=name,
                    kernel_init=layers.axes(nn.initializers.lecun_normal(),
                                            None, None, "conv_in", "conv_out"),
                    bias_init=layers.axes(nn.initializers.zeros, "conv_out"))(x)
        x = nn.GroupNorm(num_groups=num_groups(width, self.max_groups), epsilon=1e-6,
                         dtype=self.dtype, name=f"{name}_norm",
                         scale_init=layers.axes(nn.initializers.ones, "conv_out"),
                         bias_init=layers.axes(nn.initializers.zeros, "conv_out"))(x)
        return nn.silu(x)


def build_conv_motion_encoder(model_cfg: ml_collections.ConfigDict) -> ConvMotionEncoder:
    """ConvMotionEncoder from `config.model` (conv_motion_encoder.channels/features, dtype)."""
    cfg = model_cfg.conv_motion_encoder
    channels = tuple(int(c) for c in cfg.channels)
    if not channels or min(channels) < 1:
        raise ValueError(f"model.conv_motion_encoder.channels must be a non-empty tuple of "
                         f"positive widths, got {tuple(cfg.channels)}")
    if int(cfg.features) < 1:
        raise ValueError(f"model.conv_motion_encoder.features must be positive, got {cfg.features}")
    return ConvMotionEncoder(channels=channels, features=int(cfg.features),
                             dtype=jnp.dtype(model_cfg.dtype))
