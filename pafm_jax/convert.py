"""Upstream PyTorch SiT / REPA / StableVM state dicts -> pafm_jax's SiT parameters.

Names and layouts (METHOD.md §6; pafm_jax/models/sit.py lists the same table):

    upstream (torch)                          pafm_jax (nnx pure dict)
    x_embedder.proj.weight [D, C, p, p]       x_embedder.proj.kernel [p, p, C, D]
    t_embedder.mlp.{0,2}.weight [out, in]     t_embedder.mlp.layers.{0,2}.kernel [in, out]
    y_embedder.embedding_table.weight         y_embedder.embedding_table.embedding
    blocks.N.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2}.weight      same path, .kernel transposed
    blocks.N.adaLN_modulation.1.weight        blocks.N.adaLN_modulation.layers.1.kernel
    final_layer.{adaLN_modulation.1, linear}  final_layer.{adaLN_modulation.layers.1, linear}
    *.bias                                    *.bias
    pos_embed [1, T, D]                       not a parameter: checked against our sin-cos table
    projectors.0.{0,2,4}.weight (REPA, StableVM)   projectors.0.layers.{0,2,4}.kernel, when the
                                              model has a projector (config.model.projector);
                                              else returned when asked for, or dropped

Output channels: the original SiT trains with `learn_sigma=True`, so its final linear predicts
2C channels per pixel, ordered (p_row, p_col, channel) per token, and only the first C are the
velocity. The sigma half is dropped. REPA and StableVM predict C channels.

Time convention. pafm_jax has t = 0 data and t = 1 noise (METHOD.md §1), as do REPA and
StableVM. The original SiT (willisma/SiT, its `transport`) runs the other way: x_t = t·x1 +
(1 − t)·x0 with x1 the data, and predicts d x_t / dt in that direction. Its network therefore
relates to ours by

    v_ours(x, t, y) = −v_sit(x, 1 − t, y).

The conversion makes this exact in the weights, so an imported SiT is a plain pafm_jax SiT:
the sinusoid features of 1 − t are a fixed rotation of those of t, per frequency f,

    cos(f(1 − t)) = cos f · cos ft + sin f · sin ft
    sin(f(1 − t)) = sin f · cos ft − cos f · sin ft,

which the first time-MLP Linear absorbs, and the final Linear's weight and bias are negated.
`source='sit'` applies this; 'repa' and 'stablevm' copy the weights as they are; 'auto' picks
'repa' when the state dict has projectors, 'sit' when it predicts 2C channels, and otherwise
asks.

Attention heads are not visible in the weights; the named sizes of pafm_jax (S/B/L/XL) use
the upstream head counts, so pick the model of the same name.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pafm_jax.models import sit

# source -> does its network run time from data (t = 1) to noise, i.e. must it be flipped?
SOURCES = {'sit': True, 'repa': False, 'stablevm': False}
# Wrappers that prefix every key: DistributedDataParallel and torch.compile.
WRAPPER_PREFIXES = ('module.', '_orig_mod.')
PROJECTOR_PREFIX = 'projectors.'
POS_EMBED = 'pos_embed'
# Upstream stores the sin-cos table in float32; ours is computed in float64 then rounded.
POS_EMBED_ATOL = 1e-5

_TOP_ORDER = ('x_embedder', 't_embedder', 'y_embedder', 'blocks', 'final_layer',
              'projectors')


class ConversionError(ValueError):
  """The state dict does not fit the model (names, shapes or fixed tables)."""


@dataclasses.dataclass
class ImportInfo:
  """What `convert_sit_state_dict` / `load_torch_sit` did besides copying weights."""
  source: str                       # 'sit', 'repa' or 'stablevm'
  flipped_time: bool                # t -> 1 − t and v -> −v folded into the weights
  dropped_sigma: bool               # the learn_sigma half of the output was dropped
  dropped: list[str]                # upstream names not imported
  projectors: dict[str, np.ndarray] | None  # kept REPA projector weights (upstream names/layout)


# --------------------------------------------------------------------------------------------
# Names and shapes


def strip_wrapper_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Removes a DDP (`module.`) or torch.compile (`_orig_mod.`) prefix carried by every key."""
  out = dict(state_dict)
  for prefix in WRAPPER_PREFIXES:
    if out and all(k.startswith(prefix) for k in out):
      logging.info('stripping the %r prefix from every state-dict key', prefix)
      out = {k[len(prefix):]: v for k, v in out.items()}
  return out


