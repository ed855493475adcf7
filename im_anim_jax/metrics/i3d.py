"""The Kinetics-400 I3D (Inception-v1 inflated to 3D) of FVD, in Flax.

The network of piergiaj/pytorch-i3d's `InceptionI3d` with the weights `i3d_pretrained_400.pt`
that DisCo's FVD ("FVD-3DInception", tool/metrics/metric_center.py) and VideoGPT/TATS-style FVD
code load; FVD uses its 400-d logits (the original TF FVD used the Kinetics-400 TF-Hub module's
logits, too). video [B, T, H, W, 3] in [0, 1] (16-frame clips in the FVD convention) -> bicubic
antialiased resize of every frame to 224x224 (DisCo resizes with PIL bicubic on uint8; this is
the same filter in float, not bit-exact) -> 2x - 1 -> Unit3D stem and 9 Inception modules with
TensorFlow "SAME" padding (zeros, also before max pools) -> mean over time and space of Mixed_5c
-> 1x1x1 `logits` conv -> [B, 400]. At 224 px and 16 frames this equals the port's
AvgPool3d([1, 7, 7]) + logits + mean over time (the logits are linear).

Parameter paths mirror the PyTorch state dict (`Mixed_4b.b1b.conv3d.weight` ->
`Mixed_4b/b1b/conv3d/kernel`; `bn.running_var` -> `bn/var`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from im_anim_jax.metrics.layers import ConvBN, max_pool_same_zero

SIZE = 224
FRAMES = 16
NUM_CLASSES = 400
# (name, [b0, b1a, b1b, b2a, b2b, b3b] output channels)
MIXED = (
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
)
POOL_BEFORE = {"Mixed_4b": ((3, 3, 3), (2, 2, 2)), "Mixed_5b": ((2, 2, 2), (2, 2, 2))}


def _unit(name, features, kernel=1, stride=1, **kw):
    return ConvBN(features, (kernel,) * 3, (stride,) * 3, "SAME", conv_name="conv3d", name=name,
                  **kw)


class InceptionModule(nn.Module):
    out: tuple

    @nn.compact
    def __call__(self, x):
        o = self.out
        b0 = _unit("b0", o[0])(x)
        b1 = _unit("b1b", o[2], 3)(_unit("b1a", o[1])(x))
        b2 = _unit("b2b", o[4], 3)(_unit("b2a", o[3])(x))
        b3 = _unit("b3b", o[5])(max_pool_same_zero(x, (3, 3, 3), (1, 1, 1)))
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionI3d(nn.Module):
    """video [B, T, H, W, 3] in [0, 1] -> Kinetics logits [B, 400] (float32).
    `size`: the frame resize target (224; smaller only for tests)."""
    size: int = SIZE
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, video):
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"expected video [B, T, H, W, 3], found shape {video.shape}")
        b, t = video.shape[:2]
        x = jax.image.resize(video.astype(jnp.float32), (b, t, self.size, self.size, 3),
                             "bicubic", antialias=True)
        x = 2 * x - 1
        x = _unit("Conv3d_1a_7x7", 64, 7, stride=2)(x)
        x = max_pool_same_zero(x, (1, 3, 3), (1, 2, 2))
        x = _unit("Conv3d_2c_3x3", 192, 3)(_unit("Conv3d_2b_1x1", 64)(x))
        x = max_pool_same_zero(x, (1, 3, 3), (1, 2, 2))
        for name, out in MIXED:
            if name in POOL_BEFORE:
                x = max_pool_same_zero(x, *POOL_BEFORE[name])
            x = InceptionModule(out, name=name)(x)
        x = x.mean(axis=(1, 2, 3), keepdims=True)
        x = _unit("logits", self.num_classes, bn_eps=None, use_bias=True, relu=False)(x)
        return x.reshape(b, self.num_classes)


def abstract_params() -> dict:
    """ShapeDtypeStructs of the I3D params (unboxed; they do not depend on `size`)."""
    shape = jax.ShapeDtypeStruct((1, FRAMES, SIZE, SIZE, 3), jnp.float32)
    return nn.unbox(jax.eval_shape(InceptionI3d().init, jax.random.key(0), shape)["params"])
