"""The KL autoencoder (pafm_jax/models/autoencoder.py): its KL term, a short real training run,
save/load, batch sharding and determinism.

Truths: the Gaussian KL written independently in numpy and estimated by Monte Carlo; the
per-pixel mean image of the training images as a baseline reconstruction; the test images
themselves (MSE and latent std recomputed here); a one-device mesh for the sharded model.
"""

import os

import jax
import numpy as np
import pytest
from etils import epath
from jax.sharding import Mesh

from configs import fmnist_autoencoder
from pafm_jax.data import pipeline
from pafm_jax.evaluation import classifier as classifier_lib
from pafm_jax.models import autoencoder

TRAIN_EXAMPLES = 2000
TEST_EXAMPLES = 500


def tiny_config(tfds_dir: str):
  """The default config, narrowed and shortened to train in seconds on a subset."""
  c = fmnist_autoencoder.get_config()
  c.data.tfds_dir = tfds_dir
  a = c.autoencoder
  a.widths = (8, 16, 16)
  a.norm_groups = 4
  a.steps = 300
  a.batch_size = 16
  a.learning_rate = 4e-3
  a.train_examples = TRAIN_EXAMPLES
  a.test_examples = TEST_EXAMPLES
  a.scale_examples = 1000
  a.log_every_steps = 100
  return c


@pytest.fixture(scope='module')
def test_images(fmnist_tfds_dir):
  """The first 1 500 test images: the first 500 are the ones `train` measures, the rest are
  held out from everything the autoencoder saw or was measured on."""
  whole = pipeline.whole_split(tiny_config(fmnist_tfds_dir).data)
  images, _ = pipeline.load_arrays(whole, 'test')
  return images[:TEST_EXAMPLES + 1000]


@pytest.fixture(scope='module')
def trained(fmnist_tfds_dir, tmp_path_factory):
  """(config, directory, info) of a 300-step run through --mode=train_autoencoder's function."""
  config = tiny_config(fmnist_tfds_dir)
  directory = str(tmp_path_factory.mktemp('autoencoder'))
  info = autoencoder.run_train_autoencoder(config, directory)
  return config, directory, info


def test_kl_matches_numpy_closed_form_and_monte_carlo():
  rng = np.random.default_rng(0)
  mean = rng.normal(0, 2, size=(4, 3, 3, 2)).astype(np.float32)
  logvar = rng.uniform(-4, 2, size=mean.shape).astype(np.float32)
  got = np.asarray(autoencoder.kl_divergence(mean, logvar))
  # KL(N(μ, σ²) ‖ N(0, 1)) = −log σ + (σ² + μ²)/2 − 1/2, in float64.
  sigma = np.exp(0.5 * logvar.astype(np.float64))
  want = -np.log(sigma) + (sigma ** 2 + mean.astype(np.float64) ** 2) / 2 - 0.5
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Monte Carlo: E_q[log q(z) − log p(z)], to within 5 standard errors.
  z = mean + sigma * rng.standard_normal((50_000,) + mean.shape)
  log_ratio = -np.log(sigma) - 0.5 * ((z - mean) / sigma) ** 2 + 0.5 * z ** 2
  stderr = log_ratio.std(0) / np.sqrt(len(z))
  assert np.all(np.abs(log_ratio.mean(0) - got) < 5 * stderr + 1e-6)


def test_training_beats_the_mean_image_and_scaling_gives_unit_std(trained, test_images):
  _, directory, info = trained
  model = autoencoder.load(directory)
  measured = test_images[:TEST_EXAMPLES]
  # The per-pixel mean of the very images reconstructed: a baseline that even knows them.
  baseline = float(np.mean((measured - measured.mean(0)) ** 2))
  recon = np.clip(np.asarray(model.decode(model.encode(measured)[0])), -1, 1)
  mse = float(np.mean((recon - measured) ** 2))
  np.testing.assert_allclose(info['test_mse'], mse, rtol=1e-4)
  assert mse < 0.25 * baseline, (mse, baseline)
  assert info['test_psnr'] == pytest.approx(10 * np.log10(4 / mse), abs=1e-3)
  assert info['latent_shape'] == [7, 7, 4] and model.downsample_factor == 4
  # Unit variance on images the scaling factor never saw (test images past the measured ones).
  mean, logvar = jax.device_get(model.encode(test_images[TEST_EXAMPLES:]))
  z = mean + np.exp(0.5 * logvar) * np.random.default_rng(1).standard_normal(mean.shape)
  assert 0.9 < np.std(z * model.scaling_factor) < 1.1
  assert os.path.isfile(os.path.join(directory, 'reconstructions.png'))


def test_save_load_round_trip_missing_and_tampered(trained, test_images, tmp_path):
  _, directory, info = trained
  images = test_images[:7]
  model = autoencoder.load(directory)
  assert model.fingerprint == info['fingerprint'] and model.scaling_factor == info['scaling_factor']
  copy = epath.Path(tmp_path / 'copy')
  autoencoder.save(copy, jax.device_get(model.params), model.info)
  again = autoencoder.load(str(copy))
  for a, b in zip(model.encode(images), again.encode(images)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  latents = np.asarray(model.encode(images)[0])
  np.testing.assert_array_equal(np.asarray(model.decode(latents)),
                                np.asarray(again.decode(latents)))

  with pytest.raises(FileNotFoundError, match='--mode=train_autoencoder'):
    autoencoder.load(str(tmp_path / 'nowhere'))

  params = jax.device_get(model.params)
  kernel = params['decoder']['conv_out']['kernel']
  params['decoder']['conv_out']['kernel'] = kernel + np.float32(1e-3)
  classifier_lib.save_params(copy, params)   # new weights under the old autoencoder.json
  with pytest.raises(ValueError, match='digest'):
    autoencoder.load(str(copy))


def test_a_batch_of_five_on_eight_devices_equals_one_device(trained, test_images):
  _, directory, _ = trained
  assert jax.device_count() == 8
  sharded = autoencoder.load(directory)
  single = autoencoder.Autoencoder(jax.device_get(sharded.params), sharded.info,
                                   mesh=Mesh(np.array(jax.devices()[:1]), ('batch',)))
  images = test_images[:5]
  for a, b in zip(sharded.encode(images), single.encode(images)):
    assert a.shape == (5, 7, 7, 4)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  latents = np.asarray(single.encode(images)[0])
  out = sharded.decode(latents)
  assert out.shape == (5, 28, 28, 1)
  np.testing.assert_allclose(np.asarray(out), np.asarray(single.decode(latents)), atol=1e-5)


def test_same_config_and_seed_give_the_same_weights(trained, test_images):
  config = trained[0].copy_and_resolve_references()
  config.autoencoder.steps = 20   # the run's compiled step, 20 steps
  images = test_images[:256]
  first, _ = autoencoder.fit(config, images)
  second, _ = autoencoder.fit(config, images)
  assert classifier_lib.weights_digest(first) == classifier_lib.weights_digest(second)
  config.autoencoder.seed = 1
  other, _ = autoencoder.fit(config, images)
  assert classifier_lib.weights_digest(other) != classifier_lib.weights_digest(first)


def test_bad_settings_are_refused_with_the_field(fmnist_tfds_dir):
  config = tiny_config(fmnist_tfds_dir)
  config.autoencoder.recon_loss = 'l3'
  with pytest.raises(ValueError, match='recon_loss'):
    autoencoder.check_config(config)
  config = tiny_config(fmnist_tfds_dir)
  config.autoencoder.widths = (8, 8, 8, 8)   # downsamples by 8, which does not divide 28
  with pytest.raises(ValueError, match='widths'):
    autoencoder.check_config(config)
