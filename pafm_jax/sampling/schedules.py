"""Time grids of the fixed-step samplers (t = 1 noise → t = 0 data, METHOD.md §1).

All grids are concrete numpy arrays built at trace time: their length fixes the number of scan
steps, so it must be static, and StableVS's thinning selects points by value.
"""

from __future__ import annotations

import numpy as np


def shift_time(t: np.ndarray, shift: float) -> np.ndarray:
  """The resolution time shift t' = s·t / (1 + (s − 1)·t) (Esser et al. 2024, SD3, §5.3.2).

  Fixes t = 0 and t = 1; s > 1 moves every interior point towards the noise end (more steps
  at high noise), s < 1 towards the data end, s = 1 is the identity. SD3 sets s = sqrt(m/n)
  for a resolution of m pixels trained at n.
  """
  if shift <= 0:
    raise ValueError(f'the time shift must be > 0, got {shift}.')
  t = np.asarray(t, np.float64)
  return shift * t / (1.0 + (shift - 1.0) * t)


def time_grid(num_steps: int, shift: float = 1.0) -> np.ndarray:
  """Decreasing grid from 1 to 0 with `num_steps` steps: float32 [num_steps + 1].

  Uniform in t, then shifted by `shift_time` (shift 1 keeps it uniform).
  """
  if num_steps < 1:
    raise ValueError(f'num_steps must be ≥ 1, got {num_steps}.')
  uniform = np.linspace(1.0, 0.0, num_steps + 1)
  return shift_time(uniform, shift).astype(np.float32)


def stablevs_grid(base: np.ndarray, split: float, low_steps: int) -> np.ndarray:
  """StableVS's thinned grid (METHOD.md §4; Lin et al. 2026, reference code StableVelocity).

  Keeps every point of the decreasing `base` grid with t ≥ `split`, and of the points below it
  (excluding the terminal 0) keeps `low_steps` at the indices round(linspace(0, n − 1,
  low_steps)), then ends at 0. The low-variance region t < split is thus crossed in
  `low_steps` steps whatever the base resolution there. Returns float32 [M + 1].
  """
  base = np.asarray(base, np.float32)
  if base[0] != 1.0 or base[-1] != 0.0 or np.any(np.diff(base) >= 0):
    raise ValueError('the base grid must decrease strictly from 1 to 0.')
  if low_steps < 1:
    raise ValueError(f'StableVS needs ≥ 1 low-region step, got {low_steps}.')
  high = base[base >= split]
  low = base[(base < split) & (base > 0)]
  if low.size == 0:
    return base
  # More requested steps than base points would repeat indices (zero-length steps).
  count = min(low_steps, low.size)
  idx = np.round(np.linspace(0, low.size - 1, count)).astype(np.int64)
  return np.concatenate([high, low[idx], np.zeros(1, np.float32)])
