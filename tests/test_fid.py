"""FID statistics: closed forms, the scipy sqrtm reference, streaming moments."""

from __future__ import annotations

import numpy as np
import pytest

from unlearn_jax.metrics import fid


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, 2 * d)) / np.sqrt(2 * d)
    return a @ a.T + 0.01 * np.eye(d)


def test_diagonal_covariances_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_commuting_covariances_closed_form():
    # Same eigenvectors: tr((S1 S2)^1/2) = sum sqrt(l1 l2); the distance is the
    # diagonal formula on the eigenvalues.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    l1, l2 = rng.uniform(0.0, 2.0, 32), rng.uniform(0.0, 2.0, 32)
    l1[:4] = 0.0  # singular covariances are allowed
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(l1 + l2 - 2 * np.sqrt(l1 * l2))
    got = fid.frechet_distance(mu1, q @ np.diag(l1) @ q.T, mu2, q @ np.diag(l2) @ q.T)
    # atol: a zero eigenvalue comes back as ~1e-16 round-off, whose square root
    # is ~1e-8; the sqrtm route has the same floor.
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-6)


def test_one_dimensional_and_identical_gaussians():
    # 1-d: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
    assert fid.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0)
    rng = np.random.default_rng(2)
    sigma = _random_spd(rng, 24)
    mu = rng.standard_normal(24)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-10


@pytest.mark.parametrize("d", [64, 256])
def test_matches_scipy_sqrtm_reference(d):
    import scipy.linalg as scipy_linalg

    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    # pytorch-fid's formula.
    covmean = scipy_linalg.sqrtm(s1 @ s2)
    want = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, abs=1e-6)


def test_streaming_statistics_equal_one_shot():
    rng = np.random.default_rng(3)
    # A large common offset: the naive E[xx^T] - mu mu^T loses digits here.
    feats = (1e3 + rng.standard_normal((1000, 48)) @ rng.standard_normal((48, 48))).astype(
        np.float32
    )
    stats = fid.FeatureStatistics(48)
    for batch in np.array_split(feats, [1, 7, 300, 301, 999]):  # uneven, one of size 1
        stats.update(batch)
    stats.update(feats[:0])  # empty batches are no-ops
    assert stats.count == 1000
    np.testing.assert_allclose(stats.mean, np.mean(feats.astype(np.float64), axis=0), rtol=1e-13)
    np.testing.assert_allclose(
        stats.covariance, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-10
    )
    # Merging two halves (e.g. two hosts) gives the same moments.
    merged = (
        fid.FeatureStatistics(48)
        .update(feats[:400])
        .merge(fid.FeatureStatistics(48).update(feats[400:]))
    )
    np.testing.assert_allclose(merged.covariance, stats.covariance, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="expected features"):
        stats.update(feats[:, :10])


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift():
    rng = np.random.default_rng(4)
    feats = rng.standard_normal((500, 32)) @ rng.standard_normal((32, 32))
    assert abs(fid.fid_from_features(feats, feats)) < 1e-8
    # A pure shift by v changes only the mean term: FID = |v|^2.
    shift = rng.standard_normal(32)
    assert fid.fid_from_features(feats, feats + shift) == pytest.approx(shift @ shift, rel=1e-8)


def test_statistics_file_roundtrip(tmp_path):
    rng = np.random.default_rng(5)
    mu, sigma = fid.feature_statistics(rng.standard_normal((50, 8)))
    fid.save_statistics(tmp_path / "ref.npz", mu, sigma)
    mu2, sigma2 = fid.load_statistics(tmp_path / "ref.npz")
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
