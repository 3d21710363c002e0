"""What keeps a long run safe on hardware that fails: preemption notices, non-finite steps,
hung processes, state checksums, and the data position of a resume on another topology.

The train loop (train.py) owns when these run; checkpointing.py owns what is on disk. Every
piece here is small and host-side, except `state_checksum`, which reduces the sharded state on
the devices.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

# The exit status of a process that stopped itself because a step, a peer or a save hung: a
# launcher (or a pod's restart policy) can tell it from a crash (1) and simply start again.
HANG_EXIT_CODE = 75
NONFINITE_MODES = ('stop', 'skip')


def check_config(config: Any) -> None:
  """config.fault's fields (config_checks runs this before any work)."""
  fault = config.fault
  if fault.nonfinite not in NONFINITE_MODES:
    raise ValueError(f'config.fault.nonfinite={fault.nonfinite!r}; choose one of '
                     f'{NONFINITE_MODES}.')
  if not fault.hang_timeout_s >= 0:
    raise ValueError(f'config.fault.hang_timeout_s={fault.hang_timeout_s}; use seconds > 0, '
                     'or 0 to turn the watchdog off.')
  if not fault.heartbeat_timeout_s >= 1:
    raise ValueError(f'config.fault.heartbeat_timeout_s={fault.heartbeat_timeout_s}; use '
                     'whole seconds ≥ 1 (JAX\'s default is 100).')
  bad = [s for s in fault.inject_nonfinite_at_steps if not (isinstance(s, int) and s >= 0)]
  if bad:
    raise ValueError(f'config.fault.inject_nonfinite_at_steps has {bad}: list steps (ints ≥ 0) '
                     'whose gradients to make NaN, or leave it empty.')


# --------------------------------------------------------------------------------------------
# Preemption.


class PreemptionNotice:
  """Whether the run was asked to stop (SIGTERM), at a step every process agrees on.

  With several processes, JAX's preemption sync manager (started by jax.distributed) catches
  the signal on any host and makes `reached_preemption_sync_point` return True at the same step
  on all of them; Orbax's manager asks it. A single process has no such service: this class
  catches SIGTERM itself, and the next step is the agreed one.
  """

  def __init__(self) -> None:
    self.received_at: float | None = None
    self._previous_handler = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self.received_at = time.time()

  def reached(self, step: int, manager: Any) -> bool:
    if jax.process_count() > 1:
      return manager.reached_preemption(step)
    return self.received_at is not None

  def close(self) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None


# --------------------------------------------------------------------------------------------
# Non-finite steps.


def nonfinite_injection(step: jax.Array, steps: tuple[int, ...]) -> jax.Array:
  """1.0, or NaN at the listed steps: config.fault.inject_nonfinite_at_steps multiplies the
  gradients by it, to rehearse the guard (a real NaN comes from data or a learning rate)."""
  hit = jnp.any(step == jnp.asarray(steps, jnp.int32))
  return jnp.where(hit, jnp.float32(jnp.nan), jnp.float32(1.0))


def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `finite` (a scalar bool), else `old`: the update of a non-finite step is
  dropped on the devices, so no state (and no checkpoint) ever holds its NaNs."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


class NonFiniteSteps:
  """The host's view of the step's `nonfinite` flag: a warning and a count ('skip') or an
  error ('stop'). Either way the step already left the state as it was."""

  def __init__(self, mode: str) -> None:
    if mode not in NONFINITE_MODES:
      raise ValueError(f'config.fault.nonfinite={mode!r}; choose one of {NONFINITE_MODES}.')
    self.mode = mode
    self.skipped = 0
    self._last_checked = -1

  def check(self, step: int, metrics: dict, last_checkpoint: int | None) -> None:
    """`metrics` are those of step `step` (1-based: the step that produced state `step`);
    each step is looked at once however often it is passed."""
    if step <= self._last_checked:
      return
    self._last_checked = step
    if not int(metrics['nonfinite']):
      return
    if self.mode == 'stop':
      kept = ('no checkpoint was written yet' if last_checkpoint is None
              else f'the last checkpoint, step {last_checkpoint}, is intact')
      raise FloatingPointError(
          f'step {step}: the loss or the gradient is not finite; stopping '
          f"(config.fault.nonfinite='stop'), {kept}. Lower the learning rate, check the data, "
          "or set --config.fault.nonfinite=skip to drop such updates and go on.")
    self.skipped += 1
    logging.warning('step %d: non-finite loss or gradient; the update was skipped (%d skipped '
                    'so far in this process).', step, self.skipped)


# --------------------------------------------------------------------------------------------
# Hangs.


# A watchdog poll that returns this much later than asked means the process was suspended.
SUSPENDED_AFTER_S = 10.0


