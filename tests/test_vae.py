"""SD's VAE (pafm_jax/models/vae.py) against diffusers' AutoencoderKL.

Truths: tests/fixtures/vae_reference.npz and the three tiny checkpoints beside it, made once by
tests/fixtures/vae_reference.py with torch 2.13 and diffusers 0.42.1 in a throw-away
environment (see tests/fixtures/README.md), every parameter perturbed:

  tiny         3 blocks (4, 8, 8), 2 resnets per block, quant convs, mid-block attention;
               config.json + diffusion_pytorch_model.safetensors as save_pretrained writes them
  tiny_legacy  2 blocks (8, 8), 1 channel in and out, 3 latent channels, no quant_conv,
               scaling_factor 0.5; a torch diffusion_pytorch_model.bin with the pre-0.14
               attention names (query, key, value, proj_attn)
  tiny_noattn  2 blocks (4, 4), mid_block_add_attention=False, no post_quant_conv

and, for the sharded runs, the same model run one image at a time on one device.
"""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from safetensors.numpy import load_file, save_file

from pafm_jax import torch_io
from pafm_jax.models import vae

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
NAMES = ('tiny', 'tiny_legacy', 'tiny_noattn')
WEIGHTS = 'diffusion_pytorch_model.safetensors'


def relative_error(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope='module')
def reference():
  return dict(np.load(FIXTURES / 'vae_reference.npz'))


@pytest.fixture(scope='module')
def models():
  return {name: vae.load_vae(FIXTURES / f'vae_{name}') for name in NAMES}


@pytest.mark.parametrize('name', NAMES)
def test_encode_and_decode_match_diffusers(reference, models, name):
  """latent_dist.mean, latent_dist.logvar and decode(z).sample within 1e-4 of diffusers'
  (relative to the largest entry), on odd and non-square image sizes."""
  model = models[name]
  mean, logvar = model.encode(reference[f'{name}_images'])
  decoded = model.decode(reference[f'{name}_latents'])
  for key, out in (('mean', mean), ('logvar', logvar), ('decoded', decoded)):
    want = reference[f'{name}_{key}']
    assert out.shape == want.shape and out.dtype == jnp.float32, (key, out.shape, want.shape)
    err = relative_error(out, want)
    print(f'{name} {key}: relative error {err:.2e}')
    assert err <= 1e-4, (key, err)


def test_config_attributes_and_shapes(reference, models):
  """scaling_factor and the latent geometry come from config.json (0.18215 for the SD default,
  0.5 where the config says so); output shapes are diffusers' (floor division on odd sizes,
  checked against the fixture in the parity test)."""
  expected = {'tiny': (0.18215, 4, 4), 'tiny_legacy': (0.5, 3, 2), 'tiny_noattn': (0.18215, 2, 2)}
  for name, (scaling, channels, factor) in expected.items():
    model = models[name]
    assert (model.scaling_factor, model.latent_channels, model.downsample_factor) == (
        pytest.approx(scaling), channels, factor)
    config = json.loads((FIXTURES / f'vae_{name}' / 'config.json').read_text())
    assert model.scaling_factor == config['scaling_factor']
  # diffusers: 11×13 pixels → 5×6 latents at f = 2 (each stride-2 conv floors), 3×5 latents →
  # 12×20 pixels at f = 4.
  assert reference['tiny_legacy_images'].shape[1:3] == (11, 13)
  assert reference['tiny_legacy_mean'].shape == (2, 5, 6, 3)
  assert models['tiny'].decode(np.zeros((1, 3, 5, 4), np.float32)).shape == (1, 12, 20, 3)
  with pytest.raises(ValueError, match=r'NHWC \[B, H, W, 3\]'):
    models['tiny'].encode(np.zeros((1, 3, 16, 16), np.float32))   # NCHW by mistake


def test_batch_sharded_over_eight_devices_equals_one_image_at_a_time(models):
  """5 images (and 5 latents) on the 8-device mesh, padded to 8 and the padding dropped, equal
  each one run alone on a 1-device mesh; the latents go in as a jax array."""
  assert len(jax.devices()) == 8
  rng = np.random.default_rng(0)
  # The parity test's sizes, so that the 8-device programs are compiled once for both.
  images = rng.uniform(-1, 1, (5, 16, 24, 3)).astype(np.float32)
  latents = jnp.asarray(rng.normal(size=(5, 3, 5, 4)).astype(np.float32))
  sharded = models['tiny']
  assert sharded.mesh.size == 8
  mean, logvar = sharded.encode(images)
  decoded = sharded.decode(latents)
  assert mean.shape == logvar.shape == (5, 4, 6, 4) and decoded.shape == (5, 12, 20, 3)
  single = vae.load_vae(FIXTURES / 'vae_tiny', mesh=Mesh(np.array(jax.devices()[:1]), ('b',)))
  alone = [single.encode(images[i:i + 1]) for i in range(5)]
  np.testing.assert_allclose(mean, np.concatenate([m for m, _ in alone]), atol=1e-5)
  np.testing.assert_allclose(logvar, np.concatenate([v for _, v in alone]), atol=1e-5)
  want = np.concatenate([single.decode(latents[i:i + 1]) for i in range(5)])
  np.testing.assert_allclose(decoded, want, atol=1e-5)


