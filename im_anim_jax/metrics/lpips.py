"""LPIPS v0.1 (richzhang/PerceptualSimilarity, the `lpips` package) in Flax.

d(a, b) for two images in [0, 1]: 2x - 1 (the package's normalize=True) -> ScalingLayer
((x - shift) / scale, shift (-.030, -.088, -.188), scale (.458, .448, .450)) -> the torchvision
VGG16 or AlexNet `features` trunk, tapped at the ReLU closing each of its 5 slices -> per layer:
unit-normalise the channels (x / (||x|| + 1e-10)), squared difference, the 1x1 bias-free `lin{k}`
head, spatial mean -> sum over the layers. `rescale=False` skips the 2x - 1: DisCo's
compute_lpips (LPIPS(net='vgg') called on [0, 1] tensors without normalize=True) does that, so
its published LPIPS values need it.

Parameter paths: trunk `features_{i}/{kernel,bias}` (torchvision `features.{i}.weight/bias`),
heads `lin{k}/kernel` [C, 1] (`lin{k}.model.1.weight` [1, C, 1, 1]).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from im_anim_jax.models import layers

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10
# torchvision `features`: convs (index, out channels, kernel, stride, padding), each followed by a
# ReLU; "pool" = max pool; `taps`: the convs whose ReLU closes an LPIPS slice.
NETS = {
    "vgg": dict(pool=(2, 2), taps=(2, 7, 14, 21, 28), layers=(
        (0, 64, 3, 1, 1), (2, 64, 3, 1, 1), "pool", (5, 128, 3, 1, 1), (7, 128, 3, 1, 1), "pool",
        (10, 256, 3, 1, 1), (12, 256, 3, 1, 1), (14, 256, 3, 1, 1), "pool",
        (17, 512, 3, 1, 1), (19, 512, 3, 1, 1), (21, 512, 3, 1, 1), "pool",
        (24, 512, 3, 1, 1), (26, 512, 3, 1, 1), (28, 512, 3, 1, 1))),
    "alex": dict(pool=(3, 2), taps=(0, 3, 6, 8, 10), layers=(
        (0, 64, 11, 4, 2), "pool", (3, 192, 5, 1, 2), "pool", (6, 384, 3, 1, 1),
        (8, 256, 3, 1, 1), (10, 256, 3, 1, 1))),
}


def trunk_convs(net: str) -> list[tuple]:
    """[(index, out, kernel, stride, padding)] of the trunk of `net`."""
    return [spec for spec in NETS[net]["layers"] if spec != "pool"]


def tap_channels(net: str) -> list[int]:
    """Channels of the 5 tapped trunk layers of `net` (the heads' widths)."""
    return [out for i, out, *_ in trunk_convs(net) if i in NETS[net]["taps"]]


class LPIPS(nn.Module):
    """(a, b) [N, H, W, 3] in [0, 1] -> LPIPS distance [N] (float32)."""
    net: str = "vgg"
    rescale: bool = True

    def _trunk(self, x) -> list:
        spec, taps = NETS[self.net], []
        init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        for layer in spec["layers"]:
            if layer == "pool":
                window, stride = spec["pool"]
                x = nn.max_pool(x, (window, window), strides=(stride, stride))
                continue
            i, out, k, s, p = layer
            x = nn.relu(nn.Conv(out, (k, k), (s, s), ((p, p), (p, p)), name=f"features_{i}",
                                precision=jax.lax.Precision.HIGHEST,
                                kernel_init=layers.axes(init, None, None, "conv_in", "conv_out"),
                                bias_init=layers.axes(nn.initializers.zeros, "conv_out"))(x))
            if i in spec["taps"]:
                taps.append(x)
        return taps

    @nn.compact
    def __call__(self, a, b):
        if self.net not in NETS:
            raise ValueError(f"LPIPS net {self.net!r} not in {sorted(NETS)}")
        if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"expected two images [N, H, W, 3] of one shape, found {a.shape} "
                             f"and {b.shape}")
        x = jnp.concatenate([a, b]).astype(jnp.float32)
        x = 2 * x - 1 if self.rescale else x
        x = (x - jnp.array(SHIFT)) / jnp.array(SCALE)
        total = 0.0
        for k, feats in enumerate(self._trunk(x)):
            feats = feats / (jnp.sqrt(jnp.sum(feats ** 2, axis=-1, keepdims=True)) + EPS)
            fa, fb = jnp.split(feats, 2)
            head = nn.Dense(1, use_bias=False, name=f"lin{k}", precision=jax.lax.Precision.HIGHEST,
                            kernel_init=layers.axes(nn.initializers.ones, "conv_in", None))
            total = total + head((fa - fb) ** 2).mean(axis=(1, 2, 3))
        return total


def abstract_params(net: str) -> dict:
    """ShapeDtypeStructs of LPIPS(net)'s params (unboxed)."""
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return nn.unbox(jax.eval_shape(LPIPS(net).init, jax.random.key(0), x, x)["params"])
