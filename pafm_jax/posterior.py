"""The posterior over endpoints x0 given x_t, estimated by self-normalised importance sampling.

METHOD.md §3: for candidate endpoints x0_j of a noisy sample x_t,

  log w̃_j = −‖x_t − α_t·x0_j‖² / (2σ_t²) + log p(y | x0_j),   w = softmax_j(log w̃),

and the PAFM regression target is the posterior-mean velocity Σ_j w_j·v(x_t | x0_j). Because
v(x_t | x0) = a_t·x_t + b_t·x0 is affine in x0 (a = σ̇/σ, b = α̇ − σ̇·α/σ), the mixture is the
velocity of the posterior mean x̄0 = Σ_j w_j·x0_j, so only x̄0 is ever formed.

Numerics (no absolute clamps anywhere):
- The Gaussian term is evaluated as a *proximity score* α·⟨x_t, x0_j⟩ − α²·‖x0_j‖²/2, which
  differs from −‖x_t − α·x0_j‖²/2 by −‖x_t‖²/2, a constant of the row: the softmax cannot see
  it, and leaving it out avoids the cancellation of two large norms. The dot products run at
  HIGHEST precision: TPUs and GPUs would otherwise round float32 operands to bf16/TF32, which
  at D = 4096 moves the scores by more than their O(1) differences.
- The row maximum (over the candidates the condition allows) is subtracted *before* dividing by
  σ², so the largest scaled logit is exactly 0: at t → 0 the other logits go to −∞ and the
  weights become one-hot, never NaN; at t → 1 (α → 0) every score tends to 0 and the weights
  to uniform over the allowed candidates.
- σ is floored at the smallest normal float32 only so that t = 0 exactly stays finite; that
  changes nothing for σ > 1e-38.

Every function here is pure, works on arrays of any image shape [B, *S], and computes in
float32. Targets carry no gradient: the objective wraps them in stop_gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pafm_jax import paths

_HIGHEST = jax.lax.Precision.HIGHEST
_TINY = float(jnp.finfo(jnp.float32).tiny)


def _flat(x: jax.Array, batch_dims: int = 1) -> jax.Array:
  return jnp.reshape(x, x.shape[:batch_dims] + (-1,)).astype(jnp.float32)


def _coefficients(path, t: jax.Array):
  """α, σ² (floored), and the affine velocity coefficients a = σ̇/σ, b = α̇ − σ̇·α/σ.  [B] each."""
  t = jnp.asarray(t, jnp.float32)
  alpha, sigma = path.alpha(t), jnp.maximum(path.sigma(t), _TINY)
  d_alpha, d_sigma = path.d_alpha(t), path.d_sigma(t)
  a = d_sigma / sigma
  return alpha, jnp.maximum(sigma * sigma, _TINY), a, d_alpha - a * alpha


# ---------------------------------------------------------------------------------------------
# Log-likelihood scores.


def proximity_scores(x_t: jax.Array, t: jax.Array, cand_x0: jax.Array, path) -> jax.Array:
  """α·⟨x_t, x0_j⟩ − α²‖x0_j‖²/2 for per-sample candidates.  x_t [B,*S], cand_x0 [B,K,*S] → [B,K].

  Divided by σ² this is the Gaussian log-likelihood log N(x_t; α·x0_j, σ²I) up to a constant
  of the row.
  """
  alpha = jnp.asarray(path.alpha(jnp.asarray(t, jnp.float32)), jnp.float32)
  x, c = _flat(x_t), _flat(cand_x0, 2)
  dots = jnp.einsum('bd,bkd->bk', x, c, precision=_HIGHEST)
  sq = jnp.einsum('bkd,bkd->bk', c, c, precision=_HIGHEST)
  return alpha[:, None] * dots - 0.5 * jnp.square(alpha)[:, None] * sq


def in_batch_proximity_scores(x_t: jax.Array, t: jax.Array, x0: jax.Array, path) -> jax.Array:
  """The same scores with every endpoint of the batch as a candidate for every sample.

  x_t: [B, *S], x0: [N, *S] (the batch's endpoints, N = B; or any shared candidate set) →
  [B, N] (row i: sample i, column j: candidate x0_j), through one Gram matmul; the
  [B, N, *S] candidate tensor is never formed.
  """
  alpha = jnp.asarray(path.alpha(jnp.asarray(t, jnp.float32)), jnp.float32)
  x, c = _flat(x_t), _flat(x0)
  gram = jnp.matmul(x, c.T, precision=_HIGHEST)
  sq = jnp.einsum('jd,jd->j', c, c, precision=_HIGHEST)
  return alpha[:, None] * gram - 0.5 * jnp.square(alpha)[:, None] * sq[None, :]


# ---------------------------------------------------------------------------------------------
# Condition terms log p(y_i | x0_j): 0 / −inf for a class mask, real values for text.


def class_condition_logp(labels: jax.Array, cand_labels: jax.Array,
                         null_label: int) -> jax.Array:
  """0 where the candidate has the sample's class, −inf elsewhere; a null label allows all.

  labels: [B] (possibly dropped to `null_label`); cand_labels: [B, K] or [K] (shared) → [B, K].
  """
  cand_labels = jnp.broadcast_to(cand_labels, labels.shape + cand_labels.shape[-1:])
  allowed = (cand_labels == labels[:, None]) | (labels == null_label)[:, None]
  return jnp.where(allowed, 0.0, -jnp.inf)


def text_condition_logp(cond_emb: jax.Array, cand_emb: jax.Array, is_null: jax.Array,
                        tau: float) -> jax.Array:
  """CLIP-style term cos(e_i, e_j)/τ between condition embeddings; null conditions allow all.

  cond_emb: [B, E] (the sample's caption embedding); cand_emb: [B, K, E] or [K, E] (the
  candidates' own caption embeddings, or image embeddings in a joint space); is_null: [B].
  Returned as (cos − 1)/τ: the same constant 1/τ is taken from every candidate of every
  source, which the softmax cannot see, and the term stays ≤ 0, so a small τ adds no large
  number to the likelihood logits (as τ → 0 with one embedding per class the weights become
  the class mask's, without losing the likelihood's digits).
  """
  e = cond_emb / jnp.linalg.norm(cond_emb, axis=-1, keepdims=True)
  c = cand_emb / jnp.linalg.norm(cand_emb, axis=-1, keepdims=True)
  if c.ndim == 2:
    sim = jnp.matmul(e, c.T, precision=_HIGHEST)
  else:
    sim = jnp.einsum('be,bke->bk', e, c, precision=_HIGHEST)
  return jnp.where(is_null[:, None], 0.0, (sim - 1.0) / tau)


# ---------------------------------------------------------------------------------------------
# Self-normalised importance weights.


def weights_from_scores(scores: jax.Array, t: jax.Array, cond_logp: jax.Array, path, *,
                        temperature: float = 1.0) -> jax.Array:
  """softmax_j(scores_j/(τ_L·σ²) + cond_logp_j).  scores, cond_logp: [B, K] → weights [B, K].

  τ_L (`temperature`) = 1 is the exact Gaussian likelihood; > 1 flattens it. Candidates with
  cond_logp = −inf get weight exactly 0; every row needs at least one allowed candidate (the
  sample's own endpoint always is one).
  """
  _, sigma2, _, _ = _coefficients(path, t)
  scores = scores.astype(jnp.float32)
  allowed = cond_logp > -jnp.inf
  top = jnp.max(jnp.where(allowed, scores, -jnp.inf), axis=-1, keepdims=True)
  logits = (scores - top) / (temperature * sigma2[:, None])
  return jax.nn.softmax(jnp.where(allowed, logits + cond_logp, -jnp.inf), axis=-1)


def snis_weights(x_t: jax.Array, t: jax.Array, cand_x0: jax.Array, cond_logp: jax.Array, path,
                 *, temperature: float = 1.0) -> jax.Array:
  """Posterior weights of per-sample candidates.

  x_t: [B, *S]; t: [B]; cand_x0: [B, K, *S]; cond_logp: [B, K] → w: [B, K], rows sum to 1.
  """
  return weights_from_scores(proximity_scores(x_t, t, cand_x0, path), t, cond_logp, path,
                             temperature=temperature)


def effective_sample_size(weights: jax.Array) -> jax.Array:
  """ESS_i = 1 / Σ_j w_ij²: how many candidates really contribute.  [B, K] → [B]."""
  return 1.0 / jnp.sum(jnp.square(weights), axis=-1)


# ---------------------------------------------------------------------------------------------
# Mixture velocities.


def posterior_mean(weights: jax.Array, cand_x0: jax.Array) -> jax.Array:
  """x̄0 = Σ_j w_j·x0_j.  weights [B, K], cand_x0 [B, K, *S] → [B, *S]."""
  mean = jnp.einsum('bk,bkd->bd', weights, _flat(cand_x0, 2), precision=_HIGHEST)
  return mean.reshape(cand_x0.shape[:1] + cand_x0.shape[2:])


def in_batch_posterior_mean(weights: jax.Array, x0: jax.Array) -> jax.Array:
  """x̄0 with the batch (or a shared set) as candidates: one [B, N] × [N, D] matmul.

  weights [B, N], x0 [N, *S] → [B, *S].
  """
  mean = jnp.matmul(weights, _flat(x0), precision=_HIGHEST)
  return mean.reshape(weights.shape[:1] + x0.shape[1:])


def velocity_of_mean(x_t: jax.Array, t: jax.Array, x0_mean: jax.Array, path) -> jax.Array:
  """a_t·x_t + b_t·x̄0: the mixture Σ_j w_j·v(x_t | x0_j) written through its posterior mean."""
  _, _, a, b = _coefficients(path, t)
  x_t = x_t.astype(jnp.float32)
  return paths.bcast(a, x_t) * x_t + paths.bcast(b, x_t) * x0_mean


def mixture_velocity(x_t: jax.Array, t: jax.Array, cand_x0: jax.Array, weights: jax.Array,
                     path) -> jax.Array:
  """Σ_j w_j·v(x_t | x0_j).  x_t [B,*S], t [B], cand_x0 [B,K,*S], weights [B,K] → [B,*S]."""
  return velocity_of_mean(x_t, t, posterior_mean(weights, cand_x0), path)


def target_from_own_endpoint(path, x0: jax.Array, eps: jax.Array, t: jax.Array,
                             x0_mean: jax.Array) -> jax.Array:
  """The same mixture, written as the FM target plus a correction: v(x_t|x0) + b_t·(x̄0 − x0).

  Algebraically equal to `velocity_of_mean` for x_t = α·x0 + σ·ε, but it never forms the
  (1/σ)·x_t − (α/σ)·x̄0 difference of two large terms near t = 0, and when the weights are
  one-hot on the own endpoint (K = 1, or t → 0) it returns the FM target exactly.
  """
  _, _, _, b = _coefficients(path, t)
  fm = paths.conditional_velocity(path, x0.astype(jnp.float32), eps.astype(jnp.float32), t)
  return fm + paths.bcast(b, fm) * (x0_mean - x0.astype(jnp.float32))
