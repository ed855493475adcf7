"""TiTok (bytedance/1d-tokenizer) -> our motion encoder + quantizer.

Reads the encoder half of a TiTok checkpoint (`latent_tokens`, `encoder.*`,
`quantize.embedding.weight`); its image decoders (`decoder.*`, `pixel_quantize.*`,
`pixel_decoder.*`) are not part of IM-Animation and are skipped. Sizes come from
`config.model.motion_tokenizer` / `config.model.quantizer` (TiTok-L-32 in the `paper` variant);
the legacy [N, W] -> [W, N] reshape is reproduced by the model when `is_legacy` is set.
`is_legacy` and `use_l2_norm` change the maths but no shape: when the release's `config.json`
sits beside the source, its values must be the config's (and stage1.init_from checks the
converted checkpoint's against the run's).
"""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import numpy as np

from im_anim_jax.convert import common
from im_anim_jax.models.motion_tokenizer import MotionTokenizer
from im_anim_jax.models.quantizer import VectorQuantizer

MODEL = None  # needs config.model.motion_tokenizer and .quantizer
SKIPPED_PREFIXES = ("decoder.", "pixel_quantize.", "pixel_decoder.")
STANDARD_FILES = ("model.safetensors", "pytorch_model.bin")  # Hugging Face names
MATHS_FIELDS = {"is_legacy": "motion_tokenizer", "use_l2_norm": "quantizer"}  # -> config.model.*
UPSTREAM_DEFAULTS = {"is_legacy": True}  # TiTok reads vq_model.get("is_legacy", True)


def check_maths(found: dict, model_cfg, where: str) -> None:
    """Raises ConversionError when a MATHS_FIELDS value in `found` (read from `where`) is not
    config.model's."""
    bad = [f"{field}={found[field]} in {where} but config.model.{section}.{field}="
           f"{model_cfg[section][field]}" for field, section in MATHS_FIELDS.items()
           if found.get(field) is not None and found[field] != model_cfg[section][field]]
    if bad:
        raise common.ConversionError("; ".join(bad) + " (this changes the maths, not the shapes; "
                                     "set the config to match)")


def source_meta(path: str, model_cfg) -> dict:
    """Checks the TiTok `config.json` beside `path` (if any) against config.model; -> meta."""
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    try:
        with open(config_path) as f:
            vq = dict(json.load(f)["model"]["vq_model"])
    except (OSError, ValueError, KeyError, TypeError):  # none, or not a TiTok config
        return {"source_config": None}
    check_maths({f: vq.get(f, UPSTREAM_DEFAULTS.get(f)) for f in MATHS_FIELDS}, model_cfg,
                config_path)
    return {"source_config": config_path}


def recorded_maths(meta: dict) -> dict:
    """{MATHS_FIELDS field: value} a converted checkpoint's meta.json records."""
    model = meta.get("model_config") or {}
    return {f: model.get(section, {}).get(f) for f, section in MATHS_FIELDS.items()}


def _modules(model_cfg):
    enc, q = model_cfg.motion_tokenizer, model_cfg.quantizer
    encoder = MotionTokenizer(
        image_size=enc.image_size, patch_size=enc.patch_size, width=enc.width, depth=enc.depth,
        num_heads=enc.num_heads, num_latent_tokens=enc.num_latent_tokens,
        token_size=enc.token_size, is_legacy=enc.is_legacy)
    return encoder, VectorQuantizer(codebook_size=q.codebook_size, token_size=enc.token_size)


def abstract_params(model_cfg) -> dict:
    """{'motion_encoder': ..., 'quantize': {'embedding'}}: the Stage1Model subtrees it fills."""
    encoder, quantize = _modules(model_cfg)
    s = model_cfg.motion_tokenizer.image_size
    enc = jax.eval_shape(encoder.init, jax.random.key(0), jax.ShapeDtypeStruct((1, s, s, 3),
                                                                               np.float32))
    z = jax.ShapeDtypeStruct((1, 1, model_cfg.motion_tokenizer.token_size), np.float32)
    q = jax.eval_shape(quantize.init, jax.random.key(0), z)
    return {"motion_encoder": nn.unbox(enc["params"]), "quantize": nn.unbox(q["params"])}


