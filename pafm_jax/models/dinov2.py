"""DINOv2 (Oquab et al. 2023) in Flax NNX: the frozen feature encoder of REPA and VA-REPA.

REPA (Yu et al. 2024, "Representation Alignment for Generation") aligns a diffusion
transformer's hidden tokens with the patch tokens of a frozen self-supervised encoder; its
default is DINOv2-B/14 on images resized to 224×224: 16×16 = 256 patch tokens of 768 features
(the final LayerNorm's output, CLS dropped), one per SiT-XL/2 token of a 256-px image. VA-REPA
(repa.py) uses the same targets. `load_dinov2(path).patch_features(images)` gives them.

The network is Hugging Face transformers' `Dinov2Model` (and `Dinov2WithRegistersModel`),
layer for layer, on NHWC inputs:

  conv p×p / stride p → [CLS, patches] + position embeddings (bicubic-resized for other grids)
  → [CLS, registers, patches] → N × pre-norm block [x + ls1·attn(LN(x)); x + ls2·mlp(LN(x))]
  → LayerNorm: last_hidden_state [B, 1 + R + h·w, D]

with the MLP fc1 → GELU → fc2 or, for the giant models, SwiGLU. Every size works (ViT-S/B/L/G
/14, with or without registers); unsupported config options are refused by name.

Weights: a local directory holding transformers' `config.json` and `model.safetensors`, as
`Dinov2Model.save_pretrained` writes them (e.g. `facebook/dinov2-base`, downloaded by the user
beforehand). They are read with `safetensors` (numpy, no torch); nothing is ever downloaded.
Checked against transformers 5.24 on two tiny models (tests/test_dinov2.py, fixtures made by
tests/fixtures/dinov2_reference.py).

One known difference from REPA's own encoder: REPA loads DINOv2 from torch.hub, whose position
embeddings are resized with `scale_factor=(g + 0.1)/G` instead of transformers' `size=g`; the
same positions are sampled at slightly shifted places (37 → 16 at 224 px), so features differ a
little from REPA's released targets. This module follows transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pafm_jax import sharding
from pafm_jax.models import attention as attention_lib

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODEL_TYPES = ('dinov2', 'dinov2_with_registers')
# transformers' ACT2FN names this port knows; 'gelu' is torch's exact (erf) GELU.
ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'swish': jax.nn.silu,
}
_HIGHEST = jax.lax.Precision.HIGHEST   # resizes are float32 sums, even on TPU / TF32 GPUs


def _square(value, name: str) -> int:
  """An int, or a pair of equal ints, as one int (transformers assumes a square grid)."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f'config.json {name}={value}: only square {name}s are supported '
                       '(transformers reshapes the position embeddings to a square grid).')
    value = value[0]
  return int(value)


