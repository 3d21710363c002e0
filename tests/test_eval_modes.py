"""The sampling and evaluation workflows end to end on a tiny run: periodic evaluation in the
train loop, --mode=sample, --mode=eval, and the domain classifier's save/load contract."""

import json
import os

import numpy as np
import pytest

from pafm_jax import evaluation, train
from pafm_jax.evaluation import classifier, runner
from tests.test_train import tiny_config


pytestmark = pytest.mark.slow  # trains, or spawns processes


@pytest.fixture(scope='module')
def tiny_run(fmnist_tfds_dir, tmp_path_factory):
  """A quickly trained classifier and a 2-step SiT run evaluated in its loop."""
  root = tmp_path_factory.mktemp('eval')
  config = tiny_config(fmnist_tfds_dir, **{
      'total_steps': 2, 'eval.every_steps': 2, 'eval.num_samples': 40,
      'eval.classifier_dir': str(root / 'classifier'), 'eval.memorization_max_train': 500,
      'sample.batch_size': 16, 'sample.num_steps': 2, 'sample.cfg_scale': 1.0})
  info = classifier.train(config, steps_per_epoch=3)
  workdir = root / 'run'
  train.train_and_evaluate(config, str(workdir))
  return config, workdir, info


def test_periodic_eval_writes_scalars(tiny_run):
  _, workdir, _ = tiny_run
  events = [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]
  blob = b''.join((workdir / f).read_bytes() for f in events)
  for name in (b'eval/fd', b'eval/accuracy', b'eval/precision', b'eval/memorized_fraction'):
    assert name in blob


def test_classifier_save_load_and_fingerprint(tiny_run):
  config, _, info = tiny_run
  clf = classifier.load(config.eval.classifier_dir)
  assert clf.fingerprint == info['fingerprint'] and len(clf.fingerprint) == 16
  images, labels = classifier.load_split(config.data, 'test')
  assert classifier.digest(images, labels) == info['test_digest']
  feats, logits = clf.apply(images[:7])
  assert feats.shape == (7, 128) and logits.shape == (7, 10)
  # The penultimate features are what the head reads: logits = head(features).
  head = clf.params['head']
  np.testing.assert_allclose(logits, np.asarray(feats) @ head['kernel'] + head['bias'],
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(FileNotFoundError, match='train_classifier'):
    classifier.load(str(config.eval.classifier_dir) + '_missing')



def test_a_classifier_loads_from_a_relative_path(tiny_run, monkeypatch):
  """A sweep's records keep their classifier inside the repository, named relative to it."""
  config, _, info = tiny_run
  directory = os.path.abspath(config.eval.classifier_dir)
  monkeypatch.chdir(os.path.dirname(directory))
  relative = classifier.load(os.path.basename(directory))
  assert relative.fingerprint == info['fingerprint']
  np.testing.assert_array_equal(relative.params['head']['kernel'],
                                classifier.load(directory).params['head']['kernel'])


def test_sample_mode_writes_grid_and_npz(tiny_run):
  config, workdir, _ = tiny_run
  trained_with = (workdir / 'config.json').read_text()
  sampling = config.copy_and_resolve_references()
  sampling.sample.num_steps = 3
  out = runner.run_sample(sampling, str(workdir))
  # The workdir keeps recording how its run was trained, not how it was last sampled.
  assert (workdir / 'config.json').read_text() == trained_with
  assert os.path.exists(out['grid'])
  data = np.load(out['npz'])
  assert data['samples'].shape == (10 * config.sample.per_class, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(data['labels']), [config.sample.per_class] * 10)


def test_eval_mode_writes_eval_json_and_caches_reference(tiny_run, capsys):
  config, workdir, info = tiny_run
  result = runner.run_eval(config, str(workdir))
  saved = json.loads((workdir / 'eval.json').read_text())
  assert saved['metrics'] == pytest.approx(result['metrics'])
  assert saved['features']['fingerprint'] == info['fingerprint']
  assert set(saved['metrics']) == {'fd', 'accuracy', 'precision', 'recall',
                                   'memorized_fraction', 'nn_ratio_median', 'nfe'}
  assert saved['metrics']['fd'] > 0 and 0 <= saved['metrics']['accuracy'] <= 1
  assert 'Fréchet distance' in capsys.readouterr().out
  # The cached reference statistics are those of the test split's classifier features.
  ref = np.load(saved['reference'])
  images, _ = classifier.load_split(config.data, 'test')
  feats, _ = classifier.load(config.eval.classifier_dir).apply(images[:500])
  mu, _ = evaluation.gaussian_statistics(np.asarray(feats))
  assert ref['features'].shape == (10_000, 128)
  np.testing.assert_allclose(ref['features'][:500], feats, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ref['mu'], ref['features'].astype(np.float64).mean(0), rtol=1e-5,
                             atol=1e-6)
  del mu


def test_data_limited_runs_report_fd_to_their_training_subset(tiny_run):
  """With a class-balanced training subset the evaluator also scores against the subset's own
  images: the subset itself is at distance 0 from them and not from the test split."""
  from pafm_jax import sharding
  from pafm_jax.models import network
  import jax
  config, _, _ = tiny_run
  sub = config.copy_and_resolve_references()
  sub.data.subset_per_class = 20
  sub.eval.memorization = False
  mesh = sharding.create_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
  evaluator = runner.Evaluator(sub, network.build_network(sub), mesh)
  seen, labels = classifier.load_split(sub.data, 'train')
  assert len(seen) == 200 and np.all(np.bincount(labels) == 20)
  metrics = runner.compute_metrics(sub, seen, labels, evaluator.extractor, evaluator.reference,
                                   None, train_reference=evaluator.train_reference)
  assert abs(metrics['fd_train']) < 1e-3 < metrics['fd']
