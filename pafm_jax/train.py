"""The one training loop of pafm_jax: every model and objective trains through `train_step`.

`train_and_evaluate(config, workdir)` validates the config, builds the mesh, initialises (or
restores) the sharded train state, compiles the step once from abstract shapes, and runs it,
logging, sampling, evaluating and checkpointing as the config says. The pieces it uses live
beside their subjects: the network in models/network.py, the state, optimizer and EMA in
train_state.py, the batch fields in batch_contract.py, sample grids in sampling/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from pafm_jax import (batch_contract, checkpointing, config_checks, fault_tolerance, flow_maps,
                      objectives, paths, repa, sharding, train_state)
from pafm_jax.data import pipeline
from pafm_jax.evaluation import runner
from pafm_jax.models import network
from pafm_jax.retrieval import stage as retrieval_stage
from pafm_jax.sampling import generate as generate_lib
from pafm_jax.sampling import decoding, grids, guidance

NUM_T_BUCKETS = 5
BUCKETED_DIAGNOSTICS = ('ess', 'target_shift')


# --------------------------------------------------------------------------------------------
# The step.


def make_train_step(config: ml_collections.ConfigDict, net: network.Network,
                    tx: optax.GradientTransformation, objective: objectives.Objective,
                    repa_encoder: repa.FrozenEncoder | None = None) -> Callable:
  path = paths.get_path(config.objective.path)
  schedule = train_state.learning_rate_schedule(config.optimizer)
  base_key = jax.random.key(config.seed)
  prepare = objective.prepare
  inject_nonfinite = tuple(config.fault.inject_nonfinite_at_steps)
  common = dict(
      path=path, target_fn=objective.target, t_sampling=config.objective.t_sampling,
      # StableVM draws its labels, nulls included, from the bank.
      label_drop=0.0 if prepare is not None else config.objective.label_drop,
      null_label=net.null_label, condition_fn=net.condition,
      # `prepare` replaces the batch (by pairs drawn from the bank): the pipeline's noise was
      # drawn for the data batch, not for them.
      noise_from_batch=batch_contract.pipeline_draws_noise(config) and prepare is None)
  alignment = objectives.make_alignment(config, net.apply_with_projection)
  encode = repa_encoder.apply if alignment is not None else None
  encoder_input = repa.encoder_input_field(config)
  if objective.flow_map is None:
    loss_fn = functools.partial(objectives.velocity_loss, net.apply, alignment=alignment,
                                **common)
  else:
    loss_fn = functools.partial(objectives.flow_map_loss, net.apply, options=objective.flow_map,
                                **common)

  def loss_of(params, batch, rng, state):
    if objective.teacher_apply is None:
      return loss_fn(params, batch, rng)
    # The frozen teacher's velocity, guided as the options say: a student distilled from a
    # guided teacher samples guided at one network pass per jump.
    options = objective.flow_map
    teacher = guidance.cfg_velocity(
        lambda x, t, y: objective.teacher_apply(state['teacher'], x, t, y),
        options.teacher_cfg_scale, net.null_condition, options.teacher_guidance_interval)
    return loss_fn(params, batch, rng, teacher=teacher)

  def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
    # Randomness is a function of (seed, step) only, so a resumed run draws the same numbers.
    rng = jax.random.fold_in(base_key, state['step'])
    new_state = {}
    if prepare is not None:
      new_state['memory'], batch = prepare(state['memory'], batch, jax.random.fold_in(rng, 1),
                                           config.objective.label_drop)
    if objective.teacher_apply is not None:
      new_state['teacher'] = state['teacher']
    if encode is not None:
      # The clean images the loss sees (StableVM's drawn pairs, not the data batch).
      new_state['repa_encoder'] = state['repa_encoder']
      batch = {**batch, batch_contract.REPA_FEATURES: jax.lax.stop_gradient(
          encode(state['repa_encoder'], batch[encoder_input]))}
    (_, aux), grads = jax.value_and_grad(
        lambda p: loss_of(p, batch, rng, state), has_aux=True)(state['params'])
    if inject_nonfinite:
      grads = jax.tree.map(
          lambda g: g * fault_tolerance.nonfinite_injection(state['step'], inject_nonfinite),
          grads)
    # The unweighted mean squared error (a flow map's adaptive weights change what is
    # minimised, not what is reported).
    loss, grad_norm = jnp.mean(aux['per_sample']), optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    decay = train_state.ema_decay(state['step'], config.optimizer.ema_decay)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state['ema_params'], params)
    # A non-finite step changes nothing but the step count (its batch is consumed):
    # fault_tolerance.NonFiniteSteps then skips on or stops, as config.fault.nonfinite says.
    params, ema, opt_state = fault_tolerance.keep_if_finite(
        finite, (params, ema, opt_state),
        (state['params'], state['ema_params'], state['opt_state']))
    if prepare is not None:  # StableVM's bank keeps nothing from a non-finite step's batch
      new_state['memory'] = fault_tolerance.keep_if_finite(finite, new_state['memory'],
                                                           state['memory'])
    metrics = {
        'loss': loss,
        'grad_norm': grad_norm,
        'learning_rate': schedule(state['step']),
        'nonfinite': jnp.logical_not(finite).astype(jnp.int32),
        **bucket_sums(aux),
    }
    if alignment is not None:
      metrics['alignment_loss'] = aux['alignment_loss']
    new_state.update(step=state['step'] + 1, params=params, ema_params=ema, opt_state=opt_state)
    return new_state, metrics

  return train_step


def bucket_sums(aux: dict) -> dict:
  """Per-t-bucket counts and sums of the per-sample loss and the objective's diagnostics."""
  bucket = jax.nn.one_hot(
      jnp.clip(jnp.floor(aux['t'] * NUM_T_BUCKETS), 0, NUM_T_BUCKETS - 1).astype(jnp.int32),
      NUM_T_BUCKETS)
  per_sample = {'loss': aux['per_sample'],
                **{k: aux[k] for k in BUCKETED_DIAGNOSTICS if k in aux}}
  return {'t_bucket_count': jnp.sum(bucket, axis=0),
          **{f't_bucket_{name}_sum': bucket.T @ values for name, values in per_sample.items()}}


