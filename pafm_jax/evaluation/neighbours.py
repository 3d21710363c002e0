"""Exact nearest-neighbour distances in chunks: the k-NN manifolds of precision/recall and
the memorisation ratio both reduce to "the k smallest distances from each query to a set".

Everything is brute force on the default device, chunked so that no [queries, keys] matrix
larger than chunk × chunk is ever held.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

CHUNK = 2048


@jax.jit
def squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """‖a_i − b_j‖²: [n, D], [m, D] → [n, m], float32, ≥ 0.

  The expanded form ‖a‖² − 2·a·b + ‖b‖² turns the work into one matmul; its cancellation error
  (≈ 1e-7 × ‖a‖²) is far below the distances the metrics compare, and it is clipped at 0.
  """
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  cross = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  d = jnp.sum(a * a, 1)[:, None] - 2.0 * cross + jnp.sum(b * b, 1)[None, :]
  return jnp.maximum(d, 0.0)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  return np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)])


@functools.partial(jax.jit, static_argnames='k')
def _merge_smallest(best_d, best_i, q, keys, offset, valid, k):
  """Merges the k smallest distances of a key chunk into the running [n, k] best."""
  d = squared_distances(q, keys)
  d = jnp.where(valid[None, :], d, jnp.inf)
  idx = offset + jnp.arange(keys.shape[0])
  all_d = jnp.concatenate([best_d, d], axis=1)
  all_i = jnp.concatenate([best_i, jnp.broadcast_to(idx, d.shape)], axis=1)
  neg, pos = jax.lax.top_k(-all_d, k)
  return -neg, jnp.take_along_axis(all_i, pos, axis=1)


def nearest_distances(queries: np.ndarray, keys: np.ndarray, k: int,
                      chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
  """The k smallest Euclidean distances from each query to `keys`, ascending, and their
  indices.  queries: [n, ...]; keys: [m, ...] (flattened to vectors) → [n, k], [n, k]."""
  queries = np.asarray(queries, np.float32).reshape(len(queries), -1)
  keys = np.asarray(keys, np.float32).reshape(len(keys), -1)
  if k > len(keys):
    raise ValueError(f'asked for {k} neighbours among {len(keys)} points.')
  out_d, out_i = [], []
  for start in range(0, len(queries), chunk):
    q = queries[start:start + chunk]
    n = len(q)
    q = jnp.asarray(_pad_rows(q, chunk))
    best_d = jnp.full((chunk, k), jnp.inf)
    best_i = jnp.zeros((chunk, k), jnp.int32)
    for kstart in range(0, len(keys), chunk):
      kc = keys[kstart:kstart + chunk]
      valid = jnp.arange(chunk) < len(kc)
      best_d, best_i = _merge_smallest(best_d, best_i, q, jnp.asarray(_pad_rows(kc, chunk)),
                                       kstart, valid, k)
    out_d.append(np.sqrt(np.asarray(best_d[:n])))
    out_i.append(np.asarray(best_i[:n]))
  return np.concatenate(out_d), np.concatenate(out_i)


@jax.jit
def _covered(q, keys, radii, valid):
  """Whether each query lies within radius_j of some key j: [n] bool."""
  d = squared_distances(q, keys)
  return jnp.any((d <= radii[None, :] ** 2) & valid[None, :], axis=1)


def covered(queries: np.ndarray, keys: np.ndarray, radii: np.ndarray,
            chunk: int = CHUNK) -> np.ndarray:
  """Whether each query lies inside the union of balls B(keys_j, radii_j): [n] bool."""
  queries = np.asarray(queries, np.float32).reshape(len(queries), -1)
  keys = np.asarray(keys, np.float32).reshape(len(keys), -1)
  radii = np.asarray(radii, np.float32)
  out = []
  for start in range(0, len(queries), chunk):
    q = queries[start:start + chunk]
    hit = jnp.zeros((chunk,), bool)
    qp = jnp.asarray(_pad_rows(q, chunk))
    for kstart in range(0, len(keys), chunk):
      kc = keys[kstart:kstart + chunk]
      valid = jnp.arange(chunk) < len(kc)
      hit |= _covered(qp, jnp.asarray(_pad_rows(kc, chunk)),
                      jnp.asarray(_pad_rows(radii[kstart:kstart + chunk], chunk)), valid)
    out.append(np.asarray(hit[:len(q)]))
  return np.concatenate(out) if out else np.zeros((0,), bool)

