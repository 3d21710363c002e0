"""Orbax checkpoints of the train state and the data iterator, and the run's saved config.

Layout under WORKDIR:
  checkpoints/<step>/state   the train state (params, ema_params, opt_state, step)
  checkpoints/<step>/data    the Grain iterator state of every process
  checkpoints/<step>/inputs  what else the numbers depend on (e.g. the retrieval index hash)
  checkpoints/<step>/checksum  a checksum per state leaf (fault_tolerance.state_checksum)
  corrupt_checkpoints/<step> a checkpoint that failed to restore, moved aside (never deleted)
  config.json                the config of the run that wrote the checkpoints

Orbax writes each step into a temporary directory and renames it when complete, so a crash
(kill -9 included) mid-save never leaves a directory that `latest_step()` would pick up. A
complete checkpoint damaged later (a truncated copy, a bad disk) fails its restore or its
checksum: `restore_intact` then warns, moves it aside and resumes from the one before.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from absl import logging
from etils import epath
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from pafm_jax import fault_tolerance

# Config fields that fix the shapes of the saved parameters: a workdir that was trained with
# other values cannot be resumed with these.
SHAPE_FIELDS = ('model.name', 'data.image_size', 'data.channels', 'data.num_classes',
                'data.text_width')


def create_manager(workdir: str, *, save_every: int, max_to_keep: int,
                   async_save: bool = True) -> ocp.CheckpointManager:
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      # Every `save_every` steps and on a preemption notice; unlike Orbax's default, not at
      # the first step of each run (the loop forces the last step itself).
      save_decision_policy=policies.AnySavePolicy([
          policies.FixedIntervalPolicy(save_every),
          policies.PreemptionCheckpointingPolicy()]),
      max_to_keep=max_to_keep,
      enable_async_checkpointing=async_save,
      create=True,
  )
  return ocp.CheckpointManager(
      workdir_path(workdir) / 'checkpoints',
      options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': grain.checkpoint.CheckpointHandler(),
                     'inputs': ocp.JsonCheckpointHandler(),
                     'checksum': ocp.JsonCheckpointHandler()},
  )


def workdir_path(workdir: str) -> epath.Path:
  """Local paths made absolute (Orbax wants them so); gs:// and other URLs kept as they are."""
  path = epath.Path(workdir)
  return path if '://' in workdir else epath.Path(os.path.abspath(workdir))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any,
         *, inputs: dict | None = None) -> bool:
  """Saves state and iterator at `step` (the train loop decides when: interval, last step,
  preemption), with `inputs` (a JSON dict naming what else the run's numbers depend on, see
  `check_inputs`) and the state's checksum, which `restore_intact` compares with what it
  reads back."""
  args = {'state': ocp.args.StandardSave(state),
          'data': grain.checkpoint.CheckpointSave(data_iterator),
          'checksum': ocp.args.JsonSave(fault_tolerance.state_checksum(state))}
  if inputs is not None:
    args['inputs'] = ocp.args.JsonSave(inputs)
  return manager.save(step, args=ocp.args.Composite(**args), force=True)


def check_inputs(manager: ocp.CheckpointManager, step: int, inputs: dict) -> None:
  """Raises ValueError when checkpoint `step` was trained on other inputs than `inputs`.

  Inputs are what a resumed run's numbers depend on beyond the config and the checkpoint
  itself, e.g. the content hash of the retrieval index: a run resumed (or continued on
  another host) with a different index would silently train on other neighbours.
  """
  if not (epath.Path(manager.directory) / str(step) / 'inputs').exists():
    return  # written before inputs were recorded, or imported
  saved = manager.restore(step, args=ocp.args.Composite(inputs=ocp.args.JsonRestore()))['inputs']
  diffs = [f'{k}: checkpoint {saved[k]!r}, now {inputs.get(k)!r}' for k in sorted(saved)
           if saved[k] != inputs.get(k)]
  if diffs:
    raise ValueError(
        f'checkpoint {step} in {manager.directory} was trained with other inputs than this run '
        f'has ({"; ".join(diffs)}). Resuming would not continue the run exactly: restore the '
        'original inputs (for a retrieval index, copy the one the run started with to '
        'config.retrieval.index_dir), or train into a new --workdir.')


