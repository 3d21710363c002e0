"""Text-conditional PAFM: the CLIP-style condition term, captioned data and the text network.

Truths: the class mask (the τ → 0 limit of the text term with one embedding per class), a
float64 numpy brute force of the posterior mean, the encoder's own output for the stored
captions, and the one-device step for the sharded MMDiT step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fmnist_mmdit
from pafm_jax import batch_contract as fields
from pafm_jax import candidates, objectives, paths, text
from pafm_jax.data import captioned, captions as captions_lib, pipeline
from pafm_jax.models import network
from pafm_jax.sampling import guidance
from tests.test_train import apply_overrides, assert_sharded_step_matches_single_device

NULL = 4
f32 = lambda a: jnp.asarray(a, jnp.float32)


def _brute_force(path, x_t, t, cand, log_prior):
  """float64: Σ_j softmax_j(−‖x_t − α·c_j‖²/(2σ²) + log_prior_j)·v(x_t | c_j); cand [K, D]."""
  alpha, sigma = np.asarray(path.alpha(t), np.float64), np.asarray(path.sigma(t), np.float64)
  d_alpha, d_sigma = np.asarray(path.d_alpha(t), np.float64), np.asarray(path.d_sigma(t))
  logits = -np.sum((x_t[:, None] - alpha[:, None, None] * cand[None]) ** 2, -1) / (
      2 * sigma[:, None] ** 2) + log_prior
  w = np.exp(logits - logits.max(1, keepdims=True))
  w /= w.sum(1, keepdims=True)
  a = d_sigma / sigma
  return a[:, None] * x_t + (d_alpha - a * alpha)[:, None] * (w @ cand)


def _classes(rng, n_per_class=6, classes=4, d=12, e=8, spread=0.0):
  labels = np.repeat(np.arange(classes), n_per_class)
  directions = rng.normal(size=(classes, e))
  emb = directions[labels] + spread * rng.normal(size=(len(labels), e))
  x0 = rng.normal(size=(len(labels), d)) * 0.7
  return labels, emb, x0


def test_text_term_at_small_tau_with_one_embedding_per_class_is_the_class_mask():
  """Identical caption embeddings within a class and τ → 0: the text-PAFM target is the
  class-masked one (for conditioned rows; dropped rows allow every candidate in both)."""
  rng = np.random.default_rng(0)
  labels, emb, x0 = _classes(rng)
  b = len(labels)
  eps = rng.normal(size=x0.shape)
  t = rng.uniform(0.2, 0.98, size=b)
  path = paths.get_path('linear')
  x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
  conds = np.where(rng.uniform(size=b) < 0.25, NULL, labels)
  batch = {'label': jnp.asarray(labels, jnp.int32), 'id': jnp.arange(b),
           fields.COND_EMBEDDING: f32(emb)}
  args = (path, f32(x_t), f32(t), f32(x0), f32(eps), jnp.asarray(conds, jnp.int32), batch)
  masked, _ = candidates.Estimator((candidates.GlobalBatch(),), candidates.ClassMask())(
      *args, null_label=NULL)
  for tau in (1e-3, 1e-5):
    text_target, _ = candidates.Estimator((candidates.GlobalBatch(),),
                                          candidates.TextSimilarity(tau))(*args, null_label=NULL)
    np.testing.assert_allclose(np.asarray(text_target), np.asarray(masked), rtol=0, atol=1e-6)
  # A large τ is not the mask: the test can tell them apart.
  loose, _ = candidates.Estimator((candidates.GlobalBatch(),), candidates.TextSimilarity(10.0))(
      *args, null_label=NULL)
  assert np.max(np.abs(np.asarray(loose) - np.asarray(masked))) > 1e-2


def test_text_pafm_target_over_a_whole_captioned_class_matches_float64_brute_force():
  """Candidates: every item of one class, each with its own caption embedding; the target is
  Σ_j softmax(−‖x_t − α·x0_j‖²/2σ² + cos(e_i, e_j)/τ)·v(x_t | x0_j), computed in float64."""
  rng = np.random.default_rng(1)
  labels, emb, x0 = _classes(rng, n_per_class=24, classes=3, spread=0.6)
  members = np.flatnonzero(labels == 1)
  x0, emb = x0[members], emb[members]
  b, tau = len(members), 0.1
  eps = rng.normal(size=x0.shape)
  t = np.linspace(0.05, 0.97, b)
  path = paths.get_path('linear')
  x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
  batch = {'label': jnp.ones(b, jnp.int32), fields.COND_EMBEDDING: f32(emb)}
  options = objectives.PAFMOptions(sources='batch', condition='text', text_tau=tau)
  target, _ = objectives.pafm_target(path, f32(x_t), f32(t), f32(x0), f32(eps),
                                     jnp.ones(b, jnp.int32), batch, options=options,
                                     null_label=NULL)
  unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  truth = _brute_force(path, x_t, t, x0, unit @ unit.T / tau)
  err = np.linalg.norm(np.asarray(target, np.float64) - truth) / np.linalg.norm(truth)
  assert err < 1e-5, err


def test_stratified_text_pafm_with_one_stratum_is_exact_when_the_batch_is_the_dataset():
  """Text retrieval has one partition, so the stratified combination has one stratum: with
  the whole dataset in the batch, the in-batch items outside S stand for exactly themselves
  and the estimate is the exact text posterior over the dataset (float64 brute force)."""
  rng = np.random.default_rng(2)
  labels, emb, x0 = _classes(rng, n_per_class=8, classes=3, spread=0.5)
  n, k, tau = len(labels), 5, 0.2
  eps = rng.normal(size=x0.shape)
  t = rng.uniform(0.3, 0.95, size=n)
  path = paths.get_path('linear')
  x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
  # S: each row's k nearest items to x_t/α_t (any choice that excludes nothing is exact).
  query = x_t / (1 - t)[:, None]
  nbr = np.argsort(np.sum((query[:, None] - x0[None]) ** 2, -1), axis=1)[:, :k]
  batch = {'label': jnp.asarray(labels, jnp.int32), 'id': jnp.arange(n),
           fields.COND_EMBEDDING: f32(emb), fields.NEIGHBOURS: f32(x0[nbr]),
           fields.NEIGHBOUR_LABELS: jnp.asarray(labels[nbr], jnp.int32),
           fields.NEIGHBOUR_IDS: jnp.asarray(nbr, jnp.int32),
           fields.NEIGHBOUR_COND_EMBEDDING: f32(emb[nbr])}
  config = fmnist_mmdit.get_config()
  config.objective.pafm.text_tau = tau
  estimator = objectives._pafm_target(config, class_sizes=np.bincount(labels))
  conds = jnp.asarray(labels, jnp.int32)
  target, _ = estimator(path, f32(x_t), f32(t), f32(x0), f32(eps), conds, batch)
  unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  truth = _brute_force(path, x_t, t, x0, unit @ unit.T / tau)
  err = np.linalg.norm(np.asarray(target, np.float64) - truth) / np.linalg.norm(truth)
  assert err < 1e-5, err


def test_text_condition_needs_captioned_data():
  config = fmnist_mmdit.get_config()
  config.data.name = 'fashion_mnist'
  config.model.name = 'SiT-T/4'
  with pytest.raises(ValueError, match='captioned data'):
    objectives.check_config(config)
  with pytest.raises(ValueError, match='text-conditional'):
    network.check_config(apply_overrides(fmnist_mmdit.get_config(),
                                         {'data.name': 'fashion_mnist'}))
  with pytest.raises(ValueError, match='memory bank'):
    objectives.check_config(apply_overrides(fmnist_mmdit.get_config(),
                                            {'objective.name': 'stablevm'}))
  with pytest.raises(ValueError, match='never sees'):
    network.check_config(apply_overrides(fmnist_mmdit.get_config(),
                                         {'model.name': 'SiT-T/4'}))
  with pytest.raises(ValueError, match='ignores the captions'):
    network.check_config(apply_overrides(fmnist_mmdit.get_config(), {
        'objective.pafm.condition': 'class', 'data.num_classes': 1}))
  with pytest.raises(ValueError, match='lit_dir'):
    objectives.check_config(apply_overrides(fmnist_mmdit.get_config(),
                                            {'objective.pafm.text_candidate': 'image'}))


# ------------------------------------------------------------------------ captioned data


def _captions_config(tfds_dir):
  config = fmnist_mmdit.get_config()
  config.data.tfds_dir = tfds_dir
  return config


@pytest.mark.slow  # builds captioned Fashion-MNIST (encodes 2 000 captions)
def test_captioned_fashion_mnist_stores_the_encoders_output(fmnist_tfds_dir):
  """Stored token states and sentence vectors are the encoder's own for each example's
  caption, the caption names the example's class, and row 0 is the empty caption."""
  config = _captions_config(fmnist_tfds_dir)
  source = pipeline.load_source(config.data)
  ids = np.array([0, 7, 12345, 59999])
  batch = pipeline.batch_reader(source, (28, 28, 1), config.data.max_tokens)(ids)
  table = source.captions()
  strings = [table[i] for i in np.asarray(source.arrays()['caption_ids'])[ids]]
  assert strings == [captions_lib.caption_for(int(y), int(i), 0)
                     for i, y in zip(ids, batch['label'])]
  assert [captions_lib.class_of_caption(s) for s in strings] == list(batch['label'])
  tokens, mask, pooled = text.encode(strings)
  np.testing.assert_allclose(batch[fields.COND_EMBEDDING], pooled, atol=1e-5)
  np.testing.assert_array_equal(batch[fields.TEXT_MASK][:, :mask.shape[1]], mask)
  assert not batch[fields.TEXT_MASK][:, mask.shape[1]:].any()
  np.testing.assert_allclose(batch[fields.TEXT_TOKENS][:, :tokens.shape[1]],
                             tokens * mask[..., None], atol=1e-4)
  assert table[captioned.NULL_CAPTION_ROW] == ''
  spec = fields.batch_spec(config)
  for name in (fields.TEXT_TOKENS, fields.TEXT_MASK, fields.COND_EMBEDDING):
    assert batch[name].shape[1:] == spec[name][0][1:], name
  # Images are Fashion-MNIST's, in order.
  images, labels = pipeline.load_arrays(apply_overrides(config.copy_and_resolve_references(),
                                                        {'data.name': 'fashion_mnist'}).data)
  np.testing.assert_array_equal(batch['image'], images[ids])
  np.testing.assert_array_equal(batch['label'], labels[ids])


