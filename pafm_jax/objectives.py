"""Training objectives: what the network regresses onto (METHOD.md §2).

The loss is shared by every objective: draw t and ε, form x_t on the chosen path, regress the
network's velocity onto a target. Objectives differ only in the target, a pure function that
sees the path, the noisy sample and its endpoint, the (possibly dropped) conditions and the
batch (whose other endpoints, retrieved neighbours or bank rows are PAFM's candidates):

  FM        v(x_t | x0)                                              (METHOD.md §2)
  PAFM      Σ_j w_j·v(x_t | x0_j), in-batch and/or retrieved x0_j    (§3)
  StableVM  the same over a per-class FIFO memory bank, for t ≥ 0.5  (§4)

StableVM also owns state (its bank), which the one train step carries in `state['memory']`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pafm_jax import paths, posterior

T_SAMPLINGS = ('uniform', 'lognormal')


def sample_t(rng: jax.Array, batch_size: int, kind: str) -> jax.Array:
  """Training times t: [B] in [0, 1).

  'lognormal' follows EDM / flow_matching: t = 1 − 1/(1 + exp(1.2·n − 1.2)), n ~ N(0, 1).
  """
  if kind == 'uniform':
    return jax.random.uniform(rng, (batch_size,))
  if kind == 'lognormal':
    n = jax.random.normal(rng, (batch_size,))
    return 1.0 - 1.0 / (1.0 + jnp.exp(1.2 * n - 1.2))
  raise ValueError(f'unknown t sampling {kind!r}; config.objective.t_sampling must be one of '
                   f'{T_SAMPLINGS}.')


def drop_labels(rng: jax.Array, labels: jax.Array, drop_prob: float,
                null_label: int) -> jax.Array:
  """Replaces each label by the null class with probability `drop_prob` (for CFG)."""
  drop = jax.random.bernoulli(rng, drop_prob, labels.shape)
  return jnp.where(drop, null_label, labels)


def fm_target(path, x_t, t, x0, eps, labels, batch):
  """Flow matching: the conditional velocity of the sample's own endpoint, α̇·x0 + σ̇·ε."""
  del x_t, labels, batch
  return paths.conditional_velocity(path, x0, eps, t), {}


# ---------------------------------------------------------------------------------------------
# PAFM (METHOD.md §3): the posterior-mean velocity over candidate endpoints.

PAFM_SOURCES = ('batch', 'retrieved', 'batch+retrieved')
CONDITIONS = ('class', 'text')


@dataclasses.dataclass(frozen=True)
class PAFMOptions:
  """What `pafm_target` combines; built from config.objective.pafm by `make_objective`.

  sources: 'batch' (the whole global batch), 'retrieved' (the `neighbours` batch fields plus
    the own endpoint) or 'batch+retrieved' (both, in one softmax; duplicates by id removed).
  stratified: METHOD.md §3's combination of both sources (needs `class_sizes`): the retrieved
    set S is exact, in-batch candidates outside S stand for the rest of their class.
  t_min: below it the target is plain FM. temperature: likelihood temperature (1 = exact).
  condition: 'class' (mask by label) or 'text' (cos(e_i, e_j)/text_tau of the batch fields
    `cond_embedding` [B, E] and `neighbour_cond_embedding` [B, k, E]).
  """
  sources: str = 'batch'
  stratified: bool = False
  t_min: float = 0.0
  temperature: float = 1.0
  condition: str = 'class'
  text_tau: float = 0.1
  class_sizes: tuple[int, ...] | None = None


def _condition_logp(options: PAFMOptions, labels, null_label, cand_labels, cand_emb, batch):
  if options.condition == 'text':
    return posterior.text_condition_logp(batch['cond_embedding'], cand_emb,
                                         labels == null_label, options.text_tau)
  return posterior.class_condition_logp(labels, cand_labels, null_label)


def _stratum_log_weights(options: PAFMOptions, in_s, batch_labels, k):
  """log(stratum size / in-batch members of the stratum) for every in-batch candidate: [B, B].

  Row i's strata: the retrieved set S_i (exact, weight 1), the rest of its own class
  (N_c − k items, stood for by the in-batch items of class c outside S_i), and, for a null
  condition, every other class c' (N_c' items, stood for by its in-batch items).
  """
  sizes = jnp.asarray(options.class_sizes, jnp.float32)
  onehot = jax.nn.one_hot(batch_labels, sizes.shape[0], dtype=jnp.float32)         # [B, C]
  members = jnp.matmul((~in_s).astype(jnp.float32), onehot)                          # [B, C]
  own_class = onehot  # row i's own class is that of its endpoint, the batch's item i
  stratum = sizes[None, :] - k * own_class                                            # [B, C]
  log_ratio = jnp.log(stratum) - jnp.log(jnp.maximum(members, 1.0))
  return jnp.take_along_axis(log_ratio, jnp.broadcast_to(batch_labels, in_s.shape), axis=1)


