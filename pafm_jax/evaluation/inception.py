"""FID's Inception-v3 in Flax NNX, loaded from the standard FID weights.

FID (Heusel et al. 2017) is defined with the pool_3 features of the TensorFlow Inception graph
of 2015-12-05. pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` holds that graph's weights
in torchvision's Inception3 layout, with four blocks changed to match the TF graph
(`FIDInceptionA/C/E_1/E_2`): the average pools of the A, C and E_1 branch pools exclude the
padding from their divisor (count_include_pad=False), and E_2's branch pool is a 3×3 max pool.
Those are the rules followed here, layer for layer, with the torch state-dict names as module
paths (so the weights load by name):

  images in [−1, 1] → bilinear resize to 299×299 (align_corners=False, no antialiasing)
  → stem (Conv2d_1a … Conv2d_4a, two 3×3/2 max pools) → Mixed_5b … Mixed_7c
  → global average pool: features [B, 2048]   (→ fc: logits [B, 1008], unused by FID)

Every BasicConv2d is conv (no bias) → BatchNorm (ε = 0.001, running statistics) → ReLU.

No weights are downloaded: config.eval.inception_weights names a user-supplied `.pth` (read
without torch by a restricted unpickler that builds nothing but tensors) or an `.npz` with the
same keys. Reference statistics come from an ADM-style `.npz` (config.eval.reference_stats).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pafm_jax import torch_io

WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
FEATURE_DIM = 2048
NUM_LOGITS = 1008   # the 2015 graph's 1008-way classifier
BN_EPS = 1e-3


# ------------------------------------------------------------------------------ layers


class BasicConv2d(nnx.Module):
  """conv (no bias) → BatchNorm with running statistics → ReLU.  [B, H, W, C] → [B, H', W', out]."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int | tuple[int, int],
               stride: int = 1, padding: int | tuple[int, int] = 0):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    pad = (padding, padding) if isinstance(padding, int) else padding
    rngs = nnx.Rngs(0)  # placeholder values: every weight is overwritten by `load_weights`
    self.conv = nnx.Conv(in_ch, out_ch, kernel, strides=stride,
                         padding=((pad[0], pad[0]), (pad[1], pad[1])), use_bias=False,
                         rngs=rngs)
    self.bn = nnx.BatchNorm(out_ch, epsilon=BN_EPS, use_running_average=True, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x, size: int, stride: int, padding: int = 0):
  return nnx.max_pool(x, (size, size), (stride, stride),
                      ((padding, padding), (padding, padding)))


def avg_pool_excluding_padding(x):
  """3×3 stride-1 average pool with 1-pixel padding, dividing by the number of real pixels
  under the window (torch's count_include_pad=False; TF's 'SAME' average pool)."""
  window, strides, pad = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
  count = jax.lax.reduce_window(jnp.ones_like(x[:1, :, :, :1]), 0.0, jax.lax.add, window,
                                strides, pad)
  return total / count


class InceptionA(nnx.Module):
  def __init__(self, in_ch: int, pool_features: int):
    self.branch1x1 = BasicConv2d(in_ch, 64, 1)
    self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
    self.branch_pool = BasicConv2d(in_ch, pool_features, 1)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(avg_pool_excluding_padding(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  def __init__(self, in_ch: int):
    self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

  def __call__(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, bd, max_pool(x, 3, 2)], axis=-1)


class InceptionC(nnx.Module):
  def __init__(self, in_ch: int, c7: int):
    self.branch1x1 = BasicConv2d(in_ch, 192, 1)
    self.branch7x7_1 = BasicConv2d(in_ch, c7, 1)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(in_ch, 192, 1)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = layer(bd)
    bp = self.branch_pool(avg_pool_excluding_padding(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
  def __init__(self, in_ch: int):
    self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = x
    for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                  self.branch7x7x3_4):
      b7 = layer(b7)
    return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], axis=-1)


class InceptionE(nnx.Module):
  """`pool='avg'`: FIDInceptionE_1 (Mixed_7b); `pool='max'`: FIDInceptionE_2 (Mixed_7c)."""

  def __init__(self, in_ch: int, pool: str):
    self.pool = pool
    self.branch1x1 = BasicConv2d(in_ch, 320, 1)
    self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(in_ch, 192, 1)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    pooled = avg_pool_excluding_padding(x) if self.pool == 'avg' else max_pool(x, 3, 1, 1)
    return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled)], axis=-1)


