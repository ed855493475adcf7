"""A CLIP vision transformer (the image encoder of the Pose Indicator, Animate-X sec. 3.2).

Maths and parameter names follow Hugging Face transformers' `CLIPVisionModel` (state-dict prefix
`vision_model.`), so its checkpoints convert one to one (convert/clip_vit.py):

    pixels [B, S, S, 3] (CLIP-normalised) --conv patch embed (no bias)--> [B, N, W]
    [class_embedding ++ patches] + position_embedding --pre_layrnorm (sic, HF's spelling)-->
    `depth` pre-LN layers: x += out_proj(attn(q_proj, k_proj, v_proj)(layer_norm1(x)));
                           x += fc2(act(fc1(layer_norm2(x))))
    -> last_hidden_state [B, 1 + N, W];  pooled = post_layernorm(last_hidden_state[:, 0]) [B, W]

`hidden_act`: "quick_gelu" (x * sigmoid(1.702 x), OpenAI CLIP) or "gelu" (exact, the LAION
CLIP-H/14 of Stable Diffusion 2.1 that Animate-X uses). LayerNorm eps 1e-5. The layers are stacked
with nn.scan (leading `layers` axis) and rematerialised by `remat_policy`.

Logical axes: q/k/v kernels (embed, heads, head_dim), out_proj (heads, head_dim, embed), fc1
(embed, mlp), fc2 (mlp, embed), patch kernel (None, None, conv_in, embed), embeddings (None,
embed), LayerNorms (embed).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from im_anim_jax.models import layers

ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: nn.gelu(x, approximate=False)}
# OpenAI CLIP's preprocessing (also LAION's): pixels in [0, 1] -> (x - mean) / std per channel.
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


def normalise(pixels):
    """[..., 3] pixels in [0, 1] -> CLIP-normalised float32."""
    return (pixels.astype(jnp.float32) - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (biases), scale head_dim^-0.5."""
    num_heads: int
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x):  # [B, L, W] -> [B, L, W]
        w = x.shape[-1]
        h, d = self.num_heads, w // self.num_heads

        def proj(name):
            return layers.Projection("blw,whd->blhd", (w, h, d), ("embed", "heads", "head_dim"),
                                     (h, d), ("heads", "head_dim"), fan_in=(0,), fan_out=(1, 2),
                                     dtype=self.dtype, name=name)(x)

        q = nn.with_logical_constraint(proj("q_proj"), ("act_batch", "act_length", "act_heads",
                                                        None))
        out = layers.attention(q, proj("k_proj"), proj("v_proj"), self.attention_impl)
        return layers.Projection("blhd,hdw->blw", (h, d, w), ("heads", "head_dim", "embed"), (w,),
                                 ("embed",), fan_in=(0, 1), fan_out=(2,), dtype=self.dtype,
                                 name="out_proj")(out)


class CLIPEncoderLayer(nn.Module):
    num_heads: int
    mlp_dim: int
    hidden_act: str = "gelu"
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x, _=None):
        w = x.shape[-1]
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        x = x + CLIPAttention(self.num_heads, self.dtype, self.attention_impl, name="self_attn")(
            layers.layer_norm("layer_norm1", self.dtype)(x))
        h = layers.layer_norm("layer_norm2", self.dtype)(x)
        h = layers.dense(self.mlp_dim, "embed", "mlp", "fc1", self.dtype)(h)
        h = ACTIVATIONS[self.hidden_act](h)
        return x + layers.dense(w, "mlp", "embed", "fc2", self.dtype)(h), None


class CLIPVisionTransformer(nn.Module):
    """pixels [B, S, S, 3] (CLIP-normalised, S = image_size) -> (last_hidden_state
    [B, 1 + (S/p)^2, W] float32, pooled [B, W] float32)."""
    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    hidden_act: str = "gelu"
    dtype: layers.Dtype = jnp.float32
    attention_impl: str = "xla"
    remat_policy: str = "none"

    def _check(self, pixels):
        s = self.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise ValueError(f"CLIP vision transformer expects pixels [B, {s}, {s}, 3], got "
                             f"{pixels.shape}")
        if s % self.patch_size or self.width % self.num_heads:
            raise ValueError(f"CLIP ViT needs image_size ({s}) divisible by patch_size "
                             f"({self.patch_size}) and width ({self.width}) by num_heads "
                             f"({self.num_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not in {sorted(ACTIVATIONS)}")
        if self.remat_policy not in layers.REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} not in "
                             f"{sorted(layers.REMAT_POLICIES)}")

    @nn.compact
    def __call__(self, pixels):
        self._check(pixels)
        b, w = pixels.shape[0], self.width
        n = (self.image_size // self.patch_size) ** 2
        x = nn.Conv(w, (self.patch_size,) * 2, strides=(self.patch_size,) * 2, padding="VALID",
                    use_bias=False, dtype=self.dtype, name="patch_embedding",
                    kernel_init=layers.axes(nn.initializers.lecun_normal(),
                                            None, None, "conv_in", "embed"))(
            pixels.astype(self.dtype)).reshape(b, n, w)
        cls = layers.embedding_param(self, "class_embedding", (w,), w ** -0.5, "embed")
        pos = layers.embedding_param(self, "position_embedding", (n + 1, w), 0.02, None, "embed")
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, w)), x], 1)
        x = layers.layer_norm("pre_layrnorm", self.dtype)(x + pos.astype(x.dtype))
        layer = CLIPEncoderLayer
        policy = layers.REMAT_POLICIES[self.remat_policy]
        if policy is not None:
            layer = nn.remat(layer, prevent_cse=False, policy=None if policy == "full" else policy)
        stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = stack(self.num_heads, self.mlp_dim, self.hidden_act, self.dtype,
                     self.attention_impl, name="layers")(x, None)
        x = nn.with_logical_constraint(x.astype(jnp.float32),
                                       ("act_batch", "act_length", "act_embed"))
        pooled = layers.layer_norm("post_layernorm", self.dtype)(x[:, 0])
        return x, pooled.astype(jnp.float32)
