"""Keypoint <-> heatmap conversion and PCK.

Conventions (one place): heatmaps are `[..., J, Hh, Wh]` (joints before space), unnormalised
Gaussians with peak 1 at the joint. Coordinates are (x, y) in pixels with pixel centres at
integers; image -> heatmap coordinates: x_h = (x + 0.5) * Wh / W - 0.5 (centre-aligned).
Joints whose confidence is below the threshold get weight 0 (no fake target).
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


def image_to_heatmap(xy, image_size: int, heatmap_size: int):
    return (xy + 0.5) * (heatmap_size / image_size) - 0.5


def heatmap_to_image(xy, image_size: int, heatmap_size: int):
    return (xy + 0.5) * (image_size / heatmap_size) - 0.5


def gaussian_heatmaps(keypoints: np.ndarray, image_size: int, heatmap_size: int, sigma: float,
                      conf_threshold: float = 0.3):
    """keypoints [..., J, 3] (x, y, conf) in image pixels -> (heatmaps [..., J, Hh, Wh] float32,
    weights [..., J] float32 in {0, 1}). Masked joints get an all-zero heatmap and weight 0."""
    keypoints = np.asarray(keypoints, np.float32)
    xy = image_to_heatmap(keypoints[..., :2], image_size, heatmap_size)
    weights = (keypoints[..., 2] >= conf_threshold).astype(np.float32)
    grid = np.arange(heatmap_size, dtype=np.float32)
    gx = np.exp(-((grid - xy[..., 0:1]) ** 2) / (2 * sigma ** 2))  # [..., J, Wh]
    gy = np.exp(-((grid - xy[..., 1:2]) ** 2) / (2 * sigma ** 2))  # [..., J, Hh]
    heatmaps = gy[..., :, None] * gx[..., None, :] * weights[..., None, None]
    return heatmaps.astype(np.float32), weights


def argmax_keypoints(heatmaps, subpixel: bool = False):
    """heatmaps [..., J, Hh, Wh] -> (x, y) [..., J, 2] in heatmap pixels (jnp or np input).

    subpixel: shift a quarter pixel from the argmax towards the higher neighbour on each axis
    (the standard refinement of SimpleBaseline / HRNet decoders).
    """
    xp = jnp if isinstance(heatmaps, jnp.ndarray) else np
    h, w = heatmaps.shape[-2:]
    flat = heatmaps.reshape(heatmaps.shape[:-2] + (h * w,))
    idx = xp.argmax(flat, axis=-1)
    y, x = idx // w, idx % w
    xy = xp.stack([x, y], -1).astype(xp.float32)
    if not subpixel:
        return xy

    def at(yy, xx):
        yy, xx = xp.clip(yy, 0, h - 1), xp.clip(xx, 0, w - 1)
        return xp.take_along_axis(flat, (yy * w + xx)[..., None], axis=-1)[..., 0]
    dx = xp.where((x > 0) & (x < w - 1), xp.sign(at(y, x + 1) - at(y, x - 1)), 0.0)
    dy = xp.where((y > 0) & (y < h - 1), xp.sign(at(y + 1, x) - at(y - 1, x)), 0.0)
    return xy + 0.25 * xp.stack([dx, dy], -1)


def pck(pred_xy, gt_xy, weights, size: int, thresholds: Sequence[float] = (0.05, 0.1)):
    """Fraction of weighted joints within alpha * size of the ground truth (per-axis normalised
    by `size`, as pose toolkits normalise by the box). Returns {alpha: value}; xp-agnostic."""
    xp = jnp if isinstance(pred_xy, jnp.ndarray) else np
    dist = xp.linalg.norm((pred_xy - gt_xy) / size, axis=-1)
    total = xp.maximum(weights.sum(), 1.0)
    return {a: ((dist <= a) * weights).sum() / total for a in thresholds}
