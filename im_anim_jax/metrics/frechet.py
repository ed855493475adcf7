"""Streaming feature statistics and the Frechet distance (FID / FVD), float64 numpy.

`FeatureStats` accumulates the mean and the scatter matrix batch by batch (Chan et al.'s pairwise
update, stable where sum / sum-of-outer-products cancels), so a feature set never sits in memory;
its covariance is the unbiased one (N - 1), as np.cov(rowvar=False) in pytorch-fid.
`frechet_distance` follows pytorch-fid's `calculate_frechet_distance`: scipy.linalg.sqrtm of
sigma1 @ sigma2; if that is not finite, eps on both diagonals and again; a complex result whose
diagonal's imaginary parts exceed 1e-3 is an error, else its real part is used.
"""
from __future__ import annotations

import numpy as np
from scipy import linalg  # a JAX dependency


class FeatureStats:
    """Running mean and covariance of D-dimensional features."""

    def __init__(self, dim: int):
        self.dim, self.count = dim, 0
        self._mean = np.zeros(dim, np.float64)
        self._scatter = np.zeros((dim, dim), np.float64)  # sum of (x - mean)(x - mean)^T

    def update(self, feats) -> None:
        """Adds a batch of features [N, D]."""
        x = np.asarray(feats, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features [N, {self.dim}], found shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf")
        n = x.shape[0]
        if n == 0:
            return
        mean = x.mean(axis=0)
        centred = x - mean
        total = self.count + n
        delta = mean - self._mean
        self._scatter += centred.T @ centred + np.outer(delta, delta) * (self.count * n / total)
        self._mean += delta * (n / total)
        self.count = total

    @property
    def mean(self) -> np.ndarray:
        """[D] float64."""
        self._need(1)
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        """[D, D] float64, normalised by N - 1."""
        self._need(2)
        return self._scatter / (self.count - 1)

    def _need(self, n: int):
        if self.count < n:
            raise ValueError(f"need at least {n} feature vectors, have {self.count}")

    def distance(self, other: "FeatureStats") -> float:
        """Frechet distance between this set's Gaussian and `other`'s."""
        return frechet_distance(self.mean, self.cov, other.mean, other.cov)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)); mu [D], sigma [D, D]."""
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"expected means [D] and covariances [D, D] of one D, found "
                         f"{mu1.shape}, {sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrt(sigma1 sigma2) has an imaginary component "
                             f"{np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
