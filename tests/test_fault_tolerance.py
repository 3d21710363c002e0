"""Runs that survive what pods do to them: kill -9, preemption, damaged checkpoints, NaNs,
dead peers and a new topology. Each compares with an uninterrupted run or a closed form."""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pafm_jax import fault_tolerance, sharding, train
from pafm_jax.data import pipeline
from tests import runs
from tests.test_train import tiny_config


# ------------------------------------------------------------------------------ pure pieces


def _brute_force_checksum(x: np.ndarray) -> int:
  bits = (x.astype(np.float32).view(np.uint32) if x.dtype.kind == 'f'
          else x.astype(np.int64).astype(np.uint32)).ravel().astype(np.uint64)
  weights = (np.arange(bits.size, dtype=np.uint64) * (2 * 2654435761 % 2**32) + 1) % 2**32
  return int(np.sum((bits * weights) % 2**32) % 2**32)


def test_state_checksum_is_a_sharding_independent_sum_that_sees_one_flipped_bit():
  rng = np.random.default_rng(0)
  state = {'w': rng.normal(size=(16, 24)).astype(np.float32),
           'b': jnp.asarray(rng.normal(size=(24,)), jnp.bfloat16),
           'step': np.int32(7)}
  expected = {"['w']": _brute_force_checksum(state['w']),
              "['b']": _brute_force_checksum(np.asarray(state['b'].astype(jnp.float32))),
              "['step']": 7}
  assert fault_tolerance.state_checksum(state) == expected
  mesh = sharding.create_mesh({'data': 2, 'fsdp': 4})
  sharded = dict(state, w=jax.device_put(state['w'], jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(('data', 'fsdp'), None))))
  assert fault_tolerance.state_checksum(sharded) == expected
  # Any single bit of any element, the sign bit at odd positions included.
  for (row, column), bit in [((5, 3), 12), ((0, 1), 31), ((2, 7), 30), ((15, 23), 0)]:
    flipped = state['w'].copy()
    flipped.view(np.uint32)[row, column] ^= np.uint32(1 << bit)
    damaged = fault_tolerance.state_checksum(dict(state, w=flipped))
    assert fault_tolerance.checksum_mismatch(expected, damaged) == "['w']", (row, column, bit)


@pytest.mark.parametrize('workers', [0, 2])
def test_data_position_derived_from_the_step_is_grains_own_state(fmnist_tfds_dir, workers):
  """What an elastic resume sets equals what Grain reports after that many batches."""
  config = tiny_config(fmnist_tfds_dir, **{'data.worker_count': workers})
  it = pipeline.create_train_iterator(config.data, local_batch_size=8, seed=0)
  try:
    for step in range(6):
      assert it.get_state() == fault_tolerance.iterator_state_at(step, workers), step
      next(it)
  finally:
    it.close()


def test_watchdog_ends_a_process_that_makes_no_progress():
  code = ('import time; from pafm_jax import fault_tolerance as f\n'
          'w = f.Watchdog(1.5); w.kick("step 7"); time.sleep(60)')
  start = time.monotonic()
  out = subprocess.run([sys.executable, '-c', code], cwd=runs.REPO, env=runs.env(1),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == fault_tolerance.HANG_EXIT_CODE, out.stderr[-2000:]
  assert time.monotonic() - start < 40
  assert 'waiting for step 7' in out.stderr and 'time.sleep' not in out.stdout
  assert 'Thread' in out.stderr  # every thread's stack, to see where it hung


def test_watchdog_does_not_count_the_time_the_process_was_suspended():
  """A process stopped (SIGSTOP) for longer than the timeout in the middle of a step, then
  continued, finishes: the stop is not a hang. Its steps are fixed amounts of work, not
  sleeps, so after SIGCONT the watchdog looks before the step ends and kicks; without the
  suspension check it would see 15 s of no progress against a timeout of 8 s and exit 75."""
  code = ('from pafm_jax import fault_tolerance as f\n'
          'w = f.Watchdog(8)\n'
          'for step in range(4):\n'
          '  print("step", step, flush=True)\n'
          '  for _ in range(30_000_000): pass  # about a second of work\n'
          '  w.kick(f"step {step + 1}")\n'
          'w.close(); print("done", flush=True)')
  proc = subprocess.Popen([sys.executable, '-c', code], cwd=runs.REPO, env=runs.env(1),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    while proc.stdout.readline() != 'step 1\n':
      assert proc.poll() is None, proc.stderr.read()[-2000:]
    time.sleep(0.3)
    proc.send_signal(signal.SIGSTOP)
    time.sleep(fault_tolerance.SUSPENDED_AFTER_S + 5)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0 and out.endswith('done\n'), (proc.returncode, err[-2000:])


# ------------------------------------------------------------------------ non-finite steps


@pytest.mark.slow
def test_nonfinite_step_is_skipped_or_stops_with_the_last_checkpoint_intact(fmnist_tfds_dir,
                                                                          tmp_path):
  overrides = {'total_steps': 5, 'log_every_steps': 5, 'checkpoint_every_steps': 1,
               'keep_checkpoints': 10, 'fault.inject_nonfinite_at_steps': (2,)}
  skip_dir = str(tmp_path / 'skip')
  result = train.train_and_evaluate(
      tiny_config(fmnist_tfds_dir, **overrides, **{'fault.nonfinite': 'skip'}), skip_dir)
  assert result['metrics']['nonfinite_steps'] == 1 and np.isfinite(result['metrics']['loss'])
  states = {s: runs.saved_state(skip_dir, s) for s in (2, 3, 4)}
  # The update from state 2 to 3 was dropped (only the step count moved); the next was not.
  runs.assert_states_equal({k: v for k, v in states[3].items() if k != 'step'},
                           {k: v for k, v in states[2].items() if k != 'step'})
  assert int(states[3]['step']) == 3
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(states[4]['params']),
                                                      jax.tree.leaves(states[3]['params'])))

  stop_dir = str(tmp_path / 'stop')
  with pytest.raises(FloatingPointError, match=r'step 3: .*checkpoint, step 2, is intact'):
    train.train_and_evaluate(
        tiny_config(fmnist_tfds_dir, **overrides, **{'fault.nonfinite': 'stop'}), stop_dir)
  assert sorted(os.listdir(os.path.join(stop_dir, 'checkpoints'))) == ['1', '2']
  runs.assert_states_equal(runs.saved_state(stop_dir, 2), states[2])


