"""The one training loop of pafm_jax: every model and objective trains through `train_step`.

`train_and_evaluate(config, workdir)` validates the config, builds the mesh, initialises (or
restores) the sharded train state, compiles the step once from abstract shapes, and runs it,
logging, sampling and checkpointing as the config says.
"""

from __future__ import annotations

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
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from pafm_jax import checkpointing, objectives, paths, sampling, sharding
from pafm_jax.data import pipeline
from pafm_jax.models import sit
from pafm_jax.retrieval import dataset_index
from pafm_jax.retrieval import keys as retrieval_keys
from pafm_jax.retrieval import stage as retrieval_stage

NUM_T_BUCKETS = 5
BUCKETED_DIAGNOSTICS = ('ess', 'target_shift')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


# --------------------------------------------------------------------------------------------
# Config validation: every check that can fail runs before any data or compilation work.


def validate_config(config: ml_collections.ConfigDict, num_devices: int,
                    process_count: int) -> tuple[int, ...]:
  """Raises ValueError with the field to change; returns the resolved mesh shape."""
  if config.model.name not in sit.SIT_SIZES:
    raise ValueError(f'unknown model {config.model.name!r}; config.model.name must be one of '
                     f'{sorted(sit.SIT_SIZES)}.')
  patch = sit.SIT_SIZES[config.model.name]['patch_size']
  if config.data.image_size % patch:
    raise ValueError(f'config.data.image_size={config.data.image_size} is not divisible by the '
                     f'patch size {patch} of {config.model.name}; pick another model or size.')
  objectives.check_objective_config(config)
  if config.retrieval.mode != 'none':
    dataset_index.check_retrieval_config(config)
  paths.get_path(config.objective.path)
  if config.objective.t_sampling not in objectives.T_SAMPLINGS:
    raise ValueError(f'unknown t sampling {config.objective.t_sampling!r}; '
                     f'config.objective.t_sampling must be one of {objectives.T_SAMPLINGS}.')
  sampling.SamplerOptions.from_config(config.sample)  # raises on an unknown sampler
  if config.model.get('projector', False):
    raise ValueError('config.model.projector=True asks for a VA-REPA projector head, which '
                     'pafm_jax does not implement yet; set it to False.')
  if config.model.dtype not in DTYPES:
    raise ValueError(f'config.model.dtype must be one of {sorted(DTYPES)}, '
                     f'got {config.model.dtype!r}.')
  shape = sharding.mesh_shape(dict(config.mesh), num_devices)
  shards = int(np.prod(shape))
  if config.global_batch_size % shards:
    raise ValueError(f'config.global_batch_size={config.global_batch_size} is not divisible by '
                     f'the {shards} batch shards of mesh {dict(zip(sharding.MESH_AXES, shape))}.')
  if config.global_batch_size % process_count:
    raise ValueError(f'config.global_batch_size={config.global_batch_size} is not divisible by '
                     f'the {process_count} processes.')
  for field in ('total_steps', 'log_every_steps', 'checkpoint_every_steps',
                'sample_every_steps'):
    if config[field] < 1:
      raise ValueError(f'config.{field} must be ≥ 1, got {config[field]}.')
  if config.eval.every_steps < 0:
    raise ValueError(f'config.eval.every_steps must be ≥ 0 (0: no periodic evaluation), got '
                     f'{config.eval.every_steps}.')
  return shape


def validated_mesh(config: ml_collections.ConfigDict):
  """Validates the config against the devices of this run, then builds its mesh."""
  shape = validate_config(config, jax.device_count(), jax.process_count())
  return sharding.create_mesh(dict(zip(sharding.MESH_AXES, shape)))


# --------------------------------------------------------------------------------------------
# The network, used functionally: parameters are a plain nested dict of arrays.


@dataclasses.dataclass(frozen=True)
class Network:
  """A Flax NNX model split into a static graph and a pure-dict parameter tree."""
  graphdef: Any
  abstract_params: Any      # nested dict of jax.ShapeDtypeStruct
  logical_axes: Any         # nested dict of tuples of logical axis names
  null_label: int

  def apply(self, params, x, t, y):
    """Velocity f_θ(x_t, t, y): x [B, H, W, C], t [B], y [B] → [B, H, W, C]."""
    return nnx.merge(self.graphdef, params)(x, t, y)


