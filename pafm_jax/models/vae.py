"""Stable Diffusion's VAE (diffusers `AutoencoderKL`) in Flax NNX: images ↔ latents.

The latent models of this project (SiT on ImageNet-256 latents, MMDiT) are trained on the
latents of SD's KL-f8 autoencoder, in its fine-tuned releases `stabilityai/sd-vae-ft-ema` and
`sd-vae-ft-mse`. This module encodes images to those latents and decodes samples back, layer
for layer as diffusers' AutoencoderKL (SD layout: DownEncoderBlock2D / UpDecoderBlock2D), on
NHWC arrays:

  encoder  conv_in → per block [ResnetBlock2D × layers_per_block, stride-2 conv on the (0, 1,
           0, 1)-padded input but in the last block] → mid block [resnet, single-head
           self-attention with GroupNorm, resnet] → GroupNorm → SiLU → conv_out (2 × latent
           channels) → quant_conv (1×1): mean | logvar (logvar clipped to [−30, 20])
  decoder  post_quant_conv (1×1) → conv_in → mid block → per block, widest first
           [ResnetBlock2D × (layers_per_block + 1), nearest ×2 + conv but in the last block]
           → GroupNorm → SiLU → conv_out

ResnetBlock2D is x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1×1 conv on x where the width
changes; every GroupNorm has ε = 1e-6. Any config.json of this layout loads (block widths,
depths, groups, channels, quant convs, mid-block attention); other block types are refused.

Weights: a local diffusers directory with `config.json` and `diffusion_pytorch_model.safetensors`
(as `AutoencoderKL.save_pretrained` writes them, e.g. `stabilityai/sd-vae-ft-ema` downloaded by
the user beforehand), or the path of such a `.safetensors` file with config.json beside it. A
directory holding only the older `diffusion_pytorch_model.bin` is read too, through
pafm_jax.torch_io (no torch, no code from the file runs). Nothing is ever downloaded. Attention
tensors may carry the current names (to_q, to_k, to_v, to_out.0) or the pre-0.14 ones (query,
key, value, proj_attn), as linear or 1×1-conv weights.

Scaling: `encode` returns the posterior's mean and logvar and `decode` takes latents as the
autoencoder itself sees them, both UNSCALED. Diffusion models are trained on
z·scaling_factor (0.18215 for SD 1.x/2.x, the default when config.json has no
`scaling_factor`), so divide a sample by `vae.scaling_factor` before decoding it. Checked
against diffusers 0.42.1 on three tiny perturbed models (tests/test_vae.py, fixtures made by
tests/fixtures/vae_reference.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pafm_jax import sharding, torch_io
from pafm_jax.models import attention as attention_lib

WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
LEGACY_WEIGHTS_NAME = 'diffusion_pytorch_model.bin'
DEFAULT_SCALING_FACTOR = 0.18215
EPS = 1e-6                      # every GroupNorm of diffusers' Encoder/Decoder
LOGVAR_RANGE = (-30.0, 20.0)    # DiagonalGaussianDistribution's clamp
# Pre-0.14 diffusers (and the first sd-vae-ft-* uploads) named the attention projections so.
LEGACY_ATTENTION_NAMES = (('.query.', '.to_q.'), ('.key.', '.to_k.'), ('.value.', '.to_v.'),
                          ('.proj_attn.', '.to_out.0.'))


@dataclasses.dataclass(frozen=True)
class VaeShape:
  """What config.json fixes about the network."""
  in_channels: int
  out_channels: int
  latent_channels: int
  block_out_channels: tuple[int, ...]
  layers_per_block: int
  norm_num_groups: int
  use_quant_conv: bool
  use_post_quant_conv: bool
  mid_block_add_attention: bool
  scaling_factor: float
  shift_factor: float          # SD3/FLUX VAEs: their models see (z − shift)·scale; SD's: 0

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_config(cls, config: dict) -> 'VaeShape':
    name = config.get('_class_name', 'AutoencoderKL')
    if name != 'AutoencoderKL':
      raise ValueError(f'config.json _class_name={name!r}: only diffusers AutoencoderKL (SD '
                       'layout) is implemented.')
    widths = tuple(int(c) for c in config.get('block_out_channels', (64,)))
    for key, block in (('down_block_types', 'DownEncoderBlock2D'),
                       ('up_block_types', 'UpDecoderBlock2D')):
      types = tuple(config.get(key, (block,)))
      if types != (block,) * len(widths):
        raise ValueError(f'config.json {key}={list(types)}: only {len(widths)} × {block!r} (one '
                         'per block_out_channels entry, the SD layout) is implemented.')
    if config.get('act_fn', 'silu') not in ('silu', 'swish'):
      raise ValueError(f'config.json act_fn={config["act_fn"]!r}: only silu is implemented.')
    groups = int(config.get('norm_num_groups', 32))
    if any(c % groups for c in widths):
      raise ValueError(f'config.json norm_num_groups={groups} does not divide every '
                       f'block_out_channels entry {list(widths)}.')
    scaling = config.get('scaling_factor')
    return cls(int(config.get('in_channels', 3)), int(config.get('out_channels', 3)),
               int(config.get('latent_channels', 4)), widths,
               int(config.get('layers_per_block', 1)), groups,
               bool(config.get('use_quant_conv', True)),
               bool(config.get('use_post_quant_conv', True)),
               bool(config.get('mid_block_add_attention', True)),
               float(DEFAULT_SCALING_FACTOR if scaling is None else scaling),
               float(config.get('shift_factor') or 0.0))


# ---------------------------------------------------------------------------------------------
# The network. Attribute names, including the one-element lists, are diffusers' module names, so
# a parameter's path in the NNX state is its checkpoint name (see `torch_name`).


def _conv(cin: int, cout: int, kernel: int, dtype, rngs: nnx.Rngs, stride: int = 1,
          padding: Any = 'SAME') -> nnx.Conv:
  return nnx.Conv(cin, cout, (kernel, kernel), strides=(stride, stride), padding=padding,
                  dtype=dtype, rngs=rngs)


class Norm(nnx.Module):
  """GroupNorm (ε = 1e-6) computed in float32, result in `dtype`: [..., C] → [..., C]."""

  def __init__(self, channels: int, groups: int, dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    # use_fast_variance=False: torch's two-pass variance, E[x²] − E[x]² loses digits.
    self.norm = nnx.GroupNorm(channels, num_groups=groups, epsilon=EPS, dtype=jnp.float32,
                              use_fast_variance=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(x.astype(jnp.float32)).astype(self.dtype)


class ResnetBlock2D(nnx.Module):
  """[B, H, W, cin] → [B, H, W, cout]."""

  def __init__(self, cin: int, cout: int, groups: int, dtype, rngs: nnx.Rngs):
    self.norm1 = Norm(cin, groups, dtype, rngs)
    self.conv1 = _conv(cin, cout, 3, dtype, rngs)
    self.norm2 = Norm(cout, groups, dtype, rngs)
    self.conv2 = _conv(cout, cout, 3, dtype, rngs)
    self.conv_shortcut = _conv(cin, cout, 1, dtype, rngs) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nnx.Module):
  """Single-head self-attention over the H·W positions, residual: [B, H, W, C] → same."""

  def __init__(self, channels: int, groups: int, dtype, rngs: nnx.Rngs):
    self.group_norm = Norm(channels, groups, dtype, rngs)
    self.to_q, self.to_k, self.to_v = (nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
                                       for _ in range(3))
    self.to_out = nnx.List([nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)])

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = self.group_norm(x).reshape(b, h * w, 1, c)
    # The reference formula: float32 softmax as diffusers' upcast_softmax, and no fused kernel,
    # whose head-size limits (≤ 256 in cuDNN) the single 512-wide head of SD's VAE exceeds.
    y = attention_lib.reference_attention(self.to_q(y), self.to_k(y), self.to_v(y))
    return x + self.to_out[0](y.reshape(b, h, w, c))


class MidBlock(nnx.Module):
  """UNetMidBlock2D: resnet → [attention] → resnet, width C throughout."""

  def __init__(self, channels: int, shape: VaeShape, dtype, rngs: nnx.Rngs):
    groups = shape.norm_num_groups
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, dtype, rngs)
                             for _ in range(2)])
    self.attentions = nnx.List([Attention(channels, groups, dtype, rngs)]
                               if shape.mid_block_add_attention else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    for attention in self.attentions:
      x = attention(x)
    return self.resnets[1](x)


class Downsample2D(nnx.Module):
  """Stride-2 3×3 conv: [B, H, W, C] → [B, ⌊H/2⌋, ⌊W/2⌋, C]."""

  def __init__(self, channels: int, dtype, rngs: nnx.Rngs):
    # diffusers' Downsample2D(padding=0) pads one row and column on the bottom and right only.
    self.conv = _conv(channels, channels, 3, dtype, rngs, stride=2, padding=((0, 1), (0, 1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest ×2, then a 3×3 conv: [B, H, W, C] → [B, 2H, 2W, C]."""

  def __init__(self, channels: int, dtype, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, 3, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownEncoderBlock2D(nnx.Module):
  """Resnets, then (but in the last block) a stride-2 3×3 conv: [B, H, W, cin] →
  [B, ⌊H/2⌋, ⌊W/2⌋, cout]."""

  def __init__(self, cin: int, cout: int, downsample: bool, shape: VaeShape, dtype,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(cin if i == 0 else cout, cout, shape.norm_num_groups, dtype, rngs)
        for i in range(shape.layers_per_block)])
    self.downsamplers = nnx.List([Downsample2D(cout, dtype, rngs)] if downsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in (*self.resnets, *self.downsamplers):
      x = layer(x)
    return x


class UpDecoderBlock2D(nnx.Module):
  """Resnets, then (but in the last block) nearest ×2 and a 3×3 conv: [B, H, W, cin] →
  [B, 2H, 2W, cout]."""

  def __init__(self, cin: int, cout: int, upsample: bool, shape: VaeShape, dtype,
               rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock2D(cin if i == 0 else cout, cout, shape.norm_num_groups, dtype, rngs)
        for i in range(shape.layers_per_block + 1)])
    self.upsamplers = nnx.List([Upsample2D(cout, dtype, rngs)] if upsample else [])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in (*self.resnets, *self.upsamplers):
      x = layer(x)
    return x


