"""Training objectives: what the network regresses onto (METHOD.md §2–§4).

The loss is shared by every objective: draw t and ε (or take them from the pipeline, when the
config says it draws them), form x_t on the chosen path, regress the network's velocity onto a
target. Every target is a configuration of the one posterior-mean estimator of
`candidates.py`, which differs only in where its candidates come from:

  FM        the own endpoint alone: v(x_t | x0)                        (METHOD.md §2)
  PAFM      the global batch and/or retrieved neighbours (+ own)       (§3)
  StableVM  a per-class FIFO memory bank, SNIS for t ≥ 0.5, FM below   (§4)

A flow map (§5, `flow_maps.py`) trains a two-time network with `flow_map_loss`: its diagonal
regresses onto one of these targets (or a teacher's velocity), its off-diagonal onto the
map's own consistency conditions.

StableVM also owns state (its bank), which the one train step carries in `state['memory']`;
`Objective.prepare` is its hook into the step (push the data batch, draw the training pairs).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pafm_jax import batch_contract as fields
from pafm_jax import candidates, flow_maps, paths, repa


def sample_t(rng: jax.Array, batch_size: int, kind: str) -> jax.Array:
  """Training times t: [B] in [0, 1), by the law `kind` of paths.T_SAMPLINGS."""
  draw, transform = paths.t_law(kind)
  base = jax.random.uniform if draw == 'uniform' else jax.random.normal
  return transform(base(rng, (batch_size,)))


def drop_labels(rng: jax.Array, labels: jax.Array, drop_prob: float,
                null_label: int) -> jax.Array:
  """Replaces each label by the null class with probability `drop_prob` (for CFG)."""
  drop = jax.random.bernoulli(rng, drop_prob, labels.shape)
  return jnp.where(drop, null_label, labels)


# The FM target: the estimator whose only candidate is the sample's own endpoint.
fm_target = candidates.Estimator((candidates.OwnEndpoint(),))


# ---------------------------------------------------------------------------------------------
# PAFM (METHOD.md §3): the posterior-mean velocity over candidate endpoints.

PAFM_SOURCES = {
    'batch': (candidates.GlobalBatch(),),
    # Without the batch the own endpoint joins as a candidate, so K = 1 stays FM.
    'retrieved': (candidates.OwnEndpoint(), candidates.Retrieved()),
    'batch+retrieved': (candidates.GlobalBatch(), candidates.Retrieved()),
}
CONDITIONS = ('class', 'text')
TEXT_CANDIDATES = ('caption', 'image')


@dataclasses.dataclass(frozen=True)
class PAFMOptions:
  """What a PAFM target combines; built from config.objective.pafm by `make_objective`.

  sources: 'batch' (the whole global batch), 'retrieved' (the `neighbours` batch fields plus
    the own endpoint) or 'batch+retrieved' (both, in one softmax; duplicates by id removed).
  stratified: METHOD.md §3's combination of both sources (needs `class_sizes`): the retrieved
    set S is exact, in-batch candidates outside S stand for the rest of their class.
  t_min: below it the target is plain FM. temperature: likelihood temperature (1 = exact).
  condition: 'class' (mask by label) or 'text' (cos(e_i, e_j)/text_tau of the batch fields
    `cond_embedding` [B, E] and the candidates' embeddings: their own captions' for
    text_candidate='caption', their images' under the LiT tower for 'image').
  """
  sources: str = 'batch'
  stratified: bool = False
  t_min: float = 0.0
  temperature: float = 1.0
  condition: str = 'class'
  text_tau: float = 0.1
  text_candidate: str = 'caption'
  class_sizes: tuple[int, ...] | None = None

  def estimator(self) -> candidates.Estimator:
    field = {'caption': fields.COND_EMBEDDING,
             'image': fields.IMAGE_EMBEDDING}[self.text_candidate]
    condition = (candidates.TextSimilarity(self.text_tau, field) if self.condition == 'text'
                 else candidates.ClassMask())
    return candidates.Estimator(
        PAFM_SOURCES[self.sources], condition,
        class_sizes=self.class_sizes if self.stratified else None, t_min=self.t_min,
        temperature=self.temperature)


def pafm_target(path, x_t, t, x0, eps, labels, batch, *, options: PAFMOptions,
                null_label: int):
  """Σ_j w_j·v(x_t | x0_j) over the candidates of `options`, one softmax over all of them.

  batch: batch_contract fields ('label', and with retrieved sources 'neighbours',
  'neighbour_labels', 'neighbour_ids', 'id'). `labels` are the (possibly dropped) conditions
  of the samples. Returns the target and diagnostics 'ess' and 'target_shift' (mean squared
  distance to the FM target), each [B].
  """
  return options.estimator()(path, x_t, t, x0, eps, labels, batch, null_label=null_label)


# ---------------------------------------------------------------------------------------------
# StableVM (METHOD.md §4): SNIS over a per-class FIFO memory bank, for t ≥ t_min.


@dataclasses.dataclass(frozen=True)
class MemoryBank:
  """A per-class FIFO bank of clean samples kept in the train state (sharded along slots).

  Row c < num_classes holds the latest `capacity` samples of class c; row num_classes (the
  null label's row) is the global pool: the latest `capacity` samples of any class. Arrays:
  'images' [C + 1, capacity, *S], 'count' [C + 1] (filled slots), 'next' [C + 1] (FIFO head).
  """
  num_classes: int
  capacity: int
  image_shape: tuple[int, ...]
  dtype: Any = jnp.float32

  def init(self) -> dict:
    rows = self.num_classes + 1
    return {'images': jnp.zeros((rows, self.capacity) + self.image_shape, self.dtype),
            'count': jnp.zeros((rows,), jnp.int32), 'next': jnp.zeros((rows,), jnp.int32)}

  def logical_axes(self) -> dict:
    return {'images': ('bank_class', 'bank_slot') + (None,) * len(self.image_shape),
            'count': (None,), 'next': (None,)}

  def push(self, memory: dict, images: jax.Array, labels: jax.Array) -> dict:
    """Appends a batch (images [B, *S], labels [B]) to its classes' rows and to the pool."""
    b, cap = labels.shape[0], self.capacity
    rows = self.num_classes + 1
    onehot = jax.nn.one_hot(labels, rows, dtype=jnp.int32)                   # [B, C+1]
    rank = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)        # [B] within class
    added = jnp.sum(onehot, axis=0)                                          # [C+1]
    pool = jnp.full((b,), self.num_classes)
    pool_added = jnp.zeros((rows,), jnp.int32).at[self.num_classes].set(b)
    new = memory
    for row_ids, within, n_added in ((labels, rank, added), (pool, jnp.arange(b), pool_added)):
      # Of more than `capacity` arrivals only the last ones survive: drop the others outright,
      # so no two writes of one scatter hit the same slot.
      keep = within >= n_added[row_ids] - cap
      slot = jnp.where(keep, (new['next'][row_ids] + within) % cap, cap)
      new = {'images': new['images'].at[row_ids, slot].set(images.astype(self.dtype),
                                                           mode='drop'),
             'count': jnp.minimum(new['count'] + n_added, cap),
             'next': (new['next'] + n_added) % cap}
    return new

  def draw(self, memory: dict, rng: jax.Array, batch_size: int, null_prob: float):
    """Training pairs from the bank: class-uniform labels (over non-empty classes), a
    fraction `null_prob` set to the null label (drawn from the pool), and one bank sample each.

    Returns labels [B], x0 [B, *S] float32, the candidates of each label's row [B, cap, *S] and
    their validity [B, cap].
    """
    rng_y, rng_null, rng_slot = jax.random.split(rng, 3)
    filled = memory['count'][:self.num_classes] > 0
    labels = jax.random.categorical(rng_y, jnp.where(filled, 0.0, -jnp.inf), shape=(batch_size,))
    labels = drop_labels(rng_null, labels, null_prob, self.num_classes)
    count = memory['count'][labels]
    slot = jnp.floor(jax.random.uniform(rng_slot, (batch_size,)) * count).astype(jnp.int32)
    candidates = memory['images'][labels].astype(jnp.float32)
    x0 = jnp.take_along_axis(
        candidates, slot.reshape((-1, 1) + (1,) * len(self.image_shape)), axis=1)[:, 0]
    valid = jnp.arange(self.capacity)[None, :] < count[:, None]
    return labels, x0, candidates, valid


def bank_training_batch(bank: MemoryBank, memory: dict, batch: dict, rng: jax.Array,
                        null_prob: float) -> tuple[dict, dict]:
  """StableVM's step input: push the data batch into the bank, then draw the training pairs.

  The data batch only feeds the bank; the returned batch holds the drawn pairs (labels already
  dropped to null with `null_prob`) and each pair's candidates.
  """
  memory = bank.push(memory, batch[fields.IMAGE], batch[fields.LABEL])
  labels, x0, cands, valid = bank.draw(memory, rng, batch[fields.LABEL].shape[0], null_prob)
  return memory, {fields.IMAGE: x0, fields.LABEL: labels, fields.BANK_CANDIDATES: cands,
                  fields.BANK_VALID: valid}


def stablevm_target(path, x_t, t, x0, eps, labels, batch, *, t_min: float,
                    temperature: float = 1.0):
  """SNIS over the bank row of the sample's label (`bank_candidates`, `bank_valid` fields)."""
  estimator = candidates.Estimator((candidates.Bank(),), t_min=t_min, temperature=temperature)
  return estimator(path, x_t, t, x0, eps, labels, batch)


# ---------------------------------------------------------------------------------------------
# Selection by config.

OBJECTIVES = ('fm', 'pafm', 'stablevm', 'flow_map')


@dataclasses.dataclass(frozen=True)
class Objective:
  """What the train step needs of an objective: its target and, for StableVM, its bank.

  prepare(memory, batch, rng, null_prob) → (memory, batch): run by the step before the loss
  when the objective keeps state (`memory` describes it); the batch it returns replaces the
  data batch.
  flow_map: set for a two-time network, trained by `flow_map_loss` with `target` on its
  diagonal (None: the teacher's velocity). teacher_apply(params, x, t, y): the frozen
  velocity network whose parameters the state carries as 'teacher'.
  """
  name: str
  target: Callable | None
  memory: MemoryBank | None = None
  prepare: Callable | None = None
  flow_map: flow_maps.FlowMapOptions | None = None
  teacher_apply: Callable | None = None


def check_config(config) -> None:
  """Every error of config.objective, raised before any data is read or anything compiled."""
  obj = config.objective
  if obj.name not in OBJECTIVES:
    raise ValueError(f'unknown objective {obj.name!r}; config.objective.name must be one of '
                     f'{OBJECTIVES}.')
  if not 0.0 <= obj.label_drop < 1.0:
    raise ValueError(f'config.objective.label_drop must lie in [0, 1), got {obj.label_drop}.')
  if uses_pafm(config):
    _check_pafm_config(config)
  if obj.name == 'flow_map':
    flow_maps.check_config(config)
  if obj.name == 'stablevm' and fields.is_text_conditional(config):
    raise ValueError("StableVM's memory bank keeps a row per class and draws its training pairs "
                     'from it, without their captions: it trains class-conditional models. For '
                     "captioned data use config.objective.name='pafm' (or 'fm').")
  repa.check_config(config)
  if obj.name == 'stablevm' and obj.stablevm.bank_capacity < 1:
    raise ValueError('config.objective.stablevm.bank_capacity must be ≥ 1, got '
                     f'{obj.stablevm.bank_capacity}.')


def uses_pafm(config) -> bool:
  """PAFM's target trains the model: objective 'pafm', or a flow map's diagonal."""
  obj = config.objective
  return obj.name == 'pafm' or (obj.name == 'flow_map' and
                                obj.flow_map.diagonal_target == 'pafm')


def _check_pafm_config(config) -> None:
  p = config.objective.pafm
  if p.sources not in PAFM_SOURCES:
    raise ValueError(f'unknown PAFM source {p.sources!r}; config.objective.pafm.sources must '
                     f'be one of {tuple(PAFM_SOURCES)}.')
  if p.condition not in CONDITIONS:
    raise ValueError(f'config.objective.pafm.condition must be one of {CONDITIONS}, got '
                     f'{p.condition!r}.')
  if p.condition == 'text' and not fields.is_text_conditional(config):
    raise ValueError(
        "config.objective.pafm.condition='text' weighs candidates by their captions: it needs "
        "captioned data (config.data.name='fashion_mnist_captions' or 'captioned'). Use "
        "config.objective.pafm.condition='class' for class-labelled data.")
  if p.text_candidate not in TEXT_CANDIDATES:
    raise ValueError(f'config.objective.pafm.text_candidate must be one of {TEXT_CANDIDATES}, '
                     f'got {p.text_candidate!r}.')
  if p.condition == 'text' and p.text_candidate == 'image' and not config.data.lit_dir:
    raise ValueError(
        "config.objective.pafm.text_candidate='image' scores candidates by their LiT image "
        'embeddings: train the towers with `python -m pafm_jax.main --mode=train_lit '
        "--config=<config> --workdir=<dir>` and set config.data.lit_dir to that workdir.")
  if p.text_tau <= 0:
    raise ValueError(f'config.objective.pafm.text_tau must be > 0, got {p.text_tau}.')
  if 'retrieved' in p.sources and config.retrieval.mode == 'none':
    raise ValueError(
        f'config.objective.pafm.sources={p.sources!r} asks for retrieved candidates, but no '
        "neighbour source is configured (config.retrieval.mode='none'). Set "
        "config.retrieval.mode to 'clean' or 'noisy', or use config.objective.pafm.sources="
        "'batch'.")
  if p.stratified and p.sources != 'batch+retrieved':
    raise ValueError("config.objective.pafm.stratified=True combines in-batch and retrieved "
                     "candidates: it needs config.objective.pafm.sources='batch+retrieved'.")
  if p.stratified and config.retrieval.mode == 'clean':
    # S must be chosen without looking at x0 beyond x_t: clean neighbours are the top-k of the
    # sample's own x0, which biases the stratified estimate (measured 2–4 % of ‖x̄0‖ on
    # Fashion-MNIST, against 0.3–0.6 % for the top-k of x_t/α_t).
    raise ValueError(
        "config.objective.pafm.stratified=True with config.retrieval.mode='clean' is biased: "
        'the exact stratum S must be the top-k of x_t/α_t, not of the own x0. Use '
        "config.retrieval.mode='noisy', or config.objective.pafm.stratified=False.")
  if p.temperature <= 0:
    raise ValueError(f'config.objective.pafm.temperature must be > 0, got {p.temperature}.')


def _pafm_target(config, class_sizes) -> Callable:
  p = config.objective.pafm
  if p.stratified and class_sizes is None:
    raise ValueError('the stratified PAFM combination needs the class sizes of the dataset.')
  sizes = None if class_sizes is None else tuple(int(n) for n in class_sizes)
  if sizes is not None and p.condition == 'text':
    # Text retrieval searches the whole dataset (one partition): one stratum.
    sizes = (sum(sizes),)
  options = PAFMOptions(
      sources=p.sources, stratified=p.stratified, t_min=p.t_min, temperature=p.temperature,
      condition=p.condition, text_tau=p.text_tau, text_candidate=p.text_candidate,
      class_sizes=sizes)
  return functools.partial(options.estimator(), null_label=config.data.num_classes)


def _flow_map_objective(config, class_sizes, teacher_apply) -> Objective:
  options = flow_maps.FlowMapOptions.from_config(config)
  target = {'fm': fm_target, 'teacher': None}.get(options.diagonal_target)
  if options.diagonal_target == 'pafm':
    target = _pafm_target(config, class_sizes)
  if options.teacher_in_step and teacher_apply is None:
    raise ValueError('a flow map with a teacher needs the teacher network (teacher_apply).')
  return Objective('flow_map', target, flow_map=options,
                   teacher_apply=teacher_apply if options.teacher_in_step else None)


def make_objective(config, class_sizes=None, teacher_apply=None) -> Objective:
  """The objective of config.objective; `class_sizes` [C] for the stratified combination;
  `teacher_apply` the velocity network of a flow map's teacher."""
  check_config(config)
  obj = config.objective
  if obj.name == 'fm':
    return Objective('fm', fm_target)
  if obj.name == 'pafm':
    return Objective('pafm', _pafm_target(config, class_sizes))
  if obj.name == 'flow_map':
    return _flow_map_objective(config, class_sizes, teacher_apply)
  s = obj.stablevm
  bank = MemoryBank(config.data.num_classes, s.bank_capacity,
                    (config.data.image_size, config.data.image_size, config.data.channels),
                    jnp.dtype(s.bank_dtype))
  return Objective('stablevm', functools.partial(stablevm_target, t_min=s.t_min,
                                                 temperature=s.temperature), bank,
                   functools.partial(bank_training_batch, bank))


def _field(batch: dict, name: str) -> jax.Array:
  if name not in batch:
    raise fields.missing_field_error(name, batch)
  return batch[name]


def _labels_condition(batch, labels):
  del batch
  return labels


@dataclasses.dataclass(frozen=True)
class Alignment:
  """Representation alignment as an auxiliary loss of the step (repa.py): `apply(params, x, t,
  y)` → (velocity, projector tokens z̃); the batch's 'repa_features' are the target z."""
  apply: Callable
  weight: float
  schedule: str
  tau: float
  sharpness: float

  def __call__(self, path, projected, batch, t):
    weights = repa.schedule_weights(t, self.schedule, tau=self.tau, sharpness=self.sharpness,
                                    path=path)
    loss, per_sample = repa.alignment_loss(projected, _field(batch, fields.REPA_FEATURES),
                                           weights)
    return loss, {'alignment': per_sample, 'alignment_weight': weights}


def make_alignment(config, apply_with_projection: Callable) -> Alignment | None:
  """The step's Alignment when config.objective.repa.weight > 0, else None."""
  if not repa.is_active(config):
    return None
  r = config.objective.repa
  return Alignment(apply_with_projection, float(r.weight), r.schedule, float(r.tau),
                   float(r.sharpness))


def velocity_loss(apply_fn, params, batch: dict, rng: jax.Array, *, path, target_fn,
                  t_sampling: str, label_drop: float, null_label: int,
                  noise_from_batch: bool = False, condition_fn: Callable = _labels_condition,
                  alignment: Alignment | None = None):
  """The regression loss shared by every objective.

  batch: batch_contract fields, 'image' [B, *S] clean data x0 and 'label' [B] at least; with
  `noise_from_batch` (batch_contract.pipeline_draws_noise: noisy retrieval) also 't' [B] and
  'eps' [B, *S], drawn by the data pipeline instead of here.
  condition_fn(batch, dropped labels) → the network's condition y (Network.condition: the
  labels themselves, or a caption's encoding).
  alignment: adds λ·L_align of the projector's tokens (repa.py); aux then also holds
  'alignment_loss' and the per-sample 'alignment' [B] and 'alignment_weight' [B].
  Returns (loss, aux) with aux['per_sample'] the [B] velocity losses and aux['t'] the times.
  """
  x0 = _field(batch, fields.IMAGE)
  rng_t, rng_eps, rng_drop = jax.random.split(rng, 3)
  if noise_from_batch:
    t, eps = _field(batch, fields.T), _field(batch, fields.EPS)
  else:
    t = sample_t(rng_t, x0.shape[0], t_sampling)
    eps = jax.random.normal(rng_eps, x0.shape, x0.dtype)
  labels = drop_labels(rng_drop, _field(batch, fields.LABEL), label_drop, null_label)
  x_t = paths.interpolate(path, x0, eps, t)
  target, diagnostics = target_fn(path, x_t, t, x0, eps, labels, batch)
  target = jax.lax.stop_gradient(target)
  y = condition_fn(batch, labels)
  if alignment is None:
    pred = apply_fn(params, x_t, t, y)
  else:
    pred, projected = alignment.apply(params, x_t, t, y)
  per_sample = jnp.mean(jnp.square(pred.astype(jnp.float32) - target),
                        axis=tuple(range(1, x0.ndim)))
  aux = {'per_sample': per_sample, 't': t, **diagnostics}
  loss = jnp.mean(per_sample)
  if alignment is not None:
    aux['alignment_loss'], extra = alignment(path, projected, batch, t)
    aux.update(extra)
    loss = loss + alignment.weight * aux['alignment_loss']
  return loss, aux


def teacher_target(teacher: Callable) -> Callable:
  """The target of a velocity teacher `teacher(x, t, y)`, in the estimators' signature."""
  def target(path, x_t, t, x0, eps, labels, batch):
    del path, x0, eps, batch
    return teacher(x_t, t, labels), {}
  return target


def flow_map_loss(apply_fn, params, batch: dict, rng: jax.Array, *, path,
                  options: flow_maps.FlowMapOptions, target_fn: Callable | None,
                  t_sampling: str, label_drop: float, null_label: int,
                  noise_from_batch: bool = False, teacher: Callable | None = None,
                  condition_fn: Callable = _labels_condition):
  """The flow-map loss (flow_maps.py): `velocity_loss`'s regression, with the diagonal rows
  on the velocity target and the others on the chosen consistency target.

  apply_fn(params, x, s, y, t_end) is φ_{s,t_end}(x); teacher(x, t, y) a frozen velocity
  (train.py guides it as the options say), used by 'lmd' and, with target_fn=None, on the
  diagonal.
  batch: as for `velocity_loss`; its 't' is the data time s. Returns (mean loss, aux) with
  aux['per_sample'] the [B] squared errors before adaptive weighting and aux['t'] = s.
  """
  x0 = _field(batch, fields.IMAGE)
  rng_t, rng_eps, rng_drop, rng_pair = jax.random.split(rng, 4)
  draw_time = lambda key: sample_t(key, x0.shape[0], t_sampling)
  if noise_from_batch:
    s, eps = _field(batch, fields.T), _field(batch, fields.EPS)
  else:
    s = draw_time(rng_t)
    eps = jax.random.normal(rng_eps, x0.shape, x0.dtype)
  s, t, u, diagonal = flow_maps.pair_times(rng_pair, s, options, draw_time)
  labels = drop_labels(rng_drop, _field(batch, fields.LABEL), label_drop, null_label)
  x_s = paths.interpolate(path, x0, eps, s)
  target_fn = target_fn or teacher_target(teacher)
  velocity, diagnostics = target_fn(path, x_s, s, x0, eps, labels, batch)
  labels = condition_fn(batch, labels)
  velocity = jax.lax.stop_gradient(velocity)
  phi = lambda x, start, end: apply_fn(params, x, start, labels, end)
  frozen = jax.lax.stop_gradient(params)
  own_diagonal = lambda x, time: apply_fn(frozen, x, time, labels, None)
  end_velocity = (lambda x, time: teacher(x, time, labels)) if options.loss == 'lmd' \
      else own_diagonal
  prediction, off_diagonal = flow_maps.PAIRS[options.loss](
      phi, x=x_s, s=s, t=t, u=u, v=velocity, velocity=end_velocity)
  target = jnp.where(paths.bcast(diagonal, x_s), velocity, off_diagonal)
  per_sample = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target),
                        axis=tuple(range(1, x0.ndim)))
  weight = flow_maps.adaptive_weight(per_sample, options.adaptive_weight_power)
  return jnp.mean(weight * per_sample), {'per_sample': per_sample, 't': s, **diagnostics}
