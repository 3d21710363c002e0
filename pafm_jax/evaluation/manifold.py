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


def inside(points: np.ndarray, manifold_points: np.ndarray, k: int = 3) -> np.ndarray:
  """Whether each of `points` [M, D] lies inside the k-NN manifold of `manifold_points`
  [N > k, D]: [M] bool. Precision is its mean for generated points in the real manifold,
  recall for real points in the generated one."""
  if len(manifold_points) <= k:
    raise ValueError(f'a k-NN manifold with k = {k} needs more than {k} points, got '
                     f'{len(manifold_points)}.')
  return neighbours.covered(points, manifold_points, knn_radii(manifold_points, k))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict[str, float]:
  """{'precision', 'recall'} of fake features [M, D] against real features [N, D]."""
  if len(real) <= k or len(fake) <= k:
    raise ValueError(f'precision/recall with k = {k} needs more than {k} points per set, got '
                     f'{len(real)} real and {len(fake)} generated.')
  return {'precision': float(np.mean(inside(fake, real, k))),
          'recall': float(np.mean(inside(real, fake, k)))}