def upstream_name(path: tuple) -> str:
  """Our pure-dict path -> the upstream key, e.g. ('t_embedder', 'mlp', 'layers', 0, 'kernel')
  -> 't_embedder.mlp.0.weight'."""
  *mods, leaf = [str(p) for p in path if p != 'layers']  # nnx.Sequential's extra level
  return '.'.join(mods + ['weight' if leaf in ('kernel', 'embedding') else leaf])


def _sort_key(name: str) -> tuple:
  """Upstream module order: embedders, blocks by number, final layer; weight before bias."""
  parts = name.split('.')
  top = _TOP_ORDER.index(parts[0]) if parts[0] in _TOP_ORDER else len(_TOP_ORDER)
  num = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1
  return top, num, '.'.join(parts[:-1]), {'weight': 0, 'bias': 1}.get(parts[-1], 2), name


def _upstream_shape(name: str, shape: tuple[int, ...], learn_sigma: bool) -> tuple[int, ...]:
  """The torch shape of the upstream tensor that becomes our leaf of `shape`."""
  if name == 'x_embedder.proj.weight':
    p, q, c, d = shape
    return (d, c, p, q)
  if name.startswith('final_layer.linear.') and learn_sigma:
    shape = shape[:-1] + (2 * shape[-1],)
  if name.endswith('.weight') and len(shape) == 2 and 'embedding_table' not in name:
    return shape[::-1]
  return shape


def describe_state_dict(state_dict: Mapping[str, Any]) -> str:
  """The SiT architecture a state dict holds, in words, for error messages."""
  def shape(key):
    v = state_dict.get(key)
    return tuple(v.shape) if v is not None else None

  w = shape('x_embedder.proj.weight')
  table, final = shape('y_embedder.embedding_table.weight'), shape('final_layer.linear.weight')
  pos = shape(POS_EMBED)
  depth = len({k.split('.')[1] for k in state_dict if re.match(r'blocks\.\d+\.', k)})
  if w is None or len(w) != 4:
    return f'a state dict of {len(state_dict)} tensors that is not a SiT (no x_embedder.proj)'
  hidden, channels, patch = w[0], w[1], w[2]
  words = [f'depth {depth}', f'hidden size {hidden}', f'patch {patch}',
           f'{channels} input channels']
  if table is not None:
    words.append(f'{table[0]} label rows (= {table[0] - 1} classes + null)')
  if pos is not None and len(pos) == 3:
    side = math.isqrt(pos[1]) * patch
    words.append(f'{side}×{side} inputs' if math.isqrt(pos[1]) ** 2 == pos[1]
                 else f'{pos[1]} tokens')
  if final is not None and patch:
    out = final[0] // (patch * patch)
    words.append(f'{out} output channels' + (' (learn_sigma)' if out == 2 * channels else ''))
  if any(k.startswith(PROJECTOR_PREFIX) for k in state_dict):
    words.append('REPA projectors')
  return 'a SiT with ' + ', '.join(words)


def _describe_target(target: Mapping, grid_size: tuple[int, int]) -> str:
  p, _, c, d = target['x_embedder']['proj']['kernel'].shape
  rows = target['y_embedder']['embedding_table']['embedding'].shape[0]
  return (f'depth {len(target["blocks"])}, hidden size {d}, patch {p}, {c} input channels, '
          f'{rows} label rows (= {rows - 1} classes + null), '
          f'{grid_size[0] * p}×{grid_size[1] * p} inputs')


def resolve_source(state_dict: Mapping[str, Any], target: Mapping, source: str) -> str:
  """'auto' -> 'repa' with projectors, 'sit' with 2C outputs; explicit names are checked."""
  if source != 'auto':
    if source not in SOURCES:
      raise ValueError(f'unknown source {source!r}; choose one of auto, {", ".join(SOURCES)}.')
    return source
  if any(k.startswith(PROJECTOR_PREFIX) for k in state_dict):
    return 'repa'
  final = state_dict.get('final_layer.linear.weight')
  ours = target['final_layer']['linear']['kernel'].shape[-1]
  if final is not None and final.shape[0] == 2 * ours:
    return 'sit'
  raise ConversionError(
      'cannot tell which code trained this checkpoint (no REPA projectors, no learn_sigma '
      "output), and the time conventions differ: pass source='sit' for willisma/SiT "
      "(t = 1 is data) or source='repa' / 'stablevm' (t = 0 is data, as in pafm_jax).")


