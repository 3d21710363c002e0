"""The train state and everything derived once from a config and a mesh: the optimizer and
its schedule, the EMA, the state's layout and shardings, and the objective it trains.

A state is a dict {'step', 'params', 'ema_params', 'opt_state'} (+ 'memory', StableVM's
bank): new runs, resumed runs and imported checkpoints all build it here, so all have the
layout the loop restores.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from pafm_jax import batch_contract, checkpointing, flow_maps, objectives, repa, sharding
from pafm_jax.data import pipeline
from pafm_jax.models import network

LOOP_INTERVALS = ('total_steps', 'log_every_steps', 'checkpoint_every_steps',
                  'sample_every_steps')


def check_config(config: ml_collections.ConfigDict) -> None:
  """The loop's cadence: steps, and how often it logs, checkpoints, samples and evaluates."""
  for field in LOOP_INTERVALS:
    if config[field] < 1:
      raise ValueError(f'config.{field} must be ≥ 1, got {config[field]}.')
  if config.eval.every_steps < 0:
    raise ValueError(f'config.eval.every_steps must be ≥ 0 (0: no periodic evaluation), got '
                     f'{config.eval.every_steps}.')


# --------------------------------------------------------------------------------------------
# Optimizer and EMA.


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


# --------------------------------------------------------------------------------------------
# The state.


def init_state(rng: jax.Array, teacher: Any = None, repa_encoder: Any = None, *, make_model,
               tx: optax.GradientTransformation, memory: objectives.MemoryBank | None = None,
               init_from_teacher: bool = False, keep_teacher: bool = False) -> dict:
  """A fresh state. A flow map's `teacher` parameters start its weights with
  `init_from_teacher` (flow_maps.overlay) and stay in it as 'teacher' with `keep_teacher`
  (the step evaluates them); a frozen REPA encoder's parameters stay in it as
  'repa_encoder' (repa.py), so a resumed run aligns to the same features."""
  params = nnx.to_pure_dict(nnx.state(make_model(rng), nnx.Param))
  if teacher is not None and init_from_teacher:
    # Copies: under jit an input forwarded unchanged to two outputs would be one buffer, and
    # the step donates the whole state (params, EMA and teacher alike).
    params = flow_maps.overlay(params, jax.tree.map(jnp.copy, teacher))
  state = state_from_params(params, jax.tree.map(jnp.copy, params), tx, memory=memory)
  if keep_teacher:
    state['teacher'] = teacher
  if repa_encoder is not None:
    state['repa_encoder'] = jax.tree.map(jnp.asarray, repa_encoder)
  return state


def state_from_params(params: Any, ema_params: Any, tx: optax.GradientTransformation, *,
                      step: int = 0, memory: objectives.MemoryBank | None = None) -> dict:
  """The train state around given weights, with a fresh optimizer state (and bank)."""
  state = {
      'step': jnp.asarray(step, jnp.int32),
      'params': params,
      'ema_params': ema_params,
      'opt_state': tx.init(params),
  }
  if memory is not None:  # StableVM's bank lives (and is checkpointed) with the weights
    state['memory'] = memory.init()
  return state


