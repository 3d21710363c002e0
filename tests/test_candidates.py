"""Candidate sources, condition terms and the combiner; the batch contract; one identity.

Truths: brute-force float64 numpy posteriors (tests.test_posterior), the dataset position of
each record, the fields a real Grain pipeline delivers, and exact identities (a source that
adds nothing new changes nothing; FM is the own endpoint alone).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fmnist_sit
from pafm_jax import batch_contract, candidates, objectives, paths
from pafm_jax.data import pipeline
from tests.test_posterior import NULL, _np_marginal_velocity, _rel_err
from tests.test_train import apply_overrides

f32 = lambda a: jnp.asarray(a, jnp.float32)


def _noisy_rows(rng, b=12, k=5, d=10, e=6, t_range=(0.5, 0.95)):
  x0 = rng.normal(size=(b, d))
  eps = rng.normal(size=(b, d))
  t = rng.uniform(*t_range, size=b)
  x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
  nbrs = x0[:, None, :] + 0.3 * rng.normal(size=(b, k, d))
  return x0, eps, t, x_t, nbrs, rng.normal(size=(b, e)), rng.normal(size=(b, k, e))


def test_text_condition_gives_the_own_endpoint_cos_e_e_over_tau():
  """Retrieved-only text PAFM: the own endpoint's condition term is cos(e_i, e_i)/τ = 1/τ, the
  neighbours' cos(e_i, e_j)/τ of their own captions; a null row allows all with 0."""
  rng = np.random.default_rng(0)
  x0, eps, t, x_t, nbrs, emb, nbr_emb = _noisy_rows(rng)
  b, k = nbrs.shape[:2]
  tau = 0.5
  labels = np.where(np.arange(b) % 4 == 0, NULL, 0)   # every fourth row dropped to null
  batch = {'label': jnp.zeros(b, jnp.int32), 'id': jnp.arange(b, dtype=jnp.int32),
           'neighbours': f32(nbrs), 'neighbour_labels': jnp.zeros((b, k), jnp.int32),
           'neighbour_ids': jnp.asarray(100 + np.arange(b * k).reshape(b, k), jnp.int32),
           'cond_embedding': f32(emb), 'neighbour_cond_embedding': f32(nbr_emb)}
  options = objectives.PAFMOptions('retrieved', condition='text', text_tau=tau)
  path = paths.get_path('linear')
  target, _ = objectives.pafm_target(path, f32(x_t), f32(t), f32(x0), f32(eps),
                                     jnp.asarray(labels, jnp.int32), batch, options=options,
                                     null_label=NULL)
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  cos = np.einsum('be,bke->bk', unit(emb), unit(nbr_emb))
  log_prior = np.concatenate([np.full((b, 1), 1.0 / tau), cos / tau], axis=1)
  log_prior[labels == NULL] = 0.0
  cands = np.concatenate([x0[:, None], nbrs], axis=1)
  truth, _ = _np_marginal_velocity(path, x_t, t, cands, log_prior)
  assert _rel_err(target, truth) < 1e-5


def test_image_text_term_reads_the_candidates_image_embeddings():
  """The condition term is a pluggable piece: TextSimilarity over another candidate field
  (image embeddings in a joint space) scores those, not the captions."""
  rng = np.random.default_rng(1)
  x0, eps, t, x_t, _, emb, _ = _noisy_rows(rng)
  b = x0.shape[0]
  image_emb = rng.normal(size=(b, emb.shape[1]))

  class BatchWithImageEmbeddings(candidates.GlobalBatch):
    def candidates(self, rows):
      return dataclasses.replace(super().candidates(rows),
                                 embeddings={'image_embedding': rows.batch['image_embedding']})

  estimator = candidates.Estimator((BatchWithImageEmbeddings(),),
                                   candidates.TextSimilarity(0.2, 'image_embedding'))
  batch = {'label': jnp.zeros(b, jnp.int32), 'cond_embedding': f32(emb),
           'image_embedding': f32(image_emb)}
  path = paths.get_path('cosine')
  alpha, sigma = np.cos(np.pi * t / 2), np.sin(np.pi * t / 2)
  x_t = alpha[:, None] * x0 + sigma[:, None] * eps
  target, _ = estimator(path, f32(x_t), f32(t), f32(x0), f32(eps), jnp.zeros(b, jnp.int32),
                        batch, null_label=NULL)
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  truth, _ = _np_marginal_velocity(path, x_t, t, x0, unit(emb) @ unit(image_emb).T / 0.2)
  assert _rel_err(target, truth) < 1e-5


def test_a_bank_source_beside_the_batch_is_one_softmax_over_both():
  """Sources compose: the global batch plus a bank row (validity masked) is the SNIS mean over
  the union, with the class mask applied to the batch and not to the (conditioned) bank."""
  rng = np.random.default_rng(2)
  b, m, d = 10, 4, 8
  x0 = rng.normal(size=(b, d))
  eps = rng.normal(size=(b, d))
  t = rng.uniform(0.3, 0.9, size=b)
  x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
  labels = rng.integers(0, 3, size=b)
  bank = rng.normal(size=(b, m, d))
  valid = np.arange(m)[None, :] < rng.integers(1, m + 1, size=(b, 1))
  estimator = candidates.Estimator((candidates.GlobalBatch(), candidates.Bank()),
                                   candidates.ClassMask())
  batch = {'label': jnp.asarray(labels, jnp.int32), 'bank_candidates': f32(bank),
           'bank_valid': jnp.asarray(valid)}
  path = paths.get_path('linear')
  target, diag = estimator(path, f32(x_t), f32(t), f32(x0), f32(eps),
                           jnp.asarray(labels, jnp.int32), batch, null_label=NULL)
  cands = np.concatenate([np.broadcast_to(x0, (b, b, d)), bank], axis=1)
  log_prior = np.concatenate([np.where(labels[None, :] == labels[:, None], 0.0, -np.inf),
                              np.where(valid, 0.0, -np.inf)], axis=1)
  truth, w = _np_marginal_velocity(path, x_t, t, cands, log_prior)
  assert _rel_err(target, truth) < 1e-5
  np.testing.assert_allclose(diag['ess'], 1 / np.sum(w ** 2, axis=1), rtol=1e-4)


