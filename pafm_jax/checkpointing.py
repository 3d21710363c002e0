"""Orbax checkpoints of the train state and the data iterator, and the run's saved config.

Layout under WORKDIR:
  checkpoints/<step>/state   the train state (params, ema_params, opt_state, step)
  checkpoints/<step>/data    the Grain iterator state of every process
  config.json                the config of the run that wrote the checkpoints

Orbax writes each step into a temporary directory and renames it when complete, so a crash
mid-save never leaves a directory that `latest_step()` would pick up.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

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
                     'inputs': ocp.JsonCheckpointHandler()},
  )


def workdir_path(workdir: str) -> epath.Path:
  """Local paths made absolute (Orbax wants them so); gs:// and other URLs kept as they are."""
  path = epath.Path(workdir)
  return path if '://' in workdir else epath.Path(os.path.abspath(workdir))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any,
         *, inputs: dict | None = None, force: bool = False) -> bool:
  """Saves state and iterator at `step` if the interval says so (or `force`), with `inputs`
  (a JSON dict naming what else the run's numbers depend on, see `check_inputs`)."""
  args = {'state': ocp.args.StandardSave(state),
          'data': grain.checkpoint.CheckpointSave(data_iterator)}
  if inputs is not None:
    args['inputs'] = ocp.args.JsonSave(inputs)
  return manager.save(step, args=ocp.args.Composite(**args), force=force)


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


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator: Any) -> Any:
  """Restores the state onto the shardings in `abstract_state`, and the iterator in place.

  A checkpoint written by `pafm_jax.tools.import_torch` has no data item: the iterator is then
  left at its start, which is where a fresh run's stream begins.
  """
  args = {'state': ocp.args.StandardRestore(abstract_state)}
  if has_data_state(manager, step):
    args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  else:
    logging.info('checkpoint %d has no data-iterator state (an imported checkpoint): the data '
                 'stream starts from its beginning, with the optimizer state stored by the '
                 'import.', step)
  return manager.restore(step, args=ocp.args.Composite(**args))['state']


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
