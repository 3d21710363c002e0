"""The text-to-image workflow on a tiny run: LiT towers, image–text PAFM, --mode=sample from
typed captions and --mode=eval's caption accuracy and alignment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fmnist_mmdit
from pafm_jax import batch_contract as fields
from pafm_jax import text, train
from pafm_jax.data import captioned, captions as captions_lib, pipeline
from pafm_jax.evaluation import classifier, runner
from pafm_jax.text import lit
from tests.test_train import apply_overrides

pytestmark = pytest.mark.slow  # trains


@pytest.fixture(scope='module')
def towers_dir(fmnist_tfds_dir, tmp_path_factory):
  config = fmnist_mmdit.get_config()
  config.data.tfds_dir = fmnist_tfds_dir
  workdir = tmp_path_factory.mktemp('lit')
  info = lit.train(config, str(workdir), epochs=1, steps_per_epoch=80)
  return str(workdir), info


def test_lit_tower_learns_the_classes_from_captions_alone(towers_dir, fmnist_tfds_dir):
  """80 steps against the frozen caption vectors give a zero-shot classifier far above chance
  (0.1) on the test split, and the saved embeddings are the tower's own."""
  workdir, info = towers_dir
  assert info['zero_shot_accuracy'] > 0.7, info
  towers = lit.load(workdir)
  assert towers.fingerprint == info['fingerprint']
  config = apply_overrides(fmnist_mmdit.get_config(), {'data.tfds_dir': fmnist_tfds_dir})
  stored = np.load(lit.lit_directory(workdir) / 'image_embeddings_test.npy')
  images, _ = classifier.load_split(config.data, 'test', 300)
  np.testing.assert_allclose(stored[:300], towers.image(images), atol=1e-5)


def test_contrastive_loss_matches_numpy():
  rng = np.random.default_rng(0)
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  img, txt = unit(rng.normal(size=(6, 5))), unit(rng.normal(size=(6, 5)))
  logits = 3.0 * img @ txt.T
  ce = lambda l: np.mean(np.log(np.exp(l).sum(1)) - np.diag(l))
  got = lit.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), jnp.log(3.0))
  np.testing.assert_allclose(float(got), 0.5 * (ce(logits) + ce(logits.T)), rtol=1e-5)


@pytest.fixture(scope='module')
def text_run(fmnist_tfds_dir, towers_dir, tmp_path_factory):
  """Two steps of MMDiT with image–text PAFM over the batch and retrieved neighbours."""
  root = tmp_path_factory.mktemp('mmdit')
  config = apply_overrides(fmnist_mmdit.get_config(), {
      'data.tfds_dir': fmnist_tfds_dir, 'data.lit_dir': towers_dir[0],
      'objective.pafm.text_candidate': 'image', 'global_batch_size': 16, 'total_steps': 2,
      'retrieval.k': 4, 'retrieval.backend': 'exact', 'data.worker_count': 0,
      'sample.num_steps': 2, 'sample.per_class': 2, 'sample.batch_size': 16,
      'checkpoint_every_steps': 2, 'eval.num_samples': 30,
      'eval.classifier_dir': str(root / 'classifier'), 'eval.memorization_max_train': 200})
  classifier.train(config, steps_per_epoch=3)
  train.train_and_evaluate(config, str(root / 'run'))
  return config, root / 'run'


def test_image_text_batches_carry_the_towers_embeddings(text_run, towers_dir):
  config, _ = text_run
  source = pipeline.load_source(config.data)
  batch = pipeline.batch_reader(source, (28, 28, 1), config.data.max_tokens)(np.arange(8))
  towers = lit.load(towers_dir[0])
  np.testing.assert_allclose(batch[fields.IMAGE_EMBEDDING], towers.image(batch['image']),
                             atol=1e-5)
  spec = fields.batch_spec(config)
  assert fields.NEIGHBOUR_IMAGE_EMBEDDING in spec and fields.IMAGE_EMBEDDING in spec


def test_sample_mode_draws_a_row_per_typed_caption(text_run):
  config, workdir = text_run
  config = apply_overrides(config.copy_and_resolve_references(), {
      'sample.captions': ('a photo of a bag', 'a sneaker seen from the side')})
  out = runner.run_sample(config, str(workdir))
  data = np.load(out['npz'])
  assert data['samples'].shape == (4, 28, 28, 1)
  assert list(data['captions']) == ['a photo of a bag', 'a sneaker seen from the side']
  assert open(out['captions']).read().splitlines()[1] == 'row 2: a sneaker seen from the side'


def test_eval_scores_the_caption_class_and_alignment(text_run, towers_dir):
  """Accuracy is against the class each caption names, and alignment is the mean cosine of
  the samples' image embeddings and their captions' vectors, recomputed here by re-encoding
  the caption strings."""
  config, workdir = text_run
  mesh, net, params, _ = runner.restore_sampling_params(config, str(workdir))
  evaluator = runner.Evaluator(config, net, mesh)
  images, labels, _, y = evaluator.generate(params, jax.random.key(3), 30, with_condition=True)
  source = pipeline.load_source(config.data, 'test')
  _, captions, _ = captioned.captions_for_labels(source, np.arange(30) % 10,
                                                 config.data.max_tokens)
  assert list(labels) == [captions_lib.class_of_caption(c) for c in captions]
  metrics = runner.compute_metrics(config, images, labels, evaluator.extractor,
                                   evaluator.reference, None, evaluator.towers, y['pooled'])
  _, _, pooled = text.encode(captions)
  towers = lit.load(towers_dir[0])
  expected = np.mean(np.sum(towers.image(images) * towers.text(pooled), -1))
  np.testing.assert_allclose(metrics['alignment'], expected, atol=1e-5)
  assert metrics['alignment_real'] == towers_dir[1]['test_alignment']
