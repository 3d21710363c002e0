"""Evaluation metrics against independent truths: closed forms of the Fréchet distance,
scipy's sqrtm route, brute-force neighbours (scipy cdist), and constructed sets whose
precision, recall and memorisation are known."""

import math

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist

from pafm_jax import evaluation
from pafm_jax.evaluation import manifold, memorization, neighbours


# ---------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_closed_form_for_commuting_covariances():
  """Diagonal covariances: FD = ‖Δμ‖² + Σ_i (√a_i − √b_i)²."""
  mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
  a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = evaluation.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_closed_form_for_non_commuting_2x2():
  """For 2×2 PSD matrices, tr (Σ1 Σ2)^½ = sqrt(tr Σ1Σ2 + 2·sqrt(det Σ1·det Σ2)), because
  the two eigenvalues λ1, λ2 ≥ 0 of Σ1Σ2 give (√λ1 + √λ2)² = tr + 2·sqrt(det)."""
  s1 = np.array([[2.0, 0.9], [0.9, 1.0]])
  s2 = np.array([[0.5, -0.3], [-0.3, 3.0]])
  assert not np.allclose(s1 @ s2, s2 @ s1)
  mu1, mu2 = np.array([0.3, -0.2]), np.array([-1.0, 0.4])
  tr_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
  assert evaluation.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_scipy_sqrtm_on_random_features():
  rng = np.random.default_rng(0)
  for d in (8, 64):
    f1 = rng.normal(size=(4 * d, d)) @ rng.normal(size=(d, d))
    f2 = rng.normal(size=(4 * d, d)) * 1.5 + 0.3
    mu1, s1 = evaluation.gaussian_statistics(f1)
    mu2, s2 = evaluation.gaussian_statistics(f2)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    got = evaluation.frechet_distance(mu1, s1, mu2, s2)
    assert abs(got - reference) <= 1e-6 * abs(reference), (d, got, reference)


def test_frechet_distance_of_singular_covariances_and_of_a_set_with_itself():
  rng = np.random.default_rng(1)
  f = rng.normal(size=(10, 32))          # N < D: rank-deficient covariance
  mu, s = evaluation.gaussian_statistics(f)
  # Zero eigenvalues come back as ±1e-16, whose square roots (1e-8) set the error floor.
  assert abs(evaluation.frechet_distance(mu, s, mu, s)) < 1e-6 * np.trace(s)
  g = rng.normal(size=(12, 32)) + 1.0
  mu2, s2 = evaluation.gaussian_statistics(g)
  fd = evaluation.frechet_distance(mu, s, mu2, s2)
  assert np.isfinite(fd) and fd > 0
  with pytest.raises(ValueError, match='shape'):
    evaluation.frechet_distance(mu, s, mu2[:3], s2)


# --------------------------------------------------------------------------- neighbours


def test_nearest_distances_match_brute_force_across_chunks():
  rng = np.random.default_rng(2)
  queries, keys = rng.normal(size=(37, 5)), rng.normal(size=(53, 5))
  dist, idx = neighbours.nearest_distances(queries, keys, 4, chunk=16)
  full = cdist(queries, keys)
  order = np.argsort(full, axis=1)[:, :4]
  np.testing.assert_array_equal(idx, order)
  np.testing.assert_allclose(dist, np.take_along_axis(full, order, 1), rtol=1e-4, atol=1e-5)


def _brute_force_precision_recall(real, fake, k):
  def radii(x):
    return np.sort(cdist(x, x), axis=1)[:, k]
  r_real, r_fake = radii(real), radii(fake)
  precision = np.mean(np.any(cdist(fake, real) <= r_real[None, :], axis=1))
  recall = np.mean(np.any(cdist(real, fake) <= r_fake[None, :], axis=1))
  return precision, recall


def test_precision_recall_match_brute_force():
  rng = np.random.default_rng(3)
  real = rng.normal(size=(70, 4))
  fake = rng.normal(size=(55, 4)) * 0.6 + 0.8     # narrower and shifted: both below 1
  got = manifold.precision_recall(real, fake, k=3)
  precision, recall = _brute_force_precision_recall(real, fake, 3)
  assert 0 < precision < 1 and 0 < recall < 1
  assert got['precision'] == pytest.approx(precision)
  assert got['recall'] == pytest.approx(recall)


