"""Per-frame image metrics against scikit-image and DisCo's formulas; streamed feature statistics
and the Frechet distance against numpy / scipy computations."""
import numpy as np
import pytest
from scipy import linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from im_anim_jax.metrics import frechet, image


def frames(seed=0, shape=(2, 3, 24, 20, 3)):
    """A clean batch of videos and a noisy copy, [B, T, H, W, 3] in [0, 1]."""
    rng = np.random.default_rng(seed)
    clean = rng.uniform(size=shape)
    return clean, np.clip(clean + 0.1 * rng.normal(size=shape), 0, 1)


def per_frame(fn, a, b):
    return np.array([[fn(x, y) for x, y in zip(va, vb)] for va, vb in zip(a, b)])


def test_l1_and_psnr_star_match_their_definitions():
    a, b = frames()
    np.testing.assert_allclose(image.l1(a, b), np.abs(a - b).mean(axis=(2, 3, 4)), rtol=1e-12)
    want = per_frame(lambda x, y: peak_signal_noise_ratio(x, y, data_range=1.0), a, b)
    np.testing.assert_allclose(image.psnr_star(a, b), want, rtol=1e-12)
    assert image.psnr_star(a, b).shape == (2, 3)
    assert image.psnr_star(a[0, 0], a[0, 0]) == image.IDENTICAL_PSNR


def test_legacy_psnr_reproduces_disco_uint8_overflow():
    a, b = frames(1)
    qa, qb = (np.round(x * 255).astype(np.uint8) for x in (a, b))

    def disco_psnr(x, y):  # DisCo's psnr_eval on two cv2.imread (uint8) frames
        mse = np.mean((x - y) ** 2)
        return 100 if mse == 0 else 20 * np.log10(255.0 / np.sqrt(mse))

    legacy = image.psnr_uint8_overflow(a, b)
    np.testing.assert_allclose(legacy, per_frame(disco_psnr, qa, qb), rtol=1e-12)
    assert np.all(legacy > image.psnr_star(a, b) + 5)  # the overflow inflates PSNR


def test_ssim_matches_skimage_gaussian():
    a, b = frames(2)
    want = per_frame(lambda x, y: structural_similarity(
        x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
        channel_axis=-1), a, b)
    got = image.ssim(a, b)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    print(f"SSIM vs skimage max abs diff: {np.max(np.abs(got - want)):.1e}")
    np.testing.assert_allclose(image.ssim(a, a), 1.0, rtol=1e-12)


def test_ssim_disco_matches_skimage_defaults_on_luma():
    a, b = frames(3)
    luma = np.array([0.299, 0.587, 0.114])
    want = per_frame(lambda x, y: structural_similarity(x @ luma, y @ luma, data_range=1.0), a, b)
    np.testing.assert_allclose(image.ssim_disco(a, b), want, rtol=1e-10)


def test_image_metrics_reject_bad_input():
    a, b = frames(shape=(4, 16, 16, 3))
    with pytest.raises(ValueError, match=r"found \(4, 16, 16, 3\) and \(4, 16, 15, 3\)"):
        image.l1(a, b[:, :, 1:])
    with pytest.raises(ValueError, match=r"second image: expected pixels in \[0, 1\]"):
        image.psnr_star(a, b * 255)
    with pytest.raises(ValueError, match="expected 4 axes with 3 channels last"):
        image.ssim(a[..., :2], b[..., :2])
    with pytest.raises(ValueError, match="at least 11x11 pixels, found 8x16"):
        image.ssim(a[:, :8], b[:, :8])


def test_streamed_stats_match_numpy_even_far_from_zero():
    rng = np.random.default_rng(4)
    feats = 1e4 + rng.normal(size=(103, 6)) @ rng.normal(size=(6, 6))
    stats = frechet.FeatureStats(6)
    for start, stop in ((0, 1), (1, 40), (40, 40), (40, 103)):
        stats.update(feats[start:stop])
    assert stats.count == 103
    np.testing.assert_allclose(stats.mean, feats.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(stats.cov, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match=r"expected features \[N, 6\], found shape \(3, 5\)"):
        stats.update(feats[:3, :5])
    with pytest.raises(ValueError, match="need at least 2 feature vectors, have 1"):
        one = frechet.FeatureStats(6)
        one.update(feats[:1])
        one.cov


def test_frechet_distance_matches_scipy_and_closed_form():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(200, 5)), 0.5 + 2 * rng.normal(size=(150, 5)) @ rng.normal(size=(5, 5))
    sx, sy = frechet.FeatureStats(5), frechet.FeatureStats(5)
    sx.update(x)
    sy.update(y)
    c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    r1 = linalg.sqrtm(c1)  # the symmetric form Tr(sqrt(sqrt(C1) C2 sqrt(C1)))
    want = (np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(c1) + np.trace(c2)
            - 2 * np.trace(linalg.sqrtm(r1 @ c2 @ r1)).real)
    got = sx.distance(sy)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(5.0, rel=1e-12)
    assert abs(sx.distance(sx)) < 1e-9
    with pytest.raises(ValueError, match="means \\[D\\] and covariances \\[D, D\\] of one D"):
        frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