def lower_step(setup: train_state.TrainSetup):
  """The train step lowered from abstract shapes (nothing allocated, nothing run)."""
  batch = setup.abstract_batch()
  with sharding.logical_rules(setup.mesh, setup.rules):
    step_fn = jax.jit(make_train_step(setup.config, setup.net, setup.tx, setup.objective,
                                      setup.repa_encoder),
                      in_shardings=(setup.state_shardings,
                                    {k: v.sharding for k, v in batch.items()}),
                      out_shardings=(setup.state_shardings, NamedSharding(setup.mesh, P())),
                      donate_argnums=(0,))
    return step_fn.lower(setup.sharded_abstract_state(), batch)


def compile_step(setup: train_state.TrainSetup):
  """(state, global batch) → (state, metrics); the state's buffers are donated."""
  return lower_step(setup).compile()


def to_global_batch(local: dict, spec: dict, mesh) -> dict:
  """Assembles each process's slice of the batch (the fields of `spec`, see
  batch_contract.batch_spec) into global, batch-sharded arrays."""
  missing = [k for k in spec if k not in local]
  if missing:
    raise batch_contract.missing_field_error(missing[0], local)
  return {k: jax.make_array_from_process_local_data(
      sharding.batch_sharding(mesh, len(shape)), np.asarray(local[k], dtype), shape)
      for k, (shape, dtype) in spec.items()}


# --------------------------------------------------------------------------------------------
# Logging.