@dataclasses.dataclass(frozen=True)
class Dinov2Shape:
  """What config.json fixes about the network."""
  hidden_size: int
  num_layers: int
  num_heads: int
  head_dim: int
  mlp_hidden: int          # fc1's width, or SwiGLU's gate/up width
  swiglu: bool
  hidden_act: str
  patch_size: int
  grid: int                # side of the position-embedding grid: image_size // patch_size
  num_channels: int
  num_registers: int
  mask_token: bool         # the checkpoint holds a (pre-training only) mask token
  qkv_bias: bool
  layer_norm_eps: float
  layerscale_value: float
  antialias: bool          # the registers model resizes position embeddings antialiased

  @property
  def num_prefix_tokens(self) -> int:
    return 1 + self.num_registers

  @classmethod
  def from_config(cls, config: dict) -> 'Dinov2Shape':
    model_type = config.get('model_type', 'dinov2')
    if model_type not in MODEL_TYPES:
      raise ValueError(f'config.json model_type={model_type!r}: expected one of {MODEL_TYPES}.')
    act = config.get('hidden_act', 'gelu')
    swiglu = bool(config.get('use_swiglu_ffn', False))
    if not swiglu and act not in ACTIVATIONS:
      raise ValueError(f'config.json hidden_act={act!r} is not supported; supported: '
                       f'{sorted(ACTIVATIONS)}.')
    d, heads = int(config['hidden_size']), int(config['num_attention_heads'])
    head_dim = int(config.get('head_dim') or d // heads)
    if 'head_dim' not in config and d % heads:
      raise ValueError(f'config.json hidden_size={d} is not a multiple of '
                       f'num_attention_heads={heads}.')
    hidden = int(d * config.get('mlp_ratio', 4))
    if swiglu:   # transformers' Dinov2SwiGLUFFN: 2/3 of the MLP width, rounded up to 8
      hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    patch, image = _square(config.get('patch_size', 14), 'patch_size'), _square(
        config.get('image_size', 224), 'image_size')
    with_registers = model_type == 'dinov2_with_registers'
    registers = int(config.get('num_register_tokens', 4)) if with_registers else 0
    return cls(d, int(config['num_hidden_layers']), heads, head_dim, hidden, swiglu, act, patch,
               image // patch, int(config.get('num_channels', 3)), registers,
               with_registers or bool(config.get('use_mask_token', True)),
               bool(config.get('qkv_bias', True)), float(config.get('layer_norm_eps', 1e-6)),
               float(config.get('layerscale_value', 1.0)), with_registers)


# ---------------------------------------------------------------------------------------------
# torch's bicubic interpolation (F.interpolate(mode='bicubic', align_corners=False, size=...)),
# as one [out, in] matrix per axis. jax.image.resize's cubic kernel is Keys' a = −0.5 with
# edge renormalisation; torch uses a = −0.75 with clamped indices (and, antialiased, a = −0.5
# with a support widened by the downscale factor), so parity needs torch's own weights.


def _cubic(x: float, a: float) -> float:
  x = abs(x)
  if x <= 1.0:
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  if x < 2.0:
    return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return 0.0


def bicubic_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
  """[out_size, in_size] float32 weights of torch's 1-D bicubic resize (align_corners=False,
  output size given, so the scale is in_size / out_size)."""
  scale = in_size / out_size
  weights = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    if not antialias:   # upsample_bicubic2d: 4 taps, indices clamped to the border
      src = scale * (i + 0.5) - 0.5
      i0 = min(math.floor(src), in_size - 1)
      t = min(max(src - i0, 0.0), 1.0)
      taps = (_cubic(t + 1, -0.75), _cubic(t, -0.75), _cubic(1 - t, -0.75), _cubic(2 - t, -0.75))
      for k, w in zip(range(i0 - 1, i0 + 3), taps):
        weights[i, min(max(k, 0), in_size - 1)] += w
    else:               # _upsample_bicubic2d_aa: PIL's filter, weights renormalised
      support = 2.0 * scale if scale >= 1.0 else 2.0
      inv = 1.0 / scale if scale >= 1.0 else 1.0
      center = scale * (i + 0.5)
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), in_size)
      taps = np.array([_cubic((j - center + 0.5) * inv, -0.5) for j in range(lo, hi)])
      weights[i, lo:hi] = taps / taps.sum() if taps.sum() != 0 else taps
  return weights.astype(np.float32)