def test_precision_recall_of_constructed_sets():
  rng = np.random.default_rng(4)
  real = rng.normal(size=(50, 3))
  assert manifold.precision_recall(real, real.copy(), k=3) == {'precision': 1.0, 'recall': 1.0}
  far = real + 100.0
  assert manifold.precision_recall(real, far, k=3) == {'precision': 0.0, 'recall': 0.0}
  # Fakes that collapse onto one half of the data: all look real, half the data is missed.
  left = real[real[:, 0] < 0]
  pr = manifold.precision_recall(real, left, k=3)
  assert pr['precision'] == 1.0 and pr['recall'] < 0.75


# ------------------------------------------------------------------------- memorisation


def test_memorization_flags_exact_copies_only():
  rng = np.random.default_rng(5)
  train = rng.normal(size=(200, 4, 4, 1))
  copies = train[[3, 50, 120]] + 1e-4 * rng.normal(size=(3, 4, 4, 1))
  # Midpoints of two training images are equidistant from both: ratio ≈ 1.
  midpoints = 0.5 * (train[[0, 10, 20, 30]] + train[[1, 11, 21, 31]])
  far = rng.normal(size=(3, 4, 4, 1)) + 30.0
  samples = np.concatenate([copies, midpoints, far])
  ratio, nearest = memorization.nearest_neighbour_ratios(samples, train)
  np.testing.assert_array_equal(nearest[:3], [3, 50, 120])
  assert np.all(ratio[:3] < 0.01) and np.all(ratio[3:] > 1 / 3)
  # Brute force.
  d = np.sort(cdist(samples.reshape(10, -1), train.reshape(200, -1)), axis=1)
  np.testing.assert_allclose(ratio[3:], d[3:, 0] / d[3:, 1], rtol=1e-4)
  metrics = memorization.memorization_metrics(samples, train)
  assert metrics['memorized_fraction'] == pytest.approx(0.3)


def test_noise_floors_match_closed_forms_of_per_sample_metrics():
  """The bootstrap floors of metrics built from per-sample values against their large-N
  closed forms: √(p(1 − p)/N) for a share (accuracy, precision, memorised), and
  1/(2·f(median)·√N) for the median of the NN ratio (here uniform on [0, 1], f = 1)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from pafm_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  n = 4000
  config = ml_collections.ConfigDict({'eval': {'fd_bootstrap': 1000, 'pr_neighbours': 3,
                                               'memorization_threshold': 1 / 3}})
  correct = rng.random(n) < 0.8
  in_real = rng.random(n) < 0.6
  ratio = rng.random(n)
  feats = rng.normal(size=(n, 2))
  reference = runner.Reference(np.zeros(2), np.eye(2), None, 'N(0, I)')
  got = runner.noise_floors(config, feats, {'accuracy': correct, 'precision': in_real,
                                            'ratio': ratio}, reference, None)

  def share_se(p):
    return math.sqrt(p * (1 - p) / n)

  np.testing.assert_allclose(got['accuracy_noise_std'], share_se(np.mean(correct)), rtol=0.1)
  np.testing.assert_allclose(got['precision_noise_std'], share_se(np.mean(in_real)), rtol=0.1)
  np.testing.assert_allclose(got['memorized_fraction_noise_std'],
                             share_se(np.mean(ratio < 1 / 3)), rtol=0.1)
  np.testing.assert_allclose(got['nn_ratio_median_noise_std'], 1 / (2 * math.sqrt(n)), rtol=0.15)
  assert 'recall_noise_std' not in got and 'fd_train_noise_std' not in got

  # FD against the training subset resamples the same way: against the same statistics, the
  # same floor; recall's floor comes with the real features, and is skipped when half the
  # samples cannot hold a k-NN manifold.
  real = rng.normal(size=(3000, 2))
  with_all = runner.noise_floors(config, feats, {}, runner.Reference(
      np.zeros(2), np.eye(2), real, 'N(0, I)'), reference)
  assert with_all['fd_train_noise_std'] == with_all['fd_noise_std'] == got['fd_noise_std']
  assert 0 < with_all['recall_noise_std'] < 0.05
  few = runner.noise_floors(config, feats[:7], {}, runner.Reference(
      np.zeros(2), np.eye(2), real, 'N(0, I)'), None)
  assert 'recall_noise_std' not in few