class Encoder(nnx.Module):
  """images [B, H, W, in_channels] → moments [B, H/f, W/f, 2·latent_channels]."""

  def __init__(self, shape: VaeShape, dtype, rngs: nnx.Rngs):
    widths, last = shape.block_out_channels, len(shape.block_out_channels) - 1
    self.conv_in = _conv(shape.in_channels, widths[0], 3, dtype, rngs)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(widths[max(i - 1, 0)], c, i < last, shape, dtype, rngs)
        for i, c in enumerate(widths)])
    self.mid_block = MidBlock(widths[-1], shape, dtype, rngs)
    self.conv_norm_out = Norm(widths[-1], shape.norm_num_groups, dtype, rngs)
    self.conv_out = _conv(widths[-1], 2 * shape.latent_channels, 3, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
  """latents [B, h, w, latent_channels] → images [B, h·f, w·f, out_channels]."""

  def __init__(self, shape: VaeShape, dtype, rngs: nnx.Rngs):
    widths = shape.block_out_channels[::-1]
    self.conv_in = _conv(shape.latent_channels, widths[0], 3, dtype, rngs)
    self.mid_block = MidBlock(widths[0], shape, dtype, rngs)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(widths[max(i - 1, 0)], c, i < len(widths) - 1, shape, dtype, rngs)
        for i, c in enumerate(widths)])
    self.conv_norm_out = Norm(widths[-1], shape.norm_num_groups, dtype, rngs)
    self.conv_out = _conv(widths[-1], shape.out_channels, 3, dtype, rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """The module tree of diffusers' AutoencoderKL; float32 in and out, `dtype` inside."""

  def __init__(self, shape: VaeShape, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype, self.latent_channels = dtype, shape.latent_channels
    moments = 2 * shape.latent_channels
    self.encoder = Encoder(shape, dtype, rngs)
    self.quant_conv = (_conv(moments, moments, 1, dtype, rngs) if shape.use_quant_conv
                       else None)
    self.post_quant_conv = (_conv(shape.latent_channels, shape.latent_channels, 1, dtype, rngs)
                            if shape.use_post_quant_conv else None)
    self.decoder = Decoder(shape, dtype, rngs)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, in_channels] in [−1, 1] → (mean, logvar), each [B, h, w, latent]."""
    moments = self.encoder(images.astype(self.dtype))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    moments = moments.astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, latents: jax.Array) -> jax.Array:
    """unscaled latents [B, h, w, latent] → images [B, h·f, w·f, out_channels]."""
    z = latents.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)


def sample_latent(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
  """A draw of the posterior N(mean, exp(logvar)): mean + exp(logvar / 2)·ε (shapes of mean)."""
  eps = jax.random.normal(rng, mean.shape, jnp.float32)
  return (mean + jnp.exp(0.5 * logvar) * eps).astype(mean.dtype)


# ---------------------------------------------------------------------------------------------
# Weights: checkpoint name ↔ parameter path, checked both ways.


def torch_name(path: tuple) -> str:
  """diffusers' name of the parameter at `path` of the NNX state: ('decoder', 'up_blocks', 0,
  'upsamplers', 0, 'conv', 'kernel') → 'decoder.up_blocks.0.upsamplers.0.conv.weight' (`Norm`
  wraps its GroupNorm in `.norm`, which diffusers does not have)."""
  parts = [str(p) for p in path if p != 'norm']
  parts[-1] = {'kernel': 'weight', 'scale': 'weight'}.get(parts[-1], parts[-1])
  return '.'.join(parts)


def _flat(tree: dict, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flat(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _checkpoint_names(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Legacy attention names → current ones, and their 1×1-conv weights → linear [out, in]."""
  out = {}
  for name, value in weights.items():
    if '.attentions.' in name:
      for old, new in LEGACY_ATTENTION_NAMES:
        name = name.replace(old, new)
      if name.endswith('.weight') and value.ndim == 4 and value.shape[2:] == (1, 1):
        value = value[:, :, 0, 0]
    out[name] = value
  return out