def test_bfloat16_compute_stays_close(reference):
  vae_bf16 = vae.load_vae(FIXTURES / 'vae_tiny', dtype=jnp.bfloat16)
  decoded = vae_bf16.decode(reference['tiny_latents'])
  assert decoded.dtype == jnp.float32
  assert relative_error(decoded, reference['tiny_decoded']) < 5e-2


def test_legacy_attention_weights_as_1x1_convs_load_the_same(tmp_path):
  """The original SD checkpoints hold the attention projections as 1×1 convs [C, C, 1, 1]:
  the same numbers as the linear [C, C] ones of the (diffusers-checked) legacy file."""
  legacy = FIXTURES / 'vae_tiny_legacy'
  weights = torch_io.load(legacy / 'diffusion_pytorch_model.bin')
  assert 'encoder.mid_block.attentions.0.query.weight' in weights
  as_conv = {k: (v[:, :, None, None] if k.endswith(('query.weight', 'key.weight',
                                                     'value.weight', 'proj_attn.weight')) else v)
             for k, v in weights.items()}
  assert as_conv['decoder.mid_block.attentions.0.proj_attn.weight'].shape == (8, 8, 1, 1)
  save_file(as_conv, str(tmp_path / 'vae.safetensors'))
  shutil.copy(legacy / 'config.json', tmp_path / 'config.json')
  want = vae.read_params(legacy)
  got = vae.read_params(tmp_path / 'vae.safetensors')
  jax.tree.map(np.testing.assert_array_equal, got, want)


def _copy_with(tmp_path, change) -> pathlib.Path:
  out = tmp_path / 'vae'
  shutil.copytree(FIXTURES / 'vae_tiny', out)
  weights = load_file(str(out / WEIGHTS))
  change(weights)
  save_file(weights, str(out / WEIGHTS))
  return out


def test_weights_that_do_not_fit_are_refused_by_name(tmp_path):
  missing = _copy_with(tmp_path / 'a', lambda w: w.pop('decoder.up_blocks.1.resnets.2.conv2.bias'))
  with pytest.raises(ValueError,
                     match=r"missing tensors \['decoder.up_blocks.1.resnets.2.conv2.bias'\]"):
    vae.load_vae(missing)

  def rename(w):
    w['encoder.mid_block.attentions.0.to_qq.weight'] = w.pop(
        'encoder.mid_block.attentions.0.to_q.weight')
  renamed = _copy_with(tmp_path / 'b', rename)
  with pytest.raises(ValueError, match=r"missing tensors \['encoder.mid_block.attentions.0.to_q"
                     r".weight'\].*unexpected tensors \['encoder.mid_block.attentions.0.to_qq"):
    vae.read_params(renamed)
  wrong = _copy_with(tmp_path / 'c', lambda w: w.update(
      {'encoder.down_blocks.1.resnets.0.conv1.weight': np.zeros((8, 4, 3, 1), np.float32)}))
  with pytest.raises(ValueError, match=r'resnets.0.conv1.weight: \(8, 4, 3, 1\), expected '
                     r'\(8, 4, 3, 3\)'):
    vae.read_params(wrong / WEIGHTS)
  original = _copy_with(tmp_path / 'd', lambda w: w.update(
      {'encoder.down.0.block.0.norm1.weight': np.ones(4, np.float32)}))
  with pytest.raises(ValueError, match='CompVis'):
    vae.read_params(original)
  with pytest.raises(FileNotFoundError, match='config.json.*diffusion_pytorch_model.safetensors'):
    vae.load_vae(tmp_path / 'nowhere')


def test_unsupported_configs_are_refused():
  base = json.loads((FIXTURES / 'vae_tiny' / 'config.json').read_text())
  with pytest.raises(ValueError, match='AttnDownEncoderBlock2D'):
    vae.VaeShape.from_config({**base, 'down_block_types': ['DownEncoderBlock2D',
                                                           'AttnDownEncoderBlock2D',
                                                           'DownEncoderBlock2D']})
  with pytest.raises(ValueError, match="_class_name='AutoencoderTiny'"):
    vae.VaeShape.from_config({**base, '_class_name': 'AutoencoderTiny'})
  with pytest.raises(ValueError, match="act_fn='gelu'"):
    vae.VaeShape.from_config({**base, 'act_fn': 'gelu'})
  with pytest.raises(ValueError, match='norm_num_groups=3'):
    vae.VaeShape.from_config({**base, 'norm_num_groups': 3})
  old = {k: v for k, v in base.items() if k not in ('scaling_factor', 'use_quant_conv')}
  assert vae.VaeShape.from_config(old).scaling_factor == 0.18215   # older SD configs
  assert vae.VaeShape.from_config(old).use_quant_conv


def test_sample_latent_draws_from_the_posterior():
  """mean + exp(logvar / 2)·ε: the empirical mean and standard deviation of many draws."""
  mean = jnp.array([0.5, -2.0, 3.0])
  std = jnp.array([0.1, 1.0, 2.5])
  draws = jax.vmap(lambda k: vae.sample_latent(mean, 2 * jnp.log(std), k))(
      jax.random.split(jax.random.key(0), 20000))
  np.testing.assert_allclose(draws.mean(0), mean, atol=0.05)
  np.testing.assert_allclose(draws.std(0), std, rtol=0.03)
