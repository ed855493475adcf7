import jax.numpy as jnp
import numpy as np
import pytest

from im_anim_jax import keypoints as kp
from im_anim_jax import skeleton


def test_heatmap_peak_at_joint_and_gaussian_shape():
    k = np.zeros((2, 3), np.float32)
    k[0] = (10.0, 5.0, 1.0)     # image 32 -> heatmap 16: (10.5*0.5-0.5, 5.5*0.5-0.5) = (4.75, 2.25)
    k[1] = (30.0, 20.0, 0.9)
    hm, w = kp.gaussian_heatmaps(k, image_size=32, heatmap_size=16, sigma=1.5)
    assert hm.shape == (2, 16, 16) and hm.dtype == np.float32
    np.testing.assert_array_equal(w, [1.0, 1.0])
    x, y = kp.image_to_heatmap(np.array([10.0, 5.0]), 32, 16)
    assert (x, y) == (4.75, 2.25)
    yy, xx = np.mgrid[:16, :16]
    expected = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.5 ** 2))
    np.testing.assert_allclose(hm[0], expected, atol=1e-6)
    iy, ix = np.unravel_index(hm[1].argmax(), hm[1].shape)
    assert (ix, iy) == tuple(np.round(kp.image_to_heatmap(np.array([30.0, 20.0]), 32, 16)).astype(int))


def test_integer_joint_has_peak_exactly_one():
    k = np.array([[[7.0, 9.0, 1.0]]], np.float32)
    hm, _ = kp.gaussian_heatmaps(k, image_size=16, heatmap_size=16, sigma=1.0)
    assert hm[0, 0, 9, 7] == pytest.approx(1.0)
    assert hm[0, 0].max() == pytest.approx(1.0)


def test_low_confidence_joints_are_masked_not_faked():
    k = np.array([[5.0, 5.0, 0.29], [5.0, 5.0, 0.3], [5.0, 5.0, 0.0]], np.float32)
    hm, w = kp.gaussian_heatmaps(k, 16, 16, 1.0, conf_threshold=0.3)
    np.testing.assert_array_equal(w, [0.0, 1.0, 0.0])
    assert hm[0].max() == 0.0 and hm[2].max() == 0.0 and hm[1].max() > 0.9


def test_heatmaps_batched_shapes():
    k = np.random.default_rng(0).uniform(0, 31, (2, 3, skeleton.NUM_JOINTS, 3)).astype(np.float32)
    k[..., 2] = 1.0
    hm, w = kp.gaussian_heatmaps(k, 32, 16, 1.0)
    assert hm.shape == (2, 3, skeleton.NUM_JOINTS, 16, 16) and w.shape == (2, 3, skeleton.NUM_JOINTS)


@pytest.mark.parametrize("xp", [np, jnp])
def test_argmax_recovers_keypoints_and_subpixel_helps(xp):
    rng = np.random.default_rng(1)
    xy = rng.uniform(2, 29, (50, 2)).astype(np.float32)
    k = np.concatenate([xy, np.ones((50, 1), np.float32)], -1)
    hm, _ = kp.gaussian_heatmaps(k, 32, 32, 1.5)
    coarse = np.asarray(kp.argmax_keypoints(xp.asarray(hm)))
    fine = np.asarray(kp.argmax_keypoints(xp.asarray(hm), subpixel=True))
    assert np.abs(coarse - xy).max() <= 0.5 + 1e-5
    assert np.abs(fine - xy).mean() < np.abs(coarse - xy).mean()


def test_coordinate_round_trip():
    xy = np.array([[0.0, 63.0], [12.3, 40.7]])
    back = kp.heatmap_to_image(kp.image_to_heatmap(xy, 64, 16), 64, 16)
    np.testing.assert_allclose(back, xy, atol=1e-9)


def test_pck_counts_only_weighted_joints_within_threshold():
    """PCK: Euclidean distance over `size` (a diagonal offset tells it from L-inf and L1)."""
    gt = np.zeros((5, 2))
    pred = np.array([[0.5, 0.0], [1.7, 0.0], [0.0, 4.0], [1.2, 1.2], [10.0, 10.0]])
    w = np.array([1.0, 1.0, 1.0, 1.0, 0.0])  # the far-off joint is invisible
    out = kp.pck(pred, gt, w, size=16, thresholds=(0.05, 0.1))
    # distances / 16: 0.031, 0.106, 0.25, 0.106 (L-inf 0.075, L1 0.15) -> 1 of 4 within 0.05
    # and 1 of 4 within 0.1
    assert out[0.05] == pytest.approx(1 / 4) and out[0.1] == pytest.approx(1 / 4)
    out = kp.pck(pred, gt, w, size=16, thresholds=(0.11,))
    assert out[0.11] == pytest.approx(3 / 4)
