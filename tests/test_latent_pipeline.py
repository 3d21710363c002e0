"""Training on a latent dataset (data.name='latents'): the pipeline's per-epoch draws against
the stored moments, their independence of the process split and of a resume, what the other
readers see, and a REPA step on latents reading the stored pixels.

Truths: the LatentSource's stored moments (the encoder's own output, tests/test_latents.py),
Fashion-MNIST's IDX bytes, the standard normal's moments, a one-process and an uninterrupted
iterator.
"""

import os

import jax
import numpy as np
import pytest

from configs import fmnist_latent_sit
from pafm_jax import batch_contract, sharding, train, train_state
from pafm_jax.data import fashion_mnist, latents, pipeline
from pafm_jax.evaluation import classifier
from pafm_jax.tools import encode_latents
from tests.test_train import apply_overrides, tiny_config

VAE_DIR = os.path.join(os.path.dirname(__file__), 'fixtures', 'vae_tiny')
PER_CLASS = 6          # 60 training images
BATCH = 20


@pytest.fixture(scope='module')
def latent_config(fmnist_tfds_dir, tmp_path_factory):
  """A 60-image Fashion-MNIST subset encoded by the tiny diffusers VAE (28×28 → 7×7×4, pixels
  stored) and configs/fmnist_latent_sit.py pointed at it."""
  root = str(tmp_path_factory.mktemp('latents') / 'fmnist')
  source = tiny_config(fmnist_tfds_dir, **{'data.subset_per_class': PER_CLASS})
  assert encode_latents.encode(root, VAE_DIR, data_config=source.data, splits=['train'],
                               store_pixels=True, num_shards=3, batch_size=BATCH)
  config = apply_overrides(fmnist_latent_sit.get_config(), {
      'data.latents_dir': root, 'data.tfds_dir': fmnist_tfds_dir, 'data.worker_count': 0,
      'global_batch_size': BATCH, 'objective.pafm.sources': 'batch',
      'objective.pafm.stratified': False, 'retrieval.mode': 'none'})
  return config


def _moments(config):
  src = latents.LatentSource(config.data.latents_dir, 'train')
  rows = src.read_batch(np.arange(len(src)))
  return src, rows, float(src.metadata['scaling_factor'])


def test_draws_are_fresh_latents_around_the_stored_moments(latent_config):
  """Over 30 epochs, (draw − s·mean)/(s·std) is standard normal, and an example's draws differ
  from epoch to epoch."""
  src, rows, scale = _moments(latent_config)
  it = pipeline.create_train_iterator(latent_config.data, local_batch_size=BATCH, seed=3)
  z, first_two = [], {}
  for _ in range(30 * len(src) // BATCH):
    b = next(it)
    assert set(b) == {'image', 'label', 'id', 'pixels'}
    for i, img in zip(b['id'], b['image']):
      z.append((img - scale * rows['mean'][i]) / (scale * rows['std'][i]))
      first_two.setdefault(int(i), []).append(img)
    np.testing.assert_array_equal(b['label'], rows['label'][b['id']])
  z = np.concatenate([a.ravel() for a in z])
  n = z.size
  assert abs(z.mean()) < 5 / np.sqrt(n) and abs(z.var() - 1) < 5 * np.sqrt(2 / n)
  assert all(not np.array_equal(v[0], v[1]) for v in first_two.values())


def test_draws_do_not_depend_on_the_process_split_or_a_resume(latent_config):
  one = pipeline.create_train_iterator(latent_config.data, local_batch_size=BATCH, seed=5)
  halves = [pipeline.create_train_iterator(latent_config.data, local_batch_size=BATCH // 2,
                                           process_index=p, process_count=2, seed=5)
            for p in range(2)]
  for _ in range(4):
    whole = next(one)
    parts = [next(h) for h in halves]
    for k in ('image', 'id', 'pixels'):
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
  state = one.get_state()
  want = [next(one)['image'] for _ in range(3)]
  resumed = pipeline.create_train_iterator(latent_config.data, local_batch_size=BATCH, seed=5)
  resumed.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(resumed)['image'], w)


def test_readers_see_the_scaled_mean_and_the_stored_pixels(latent_config):
  """Retrieval keys, candidates and evaluation read s·mean (no draw); the pixels are the
  Fashion-MNIST training images of the subset, from the IDX files."""
  src, rows, scale = _moments(latent_config)
  source = pipeline.load_source(latent_config.data)
  batch = pipeline.batch_reader(source, (7, 7, 4))(np.arange(len(src)))
  np.testing.assert_array_equal(batch['image'], rows['mean'] * np.float32(scale))
  idx_images, idx_labels = fashion_mnist.read_idx_split(fashion_mnist.DEFAULT_IDX_DIR, 'train')
  positions = pipeline.subset_positions(idx_labels, PER_CLASS, 0, 10)
  np.testing.assert_array_equal(batch['label'], idx_labels[positions])
  np.testing.assert_allclose(batch['pixels'], idx_images[positions] / 127.5 - 1.0, atol=2e-7)
  np.testing.assert_array_equal(pipeline.class_sizes(latent_config.data), [PER_CLASS] * 10)
  assert pipeline.latent_scale(pipeline.latent_metadata(latent_config.data)) == (scale, 0.0)
  wrong = apply_overrides(latent_config.copy_and_resolve_references(), {'data.channels': 3})
  with pytest.raises(ValueError, match='7×7×4 with 10 classes'):
    pipeline.load_source(wrong.data)
  with pytest.raises(ValueError, match='latents_dir'):
    pipeline.validate_data_config(apply_overrides(latent_config.copy_and_resolve_references(),
                                                  {'data.latents_dir': ''}).data)


