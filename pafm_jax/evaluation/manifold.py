"""Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall
Metric for Assessing Generative Models").

Each set's manifold is the union of balls around its points, each ball reaching the point's
k-th nearest neighbour within the set (k = 3 in the paper). Precision: the fraction of
generated points inside the real manifold (how many samples look real). Recall: the fraction
of real points inside the generated manifold (how much of the data the model covers).
"""

from __future__ import annotations

import numpy as np

from pafm_jax.evaluation import neighbours


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
  """Distance of each point to its k-th nearest other point of the same set: [N].

  The k + 1 smallest distances include the point itself at 0.
  """
  dist, _ = neighbours.nearest_distances(features, features, k + 1)
  return dist[:, k]


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict[str, float]:
  """{'precision', 'recall'} of fake features [M, D] against real features [N, D]."""
  if len(real) <= k or len(fake) <= k:
    raise ValueError(f'precision/recall with k = {k} needs more than {k} points per set, got '
                     f'{len(real)} real and {len(fake)} generated.')
  precision = neighbours.fraction_covered(fake, real, knn_radii(real, k))
  recall = neighbours.fraction_covered(real, fake, knn_radii(fake, k))
  return {'precision': precision, 'recall': recall}
