"""The Wan2.2 video VAE (z 48; 4x temporal, 16x spatial compression), channels-last.

video [B, 1+4k, H, W, 3] in [-1, 1] -> 2x2 patchify (12 channels) -> causal 3D conv encoder ->
mean latents, normalised z = (mu - mean) / std -> [B, 1+k, H/16, W/16, z]; the decoder mirrors it.
Causal convs pad time only in front. Frame 0 is special, as upstream: the time downsampling
passes it through and convolves the rest with stride 2; the time upsampling passes it through and
doubles the rest (its shortcut drops the first duplicate).

Two ways to run, same result (`encode`/`decode` below): the whole clip at once, or streamed in
chunks as upstream (frame 0, then 4 frames per chunk to encode; one latent frame per chunk to
decode) with `jax.lax.scan`. Each causal conv keeps its last input frames in the `cache`
collection (zeros at the start of a clip), so memory is bounded by the chunk.

Parameter paths mirror the PyTorch state dict (`encoder.downsamples.0.downsamples.1.residual.2
.weight` -> `encoder/downsamples_0/downsamples_1/residual_2/kernel`).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from im_anim_jax.models import layers

CACHE_T = 2  # frames a causal 3x3x3 conv remembers between chunks
# Per-channel statistics of the released VAE's latents (wan/modules/vae2_2.py).
LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
    0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
    -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
    -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
    0.3573, -0.0548, -0.1681, -0.0667)
LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)


def latent_stats(z_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, 1 / std) float32 [z_dim]: the released statistics for z 48; mean 0, std 1 for other
    (test-sized) latent widths, which have no released statistics."""
    if z_dim == len(LATENT_MEAN):
        mean, std = np.float32(LATENT_MEAN), np.float32(LATENT_STD)
    else:
        mean, std = np.zeros(z_dim, np.float32), np.ones(z_dim, np.float32)
    return mean, np.float32(1.0) / std


_TORCH_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # PyTorch's default


def _earlier_taps_zero(key, shape, dtype=jnp.float32):
    """PyTorch's default init of a causal [kt, kh, kw, C, F] kernel with every tap but the last
    zeroed: the conv starts as its per-frame 2D conv (the inflation of an image model to video),
    so the VAE's clip phase starts from what its image phase learned. The last tap is drawn as
    before, so single frames see the same initial weights."""
    return _TORCH_INIT(key, shape, dtype).at[:-1].set(0)