def pafm_target(path, x_t, t, x0, eps, labels, batch, *, options: PAFMOptions,
                null_label: int):
  """Σ_j w_j·v(x_t | x0_j) over the configured candidates, one softmax over all of them.

  batch: 'label' [B] (the true labels of the endpoints, also the in-batch candidates' labels);
  with retrieved sources 'neighbours' [B, k, *S], 'neighbour_labels' [B, k] and, to remove
  duplicates, 'id' [B] and 'neighbour_ids' [B, k]. `labels` are the (possibly dropped)
  conditions of the samples. Returns the target and diagnostics 'ess' and 'target_shift'
  (mean squared distance to the FM target), each [B].
  """
  use_batch = options.sources in ('batch', 'batch+retrieved')
  use_retrieved = options.sources in ('retrieved', 'batch+retrieved')
  batch_labels = batch['label']
  scores, conds = [], []
  if use_batch:
    scores.append(posterior.in_batch_proximity_scores(x_t, t, x0, path))
    in_batch_cond = _condition_logp(options, labels, null_label, batch_labels,
                                    batch.get('cond_embedding'), batch)
    if use_retrieved:
      # in_s[i, j]: in-batch item j is one of row i's retrieved neighbours (counted there).
      in_s = jnp.any(batch['neighbour_ids'][:, :, None] == batch['id'][None, None, :], axis=1)
      in_batch_cond = jnp.where(in_s, -jnp.inf, in_batch_cond)
      if options.stratified:
        k = batch['neighbour_ids'].shape[1]
        in_batch_cond = in_batch_cond + _stratum_log_weights(options, in_s, batch_labels, k)
    conds.append(in_batch_cond)
  else:
    # Retrieved only: the own endpoint joins as a candidate, so K = 1 stays FM.
    scores.append(posterior.proximity_scores(x_t, t, x0[:, None], path))
    conds.append(jnp.zeros(scores[-1].shape, jnp.float32))
  if use_retrieved:
    nbrs = batch['neighbours']
    scores.append(posterior.proximity_scores(x_t, t, nbrs, path))
    retrieved_cond = _condition_logp(options, labels, null_label, batch['neighbour_labels'],
                                     batch.get('neighbour_cond_embedding'), batch)
    if not use_batch and 'id' in batch:
      retrieved_cond = jnp.where(batch['neighbour_ids'] == batch['id'][:, None], -jnp.inf,
                                 retrieved_cond)
    conds.append(retrieved_cond)

  weights = posterior.weights_from_scores(
      jnp.concatenate(scores, axis=1), t, jnp.concatenate(conds, axis=1), path,
      temperature=options.temperature)
  n_first = scores[0].shape[1]
  if use_batch:
    x0_mean = posterior.in_batch_posterior_mean(weights[:, :n_first], x0)
  else:
    x0_mean = weights[:, 0].reshape((-1,) + (1,) * (x0.ndim - 1)) * x0.astype(jnp.float32)
  if use_retrieved:
    x0_mean = x0_mean + posterior.posterior_mean(weights[:, n_first:], nbrs)
  return _posterior_or_fm(path, x0, eps, t, x0_mean, weights, options.t_min)


def _posterior_or_fm(path, x0, eps, t, x0_mean, weights, t_min):
  """The posterior target for t ≥ t_min, FM below; with the ESS and target-shift diagnostics."""
  fm = paths.conditional_velocity(path, x0, eps, t)
  use = t >= t_min
  target = jnp.where(paths._bcast(use, fm),
                     posterior.target_from_own_endpoint(path, x0, eps, t, x0_mean), fm)
  reduce = tuple(range(1, fm.ndim))
  return target, {
      'ess': jnp.where(use, posterior.effective_sample_size(weights), 1.0),
      'target_shift': jnp.mean(jnp.square(target - fm), axis=reduce),
  }


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
  memory = bank.push(memory, batch['image'], batch['label'])
  labels, x0, candidates, valid = bank.draw(memory, rng, batch['label'].shape[0], null_prob)
  return memory, {'image': x0, 'label': labels, 'bank_candidates': candidates,
                  'bank_valid': valid}


def stablevm_target(path, x_t, t, x0, eps, labels, batch, *, t_min: float,
                    temperature: float = 1.0):
  """SNIS over the bank row of the sample's label (`bank_candidates`, `bank_valid` fields)."""
  del labels
  cands = batch['bank_candidates']
  weights = posterior.snis_weights(x_t, t, cands, jnp.where(batch['bank_valid'], 0.0, -jnp.inf),
                                   path, temperature=temperature)
  return _posterior_or_fm(path, x0, eps, t, posterior.posterior_mean(weights, cands), weights,
                          t_min)


# ---------------------------------------------------------------------------------------------
# Selection by config.

OBJECTIVES = ('fm', 'pafm', 'stablevm')
RETRIEVAL_MODES = ('none', 'clean', 'noisy')


