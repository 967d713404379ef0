"""FID statistics: float64 streaming feature moments and an eigh-based Fréchet distance.

FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

The usual implementation (pytorch-fid) takes `scipy.linalg.sqrtm(S1 @ S2)`, a
non-symmetric Schur-based square root that needs SciPy, runs on CPU only and
can return complex noise. Here tr((S1 S2)^(1/2)) is computed as the sum of the
square roots of the eigenvalues of the symmetric PSD matrix
S1^(1/2) S2 S1^(1/2) (similar to S1 S2, hence the same eigenvalues), with two
`numpy.linalg.eigh` calls in float64. It agrees with the sqrtm route to ~1e-6
on 2048-d Inception statistics.

Everything here is feature-extractor agnostic; the Inception network lives
elsewhere. Statistics files use pytorch-fid's `.npz` keys `mu` and `sigma`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unlearn_jax.atomic_files import write_npz
from unlearn_jax.diffusion.chunks import padded_chunks


@dataclass
class FeatureStatistics:
    """Running mean and covariance of feature vectors, accumulated in float64.

    Batches are merged with the pairwise (Chan et al.) update of the mean and
    the centred co-moment matrix M2 = sum (x - mean)(x - mean)^T, which avoids
    the cancellation of the naive E[x x^T] - mean mean^T formula when features
    have a large mean relative to their spread (Inception pool features do).

    Example:
      stats = FeatureStatistics(2048)
      for batch in batches:           # [B, 2048] each
        stats.update(extract(batch))
      mu, sigma = stats.mean, stats.covariance
    """

    dim: int
    count: int = 0
    mean: np.ndarray | None = field(default=None)  # [D] float64
    comoment: np.ndarray | None = field(default=None, repr=False)  # [D, D] float64

    def __post_init__(self):
        if self.mean is None:
            self.mean = np.zeros(self.dim, np.float64)
        if self.comoment is None:
            self.comoment = np.zeros((self.dim, self.dim), np.float64)

    def update(self, features: np.ndarray) -> FeatureStatistics:
        """Adds a batch of features [B, D] (any float dtype, numpy or jax); returns self."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features [B, {self.dim}], got {x.shape}")
        if x.shape[0] == 0:
            return self
        batch_mean = x.mean(axis=0)
        centred = x - batch_mean
        batch = FeatureStatistics(self.dim, x.shape[0], batch_mean, centred.T @ centred)
        return self.merge(batch)

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        """Folds `other` (e.g. another host's statistics) into self; returns self."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dim {other.dim} into dim {self.dim}")
        if other.count == 0:
            return self
        total = self.count + other.count
        delta = other.mean - self.mean
        self.comoment = (
            self.comoment
            + other.comoment
            + np.outer(delta, delta) * (self.count * other.count / total)
        )
        self.mean = self.mean + delta * (other.count / total)
        self.count = total
        return self

    @property
    def covariance(self) -> np.ndarray:
        """[D, D] unbiased (ddof=1) covariance, as np.cov(features, rowvar=False)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, have {self.count}")
        return self.comoment / (self.count - 1)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) of features [N, D], in float64."""
    x = np.asarray(features)
    stats = FeatureStatistics(x.shape[-1]).update(x)
    return stats.mean, stats.covariance


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; round-off negatives -> 0."""
    eigvals, eigvecs = np.linalg.eigh(sigma)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    Args:
      mu1, mu2: [D] means.
      sigma1, sigma2: [D, D] symmetric PSD covariances (singular is fine).
    Returns:
      The squared Fréchet (2-Wasserstein) distance, a Python float >= ~0.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
            f"mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )
    # Symmetrise: covariances accumulated in floating point are symmetric only
    # up to round-off, and eigh reads one triangle.
    sigma1 = 0.5 * (sigma1 + sigma1.T)
    sigma2 = 0.5 * (sigma2 + sigma2.T)
    sqrt1 = _psd_sqrt(sigma1)
    middle = sqrt1 @ sigma2 @ sqrt1
    eigvals = np.linalg.eigvalsh(0.5 * (middle + middle.T))
    trace_sqrt_product = np.sqrt(np.clip(eigvals, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product)


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets [N_a, D] and [N_b, D] from any extractor."""
    mu_a, sigma_a = feature_statistics(features_a)
    mu_b, sigma_b = feature_statistics(features_b)
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)


def save_statistics(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Writes (mu [D], sigma [D, D]) as a pytorch-fid compatible `.npz` (`mu`, `sigma`)."""
    write_npz(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads (mu, sigma) from a `.npz` with keys `mu` and `sigma` (pytorch-fid's format)."""
    with np.load(path, allow_pickle=False) as data:
        missing = {"mu", "sigma"} - set(data.files)
        if missing:
            raise KeyError(f"{path}: missing {sorted(missing)}; has {data.files}")
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


def image_set_statistics(
    images: np.ndarray, feature_fn: Callable[[np.ndarray], np.ndarray], batch_size: int
) -> FeatureStatistics:
    """Streams images [N, H, W, C] through `feature_fn` in batches; returns their moments.

    Every call of `feature_fn` sees exactly min(batch_size, N) images (the last
    batch is padded by repeating its final image and the padding's features are
    dropped), so a jitted extractor compiles once.

    Args:
      images: [N, H, W, C] array (numpy, jax or memory-mapped), in the range
        the extractor expects ([0, 1] for the FID Inception).
      feature_fn: any FeatureExtractor, [B, H, W, C] -> [B, D].
      batch_size: images per call.
    """
    n = len(images)
    if n == 0:
        raise ValueError("no images")
    stats = None
    for (batch,), real in padded_chunks(images, size=batch_size):
        features = np.asarray(feature_fn(np.asarray(batch)))[:real]
        if stats is None:
            stats = FeatureStatistics(features.shape[-1])
        stats.update(features)
    return stats


def fid_between_image_sets(
    images_a: np.ndarray,
    images_b: np.ndarray,
    feature_fn: Callable[[np.ndarray], np.ndarray],
    batch_size: int = 50,
) -> float:
    """FID between two image sets [N_a, H, W, C] and [N_b, H', W', C] under `feature_fn`.

    Works with any extractor: the FID Inception (`inception.make_inception_features`)
    for comparable numbers, or e.g. the embedded world's own evaluator network.
    Statistics are streamed in float64, so N may exceed what fits in memory as features.
    """
    stats_a = image_set_statistics(images_a, feature_fn, batch_size)
    stats_b = image_set_statistics(images_b, feature_fn, batch_size)
    return frechet_distance(stats_a.mean, stats_a.covariance, stats_b.mean, stats_b.covariance)
