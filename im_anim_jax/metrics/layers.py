"""Building blocks shared by the metric networks: PyTorch-style conv + inference BatchNorm + ReLU,
channels-last, with parameter names mirroring the PyTorch modules (`X.conv.weight` ->
`X/conv/kernel`, `X.bn.running_mean` -> `X/bn/mean`).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from im_anim_jax.models import layers


def check_pixels(x, ndim: int, what: str) -> None:
    """ValueError unless x has `ndim` axes, 3 channels last and values in [0, 1] (NaN fails)."""
    shape = tuple(np.shape(x))
    if len(shape) != ndim or shape[-1] != 3:
        raise ValueError(f"{what}: expected {ndim} axes with 3 channels last, found shape {shape}")
    lo, hi = float(x.min()), float(x.max())  # numpy on the host, JAX on its device
    if not (0.0 <= lo and hi <= 1.0):
        raise ValueError(f"{what}: expected pixels in [0, 1], found values in [{lo}, {hi}]")


class BatchNorm(nn.Module):
    """Inference BatchNorm: (x - mean) / sqrt(var + eps) * scale + bias over the last axis."""
    eps: float

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        p = {name: self.param(name, layers.axes(init, "conv_out"), (c,))
             for name, init in (("scale", nn.initializers.ones), ("bias", nn.initializers.zeros),
                                ("mean", nn.initializers.zeros), ("var", nn.initializers.ones))}
        return (x - p["mean"]) / jnp.sqrt(p["var"] + self.eps) * p["scale"] + p["bias"]


class ConvBN(nn.Module):
    """ConvNd (cross-correlation, kernel [*k, I, O]) -> optional BatchNorm -> optional ReLU on
    channels-last x [N, *spatial, C]. `padding`: per-dim (lo, hi) pairs or "SAME" (TensorFlow's,
    more at the end: what the I3D port computes per input size). The conv module is `conv_name`."""
    features: int
    kernel: Sequence[int]
    strides: Sequence[int] | None = None
    padding: str | Sequence[tuple[int, int]] = "VALID"
    bn_eps: float | None = 1e-3  # None: no BatchNorm
    use_bias: bool = False
    relu: bool = True
    conv_name: str = "conv"

    @nn.compact
    def __call__(self, x):
        names = (None,) * len(self.kernel) + ("conv_in", "conv_out")
        init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        x = nn.Conv(self.features, tuple(self.kernel), strides=self.strides,
                    padding=self.padding, use_bias=self.use_bias, name=self.conv_name,
                    precision=jax.lax.Precision.HIGHEST, kernel_init=layers.axes(init, *names),
                    bias_init=layers.axes(nn.initializers.zeros, "conv_out"))(x)
        if self.bn_eps is not None:
            x = BatchNorm(self.bn_eps, name="bn")(x)
        return nn.relu(x) if self.relu else x


def same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (lo, hi) of one axis: total max(k - s, 0) or max(k - size % s, 0),
    the extra element at the end."""
    total = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return total // 2, total - total // 2


def max_pool_same_zero(x, window: Sequence[int], strides: Sequence[int]):
    """Max pool of x [N, *spatial, C] after zero-padding each spatial axis to TF "SAME" (as the
    PyTorch I3D port does with F.pad; inputs here follow a ReLU, so 0 never exceeds the data)."""
    pads = [(0, 0)] + [same_pad(n, k, s) for n, k, s in zip(x.shape[1:-1], window, strides)]
    x = jnp.pad(x, pads + [(0, 0)])
    return nn.max_pool(x, tuple(window), strides=tuple(strides), padding="VALID")
