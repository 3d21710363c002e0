"""The Fréchet distance between Gaussians fitted to feature sets (FID and its analogues).

FD = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2·tr (Σ1 Σ2)^½   (Dowson & Landau 1982; Heusel et al. 2017).
"""

from __future__ import annotations

import numpy as np


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N ≥ 2."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f'need features of shape [N ≥ 2, D], got {features.shape}.')
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (negative rounding noise clipped)."""
  w, v = np.linalg.eigh(matrix)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).  mu: [D]; sigma: [D, D].

  tr (Σ1 Σ2)^½ equals tr (Σ1^½ Σ2 Σ1^½)^½ (similar matrices), and the latter is symmetric PSD,
  so it comes from two symmetric eigendecompositions in float64: no complex parts to discard
  and no ε added to the diagonal when a covariance is singular (N < D, dead ReLU units), as
  the sqrtm route of pytorch-fid needs.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f'shape mismatch: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, '
                     f'sigma2 {sigma2.shape}.')
  root1 = _psd_sqrt(0.5 * (sigma1 + sigma1.T))
  middle = root1 @ sigma2 @ root1
  eig = np.linalg.eigvalsh(0.5 * (middle + middle.T))
  trace_sqrt = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
