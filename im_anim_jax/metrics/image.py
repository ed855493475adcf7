"""Per-frame image metrics in float64 numpy: L1, PSNR* (and the legacy uint8-overflow PSNR), SSIM.

Every function takes two arrays [..., H, W, 3] of pixels in [0, 1] (numpy or JAX; one frame
or a whole [B, T, H, W, 3] video batch) and returns one value per frame, shape [...]. Tables
average these over all frames (DisCo-style). Definitions (tests compare them with scikit-image):

- `l1`: mean |a - b| over H, W, C in [0, 1] units. DisCo's "L1" (tool/metrics/
  ssim_l1_lpips_psnr.py, on 0..255 pixels divided by H * W) equals 255 * l1 / (H * W).
- `psnr_star`: 10 log10(1 / MSE) with the MSE in float64 over H, W, C (= DisCo's
  20 log10(255 / sqrt(MSE_255)) computed without integer overflow): the "PSNR*" of the animation
  papers; 100 for identical frames (DisCo's convention).
- `psnr_uint8_overflow`: DisCo's original PSNR, reproduced for comparison with old tables: the
  pixels rounded to uint8 and the squared differences wrapped modulo 256 as numpy uint8
  arithmetic does.
- `ssim`: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, data
  range 1, population (co)variances, the mean over the valid (unpadded) window positions and the
  channels = skimage `structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=-1)`, dm-pix `ssim` and tf.image.ssim.
- `ssim_disco`: DisCo's SSIM: luma (0.299 R + 0.587 G + 0.114 B), a 7x7 uniform window and
  sample (co)variances (skimage's defaults on its cv2 grayscale frames); computed on the float
  luma, where cv2 rounds it to uint8 first.

dm-pix's `ssim` matches `ssim` (up to float32) but cannot express `ssim_disco`'s sample
covariances, and its float32 JAX arithmetic departs from the float64 references; both SSIMs
therefore share the float64 implementation below.
"""
from __future__ import annotations

import numpy as np

from im_anim_jax.metrics.layers import check_pixels

LUMA = np.array([0.299, 0.587, 0.114])
IDENTICAL_PSNR = 100.0


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"expected two arrays of the same shape, found {a.shape} and {b.shape}")
    if a.ndim < 3:
        raise ValueError(f"expected frames [..., H, W, 3], found shape {a.shape}")
    for x, what in ((a, "first image"), (b, "second image")):
        check_pixels(x, x.ndim, what)
    return a, b


def l1(a, b) -> np.ndarray:
    """Mean absolute error per frame: [..., H, W, 3] x2 -> [...]."""
    a, b = _pair(a, b)
    return np.abs(a - b).mean(axis=(-3, -2, -1))


def _psnr(mse: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(mse == 0, IDENTICAL_PSNR, -10.0 * np.log10(mse))


def psnr_star(a, b) -> np.ndarray:
    """PSNR* per frame, dB: 10 log10(1 / MSE), float64, no overflow. [..., H, W, 3] x2 -> [...]."""
    a, b = _pair(a, b)
    return _psnr(np.square(a - b).mean(axis=(-3, -2, -1)))


def psnr_uint8_overflow(a, b) -> np.ndarray:
    """DisCo's original PSNR per frame (uint8 wrap-around of (a - b) ** 2). [..., H, W, 3] x2 ->
    [...]."""
    a, b = _pair(a, b)
    qa, qb = (np.round(x * 255).astype(np.uint8) for x in (a, b))
    wrapped = (qa - qb) ** 2  # uint8 arithmetic, as numpy does on two cv2.imread frames
    return _psnr(wrapped.mean(axis=(-3, -2, -1)) / 255.0 ** 2)


def _filter(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of x [..., H, W, C] with `taps` along H then W."""
    for axis in (-3, -2):
        windows = np.lib.stride_tricks.sliding_window_view(x, len(taps), axis=axis)
        x = windows @ taps  # [..., H', W, C, n] @ [n]
    return x


def _ssim(a: np.ndarray, b: np.ndarray, taps: np.ndarray, cov_norm: float) -> np.ndarray:
    if min(a.shape[-3:-1]) < len(taps):
        raise ValueError(f"SSIM needs frames of at least {len(taps)}x{len(taps)} pixels, found "
                         f"{a.shape[-3]}x{a.shape[-2]}")
    mu_a, mu_b = _filter(a, taps), _filter(b, taps)
    var_a = cov_norm * (_filter(a * a, taps) - mu_a ** 2)
    var_b = cov_norm * (_filter(b * b, taps) - mu_b ** 2)
    cov = cov_norm * (_filter(a * b, taps) - mu_a * mu_b)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
                / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    return ssim_map.mean(axis=(-3, -2, -1))


def gaussian_taps(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian window [size]."""
    x = np.arange(size) - (size - 1) / 2
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def ssim(a, b) -> np.ndarray:
    """SSIM per frame (11x11 Gaussian, sigma 1.5, channel mean). [..., H, W, 3] x2 -> [...]."""
    a, b = _pair(a, b)
    return _ssim(a, b, gaussian_taps(), cov_norm=1.0)


def ssim_disco(a, b) -> np.ndarray:
    """DisCo's SSIM per frame (luma, 7x7 uniform window, sample covariances).
    [..., H, W, 3] x2 -> [...]."""
    a, b = _pair(a, b)
    n = 7
    return _ssim((a @ LUMA)[..., None], (b @ LUMA)[..., None], np.full(n, 1.0 / n),
                 cov_norm=n * n / (n * n - 1.0))