def check_sit_state_dict(state_dict: Mapping[str, Any], target: Mapping,
                         grid_size: tuple[int, int]) -> bool:
  """Checks every name and shape (no tensor data is read); returns learn_sigma.

  Raises ConversionError naming the first problem in upstream module order.
  """
  ours = target['final_layer']['linear']['kernel'].shape[-1]
  final = state_dict.get('final_layer.linear.weight')
  learn_sigma = final is not None and len(final.shape) == 2 and final.shape[0] == 2 * ours
  expected = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    name = upstream_name(tuple(k.key for k in path))
    expected[name] = _upstream_shape(name, tuple(leaf.shape), learn_sigma)
  gh, gw = grid_size
  d = target['x_embedder']['proj']['kernel'].shape[-1]
  # A model without a projector ignores the checkpoint's; one with a projector needs it.
  has_projector = 'projectors' in target
  present = {k for k in state_dict
             if k != POS_EMBED and (has_projector or not k.startswith(PROJECTOR_PREFIX))}
  problems = []
  for name in sorted(set(expected) | present, key=_sort_key):
    if name not in state_dict:
      problems.append(f'{name!r} is missing from the checkpoint')
    elif name not in expected:
      problems.append(f'{name!r} is in the checkpoint but not in the model')
    elif tuple(state_dict[name].shape) != expected[name]:
      problems.append(f'{name!r} has shape {tuple(state_dict[name].shape)} in the checkpoint, '
                      f'the model needs {expected[name]} (torch layout)')
  if POS_EMBED in state_dict and tuple(state_dict[POS_EMBED].shape) != (1, gh * gw, d):
    problems.append(f'{POS_EMBED!r} has shape {tuple(state_dict[POS_EMBED].shape)}, the model '
                    f'needs {(1, gh * gw, d)}')
  if problems:
    more = f' ({len(problems) - 1} more problems)' if len(problems) > 1 else ''
    raise ConversionError(
        f'the checkpoint does not fit the model: {problems[0]}{more}. The checkpoint holds '
        f'{describe_state_dict(state_dict)}; the model has {_describe_target(target, grid_size)}.'
        ' Pick the config (model.name, data.image_size, data.channels, data.num_classes) that '
        'matches the checkpoint.')
  return learn_sigma


# --------------------------------------------------------------------------------------------
# Values


def _time_flip_rotation(kernel: np.ndarray) -> np.ndarray:
  """First time-MLP kernel [F, D] for features of 1 − t -> the kernel for features of t.

  Rows 0..F/2−1 weight cos(f_k·t), rows F/2.. weight sin(f_k·t) (sit.timestep_embedding).
  """
  freq_dim = kernel.shape[0]
  if freq_dim % 2:
    raise ConversionError(f'odd time-frequency width {freq_dim} is not supported.')
  half = freq_dim // 2
  # The model evaluates these frequencies in float32; the identity holds for any f, and the
  # float64 copy differs from the float32 one by < 1e-7 relative.
  freqs = np.exp(-math.log(10000.0) * np.arange(half, dtype=np.float32) / half)
  cos_f, sin_f = np.cos(freqs.astype(np.float64))[:, None], np.sin(freqs.astype(np.float64))[:, None]
  k_cos, k_sin = kernel[:half].astype(np.float64), kernel[half:].astype(np.float64)
  return np.concatenate([cos_f * k_cos + sin_f * k_sin, sin_f * k_cos - cos_f * k_sin])


def _drop_sigma(value: np.ndarray, patch: int, channels: int) -> np.ndarray:
  """[p·p·2C, ...] -> [p·p·C, ...]: per token the layout is (p_row, p_col, channel)."""
  rest = value.shape[1:]
  return value.reshape(patch * patch, 2 * channels, *rest)[:, :channels].reshape(
      patch * patch * channels, *rest)