class FIDInceptionV3(nnx.Module):
  """images [B, H, W, 3] in [−1, 1] → (pool_3 features [B, 2048], logits [B, 1008])."""

  def __init__(self):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
    self.Mixed_5b = InceptionA(192, 32)
    self.Mixed_5c = InceptionA(256, 64)
    self.Mixed_5d = InceptionA(288, 64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = InceptionC(768, 128)
    self.Mixed_6c = InceptionC(768, 160)
    self.Mixed_6d = InceptionC(768, 160)
    self.Mixed_6e = InceptionC(768, 192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = InceptionE(1280, 'avg')
    self.Mixed_7c = InceptionE(2048, 'max')
    self.fc = nnx.Linear(FEATURE_DIM, NUM_LOGITS, rngs=nnx.Rngs(0))

  def __call__(self, images):
    b, _, _, c = images.shape
    # Bilinear with half-pixel centres = torch's align_corners=False; torch's interpolate
    # does not antialias when it shrinks an image, so neither does this.
    x = jax.image.resize(images.astype(jnp.float32), (b, 299, 299, c), 'bilinear',
                         antialias=False)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool(x, 3, 2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = max_pool(x, 3, 2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    features = jnp.mean(x, axis=(1, 2))
    return features, self.fc(features)


# ---------------------------------------------------------------------------- weights


@functools.lru_cache(maxsize=1)
def _abstract_state() -> tuple[Any, dict[tuple[str, ...], Any]]:
  """(graphdef, {path of str keys: abstract variable}) of the model, built once."""
  graphdef, state = nnx.split(nnx.eval_shape(FIDInceptionV3))
  return graphdef, {tuple(str(k) for k in p): v for p, v in nnx.to_flat_state(state)}


def _torch_layout() -> dict[str, tuple[tuple[str, ...], Callable[[np.ndarray], np.ndarray]]]:
  """torch state-dict name → (NNX state path, conversion of the torch array)."""
  table = {}
  for keys in _abstract_state()[1]:
    *prefix, leaf = keys
    name = '.'.join(prefix)
    if leaf == 'kernel' and prefix[-1] == 'conv':   # torch OIHW → flax HWIO
      table[f'{name}.weight'] = (keys, lambda a: np.transpose(a, (2, 3, 1, 0)))
    elif leaf == 'kernel':                           # torch Linear [out, in] → [in, out]
      table[f'{name}.weight'] = (keys, lambda a: np.transpose(a))
    else:
      torch_leaf = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                    'var': 'running_var'}[leaf]
      table[f'{name}.{torch_leaf}'] = (keys, lambda a: a)
  return table


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """The torch names and shapes the FID weights must provide (num_batches_tracked aside)."""
  flat = _abstract_state()[1]
  out = {}
  for name, (keys, _) in _torch_layout().items():
    shape = flat[keys].get_value().shape
    if keys[-1] == 'kernel' and keys[-2] == 'conv':
      shape = (shape[3], shape[2], shape[0], shape[1])
    elif keys[-1] == 'kernel':
      shape = (shape[1], shape[0])
    out[name] = tuple(shape)
  return out


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A PyTorch state dict as numpy arrays, read without torch and without running code
  (`pafm_jax.torch_io`: an allow-listed unpickler that builds nothing but tensors)."""
  return {str(k): np.asarray(v) for k, v in torch_io.load(path).items()}


def read_weights(path: str,
                 torch_reader: Callable[[str], dict[str, np.ndarray]] | None = None
                 ) -> dict[str, np.ndarray]:
  """The FID weights from a `.pth` (restricted unpickler) or an `.npz` with the same keys."""
  if not path:
    raise FileNotFoundError(
        'FID needs the Inception-v3 weights, and config.eval.inception_weights is empty. Get '
        f'{WEIGHTS_NAME} (the pytorch-fid release) once and pass '
        '--config.eval.inception_weights=/path/to/it (an .npz with the same keys works too), '
        "or use --config.eval.features=classifier.")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'config.eval.inception_weights={path!r} does not exist. It must name {WEIGHTS_NAME} '
        '(pytorch-fid) or an .npz with its keys; nothing is downloaded.')
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  return (torch_reader or load_torch_state_dict)(path)


def load_weights(state_dict: dict[str, np.ndarray]) -> FIDInceptionV3:
  """The model with every parameter and BN statistic taken from the torch-named arrays.

  Refuses missing, unexpected or mis-shaped entries, naming them.
  """
  state_dict = {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
  layout = _torch_layout()
  expected = expected_state_dict_shapes()
  missing = sorted(set(layout) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(layout))
  if missing or unexpected:
    raise ValueError(f'not the FID Inception weights: missing {missing[:5]}'
                     f'{"…" if len(missing) > 5 else ""} ({len(missing)}), unexpected '
                     f'{unexpected[:5]} ({len(unexpected)}).')
  bad = [f'{k}: {tuple(np.shape(v))} ≠ {expected[k]}' for k, v in state_dict.items()
         if tuple(np.shape(v)) != expected[k]]
  if bad:
    raise ValueError(f'FID Inception weights of the wrong shape: {bad[:5]}')
  graphdef, abstract = _abstract_state()
  values = {keys: abstract[keys].replace(jnp.asarray(convert(np.asarray(state_dict[name],
                                                                         np.float32))))
            for name, (keys, convert) in layout.items()}
  flat = [(keys, values[keys]) for keys in abstract]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ------------------------------------------------------------------- feature extraction


def to_rgb(images: jax.Array) -> jax.Array:
  """[B, H, W, 1 or 3] → [B, H, W, 3] (grayscale repeated, as FID does for MNIST-like data)."""
  if images.shape[-1] == 1:
    return jnp.repeat(images, 3, axis=-1)
  if images.shape[-1] != 3:
    raise ValueError(f'Inception needs 1- or 3-channel images, got {images.shape[-1]} channels; '
                     'set config.eval.decoder to map latents to images.')
  return images


def make_apply(model: FIDInceptionV3, decoder: Callable | None = None) -> Callable:
  """Jitted images (or latents, through `decoder`) → (features [B, 2048], None)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def apply(x):
    if decoder is not None:
      x = decoder(x)
    feats, _ = nnx.merge(graphdef, state)(to_rgb(jnp.clip(x, -1.0, 1.0)))
    return feats

  return lambda x: (apply(x), None)


def create_feature_extractor(config, decoder: Callable | None, extractor_cls: type) -> Any:
  """The 'inception' extractor of `runner` (features only; no conditional accuracy)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  weights = read_weights(config.eval.inception_weights)
  h = hashlib.sha256()
  for k in sorted(weights):
    h.update(k.encode())
    h.update(np.ascontiguousarray(weights[k], np.float32).tobytes())
  fingerprint = h.hexdigest()[:16]
  if config.data.channels not in (1, 3) and decoder is None:
    raise ValueError(f'the data has {config.data.channels} channels (latents?): FID needs '
                     "images, so set config.eval.decoder='package.module:function' mapping "
                     'latents to images in [−1, 1].')
  info = {'weights': config.eval.inception_weights, 'decoder': config.eval.decoder}
  return extractor_cls('inception', fingerprint, 100, make_apply(load_weights(weights), decoder),
                       info)


def load_reference(path: str, extractor: Any) -> tuple[np.ndarray, np.ndarray,
                                                       np.ndarray | None, str]:
  """ADM-style reference batch: (mu, sigma, activations or None, source).

  Keys: 'mu' and 'sigma' (precomputed pool_3 statistics), and/or 'arr_0' holding either
  activations [N, 2048] or images uint8 [N, H, W, 3] (ADM's VIRTUAL_*.npz), whose activations
  are then computed with `extractor`.
  """
  if not path or not os.path.exists(path):
    raise FileNotFoundError(
        f'config.eval.reference_stats={path!r}: FID needs reference statistics of the real '
        "data, an ADM-style .npz with 'mu' and 'sigma' or 'arr_0' (images or activations).")
  from pafm_jax.evaluation import frechet  # pylint: disable=g-import-not-at-top
  with np.load(path, allow_pickle=False) as data:
    files = set(data.files)
    feats = None
    if 'arr_0' in files:
      arr = data['arr_0']
      if arr.ndim == 2:
        feats = arr.astype(np.float64)
      elif arr.ndim == 4:
        images = arr.astype(np.float32) / 127.5 - 1.0 if arr.dtype == np.uint8 else arr
        feats, _ = extractor(images)
      else:
        raise ValueError(f"{path}: 'arr_0' must be activations [N, D] or images "
                         f'[N, H, W, C], got shape {arr.shape}.')
    if 'mu' in files and 'sigma' in files:
      return data['mu'], data['sigma'], feats, path
  if feats is None:
    raise ValueError(f"{path} holds neither 'mu'/'sigma' nor 'arr_0'.")
  mu, sigma = frechet.gaussian_statistics(feats)
  return mu, sigma, feats, path