def _time_identity(tap: int):
    """Init of a [3, 1, 1, C, F] time conv: identity at `tap` (F = C; upstream Resample.init_weight,
    tap 1) or at `tap` onto both frames it makes (F = 2C; upstream init_weight2, tap -1)."""
    def init(key, shape, dtype=jnp.float32):
        c, f = shape[-2:]
        eye = jnp.tile(jnp.eye(c, dtype=dtype), (1, f // c))
        return jnp.zeros(shape, dtype).at[tap, 0, 0].set(eye)
    return init


def _logvar_bias(z: int, logvar: float):
    """Init of conv1's bias [2z]: 0 for the mean half, `logvar` for the log-variance half."""
    def init(key, shape, dtype=jnp.float32):
        return jnp.zeros(shape, dtype).at[z:].set(logvar)
    return init


def _conv(module: nn.Module, x, features: int, kernel_size: tuple, strides: tuple, padding,
          dtype, last_tap_only: bool = False, init=_TORCH_INIT, bias_init=nn.initializers.zeros):
    """PyTorch ConvNd (cross-correlation + bias) on channels-last x [N, *spatial, C] with the
    parameters `kernel` [*kernel_size, C, features] and `bias` [features] of `module` (initialised
    by `init` and `bias_init`). last_tap_only (3D kernels, x [N, 1, H, W, C]): only the kernel's
    last time tap, as a 2D conv (what the full conv computes when every earlier input frame is
    zero)."""
    names = (None,) * len(kernel_size) + ("conv_in", "conv_out")
    kernel = module.param("kernel", layers.axes(init, *names),
                          (*kernel_size, x.shape[-1], features))
    bias = module.param("bias", layers.axes(bias_init, "conv_out"), (features,))
    if last_tap_only:
        y = _conv_apply(x[:, 0], kernel[-1], strides[1:], padding[1:], dtype)
        return (y + bias.astype(dtype))[:, None]
    return _conv_apply(x, kernel, strides, padding, dtype) + bias.astype(dtype)


def _conv_apply(x, kernel, strides, padding, dtype):
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if kernel.ndim == 5 and jax.default_backend() == "cpu":
        return _conv3d_as_2d(x, kernel, strides, padding)
    dims = "NDHWC" if kernel.ndim == 5 else "NHWC"
    return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                        dimension_numbers=(dims, dims[1:-1] + "IO", dims))


def _conv3d_as_2d(x, kernel, strides, padding):
    """A 3D conv x [B, T, H, W, C] * kernel [kt, kh, kw, C, F] as one 2D conv over the output
    frames with the kt time taps folded into the input channels (tap-major). Equal up to the
    order of summation; on CPU 5-8x faster forward and 4-6x with the gradient than XLA's 3D
    convolution (benchmarks/vae_conv.py), at kt times the input's memory."""
    kt, st = kernel.shape[0], strides[0]
    x = jnp.pad(x, ((0, 0), tuple(padding[0]), (0, 0), (0, 0), (0, 0)))
    b, t, h, w, c = x.shape
    n = max((t - kt) // st + 1, 0)
    taps = [x[:, i::st][:, :n] for i in range(kt)]
    folded = jnp.concatenate(taps, -1).reshape(b * n, h, w, kt * c)
    k2 = jnp.moveaxis(kernel, 0, 2).reshape(*kernel.shape[1:3], kt * c, kernel.shape[-1])
    y = jax.lax.conv_general_dilated(folded, k2, strides[1:], padding[1:],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(b, n, *y.shape[1:])


def _cached_frames(module: nn.Module, name: str, x, n: int):
    """The last `n` frames before x [B, T, ...] (zeros at the start of a clip) from the `cache`
    collection."""
    if module.has_variable("cache", name):
        return module.get_variable("cache", name).astype(x.dtype)
    return jnp.zeros((x.shape[0], n) + x.shape[2:], x.dtype)


def _remember(module: nn.Module, name: str, frames):
    if module.is_mutable_collection("cache"):
        module.put_variable("cache", name, frames)


class CausalConv3d(nn.Module):
    """Conv3d on x [B, T, H, W, C], padded in space by kernel // 2 and in time by kernel - 1
    frames in front: the previous chunk's last frames (cache `frames`), zeros at frame 0."""
    features: int
    kernel_size: tuple = (3, 3, 3)
    dtype: layers.Dtype = jnp.float32
    bias_init: nn.initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        kt, kh, kw = self.kernel_size
        # A single frame starting a clip (e.g. an image) sees only zeros through the earlier time
        # taps: a 2D conv with the last tap gives the same result at 1/kt of the cost.
        single = kt > 1 and x.shape[1] == 1 and not self.has_variable("cache", "frames")
        if kt > 1:
            x = jnp.concatenate([_cached_frames(self, "frames", x, kt - 1), x], axis=1)
            _remember(self, "frames", x[:, -(kt - 1):])
        pad = ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2))
        if single:
            x = x[:, -1:]
        return _conv(self, x, self.features, self.kernel_size, (1, 1, 1), pad, self.dtype,
                     last_tap_only=single, init=_earlier_taps_zero if kt > 1 else _TORCH_INIT,
                     bias_init=self.bias_init)


class Conv2d(nn.Module):
    """Per-frame Conv2d on x [B, T, H, W, C]."""
    features: int
    kernel_size: tuple
    stride: int = 1
    padding: tuple = ((0, 0), (0, 0))
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t = x.shape[:2]
        y = _conv(self, x.reshape((b * t,) + x.shape[2:]), self.features, self.kernel_size,
                  (self.stride,) * 2, self.padding, self.dtype)
        return y.reshape((b, t) + y.shape[1:])


class RMSNorm(nn.Module):
    """x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma (upstream RMS_norm, no bias)."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        gamma = self.param("gamma", layers.axes(nn.initializers.ones, "conv_out"), (c,))
        h = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(h * h, axis=-1, keepdims=True))
        return (h / jnp.maximum(norm, 1e-12) * math.sqrt(c) * gamma).astype(x.dtype)


class ResidualBlock(nn.Module):
    """x -> norm, SiLU, causal conv, norm, SiLU, causal conv (+ x, 1x1x1 conv if widths differ)."""
    features: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = x
        if x.shape[-1] != self.features:
            h = CausalConv3d(self.features, (1, 1, 1), self.dtype, name="shortcut")(x)
        x = CausalConv3d(self.features, dtype=self.dtype, name="residual_2")(
            nn.silu(RMSNorm(name="residual_0")(x)))
        x = CausalConv3d(self.features, dtype=self.dtype, name="residual_6")(
            nn.silu(RMSNorm(name="residual_3")(x)))
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H * W positions of each frame, plus x."""
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        b, t, h, w, c = x.shape
        qkv = Conv2d(3 * c, (1, 1), dtype=self.dtype, name="to_qkv")(RMSNorm(name="norm")(x))
        q, k, v = jnp.split(qkv.reshape(b * t, h * w, 1, 3 * c), 3, axis=-1)
        y = layers.attention(q, k, v, self.attention_impl).reshape(b, t, h, w, c)
        return x + Conv2d(c, (1, 1), dtype=self.dtype, name="proj")(y)


class Resample(nn.Module):
    """2x spatial down (zero pad right/bottom, 3x3 stride 2) or up (nearest, 3x3), with 2x time
    down/up for the `3d` modes. Frame 0 (`first`) is passed through the time resampling."""
    mode: str  # downsample2d | downsample3d | upsample2d | upsample3d
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, first: bool):
        c = x.shape[-1]
        if self.mode == "upsample3d":
            x = self._time_up(x, first)
        if self.mode.startswith("up"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
            return Conv2d(c, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                          name="resample_1")(x)
        x = Conv2d(c, (3, 3), stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype,
                   name="resample_1")(x)
        return self._time_down(x, first) if self.mode == "downsample3d" else x

    def _time_down(self, x, first):
        """Frames (2j, 2j+1, 2j+2) -> frame j+1 by a stride-2 time conv; frame 0 kept as is."""
        s = x if first else jnp.concatenate([_cached_frames(self, "time", x, 1), x], axis=1)
        _remember(self, "time", s[:, -1:])
        y = TimeConv(x.shape[-1], stride=2, dtype=self.dtype, name="time_conv")(s)
        return jnp.concatenate([x[:, :1], y], axis=1) if first else y

    def _time_up(self, x, first):
        """Frame i >= 1 -> frames (2i-1, 2i) by a causal time conv to 2C channels over frames
        1, 2, ... (frame 0 is not in its context); frame 0 kept as is."""
        s = x[:, 1:] if first else x
        s = jnp.concatenate([_cached_frames(self, "time", x, CACHE_T), s], axis=1)
        _remember(self, "time", s[:, -CACHE_T:])
        b, n, h, w, c = s.shape
        y = TimeConv(2 * c, stride=1, dtype=self.dtype, name="time_conv")(s)
        y = y.reshape(b, n - CACHE_T, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5)
        y = y.reshape(b, 2 * (n - CACHE_T), h, w, c)
        return jnp.concatenate([x[:, :1], y], axis=1) if first else y


class TimeConv(nn.Module):
    """Conv3d with kernel (3, 1, 1) and no padding over x [B, T, H, W, C] (T < 3: no frames);
    starts as the identity on one tap: the middle one to downsample (stride 2), the last to
    upsample."""
    features: int
    stride: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _conv(self, x, self.features, (3, 1, 1), (self.stride, 1, 1), ((0, 0),) * 3,
                     self.dtype, init=_time_identity(1 if self.stride == 2 else 2))


def avg_down(x, features: int, factor_t: int, factor_s: int):
    """Parameter-free shortcut of a down level (upstream AvgDown3D): zero-pad time in front to a
    multiple of factor_t, fold each (factor_t, factor_s, factor_s) block into channels (channel
    major), then average groups of consecutive channels down to `features`."""
    pad = -x.shape[1] % factor_t
    x = jnp.pad(x, ((0, 0), (pad, 0), (0, 0), (0, 0), (0, 0)))
    b, t, h, w, c = x.shape
    t, h, w = t // factor_t, h // factor_s, w // factor_s
    x = x.reshape(b, t, factor_t, h, factor_s, w, factor_s, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, t, h, w, features, -1).mean(axis=-1)


def dup_up(x, features: int, factor_t: int, factor_s: int, first: bool):
    """Parameter-free shortcut of an up level (upstream DupUp3D): repeat each channel, unfold
    channel groups into (factor_t, factor_s, factor_s) blocks; at frame 0 (`first`) keep only
    the last of its factor_t frames."""
    b, t, h, w, c = x.shape
    x = jnp.repeat(x, features * factor_t * factor_s * factor_s // c, axis=-1)
    x = x.reshape(b, t, h, w, features, factor_t, factor_s, factor_s)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(
        b, t * factor_t, h * factor_s, w * factor_s, features)
    return x[:, factor_t - 1:] if first else x


class DownBlock(nn.Module):
    """num_blocks residual blocks (+ Resample) + the avg_down shortcut of the input."""
    features: int
    num_blocks: int
    down: bool
    down_t: bool
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, first: bool):
        shortcut = avg_down(x, self.features, 2 if self.down_t else 1, 2 if self.down else 1)
        for j in range(self.num_blocks):
            x = ResidualBlock(self.features, self.dtype, name=f"downsamples_{j}")(x)
        if self.down:
            mode = "downsample3d" if self.down_t else "downsample2d"
            x = Resample(mode, self.dtype, name=f"downsamples_{self.num_blocks}")(x, first)
        return x + shortcut


class UpBlock(nn.Module):
    """num_blocks residual blocks (+ Resample and the dup_up shortcut of the input)."""
    features: int
    num_blocks: int
    up: bool
    up_t: bool
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, first: bool):
        h = x
        for j in range(self.num_blocks):
            h = ResidualBlock(self.features, self.dtype, name=f"upsamples_{j}")(h)
        if not self.up:
            return h
        mode = "upsample3d" if self.up_t else "upsample2d"
        h = Resample(mode, self.dtype, name=f"upsamples_{self.num_blocks}")(h, first)
        return h + dup_up(x, self.features, 2 if self.up_t else 1, 2, first)


