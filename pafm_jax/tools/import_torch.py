"""Imports a PyTorch SiT / REPA / StableVM checkpoint as a pafm_jax Orbax checkpoint.

  python -m pafm_jax.tools.import_torch --src=SiT-XL-2-256x256.pt \\
      --config=configs/sit_xl2.py --workdir=runs/sit_xl2_pafm

writes WORKDIR/checkpoints/<step>/state (params, ema_params, a freshly initialised optimizer
state, step, and for StableVM an empty memory bank) and WORKDIR/config.json. `python -m pafm_jax.main` with the same config and
workdir then fine-tunes from it; any code that restores the train state reads it.

Which weights go where:
  * a bare state dict (the released SiT-XL/2 file holds only the EMA weights): both params and
    ema_params;
  * a training checkpoint {'model', 'ema', 'opt', 'args'}: params <- 'model' (or 'ema' with
    --params_from=ema), ema_params <- 'ema'; the torch optimizer state is not imported, the
    optimizer starts fresh; `args.model`, when it names a size, must match config.model.name.

The time convention is converted (see pafm_jax/convert.py): --source=sit for willisma/SiT,
repa / stablevm for those codebases, auto to infer it. The EMA warm-up of the train loop,
min(decay, (1 + n)/(10 + n)), restarts at --step: pass the upstream step count to keep the
full EMA decay from the first step.

Every check (files, workdir, config, every tensor name and shape) runs before any weight is
read; the checkpoint is written atomically by Orbax, so a failed import leaves no step behind.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

from absl import app, flags, logging
import jax
import ml_collections
import numpy as np
from ml_collections import config_flags
from pafm_jax import checkpointing, convert, logs, objectives, torch_io, train_state
from pafm_jax.models import network
from pafm_jax.models import sit
PARAMS_FROM = ('model', 'ema')


def _is_state_dict(obj: Any) -> bool:
  return (isinstance(obj, Mapping) and bool(obj) and all(isinstance(k, str) for k in obj)
          and all(isinstance(v, (torch_io.TensorRef, np.ndarray)) for v in obj.values()))


def pick_state_dicts(ckpt: Any, params_from: str = 'model') -> tuple[Mapping, Mapping, dict]:
  """(params state dict, EMA state dict, notes) from a loaded torch checkpoint.

  notes: {'args': the training arguments or None, 'ignored': top-level keys not imported}.
  """
  if params_from not in PARAMS_FROM:
    raise ValueError(f'params_from must be one of {PARAMS_FROM}, got {params_from!r}.')
  if _is_state_dict(ckpt):
    logging.info('a bare state dict: it becomes both params and ema_params')
    return ckpt, ckpt, {'args': None, 'ignored': []}
  if not isinstance(ckpt, Mapping) or not any(
      _is_state_dict(ckpt.get(k)) for k in PARAMS_FROM):
    keys = sorted(map(str, ckpt)) if isinstance(ckpt, Mapping) else type(ckpt).__name__
    raise ValueError(f'expected a state dict or a training checkpoint with a "model" and/or '
                     f'"ema" state dict; found {keys}.')
  model, ema = ckpt.get('model'), ckpt.get('ema')
  model = model if _is_state_dict(model) else None
  ema = ema if _is_state_dict(ema) else None
  if params_from == 'ema' or model is None:
    params = ema
    if model is None and params_from == 'model':
      logging.info('the checkpoint has no "model" weights: params start from "ema"')
  else:
    params = model
  if ema is None:
    logging.info('the checkpoint has no "ema" weights: ema_params start from "model"')
    ema = model
  ignored = sorted(str(k) for k in ckpt if k not in PARAMS_FROM)
  if 'opt' in ckpt:
    logging.info('the torch optimizer state ("opt") is not imported: fine-tuning starts with '
                 'a fresh optimizer state')
  return params, ema, {'args': ckpt.get('args'), 'ignored': ignored}


def _check_args_model(args: Any, config: ml_collections.ConfigDict) -> None:
  """Upstream training args name the model (e.g. 'SiT-XL/2'); heads are not in the weights."""
  name = getattr(args, 'model', None)
  if isinstance(name, str) and name in sit.SIT_SIZES and name != config.model.name:
    raise ValueError(f'the checkpoint was trained as {name} (its args.model) but '
                     f'config.model.name is {config.model.name}; set '
                     f'--config.model.name={name}.')


def _existing_steps(workdir: str) -> list[int]:
  directory = checkpointing.workdir_path(workdir) / 'checkpoints'
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def import_checkpoint(config: ml_collections.ConfigDict, src: str, workdir: str, *,
                      step: int = 0, params_from: str = 'model', source: str = 'auto',
                      force: bool = False) -> convert.ImportInfo:
  """Converts `src` and writes it as checkpoint `step` of `workdir`; see the module doc."""
  # --- checks that read nothing but names and shapes
  if config.model.name not in sit.SIT_SIZES:
    raise ValueError(f'unknown model {config.model.name!r}; config.model.name must be one of '
                     f'{sorted(sit.SIT_SIZES)}.')
  if step < 0:
    raise ValueError(f'--step must be ≥ 0, got {step}.')
  if source != 'auto' and source not in convert.SOURCES:
    raise ValueError(f'--source must be auto or one of {sorted(convert.SOURCES)}, got '
                     f'{source!r}.')
  tx = train_state.make_optimizer(config.optimizer)
  # The state's layout depends on the objective (StableVM keeps its memory bank in it); class
  # sizes only enter the stratified PAFM target, never the state, so stand-ins do here.
  memory = objectives.make_objective(config, np.ones(config.data.num_classes)).memory
  existing = _existing_steps(workdir)
  if existing and not force:
    raise ValueError(f'{workdir} already holds checkpoints {existing}; importing there would '
                     'mix runs. Use a new --workdir, or --force to delete them.')
  if not force:
    checkpointing.check_config(config, workdir)
  ckpt = torch_io.load(src, lazy=True)
  params_sd, ema_sd, notes = pick_state_dicts(ckpt, params_from)
  if notes['args'] is not None:
    logging.info('upstream training args: %s', notes['args'])
    _check_args_model(notes['args'], config)
  if notes['ignored']:
    logging.info('not imported: %s', ', '.join(notes['ignored']))

  net = network.build_network(config)
  patch = sit.SIT_SIZES[config.model.name]['patch_size']
  grid = (config.data.image_size // patch,) * 2
  same = ema_sd is params_sd
  params_sd = convert.strip_wrapper_prefix(params_sd)
  ema_sd = params_sd if same else convert.strip_wrapper_prefix(ema_sd)
  for sd in [params_sd] if same else [params_sd, ema_sd]:
    convert.resolve_source(sd, net.abstract_params, source)
    convert.check_sit_state_dict(sd, net.abstract_params, grid)

  # --- the weights
  params, info = convert.convert_sit_state_dict(params_sd, net.abstract_params, grid_size=grid,
                                                source=source)
  if same:
    ema_params = jax.tree.map(np.copy, params)
  else:
    ema_params, ema_info = convert.convert_sit_state_dict(
        ema_sd, net.abstract_params, grid_size=grid, source=source)
    if ema_info.source != info.source:
      raise ValueError(f'"model" looks like a {info.source} and "ema" like a '
                       f'{ema_info.source} checkpoint; pass --source explicitly.')
  # The same constructor as a new run's state: the layout the loop restores.
  build = functools.partial(train_state.state_from_params, tx=tx, step=step, memory=memory)
  with jax.default_device(jax.local_devices(backend='cpu')[0]):
    state = jax.jit(build)(params, ema_params)

  # --- write: only now is anything on disk touched
  if existing:
    logging.warning('--force: deleting checkpoints %s of %s', existing, workdir)
    for old in existing:
      (checkpointing.workdir_path(workdir) / 'checkpoints' / str(old)).rmtree()
  checkpointing.save_imported(workdir, step, state)
  checkpointing.save_config(config, workdir)
  logging.info('wrote %s as checkpoint %d of %s (%s parameters, source %s)', src, step,
               workdir, f'{network.count_params(params):,}', info.source)
  return info


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program, so importing this module adds no global flags."""
  flags.DEFINE_string('src', None, 'PyTorch checkpoint (.pt/.pth) of an upstream SiT.')
  config_flags.DEFINE_config_file('config', None, 'Config the checkpoint will be trained with.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory to create the checkpoint in.')
  flags.DEFINE_integer('step', 0, 'Train step of the written checkpoint (the EMA warm-up and '
                       'the learning-rate schedule continue from it).')
  flags.DEFINE_enum('params_from', 'model', PARAMS_FROM,
                    'For training checkpoints holding both: which weights become params.')
  flags.DEFINE_enum('source', 'auto', ['auto', *convert.SOURCES],
                    'Code that trained the checkpoint (fixes its time convention).')
  flags.DEFINE_bool('force', False, 'Delete the checkpoints already in --workdir.')
  flags.mark_flags_as_required(['src', 'config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_library_info()
  import_checkpoint(FLAGS.config, FLAGS.src, FLAGS.workdir, step=FLAGS.step,
                    params_from=FLAGS.params_from, source=FLAGS.source, force=FLAGS.force)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
