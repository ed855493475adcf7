"""A PyTorch Wan2.2 VAE with the official state-dict names and maths (wan/modules/vae2_2.py),
written for the parity tests from the facts in ARCHITECTURE.md sec. 6. Layout [B, C, T, H, W].

Like upstream, encode and decode always stream: frame 0, then 4 frames per chunk to encode, one
latent frame per chunk to decode, every causal conv keeping its last 2 input frames in a cache
slot (slots taken in call order); the time resampling treats the first chunk specially.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

CACHE_T = 2


class Cache:
    """Feature caches of one streamed pass: `slot()` hands out the next index of this chunk."""

    def __init__(self):
        self.values, self.index = [], 0

    def new_chunk(self):
        self.index = 0

    def slot(self) -> int:
        if self.index == len(self.values):
            self.values.append(None)
        self.index += 1
        return self.index - 1


class CausalConv3d(nn.Conv3d):
    """Conv3d padded 2 * pad_t frames in front in time (cached frames first, then zeros)."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__(cin, cout, kernel, stride=stride, padding=0)
        p = (padding,) * 3 if isinstance(padding, int) else padding
        self.front, self.space = 2 * p[0], (p[2], p[2], p[1], p[1])

    def forward(self, x, cached=None):
        front = self.front
        if cached is not None and front > 0:
            x = torch.cat([cached, x], 2)
            front -= cached.shape[2]
        return super().forward(F.pad(x, self.space + (front, 0)))


def cached_conv(conv, x, cache):
    """Upstream's cache rule: the conv sees the slot's frames; the slot keeps the last 2 input
    frames (the previous chunk's last frame first when this chunk has only one)."""
    if cache is None:
        return conv(x)
    i = cache.slot()
    prev = cache.values[i]
    keep = x[:, :, -CACHE_T:]
    if keep.shape[2] < 2 and prev is not None:
        keep = torch.cat([prev[:, :, -1:], keep], 2)
    y = conv(x, prev)
    cache.values[i] = keep
    return y