class Encoder3d(nn.Module):
    """Patchified video [B, T, H, W, 3 p^2] -> [B, T', H / 8, W / 8, out_features]."""
    dim: int
    out_features: int
    dim_mult: tuple
    num_res_blocks: int
    temporal_downsample: tuple
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, first: bool):
        dims = [self.dim * m for m in (1,) + tuple(self.dim_mult)]
        x = CausalConv3d(dims[0], dtype=self.dtype, name="conv1")(x)
        last = len(self.dim_mult) - 1
        for i, out in enumerate(dims[1:]):
            x = DownBlock(out, self.num_res_blocks, down=i != last,
                          down_t=i != last and self.temporal_downsample[i], dtype=self.dtype,
                          name=f"downsamples_{i}")(x, first)
        x = _middle(self, x)
        return _head(self, x, self.out_features)


class Decoder3d(nn.Module):
    """Latents [B, T', h, w, z] -> patchified video [B, T, 8 h, 8 w, 3 p^2]."""
    dim: int
    out_features: int
    dim_mult: tuple
    num_res_blocks: int
    temporal_upsample: tuple
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, first: bool):
        mult = tuple(self.dim_mult)
        dims = [self.dim * m for m in (mult[-1],) + mult[::-1]]
        x = CausalConv3d(dims[0], dtype=self.dtype, name="conv1")(x)
        x = _middle(self, x)
        last = len(mult) - 1
        for i, out in enumerate(dims[1:]):
            x = UpBlock(out, self.num_res_blocks + 1, up=i != last,
                        up_t=i != last and self.temporal_upsample[i], dtype=self.dtype,
                        name=f"upsamples_{i}")(x, first)
        return _head(self, x, self.out_features)


