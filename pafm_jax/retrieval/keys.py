"""Retrieval keys: the vector a dataset item (or a posterior query) is searched by.

A key is a fixed *linear* map of the flattened sample. Linearity matters: the noisy query is
x_t/α_t, and for a linear map K the nearest keys to K(x_t/α_t) are the nearest items in the
transformed space, so the same transform serves items and queries (METHOD.md §3). Nearest in
the untransformed space is exactly the top Gaussian likelihood: −‖x_t − α·x0_j‖²/2σ² =
−(α/σ)²‖x_t/α − x0_j‖²/2.

  flatten            the sample itself, D = H·W·C (exact likelihood order)
  avg_pool           mean over non-overlapping key_pool × key_pool spatial windows
  random_projection  a seeded Gaussian matrix [D, key_dim] / √key_dim (Johnson–Lindenstrauss)

Everything is numpy: keys are computed on the host, in Grain's worker processes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

KEY_TRANSFORMS = ('flatten', 'avg_pool', 'random_projection')


@dataclasses.dataclass(frozen=True)
class KeyTransform:
  """Maps samples [N, H, W, C] to keys float32 [N, dim]."""
  kind: str
  sample_shape: tuple[int, int, int]
  pool: int = 1          # avg_pool window
  key_dim: int = 0       # random_projection output size
  seed: int = 0          # random_projection matrix seed

  def __post_init__(self):
    h, w, c = self.sample_shape
    if self.kind not in KEY_TRANSFORMS:
      raise ValueError(f'unknown key transform {self.kind!r}; config.retrieval.key must be one '
                       f'of {KEY_TRANSFORMS}.')
    if self.kind == 'avg_pool' and (self.pool < 1 or h % self.pool or w % self.pool):
      raise ValueError(f'config.retrieval.key_pool={self.pool} must be ≥ 1 and divide the '
                       f'sample size {h}×{w}.')
    if self.kind == 'random_projection' and not 0 < self.key_dim <= h * w * c:
      raise ValueError(f'config.retrieval.key_dim={self.key_dim} must lie in [1, {h * w * c}] '
                       'for a random projection.')

  @classmethod
  def from_config(cls, config) -> 'KeyTransform':
    r, d = config.retrieval, config.data
    return cls(r.key, (d.image_size, d.image_size, d.channels), pool=r.key_pool,
               key_dim=r.key_dim, seed=r.key_seed)

  @property
  def dim(self) -> int:
    h, w, c = self.sample_shape
    if self.kind == 'avg_pool':
      return (h // self.pool) * (w // self.pool) * c
    if self.kind == 'random_projection':
      return self.key_dim
    return h * w * c

  def describe(self) -> dict[str, Any]:
    """What the index metadata records, and what a loaded index is checked against."""
    out = {'kind': self.kind, 'sample_shape': list(self.sample_shape), 'dim': self.dim}
    if self.kind == 'avg_pool':
      out['pool'] = self.pool
    if self.kind == 'random_projection':
      out['seed'] = self.seed
    return out

  def matrix(self) -> np.ndarray:
    """The projection [D, key_dim], float32: a pure function of (seed, shape)."""
    d = int(np.prod(self.sample_shape))
    rng = np.random.default_rng([self.seed, d, self.key_dim, 0x4B45])
    return (rng.standard_normal((d, self.key_dim), np.float32) /
            np.float32(np.sqrt(self.key_dim)))

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    if x.shape[1:] != tuple(self.sample_shape):
      raise ValueError(f'key transform expects samples of shape {self.sample_shape}, got '
                       f'{x.shape[1:]}.')
    if self.kind == 'avg_pool':
      h, w, c = self.sample_shape
      p = self.pool
      return x.reshape(n, h // p, p, w // p, p, c).mean(axis=(2, 4)).reshape(n, -1)
    flat = x.reshape(n, -1)
    if self.kind == 'random_projection':
      return flat @ self._cached_matrix()
    return flat

  def _cached_matrix(self) -> np.ndarray:
    # Frozen dataclass: the cache lives outside the fields, so equality and the metadata only
    # see (kind, shape, key_dim, seed).
    cache = self.__dict__.get('_matrix')
    if cache is None:
      cache = self.matrix()
      object.__setattr__(self, '_matrix', cache)
    return cache

  def __getstate__(self):  # Grain workers recompute the matrix rather than unpickle it.
    return {k: v for k, v in self.__dict__.items() if k != '_matrix'}

  def __setstate__(self, state):
    self.__dict__.update(state)