def test_a_shifted_dataset_is_read_centred_and_decoded_back(latent_config, tmp_path):
  """SD3/FLUX-style latents record a shift: readers see s·(mean − shift), and the decoder
  undoes both, so decoding what the model sees gives the VAE's decoding of the stored mean."""
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from pafm_jax.models import vae  # pylint: disable=g-import-not-at-top
  from pafm_jax.sampling import decoding  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / 'shifted')
  shutil.copytree(latent_config.data.latents_dir, root)
  meta_path = os.path.join(root, latents.METADATA_FILE)
  meta = json.loads(open(meta_path).read())
  meta['encoder']['shift_factor'] = 0.37
  with open(meta_path, 'w') as f:
    json.dump(meta, f)
  config = apply_overrides(latent_config.copy_and_resolve_references(),
                           {'data.latents_dir': root, 'data.decoder': VAE_DIR})
  src, rows, scale = _moments(config)
  batch = pipeline.batch_reader(pipeline.load_source(config.data), (7, 7, 4))(np.arange(8))
  np.testing.assert_allclose(batch['image'],
                             (rows['mean'][:8] - np.float32(0.37)) * np.float32(scale),
                             rtol=1e-6, atol=1e-6)
  decoded = decoding.latent_decoder(config, required=True)(batch['image'])
  expected = np.clip(np.asarray(vae.load_vae(VAE_DIR).decode(rows['mean'][:8])), -1, 1)
  np.testing.assert_allclose(decoded, expected, rtol=1e-4, atol=1e-4)
  assert src.metadata['encoder']['shift_factor'] == 0.37


@pytest.mark.slow
def test_repa_step_on_latents_reads_the_stored_pixels(latent_config, tmp_path):
  """VA-REPA on latents: the classifier's features come from the pixels beside the latents,
  so the step's alignment loss is that of the pixel batch, whatever the latents are."""
  config = apply_overrides(latent_config.copy_and_resolve_references(), {
      'eval.classifier_dir': str(tmp_path / 'classifier'), 'eval.classifier_epochs': 1})
  classifier.train(_pixel(config), str(tmp_path / 'classifier'), steps_per_epoch=2)
  assert batch_contract.PIXELS in batch_contract.batch_spec(config)
  mesh = sharding.create_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
  setup = train_state.TrainSetup.create(config, mesh)
  assert setup.repa_encoder.name == 'classifier'
  state = setup.init()
  it = pipeline.create_train_iterator(config.data, local_batch_size=BATCH, seed=0)
  step = train.compile_step(setup)
  local = next(it)
  feats = setup.repa_encoder.apply(state['repa_encoder'], local['pixels'])
  assert feats.shape == (BATCH, 49, 64)
  _, metrics = step(state, train.to_global_batch(local, setup.batch_spec, mesh))
  assert np.isfinite(float(metrics['loss'])) and -1 <= float(metrics['alignment_loss']) <= 1


def _pixel(config):
  return pipeline.pixel_space_config(config)


def test_retrieved_own_item_is_this_epochs_draw(latent_config, tmp_path):
  """Noisy retrieval on latents: the index holds s·mean, but a row's own item among its
  neighbours is replaced by the drawn latent it trains on (its stored mean would sit std·ε
  away and blow the target up at small t); every other neighbour is its s·mean."""
  from pafm_jax.retrieval import stage
  config = apply_overrides(latent_config.copy_and_resolve_references(), {
      'objective.pafm.sources': 'batch+retrieved', 'objective.pafm.stratified': True,
      'retrieval.mode': 'noisy', 'retrieval.backend': 'exact', 'retrieval.k': 4,
      'retrieval.index_dir': str(tmp_path / 'index')})
  factory, _ = stage.stage_factory(config, str(tmp_path))
  it = pipeline.create_train_iterator(config.data, local_batch_size=BATCH, seed=1,
                                      extra_stage=factory)
  src, rows, scale = _moments(config)
  own_seen = 0
  for _ in range(3):
    b = next(it)
    for r in range(BATCH):
      for j, n in enumerate(b['neighbour_ids'][r]):
        if n == b['id'][r]:
          own_seen += 1
          np.testing.assert_array_equal(b['neighbours'][r, j], b['image'][r])
        else:
          np.testing.assert_array_equal(b['neighbours'][r, j], rows['mean'][n] * np.float32(scale))
  assert own_seen > BATCH   # at small t the own item is nearly always retrieved
