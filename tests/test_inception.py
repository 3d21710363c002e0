"""The FID Inception-v3 port against a PyTorch forward pass (tests/fixtures), the FID weights'
state-dict layout, and its error paths. No real weights exist here: the reference network has
random weights in the real file's names and shapes."""

import os

import numpy as np
import pytest

from pafm_jax import evaluation
from pafm_jax.evaluation import inception
from tests.fixtures import inception_reference as ref

FIXTURE = np.load(ref.OUT)


def _torch_shapes():
  return {str(n): tuple(int(s) for s in row[:d])
          for n, row, d in zip(FIXTURE['names'], FIXTURE['shapes'], FIXTURE['ndims'])}


def test_state_dict_layout_is_torchvision_fid_inception():
  torch_shapes = _torch_shapes()
  assert inception.expected_state_dict_shapes() == torch_shapes
  # Entries of pt_inception-2015-12-05: the stem, the last E_2 block, the 1008-way head.
  assert torch_shapes['Conv2d_1a_3x3.conv.weight'] == (32, 3, 3, 3)
  assert torch_shapes['Mixed_6b.branch7x7_2.conv.weight'] == (128, 128, 1, 7)
  assert torch_shapes['Mixed_7c.branch3x3dbl_3b.conv.weight'] == (384, 384, 3, 1)
  assert torch_shapes['Mixed_7c.branch_pool.conv.weight'] == (192, 2048, 1, 1)
  assert torch_shapes['fc.weight'] == (1008, 2048)
  assert len(torch_shapes) == 472 and sum(np.prod(s) for s in torch_shapes.values()) == 23_885_392


@pytest.fixture(scope='module')
def random_model():
  shapes = _torch_shapes()
  weights = ref.random_state_dict(list(shapes), list(shapes.values()))
  weights['Mixed_5b.branch1x1.bn.num_batches_tracked'] = np.array(0)   # ignored, as in torch
  return inception.load_weights(weights)


@pytest.mark.slow
def test_forward_matches_pytorch(random_model):
  """Features (pool_3) and logits equal torch's on upsampled and downsampled inputs."""
  for tag, images in zip(('small', 'large'), ref.reference_inputs()):
    x = images.astype(np.float32) / 127.5 - 1.0
    features, logits = random_model(x)
    want = FIXTURE[f'{tag}_features']
    assert want.std() > 0.05    # the reference is not degenerate
    np.testing.assert_allclose(features, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    np.testing.assert_allclose(logits, FIXTURE[f'{tag}_logits'], rtol=2e-4,
                               atol=2e-4 * np.abs(FIXTURE[f'{tag}_logits']).max())


def test_grayscale_is_repeated_to_rgb(random_model):
  gray = ref.reference_inputs()[0][:, :, :, :1].astype(np.float32) / 127.5 - 1.0
  apply = inception.make_apply(random_model)
  got, _ = apply(gray)
  want, _ = random_model(np.repeat(gray, 3, axis=-1))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_missing_or_wrong_weights_are_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match='inception_weights is empty'):
    inception.read_weights('')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    inception.read_weights(str(tmp_path / inception.WEIGHTS_NAME))
  with pytest.raises(ValueError, match='missing'):
    inception.load_weights({'fc.weight': np.zeros((1008, 2048), np.float32)})
  shapes = _torch_shapes()
  bad = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  bad['fc.bias'] = np.zeros((1000,), np.float32)
  with pytest.raises(ValueError, match='fc.bias'):
    inception.load_weights(bad)


def test_pth_goes_through_the_torch_reader_and_npz_is_read_directly(tmp_path):
  pth = tmp_path / 'w.pth'
  pth.write_bytes(b'not read by this test')
  seen = []
  got = inception.read_weights(str(pth), torch_reader=lambda p: seen.append(p) or {'a': 1})
  assert seen == [str(pth)] and got == {'a': 1}
  # The default reader is the restricted unpickler (a file torch itself wrote).
  torch_written = inception.read_weights(os.path.join(ref.HERE, 'torch_dtypes.pt'))
  expected = np.load(os.path.join(ref.HERE, 'torch_dtypes_expected.npz'))
  np.testing.assert_array_equal(torch_written['float32'], expected['float32'])
  npz = tmp_path / 'w.npz'
  np.savez(npz, **{'fc.bias': np.arange(3, dtype=np.float32)})
  np.testing.assert_array_equal(inception.read_weights(str(npz))['fc.bias'], [0, 1, 2])


def test_adm_style_reference_files(tmp_path):
  rng = np.random.default_rng(0)
  acts = rng.normal(size=(50, 6))
  mu, sigma = evaluation.gaussian_statistics(acts)
  np.savez(tmp_path / 'stats.npz', mu=mu, sigma=sigma)
  got = inception.load_reference(str(tmp_path / 'stats.npz'), None)
  np.testing.assert_array_equal(got[0], mu)
  assert got[2] is None
  np.savez(tmp_path / 'acts.npz', arr_0=acts)
  got = inception.load_reference(str(tmp_path / 'acts.npz'), None)
  np.testing.assert_allclose(got[0], mu)
  np.testing.assert_allclose(got[1], sigma)
  np.testing.assert_array_equal(got[2], acts)
  with pytest.raises(FileNotFoundError, match='reference_stats'):
    inception.load_reference(str(tmp_path / 'none.npz'), None)
