"""Memorisation: is a sample a near-copy of one training image?

For each sample x with nearest training image n1 and second nearest n2, the ratio
‖x − n1‖ / ‖x − n2‖ is small only when x sits much closer to one training image than to any
other. A sample counts as memorised when the ratio is below 1/3 (Yoon et al. 2023, "Diffusion
Probabilistic Models Generalize when They Fail to Memorize"; Gu et al. 2023, "On Memorization
in Diffusion Models"). PAFM regresses onto the marginal velocity of the *empirical* training
distribution, whose exact flow reproduces training images, so this number is watched.
"""

from __future__ import annotations

import numpy as np

from pafm_jax.evaluation import neighbours

THRESHOLD = 1.0 / 3.0


def nearest_neighbour_ratios(samples: np.ndarray,
                             train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Ratio d1/d2 of each sample's two smallest distances to the training set, and the index
  of its nearest training image.  samples: [N, ...]; train: [M ≥ 2, ...] → [N], [N]."""
  dist, idx = neighbours.nearest_distances(samples, train, 2)
  # d2 = 0 only when a sample equals two identical training images: a copy, ratio 0.
  ratio = np.where(dist[:, 1] > 0, dist[:, 0] / np.maximum(dist[:, 1], 1e-30), 0.0)
  return ratio, idx[:, 0]


def summarize_ratios(ratio: np.ndarray, threshold: float = THRESHOLD) -> dict[str, float]:
  """{'memorized_fraction': share of ratios below threshold, 'nn_ratio_median'}."""
  return {'memorized_fraction': float(np.mean(ratio < threshold)),
          'nn_ratio_median': float(np.median(ratio))}


def memorization_metrics(samples: np.ndarray, train: np.ndarray,
                         threshold: float = THRESHOLD) -> dict[str, float]:
  """{'memorized_fraction': share of samples with ratio < threshold, 'nn_ratio_median'}."""
  ratio, _ = nearest_neighbour_ratios(samples, train)
  return summarize_ratios(ratio, threshold)
