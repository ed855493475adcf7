"""Hugging Face transformers CLIP vision tower -> the Pose Indicator's CLIP ViT (clip_vit.py).

Reads the `vision_model.*` tensors of a `CLIPVisionModel` / `CLIPVisionModelWithProjection` /
`CLIPModel` checkpoint (.safetensors or .bin; e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the
image encoder of Stable Diffusion 2.1 that Animate-X uses); the text tower, the projections,
`logit_scale` and the `position_ids` buffer are skipped. Sizes come from
`config.model.pose_indicator.clip` (set `hidden_act` to the checkpoint's: "gelu" for LAION
CLIP-H, "quick_gelu" for OpenAI CLIP); the image size must be the checkpoint's (its position
embedding has (S/p)^2 + 1 rows).

  python -m im_anim_jax.convert clip-vit --src model.safetensors --dst weights/clip \\
      --config configs/im_animation.py:paper
  python train.py ... --config.model.pose_indicator.clip.init_from=weights/clip
"""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from im_anim_jax.convert import common
from im_anim_jax.models.pose_indicator import build_clip_vit

MODEL = "pose_indicator"  # model_cfg = config.model.pose_indicator (its `clip` block)
PREFIX = "vision_model."
SKIPPED = (PREFIX + "embeddings.position_ids",)
STANDARD_FILES = ("model.safetensors", "pytorch_model.bin")  # Hugging Face names


def abstract_params(model_cfg) -> dict:
    """The CLIPVisionTransformer params (the `clip` subtree of the pose indicator)."""
    s = model_cfg.clip.image_size
    out = jax.eval_shape(build_clip_vit(model_cfg.clip).init, jax.random.key(0),
                         jax.ShapeDtypeStruct((1, s, s, 3), np.float32))
    return nn.unbox(out["params"])


def expected_shapes(model_cfg) -> dict[str, tuple]:
    c = model_cfg.clip
    w, p, m = c.width, c.patch_size, c.mlp_dim
    e = PREFIX + "embeddings."
    shapes = {e + "class_embedding": (w,), e + "patch_embedding.weight": (w, 3, p, p),
              e + "position_embedding.weight": ((c.image_size // p) ** 2 + 1, w)}
    for ln in ("pre_layrnorm", "post_layernorm"):
        shapes.update({f"{PREFIX}{ln}.weight": (w,), f"{PREFIX}{ln}.bias": (w,)})
    for i in range(c.depth):
        b = f"{PREFIX}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({f"{b}self_attn.{proj}.weight": (w, w),
                           f"{b}self_attn.{proj}.bias": (w,)})
        for ln in ("layer_norm1", "layer_norm2"):
            shapes.update({f"{b}{ln}.weight": (w,), f"{b}{ln}.bias": (w,)})
        shapes.update({b + "mlp.fc1.weight": (m, w), b + "mlp.fc1.bias": (m,),
                       b + "mlp.fc2.weight": (w, m), b + "mlp.fc2.bias": (w,)})
    return shapes


def keep(key: str) -> bool:
    """True for the vision tower's tensors (text tower, projections, logit scale, buffers out)."""
    return key.startswith(PREFIX) and key not in SKIPPED


def convert(sd: dict, model_cfg) -> dict:
    c = model_cfg.clip
    w, h, depth = c.width, c.num_heads, c.depth
    d = w // h
    layer = PREFIX + "encoder.layers.{}."

    def layers(key, fn=lambda x: x):
        return common.stack(sd, layer + key, depth, fn)

    flat = {
        "class_embedding": sd[PREFIX + "embeddings.class_embedding"],
        "patch_embedding/kernel": common.conv(sd[PREFIX + "embeddings.patch_embedding.weight"]),
        "position_embedding": sd[PREFIX + "embeddings.position_embedding.weight"],
        "layers/fc1/kernel": layers("mlp.fc1.weight", common.linear),
        "layers/fc1/bias": layers("mlp.fc1.bias"),
        "layers/fc2/kernel": layers("mlp.fc2.weight", common.linear),
        "layers/fc2/bias": layers("mlp.fc2.bias"),
        # nn.Linear [H * D, W] -> [W, H, D]; out_proj [W, H * D] -> [H, D, W]
        "layers/self_attn/out_proj/kernel": layers("self_attn.out_proj.weight",
                                                   lambda x: x.T.reshape(h, d, w)),
        "layers/self_attn/out_proj/bias": layers("self_attn.out_proj.bias"),
    }
    for proj in ("q_proj", "k_proj", "v_proj"):
        flat[f"layers/self_attn/{proj}/kernel"] = layers(f"self_attn.{proj}.weight",
                                                         lambda x: x.T.reshape(w, h, d))
        flat[f"layers/self_attn/{proj}/bias"] = layers(f"self_attn.{proj}.bias",
                                                       lambda x: x.reshape(h, d))
    for ln in ("pre_layrnorm", "post_layernorm"):
        flat[f"{ln}/scale"], flat[f"{ln}/bias"] = (sd[f"{PREFIX}{ln}.weight"],
                                                   sd[f"{PREFIX}{ln}.bias"])
    for ln in ("layer_norm1", "layer_norm2"):
        flat[f"layers/{ln}/scale"] = layers(f"{ln}.weight")
        flat[f"layers/{ln}/bias"] = layers(f"{ln}.bias")
    return common.unflatten(flat)
