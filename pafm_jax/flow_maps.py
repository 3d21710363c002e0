"""Flow maps (METHOD.md §5; Boffi, Albergo & Vanden-Eijnden 2024, 2025; MeanFlow, Geng et al.
2025): one network evaluation moves a state of the probability-flow ODE from time s to time t.

The map is parameterised as X_{s,t}(x) = x + (t − s)·φ_{s,t}(x), so X_{t,t} is the identity
exactly and φ_{t,t} is the velocity. Every loss regresses φ_{s,t}(x_s) (or ∂_t X_{s,t}(x_s))
onto a stop-gradient target; they differ only in where the off-diagonal target comes from:

  diagonal  (s = t)  φ_{s,s}(x_s)     → a velocity target v: FM's, PAFM's or a teacher's
  lsd       ∂_t X_{s,t}(x_s)          → sg φ_{t,t}(X_{s,t}(x_s))          self-distillation
  lmd       ∂_t X_{s,t}(x_s)          → b(X_{s,t}(x_s), t), b a frozen teacher velocity
  psd       φ_{s,t}(x_s)              → sg (X_{u,t}(X_{s,u}(x_s)) − x_s)/(t − s), u in between
  meanflow  φ_{s,t}(x_s)              → sg [v + (t − s)·dφ_{s,t}/ds],  d/ds along dx/ds = v

MeanFlow's average velocity u(z, r, t) is φ seen from the other end: their (t, r) is our
(s, t). Differentiating X_{s,t}(x_s) = x_t in s along a trajectory gives
φ_{s,t} = v + (t − s)·dφ_{s,t}/ds, which is their u = v − (t − r)·du/dt. With v the FM target
it is MeanFlow; with PAFM's posterior-mean velocity it is the same identity with a
lower-variance v. Derivatives are forward mode (`jax.jvp`): one tangent pass, no Hessian.

Time convention (METHOD.md §1): t = 0 is data, 1 is noise. The data time s of a row is the
time the pipeline or `objectives.sample_t` draws; the end time t lies between 0 and s, the
direction samplers travel.

Shapes: x [B, *S]; s, t, u [B]. `phi(x, s, t)` → [B, *S] is the network with its labels bound.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

from absl import logging
import jax
import jax.numpy as jnp
from etils import epath

from pafm_jax import paths

MapFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]          # φ(x, s, t)
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]                # b(x, t)

LOSSES = ('lsd', 'lmd', 'psd', 'meanflow')
DIAGONAL_TARGETS = ('fm', 'pafm', 'teacher')
PAIR_SAMPLINGS = ('below', 'sorted')
# MeanFlow's adaptive weight 1/(‖Δ‖² + c)^p, here on the per-sample mean square.
ADAPTIVE_WEIGHT_EPS = 1e-3
# Below this share of diagonal rows, self-distillation ('lsd') diverged in our tests.
LSD_MIN_DIAGONAL_FRACTION = 0.5


def flow_map(phi: MapFn, x: jax.Array, s: jax.Array, t: jax.Array) -> jax.Array:
  """X_{s,t}(x) = x + (t − s)·φ_{s,t}(x): [B, *S]."""
  return x + paths.bcast(t - s, x) * phi(x, s, t)


def end_time_derivative(phi: MapFn, x: jax.Array, s: jax.Array,
                        t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(X_{s,t}(x), ∂_t X_{s,t}(x)) with x and s held fixed, by one `jax.jvp` in t."""
  return jax.jvp(lambda end: flow_map(phi, x, s, end), (t,), (jnp.ones_like(t),))


