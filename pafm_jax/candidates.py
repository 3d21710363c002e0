"""Where posterior candidates come from, and the one combiner that turns them into a target.

METHOD.md §3: the target for x_t is Σ_j w_j·v(x_t | x0_j), w = softmax_j(log-likelihood_j +
condition term_j + stratum weight_j), over candidate endpoints gathered from several sources:

  OwnEndpoint   the sample's own x0 (K = 1): with nothing else, the target is FM exactly
  GlobalBatch   every endpoint of the global batch, shared by all rows (it holds the own
                endpoint); scored by one Gram matmul, never a [B, B, *S] tensor
  Retrieved     each row's k retrieved neighbours (batch fields of the retrieval stage); the
                exact stratum S of the stratified combination
  Bank          StableVM's memory-bank row of the sample's label; conditioned by
                construction, so no condition term applies

A source gives its candidates' proximity scores, labels, ids, condition embeddings and
validity, and its contribution Σ_j w_j·x0_j to the posterior mean. The combiner
(`posterior_target`) applies the condition term, removes duplicates by id (a candidate counted
by a more specific source is dropped from a broader one: own endpoint > retrieved > bank >
batch), adds the stratum weights, takes one softmax over every candidate, and returns the
target with its ESS above t_min (plain FM below). Condition terms are their own small pieces:
a class mask, or a CLIP-style similarity between the sample's condition embedding and a
candidate embedding (its caption's, or its image's in a joint space).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pafm_jax import batch_contract as fields
from pafm_jax import paths, posterior


@dataclasses.dataclass(frozen=True)
class Rows:
  """What every source and condition term may read about the B samples being trained on.

  x_t, x0, eps: [B, *S]; t: [B]; labels: [B] conditions (dropped to null_label for CFG);
  batch: the step's batch (batch_contract fields).
  """
  path: Any
  x_t: jax.Array
  t: jax.Array
  x0: jax.Array
  eps: jax.Array
  labels: jax.Array
  null_label: int
  batch: dict

  @property
  def is_null(self) -> jax.Array:
    return self.labels == self.null_label


@dataclasses.dataclass(frozen=True)
class Candidates:
  """One source's candidates for every row; per-row arrays are [B, K], shared ones [K].

  mean: weights [B, K] → Σ_j w_j·x0_j [B, *S], this source's part of the posterior mean.
  """
  name: str
  scores: jax.Array                      # [B, K] α⟨x_t, x0_j⟩ − α²‖x0_j‖²/2
  mean: Callable[[jax.Array], jax.Array]
  labels: jax.Array | None = None        # [B, K] or [K]
  ids: jax.Array | None = None           # [B, K] or [K]
  embeddings: dict | None = None         # {batch field: [B, K, E] or [K, E]}
  valid: jax.Array | None = None         # [B, K] filled slots; None: all valid
  conditioned: bool = False              # already the row's condition: no term added
  exact_stratum: bool = False            # the retrieved top-k set S of METHOD.md §3


# ------------------------------------------------------------------------------- sources

# Per-candidate embeddings a condition term may read: the batch field of the rows' own
# endpoints → that of the retrieved neighbours.
EMBEDDINGS = {fields.COND_EMBEDDING: fields.NEIGHBOUR_COND_EMBEDDING,
              fields.IMAGE_EMBEDDING: fields.NEIGHBOUR_IMAGE_EMBEDDING}


@dataclasses.dataclass(frozen=True)
class OwnEndpoint:
  """The sample's own endpoint, always a candidate: K = 1 is FM."""
  name = 'own'
  precedence = 0

  def candidates(self, rows: Rows) -> Candidates:
    batch = rows.batch
    x0 = rows.x0.astype(jnp.float32)
    emb = {k: batch[k][:, None] for k in EMBEDDINGS if k in batch}
    return Candidates(
        self.name, posterior.proximity_scores(rows.x_t, rows.t, rows.x0[:, None], rows.path),
        lambda w: paths.bcast(w[:, 0], x0) * x0, labels=batch[fields.LABEL][:, None],
        ids=batch[fields.ID][:, None] if fields.ID in batch else None, embeddings=emb)