class RMS_norm(nn.Module):
    def __init__(self, dim, images=False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1),
            RMS_norm(cout), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(cout, cout, 3, padding=1))
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, cache=None):
        h = self.shortcut(x)
        for layer in self.residual:
            x = cached_conv(layer, x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = RMS_norm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        b, c, t, h, w = x.shape
        y = self.norm(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        q, k, v = self.to_qkv(y).reshape(b * t, 1, 3 * c, h * w).permute(0, 1, 3, 2).chunk(3, -1)
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1).permute(0, 2, 1)
        y = self.proj(y.reshape(b * t, c, h, w))
        return x + y.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


def per_frame(fn, x):
    b, c, t, h, w = x.shape
    y = fn(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)


class Resample(nn.Module):
    def __init__(self, dim, mode):
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                nn.Conv2d(dim, dim, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)),
                                          nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x, cache):
        if self.mode == "upsample3d":
            x = self._time_up(x, cache)
        x = per_frame(self.resample, x)
        if self.mode == "downsample3d":
            i = cache.slot()
            prev = cache.values[i]
            if prev is not None:  # later chunks: the previous chunk's last frame, then stride 2
                cache.values[i] = x[:, :, -1:]
                x = self.time_conv(torch.cat([prev[:, :, -1:], x], 2))
            else:  # first chunk: passed through
                cache.values[i] = x
        return x

    def _time_up(self, x, cache):
        i = cache.slot()
        prev = cache.values[i]
        if prev is None:  # first chunk: passed through; "Rep" marks the slot
            cache.values[i] = "Rep"
            return x
        rep = isinstance(prev, str)
        keep = x[:, :, -CACHE_T:]
        if keep.shape[2] < 2:
            keep = torch.cat([torch.zeros_like(keep) if rep else prev[:, :, -1:], keep], 2)
        y = self.time_conv(x) if rep else self.time_conv(x, prev)
        cache.values[i] = keep
        b, c2, t, h, w = y.shape
        y = y.reshape(b, 2, c2 // 2, t, h, w)
        return torch.stack((y[:, 0], y[:, 1]), 3).reshape(b, c2 // 2, 2 * t, h, w)


def avg_down(x, cout, ft, fs):
    x = F.pad(x, (0, 0, 0, 0, (ft - x.shape[2] % ft) % ft, 0))
    b, c, t, h, w = x.shape
    x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    x = x.reshape(b, cout, c * ft * fs * fs // cout, t // ft, h // fs, w // fs)
    return x.mean(dim=2)


def dup_up(x, cout, ft, fs, first):
    b, c, t, h, w = x.shape
    x = x.repeat_interleave(cout * ft * fs * fs // c, dim=1)
    x = x.view(b, cout, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, cout, t * ft, h * fs, w * fs)
    return x[:, :, ft - 1:] if first else x


class Down_ResidualBlock(nn.Module):
    def __init__(self, cin, cout, mult, down_t, down):
        super().__init__()
        self.cout, self.ft, self.fs = cout, 2 if down_t else 1, 2 if down else 1
        blocks = [ResidualBlock(cin if j == 0 else cout, cout) for j in range(mult)]
        if down:
            blocks.append(Resample(cout, "downsample3d" if down_t else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)

    def forward(self, x, cache):
        y = x
        for module in self.downsamples:
            y = module(y, cache)
        return y + avg_down(x, self.cout, self.ft, self.fs)


class Up_ResidualBlock(nn.Module):
    def __init__(self, cin, cout, mult, up_t, up):
        super().__init__()
        self.cout, self.ft, self.up = cout, 2 if up_t else 1, up
        blocks = [ResidualBlock(cin if j == 0 else cout, cout) for j in range(mult)]
        if up:
            blocks.append(Resample(cout, "upsample3d" if up_t else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)

    def forward(self, x, cache, first):
        y = x
        for module in self.upsamples:
            y = module(y, cache)
        return (y + dup_up(x, self.cout, self.ft, 2, first)) if self.up else y


def middle(dim):
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def head(dim, cout):
    return nn.Sequential(RMS_norm(dim), nn.SiLU(), CausalConv3d(dim, cout, 3, padding=1))


def run_middle_head(module, x, cache):
    for layer in module.middle:
        x = layer(x, cache) if isinstance(layer, ResidualBlock) else layer(x)
    for layer in module.head:
        x = cached_conv(layer, x, cache) if isinstance(layer, CausalConv3d) else layer(x)
    return x


class Encoder3d(nn.Module):
    def __init__(self, dim, cout, dim_mult, num_res_blocks, temporal_downsample):
        super().__init__()
        dims = [dim * m for m in [1] + list(dim_mult)]
        self.conv1 = CausalConv3d(12, dims[0], 3, padding=1)
        last = len(dim_mult) - 1
        self.downsamples = nn.Sequential(*[
            Down_ResidualBlock(a, b, num_res_blocks, i != last and temporal_downsample[i],
                               i != last) for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))])
        self.middle, self.head = middle(dims[-1]), head(dims[-1], cout)

    def forward(self, x, cache):
        x = cached_conv(self.conv1, x, cache)
        for block in self.downsamples:
            x = block(x, cache)
        return run_middle_head(self, x, cache)


class Decoder3d(nn.Module):
    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temporal_upsample):
        super().__init__()
        dims = [dim * m for m in [dim_mult[-1]] + list(dim_mult)[::-1]]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = middle(dims[0])
        last = len(dim_mult) - 1
        self.upsamples = nn.Sequential(*[
            Up_ResidualBlock(a, b, num_res_blocks + 1, i != last and temporal_upsample[i],
                             i != last) for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))])
        self.head = head(dims[-1], 12)

    def forward(self, x, cache, first):
        x = cached_conv(self.conv1, x, cache)
        for layer in self.middle:
            x = layer(x, cache) if isinstance(layer, ResidualBlock) else layer(x)
        for block in self.upsamples:
            x = block(x, cache, first)
        for layer in self.head:
            x = cached_conv(layer, x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x


def patchify(x, p=2):  # b c f (h q) (w r) -> b (c r q) f h w
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, f, h // p, w // p)


def unpatchify(x, p=2):  # b (c r q) f h w -> b c f (h q) (w r)
    b, crq, f, h, w = x.shape
    x = x.reshape(b, crq // (p * p), p, p, f, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, crq // (p * p), f, h * p, w * p)


class WanVAE(nn.Module):
    """The official WanVAE_ names; `encode`/`decode` with the latent statistics (mean, 1 / std)."""

    def __init__(self, dim, dec_dim, z_dim, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                 temporal_downsample=(False, True, True)):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = Encoder3d(dim, 2 * z_dim, dim_mult, num_res_blocks, temporal_downsample)
        self.conv1 = CausalConv3d(2 * z_dim, 2 * z_dim, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dec_dim, z_dim, dim_mult, num_res_blocks,
                                 tuple(temporal_downsample)[::-1])

    def encode(self, x, mean, inv_std):
        x, cache, outs = patchify(x), Cache(), []
        for i in range(1 + (x.shape[2] - 1) // 4):
            cache.new_chunk()
            chunk = x[:, :, :1] if i == 0 else x[:, :, 1 + 4 * (i - 1):1 + 4 * i]
            outs.append(self.encoder(chunk, cache))
        mu = self.conv1(torch.cat(outs, 2))[:, :self.z_dim]
        return (mu - mean.view(1, -1, 1, 1, 1)) * inv_std.view(1, -1, 1, 1, 1)

    def decode(self, z, mean, inv_std):
        z = z / inv_std.view(1, -1, 1, 1, 1) + mean.view(1, -1, 1, 1, 1)
        x, cache, outs = self.conv2(z), Cache(), []
        for i in range(z.shape[2]):
            cache.new_chunk()
            outs.append(self.decoder(x[:, :, i:i + 1], cache, first=i == 0))
        return unpatchify(torch.cat(outs, 2))


def randomise(module: nn.Module, seed: int, scale: float = 0.3):
    """Random values for every tensor (norm gammas and biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = math.prod(p.shape[1:]) if p.dim() > 1 and "gamma" not in name else 1
            p.copy_(scale * torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
                    + (1.0 if "gamma" in name else 0.0))