def _middle(module, x):
    """Residual block, per-frame attention, residual block (`middle_0..2`) inside `module`."""
    c = x.shape[-1]
    x = ResidualBlock(c, module.dtype, parent=module, name="middle_0")(x)
    x = AttentionBlock(module.dtype, module.attention_impl, parent=module, name="middle_1")(x)
    return ResidualBlock(c, module.dtype, parent=module, name="middle_2")(x)


def _head(module, x, features: int):
    """RMS norm, SiLU, causal conv to `features` (`head_0`, `head_2`) inside `module`."""
    x = nn.silu(RMSNorm(parent=module, name="head_0")(x))
    return CausalConv3d(features, dtype=module.dtype, parent=module, name="head_2")(x)


def patchify(x, p: int):
    """[B, T, H, W, C] -> [B, T, H / p, W / p, C p^2]; channel c * p^2 + j * p + i for the pixel
    (i, j) of the patch (upstream "(c r q)")."""
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(b, t, h // p, w // p, c * p * p)


def unpatchify(x, p: int):
    """Inverse of `patchify`."""
    b, t, h, w, cpp = x.shape
    x = x.reshape(b, t, h, w, cpp // (p * p), p, p).transpose(0, 1, 2, 6, 3, 5, 4)
    return x.reshape(b, t, h * p, w * p, cpp // (p * p))


class WanVAE(nn.Module):
    """Encoder, decoder and the 1x1x1 convs between them (`conv1` on 2z, `conv2` on z).

    `encode`/`decode` take one chunk; `first` marks a chunk that starts the clip (a whole clip is
    one such chunk). Later chunks need the `cache` collection of the previous one (see the
    module-level `encode`/`decode`, which do the chunking).
    """
    z_dim: int = 48
    dim: int = 160
    dec_dim: int = 256
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple = (False, True, True)
    patch_size: int = 2
    # log sigma^2 of the posterior at init (the bias of conv1's log-variance half; upstream's
    # init is 0). Trained from scratch with a tiny KL weight, the posterior ends narrow (log
    # sigma^2 near -8) anyway; starting there spares the first steps the unit-variance noise.
    initial_logvar: float = 0.0
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"

    @property
    def time_factor(self) -> int:
        return 2 ** sum(bool(d) for d in self.temporal_downsample)

    @property
    def space_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)

    def setup(self):
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"VAE temporal_downsample {tuple(self.temporal_downsample)} needs one "
                             f"flag per down level ({len(self.dim_mult) - 1} for dim_mult "
                             f"{tuple(self.dim_mult)})")
        enc = dict(dim_mult=tuple(self.dim_mult), num_res_blocks=self.num_res_blocks,
                   dtype=self.dtype, attention_impl=self.attention_impl)
        self.encoder = Encoder3d(self.dim, 2 * self.z_dim,
                                 temporal_downsample=tuple(self.temporal_downsample), **enc)
        self.decoder = Decoder3d(self.dec_dim, 3 * self.patch_size ** 2,
                                 temporal_upsample=tuple(self.temporal_downsample)[::-1], **enc)
        self.conv1 = CausalConv3d(2 * self.z_dim, (1, 1, 1), self.dtype,
                                  bias_init=_logvar_bias(self.z_dim, self.initial_logvar))
        self.conv2 = CausalConv3d(self.z_dim, (1, 1, 1), self.dtype)

    def _check_cache(self, first: bool):
        if not first and "cache" not in self.variables:
            raise ValueError("a chunk after the first (first=False) needs the `cache` collection "
                             "returned by the previous chunk (apply(..., mutable=['cache']))")

    def __call__(self, video):
        """Whole clip: video -> reconstruction (used to create all parameters)."""
        return self.decode(self.encode(video))

    def encode(self, video, first: bool = True):
        """video [B, T, H, W, 3] in [-1, 1] (T = 1 + 4k when `first`, else 4k) -> normalised
        latents [B, T', H / 16, W / 16, z], T' = 1 + k or k."""
        check_video(self, video.shape, first)
        self._check_cache(first)
        x = self.encoder(patchify(video.astype(self.dtype), self.patch_size), first)
        mu = self.conv1(x)[..., :self.z_dim].astype(jnp.float32)
        mean, inv_std = latent_stats(self.z_dim)
        return (mu - mean) * inv_std

    def decode(self, latents, first: bool = True):
        """Normalised latents [B, T', h, w, z] -> video [B, T, 16 h, 16 w, 3] around [-1, 1]
        (not clipped), T = 1 + 4 (T' - 1) when `first`, else 4 T'."""
        check_latents(self, latents.shape)
        self._check_cache(first)
        mean, inv_std = latent_stats(self.z_dim)
        z = latents.astype(jnp.float32) / inv_std + mean
        x = self.decoder(self.conv2(z.astype(self.dtype)), first)
        return unpatchify(x, self.patch_size).astype(jnp.float32)


def check_video(model: WanVAE, shape: tuple, first: bool = True):
    """ValueError unless `shape` is a [B, T, H, W, 3] clip (chunk) the VAE can encode."""
    tf, sf = model.time_factor, model.space_factor
    frames = f"1 + {tf}k" if first else f"a multiple of {tf}"
    if len(shape) != 5 or shape[-1] != 3:
        raise ValueError(f"VAE encode expects video [B, T, H, W, 3], got shape {tuple(shape)}")
    t, h, w = shape[1:4]
    if (t - first) % tf or t < first or (not first and t == 0):
        raise ValueError(f"VAE encode expects T = {frames} frames, got T={t}")
    if h % sf or w % sf or h == 0 or w == 0:
        raise ValueError(f"VAE encode expects H and W to be multiples of {sf}, got {h}x{w}")


def check_latents(model: WanVAE, shape: tuple):
    """ValueError unless `shape` is a [B, T', h, w, z] latent clip (chunk)."""
    if len(shape) != 5 or shape[-1] != model.z_dim or 0 in shape[1:4]:
        raise ValueError(f"VAE decode expects latents [B, T' >= 1, h, w, {model.z_dim}], got "
                         f"shape {tuple(shape)}")


def encode(model: WanVAE, params, video, chunked: bool = False):
    """video [B, 1 + 4k, H, W, 3] in [-1, 1] -> latents [B, 1 + k, H / 16, W / 16, z].
    `chunked`: frame 0, then 4 frames at a time (jax.lax.scan), as upstream; same result."""
    check_video(model, video.shape)
    if not chunked:
        return model.apply({"params": params}, video, method=WanVAE.encode)
    b, t = video.shape[:2]
    chunk = model.time_factor
    rest = video[:, 1:].reshape((b, (t - 1) // chunk, chunk) + video.shape[2:])
    return _stream(model, params, WanVAE.encode, video[:, :1], rest)


def decode(model: WanVAE, params, latents, chunked: bool = False, clip: bool = True):
    """latents [B, T', h, w, z] -> video [B, 1 + 4 (T' - 1), 16 h, 16 w, 3], clipped to [-1, 1]
    unless `clip` is False. `chunked`: one latent frame at a time (jax.lax.scan), as upstream."""
    check_latents(model, latents.shape)
    if chunked:
        out = _stream(model, params, WanVAE.decode, latents[:, :1], latents[:, 1:, None])
    else:
        out = model.apply({"params": params}, latents, method=WanVAE.decode)
    return jnp.clip(out, -1.0, 1.0) if clip else out


def _stream(model, params, method, head, rest):
    """method(head, first=True), then method(chunk, first=False) for each chunk of rest
    [B, n, chunk...], threading the `cache` collection; outputs concatenated in time."""
    out, state = model.apply({"params": params}, head, method=method, mutable=["cache"])
    if rest.shape[1] == 0:
        return out

    def step(cache, chunk):
        y, new = model.apply({"params": params, **cache}, chunk, first=False, method=method,
                             mutable=["cache"])
        return new, y

    _, ys = jax.lax.scan(step, state, jnp.moveaxis(rest, 1, 0))
    ys = jnp.moveaxis(ys, 0, 1)
    return jnp.concatenate([out, ys.reshape((ys.shape[0], -1) + ys.shape[3:])], axis=1)


def build_vae(vae_cfg: ml_collections.ConfigDict, dtype=jnp.float32,
              attention_impl: str = "xla") -> WanVAE:
    """WanVAE from `config.model.vae`."""
    return WanVAE(z_dim=vae_cfg.z_dim, dim=vae_cfg.dim, dec_dim=vae_cfg.dec_dim,
                  dim_mult=tuple(vae_cfg.dim_mult), num_res_blocks=vae_cfg.num_res_blocks,
                  temporal_downsample=tuple(vae_cfg.temporal_downsample),
                  patch_size=vae_cfg.patch_size,
                  initial_logvar=vae_cfg.initial_logvar, dtype=jnp.dtype(dtype),
                  attention_impl=attention_impl)