# ----------------------------------------------------------------------- damaged checkpoints


def _truncate_largest_file(directory: str) -> str:
  files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.truncate(os.path.getsize(largest) // 2)
  return largest


@pytest.mark.slow
def test_truncated_latest_checkpoint_is_moved_aside_and_the_run_resumes_before_it(
    fmnist_tfds_dir, tmp_path, caplog):
  config = tiny_config(fmnist_tfds_dir)  # 4 steps, checkpoints at 2 and 4
  workdir = str(tmp_path / 'run')
  uninterrupted = jax.device_get(train.train_and_evaluate(config, workdir)['state'])
  _truncate_largest_file(os.path.join(workdir, 'checkpoints', '4', 'state'))

  resumed = jax.device_get(train.train_and_evaluate(config, workdir)['state'])
  assert 'checkpoint 4' in caplog.text and 'cannot be restored' in caplog.text
  assert os.listdir(os.path.join(workdir, 'corrupt_checkpoints')) == ['4']
  runs.assert_states_equal(resumed, uninterrupted)  # steps 3-4 again, bit for bit

  # Every checkpoint damaged: an error, and nothing is moved or deleted.
  for step in ('2', '4'):
    _truncate_largest_file(os.path.join(workdir, 'checkpoints', step, 'state'))
  with pytest.raises(ValueError, match='no checkpoint .* restores'):
    train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']


# --------------------------------------------------------------------------- fault injection


class _Run:
  """One start of the tiny job as a separate process on one CPU device."""

  def __init__(self, flags: list[str], log: str):
    self.log = log
    self.proc = subprocess.Popen(runs.main_command(flags), cwd=runs.REPO, env=runs.env(1),
                                 stdout=subprocess.DEVNULL, stderr=open(log, 'w'))

  def text(self) -> str:
    return runs.read(self.log)

  def wait_for(self, needle: str, timeout: float = 300) -> bool:
    """Whether `needle` appeared in the log before the process ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if needle in self.text():
        return True
      if self.proc.poll() is not None:
        return needle in self.text()
      time.sleep(0.05)
    raise TimeoutError(f'{needle!r} not logged within {timeout} s: {self.text()[-3000:]}')

  def finish(self, timeout: float = 300) -> int:
    return self.proc.wait(timeout)


def _checkpoints(workdir: str, complete: bool = True) -> list[str]:
  root = os.path.join(workdir, 'checkpoints')
  names = sorted(os.listdir(root), key=lambda n: (len(n), n)) if os.path.isdir(root) else []
  return [n for n in names if n.isdigit()] if complete else names


def _kill_during_save(run: _Run, workdir: str, leftovers: set[str]) -> bool:
  """SIGKILL as soon as Orbax's temporary directory of a new async save appears."""
  while run.proc.poll() is None:
    if any('tmp' in name and name not in leftovers
           for name in _checkpoints(workdir, complete=False)):
      run.proc.kill()
      return True
    time.sleep(0.002)
  return False


def _last_logged_step(log: str) -> int:
  return max(runs.logged_losses(log), default=0)


@pytest.mark.slow
def test_killed_and_preempted_runs_end_bit_identical_to_an_uninterrupted_one(fmnist_tfds_dir,
                                                                             tmp_path):
  """5 SIGKILLs (one anywhere, start-up included; one inside an async save; three at random
  steps) and a SIGTERM, each followed by a restart; the final state equals an uninterrupted
  run's bit for bit. Prints the table of docs/scaling.md (fault, step, outcome)."""
  settings = {'total_steps': 40, 'checkpoint_every_steps': 4, 'keep_checkpoints': 2}
  reference_dir, faulty_dir = str(tmp_path / 'reference'), str(tmp_path / 'faulty')
  reference = _Run(runs.tiny_flags(fmnist_tfds_dir, reference_dir, **settings),
                   str(tmp_path / 'reference.log'))
  rng = np.random.default_rng(0)
  table = []
  faults = ['SIGKILL', 'SIGKILL', 'SIGKILL during a save', 'SIGKILL', 'SIGKILL', 'SIGTERM']
  for i, fault in enumerate(faults):
    leftovers = set(_checkpoints(faulty_dir, complete=False))
    run = _Run(runs.tiny_flags(fmnist_tfds_dir, faulty_dir, **settings),
               str(tmp_path / f'faulty_{i}.log'))
    if i == 0:  # anywhere, start-up included
      time.sleep(rng.uniform(0, 20))
      run.proc.kill()
    elif fault == 'SIGKILL during a save':
      assert run.wait_for('compiled the train step')
      assert _kill_during_save(run, faulty_dir, leftovers), 'the run ended before a save'

    else:
      assert run.wait_for('compiled the train step')
      resumed = re.search(r'restoring checkpoint at step (\d+)', run.text())
      # Far enough to pass a checkpoint (every 4 steps), so the next start resumes later.
      target = (int(resumed[1]) if resumed else 0) + int(rng.integers(5, 13))
      assert run.wait_for(f'] [{target}] '), run.text()[-3000:]
      time.sleep(rng.uniform(0, 0.3))
      run.proc.send_signal(signal.SIGTERM if fault == 'SIGTERM' else signal.SIGKILL)
    code = run.finish()
    log = run.text()
    resumed = re.search(r'restoring checkpoint at step (\d+)', log)
    if fault == 'SIGTERM':
      assert code == 0 and 'preemption (SIGTERM) at step' in log, log[-3000:]
      outcome = re.search(r'preemption \(SIGTERM\) at step \d+: checkpoint \d+ saved', log)[0]
    else:
      assert code == -signal.SIGKILL
      unfinished = sorted(set(_checkpoints(faulty_dir, complete=False)) -
                          set(_checkpoints(faulty_dir)))
      outcome = (f'killed; complete checkpoints {_checkpoints(faulty_dir)}'
                 + (f', unfinished {unfinished}' if unfinished else ''))
    table.append((fault, resumed[1] if resumed else 'fresh start',
                  _last_logged_step(log) or 'before step 1', outcome))
  final = _Run(runs.tiny_flags(fmnist_tfds_dir, faulty_dir, **settings),
               str(tmp_path / 'final.log'))
  assert final.finish() == 0 and reference.finish() == 0, final.text()[-3000:]
  print('\n| fault | resumed from | last step logged | outcome |\n|---|---|---|---|')
  for row in table:
    print('| ' + ' | '.join(map(str, row)) + ' |')
  runs.assert_states_equal(runs.saved_state(faulty_dir, 40), runs.saved_state(reference_dir, 40))


# --------------------------------------------------------------------------------- dead peer


@pytest.mark.slow
def test_killing_one_of_two_processes_ends_the_other_within_the_timeout(fmnist_tfds_dir,
                                                                        tmp_path):
  timeout = 45
  flags = runs.tiny_flags(fmnist_tfds_dir, str(tmp_path / 'run'), total_steps=100_000,
                          **{'fault.hang_timeout_s': timeout,
                             'fault.heartbeat_timeout_s': timeout})
  listing = subprocess.run(
      [os.path.join(runs.REPO, 'launch', 'local.sh'), '--dry-run', '2', *flags],
      cwd=runs.REPO, env=dict(runs.env(2), DEVICES_PER_PROCESS='2', PYTHON=sys.executable),
      capture_output=True, text=True, check=True).stdout
  commands = [line for line in listing.splitlines() if not line.startswith('#')]
  procs = []
  for i, command in enumerate(commands):
    log = str(tmp_path / f'process_{i}.log')
    procs.append(subprocess.Popen(['bash', '-c', command], stdout=subprocess.DEVNULL,
                                  stderr=open(log, 'w')))
  log0 = str(tmp_path / 'process_0.log')
  deadline = time.monotonic() + 300
  while 'steps_per_sec' not in runs.read(log0):
    assert time.monotonic() < deadline and procs[0].poll() is None, runs.read(log0)[-3000:]
    time.sleep(0.2)
  procs[1].kill()
  start = time.monotonic()
  code = procs[0].wait(timeout=timeout + 60)
  assert code != 0
  # The bound is the configured timeout plus the time to print every thread's stack and
  # exit: when the watchdog is what ends it, its clock runs from the last progress before the
  # kill, and on a loaded 2-core machine such an end once came 0.3 s past the bare timeout.
  ended_after = time.monotonic() - start
  assert ended_after < timeout + 15, (ended_after, runs.read(log0)[-2000:])
