"""Few-step sampling with a flow map (METHOD.md §5): x ← X_{t_k, t_{k+1}}(x) along the grid.

Any number of steps k is chosen at sampling time; each step is one network pass (two inside
the guidance interval with CFG), and k = 1 jumps from noise to data in one.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# φ(x, s, y, t_end) → [B, *S]: the two-time network with s, t_end [B].
MapFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def few_step(map_fn: MapFn, x1: jax.Array, y: jax.Array,
             ts: np.ndarray) -> tuple[jax.Array, int]:
  """Jumps along the decreasing grid `ts` [k + 1] (1 → 0). x1: [B, *S] noise; y: [B].
  Returns (x0, k)."""
  def step(x, t_pair):
    s, t = t_pair
    start, end = jnp.full((x.shape[0],), s, x.dtype), jnp.full((x.shape[0],), t, x.dtype)
    return x + (t - s) * map_fn(x, start, y, end), None

  ts = jnp.asarray(ts, jnp.float32)
  x, _ = jax.lax.scan(step, x1, (ts[:-1], ts[1:]))
  return x, len(ts) - 1
