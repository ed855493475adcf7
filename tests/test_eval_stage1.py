"""Stage-1 evaluation's PCK (clip_hits) on hand-computed offsets."""
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.pipeline import Targets
from im_anim_jax.evaluation import stage1 as ev


@pytest.mark.parametrize("xp", [np, jnp])
def test_clip_hits_counts_visible_frames_by_euclidean_distance_in_heatmap_pixels(xp):
    """Evaluation PCK: Euclidean distance over the heatmap size (not L-inf, not image size),
    summed over frames of visible joints only."""
    targets = Targets(image_size=64, heatmap_size=16, sigma=1.0)
    # heatmap offsets [B=2, T=2, J=3, 2] from the ground truth; distances / 16 in comments
    offsets = np.array([[[[0.5, 0.5], [3.0, 0.0], [0.0, 0.0]],     # 0.044, 0.19, masked
                         [[1.2, 1.2], [0.0, 1.5], [0.0, 0.0]]],    # 0.106 (L-inf 0.075), 0.094
                        [[[0.0, 0.0], [-1.2, 1.2], [0.0, -1.0]],   # 0, 0.106, 0.0625
                         [[10.0, 10.0], [0.8, -0.8], [1.0, 0.0]]]])  # masked, 0.071, 0.0625
    weights = np.array([[[1, 1, 0], [1, 1, 0]], [[1, 1, 1], [0, 1, 1]]], np.float32)
    gt = np.full((2, 2, 3, 2), 8.0)  # heatmap (8, 8) is image (33.5, 33.5) at 64 -> 16
    keypoints = np.concatenate([np.full_like(gt, 33.5), np.ones((2, 2, 3, 1))], -1)
    hits = ev.clip_hits(xp.asarray(gt + offsets, xp.float32), xp.asarray(keypoints, xp.float32),
                        xp.asarray(weights), targets, (0.05, 0.1))
    np.testing.assert_array_equal(np.asarray(hits[0.05]), [[1, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(hits[0.1]), [[1, 1, 0], [1, 1, 2]])