@dataclasses.dataclass(frozen=True)
class GlobalBatch:
  """Every endpoint of the global batch (all devices and hosts) for every row."""
  name = 'batch'
  precedence = 3

  def candidates(self, rows: Rows) -> Candidates:
    batch = rows.batch
    emb = {k: batch[k] for k in EMBEDDINGS if k in batch}
    return Candidates(
        self.name, posterior.in_batch_proximity_scores(rows.x_t, rows.t, rows.x0, rows.path),
        lambda w: posterior.in_batch_posterior_mean(w, rows.x0), labels=batch[fields.LABEL],
        ids=batch.get(fields.ID), embeddings=emb)


@dataclasses.dataclass(frozen=True)
class Retrieved:
  """Each row's k retrieved neighbours: the exact stratum S when combined with the batch."""
  name = 'retrieved'
  precedence = 1

  def candidates(self, rows: Rows) -> Candidates:
    batch = rows.batch
    nbrs = batch[fields.NEIGHBOURS]
    emb = {k: batch[n] for k, n in EMBEDDINGS.items() if n in batch}
    return Candidates(
        self.name, posterior.proximity_scores(rows.x_t, rows.t, nbrs, rows.path),
        lambda w: posterior.posterior_mean(w, nbrs), labels=batch[fields.NEIGHBOUR_LABELS],
        ids=batch[fields.NEIGHBOUR_IDS], embeddings=emb, exact_stratum=True)


@dataclasses.dataclass(frozen=True)
class Bank:
  """StableVM's bank row of the sample's label (the pool for a null label)."""
  name = 'bank'
  precedence = 2

  def candidates(self, rows: Rows) -> Candidates:
    cands = rows.batch[fields.BANK_CANDIDATES]
    return Candidates(
        self.name, posterior.proximity_scores(rows.x_t, rows.t, cands, rows.path),
        lambda w: posterior.posterior_mean(w, cands), valid=rows.batch[fields.BANK_VALID],
        conditioned=True)


# ------------------------------------------------------------------------- condition terms


@dataclasses.dataclass(frozen=True)
class ClassMask:
  """log p(y_i | x0_j) = 0 for the sample's class, −inf elsewhere; a null label allows all."""

  def __call__(self, rows: Rows, cands: Candidates) -> jax.Array:
    return posterior.class_condition_logp(rows.labels, cands.labels, rows.null_label)


@dataclasses.dataclass(frozen=True)
class TextSimilarity:
  """cos(e_i, e_j)/τ between the sample's condition embedding e_i and a candidate embedding.

  candidate_field names the candidates' embedding: the condition embedding of their own
  captions (caption–caption), or an image embedding in a joint space (image–text).
  """
  tau: float
  candidate_field: str = fields.COND_EMBEDDING

  def __call__(self, rows: Rows, cands: Candidates) -> jax.Array:
    return posterior.text_condition_logp(rows.batch[fields.COND_EMBEDDING],
                                         cands.embeddings[self.candidate_field], rows.is_null,
                                         self.tau)


# ------------------------------------------------------------------------------- combiner


def duplicates(ids: jax.Array, other_ids: jax.Array, batch_size: int) -> jax.Array:
  """[B, K]: candidate j of row i also appears among row i's `other_ids` ([B, K'] or [K'])."""
  ids = jnp.broadcast_to(ids, (batch_size,) + ids.shape[-1:])
  other = jnp.broadcast_to(other_ids, (batch_size,) + other_ids.shape[-1:])
  return jnp.any(other[:, :, None] == ids[:, None, :], axis=1)


def stratum_log_weights(class_sizes, covered: jax.Array, labels: jax.Array,
                        k: int) -> jax.Array:
  """log(stratum size / in-batch members of the stratum) for every in-batch candidate: [B, B].

  Row i's strata (METHOD.md §3): the retrieved set S_i (exact, weight 1; `covered` marks the
  batch items in it), the rest of its own class (N_c − k items, stood for by the in-batch
  items of class c outside S_i), and, for a null condition, every other class c' (N_c' items,
  stood for by its in-batch items). labels: [B] the batch items' (= the rows' own) classes.
  """
  sizes = jnp.asarray(class_sizes, jnp.float32)
  onehot = jax.nn.one_hot(labels, sizes.shape[0], dtype=jnp.float32)                 # [B, C]
  members = jnp.matmul((~covered).astype(jnp.float32), onehot)                         # [B, C]
  stratum = sizes[None, :] - k * onehot  # row i's own class is that of its endpoint, item i
  log_ratio = jnp.log(stratum) - jnp.log(jnp.maximum(members, 1.0))
  return jnp.take_along_axis(log_ratio, jnp.broadcast_to(labels, covered.shape), axis=1)