def _torch_layout(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape of a flax parameter: HWIO conv → OIHW, [in, out] linear → [out, in]."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape[::-1]) if len(shape) == 2 else tuple(shape)


def _to_flax(value: np.ndarray) -> np.ndarray:
  value = np.asarray(value, np.float32)
  if value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)
  elif value.ndim == 2:
    value = value.T
  return np.ascontiguousarray(value)


def _listed(names: list[str]) -> str:
  return f'{names[:6]}{" …" if len(names) > 6 else ""} ({len(names)})'


def _layout_error(missing: list[str], unexpected: list[str]) -> ValueError:
  hint = ('check that config.json belongs to these weights (block_out_channels, '
          'layers_per_block, latent_channels, use_quant_conv, use_post_quant_conv, '
          'mid_block_add_attention).')
  if any(n.startswith(('first_stage_model.', 'encoder.down.', 'decoder.up.')) for n in unexpected):
    hint = ('these look like an original CompVis/ldm checkpoint: convert it first, e.g. '
            'diffusers\' AutoencoderKL.from_single_file(path).save_pretrained(directory).')
  return ValueError(f'these weights do not fit the AutoencoderKL of config.json: missing tensors '
                    f'{_listed(missing)}, unexpected tensors {_listed(unexpected)}; {hint}')