def check_pos_embed(value: np.ndarray, grid_size: tuple[int, int]) -> None:
  """The upstream frozen table must be the sin-cos table our model computes."""
  d = value.shape[-1]
  ours = sit.get_2d_sincos_pos_embed(d, *grid_size)
  err = float(np.max(np.abs(np.asarray(value, np.float64).reshape(ours.shape) - ours)))
  if err > POS_EMBED_ATOL:
    raise ConversionError(
        f'pos_embed differs from the fixed 2-D sin-cos table by up to {err:.3g}; pafm_jax\'s '
        'SiT has no learned position embedding and cannot represent this checkpoint.')


def convert_sit_state_dict(state_dict: Mapping[str, Any], target: Mapping, *,
                           grid_size: tuple[int, int], source: str = 'auto',
                           keep_projectors: bool = False) -> tuple[dict, ImportInfo]:
  """Upstream state dict (numpy arrays or torch_io.TensorRefs) -> our pure param dict.

  target: our parameters as a pure dict (arrays or ShapeDtypeStructs), giving names, shapes
  and dtypes; grid_size: (H/p, W/p). Every name and shape is checked before any tensor is read.
  Returns (params: pure dict of numpy arrays in target's dtypes, ImportInfo).
  """
  state_dict = strip_wrapper_prefix(state_dict)
  source = resolve_source(state_dict, target, source)
  flip = SOURCES[source]
  learn_sigma = check_sit_state_dict(state_dict, target, grid_size)
  patch, _, channels, _ = target['x_embedder']['proj']['kernel'].shape

  dropped = []
  if POS_EMBED in state_dict:
    check_pos_embed(np.asarray(state_dict[POS_EMBED]), grid_size)
    dropped.append(POS_EMBED)
  projector_keys = sorted(k for k in state_dict if k.startswith(PROJECTOR_PREFIX))
  projectors = None
  if 'projectors' in target:
    projector_keys = []   # converted into the model's own projector below
  if keep_projectors:
    projectors = {k: np.asarray(state_dict[k]) for k in projector_keys}
  elif projector_keys:
    logging.info('dropping the %d REPA projector tensors (projectors.*): the config has no '
                 'VA-REPA projector (config.model.projector is off)', len(projector_keys))
    dropped.extend(projector_keys)

  def convert(path, leaf):
    name = upstream_name(tuple(k.key for k in path))
    value = np.asarray(state_dict[name])
    if name.startswith('final_layer.linear.'):
      if learn_sigma:  # on the torch layout: output features lead, weight and bias alike
        value = _drop_sigma(value, patch, channels)
      if flip:
        value = -value
    if name == 'x_embedder.proj.weight':
      value = value.transpose(2, 3, 1, 0)  # [D, C, p, p] -> [p, p, C, D]
    elif value.ndim == 2 and 'embedding_table' not in name:
      value = value.T  # torch Linear [out, in] -> [in, out]
    if flip and name == 't_embedder.mlp.0.weight':
      value = _time_flip_rotation(value)
    if value.shape != tuple(leaf.shape):  # a bug here, not in the file: shapes were checked
      raise AssertionError(f'{name}: converted to {value.shape}, expected {leaf.shape}')
    return np.asarray(value, dtype=leaf.dtype)

  params = jax.tree_util.tree_map_with_path(convert, target)
  info = ImportInfo(source=source, flipped_time=flip, dropped_sigma=learn_sigma,
                    dropped=dropped, projectors=projectors)
  logging.info('converted a %s checkpoint: %s%s', source,
               'time flipped (t -> 1 − t, v -> −v)' if flip else 'same time convention',
               ', learn_sigma half dropped' if learn_sigma else '')
  return params, info


def load_torch_sit(model: sit.SiT, state_dict: Mapping[str, Any], *, source: str = 'auto',
                   keep_projectors: bool = False) -> ImportInfo:
  """Loads an upstream state dict (name -> numpy array) into `model`, in place.

  After the call `model(x, t, y)` is the upstream network in pafm_jax's convention (see the
  module docstring). `model` may be abstract (`nnx.eval_shape`), which skips initialising
  weights that are overwritten anyway. Returns what was dropped or kept (ImportInfo).
  """
  state = nnx.state(model, nnx.Param)
  target = nnx.to_pure_dict(state)
  params, info = convert_sit_state_dict(state_dict, target, grid_size=model.grid_size,
                                        source=source, keep_projectors=keep_projectors)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(model, state)
  return info
