"""DINOv2 (pafm_jax/models/dinov2.py) against transformers' Dinov2Model.

Truths: tests/fixtures/dinov2_reference.npz and the two tiny checkpoints beside it, made once
by tests/fixtures/dinov2_reference.py with torch 2.13 and transformers 5.24 in a throw-away
environment (see tests/fixtures/README.md): `plain` is a Dinov2Model (2 layers, GELU MLP, a
mask token), `registers` a Dinov2WithRegistersModel (2 register tokens, SwiGLU), both with
hidden size 32, 4 heads, patch 4, image_size 16, and every parameter perturbed.
"""

import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from safetensors.numpy import load_file, save_file

from pafm_jax.models import dinov2

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
DIRS = {'plain': FIXTURES / 'dinov2_tiny', 'registers': FIXTURES / 'dinov2_registers_tiny'}
PREFIX_TOKENS = {'plain': 1, 'registers': 3}   # CLS (+ 2 registers), from the fixture configs
RESOLUTION = 16                                # the fixtures' image_size: 4×4 patches of 4 px


def relative_error(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope='module')
def reference():
  return dict(np.load(FIXTURES / 'dinov2_reference.npz'))


@pytest.fixture(scope='module')
def encoders():
  return {name: dinov2.load_dinov2(path, resolution=RESOLUTION) for name, path in DIRS.items()}


@pytest.mark.parametrize('name', ['plain', 'registers'])
def test_forward_matches_transformers(reference, encoders, name):
  """last_hidden_state within 1e-4 (relative to its largest entry) at the config's size
  (16×16: stored position embeddings), 26×21 (a 6×5 grid: bicubic upsampling, non-square,
  edge pixels dropped) and 12×12 (3×3: downsampling; antialiased for `registers`)."""
  for size, tokens in (('a', 16), ('b', 30), ('c', 9)):
    out = encoders[name].forward(reference[f'pixel_values_{size}'])
    want = reference[f'{name}_{size}']
    assert out.shape == want.shape == (2, PREFIX_TOKENS[name] + tokens, 32)
    err = relative_error(out, want)
    print(f'{name} {size}: relative error {err:.2e}')
    assert err <= 1e-4


def test_bicubic_resize_matches_torch_interpolate(reference):
  """F.interpolate(mode='bicubic', align_corners=False), with and without antialias, up
  (5×4 → 9×7) and down (23×19 → 9×7)."""
  for direction in ('up', 'down'):
    for antialias, suffix in ((False, ''), (True, '_aa')):
      out = dinov2.resize_bicubic(jnp.asarray(reference[f'resize_{direction}_in']), (9, 7),
                                  antialias)
      np.testing.assert_allclose(out, reference[f'resize_{direction}{suffix}_out'], atol=1e-5)


@pytest.mark.parametrize('name', ['plain', 'registers'])
def test_patch_features_match_repa_preprocessing(reference, encoders, name):
  """REPA's route in torch (to [0, 1], ImageNet normalisation, bicubic 21 → 16, patch tokens)
  on images in [−1, 1]; for `registers` also through the pure function of a train step."""
  images = reference['repa_images']
  want = reference[f'repa_{name}']
  assert relative_error(encoders[name].patch_features(images), want) <= 1e-4
  if name == 'plain':
    return
  frozen = dinov2.frozen_encoder(DIRS[name], RESOLUTION)
  assert dinov2.output_shape(DIRS[name], RESOLUTION) == (16, 32)
  out = jax.jit(frozen.apply)(frozen.load_params(), jnp.asarray(images))
  assert relative_error(out, want) <= 1e-4


@pytest.mark.parametrize('name', ['plain', 'registers'])
def test_patch_features_are_the_normalised_patch_tokens(encoders, name):
  """At `resolution` there is no resampling: patch_features(x) is forward((x + 1 − 2·mean) /
  (2·std)) without its first 1 (+ registers) tokens; grayscale counts as R = G = B."""
  enc = encoders[name]
  assert (enc.feature_dim, enc.num_patches) == (32, 16)
  rng = np.random.default_rng(0)
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  for channels in (3, 1):
    images = rng.uniform(-1, 1, (3, RESOLUTION, RESOLUTION, channels)).astype(np.float32)
    rgb = np.broadcast_to(images, images.shape[:3] + (3,))
    normalised = ((rgb + 1 - 2 * mean) / (2 * std)).astype(np.float32)
    tokens = np.asarray(enc.forward(normalised))
    assert tokens.shape == (3, PREFIX_TOKENS[name] + 16, 32)
    features = enc.patch_features(images)
    assert features.shape == (3, 16, 32)
    np.testing.assert_allclose(features, tokens[:, PREFIX_TOKENS[name]:], atol=1e-5)


