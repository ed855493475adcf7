"""pytorch-fid's InceptionV3 (the TensorFlow FID network, weights pt_inception-2015-12-05) in Flax.

pixels [N, H, W, 3] in [0, 1] -> bilinear resize to 299x299 (half-pixel centres, no
antialiasing: F.interpolate(align_corners=False)) -> 2x - 1 -> torchvision's InceptionV3 trunk
with pytorch-fid's FID patches (average pools that ignore padding in Mixed_5b-d, 6b-e, 7b; a
3x3 max pool in Mixed_7c's pool branch) -> global average pool ("pool3") -> [N, 2048].
Conv layers are bias-free + BatchNorm(eps 1e-3) + ReLU. Parameter paths mirror the PyTorch
state dict (`Mixed_6b.branch7x7_2.conv.weight` -> `Mixed_6b/branch7x7_2/conv/kernel`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from im_anim_jax.metrics.layers import ConvBN

SIZE = 299
FEATURES = 2048


def _conv(name, features, kernel, stride=1, pad=(0, 0)):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    pad = (pad, pad) if isinstance(pad, int) else pad
    return ConvBN(features, kernel, (stride, stride), ((pad[0], pad[0]), (pad[1], pad[1])),
                  name=name)


def _avg_pool_3x3(x):
    return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = _conv("branch1x1", 64, 1)(x)
        b5 = _conv("branch5x5_2", 64, 5, pad=2)(_conv("branch5x5_1", 48, 1)(x))
        b3 = _conv("branch3x3dbl_1", 64, 1)(x)
        b3 = _conv("branch3x3dbl_3", 96, 3, pad=1)(_conv("branch3x3dbl_2", 96, 3, pad=1)(b3))
        bp = _conv("branch_pool", self.pool_features, 1)(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = _conv("branch3x3", 384, 3, stride=2)(x)
        bd = _conv("branch3x3dbl_1", 64, 1)(x)
        bd = _conv("branch3x3dbl_3", 96, 3, stride=2)(_conv("branch3x3dbl_2", 96, 3, pad=1)(bd))
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        b1 = _conv("branch1x1", 192, 1)(x)
        b7 = _conv("branch7x7_1", c, 1)(x)
        b7 = _conv("branch7x7_2", c, (1, 7), pad=(0, 3))(b7)
        b7 = _conv("branch7x7_3", 192, (7, 1), pad=(3, 0))(b7)
        bd = _conv("branch7x7dbl_1", c, 1)(x)
        for i, (out, k, p) in enumerate([(c, (7, 1), (3, 0)), (c, (1, 7), (0, 3)),
                                         (c, (7, 1), (3, 0)), (192, (1, 7), (0, 3))], start=2):
            bd = _conv(f"branch7x7dbl_{i}", out, k, pad=p)(bd)
        bp = _conv("branch_pool", 192, 1)(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = _conv("branch3x3_2", 320, 3, stride=2)(_conv("branch3x3_1", 192, 1)(x))
        b7 = _conv("branch7x7x3_1", 192, 1)(x)
        b7 = _conv("branch7x7x3_2", 192, (1, 7), pad=(0, 3))(b7)
        b7 = _conv("branch7x7x3_3", 192, (7, 1), pad=(3, 0))(b7)
        b7 = _conv("branch7x7x3_4", 192, 3, stride=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """`max_pool`: pytorch-fid's Mixed_7c pools its pool branch by max, Mixed_7b by average."""
    max_pool: bool

    @nn.compact
    def __call__(self, x):
        def split(name, y):  # 1x3 and 3x1 convs side by side
            return jnp.concatenate([_conv(f"{name}a", 384, (1, 3), pad=(0, 1))(y),
                                    _conv(f"{name}b", 384, (3, 1), pad=(1, 0))(y)], axis=-1)

        b1 = _conv("branch1x1", 320, 1)(x)
        b3 = split("branch3x3_2", _conv("branch3x3_1", 384, 1)(x))
        bd = _conv("branch3x3dbl_2", 384, 3, pad=1)(_conv("branch3x3dbl_1", 448, 1)(x))
        bd = split("branch3x3dbl_3", bd)
        pooled = (nn.max_pool(x, (3, 3), padding=((1, 1), (1, 1))) if self.max_pool
                  else _avg_pool_3x3(x))
        bp = _conv("branch_pool", 192, 1)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """FID InceptionV3: pixels [N, H, W, 3] in [0, 1] -> pool3 features [N, 2048] (float32).
    `size`: the resize target (299 as pytorch-fid; smaller only for tests)."""
    size: int = SIZE

    @nn.compact
    def __call__(self, pixels):
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"expected pixels [N, H, W, 3], found shape {pixels.shape}")
        n = pixels.shape[0]
        x = jax.image.resize(pixels.astype(jnp.float32), (n, self.size, self.size, 3),
                             "bilinear", antialias=False)
        x = 2 * x - 1
        x = _conv("Conv2d_1a_3x3", 32, 3, stride=2)(x)
        x = _conv("Conv2d_2a_3x3", 32, 3)(x)
        x = _max_pool_3x3_s2(_conv("Conv2d_2b_3x3", 64, 3, pad=1)(x))
        x = _conv("Conv2d_3b_1x1", 80, 1)(x)
        x = _max_pool_3x3_s2(_conv("Conv2d_4a_3x3", 192, 3)(x))
        for name, pool in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool, name=name)(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                         ("Mixed_6e", 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(max_pool=False, name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        return x.mean(axis=(1, 2))


def abstract_params() -> dict:
    """ShapeDtypeStructs of InceptionV3's params (unboxed; they do not depend on `size`)."""
    shape = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
    return nn.unbox(jax.eval_shape(InceptionV3().init, jax.random.key(0), shape)["params"])