def model_factory(config: ml_collections.ConfigDict) -> Callable[[jax.Array], nnx.Module]:
  def make(rng: jax.Array) -> nnx.Module:
    return sit.sit_from_name(
        config.model.name, input_size=config.data.image_size,
        in_channels=config.data.channels, num_classes=config.data.num_classes,
        rngs=nnx.Rngs(params=rng), dtype=DTYPES[config.model.dtype],
        param_dtype=jnp.float32, remat=config.model.remat)
  return make


def build_network(config: ml_collections.ConfigDict) -> Network:
  """Builds the model abstractly (no memory) to get its graph, shapes and logical axes."""
  abstract_model = nnx.eval_shape(lambda: model_factory(config)(jax.random.key(0)))
  graphdef, state = nnx.split(abstract_model, nnx.Param)
  logical = jax.tree.map(tuple, nnx.to_pure_dict(nnx.get_partition_spec(state)),
                         is_leaf=lambda x: isinstance(x, P))
  return Network(graphdef, nnx.to_pure_dict(state), logical, config.data.num_classes)


def count_params(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------------------------
# Optimizer, EMA and the train state.


def learning_rate_schedule(opt: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up to a constant rate (SiT trains at a constant 1e-4)."""
  if opt.warmup_steps > 0:
    return optax.warmup_constant_schedule(0.0, opt.learning_rate, opt.warmup_steps)
  return optax.constant_schedule(opt.learning_rate)


def make_optimizer(opt: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(opt.grad_clip),
      optax.adamw(learning_rate_schedule(opt), b1=opt.b1, b2=opt.b2,
                  weight_decay=opt.weight_decay))


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
  """EMA decay with warm-up: min(decay, (1 + n)/(10 + n)) at update n (METHOD.md §7).

  Without the warm-up a short run's EMA is still mostly its zero-initialised start.
  """
  n = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def init_state(rng: jax.Array, make_model, tx: optax.GradientTransformation,
               memory: objectives.MemoryBank | None = None) -> dict:
  params = nnx.to_pure_dict(nnx.state(make_model(rng), nnx.Param))
  return state_from_params(params, jax.tree.map(jnp.copy, params), tx, memory=memory)


def state_from_params(params: Any, ema_params: Any, tx: optax.GradientTransformation, *,
                      step: int = 0, memory: objectives.MemoryBank | None = None) -> dict:
  """The train state around given weights, with a fresh optimizer state (and bank).

  New runs (init_state) and imported checkpoints (tools/import_torch) both build their state
  here, so both have the layout the loop restores.
  """
  state = {
      'step': jnp.asarray(step, jnp.int32),
      'params': params,
      'ema_params': ema_params,
      'opt_state': tx.init(params),
  }
  if memory is not None:  # StableVM's bank lives (and is checkpointed) with the weights
    state['memory'] = memory.init()
  return state


def state_shardings(abstract_state: dict, net: Network, tx: optax.GradientTransformation,
                    mesh, rules, memory: objectives.MemoryBank | None = None) -> dict:
  """Params, EMA and the optimizer's per-parameter moments sharded by the logical rules."""
  replicated = NamedSharding(mesh, P())
  params = sharding.tree_shardings(abstract_state['params'], net.logical_axes, mesh, rules)
  opt_state = optax.tree_map_params(
      tx, lambda _, s: s, abstract_state['opt_state'], params,
      transform_non_params=lambda _: replicated)
  out = {'step': replicated, 'params': params, 'ema_params': params, 'opt_state': opt_state}
  if memory is not None:
    out['memory'] = sharding.tree_shardings(abstract_state['memory'], memory.logical_axes(),
                                            mesh, rules)
  return out


# --------------------------------------------------------------------------------------------
# The step.


def make_train_step(config: ml_collections.ConfigDict, net: Network,
                    tx: optax.GradientTransformation, objective: objectives.Objective) -> Callable:
  path = paths.get_path(config.objective.path)
  schedule = learning_rate_schedule(config.optimizer)
  base_key = jax.random.key(config.seed)
  bank = objective.memory
  loss_fn = functools.partial(
      objectives.velocity_loss, net.apply, path=path, target_fn=objective.target,
      t_sampling=config.objective.t_sampling,
      # StableVM draws its labels, nulls included, from the bank.
      label_drop=0.0 if bank is not None else config.objective.label_drop,
      null_label=net.null_label)

  def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
    # Randomness is a function of (seed, step) only, so a resumed run draws the same numbers.
    rng = jax.random.fold_in(base_key, state['step'])
    new_state = {}
    if bank is not None:
      new_state['memory'], batch = objectives.bank_training_batch(
          bank, state['memory'], batch, jax.random.fold_in(rng, 1),
          config.objective.label_drop)
    (loss, aux), grads = jax.value_and_grad(
        lambda p: loss_fn(p, batch, rng), has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    decay = ema_decay(state['step'], config.optimizer.ema_decay)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state['ema_params'], params)

    bucket = jax.nn.one_hot(
        jnp.clip(jnp.floor(aux['t'] * NUM_T_BUCKETS), 0, NUM_T_BUCKETS - 1).astype(jnp.int32),
        NUM_T_BUCKETS)
    metrics = {
        'loss': loss,
        'grad_norm': optax.tree.norm(grads),
        'learning_rate': schedule(state['step']),
        't_bucket_count': jnp.sum(bucket, axis=0),
    }
    # Per-t-bucket sums of the loss and of the objective's diagnostics (ESS, target shift).
    per_sample = {'loss': aux['per_sample'],
                  **{k: aux[k] for k in BUCKETED_DIAGNOSTICS if k in aux}}
    for name, values in per_sample.items():
      metrics[f't_bucket_{name}_sum'] = bucket.T @ values
    new_state.update(step=state['step'] + 1, params=params, ema_params=ema, opt_state=opt_state)
    return new_state, metrics

  return train_step


def batch_spec(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Global shapes and dtypes of the fields the step consumes.

  With retrieval on, the data pipeline also delivers each sample's id and its k neighbours
  (samples, labels, ids); in 'noisy' mode it draws t and ε itself (the query is x_t/α_t).
  """
  b, s, c = config.global_batch_size, config.data.image_size, config.data.channels
  spec = {'image': ((b, s, s, c), jnp.float32), 'label': ((b,), jnp.int32)}
  if config.retrieval.mode != 'none':
    k = config.retrieval.k
    spec.update(id=((b,), jnp.int32), neighbours=((b, k, s, s, c), jnp.float32),
                neighbour_labels=((b, k), jnp.int32), neighbour_ids=((b, k), jnp.int32))
  if config.retrieval.mode == 'noisy':
    spec.update(t=((b,), jnp.float32), eps=((b, s, s, c), jnp.float32))
  return spec


def to_global_batch(local: dict, spec: dict, mesh) -> dict:
  """Assembles each process's slice of the batch into one global, batch-sharded array."""
  return {k: jax.make_array_from_process_local_data(
      sharding.batch_sharding(mesh, len(shape)), np.asarray(local[k], dtype), shape)
      for k, (shape, dtype) in spec.items()}


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
  out = {k: float(np.mean([h[k] for h in history]))
         for k in ('loss', 'grad_norm', 'learning_rate')}
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
# Sample grids.


def make_sampler(config: ml_collections.ConfigDict, net: Network, mesh) -> Callable:
  """Jitted class-conditional sampler: params, rng → images [rows·cols, H, W, C]."""
  rows = min(config.data.num_classes, 10)
  labels = jnp.repeat(jnp.arange(rows), config.sample.per_class)
  shape = (config.data.image_size, config.data.image_size, config.data.channels)

  options = sampling.SamplerOptions.from_config(config.sample)
  path = paths.get_path(config.objective.path)

  def draw(params, rng):
    return sampling.sample(functools.partial(net.apply, params), rng, labels, shape,
                           options=options, null_label=net.null_label, path=path)

  return jax.jit(draw, out_shardings=NamedSharding(mesh, P()))


def image_grid(images: np.ndarray, cols: int) -> np.ndarray:
  """[N, H, W, C] in [−1, 1] → a uint8 grid [rows·(H+2), cols·(W+2), 1 or 3], a row per class."""
  images = np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
  if images.shape[-1] > 3:  # latents: show the first three channels
    images = images[..., :3]
  n, h, w, c = images.shape
  rows = n // cols
  grid = np.full((rows * (h + 2), cols * (w + 2), c), 255, np.uint8)
  for i in range(n):
    r, k = divmod(i, cols)
    grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, k * (w + 2) + 1:k * (w + 2) + 1 + w] = images[i]
  return grid


def save_grid_png(grid: np.ndarray, path) -> None:
  """Writes a uint8 grid from `image_grid` as a PNG (an epath or str path)."""
  path = checkpointing.workdir_path(str(path))
  path.parent.mkdir(parents=True, exist_ok=True)
  scale = max(1, 256 // grid.shape[1] + 1)  # upscale tiny images so the grid is viewable
  img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  with path.open('wb') as f:
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(f, format='PNG')


def write_sample_grid(images, cols: int, workdir: str, step: int, writer) -> str:
  grid = image_grid(images, cols)
  path = checkpointing.workdir_path(workdir) / 'samples' / f'samples_{step:08d}.png'
  if jax.process_index() == 0:
    save_grid_png(grid, path)
  writer.write_images(step, {'samples': grid[None]})
  return str(path)


# --------------------------------------------------------------------------------------------
# Everything the step needs, derived once from the config and the mesh.


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  config: ml_collections.ConfigDict
  mesh: Any
  net: Network
  tx: optax.GradientTransformation
  init_fn: Callable[[jax.Array], dict]
  abstract_state: dict
  state_shardings: dict
  batch_spec: dict
  rules: tuple
  objective: objectives.Objective

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, mesh) -> 'TrainSetup':
    net = build_network(config)
    tx = make_optimizer(config.optimizer)
    class_sizes = None
    if config.objective.name == 'pafm' and config.objective.pafm.stratified:
      class_sizes = pipeline.class_sizes(config.data)
    objective = objectives.make_objective(config, class_sizes)
    init_fn = functools.partial(init_state, make_model=model_factory(config), tx=tx,
                                memory=objective.memory)
    abstract_state = jax.eval_shape(init_fn, jax.random.key(config.seed))
    rules = tuple(config.logical_axis_rules)
    shardings = state_shardings(abstract_state, net, tx, mesh, rules, objective.memory)
    return cls(config, mesh, net, tx, init_fn, abstract_state, shardings, batch_spec(config),
               rules, objective)

  def init(self) -> dict:
    """Initialised under jit straight into its shards: no full copy on any one device."""
    return jax.jit(self.init_fn, out_shardings=self.state_shardings)(
        jax.random.key(self.config.seed))

  def sharded_abstract_state(self) -> dict:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.state_shardings)

  def abstract_batch(self) -> dict:
    return {k: jax.ShapeDtypeStruct(shape, dtype,
                                    sharding=sharding.batch_sharding(self.mesh, len(shape)))
            for k, (shape, dtype) in self.batch_spec.items()}

  def lower_step(self):
    """The train step lowered from abstract shapes (nothing allocated, nothing run)."""
    batch = self.abstract_batch()
    with sharding.logical_rules(self.mesh, self.rules):
      step_fn = jax.jit(make_train_step(self.config, self.net, self.tx, self.objective),
                        in_shardings=(self.state_shardings,
                                      {k: v.sharding for k, v in batch.items()}),
                        out_shardings=(self.state_shardings, NamedSharding(self.mesh, P())),
                        donate_argnums=(0,))
      return step_fn.lower(self.sharded_abstract_state(), batch)

  def compile_step(self):
    """(state, global batch) → (state, metrics); the state's buffers are donated."""
    return self.lower_step().compile()


# --------------------------------------------------------------------------------------------
# The loop.


def neighbour_stage(config: ml_collections.ConfigDict, workdir: str):
  """The data pipeline's retrieval stage (a factory of (data source, first row)), or None
  when config.retrieval.mode == 'none'. Checks the index against the config first and builds
  it when missing (config.retrieval.auto_build), so a wrong index fails before compiling."""
  if config.retrieval.mode == 'none':
    return None
  if config.objective.name != 'pafm' or 'retrieved' not in config.objective.pafm.sources:
    logging.warning("config.retrieval.mode=%r retrieves neighbours that objective %r does not "
                    "use (only t and ε from the pipeline are); set config.retrieval.mode='none' "
                    'to save the retrieval work.', config.retrieval.mode, config.objective.name)
  index = dataset_index.ensure(config, workdir)
  shape = pipeline.sample_shape(config.data)

  def factory(source, first_row):
    return retrieval_stage.NeighbourStage(
        index, source, shape, mode=config.retrieval.mode, k=config.retrieval.k,
        key=retrieval_keys.KeyTransform.from_config(config), seed=config.seed,
        path_name=config.objective.path, t_sampling=config.objective.t_sampling,
        row_offset=first_row)

  return factory


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains until config.total_steps, resuming from the latest checkpoint in workdir.

  Returns the final train state (sharded arrays) and the last logged metrics.
  """
  mesh = validated_mesh(config)
  checkpointing.check_and_save_config(config, workdir)
  logging.info('mesh %s over %d devices (%d processes)', dict(mesh.shape), jax.device_count(),
               jax.process_count())
  setup = TrainSetup.create(config, mesh)
  logging.info('model %s: %s parameters', config.model.name,
               f'{count_params(setup.abstract_state["params"]):,}')

  data_iter = pipeline.create_train_iterator(
      config.data, local_batch_size=config.global_batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count(), seed=config.seed,
      extra_stage=neighbour_stage(config, workdir))

  manager = checkpointing.create_manager(workdir, save_every=config.checkpoint_every_steps,
                                         max_to_keep=config.keep_checkpoints)
  latest = manager.latest_step()
  if latest is not None:
    logging.info('restoring checkpoint at step %d from %s', latest, manager.directory)
    state = checkpointing.restore(manager, latest, setup.sharded_abstract_state(), data_iter)
  else:
    state = setup.init()
  start_step = int(jax.device_get(state['step']))
  # Start the data workers (and their retrieval index) now, from the restored position, so
  # their start-up overlaps compilation.
  data_iter.start_prefetch()

  # clu's writers import TensorFlow (seconds of start-up, and a package the compiled step never
  # needs): only the loop imports them, so benchmarks and tools run where TF is absent.
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  last = {}
  try:
    if start_step >= config.total_steps:
      logging.info('step %d ≥ total_steps %d: nothing to do.', start_step, config.total_steps)
      return {'state': state, 'metrics': last}
    evaluator = None
    if config.eval.every_steps > 0:  # before compiling: a missing classifier fails fast
      from pafm_jax.evaluation import runner  # imports this module: not at the top
      evaluator = runner.Evaluator(config, setup.net, mesh)
      eval_rng = jax.random.fold_in(jax.random.key(config.seed), 0xE7A1)
    t0 = time.time()
    compiled = setup.compile_step()
    logging.info('compiled the train step in %.1f s', time.time() - t0)
    sampler = make_sampler(config, setup.net, mesh)
    sample_rng = jax.random.fold_in(jax.random.key(config.seed), 0x5A3)

    if start_step == 0:
      writer.write_hparams(flatten_config(config))
    report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                             every_steps=config.log_every_steps)
    history: list[dict] = []
    step = start_step
    # Host time blocked on the data pipeline, as a share of the interval's wall time. The loop
    # keeps one step in flight (it waits for step N − 1 after dispatching step N), so a wait in
    # next() is time the device has nothing queued: ≈ 0 unless the input is the bottleneck.
    data_wait, interval_start = 0.0, time.perf_counter()
    while step < config.total_steps:
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        t_data = time.perf_counter()
        local_batch = next(data_iter)
        data_wait += time.perf_counter() - t_data
        batch = to_global_batch(local_batch, setup.batch_spec, mesh)
        state, metrics = compiled(state, batch)
      if history:
        jax.block_until_ready(history[-1])
      step += 1
      history.append(metrics)
      report(step)
      is_last = step == config.total_steps
      if step % config.log_every_steps == 0 or is_last:
        last = summarize(history)
        now = time.perf_counter()
        last['data_wait_fraction'] = data_wait / max(now - interval_start, 1e-9)
        data_wait, interval_start = 0.0, now
        history = []
        writer.write_scalars(step, last)
      if step % config.sample_every_steps == 0 or is_last:
        params = state['ema_params'] if config.sample.use_ema else state['params']
        images = sampler(params, jax.random.fold_in(sample_rng, step))
        path = write_sample_grid(jax.device_get(images), config.sample.per_class, workdir, step,
                                 writer)
        logging.info('step %d: sample grid %s', step, path)
      if evaluator is not None and (step % config.eval.every_steps == 0 or is_last):
        params = state['ema_params'] if config.sample.use_ema else state['params']
        scores = evaluator.evaluate(params, jax.random.fold_in(eval_rng, step))['metrics']
        writer.write_scalars(step, {f'eval/{k}': v for k, v in scores.items()})
      # Orbax also saves off-interval when the host received a preemption notice.
      checkpointing.save(manager, step, state, data_iter, force=is_last)
      if manager.reached_preemption(step):
        logging.warning('preemption signal at step %d: checkpointed, exiting.', step)
        break
  finally:
    # Let an in-flight async save finish even when the loop raised: Orbax only publishes a
    # step directory once it is complete, so nothing half-written is ever left behind.
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    writer.close()
    # Stops Grain's worker processes (the retrieval stage's among them) with the loop, also
    # when it raised or was interrupted, instead of leaving them to outlive it.
    data_iter.close()
  return {'state': state, 'metrics': last}
