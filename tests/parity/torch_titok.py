"""A PyTorch TiTok encoder + quantizer with the official state-dict names and maths (tiny sizes),
written for the parity tests from the facts in ARCHITECTURE.md sec. 4."""
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)),
                                              ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x):  # [L, N, D]
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, image_size, patch, width, depth, heads, num_latent, token_size, is_legacy):
        super().__init__()
        self.grid, self.width, self.n, self.c = image_size // patch, width, num_latent, token_size
        self.is_legacy = is_legacy
        scale = width ** -0.5
        self.patch_embed = nn.Conv2d(3, width, patch, stride=patch, bias=True)
        self.class_embedding = nn.Parameter(scale * torch.randn(1, width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid ** 2 + 1, width))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(num_latent, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([Block(width, heads) for _ in range(depth)])
        self.ln_post = nn.LayerNorm(width)
        self.conv_out = nn.Conv2d(width, token_size, kernel_size=1, bias=True)

    def forward(self, pixels, latent_tokens):  # pixels [B, 3, H, W]
        b = pixels.shape[0]
        x = self.patch_embed(pixels).reshape(b, self.width, -1).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.expand(b, 1, -1), x], 1) + self.positional_embedding
        lat = (latent_tokens + self.latent_token_positional_embedding).expand(b, -1, -1)
        x = self.ln_pre(torch.cat([x, lat], 1)).permute(1, 0, 2)
        for block in self.transformer:
            x = block(x)
        x = self.ln_post(x.permute(1, 0, 2)[:, 1 + self.grid ** 2:])
        if self.is_legacy:  # raw memory reinterpretation, no transpose (the legacy quirk)
            x = x.reshape(b, self.width, self.n, 1)
        else:
            x = x.reshape(b, self.n, self.width, 1).permute(0, 2, 1, 3)
        return self.conv_out(x).reshape(b, self.c, 1, self.n)


class TiTok(nn.Module):
    """latent_tokens, encoder.*, quantize.embedding, plus an image decoder the converter skips."""

    def __init__(self, image_size=32, patch=8, width=32, depth=2, heads=2, num_latent=8,
                 token_size=12, codebook=64, is_legacy=True):
        super().__init__()
        self.encoder = Encoder(image_size, patch, width, depth, heads, num_latent, token_size,
                               is_legacy)
        self.latent_tokens = nn.Parameter(width ** -0.5 * torch.randn(num_latent, width))
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(codebook, token_size)
        self.decoder = nn.Linear(token_size, 4)  # stands in for the pixel decoder: skipped

    def forward(self, pixels):
        """pixels [B, 3, H, W] in [0, 1] -> (encoder output z [B, N, C], code indices [B, N])."""
        z = self.encoder(pixels, self.latent_tokens)[:, :, 0].permute(0, 2, 1)
        zn = F.normalize(z, dim=-1)
        book = F.normalize(self.quantize.embedding.weight, dim=-1)
        d = (zn ** 2).sum(-1, keepdim=True) + (book ** 2).sum(-1) - 2 * zn @ book.T
        return z, d.argmin(-1)