def expected_shapes(model_cfg) -> dict[str, tuple]:
    enc, q = model_cfg.motion_tokenizer, model_cfg.quantizer
    w, n, p = enc.width, enc.num_latent_tokens, enc.patch_size
    grid = enc.image_size // p
    shapes = {
        "latent_tokens": (n, w),
        "encoder.patch_embed.weight": (w, 3, p, p), "encoder.patch_embed.bias": (w,),
        "encoder.class_embedding": (1, w),
        "encoder.positional_embedding": (grid * grid + 1, w),
        "encoder.latent_token_positional_embedding": (n, w),
        "encoder.conv_out.weight": (enc.token_size, w, 1, 1),
        "encoder.conv_out.bias": (enc.token_size,),
        "quantize.embedding.weight": (q.codebook_size, enc.token_size),
    }
    for ln in ("ln_pre", "ln_post"):
        shapes.update({f"encoder.{ln}.weight": (w,), f"encoder.{ln}.bias": (w,)})
    for i in range(enc.depth):
        b = f"encoder.transformer.{i}."
        shapes.update({
            b + "attn.in_proj_weight": (3 * w, w), b + "attn.in_proj_bias": (3 * w,),
            b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
            b + "mlp.c_fc.weight": (4 * w, w), b + "mlp.c_fc.bias": (4 * w,),
            b + "mlp.c_proj.weight": (w, 4 * w), b + "mlp.c_proj.bias": (w,)})
        for ln in ("ln_1", "ln_2"):
            shapes.update({b + f"{ln}.weight": (w,), b + f"{ln}.bias": (w,)})
    return shapes


def keep(key: str) -> bool:
    """False for the image-decoder halves of the checkpoint (not used by IM-Animation)."""
    return not key.startswith(SKIPPED_PREFIXES)


def convert(sd: dict, model_cfg) -> dict:
    enc = model_cfg.motion_tokenizer
    w, h, depth = enc.width, enc.num_heads, enc.depth
    d = w // h
    t = "encoder.transformer.{}."

    def blocks(key, fn=lambda x: x):
        return common.stack(sd, t + key, depth, fn)

    flat = {
        "latent_tokens": sd["latent_tokens"],
        "patch_embed/kernel": common.conv(sd["encoder.patch_embed.weight"]),
        "patch_embed/bias": sd["encoder.patch_embed.bias"],
        "class_embedding": sd["encoder.class_embedding"],
        "positional_embedding": sd["encoder.positional_embedding"],
        "latent_token_positional_embedding": sd["encoder.latent_token_positional_embedding"],
        "conv_out/kernel": sd["encoder.conv_out.weight"][:, :, 0, 0].T,
        "conv_out/bias": sd["encoder.conv_out.bias"],
        # in_proj rows are [q; k; v], each [heads * head_dim, W] -> kernel [W, 3, H, D]
        "transformer/blocks/attn/in_proj/kernel": blocks(
            "attn.in_proj_weight", lambda x: x.reshape(3, h, d, w).transpose(3, 0, 1, 2)),
        "transformer/blocks/attn/in_proj/bias": blocks(
            "attn.in_proj_bias", lambda x: x.reshape(3, h, d)),
        "transformer/blocks/attn/out_proj/kernel": blocks(
            "attn.out_proj.weight", lambda x: x.T.reshape(h, d, w)),
        "transformer/blocks/attn/out_proj/bias": blocks("attn.out_proj.bias"),
        "transformer/blocks/c_fc/kernel": blocks("mlp.c_fc.weight", common.linear),
        "transformer/blocks/c_fc/bias": blocks("mlp.c_fc.bias"),
        "transformer/blocks/c_proj/kernel": blocks("mlp.c_proj.weight", common.linear),
        "transformer/blocks/c_proj/bias": blocks("mlp.c_proj.bias"),
    }
    for ln in ("ln_pre", "ln_post"):
        flat[f"{ln}/scale"], flat[f"{ln}/bias"] = (sd[f"encoder.{ln}.weight"],
                                                   sd[f"encoder.{ln}.bias"])
    for ln in ("ln_1", "ln_2"):
        flat[f"transformer/blocks/{ln}/scale"] = blocks(f"{ln}.weight")
        flat[f"transformer/blocks/{ln}/bias"] = blocks(f"{ln}.bias")
    return {"motion_encoder": common.unflatten(flat),
            "quantize": {"embedding": sd["quantize.embedding.weight"]}}
