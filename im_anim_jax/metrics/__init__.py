"""Evaluation metrics, DisCo-style (ARCHITECTURE.md section 8).

- `image`: per-frame L1, PSNR* (+ the legacy uint8-overflow PSNR), SSIM (+ DisCo's variant).
- `frechet`: streamed float64 feature statistics and the Frechet distance (FID, FVD).
- Networks (Flax, weights converted from the standard PyTorch files with
  `python -m im_anim_jax.convert {inception,i3d,lpips}`), loaded by `load_extractor`:
  `inception` (pytorch-fid's FID InceptionV3), `i3d` (FVD's Kinetics-400 I3D), `lpips` (v0.1).
"""
from __future__ import annotations

import os

import jax
import numpy as np

from im_anim_jax.metrics.layers import check_pixels

# kind: (what --src must be, the metric, input rank)
SOURCES = {
    "inception": ("pt_inception-2015-12-05-6726825d.pth", "FID", 4),
    "i3d": ("i3d_pretrained_400.pt", "FVD", 5),
    "lpips": ("vgg.pth,vgg16-397923af.pth", "LPIPS", 4),  # or a directory holding both
}


class MetricUnavailable(RuntimeError):
    """A metric network's converted weights are absent. str(e) starts with "not computed:" and says
    how to make them: evaluate.py reports it in place of the number."""


def conversion_command(kind: str, path: str) -> str:
    """The command that writes the converted weights of `kind` to `path`."""
    return f"python -m im_anim_jax.convert {kind} --src {SOURCES[kind][0]} --dst {path}"


def _module(kind: str, model_cfg: dict, options: dict):
    if kind == "inception":
        from im_anim_jax.metrics.inception import InceptionV3
        return InceptionV3(**options)
    if kind == "i3d":
        from im_anim_jax.metrics.i3d import InceptionI3d
        return InceptionI3d(**options)
    from im_anim_jax.metrics.lpips import LPIPS
    return LPIPS(net=model_cfg["net"], **options)


def load_extractor(kind: str, path: str, **options):
    """The jitted network of the converted weights in `path`, on pixels in [0, 1]:

      inception: pixels [N, H, W, 3] -> pool3 features [N, 2048]
      i3d:       video [B, T, H, W, 3] (T = 16 for FVD) -> Kinetics logits [B, 400]
      lpips:     (a, b) [N, H, W, 3] -> distances [N]; rescale=False for DisCo's unscaled inputs

    `options` go to the Flax module. Raises MetricUnavailable when `path` holds no converted
    weights, ValueError for an unknown kind or weights of another kind.
    """
    from im_anim_jax.convert import common
    if kind not in SOURCES:
        raise ValueError(f"unknown metric network {kind!r}; choose one of {sorted(SOURCES)}")
    if not os.path.exists(os.path.join(path, "meta.json")):
        source, metric, _ = SOURCES[kind]
        raise MetricUnavailable(
            f"not computed: {metric} needs the converted {kind} weights, and "
            f"{os.path.join(path, 'meta.json')} is missing; make them with: "
            f"{conversion_command(kind, path)}")
    params, meta = common.load_converted(path)
    if meta.get("kind") != kind:
        raise ValueError(f"{path} holds converted {meta.get('kind')!r} weights, not {kind!r}")
    apply = jax.jit(_module(kind, meta["model_config"], options).apply)
    ndim = SOURCES[kind][2]

    def extract(*inputs):
        inputs = [x if isinstance(x, jax.Array) else np.asarray(x, np.float32) for x in inputs]
        for i, x in enumerate(inputs):
            check_pixels(x, ndim, f"{kind} input {i}")
        return apply({"params": params}, *inputs)

    return extract