def flatten_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{'model.name': 'SiT-T/4', ...}: the config as TensorBoard hyperparameters."""
  flat = {}

  def visit(prefix: str, node: Any) -> None:
    if isinstance(node, dict):
      for k, v in node.items():
        visit(f'{prefix}{k}.', v)
    else:
      flat[prefix[:-1]] = node if isinstance(node, (bool, int, float, str)) else str(node)

  visit('', config.to_dict())
  return flat


def summarize(history: list[dict]) -> dict[str, float]:
  """Averages the per-step metrics of one logging interval on the host.

  Per-sample quantities (loss, and the PAFM/StableVM diagnostics 'ess', 'target_shift') are
  also reported per t-bucket, e.g. 'ess_t0.8-1.0'.
  """
  history = jax.device_get(history)
  skipped = sum(int(h['nonfinite']) for h in history)
  # Skipped (non-finite) steps are counted, not averaged in.
  history = [h for h in history if not int(h['nonfinite'])] or history
  out = {k: float(np.mean([h[k] for h in history]))
         for k in ('loss', 'grad_norm', 'learning_rate', 'alignment_loss') if k in history[0]}
  out['nonfinite_steps'] = float(skipped)
  counts = np.sum([h['t_bucket_count'] for h in history], axis=0)
  for name in ('loss', *BUCKETED_DIAGNOSTICS):
    key = f't_bucket_{name}_sum'
    if key not in history[0]:
      continue
    sums = np.sum([h[key] for h in history], axis=0)
    if name != 'loss':
      out[name] = float(np.sum(sums) / np.sum(counts))
    for i in range(NUM_T_BUCKETS):
      if counts[i] > 0:
        out[f'{name}_t{i / NUM_T_BUCKETS:.1f}-{(i + 1) / NUM_T_BUCKETS:.1f}'] = float(
            sums[i] / counts[i])
  return out


# --------------------------------------------------------------------------------------------
# The loop.


def run_inputs(index) -> dict:
  """What the run's numbers depend on beyond config and checkpoint: recorded in every
  checkpoint and compared on resume (checkpointing.check_inputs)."""
  inputs = {'retrieval_index': None if index is None else index.content_hash}
  if jax.process_count() > 1 and index is not None:
    # Each host reads its own copy of the index: they must be the same index.
    digest = np.frombuffer(bytes.fromhex(index.content_hash), np.uint8)
    multihost_utils.assert_equal(
        digest, f'the retrieval index at {index.directory} differs between hosts; copy one '
        'index to every host (launch/gcp_tpu.sh setup --index=gs://...).')
  return inputs


@dataclasses.dataclass
class PeriodicActions:
  """What the loop does after step N besides training: log, sample, evaluate, checkpoint."""
  config: ml_collections.ConfigDict
  workdir: str
  setup: train_state.TrainSetup
  manager: Any
  writer: Any
  data_iter: Any
  inputs: dict
  generate: Callable
  evaluator: runner.Evaluator | None
  grid_conditions: Any = None  # the sample grid's y: a row per class (or per caption)
  preemption: fault_tolerance.PreemptionNotice | None = None
  nonfinite: fault_tolerance.NonFiniteSteps | None = None
  watchdog: fault_tolerance.Watchdog | None = None  # set by run_loop
  decode: Callable | None = None  # a latent model's samples → pixels for the grid
  history: list = dataclasses.field(default_factory=list)
  last: dict = dataclasses.field(default_factory=dict)
  # Host time blocked on the data pipeline, as a share of the interval's wall time.
  data_wait: float = 0.0
  interval_start: float = dataclasses.field(default_factory=time.perf_counter)

  def __call__(self, step: int, state: dict, metrics: dict) -> bool:
    """Runs the actions due after `step`; returns whether the loop must stop (preemption)."""
    config = self.config
    is_last = step == config.total_steps
    self.history.append(metrics)
    if step % config.log_every_steps == 0 or is_last:
      self.log(step)
    # A preempted run saves at once: the grace period is no time for samples or evaluations.
    preempted = self.preemption is not None and self.preemption.reached(step, self.manager)
    if not preempted:
      with self.watchdog.paused() if self.watchdog else contextlib.nullcontext():
        self.sample_and_evaluate(step, state, is_last)
    if is_last or preempted or self.manager.should_save(step):
      # A checkpoint is written only after its step is known to be finite ('stop' raises here).
      self.check_finite(step, metrics)
      checkpointing.save(self.manager, step, state, self.data_iter, inputs=self.inputs)
    if preempted:
      self.manager.wait_until_finished()
      logging.warning('preemption (SIGTERM) at step %d: checkpoint %d saved, exiting; the next '
                      'start resumes from it.', step, step)
      return True
    return False

  def sample_and_evaluate(self, step: int, state: dict, is_last: bool) -> None:
    config = self.config
    params = state['ema_params'] if config.sample.use_ema else state['params']
    if step % config.sample_every_steps == 0 or is_last:
      rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 0x5A3), step)
      images, _ = self.generate(params, rng, self.grid_conditions)
      if self.decode is not None:
        images = self.decode(images)
      path = grids.write_sample_grid(images, config.sample.per_class, self.workdir, step,
                                     self.writer)
      logging.info('step %d: sample grid %s', step, path)
    if self.evaluator is not None and (step % config.eval.every_steps == 0 or is_last):
      rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 0xE7A1), step)
      scores = self.evaluator.evaluate(params, rng)['metrics']
      self.writer.write_scalars(step, {f'eval/{k}': v for k, v in scores.items()})

  def check_finite(self, step: int, metrics: dict) -> None:
    if self.nonfinite is not None:
      self.nonfinite.check(step, metrics, self.manager.latest_step())

  def log(self, step: int) -> None:
    self.last = summarize(self.history)
    now = time.perf_counter()
    self.last['data_wait_fraction'] = self.data_wait / max(now - self.interval_start, 1e-9)
    self.data_wait, self.interval_start, self.history = 0.0, now, []
    self.writer.write_scalars(step, self.last)


def restore_or_init(setup: train_state.TrainSetup, manager, data_iter, inputs: dict) -> dict:
  """The newest intact checkpoint's state (and the iterator restored in place), or a fresh
  state. On another topology the state is resharded onto this mesh (its abstract target)."""
  workers = int(setup.config.data.worker_count)

  def check(step: int) -> None:
    logging.info('restoring checkpoint at step %d from %s', step, manager.directory)
    checkpointing.check_inputs(manager, step, inputs)

  state = checkpointing.restore_intact(
      manager, setup.sharded_abstract_state(), data_iter,
      derive_data_state=lambda step: fault_tolerance.iterator_state_at(step, workers),
      check=check)
  return setup.init() if state is None else state


def run_loop(setup: train_state.TrainSetup, state: dict, data_iter,
             actions: PeriodicActions) -> dict:
  """Steps from the state's step to config.total_steps (or a preemption)."""
  config = setup.config
  t0 = time.time()
  compiled = compile_step(setup)
  logging.info('compiled the train step in %.1f s', time.time() - t0)
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  report = periodic_actions.ReportProgress(num_train_steps=config.total_steps,
                                           writer=actions.writer,
                                           every_steps=config.log_every_steps)
  step = int(jax.device_get(state['step']))
  actions.interval_start = time.perf_counter()
  watchdog = actions.watchdog = fault_tolerance.Watchdog(config.fault.hang_timeout_s)
  previous = None
  try:
    while step < config.total_steps:
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        t_data = time.perf_counter()
        local_batch = next(data_iter)
        actions.data_wait += time.perf_counter() - t_data
        batch = to_global_batch(local_batch, setup.batch_spec, setup.mesh)
        state, metrics = compiled(state, batch)
      # One step stays in flight (wait for step N − 1 after dispatching step N), so a wait in
      # next() is time the device has nothing queued: ≈ 0 unless the input is the bottleneck.
      if previous is not None:
        jax.block_until_ready(previous)
        actions.check_finite(step, previous)
      watchdog.kick(f'step {step + 1}')
      previous = metrics
      step += 1
      report(step)
      if actions(step, state, metrics):
        break
      watchdog.kick(f'step {step + 1}')
    if previous is not None:
      jax.block_until_ready(previous)
      actions.check_finite(step, previous)
    # A save stuck on storage (orbax#392 on GCS) is a hang too.
    watchdog.kick('the last checkpoint save')
    actions.manager.wait_until_finished()
  finally:
    watchdog.close()
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains until config.total_steps, resuming from the latest checkpoint in workdir.

  Returns the final train state (sharded arrays) and the last logged metrics.
  """
  mesh = config_checks.validated_mesh(config)
  if (network.is_flow_map(config) and flow_maps.FlowMapOptions.from_config(config).reads_teacher
      and not checkpointing.saved_steps(workdir)):
    # A fresh run reads a flow map's teacher (a resumed one carries it in its state): fail
    # before the workdir, the index or the data are touched.
    flow_maps.check_teacher(config, config.objective.flow_map.teacher_workdir)
  checkpointing.check_and_save_config(config, workdir)
  logging.info('mesh %s over %d devices (%d processes)', dict(mesh.shape), jax.device_count(),
               jax.process_count())
  setup = train_state.TrainSetup.create(config, mesh)
  logging.info('model %s: %s parameters', config.model.name,
               f'{network.count_params(setup.abstract_state["params"]):,}')
  stage, index = retrieval_stage.stage_factory(config, workdir)
  inputs = run_inputs(index)
  data_iter = pipeline.create_train_iterator(
      config.data, local_batch_size=config.global_batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count(),
      seed=pipeline.train_seed(config), extra_stage=stage)
  manager = checkpointing.create_manager(workdir, save_every=config.checkpoint_every_steps,
                                         max_to_keep=config.keep_checkpoints)
  # clu's writers import TensorFlow (seconds of start-up, and a package the compiled step never
  # needs): only the loop imports them, so benchmarks and tools run where TF is absent.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  preemption = fault_tolerance.PreemptionNotice()
  try:
    state = restore_or_init(setup, manager, data_iter, inputs)
    # Start the data workers (and their retrieval index) now, from the restored position, so
    # their start-up overlaps compilation.
    data_iter.start_prefetch()
    if int(jax.device_get(state['step'])) >= config.total_steps:
      logging.info('step %d ≥ total_steps %d: nothing to do.', int(state['step']),
                   config.total_steps)
      return {'state': state, 'metrics': {}}
    # Built before compiling, so a missing classifier fails fast.
    evaluator = runner.Evaluator(config, setup.net, mesh) if config.eval.every_steps else None
    generate = generate_lib.make_generator(config, setup.net.apply, setup.net.null_condition, mesh,
                                           log_progress=False)
    grid_y, _ = generate_lib.grid_conditions(config, setup.net.family)
    actions = PeriodicActions(config, workdir, setup, manager, writer, data_iter, inputs,
                              generate, evaluator, grid_y, preemption,
                              fault_tolerance.NonFiniteSteps(config.fault.nonfinite),
                              decode=decoding.latent_decoder(config))
    if int(jax.device_get(state['step'])) == 0:
      writer.write_hparams(flatten_config(config))
    state = run_loop(setup, state, data_iter, actions)
    return {'state': state, 'metrics': actions.last}
  finally:
    # Let an in-flight async save finish even when the loop raised: Orbax only publishes a
    # step directory once it is complete, so nothing half-written is ever left behind.
    manager.wait_until_finished()
    manager.close()
    preemption.close()
    writer.flush()
    writer.close()
    # Stops Grain's worker processes (the retrieval stage's among them) with the loop, also
    # when it raised or was interrupted, instead of leaving them to outlive it.
    data_iter.close()