def load_params(weights: dict[str, np.ndarray], abstract: dict) -> dict:
  """The NNX parameter pure dict (numpy float32) from a diffusers AutoencoderKL state dict
  (numpy, torch names and layouts). Refuses missing, unexpected and mis-shaped tensors by name.
  """
  weights = _checkpoint_names(weights)
  layout = {torch_name(path): (path, leaf) for path, leaf in _flat(abstract)}
  missing = sorted(set(layout) - set(weights))
  unexpected = sorted(set(weights) - set(layout))
  if missing or unexpected:
    raise _layout_error(missing, unexpected)
  bad = [f'{name}: {tuple(weights[name].shape)}, expected {_torch_layout(leaf.shape)}'
         for name, (_, leaf) in layout.items()
         if tuple(weights[name].shape) != _torch_layout(leaf.shape)]
  if bad:
    raise ValueError(f'AutoencoderKL tensors of the wrong shape for config.json: {bad[:6]}'
                     f'{" …" if len(bad) > 6 else ""}; check that config.json belongs to these '
                     'weights.')
  params = jax.tree.map(lambda _: None, abstract)
  for name, (path, _) in layout.items():
    node = params
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = _to_flax(weights[name])
  return params


def _files(path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """(config.json, weights file) of a diffusers directory or of a weights file's path."""
  path = pathlib.Path(path).expanduser()
  if path.suffix in ('.safetensors', '.bin'):
    config, weights = path.parent / 'config.json', path
  else:
    config, weights = path / 'config.json', path / WEIGHTS_NAME
    if not weights.is_file() and (path / LEGACY_WEIGHTS_NAME).is_file():
      weights = path / LEGACY_WEIGHTS_NAME
  missing = [str(p) for p in (config, weights) if not p.is_file()]
  if missing:
    raise FileNotFoundError(
        f'no diffusers AutoencoderKL at {path}: missing {missing}. Expected a directory holding '
        f'config.json and {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) as '
        'AutoencoderKL.save_pretrained writes them, e.g. stabilityai/sd-vae-ft-ema downloaded '
        'beforehand, or the path of that weights file with config.json beside it; nothing is '
        'downloaded.')
  return config, weights


def read_shape(path: str | pathlib.Path) -> VaeShape:
  """The network's shape from the config.json of `path`."""
  return VaeShape.from_config(json.loads(_files(path)[0].read_text()))


def read_weights(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """The state dict of `path` (numpy, torch names and layouts)."""
  weights = _files(path)[1]
  if weights.suffix == '.bin':
    state = torch_io.load(weights)
    if not isinstance(state, dict):
      raise ValueError(f'{weights} holds a {type(state).__name__}, not a state dict.')
    return state
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return load_file(str(weights))


@functools.lru_cache(maxsize=8)
def _abstract_model(shape: VaeShape, dtype):
  # Cached: tracing the ~100 small modules takes about 0.5 s, and loading needs it twice.
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: AutoencoderKL(shape, dtype=dtype, rngs=nnx.Rngs(0))), nnx.Param)
  return graphdef, nnx.to_pure_dict(state)