@pytest.mark.slow  # builds captioned Fashion-MNIST (encodes 2 000 captions)
def test_text_network_drops_captions_to_the_empty_caption(fmnist_tfds_dir):
  """Network.condition gives dropped rows the empty caption's encoding (what the encoder
  makes of ""), and guidance's null condition is that same row for every sample."""
  config = _captions_config(fmnist_tfds_dir)
  net = network.build_network(config)
  source = pipeline.load_source(config.data)
  batch = pipeline.batch_reader(source, (28, 28, 1), config.data.max_tokens)(np.arange(6))
  labels = np.asarray(batch['label']).copy()
  labels[[1, 4]] = net.null_label
  y = net.condition({k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(labels))
  tokens, mask, pooled = text.encode([''])
  for row in range(6):
    if row in (1, 4):
      np.testing.assert_allclose(y['pooled'][row], pooled[0], atol=1e-5)
      np.testing.assert_allclose(y['tokens'][row, :mask.shape[1]], tokens[0], atol=1e-4)
      assert int(y['mask'][row].sum()) == int(mask.sum())
    else:
      np.testing.assert_array_equal(y['pooled'][row], batch[fields.COND_EMBEDDING][row])
  null = guidance.null_like(y, net.null_condition)
  np.testing.assert_array_equal(null['pooled'], np.broadcast_to(y['pooled'][1], (6, 384)))


@pytest.mark.slow
def test_mmdit_sharded_step_matches_single_device(fmnist_tfds_dir):
  """(data=2, fsdp=4) on 8 devices gives the one-device MMDiT step's losses and params, with
  text PAFM over the global batch (caption embeddings gathered from every shard)."""
  config = apply_overrides(_captions_config(fmnist_tfds_dir), {
      'global_batch_size': 16, 'mesh.fsdp': 4, 'objective.pafm.sources': 'batch',
      'objective.pafm.stratified': False, 'retrieval.mode': 'none', 'data.worker_count': 0,
      'data.max_tokens': 16})
  _, s8 = assert_sharded_step_matches_single_device(config)
  qkv = s8['params']['blocks'][0]['context_in']['qkv']['kernel']   # [128, 384], FSDP on 128
  assert {s.data.shape for s in qkv.addressable_shards} == {(32, 384)}


def test_mmdit_xl2_config_builds_abstractly_with_shardings():
  """configs/mmdit_xl2.py: 1.33 B parameters (two SiT-XL/2-sized streams), built with
  eval_shape, every leaf of the train state sharded by the configs' logical-axis rules."""
  from configs import mmdit_xl2
  from pafm_jax import sharding, train_state
  config = mmdit_xl2.get_config()
  net = network.build_network(config)
  n = network.count_params(net.abstract_params)
  assert abs(n - 1_327_958_800) / n < 1e-6, n
  tx = train_state.make_optimizer(config.optimizer)
  abstract = jax.eval_shape(
      lambda r: train_state.init_state(r, make_model=network.model_factory(config), tx=tx),
      jax.random.key(0))
  mesh = sharding.create_mesh({'data': 2, 'fsdp': 4})
  sh = train_state.state_shardings(abstract, net, tx, mesh, config.logical_axis_rules)
  assert jax.tree.structure(sh) == jax.tree.structure(abstract)
  spec = fields.batch_spec(config)
  assert spec[fields.TEXT_TOKENS][0] == (256, 77, 384)
  assert spec[fields.NEIGHBOUR_COND_EMBEDDING][0] == (256, 16, 384)


def test_image_text_term_over_the_batch_matches_float64_brute_force():
  """text_candidate='image': the candidates' LiT image embeddings (not their captions) enter
  cos(e(y_i), g(x0_j))/τ; dropped rows allow every candidate."""
  rng = np.random.default_rng(4)
  labels, emb, x0 = _classes(rng, n_per_class=10, classes=3, spread=0.5)
  b, tau = len(labels), 0.2
  image_emb = emb + 0.7 * rng.normal(size=emb.shape)
  eps = rng.normal(size=x0.shape)
  t = rng.uniform(0.2, 0.95, size=b)
  path = paths.get_path('linear')
  x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
  conds = np.where(np.arange(b) % 7 == 0, NULL, labels)
  batch = {'label': jnp.asarray(labels, jnp.int32), fields.COND_EMBEDDING: f32(emb),
           fields.IMAGE_EMBEDDING: f32(image_emb)}
  options = objectives.PAFMOptions(sources='batch', condition='text', text_tau=tau,
                                   text_candidate='image')
  target, _ = objectives.pafm_target(path, f32(x_t), f32(t), f32(x0), f32(eps),
                                     jnp.asarray(conds, jnp.int32), batch, options=options,
                                     null_label=NULL)
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  term = np.where((conds == NULL)[:, None], 0.0, unit(emb) @ unit(image_emb).T / tau)
  truth = _brute_force(path, x_t, t, x0, term)
  err = np.linalg.norm(np.asarray(target, np.float64) - truth) / np.linalg.norm(truth)
  assert err < 1e-5, err