@dataclasses.dataclass(frozen=True)
class Objective:
  """What the train step needs of an objective: its target and, for StableVM, its bank."""
  name: str
  target: Callable
  memory: MemoryBank | None = None


def check_objective_config(config) -> None:
  """Every objective-config error, raised before any data is read or anything compiled."""
  obj = config.objective
  if obj.name not in OBJECTIVES:
    raise ValueError(f'unknown objective {obj.name!r}; config.objective.name must be one of '
                     f'{OBJECTIVES}.')
  if obj.name == 'pafm':
    p = obj.pafm
    if p.sources not in PAFM_SOURCES:
      raise ValueError(f'unknown PAFM source {p.sources!r}; config.objective.pafm.sources must '
                       f'be one of {PAFM_SOURCES}.')
    if p.condition not in CONDITIONS:
      raise ValueError(f'config.objective.pafm.condition must be one of {CONDITIONS}, got '
                       f'{p.condition!r}.')
    if 'retrieved' in p.sources and config.retrieval.mode == 'none':
      raise ValueError(
          f'config.objective.pafm.sources={p.sources!r} asks for retrieved candidates, but no '
          "neighbour source is configured (config.retrieval.mode='none'). Set "
          "config.retrieval.mode to 'clean' or 'noisy', or use config.objective.pafm.sources="
          "'batch'.")
    if p.stratified and p.sources != 'batch+retrieved':
      raise ValueError("config.objective.pafm.stratified=True combines in-batch and retrieved "
                       "candidates: it needs config.objective.pafm.sources='batch+retrieved'.")
    if p.temperature <= 0:
      raise ValueError(f'config.objective.pafm.temperature must be > 0, got {p.temperature}.')
  if config.retrieval.mode not in RETRIEVAL_MODES:
    raise ValueError(f'config.retrieval.mode must be one of {RETRIEVAL_MODES}, got '
                     f'{config.retrieval.mode!r}.')
  if config.retrieval.mode != 'none' and config.retrieval.k < 1:
    raise ValueError(f'config.retrieval.k must be ≥ 1, got {config.retrieval.k}.')
  if obj.name == 'stablevm' and obj.stablevm.bank_capacity < 1:
    raise ValueError('config.objective.stablevm.bank_capacity must be ≥ 1, got '
                     f'{obj.stablevm.bank_capacity}.')


def make_objective(config, class_sizes=None) -> Objective:
  """The objective of config.objective; `class_sizes` [C] for the stratified combination."""
  check_objective_config(config)
  obj, null_label = config.objective, config.data.num_classes
  if obj.name == 'fm':
    return Objective('fm', fm_target)
  if obj.name == 'pafm':
    p = obj.pafm
    if p.stratified and class_sizes is None:
      raise ValueError('the stratified PAFM combination needs the class sizes of the dataset.')
    options = PAFMOptions(
        sources=p.sources, stratified=p.stratified, t_min=p.t_min, temperature=p.temperature,
        condition=p.condition, text_tau=p.text_tau,
        class_sizes=None if class_sizes is None else tuple(int(n) for n in class_sizes))
    return Objective('pafm', functools.partial(pafm_target, options=options,
                                               null_label=null_label))
  s = obj.stablevm
  bank = MemoryBank(config.data.num_classes, s.bank_capacity,
                    (config.data.image_size, config.data.image_size, config.data.channels),
                    jnp.dtype(s.bank_dtype))
  return Objective('stablevm', functools.partial(stablevm_target, t_min=s.t_min,
                                                 temperature=s.temperature), bank)


def velocity_loss(apply_fn, params, batch: dict, rng: jax.Array, *, path, target_fn,
                  t_sampling: str, label_drop: float, null_label: int):
  """The regression loss shared by every objective.

  batch: {'image': [B, H, W, C] clean data x0, 'label': [B] int}; optional 't': [B] and
  'eps': [B, H, W, C] when the data pipeline drew them (retrieval of noisy neighbours).
  Returns (mean loss, aux) with aux['per_sample'] the [B] losses and aux['t'] the times.
  """
  x0 = batch['image']
  rng_t, rng_eps, rng_drop = jax.random.split(rng, 3)
  t = batch['t'] if 't' in batch else sample_t(rng_t, x0.shape[0], t_sampling)
  eps = batch['eps'] if 'eps' in batch else jax.random.normal(rng_eps, x0.shape, x0.dtype)
  labels = drop_labels(rng_drop, batch['label'], label_drop, null_label)
  x_t = paths.interpolate(path, x0, eps, t)
  target, diagnostics = target_fn(path, x_t, t, x0, eps, labels, batch)
  target = jax.lax.stop_gradient(target)
  pred = apply_fn(params, x_t, t, labels)
  per_sample = jnp.mean(jnp.square(pred.astype(jnp.float32) - target),
                        axis=tuple(range(1, x0.ndim)))
  return jnp.mean(per_sample), {'per_sample': per_sample, 't': t, **diagnostics}