def test_fm_is_the_own_endpoint_alone():
  rng = np.random.default_rng(3)
  x0, eps, t, x_t, *_ = _noisy_rows(rng)
  path = paths.get_path('linear')
  target, diag = objectives.fm_target(path, f32(x_t), f32(t), f32(x0), f32(eps), None, {})
  np.testing.assert_array_equal(
      target, paths.conditional_velocity(path, f32(x0), f32(eps), f32(t)))
  assert diag == {}


# ----------------------------------------------------------------------- batch contract


def _retrieval_config(tfds_dir, **overrides):
  c = fmnist_sit.get_config()
  c.data.tfds_dir = tfds_dir
  c.global_batch_size = 8
  c.retrieval.backend = 'exact'
  c.retrieval.k = 3
  c.data.worker_count = 0
  return apply_overrides(c, overrides)


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['none', 'noisy'])
def test_the_pipeline_delivers_exactly_the_contract(fmnist_tfds_dir, tmp_path, mode):
  """A real pipeline (with the retrieval stage in noisy mode) yields every field of
  batch_spec, in its shape and a dtype that casts to the declared one without loss."""
  from pafm_jax.retrieval import stage  # pylint: disable=g-import-not-at-top
  overrides = {'retrieval.mode': mode}
  if mode == 'none':
    overrides.update({'objective.pafm.sources': 'batch', 'objective.pafm.stratified': False})
  config = _retrieval_config(fmnist_tfds_dir, **overrides)
  factory, _ = stage.stage_factory(config, str(tmp_path))
  it = pipeline.create_train_iterator(config.data, local_batch_size=8, seed=0,
                                      extra_stage=factory)
  batch = next(it)
  spec = batch_contract.batch_spec(config)
  assert set(batch) == set(spec), (sorted(batch), sorted(spec))
  for name, (shape, dtype) in spec.items():
    assert batch[name].shape == shape, name
    assert np.can_cast(batch[name].dtype, dtype, 'same_kind'), (name, batch[name].dtype)
    producer = batch_contract.FIELDS[name].producer
    assert producer in batch_contract.active_producers(config)
  assert batch_contract.pipeline_draws_noise(config) == (mode == 'noisy')


def test_a_batch_without_a_promised_field_names_its_producer():
  config = fmnist_sit.get_config()   # noisy retrieval: t and ε come from the pipeline
  spec = batch_contract.batch_spec(config)
  local = {k: np.zeros(shape, dtype) for k, (shape, dtype) in spec.items() if k != 'eps'}
  from pafm_jax import sharding, train  # pylint: disable=g-import-not-at-top
  mesh = sharding.create_mesh({'data': -1, 'fsdp': 1})
  with pytest.raises(KeyError, match="'eps'.*producer 'noise'"):
    train.to_global_batch(local, spec, mesh)


def test_a_row_is_identified_by_its_position_in_the_source():
  """Records may carry their own 'id' feature; the pipeline (like the index) uses positions."""
  source = [{'image': np.full((2, 2, 1), i, np.uint8), 'label': i % 2, 'id': 1000 - i}
            for i in range(6)]
  read = pipeline.batch_reader(source, (2, 2, 1))
  batch = read(np.array([4, 1, 5]))
  np.testing.assert_array_equal(batch['id'], [4, 1, 5])
  np.testing.assert_array_equal(batch['label'], [0, 1, 1])


def test_velocity_loss_takes_t_and_eps_from_the_batch_only_when_told():
  """The pipeline's noise is used exactly when the config says the pipeline draws it."""
  rng = np.random.default_rng(4)
  x0 = f32(rng.normal(size=(4, 2, 2, 1)))
  batch = {'image': x0, 'label': jnp.zeros(4, jnp.int32), 't': jnp.full((4,), 0.25),
           'eps': jnp.zeros_like(x0)}
  path = paths.get_path('linear')
  seen = {}

  def apply_fn(params, x_t, t, y):
    seen['x_t'], seen['t'] = x_t, t
    return jnp.zeros_like(x_t)

  kwargs = dict(path=path, target_fn=objectives.fm_target, t_sampling='uniform',
                label_drop=0.0, null_label=NULL)
  objectives.velocity_loss(apply_fn, None, batch, jax.random.key(0), noise_from_batch=True,
                           **kwargs)
  np.testing.assert_array_equal(seen['t'], 0.25)
  np.testing.assert_allclose(seen['x_t'], 0.75 * np.asarray(x0), rtol=1e-6)
  objectives.velocity_loss(apply_fn, None, batch, jax.random.key(0), noise_from_batch=False,
                           **kwargs)
  assert not np.allclose(seen['t'], 0.25)
  with pytest.raises(KeyError, match="'t'"):
    objectives.velocity_loss(apply_fn, None, {'image': x0, 'label': batch['label']},
                             jax.random.key(0), noise_from_batch=True, **kwargs)