def start_time_derivative(phi: MapFn, x: jax.Array, s: jax.Array, t: jax.Array,
                          v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(φ_{s,t}(x), dφ_{s,t}/ds) where x moves with velocity v as s moves (t fixed): the total
  derivative along the trajectory through x, by one `jax.jvp` in (x, s)."""
  return jax.jvp(lambda xs, start: phi(xs, start, t), (x, s), (v, jnp.ones_like(s)))


# ---------------------------------------------------------------------------------------------
# The off-diagonal regression pairs (prediction, stop-gradient target). On the diagonal
# (t = s) each prediction is φ_{s,s}(x): the caller puts the velocity target there.


def lagrangian_pair(phi: MapFn, velocity: VelocityFn, x, s, t, **_):
  """∂_t X_{s,t}(x) and sg b(X_{s,t}(x), t): LSD with b = the map's own diagonal, LMD with a
  frozen teacher's velocity. Exact maps satisfy ∂_t X = b(X, t) (the ODE)."""
  end, d_end = end_time_derivative(phi, x, s, t)
  return d_end, jax.lax.stop_gradient(velocity(jax.lax.stop_gradient(end), t))


def semigroup_pair(phi: MapFn, x, s, t, u, **_):
  """φ_{s,t}(x) and sg of the two-jump map's φ: (X_{u,t}(X_{s,u}(x)) − x)/(t − s). Exact
  maps satisfy X_{u,t}∘X_{s,u} = X_{s,t}; compared in φ-space so short and long jumps weigh
  alike."""
  middle = flow_map(phi, x, s, u)
  two_jumps = flow_map(phi, middle, u, t)
  gap = t - s
  safe_gap = jnp.where(gap == 0, 1.0, gap)   # diagonal rows are replaced by the caller
  return phi(x, s, t), jax.lax.stop_gradient((two_jumps - x) / paths.bcast(safe_gap, x))


def meanflow_pair(phi: MapFn, x, s, t, v, **_):
  """φ_{s,t}(x) and sg [v + (t − s)·dφ_{s,t}/ds] with x moving at velocity v (MeanFlow)."""
  prediction, d_start = start_time_derivative(phi, x, s, t, v)
  return prediction, jax.lax.stop_gradient(v + paths.bcast(t - s, x) * d_start)


PAIRS = {'lsd': lagrangian_pair, 'lmd': lagrangian_pair, 'psd': semigroup_pair,
         'meanflow': meanflow_pair}


# ---------------------------------------------------------------------------------------------
# Options and the times of a batch.


@dataclasses.dataclass(frozen=True)
class FlowMapOptions:
  """config.objective.flow_map (configs/base.py documents each field)."""
  loss: str = 'lsd'
  diagonal_fraction: float = 0.75
  diagonal_target: str = 'fm'
  pair_sampling: str = 'below'
  adaptive_weight_power: float = 0.0
  teacher_workdir: str = ''
  teacher_cfg_scale: float = 1.0
  teacher_guidance_interval: tuple[float, float] = (0.0, 0.7)
  init_from_teacher: bool = True

  @classmethod
  def from_config(cls, config) -> 'FlowMapOptions':
    f = config.objective.flow_map
    return cls(loss=f.loss, diagonal_fraction=float(f.diagonal_fraction),
               diagonal_target=f.diagonal_target, pair_sampling=f.pair_sampling,
               adaptive_weight_power=float(f.adaptive_weight_power),
               teacher_workdir=f.teacher_workdir, teacher_cfg_scale=float(f.teacher_cfg_scale),
               teacher_guidance_interval=tuple(float(v) for v in f.teacher_guidance_interval),
               init_from_teacher=bool(f.init_from_teacher))

  @property
  def teacher_in_step(self) -> bool:
    """The step evaluates the teacher (it then lives in the train state as 'teacher')."""
    return self.loss == 'lmd' or self.diagonal_target == 'teacher'

  @property
  def reads_teacher(self) -> bool:
    """A fresh run reads the teacher's weights (for the step or to start from them)."""
    return self.teacher_in_step or (bool(self.teacher_workdir) and self.init_from_teacher)


def pair_times(rng: jax.Array, s: jax.Array, options: FlowMapOptions,
               draw_time: Callable[[jax.Array], jax.Array]):
  """(s, t, u, diagonal) for a batch whose data times are s [B].

  'below': t = w·s with w ~ U(0, 1) (s kept, so a pipeline's noisy retrieval stays valid);
  'sorted': a second time from the training law `draw_time(rng)` → [B], and (s, t) = (max,
  min) of the two (MeanFlow's sampling). The first round(diagonal_fraction·B) rows are
  diagonal (t = s; rows are i.i.d., so which rows does not matter). u: uniform between t
  and s (the semigroup's middle time).
  """
  rng_end, rng_middle = jax.random.split(rng)
  b = s.shape[0]
  if options.pair_sampling == 'below':
    t = s * jax.random.uniform(rng_end, (b,))
  else:
    other = draw_time(rng_end)
    s, t = jnp.maximum(s, other), jnp.minimum(s, other)
  diagonal = jnp.arange(b) < round(options.diagonal_fraction * b)
  t = jnp.where(diagonal, s, t)
  u = t + (s - t) * jax.random.uniform(rng_middle, (b,))
  return s, t, u, diagonal


def adaptive_weight(per_sample: jax.Array, power: float) -> jax.Array:
  """MeanFlow's sg 1/(‖Δ‖² + c)^p per sample ([B]); 1 for p = 0 (plain squared error)."""
  if power == 0.0:
    return jnp.ones_like(per_sample)
  return jax.lax.stop_gradient(1.0 / (per_sample + ADAPTIVE_WEIGHT_EPS) ** power)


# ---------------------------------------------------------------------------------------------
# Checks, run before any data or compilation (config_checks via objectives.check_config).


def check_config(config) -> None:
  f = config.objective.flow_map
  for field, choices in (('loss', LOSSES), ('diagonal_target', DIAGONAL_TARGETS),
                         ('pair_sampling', PAIR_SAMPLINGS)):
    if f[field] not in choices:
      raise ValueError(f'config.objective.flow_map.{field} must be one of {choices}, got '
                       f'{f[field]!r}.')
  if not 0.0 <= f.diagonal_fraction <= 1.0:
    raise ValueError('config.objective.flow_map.diagonal_fraction must lie in [0, 1], got '
                     f'{f.diagonal_fraction}.')
  if f.loss in ('lsd', 'psd') and f.diagonal_fraction == 0.0:
    # Their off-diagonal targets are the map's own outputs: without diagonal rows nothing
    # ties φ_{t,t} to the data, and the zero map satisfies them.
    raise ValueError(f'flow-map loss {f.loss!r} learns the velocity only from diagonal rows; '
                     'set config.objective.flow_map.diagonal_fraction > 0 (0.75 is usual).')
  if f.loss == 'lsd' and f.diagonal_fraction < LSD_MIN_DIAGONAL_FRACTION:
    raise ValueError(
        f'config.objective.flow_map.diagonal_fraction={f.diagonal_fraction} is too small for '
        f"'lsd': self-distillation chases its own diagonal at the map's end points and "
        f'diverged with 0.25 on Gaussian data (tests/test_flow_maps.py); use ≥ '
        f'{LSD_MIN_DIAGONAL_FRACTION} (0.75 is usual).')
  if f.pair_sampling == 'sorted' and config.retrieval.mode == 'noisy':
    raise ValueError("config.objective.flow_map.pair_sampling='sorted' redraws the data time, "
                     "but config.retrieval.mode='noisy' retrieved neighbours for the pipeline's "
                     "time; use pair_sampling='below' with noisy retrieval.")
  if f.adaptive_weight_power < 0:
    raise ValueError('config.objective.flow_map.adaptive_weight_power must be ≥ 0, got '
                     f'{f.adaptive_weight_power}.')
  options = FlowMapOptions.from_config(config)
  if options.teacher_in_step and not f.teacher_workdir:
    raise ValueError(
        f"flow-map loss {f.loss!r} with diagonal_target {f.diagonal_target!r} distils a "
        'trained velocity model: set config.objective.flow_map.teacher_workdir to its workdir '
        '(e.g. runs/fmnist_sit after make train).')
  low, high = options.teacher_guidance_interval
  if options.teacher_cfg_scale < 0 or not 0.0 <= low <= high <= 1.0:
    raise ValueError('config.objective.flow_map.teacher_cfg_scale must be ≥ 0 and '
                     'teacher_guidance_interval (low, high) with 0 ≤ low ≤ high ≤ 1, got '
                     f'{options.teacher_cfg_scale} and {options.teacher_guidance_interval}.')
  if options.teacher_in_step and options.teacher_cfg_scale != 1.0 and config.sample.cfg_scale != 1:
    logging.warning('the flow map learns the teacher guided at %s and samples with '
                    'config.sample.cfg_scale=%s on top: guidance applied twice. Set '
                    'config.sample.cfg_scale=1 to sample as distilled.',
                    options.teacher_cfg_scale, config.sample.cfg_scale)


# The fields a teacher's config must share with the student's: for its weights to fit, and
# for its velocity to be one of the student's path and data.
TEACHER_FIELDS = ('model.name', 'data.image_size', 'data.channels', 'data.num_classes',
                  'data.name', 'objective.path')


def check_teacher(config, workdir: str) -> None:
  """The teacher run exists, has a checkpoint, and matches the student (TEACHER_FIELDS).

  Needed only by a run that reads the teacher (a fresh one: a resumed run carries it in its
  state), so train.py calls it before any data or index work, not config_checks."""
  root = epath.Path(workdir)
  saved = root / 'config.json'
  checkpoints = root / 'checkpoints'
  steps = [p for p in checkpoints.iterdir() if p.name.isdigit()] if checkpoints.exists() else []
  if not saved.exists() or not steps:
    raise ValueError(
        f'config.objective.flow_map.teacher_workdir={workdir!r} holds no trained run '
        '(config.json and checkpoints/<step>); train the teacher first, e.g. '
        f'python -m pafm_jax.main --config=configs/fmnist_sit.py --workdir={workdir}')
  teacher = json.loads(saved.read_text())
  if teacher.get('objective', {}).get('name') == 'flow_map':
    raise ValueError(f'the teacher at {workdir} is itself a flow map; distil a velocity model.')
  if teacher.get('objective', {}).get('label_drop', 0.0) == 0.0 and (
      config.objective.flow_map.teacher_cfg_scale != 1.0):
    logging.warning('the teacher at %s never saw the null label (objective.label_drop=0): '
                    'its guided velocity is not meaningful.', workdir)
  diffs = []
  for field in TEACHER_FIELDS:
    node_t, node_s = teacher, config
    for key in field.split('.'):
      node_t = node_t.get(key) if isinstance(node_t, dict) else None
      node_s = node_s[key]
    if node_t != node_s:
      diffs.append(f'{field}: teacher {node_t!r}, student {node_s!r}')
  if diffs:
    raise ValueError(f'the teacher at {workdir} has another shape ({"; ".join(diffs)}); the '
                     'student starts from its weights, so set these fields to the teacher\'s.')


def overlay(params: dict, teacher: dict) -> dict:
  """The student's parameter tree with every entry the teacher has taken from the teacher
  (the gap embedder, which only the two-time network has, keeps its zero-output init)."""
  return {k: (overlay(v, teacher[k]) if isinstance(v, dict) else teacher[k]) if k in teacher
          else v for k, v in params.items()}