def resize_bicubic(x: jax.Array, size: tuple[int, int], antialias: bool = False) -> jax.Array:
  """torch's bicubic resize of NHWC `x` [B, H, W, C] → [B, size[0], size[1], C] (float32)."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(size):   # torch copies the input when the size is unchanged
    return x
  rows, cols = bicubic_matrix(h, size[0], antialias), bicubic_matrix(w, size[1], antialias)
  return jnp.einsum('oh,bhwc,pw->bopc', rows, x.astype(jnp.float32), cols, precision=_HIGHEST)


# ---------------------------------------------------------------------------------------------
# The network.


class Dinov2Layer(nnx.Module):
  """Pre-norm block with LayerScale: [B, T, D] → [B, T, D]."""

  def __init__(self, shape: Dinov2Shape, dtype, attention: str, rngs: nnx.Rngs):
    d, inner = shape.hidden_size, shape.num_heads * shape.head_dim
    norm = lambda: nnx.LayerNorm(d, epsilon=shape.layer_norm_eps, dtype=dtype,
                                 use_fast_variance=False, rngs=rngs)   # torch's two-pass var
    linear = lambda i, o, bias=True: nnx.Linear(i, o, use_bias=bias, dtype=dtype, rngs=rngs)
    self.num_heads, self.head_dim, self.attention = shape.num_heads, shape.head_dim, attention
    self.swiglu, self.hidden_act = shape.swiglu, shape.hidden_act
    self.norm1 = norm()
    self.query, self.key, self.value = (linear(d, inner, shape.qkv_bias) for _ in range(3))
    self.attention_out = linear(inner, d)
    self.layer_scale1 = nnx.Param(jnp.full((d,), shape.layerscale_value, jnp.float32))
    self.norm2 = norm()
    if shape.swiglu:   # weights_in holds [gate | up], as the checkpoints store it
      self.weights_in = linear(d, 2 * shape.mlp_hidden)
      self.weights_out = linear(shape.mlp_hidden, d)
    else:
      self.fc1, self.fc2 = linear(d, shape.mlp_hidden), linear(shape.mlp_hidden, d)
    self.layer_scale2 = nnx.Param(jnp.full((d,), shape.layerscale_value, jnp.float32))

  def mlp(self, x: jax.Array) -> jax.Array:
    if self.swiglu:
      gate, up = jnp.split(self.weights_in(x), 2, axis=-1)
      return self.weights_out(jax.nn.silu(gate) * up)
    return self.fc2(ACTIVATIONS[self.hidden_act](self.fc1(x)))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    heads = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)
    y = self.norm1(x)
    y = attention_lib.attend(heads(self.query(y)), heads(self.key(y)), heads(self.value(y)),
                             implementation=self.attention)
    x = x + self.attention_out(y.reshape(b, t, -1)) * self.layer_scale1[...].astype(x.dtype)
    return x + self.mlp(self.norm2(x)) * self.layer_scale2[...].astype(x.dtype)


class Dinov2(nnx.Module):
  """transformers' Dinov2Model: pixel_values [B, H, W, C] (normalised) →
  last_hidden_state [B, 1 + R + (H // p)·(W // p), D] float32."""

  def __init__(self, shape: Dinov2Shape, *, dtype=jnp.float32, attention: str = 'auto',
               rngs: nnx.Rngs):
    d, self.shape, self.dtype = shape.hidden_size, shape, dtype
    p = shape.patch_size
    self.patch_embed = nnx.Conv(shape.num_channels, d, (p, p), strides=(p, p), padding='VALID',
                                dtype=dtype, rngs=rngs)
    normal = lambda *s: nnx.Param(0.02 * jax.random.normal(rngs.params(), s, jnp.float32))
    self.cls_token = normal(1, 1, d)
    self.position_embeddings = normal(1, shape.grid ** 2 + 1, d)
    # Only masked-image pre-training reads the mask token; it is kept so that every tensor of
    # a checkpoint has its place.
    self.mask_token = normal(1, d) if shape.mask_token else None
    self.register_tokens = normal(1, shape.num_registers, d) if shape.num_registers else None
    self.layers = nnx.List([Dinov2Layer(shape, dtype, attention, rngs)
                            for _ in range(shape.num_layers)])
    self.layernorm = nnx.LayerNorm(d, epsilon=shape.layer_norm_eps, dtype=dtype,
                                   use_fast_variance=False, rngs=rngs)

  def positions(self, h: int, w: int) -> jax.Array:
    """Position embeddings of an h×w patch grid: [1, 1 + h·w, D] float32 (transformers'
    interpolate_pos_encoding: bicubic, align_corners=False, to size (h, w), in float32)."""
    pos = self.position_embeddings[...].astype(jnp.float32)
    g = self.shape.grid
    if (h, w) == (g, g):
      return pos
    grid = pos[:, 1:].reshape(1, g, g, -1)
    grid = resize_bicubic(grid, (h, w), antialias=self.shape.antialias)
    return jnp.concatenate([pos[:, :1], grid.reshape(1, h * w, -1)], axis=1)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    b, height, width, c = pixel_values.shape
    p = self.shape.patch_size
    if c != self.shape.num_channels or height < p or width < p:
      raise ValueError(f'DINOv2 takes [B, H, W, {self.shape.num_channels}] images of at least '
                       f'{p}×{p} pixels, got {pixel_values.shape}.')
    x = self.patch_embed(pixel_values.astype(self.dtype))   # [B, h, w, D]; edge pixels dropped
    h, w, d = x.shape[1:]
    cls = jnp.broadcast_to(self.cls_token[...].astype(jnp.float32), (b, 1, d))
    x = jnp.concatenate([cls, x.reshape(b, h * w, d).astype(jnp.float32)], axis=1)
    x = x + self.positions(h, w)
    if self.register_tokens is not None:   # after CLS, without position embeddings
      registers = self.register_tokens[...].astype(jnp.float32)
      x = jnp.concatenate([x[:, :1], jnp.broadcast_to(registers, (b, *registers.shape[1:])),
                           x[:, 1:]], axis=1)
    x = x.astype(self.dtype)
    for layer in self.layers:
      x = layer(x)
    return self.layernorm(x).astype(jnp.float32)


def preprocess(images: jax.Array, resolution: int) -> jax.Array:
  """REPA's input: images [B, H, W, 1 or 3] in [−1, 1] → [B, resolution, resolution, 3]:
  [0, 1], ImageNet mean/std normalisation, then torch's bicubic resize (no antialias), in
  REPA's order (normalise, then resize; the two commute since the weights sum to 1)."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'DINOv2 features need images [B, H, W, 1 or 3] in [−1, 1], got shape '
                     f'{images.shape}; decode latents to images first.')
  x = (images.astype(jnp.float32) + 1.0) / 2.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
  return resize_bicubic(x, (resolution, resolution))


# ---------------------------------------------------------------------------------------------
# Weights: the checkpoint's names → this module's. Checkpoints (and save_pretrained) use the
# original names; transformers ≥ 5 renames some in memory, and a state dict saved directly
# from such a model is accepted too.

_MEMORY_NAMES = (('.attention.q_proj.', '.attention.attention.query.'),
                 ('.attention.k_proj.', '.attention.attention.key.'),
                 ('.attention.v_proj.', '.attention.attention.value.'),
                 ('.attention.o_proj.', '.attention.output.dense.'),
                 ('.mlp.down_proj.', '.mlp.weights_out.'))


def _checkpoint_names(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Checkpoint names: base-model prefixes stripped, transformers-5 in-memory names undone."""
  out = {}
  for name, value in weights.items():
    for prefix in ('dinov2_with_registers.', 'dinov2.'):
      name = name.removeprefix(prefix)
    for new, old in _MEMORY_NAMES:
      name = name.replace(new, old)
    out[name] = value
  for gate in [n for n in out if '.mlp.gate_proj.' in n]:   # SwiGLU: [gate | up] in one
    up = gate.replace('.gate_proj.', '.up_proj.')
    if up in out:
      out[gate.replace('.gate_proj.', '.weights_in.')] = np.concatenate(
          [out.pop(gate), out.pop(up)], axis=0)
  return out


def _layout(shape: Dinov2Shape) -> dict[str, tuple[tuple, str]]:
  """Checkpoint name → (path in the NNX state, how to convert the torch array)."""
  table = {'embeddings.cls_token': (('cls_token',), 'same'),
           'embeddings.position_embeddings': (('position_embeddings',), 'same'),
           'embeddings.patch_embeddings.projection.weight': (('patch_embed', 'kernel'), 'conv'),
           'embeddings.patch_embeddings.projection.bias': (('patch_embed', 'bias'), 'same'),
           'layernorm.weight': (('layernorm', 'scale'), 'same'),
           'layernorm.bias': (('layernorm', 'bias'), 'same')}
  if shape.mask_token:
    table['embeddings.mask_token'] = (('mask_token',), 'same')
  if shape.num_registers:
    table['embeddings.register_tokens'] = (('register_tokens',), 'same')
  mlp = ((('mlp.weights_in', 'weights_in'), ('mlp.weights_out', 'weights_out')) if shape.swiglu
         else (('mlp.fc1', 'fc1'), ('mlp.fc2', 'fc2')))
  for i in range(shape.num_layers):
    hf = f'encoder.layer.{i}.'
    table[hf + 'layer_scale1.lambda1'] = (('layers', i, 'layer_scale1'), 'same')
    table[hf + 'layer_scale2.lambda1'] = (('layers', i, 'layer_scale2'), 'same')
    for src, dst in (('norm1', 'norm1'), ('norm2', 'norm2')):
      table[f'{hf}{src}.weight'] = (('layers', i, dst, 'scale'), 'same')
      table[f'{hf}{src}.bias'] = (('layers', i, dst, 'bias'), 'same')
    for src, dst in (('attention.attention.query', 'query'), ('attention.attention.key', 'key'),
                     ('attention.attention.value', 'value'),
                     ('attention.output.dense', 'attention_out'), *mlp):
      table[f'{hf}{src}.weight'] = (('layers', i, dst, 'kernel'), 'linear')
      if shape.qkv_bias or dst not in ('query', 'key', 'value'):
        table[f'{hf}{src}.bias'] = (('layers', i, dst, 'bias'), 'same')
  return table


_CONVERT = {'same': lambda a: a, 'linear': np.transpose,
            'conv': lambda a: np.transpose(a, (2, 3, 1, 0))}   # torch OIHW → flax HWIO
_TORCH_SHAPE = {'same': lambda s: s, 'linear': lambda s: s[::-1],
                'conv': lambda s: (s[3], s[2], s[0], s[1])}


def _listed(names: list[str]) -> str:
  return f'{names[:6]}{" …" if len(names) > 6 else ""} ({len(names)})'


def load_params(weights: dict[str, np.ndarray], shape: Dinov2Shape, abstract: dict) -> dict:
  """The NNX parameter pure dict from a DINOv2 state dict (numpy, torch names and layouts).

  Refuses missing, unexpected and mis-shaped tensors, naming them.
  """
  weights = _checkpoint_names(weights)
  layout = _layout(shape)
  missing = sorted(set(layout) - set(weights))
  unexpected = sorted(set(weights) - set(layout))
  if missing or unexpected:
    raise ValueError(f'these weights do not fit the DINOv2 of config.json: missing tensors '
                     f'{_listed(missing)}, unexpected tensors {_listed(unexpected)}.')
  params = jax.tree.map(lambda _: None, abstract)
  bad = []
  for name, (path, kind) in layout.items():
    node = params
    for key in path[:-1]:
      node = node[key]
    target = abstract
    for key in path:
      target = target[key]
    want = tuple(_TORCH_SHAPE[kind](tuple(target.shape)))
    if tuple(weights[name].shape) != want:
      bad.append(f'{name}: {tuple(weights[name].shape)}, expected {want}')
      continue
    node[path[-1]] = np.ascontiguousarray(_CONVERT[kind](np.asarray(weights[name], np.float32)))
  if bad:
    raise ValueError(f'DINOv2 tensors of the wrong shape for config.json: {bad[:6]}'
                     f'{" …" if len(bad) > 6 else ""}')
  return params


def _files(path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  root = pathlib.Path(path)
  needed = (root / 'config.json', root / 'model.safetensors')
  missing = [str(p) for p in needed if not p.is_file()]
  if missing:
    raise FileNotFoundError(
        f'{root} is not a DINOv2 directory: missing {missing}. It needs config.json and '
        'model.safetensors as transformers\' Dinov2Model.save_pretrained writes them (e.g. '
        'facebook/dinov2-base, downloaded beforehand); nothing is downloaded.')
  return needed


def read_shape(path: str | pathlib.Path) -> Dinov2Shape:
  """The network's shape from `path`/config.json."""
  return Dinov2Shape.from_config(json.loads(_files(path)[0].read_text()))


def abstract_model(shape: Dinov2Shape, dtype=jnp.float32, attention: str = 'auto'):
  """(graphdef, abstract parameter pure dict) of the network, nothing allocated."""
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: Dinov2(shape, dtype=dtype, attention=attention, rngs=nnx.Rngs(0))), nnx.Param)
  return graphdef, nnx.to_pure_dict(state)


def read_params(path: str | pathlib.Path, shape: Dinov2Shape | None = None) -> dict:
  """The parameter pure dict (numpy float32) of the DINOv2 directory `path`."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  shape = shape or read_shape(path)
  return load_params(load_file(str(_files(path)[1])), shape, abstract_model(shape)[1])


def _check_resolution(shape: Dinov2Shape, resolution: int) -> int:
  if resolution < shape.patch_size or resolution % shape.patch_size:
    raise ValueError(f'resolution={resolution} must be a multiple of the patch size '
                     f'{shape.patch_size} (REPA: 224 = 16 × 14 for 256-px images).')
  return (resolution // shape.patch_size) ** 2


def output_shape(path: str | pathlib.Path, resolution: int = 224) -> tuple[int, int]:
  """(N, D): patch features per image at `resolution` and their width, from config.json."""
  shape = read_shape(path)
  return _check_resolution(shape, resolution), shape.hidden_size


# ---------------------------------------------------------------------------------------------
# Using it: pure functions for another jitted program (REPA's train step), and a batch-sharded
# jitted wrapper for everything else.


def patch_features_fn(graphdef, shape: Dinov2Shape, resolution: int) -> Callable:
  """Pure (params, images [B, H, W, 1 or 3] in [−1, 1]) → patch features [B, N, D] float32."""
  _check_resolution(shape, resolution)

  def apply(params, images):
    tokens = nnx.merge(graphdef, params)(preprocess(images, resolution))
    return tokens[:, shape.num_prefix_tokens:]

  return apply


@dataclasses.dataclass(frozen=True)
class FrozenParts:
  """The pieces a train step needs (the fields of repa.FrozenEncoder)."""
  name: str
  abstract_params: Any                 # pure dict of jax.ShapeDtypeStruct
  apply: Callable                      # (params, images in [−1, 1]) → [B, N, D]
  load_params: Callable[[], Any]       # reads the weights: numpy pure dict


def frozen_encoder(path: str | pathlib.Path, resolution: int = 224,
                   dtype=jnp.float32) -> FrozenParts:
  """DINOv2 at `path` as a frozen REPA encoder, built abstractly (weights read on demand)."""
  shape = read_shape(path)
  graphdef, abstract = abstract_model(shape, dtype)
  return FrozenParts('dinov2', abstract, patch_features_fn(graphdef, shape, resolution),
                     lambda: read_params(path, shape))


class Dinov2Encoder:
  """A loaded DINOv2 whose methods run jitted, the batch split over the devices of `mesh`
  (parameters replicated; a batch that does not divide is padded and the padding dropped).

  Attributes: shape (Dinov2Shape), resolution, feature_dim (D), num_patches (N at
  `resolution`), mesh, params (the replicated parameter pure dict).
  """

  def __init__(self, shape: Dinov2Shape, params: dict, *, resolution: int = 224,
               dtype=jnp.float32, mesh: Mesh | None = None, attention: str = 'auto'):
    self.shape, self.resolution = shape, resolution
    self.num_patches = _check_resolution(shape, resolution)
    self.feature_dim = shape.hidden_size
    self._batch_mesh = sharding.BatchMesh(mesh)
    self.mesh = self._batch_mesh.mesh
    graphdef, _ = abstract_model(shape, dtype, attention)
    self.params = self._batch_mesh.replicate(params)
    self._forward = self._batch_mesh.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    self._patch_features = self._batch_mesh.jit(patch_features_fn(graphdef, shape, resolution))

  def _run(self, fn: Callable, x) -> jax.Array:
    return self._batch_mesh.run(fn, self.params, x)

  def forward(self, pixel_values) -> jax.Array:
    """last_hidden_state [B, 1 + R + N', D] float32 of normalised pixel_values [B, H, W, C]
    (what transformers' Dinov2Model returns; N' = (H // p)·(W // p), any H, W ≥ p)."""
    return self._run(self._forward, pixel_values)

  def patch_features(self, images) -> jax.Array:
    """REPA's targets: images [B, H, W, 1 or 3] in [−1, 1] → patch tokens [B, N, D] float32.

    Grayscale is repeated to RGB; pixels go to [0, 1], are normalised with the ImageNet mean
    (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), and resized to resolution×resolution
    with torch's bicubic interpolation (a = −0.75, align_corners=False, no antialias), as REPA
    does (`F.interpolate(x, 224 * (resolution // 256), mode='bicubic')`: 256-px images → 224);
    an image already at `resolution` is not resampled. The final LayerNorm's tokens, CLS and
    registers dropped: N = (resolution / patch)² (256 for 224 / 14).
    """
    return self._run(self._patch_features, images)


def load_dinov2(path: str | pathlib.Path, *, resolution: int = 224, dtype=jnp.float32,
                mesh: Mesh | None = None, attention: str = 'auto') -> Dinov2Encoder:
  """DINOv2 from a local transformers directory (config.json + model.safetensors).

  Args:
    path: the directory, e.g. a `facebook/dinov2-base` snapshot downloaded beforehand.
    resolution: side of the images `patch_features` resizes to (REPA: 224).
    dtype: compute dtype of the blocks (parameters and outputs stay float32).
    mesh: the devices to split batches over; default: a 1-D mesh of every device.
    attention: models/attention.py's implementation ('auto': cuDNN for bf16 on GPU).
  Raises:
    FileNotFoundError: config.json or model.safetensors is missing.
    ValueError: an unsupported config, or weights that do not fit it (named).
  """
  shape = read_shape(path)
  return Dinov2Encoder(shape, read_params(path, shape), resolution=resolution, dtype=dtype,
                       mesh=mesh, attention=attention)
