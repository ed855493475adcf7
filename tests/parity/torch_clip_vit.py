"""A PyTorch CLIP vision tower with Hugging Face transformers' `CLIPVisionModel` state-dict names
and maths (tiny sizes), written for the parity test: patch conv without bias, class + position
embeddings, `pre_layrnorm`, pre-LN layers (separate q/k/v/out projections with biases, softmax
scale head_dim^-0.5, fc1-act-fc2), `post_layernorm` on the class token."""
import torch
import torch.nn.functional as F
from torch import nn

ACTS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}


class Embeddings(nn.Module):
    def __init__(self, image_size, patch, width):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.patch_embedding = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.position_embedding = nn.Embedding((image_size // patch) ** 2 + 1, width)
        self.register_buffer("position_ids", torch.arange((image_size // patch) ** 2 + 1)[None])

    def forward(self, pixels):  # [B, 3, S, S]
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], 1)
        return x + self.position_embedding(self.position_ids)


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width)
                                                                for _ in range(4))

    def forward(self, x):
        b, n, w = x.shape
        q, k, v = (p(x).reshape(b, n, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
        return self.out_proj((a @ v).transpose(1, 2).reshape(b, n, w))


class MLP(nn.Module):
    def __init__(self, width, mlp_dim, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(width, mlp_dim), nn.Linear(mlp_dim, width), act

    def forward(self, x):
        return self.fc2(ACTS[self.act](self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, width, heads, mlp_dim, act):
        super().__init__()
        self.self_attn = Attention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_dim, act)
        self.layer_norm2 = nn.LayerNorm(width)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, width, depth, heads, mlp_dim, act):
        super().__init__()
        self.layers = nn.ModuleList([Layer(width, heads, mlp_dim, act) for _ in range(depth)])


class VisionTransformer(nn.Module):
    def __init__(self, image_size, patch, width, depth, heads, mlp_dim, act):
        super().__init__()
        self.embeddings = Embeddings(image_size, patch, width)
        self.pre_layrnorm = nn.LayerNorm(width)  # sic: Hugging Face's spelling
        self.encoder = Encoder(width, depth, heads, mlp_dim, act)
        self.post_layernorm = nn.LayerNorm(width)

    def forward(self, pixels):
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return x, self.post_layernorm(x[:, 0])  # last_hidden_state, pooler_output


class CLIPVisionModel(nn.Module):
    """Keys `vision_model.*`; forward(pixels [B, 3, S, S]) -> (last_hidden_state, pooled)."""

    def __init__(self, image_size=32, patch=8, width=32, depth=2, heads=2, mlp_dim=64,
                 act="quick_gelu"):
        super().__init__()
        self.vision_model = VisionTransformer(image_size, patch, width, depth, heads, mlp_dim, act)

    def forward(self, pixels):
        return self.vision_model(pixels)
