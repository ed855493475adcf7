"""A PyTorch Wan2.2 DiT with the official state-dict names and maths (float64 sinusoid and RoPE,
interleaved RoPE pairs, per-token timesteps, text padded before its MLP, head modulated by e),
written for the parity tests and the benchmark from the facts in ARCHITECTURE.md sec. 5.
Channels-first video [B, C, F, H, W] as upstream; plain scaled-dot-product attention."""
import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoid(dim, t):
    """t [N] -> [N, dim]: [cos | sin] of t * 10000^(-k / (dim/2)), in float64."""
    half = dim // 2
    angle = t.double()[:, None] * torch.pow(10000.0, -torch.arange(half, dtype=torch.float64)
                                            / half)[None]
    return torch.cat([torch.cos(angle), torch.sin(angle)], 1)


def rope_angles(grid, head_dim, theta=10000.0):
    """[f*h*w, head_dim/2] float64 rotation angles: pairs split (t, h, w) as
    (c - 2 (c // 3), c // 3, c // 3) with c = head_dim / 2, each axis with its own frequencies."""
    c = head_dim // 2
    split = (c - 2 * (c // 3), c // 3, c // 3)
    f, h, w = grid
    parts = []
    for n, size, view in zip(split, grid, ((f, 1, 1), (1, h, 1), (1, 1, w))):
        freq = theta ** (-torch.arange(0, 2 * n, 2, dtype=torch.float64) / (2 * n))
        angle = torch.arange(size, dtype=torch.float64)[:, None] * freq[None]
        parts.append(angle.view(*view, n).expand(f, h, w, n))
    return torch.cat(parts, -1).reshape(f * h * w, c)


def rope(x, angles):
    """x [B, L, N, D]: complex multiply of adjacent pairs by exp(i angle), float64 -> float32."""
    b, m, n, d = x.shape
    z = torch.view_as_complex(x.double().reshape(b, m, n, d // 2, 2).contiguous())
    z = z * torch.polar(torch.ones_like(angles), angles)[None, :, None]
    return torch.view_as_real(z).reshape(b, m, n, d).float()


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) \
            * self.weight


class Attention(nn.Module):
    def __init__(self, dim, heads, eps):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, context=None, angles=None):
        src = x if context is None else context
        b, n = x.shape[0], self.heads
        q = self.norm_q(self.q(x)).view(b, -1, n, x.shape[-1] // n)
        k = self.norm_k(self.k(src)).view(b, -1, n, x.shape[-1] // n)
        v = self.v(src).view(b, -1, n, x.shape[-1] // n)
        if angles is not None:
            q, k = rope(q, angles), rope(k, angles)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(y.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, dim, ffn_dim, heads, eps):
        super().__init__()
        self.eps = eps
        self.self_attn = Attention(dim, heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)
        self.cross_attn = Attention(dim, heads, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def norm(self, x):
        return F.layer_norm(x.float(), x.shape[-1:], eps=self.eps)

    def forward(self, x, e0, context, angles):  # e0 [B, L, 6, dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation[None] + e0).unbind(2)
        x = x + self.self_attn(self.norm(x) * (1 + scale1) + shift1, angles=angles) * gate1
        x = x + self.cross_attn(self.norm3(x), context=context)
        return x + self.ffn(self.norm(x) * (1 + scale2) + shift2) * gate2


class Head(nn.Module):
    def __init__(self, dim, out_features, eps):
        super().__init__()
        self.eps = eps
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x, e):  # e [B, L, dim]
        shift, scale = (self.modulation[None] + e[:, :, None]).unbind(2)
        return self.head(F.layer_norm(x.float(), x.shape[-1:], eps=self.eps) * (1 + scale) + shift)


class WanModel(nn.Module):
    def __init__(self, dim, ffn_dim, num_heads, num_layers, text_dim, text_len, freq_dim,
                 patch_size=(1, 2, 2), in_dim=48, out_dim=48, eps=1e-6):
        super().__init__()
        self.dim, self.heads, self.freq_dim, self.text_len = dim, num_heads, freq_dim, text_len
        self.patch_size, self.out_dim = tuple(patch_size), out_dim
        self.patch_embedding = nn.Conv3d(in_dim, dim, patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(),
                                            nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(dim, ffn_dim, num_heads, eps)
                                    for _ in range(num_layers))
        self.head = Head(dim, math.prod(patch_size) * out_dim, eps)

    def embed_time(self, t):
        """t [B, L] -> e [B, L, dim], e0 [B, L, 6, dim]."""
        b, n = t.shape
        e = self.time_embedding(sinusoid(self.freq_dim, t.flatten()).float()).view(b, n, -1)
        return e, self.time_projection(e).unflatten(2, (6, self.dim))

    def embed_text(self, prompts):
        """prompts: list of [L_i, text_dim] -> zero-padded to text_len, then the text MLP."""
        return self.text_embedding(torch.stack(
            [torch.cat([u, u.new_zeros(self.text_len - u.shape[0], u.shape[1])]) for u in prompts]))

    def forward(self, x, t, prompts):
        """x [B, C, F, H, W], t [B] or [B, L], prompts: list of [L_i, text_dim]
        -> [B, out, F, H, W]."""
        x = self.patch_embedding(x)
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        if t.dim() == 1:
            t = t[:, None].expand(-1, x.shape[1])
        e, e0 = self.embed_time(t)
        context = self.embed_text(prompts)
        angles = rope_angles(grid, self.dim // self.heads)
        for block in self.blocks:
            x = block(x, e0, context, angles)
        x = self.head(x, e)
        b, c = x.shape[0], self.out_dim
        x = x.view(b, *grid, *self.patch_size, c)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(b, c, *[g * p for g, p in zip(grid, self.patch_size)])