def abstract_model(shape: VaeShape, dtype=jnp.float32):
  """(graphdef, abstract parameter pure dict) of the network, nothing allocated."""
  graphdef, abstract = _abstract_model(shape, jnp.dtype(dtype))
  return graphdef, jax.tree.map(lambda x: x, abstract)   # the caller's own dicts


def read_params(path: str | pathlib.Path, shape: VaeShape | None = None) -> dict:
  """The parameter pure dict (numpy float32) of the AutoencoderKL at `path`."""
  shape = shape or read_shape(path)
  return load_params(read_weights(path), abstract_model(shape)[1])


# ---------------------------------------------------------------------------------------------
# Using it: jitted, the batch split over the devices.


class BatchedAutoencoder:
  """encode/decode of an NNX autoencoder (a graphdef whose module has encode(x) → (mean,
  logvar) and decode(z)) run jitted, the batch split over the devices of `mesh` (parameters
  replicated; a batch that does not divide is padded and the padding dropped). Inputs may be
  numpy or jax arrays; outputs are float32 jax arrays. The VAE here and the Fashion-MNIST
  autoencoder (models/autoencoder.py) are both used through it."""

  def __init__(self, graphdef, params: dict, *, in_channels: int, latent_channels: int,
               mesh: Mesh | None = None):
    self.graphdef, self.in_channels, self.latent_channels = graphdef, in_channels, latent_channels
    self._batch_mesh = sharding.BatchMesh(mesh)
    self.mesh = self._batch_mesh.mesh
    self.params = self._batch_mesh.replicate(params)
    self._encode = self._batch_mesh.jit(lambda p, x: nnx.merge(graphdef, p).encode(x))
    self._decode = self._batch_mesh.jit(lambda p, z: nnx.merge(graphdef, p).decode(z))

  def _run(self, fn: Callable, x, channels: int, what: str):
    if x.ndim != 4 or x.shape[-1] != channels:
      raise ValueError(f'{what} must be NHWC [B, H, W, {channels}], got shape {x.shape}.')
    return self._batch_mesh.run(fn, self.params, x)

  def encode(self, images) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, in_channels] in [−1, 1] → (mean, logvar), each [B, ⌊H/f⌋, ⌊W/f⌋,
    latent_channels] float32: the posterior, NOT multiplied by scaling_factor."""
    return self._run(self._encode, images, self.in_channels, 'images')

  def decode(self, latents) -> jax.Array:
    """unscaled latents [B, h, w, latent_channels] → images [B, h·f, w·f, out_channels]
    float32, roughly in [−1, 1] (not clipped)."""
    return self._run(self._decode, latents, self.latent_channels, 'latents')


class VAE(BatchedAutoencoder):
  """A loaded AutoencoderKL (BatchedAutoencoder's encode/decode).

  Attributes: shape (VaeShape), scaling_factor, shift_factor, latent_channels,
  downsample_factor (f), mesh, graphdef and params (the replicated parameter pure dict).
  """

  def __init__(self, shape: VaeShape, params: dict, *, dtype=jnp.float32,
               mesh: Mesh | None = None):
    super().__init__(abstract_model(shape, dtype)[0], params, in_channels=shape.in_channels,
                     latent_channels=shape.latent_channels, mesh=mesh)
    self.shape = shape
    self.scaling_factor, self.shift_factor = shape.scaling_factor, shape.shift_factor
    self.downsample_factor = shape.downsample_factor


def load_vae(path: str | pathlib.Path, *, dtype=jnp.float32, mesh: Mesh | None = None) -> VAE:
  """diffusers' AutoencoderKL from local files.

  Args:
    path: a diffusers directory (config.json + diffusion_pytorch_model.safetensors, e.g. a
      `stabilityai/sd-vae-ft-ema` snapshot downloaded beforehand), or the path of such a
      .safetensors (or .bin) file with config.json beside it.
    dtype: compute dtype of the convolutions (GroupNorm and softmax run in float32; parameters
      and outputs stay float32).
    mesh: the devices to split batches over; default: a 1-D mesh of every device.
  Raises:
    FileNotFoundError: config.json or the weights file is missing.
    ValueError: an unsupported config, or weights that do not fit it (named).
  """
  shape = read_shape(path)
  return VAE(shape, read_params(path, shape), dtype=dtype, mesh=mesh)