class Watchdog:
  """Ends the process with HANG_EXIT_CODE when no progress is reported for `timeout_s`.

  A step whose collective waits for a dead peer, or a save stuck on storage, never returns;
  without this the other processes of a pod sit idle until someone notices. The thread dumps
  every thread's stack to stderr first, so the log says where it hung. timeout_s = 0: off.
  The train loop runs under it (steps, saves, the last save); sampling and evaluation pause it,
  and a dead peer there is JAX's heartbeat timeout's to catch. Time the whole process spent
  suspended (SIGSTOP or Ctrl-Z, a paused VM, a sleeping laptop) is nobody's hang and does not
  count: the watchdog sees it as a wake-up far later than its poll.
  """

  def __init__(self, timeout_s: float) -> None:
    self.timeout_s = float(timeout_s)
    self._last = time.monotonic()
    self._what = 'the first step'
    self._lock = threading.Lock()  # kick() and the watch thread both move _last
    self._stop = threading.Event()
    self._paused = False
    self._thread = None
    if self.timeout_s > 0:
      self._thread = threading.Thread(target=self._watch, name='pafm-watchdog', daemon=True)
      self._thread.start()

  def kick(self, what: str) -> None:
    """Progress: the clock restarts, waiting for `what` next."""
    with self._lock:
      self._last, self._what = time.monotonic(), what

  @contextlib.contextmanager
  def paused(self):
    """No deadline inside (sampling, evaluation: their length is the user's choice)."""
    what, self._paused = self._what, True
    try:
      yield
    finally:
      self._paused = False
      self.kick(what)

  def _watch(self) -> None:
    poll = min(1.0, self.timeout_s / 10)
    woke = time.monotonic()
    while not self._stop.wait(poll):
      now = time.monotonic()
      late = now - woke - poll  # a busy machine wakes threads late by far less than this bound
      woke = now
      with self._lock:
        if late > SUSPENDED_AFTER_S:  # the process was not running: the clock stood still
          self._last = min(self._last + late, now)
        idle = now - self._last
      if idle > self.timeout_s and not self._paused:
        logging.error('process %d: no progress for %.0f s while waiting for %s '
                      '(config.fault.hang_timeout_s=%g); a peer process may have died. Exiting '
                      'with status %d; restart the job to resume from the last checkpoint.',
                      jax.process_index(), idle, self._what, self.timeout_s, HANG_EXIT_CODE)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(HANG_EXIT_CODE)  # pylint: disable=protected-access  (no cleanup can finish)

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()


# --------------------------------------------------------------------------------------------
# State checksums.


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """A uint32 sum of the leaf's bit patterns, each weighted by an odd number that depends on
  its position.

  Integer addition modulo 2³² is associative, so the value does not depend on how the leaf is
  sharded or reduced. An odd weight is invertible modulo 2³², so changing any one element (any
  of its bits) always changes the sum.
  """
  bits = x.astype(jnp.uint32) if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_ \
      else jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  position = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape)
  weight = position * jnp.uint32(2 * 2654435761 % 2**32) + jnp.uint32(1)  # always odd
  return jnp.sum(bits * weight, dtype=jnp.uint32)


@jax.jit
def _checksums(state: Any) -> list[jax.Array]:
  return [_leaf_checksum(x) for x in jax.tree.leaves(state)]


def state_checksum(state: Any) -> dict[str, int]:
  """{leaf path: uint32 checksum} of a (sharded) train state, computed on its devices."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(state)]
  values = jax.device_get(_checksums(state))
  return {p: int(v) for p, v in zip(paths, values)}


def checksum_mismatch(saved: dict[str, int], restored: dict[str, int]) -> str | None:
  """The first leaf whose checksum differs (or that is missing), or None when all agree."""
  for path in sorted(set(saved) | set(restored)):
    if saved.get(path) != restored.get(path):
      return path
  return None


# --------------------------------------------------------------------------------------------
# The data position of a resume.


def iterator_state_at(step: int, worker_count: int) -> dict:
  """The Grain iterator state (data/pipeline.py's train iterator) after `step` batches.

  The global batch of step s is a pure function of (seed, s), whatever the process count
  (pipeline.py), so this is exact: it is what `get_state()` returns after `step` calls of
  `next`. With `worker_count` > 0, `mp_prefetch` hands batch i to worker i mod W, whose own
  iterator then stands at the number of batches it has produced.
  """
  if worker_count <= 0:
    return {'next_index': int(step)}
  w = int(worker_count)
  return {'next_index_in_cycle': int(step) % w,
          'next_index_in_datasets': w,
          'iterators_in_use_indices': list(range(w)),
          'iterators_in_use_states': [{'next_index': (int(step) - i + w - 1) // w}
                                      for i in range(w)],
          'exhausted': [0] * w,
          'future_states': {}}


def same_layout(a: Any, b: Any) -> bool:
  """Whether two JSON states have the same keys and list lengths (values may differ)."""
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(same_layout(a[k], b[k]) for k in a)
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(same_layout(x, y) for x, y in zip(a, b))
  return not isinstance(a, (dict, list)) and not isinstance(b, (dict, list))


def all_processes_agree(ok: bool) -> bool:
  """True only when `ok` holds on every process (one process's failed restore is everyone's)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray([ok], np.int32))))