def _copy_with(tmp_path, change) -> pathlib.Path:
  out = tmp_path / 'dinov2'
  shutil.copytree(DIRS['plain'], out)
  weights = load_file(str(out / 'model.safetensors'))
  change(weights)
  save_file(weights, str(out / 'model.safetensors'))
  return out


def test_weights_that_do_not_fit_are_refused_by_name(tmp_path):
  missing = _copy_with(tmp_path / 'a', lambda w: w.pop('encoder.layer.1.mlp.fc2.bias'))
  with pytest.raises(ValueError, match=r"missing tensors \['encoder.layer.1.mlp.fc2.bias'\]"):
    dinov2.load_dinov2(missing, resolution=RESOLUTION)
  extra = _copy_with(tmp_path / 'b', lambda w: w.update(extra=np.zeros(3, np.float32)))
  with pytest.raises(ValueError, match=r"unexpected tensors \['extra'\]"):
    dinov2.read_params(extra)
  wrong = _copy_with(tmp_path / 'c', lambda w: w.update(
      {'encoder.layer.0.attention.attention.key.weight': np.zeros((32, 31), np.float32)}))
  with pytest.raises(ValueError, match=r'attention.key.weight: \(32, 31\), expected \(32, 32\)'):
    dinov2.read_params(wrong)
  with pytest.raises(FileNotFoundError, match='config.json.*model.safetensors'):
    dinov2.load_dinov2(tmp_path / 'nowhere')
  with pytest.raises(ValueError, match='multiple of the patch size 4'):
    dinov2.load_dinov2(DIRS['plain'], resolution=18)


def test_unsupported_configs_are_refused():
  base = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
  with pytest.raises(ValueError, match="hidden_act='tanh'"):
    dinov2.Dinov2Shape.from_config({**base, 'hidden_act': 'tanh'})
  with pytest.raises(ValueError, match="model_type='vit'"):
    dinov2.Dinov2Shape.from_config({**base, 'model_type': 'vit'})
  with pytest.raises(ValueError, match='square'):
    dinov2.Dinov2Shape.from_config({**base, 'image_size': [224, 112]})


def test_transformers_in_memory_names_are_accepted(tmp_path):
  """transformers 5's conversion_mapping renames attention.attention.query → attention.q_proj
  (…key, value; attention.output.dense → attention.o_proj) and splits SwiGLU's weights_in
  into gate_proj | up_proj (Chunk(dim=0)), weights_out → down_proj."""
  def rename(weights):
    for name in list(weights):
      new = (name.replace('attention.attention.query', 'attention.q_proj')
             .replace('attention.attention.key', 'attention.k_proj')
             .replace('attention.attention.value', 'attention.v_proj')
             .replace('attention.output.dense', 'attention.o_proj')
             .replace('mlp.weights_out', 'mlp.down_proj'))
      if 'mlp.weights_in' in name:
        gate, up = np.split(weights.pop(name), 2, axis=0)
        weights[name.replace('weights_in', 'gate_proj')] = np.ascontiguousarray(gate)
        weights[name.replace('weights_in', 'up_proj')] = np.ascontiguousarray(up)
      elif new != name:
        weights[new] = weights.pop(name)

  out = tmp_path / 'renamed'
  shutil.copytree(DIRS['registers'], out)
  weights = load_file(str(out / 'model.safetensors'))
  rename(weights)
  assert 'encoder.layer.0.mlp.up_proj.weight' in weights
  save_file(weights, str(out / 'model.safetensors'))
  jax.tree.map(np.testing.assert_array_equal, dinov2.read_params(out),
               dinov2.read_params(DIRS['registers']))


def test_a_batch_of_five_on_eight_devices_equals_one_device(reference, encoders):
  assert jax.device_count() == 8   # tests/conftest.py
  one = dinov2.load_dinov2(DIRS['registers'], resolution=RESOLUTION,
                           mesh=Mesh(np.array(jax.devices()[:1]), ('batch',)))
  eight = encoders['registers']
  assert eight.mesh.size == 8 and len(eight.params['cls_token'].sharding.device_set) == 8
  x = np.concatenate([reference['pixel_values_b'], reference['pixel_values_b'][:1] * 0.5,
                      reference['pixel_values_b'] - 1.0])[:5]
  out = eight.forward(x)
  assert out.shape == (5, 33, 32)
  np.testing.assert_allclose(out, one.forward(x), atol=1e-5)
  # A jax array committed to one device (another program's output) is resharded.
  np.testing.assert_allclose(eight.forward(jax.device_put(x, jax.devices()[3])), out,
                             atol=1e-5)
  images = np.tanh(x[:, :16, :16])
  np.testing.assert_allclose(eight.patch_features(images), one.patch_features(images), atol=1e-5)