def state_shardings(abstract_state: dict, net: network.Network,
                    tx: optax.GradientTransformation, mesh, rules,
                    memory: objectives.MemoryBank | None = None,
                    teacher_net: network.Network | None = None) -> dict:
  """Params, EMA and the optimizer's per-parameter moments sharded by the logical rules (a
  flow map's teacher as well)."""
  replicated = NamedSharding(mesh, P())
  params = sharding.tree_shardings(abstract_state['params'], net.logical_axes, mesh, rules)
  opt_state = optax.tree_map_params(
      tx, lambda _, s: s, abstract_state['opt_state'], params,
      transform_non_params=lambda _: replicated)
  out = {'step': replicated, 'params': params, 'ema_params': params, 'opt_state': opt_state}
  if memory is not None:
    out['memory'] = sharding.tree_shardings(abstract_state['memory'], memory.logical_axes(),
                                            mesh, rules)
  if teacher_net is not None:
    out['teacher'] = sharding.tree_shardings(abstract_state['teacher'], teacher_net.logical_axes,
                                             mesh, rules)
  if 'repa_encoder' in abstract_state:  # small next to the model: a copy on every device
    out['repa_encoder'] = jax.tree.map(lambda _: replicated, abstract_state['repa_encoder'])
  return out


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """Everything the step needs, derived once from the config and the mesh."""
  config: ml_collections.ConfigDict
  mesh: Any
  net: network.Network
  tx: optax.GradientTransformation
  init_fn: Callable[[jax.Array], dict]
  abstract_state: dict
  state_shardings: dict
  batch_spec: dict
  rules: tuple
  objective: objectives.Objective
  teacher_net: network.Network | None = None
  repa_encoder: repa.FrozenEncoder | None = None

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, mesh) -> 'TrainSetup':
    net = network.build_network(config)
    tx = make_optimizer(config.optimizer)
    class_sizes = None
    if objectives.uses_pafm(config) and config.objective.pafm.stratified:
      class_sizes = pipeline.class_sizes(config.data)
    options = (flow_maps.FlowMapOptions.from_config(config) if network.is_flow_map(config)
               else None)
    teacher_net = None
    if options is not None and options.reads_teacher:
      teacher_net = network.build_network(config, two_time=False)
    objective = objectives.make_objective(config, class_sizes,
                                          teacher_net and teacher_net.apply)
    keep_teacher = objective.teacher_apply is not None
    init_fn = functools.partial(
        init_state, make_model=network.model_factory(config), tx=tx, memory=objective.memory,
        init_from_teacher=bool(options and options.init_from_teacher),
        keep_teacher=keep_teacher)
    encoder = repa.frozen_encoder(config) if repa.is_active(config) else None
    abstract_state = jax.eval_shape(init_fn, jax.random.key(config.seed),
                                    teacher_net and teacher_net.abstract_params,
                                    encoder and encoder.abstract_params)
    rules = tuple(config.logical_axis_rules)
    shardings = state_shardings(abstract_state, net, tx, mesh, rules, objective.memory,
                                teacher_net if keep_teacher else None)
    return cls(config, mesh, net, tx, init_fn, abstract_state, shardings,
               batch_contract.batch_spec(config), rules, objective, teacher_net, encoder)

  def init(self) -> dict:
    """Initialised under jit straight into its shards: no full copy on any one device. A flow
    map's teacher is read from its run first (its EMA weights, onto their shards)."""
    teacher = None
    if self.teacher_net is not None:
      workdir = self.config.objective.flow_map.teacher_workdir
      flow_maps.check_teacher(self.config, workdir)
      shardings = sharding.tree_shardings(self.teacher_net.abstract_params,
                                          self.teacher_net.logical_axes, self.mesh, self.rules)
      abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              self.teacher_net.abstract_params, shardings)
      teacher, step = checkpointing.restore_params(workdir, abstract, use_ema=True)
      logging.info('flow-map teacher: EMA weights of step %d from %s', step, workdir)
    encoder = None
    if self.repa_encoder is not None:
      encoder = self.repa_encoder.load_params()
      logging.info('REPA encoder: %s, %s parameters', self.repa_encoder.name,
                   f'{network.count_params(encoder):,}')
    return jax.jit(self.init_fn, out_shardings=self.state_shardings)(
        jax.random.key(self.config.seed), teacher, encoder)

  def sharded_abstract_state(self) -> dict:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.state_shardings)

  def abstract_batch(self) -> dict:
    return {k: jax.ShapeDtypeStruct(shape, dtype,
                                    sharding=sharding.batch_sharding(self.mesh, len(shape)))
            for k, (shape, dtype) in self.batch_spec.items()}
