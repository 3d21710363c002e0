"""How sure a reported number is: intervals for paired differences between methods, and the
sampling-noise floor of a metric.

Experiments pair runs by seed (same initialisation, data order, training and sampling noise),
so a method's effect is the mean of per-seed differences, with a Student-t interval over the
seeds. A metric computed from N samples also moves when only the samples change; its bootstrap
spread over resampled sample sets is the floor below which a difference says nothing.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from scipy import stats

from pafm_jax.evaluation import frechet


def paired_difference(values, baseline, confidence: float = 0.95) -> dict[str, Any]:
  """mean(values − baseline) over pairs (by position), its sample std (ddof = 1) and the
  two-sided Student-t interval of the mean at `confidence`; the interval is None for n < 2."""
  d = np.asarray(values, np.float64) - np.asarray(baseline, np.float64)
  if d.ndim != 1 or d.size < 1:
    raise ValueError(f'need two equal-length 1-D sequences of pairs, got shape {d.shape}.')
  n, mean = d.size, float(np.mean(d))
  out = {'mean': mean, 'std': None, 'n': n, 'low': None, 'high': None,
         'confidence': confidence}
  if n > 1:
    std = float(np.std(d, ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / np.sqrt(n)
    out.update(std=std, low=mean - half, high=mean + half)
  return out


def bootstrap(statistic: Callable[[np.ndarray], float], samples: np.ndarray, *,
              num_resamples: int = 200, seed: int = 0) -> dict[str, float]:
  """The spread of statistic(samples[rows]) over `num_resamples` resamplings of the rows with
  replacement: {'std', 'low', 'high'} (low, high: the 2.5 and 97.5 percentiles)."""
  samples = np.asarray(samples)
  if num_resamples < 2:
    raise ValueError(f'num_resamples must be ≥ 2, got {num_resamples}.')
  rng = np.random.default_rng(seed)
  n = samples.shape[0]
  values = np.array([statistic(samples[rng.integers(0, n, n)]) for _ in range(num_resamples)])
  low, high = np.percentile(values, [2.5, 97.5])
  return {'std': float(np.std(values, ddof=1)), 'low': float(low), 'high': float(high)}


def half_sample_spread(statistic: Callable[[np.ndarray], float], samples: np.ndarray, *,
                       num_resamples: int = 20, seed: int = 0) -> dict[str, float]:
  """The spread {'std'} of statistic(half of the rows, drawn without replacement) over
  `num_resamples` halves: the sampling noise of statistic(all N rows).

  For a mean, halves of m = N/2 rows vary around the full mean with variance
  s²/m · (1 − m/N) = s²/N, the variance of the N-row mean itself. It stands in for the
  bootstrap where repeated rows would bias the statistic: a k-NN radius shrinks to 0 between
  copies of a point, which inflates the generated manifold's gaps (recall).
  """
  samples = np.asarray(samples)
  if num_resamples < 2:
    raise ValueError(f'num_resamples must be ≥ 2, got {num_resamples}.')
  rng = np.random.default_rng(seed)
  n = samples.shape[0]
  values = np.array([statistic(samples[rng.permutation(n)[:n // 2]])
                     for _ in range(num_resamples)])
  return {'std': float(np.std(values, ddof=1))}


def fd_noise_floor(features: np.ndarray, reference_mu: np.ndarray, reference_sigma: np.ndarray,
                   *, num_resamples: int = 200, seed: int = 0) -> dict[str, float]:
  """Bootstrap spread of the Fréchet distance of `features` [N, D] to a fixed reference: how
  much FD moves from the choice of N samples alone."""
  def fd(f):
    mu, sigma = frechet.gaussian_statistics(f)
    return frechet.frechet_distance(mu, sigma, reference_mu, reference_sigma)
  return bootstrap(fd, features, num_resamples=num_resamples, seed=seed)
