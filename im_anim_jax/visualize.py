"""Pictures for reports: frames next to heatmaps, written as PNG."""
from __future__ import annotations

import imageio.v3 as iio
import numpy as np

from im_anim_jax import media, skeleton


def heatmap_panel(heatmaps: np.ndarray, size: int) -> np.ndarray:
    """[J, Hh, Wh] -> uint8 [size, size, 3], nearest-upsampled: the max over body and face joints
    in red, over the left hand in green and over the right hand in blue."""
    groups = (slice(0, skeleton.NUM_BODY), skeleton.LEFT_HAND, skeleton.RIGHT_HAND)
    rgb = np.stack([np.clip(heatmaps[g].max(axis=0), 0.0, 1.0) for g in groups], -1)
    rep = size // rgb.shape[0]
    return (255 * rgb.repeat(rep, axis=0).repeat(rep, axis=1)).astype(np.uint8)


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of [H, W, C] by an integer factor."""
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def frames_heatmaps_grid(frames, gt, pred, gap: int = 4, min_panel: int = 192) -> np.ndarray:
    """frames [T, H, W, 3] uint8, gt/pred [T, J, Hh, Wh] -> rows of (frame | gt | pred); panels
    are upscaled (nearest) to at least `min_panel` pixels."""
    factor = max(1, -(-min_panel // frames.shape[1]))
    frames = np.stack([upscale(f, factor) for f in frames])
    size = frames.shape[1]
    rows = []
    for f, g, p in zip(frames, gt, pred):
        pad = np.full((size, gap, 3), 255, np.uint8)
        rows.append(np.concatenate([f, pad, heatmap_panel(g, size), pad, heatmap_panel(p, size)], 1))
        rows.append(np.full((gap, rows[-1].shape[1], 3), 255, np.uint8))
    return np.concatenate(rows[:-1], 0)


def pair_grid(driving, reference, gt, pred, gap: int = 4, min_panel: int = 192) -> np.ndarray:
    """driving [T, H, W, 3] uint8, reference [H, W, 3] uint8, gt/pred [T, J, Hh, Wh] -> rows of
    (driving frame | reference | ground-truth retargeted pose | predicted heatmaps)."""
    factor = max(1, -(-min_panel // driving.shape[1]))
    ref = upscale(np.asarray(reference), factor)
    size = ref.shape[0]
    pad = np.full((size, gap, 3), 255, np.uint8)
    rows = []
    for f, g, p in zip(driving, gt, pred):
        rows.append(np.concatenate([upscale(np.asarray(f), factor), pad, ref, pad,
                                    heatmap_panel(g, size), pad, heatmap_panel(p, size)], 1))
        rows.append(np.full((gap, rows[-1].shape[1], 3), 255, np.uint8))
    return np.concatenate(rows[:-1], 0)


def write_png(path: str, image: np.ndarray) -> None:
    """`image` [H, W, 3] uint8 -> PNG at `path`, written atomically (media.write_atomic)."""
    media.write_atomic(path, lambda temp: iio.imwrite(temp, image))