@dataclasses.dataclass(frozen=True)
class Estimator:
  """A posterior-mean target: its sources, condition term and combination settings.

  class_sizes: per-class dataset sizes; given, the batch source is stratified against the
  exact (retrieved) stratum (one size: the whole dataset is one partition, as for text).
  t_min: plain FM below it. temperature: of the likelihood.
  """
  sources: tuple
  condition: Callable | None = None
  class_sizes: tuple[int, ...] | None = None
  t_min: float = 0.0
  temperature: float = 1.0

  def __call__(self, path, x_t, t, x0, eps, labels, batch, *, null_label: int = -1):
    """(target [B, *S], diagnostics {'ess', 'target_shift'} [B]): the train step's target_fn.

    null_label: the label of a dropped condition (−1: none can be dropped).
    """
    rows = Rows(path, x_t, t, x0, eps, labels, null_label, batch)
    if self.sources == (OwnEndpoint(),):  # one candidate of weight 1: FM itself
      return paths.conditional_velocity(path, x0, eps, t), {}
    sets = [s.candidates(rows) for s in self.sources]
    log_prior = [self._log_prior(rows, i, sets) for i in range(len(sets))]
    weights = posterior.weights_from_scores(
        jnp.concatenate([c.scores for c in sets], axis=1), t,
        jnp.concatenate(log_prior, axis=1), path, temperature=self.temperature)
    x0_mean, start = None, 0
    for c in sets:
      part = c.mean(weights[:, start:start + c.scores.shape[1]])
      x0_mean = part if x0_mean is None else x0_mean + part
      start += c.scores.shape[1]
    return posterior_or_fm(path, x0, eps, t, x0_mean, weights, self.t_min)

  def _log_prior(self, rows: Rows, i: int, sets: list[Candidates]) -> jax.Array:
    """Condition term, validity, duplicate removal and stratum weight of source i: [B, K]."""
    c, b = sets[i], rows.t.shape[0]
    if c.conditioned or self.condition is None:
      logp = jnp.zeros(c.scores.shape, jnp.float32)
    else:
      logp = self.condition(rows, c)
    if c.valid is not None:
      logp = jnp.where(c.valid, logp, -jnp.inf)
    mine = self.sources[i].precedence
    stronger = [o for s, o in zip(self.sources, sets)
                if s.precedence < mine and o.ids is not None and c.ids is not None]
    for o in stronger:
      logp = jnp.where(duplicates(c.ids, o.ids, b), -jnp.inf, logp)
    exact = [o for o in stronger if o.exact_stratum]
    if self.class_sizes is not None and c.labels is not None and c.labels.ndim == 1 and exact:
      covered = duplicates(c.ids, exact[0].ids, b)
      # One stratum size: the dataset is one partition (text data, whose retrieval ignores
      # labels), so every item outside S stands for the rest of the whole dataset.
      strata = c.labels if len(self.class_sizes) > 1 else jnp.zeros_like(c.labels)
      logp = logp + stratum_log_weights(self.class_sizes, covered, strata,
                                        exact[0].ids.shape[1])
    return logp


def posterior_or_fm(path, x0, eps, t, x0_mean, weights, t_min):
  """The posterior target for t ≥ t_min, FM below; with the ESS and target-shift diagnostics."""
  fm = paths.conditional_velocity(path, x0, eps, t)
  use = t >= t_min
  target = jnp.where(paths.bcast(use, fm),
                     posterior.target_from_own_endpoint(path, x0, eps, t, x0_mean), fm)
  reduce = tuple(range(1, fm.ndim))
  return target, {
      'ess': jnp.where(use, posterior.effective_sample_size(weights), 1.0),
      'target_shift': jnp.mean(jnp.square(target - fm), axis=reduce),
  }
