"""PyTorch checkpoint import -> Orbax: TiTok (motion encoder), Wan2.2 DiT, Wan2.2 VAE, and the
metric networks (pytorch-fid InceptionV3, I3D for FVD, LPIPS trunk + heads).

  python -m im_anim_jax.convert {titok,wan-dit,wan-vae,inception,i3d,lpips} --src FILE --dst DIR \\
      [--config configs/im_animation.py:paper] [--overwrite]

The same as a function: `convert(kind, src, dst, model_cfg)`; read back with
`common.load_converted(dst)`.
"""
from __future__ import annotations

import importlib

KINDS = {"titok": "titok", "wan-dit": "wan_dit", "wan-vae": "wan_vae", "inception": "inception",
         "i3d": "i3d", "lpips": "lpips", "clip-vit": "clip_vit"}


def converter(kind: str):
    """The converter module of `kind` (one of KINDS)."""
    if kind not in KINDS:
        from im_anim_jax.convert.common import ConversionError
        raise ConversionError(f"unknown checkpoint kind {kind!r}; choose one of {sorted(KINDS)}")
    return importlib.import_module(f"im_anim_jax.convert.{KINDS[kind]}")


def convert(kind: str, src: str, dst: str, model_cfg, overwrite: bool = False) -> dict:
    """Converts the official checkpoint `src` of `kind` for `config.model` (`model_cfg`) into the
    Orbax checkpoint `dst`. Returns its meta (source, dtypes, parameter count)."""
    from im_anim_jax.convert import common
    module = converter(kind)
    return common.convert_file(module, src, dst, model_cfg, kind, overwrite=overwrite)