def has_data_state(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether checkpoint `step` holds a data-iterator item (imported checkpoints do not)."""
  return (epath.Path(manager.directory) / str(step) / 'data').exists()


def saved_data_state(manager: ocp.CheckpointManager, step: int) -> Any | None:
  """This process's saved iterator state at `step`, or None when the checkpoint has none for
  this process index and count (it was saved by another number of processes, or imported)."""
  path = (epath.Path(manager.directory) / str(step) / 'data' /
          f'process_{jax.process_index()}-of-{jax.process_count()}.json')
  return json.loads(path.read_text()) if path.exists() else None


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator: Any, derived_data_state: Any = None) -> Any:
  """Restores the state onto the shardings in `abstract_state`, and the iterator in place.

  The iterator gets its saved state when that fits this run (same process count and layout);
  otherwise `derived_data_state` (the position re-derived from the step, logged) when given.
  A checkpoint written by `pafm_jax.tools.import_torch` has no data item: the iterator is then
  left at its start, which is where a fresh run's stream begins.
  """
  args = {'state': ocp.args.StandardRestore(abstract_state)}
  saved = saved_data_state(manager, step)
  if saved is not None and (derived_data_state is None
                            or fault_tolerance.same_layout(saved, derived_data_state)):
    args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  elif has_data_state(manager, step) and derived_data_state is not None:
    data_iterator.set_state(derived_data_state)
    logging.warning('checkpoint %d holds the data position of another topology (process count '
                    'or data.worker_count): re-derived from the step instead, %s. The global '
                    'batch of a step does not depend on the topology, so the stream continues '
                    'exactly.', step, derived_data_state)
  elif has_data_state(manager, step):
    raise ValueError(f'checkpoint {step} has no data-iterator state for process '
                     f'{jax.process_index()} of {jax.process_count()}.')
  else:
    logging.info('checkpoint %d has no data-iterator state (an imported checkpoint): the data '
                 'stream starts from its beginning, with the optimizer state stored by the '
                 'import.', step)
  return manager.restore(step, args=ocp.args.Composite(**args))['state']


def verify_checksum(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Raises ValueError when the restored `state` differs from what was saved at `step`."""
  if not (epath.Path(manager.directory) / str(step) / 'checksum').exists():
    return  # imported, or written before checksums were recorded
  saved = manager.restore(step, args=ocp.args.Composite(
      checksum=ocp.args.JsonRestore()))['checksum']
  bad = fault_tolerance.checksum_mismatch(saved, fault_tolerance.state_checksum(state))
  if bad is not None:
    raise ValueError(f'the restored leaf {bad} does not match its saved checksum')


def restore_intact(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any,
                   derive_data_state: Callable[[int], Any],
                   check: Callable[[int], None] = lambda step: None) -> Any | None:
  """The newest checkpoint that restores and matches its checksum (None: no checkpoint).

  A newer one that fails (truncated, corrupted, half-copied) is reported with its step and
  moved to WORKDIR/corrupt_checkpoints/<step>: kept for inspection, and out of the way of
  the run, which will write that step again. Nothing is moved unless an older checkpoint
  restores, so an error that is not damage (a wrong config, say) leaves every step in place.
  `check(step)` runs before each restore; what it raises is never taken for damage.
  """
  failed = []
  for step in sorted(manager.all_steps(), reverse=True):
    check(step)
    # Each process reads its own shards and iterator file, so damage may show on some only:
    # they agree after the read and again after the checksum (a collective on every process).
    state, error = _attempt(lambda: restore(manager, step, abstract_state, data_iterator,
                                            derive_data_state(step)))
    if fault_tolerance.all_processes_agree(error is None):
      _, error = _attempt(lambda: verify_checksum(manager, step, state))
      if fault_tolerance.all_processes_agree(error is None):
        _move_aside(manager, failed)
        return state
    if error is None:
      error = RuntimeError('it failed to restore on another process (see that log)')
    logging.warning('checkpoint %d in %s cannot be restored (%s: %s); trying the one before.',
                    step, manager.directory, type(error).__name__, error)
    failed.append((step, error))
  if failed:
    raise ValueError(
        f'no checkpoint under {manager.directory} restores: step {failed[0][0]} failed with '
        f'{failed[0][1]!r}. Nothing was moved or deleted; if the config changed since they '
        'were written, train into a new --workdir.') from failed[0][1]
  return None


def _attempt(read: Callable[[], Any]) -> tuple[Any, Exception | None]:
  """(read(), None), or (None, the exception): any failure to read a checkpoint is damage."""
  try:
    return read(), None
  except Exception as e:  # pylint: disable=broad-except
    return None, e


def _move_aside(manager: ocp.CheckpointManager, failed: list) -> None:
  if not failed:
    return
  root = epath.Path(manager.directory)
  aside = root.parent / 'corrupt_checkpoints'
  if jax.process_index() == 0:
    aside.mkdir(parents=True, exist_ok=True)
    for step, _ in failed:
      target = aside / str(step)
      suffix = 0
      while target.exists():
        suffix += 1
        target = aside / f'{step}.{suffix}'
      (root / str(step)).rename(target)
      logging.warning('checkpoint %d is damaged: moved to %s (not deleted); resuming from an '
                      'earlier step.', step, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('pafm_jax: damaged checkpoints moved aside')
  manager.reload()


def save_imported(workdir: str, step: int, state: Any) -> None:
  """Writes `state` as checkpoint `step` with no data item (see `restore`); blocks until done.

  Orbax writes into a temporary directory and renames it when complete, so a failure leaves
  no step directory behind.
  """
  manager = create_manager(workdir, save_every=1, max_to_keep=1, async_save=False)
  try:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
    manager.wait_until_finished()
  finally:
    manager.close()


def _get(config: ml_collections.ConfigDict, dotted: str):
  node = config
  for key in dotted.split('.'):
    node = node[key]
  return node


def check_and_save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to reuse a workdir whose saved run has other parameter shapes; records config.

  Called before any checkpoint is read, so a mismatch never silently restores wrong weights.
  """
  check_config(config, workdir)
  save_config(config, workdir)


def check_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ValueError if workdir/config.json has other values of SHAPE_FIELDS."""
  path = workdir_path(workdir) / 'config.json'
  if path.exists():
    saved = ml_collections.ConfigDict(json.loads(path.read_text()))
    diffs = []
    for field in SHAPE_FIELDS:
      try:
        old = _get(saved, field)
      except (KeyError, AttributeError):
        continue
      new = _get(config, field)
      if old != new:
        diffs.append(f'{field}: saved {old!r}, now {new!r}')
    # A flow map's network has a second time input (more parameters) than a velocity model's.
    saved_map = saved.get('objective', {}).get('name') == 'flow_map'
    if saved_map != (config.objective.name == 'flow_map'):
      diffs.append(f"objective.name: saved {saved.objective.name!r}, now "
                   f"{config.objective.name!r} (a flow map's two-time network and a velocity "
                   'network do not share a checkpoint)')
    if diffs:
      raise ValueError(
          f'workdir {workdir} holds a run with a different model shape ({"; ".join(diffs)}). '
          'Use a new --workdir, or set these config fields back to the saved values.')


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes workdir/config.json (process 0), replacing any earlier one atomically."""
  path = workdir_path(workdir) / 'config.json'
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / 'config.json.tmp'
    tmp.write_text(config.to_json_best_effort(indent=2))
    tmp.replace(path)


def saved_steps(workdir: str) -> list[int]:
  """The steps of the complete checkpoints under workdir/checkpoints, ascending."""
  root = workdir_path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def restore_params(workdir: str, abstract_params: Any, *, use_ema: bool = True,
                   step: int | None = None) -> tuple[Any, int]:
  """Only the (EMA) parameters of a saved train state, onto `abstract_params`' shardings.

  Sampling and evaluation need neither the optimizer state (2× the parameters) nor the data
  iterator, so they are left on disk (Orbax partial restore). Returns (params, step).
  """
  root = workdir_path(workdir) / 'checkpoints'
  steps = saved_steps(workdir)
  if not steps:
    raise FileNotFoundError(f'no checkpoint under {root}; train first (--mode=train).')
  step = steps[-1] if step is None else step
  key = 'ema_params' if use_ema else 'params'
  item = {key: abstract_params}
  restored = ocp.PyTreeCheckpointer().restore(
      root / str(step) / 'state',
      args=ocp.args.PyTreeRestore(item=item,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True))
  return restored[key], step
