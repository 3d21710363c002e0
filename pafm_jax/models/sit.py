"""SiT: the DiT transformer (Peebles & Xie 2023) used as a velocity network (Ma et al. 2024).

Flax NNX port of the upstream PyTorch `models.py` of SiT/DiT, without `learn_sigma` (a flow
matching velocity has as many channels as the input). Layout differences from upstream:

* images are NHWC (`[B, H, W, C]`), not NCHW;
* Linear kernels are stored `[in, out]` (torch: `[out, in]`), the patch conv kernel
  `[p, p, C, D]` (torch: `[D, C, p, p]`).

Module/attribute names follow upstream so a checkpoint converter is a renaming plus transposes:

    torch                                   nnx (this file)
    x_embedder.proj.{weight,bias}           x_embedder.proj.{kernel,bias}
    t_embedder.mlp.{0,2}.{weight,bias}      t_embedder.mlp.layers.{0,2}.{kernel,bias}
    y_embedder.embedding_table.weight       y_embedder.embedding_table.embedding
    blocks.N.attn.{qkv,proj}                blocks.N.attn.{qkv,proj}
    blocks.N.mlp.{fc1,fc2}                  blocks.N.mlp.{fc1,fc2}
    blocks.N.adaLN_modulation.1             blocks.N.adaLN_modulation.layers.1
    final_layer.adaLN_modulation.1          final_layer.adaLN_modulation.layers.1
    final_layer.linear                      final_layer.linear
    pos_embed (frozen buffer)               -- not stored: recomputed as a constant
    projectors.0.{0,2,4} (REPA)             projectors.0.layers.{0,2,4}

Every parameter carries logical axis names (`out_sharding` metadata); `pafm_jax.sharding` maps
them to mesh axes. Eager sharding is switched off per parameter so the model can be built (and
`nnx.eval_shape`d) with no mesh at all; the trainer places the parameters itself.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pafm_jax.models import attention
from pafm_jax.sharding import constrain

Dtype = Any

# Logical name of the residual stream activations [batch, tokens, hidden].
ACT_AXES = ('act_batch', 'act_length', 'act_embed')

# Width of the sinusoidal timestep features fed to the time MLP (DiT: frequency_embedding_size).
TIME_FREQ_DIM = 256


# ------------------------------------------------------------------------------------------------
# Initialisers with logical-axis annotations
# ------------------------------------------------------------------------------------------------

_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()
_normal02 = nnx.initializers.normal(stddev=0.02)
# DiT initialises the patch conv as Xavier on the flattened [D, C*p*p] view: fan_in = p*p*C and
# fan_out = D. The stock Xavier on a 4-D kernel would also multiply fan_out by p*p.
_patch_kernel_init = nnx.initializers.variance_scaling(
    1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2), out_axis=3)


def _part(init, axes: tuple[str | None, ...]):
  """Annotates `init` with logical axes; eager_sharding=False so no mesh is needed to build."""
  return nnx.with_partitioning(init, axes, eager_sharding=False)


def _linear(din: int, dout: int, axes: tuple[str, str], *, kernel_init, rngs: nnx.Rngs,
            dtype: Dtype, param_dtype: Dtype, bias_init=_zeros) -> nnx.Linear:
  """nnx.Linear with kernel axes `axes` and the bias named after the output dim."""
  return nnx.Linear(din, dout, kernel_init=_part(kernel_init, axes),
                    bias_init=_part(bias_init, (axes[1],)), dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)


# ------------------------------------------------------------------------------------------------
# Fixed (non-learned) embeddings, computed in numpy/jnp as constants
# ------------------------------------------------------------------------------------------------


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
  """[M] positions -> [M, embed_dim] = [sin(pos*omega), cos(pos*omega)] (MAE/DiT)."""
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.einsum('m,d->md', pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=None)
def get_2d_sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Frozen 2-D sin-cos position embedding, [grid_h*grid_w, embed_dim] float32, row-major tokens.

  Same numbers as DiT/MAE `get_2d_sincos_pos_embed`: because of `np.meshgrid(grid_w, grid_h)`
  ('xy' indexing), the FIRST half of the channels encodes the column (w) index and the second
  half the row (h) index, despite upstream's "emb_h" naming. Kept bit-compatible so that
  pretrained SiT/DiT checkpoints work.
  """
  if embed_dim % 4:
    raise ValueError(f'2-D sin-cos position embedding needs hidden_size % 4 == 0, got {embed_dim}.')
  grid = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
  emb_0 = _sincos_1d(embed_dim // 2, grid[0])  # column index
  emb_1 = _sincos_1d(embed_dim // 2, grid[1])  # row index
  emb = np.concatenate([emb_0, emb_1], axis=1).astype(np.float32)
  emb.flags.writeable = False  # cached and shared: must not be mutated by callers
  return emb


def timestep_embedding(t: jax.Array, dim: int = TIME_FREQ_DIM,
                       max_period: float = 10000.0) -> jax.Array:
  """DiT sinusoidal timestep features: [B] -> [B, dim] float32, [cos(t*f), sin(t*f)].

  SiT feeds the raw t in [0, 1] (no x1000 scaling as in DiT's integer timesteps).
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def _layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm over the last axis without affine parameters; statistics in float32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return (x32 - mean) * jax.lax.rsqrt(var + eps)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN: x [B, T, D] * (1 + scale[B, D]) + shift[B, D]."""
  return x * (1 + scale[:, None]) + shift[:, None]


# ------------------------------------------------------------------------------------------------
# Embedders
# ------------------------------------------------------------------------------------------------


class PatchEmbed(nnx.Module):
  """Non-overlapping p x p patches -> tokens, plus the frozen sin-cos position embedding.

  [B, H, W, C] -> [B, (H/p)*(W/p), D], tokens in row-major (h outer, w inner) order.
  """

  def __init__(self, grid_size: tuple[int, int], patch_size: int, in_channels: int,
               hidden_size: int, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype):
    self.grid_size = tuple(grid_size)
    self.hidden_size = hidden_size
    self.proj = nnx.Conv(
        in_channels, hidden_size, kernel_size=(patch_size, patch_size),
        strides=(patch_size, patch_size), padding='VALID',
        kernel_init=_part(_patch_kernel_init, (None, None, 'channels', 'embed')),
        bias_init=_part(_zeros, ('embed',)), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.proj(x)  # [B, h, w, D]
    b = x.shape[0]
    x = x.reshape(b, -1, self.hidden_size)
    # A trace-time constant, not a Param: it is neither trained nor checkpointed.
    pos = jnp.asarray(get_2d_sincos_pos_embed(self.hidden_size, *self.grid_size))
    # The residual stream is kept in float32 (as torch autocast does); matmuls use `dtype`.
    return x.astype(jnp.float32) + pos[None]


class TimestepEmbedder(nnx.Module):
  """t [B] -> [B, D]: sinusoidal features -> Linear -> SiLU -> Linear."""

  def __init__(self, hidden_size: int, *, rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype,
               frequency_embedding_size: int = TIME_FREQ_DIM, output_init=_normal02):
    self.frequency_embedding_size = frequency_embedding_size
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    # Indices 0 and 2 match upstream's nn.Sequential(Linear, SiLU, Linear).
    self.mlp = nnx.Sequential(
        _linear(frequency_embedding_size, hidden_size, ('time_freq', 'embed'),
                kernel_init=_normal02, **kw),
        nnx.silu,
        _linear(hidden_size, hidden_size, ('cond', 'embed'), kernel_init=output_init, **kw),
    )

  def __call__(self, t: jax.Array) -> jax.Array:
    return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nnx.Module):
  """y [B] int -> [B, D]. Row `num_classes` is the null label used for classifier-free guidance.

  Label dropout itself is done by the caller (replace y by num_classes), not here.
  """

  def __init__(self, num_classes: int, hidden_size: int, *, rngs: nnx.Rngs, dtype: Dtype,
               param_dtype: Dtype):
    self.num_classes = num_classes
    self.embedding_table = nnx.Embed(
        num_classes + 1, hidden_size,
        embedding_init=_part(_normal02, ('classes', 'embed')),
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, y: jax.Array) -> jax.Array:
    return self.embedding_table(y)


# ------------------------------------------------------------------------------------------------
# Transformer block
# ------------------------------------------------------------------------------------------------


class Attention(nnx.Module):
  """Multi-head self-attention, [B, T, D] -> [B, T, D] (timm layout: qkv = [3, heads, hd])."""

  def __init__(self, hidden_size: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Dtype,
               param_dtype: Dtype, implementation: str = 'auto'):
    self.num_heads = num_heads
    self.implementation = implementation  # models/attention.py
    kw = dict(kernel_init=_xavier, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.qkv = _linear(hidden_size, 3 * hidden_size, ('embed', 'qkv'), **kw)
    self.proj = _linear(hidden_size, hidden_size, ('heads', 'embed'), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, T, heads, hd]
    # Scale 1/sqrt(hd); every implementation does the softmax in float32.
    out = attention.attend(q, k, v, implementation=self.implementation)
    return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
  """fc1 -> GELU(tanh approximation) -> fc2, [B, T, D] -> [B, T, D]."""

  def __init__(self, hidden_size: int, mlp_hidden: int, *, rngs: nnx.Rngs, dtype: Dtype,
               param_dtype: Dtype):
    kw = dict(kernel_init=_xavier, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = _linear(hidden_size, mlp_hidden, ('embed', 'mlp'), **kw)
    self.fc2 = _linear(mlp_hidden, hidden_size, ('mlp', 'embed'), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class SiTBlock(nnx.Module):
  """adaLN-Zero transformer block: x [B, T, D], c [B, D] -> [B, T, D]."""

  def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *,
               rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype, attention_impl: str = 'auto'):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.attn = Attention(hidden_size, num_heads, implementation=attention_impl, **kw)
    self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), **kw)
    # Zero init: every block starts as the identity (gates are 0), the "Zero" of adaLN-Zero.
    self.adaLN_modulation = nnx.Sequential(
        nnx.silu,
        _linear(hidden_size, 6 * hidden_size, ('embed', 'adaln'), kernel_init=_zeros, **kw))

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    (shift_msa, scale_msa, gate_msa,
     shift_mlp, scale_mlp, gate_mlp) = jnp.split(self.adaLN_modulation(c), 6, axis=-1)
    x = x + gate_msa[:, None] * self.attn(modulate(_layer_norm(x), shift_msa, scale_msa))
    x = x + gate_mlp[:, None] * self.mlp(modulate(_layer_norm(x), shift_mlp, scale_mlp))
    return x


class FinalLayer(nnx.Module):
  """adaLN-modulated LayerNorm + Linear to patch pixels: [B, T, D], c [B, D] -> [B, T, p*p*C]."""

  def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, rngs: nnx.Rngs,
               dtype: Dtype, param_dtype: Dtype):
    kw = dict(kernel_init=_zeros, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.adaLN_modulation = nnx.Sequential(
        nnx.silu, _linear(hidden_size, 2 * hidden_size, ('embed', 'adaln'), **kw))
    # Zero init: the untrained network predicts exactly 0.
    self.linear = _linear(hidden_size, patch_size * patch_size * out_channels,
                          ('embed', 'patch_out'), **kw)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = jnp.split(self.adaLN_modulation(c), 2, axis=-1)
    return self.linear(modulate(_layer_norm(x), shift, scale))


def projector_mlp(hidden_size: int, projector_dim: int, feature_dim: int, *, rngs: nnx.Rngs,
                  dtype: Dtype, param_dtype: Dtype) -> nnx.Sequential:
  """REPA's projector: Linear(D, P) → SiLU → Linear(P, P) → SiLU → Linear(P, F), applied per
  token; indices 0, 2, 4 match upstream's nn.Sequential, so a torch import is a renaming."""
  kw = dict(kernel_init=_xavier, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
  return nnx.Sequential(
      _linear(hidden_size, projector_dim, ('embed', 'mlp'), **kw), nnx.silu,
      _linear(projector_dim, projector_dim, ('mlp', 'projector'), **kw), nnx.silu,
      _linear(projector_dim, feature_dim, ('projector', 'features'), **kw))


def _block_forward(block: SiTBlock, x: jax.Array, c: jax.Array) -> jax.Array:
  return block(x, c)


# Recompute each block's activations in the backward pass instead of storing them, keeping
# what the policy allows (models/attention.py REMAT_POLICIES).
_BLOCK_FORWARD_REMAT = {name: nnx.remat(_block_forward, policy=policy)
                        for name, policy in attention.REMAT_POLICIES.items()}


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(v, (int, np.integer)):
    return int(v), int(v)
  v = tuple(int(a) for a in v)
  if len(v) != 2:
    raise ValueError(f'input_size must be an int or (H, W), got {v}.')
  return v  # type: ignore[return-value]


class SiT(nnx.Module):
  """Class-conditional SiT velocity network, or a two-time flow-map network.

  Call: `model(x, t, y)` with x [B, H, W, C] (H, W = input_size), t [B] (or scalar) in [0, 1],
  y [B] int in [0, num_classes] (num_classes = null label) -> velocity [B, H, W, C] float32.

  `two_time=True` (METHOD.md §5) adds a second time: `model(x, s, y, t_end=t)` is φ_{s,t}(x) of
  the map X_{s,t}(x) = x + (t − s)·φ_{s,t}(x) for x at time s; t_end defaults to s (the
  diagonal, φ_{s,s} = the velocity). The gap t − s enters the conditioning through its own
  embedder whose output layer starts at zero, so a two-time model whose other weights come
  from a trained velocity model starts as that model for every t (X = one Euler step).

  `dtype` is the matmul/conv dtype (e.g. bf16); parameters are `param_dtype`; the residual
  stream, LayerNorm statistics and the output are float32. `remat=True` rematerialises each
  block (same outputs, less activation memory), keeping what `remat_policy` allows;
  `attention` picks the kernel (models/attention.py).
  """

  def __init__(self, *, depth: int, hidden_size: int, num_heads: int, patch_size: int,
               in_channels: int, input_size: int | Sequence[int], num_classes: int,
               rngs: nnx.Rngs, mlp_ratio: float = 4.0, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, remat: bool = False, two_time: bool = False,
               remat_policy: str = 'nothing', attention_impl: str = 'auto',
               projector: tuple[int, int, int] | None = None):
    h, w = _pair(input_size)
    if h % patch_size or w % patch_size:
      raise ValueError(f'input_size {(h, w)} is not divisible by patch_size {patch_size}; '
                       'pick a patch size that divides the (latent) image size.')
    if hidden_size % num_heads:
      raise ValueError(f'hidden_size {hidden_size} is not divisible by num_heads {num_heads}.')
    if hidden_size % 4:
      raise ValueError(f'hidden_size {hidden_size} must be divisible by 4 (2-D sin-cos '
                       'position embedding).')
    self.depth = depth
    self.hidden_size = hidden_size
    self.num_heads = num_heads
    self.patch_size = patch_size
    self.in_channels = in_channels
    self.out_channels = in_channels  # no learn_sigma: a velocity has the input's channels
    self.input_size = (h, w)
    self.grid_size = (h // patch_size, w // patch_size)
    self.num_classes = num_classes
    self.remat = remat
    self.remat_policy = remat_policy
    self.two_time = two_time

    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.x_embedder = PatchEmbed(self.grid_size, patch_size, in_channels, hidden_size, **kw)
    self.t_embedder = TimestepEmbedder(hidden_size, **kw)
    if two_time:
      self.gap_embedder = TimestepEmbedder(hidden_size, output_init=_zeros, **kw)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size, **kw)
    self.blocks = nnx.List(
        [SiTBlock(hidden_size, num_heads, mlp_ratio, attention_impl=attention_impl, **kw)
         for _ in range(depth)])
    self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, **kw)
    self.projector_depth = 0
    if projector is not None:
      depth_at, projector_dim, feature_dim = projector
      if not 1 <= depth_at <= depth:
        raise ValueError(f'the projector reads the residual stream after block {depth_at}, but '
                         f'the model has blocks 1..{depth}; set config.model.projector_depth.')
      self.projector_depth = depth_at
      # A list of one, as upstream REPA keeps one projector per target encoder.
      self.projectors = nnx.List(
          [projector_mlp(hidden_size, projector_dim, feature_dim, **kw)])

  def unpatchify(self, x: jax.Array) -> jax.Array:
    """[B, T, p*p*C] (per-token order p_row, p_col, C as in DiT) -> [B, H, W, C]."""
    b = x.shape[0]
    (gh, gw), p, c = self.grid_size, self.patch_size, self.out_channels
    x = x.reshape(b, gh, gw, p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, gh, p, gw, p, C]
    return x.reshape(b, gh * p, gw * p, c)

  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array,
               t_end: jax.Array | None = None, project: bool = False):
    """The velocity [B, H, W, C]; with `project=True` also the projector's tokens z̃
    [B, T, F] of the residual stream after block `projector_depth` (REPA)."""
    b = x.shape[0]
    if tuple(x.shape[1:]) != (*self.input_size, self.in_channels):
      raise ValueError(f'expected x of shape [B, {self.input_size[0]}, {self.input_size[1]}, '
                       f'{self.in_channels}], got {x.shape}.')
    if t_end is not None and not self.two_time:
      raise ValueError('this SiT has one time input; a map end time t_end needs a two-time '
                       "model (config.objective.name='flow_map').")
    t = jnp.broadcast_to(jnp.asarray(t), (b,))  # samplers may pass a scalar time

    x = constrain(self.x_embedder(x), ACT_AXES)  # [B, T, D]
    c = self.t_embedder(t) + self.y_embedder(y)  # [B, D]
    if self.two_time:
      gap = jnp.zeros_like(t) if t_end is None else jnp.broadcast_to(jnp.asarray(t_end), (b,)) - t
      c = c + self.gap_embedder(gap)
    if project and not self.projector_depth:
      raise ValueError('this SiT has no projector head; build it with config.model.projector.')
    block_fn = _BLOCK_FORWARD_REMAT[self.remat_policy] if self.remat else _block_forward
    projected = None
    for i, block in enumerate(self.blocks):
      x = constrain(block_fn(block, x, c), ACT_AXES)
      if project and i + 1 == self.projector_depth:
        projected = self.projectors[0](x).astype(jnp.float32)
    velocity = self.unpatchify(self.final_layer(x, c)).astype(jnp.float32)
    return (velocity, projected) if project else velocity


# ------------------------------------------------------------------------------------------------
# Named sizes
# ------------------------------------------------------------------------------------------------

# (depth, hidden_size, num_heads). S/B/L/XL are the DiT/SiT paper sizes; T and XS are small
# sizes for CPU/laptop runs (head dim 32 and 64). P ("pico", ~5 K parameters) is for tests:
# the upstream-PyTorch reference checkpoints under tests/fixtures have its shape.
_SIZE_SHAPES = {
    'P': (2, 8, 2),
    'T': (4, 128, 4),
    'XS': (6, 256, 4),
    'S': (12, 384, 6),
    'B': (12, 768, 12),
    'L': (24, 1024, 16),
    'XL': (28, 1152, 16),
}

# Patch 1 is for small latents (Fashion-MNIST's 7×7×4 autoencoder latents: 49 tokens).
SIT_SIZES: dict[str, dict[str, int]] = {
    f'SiT-{size}/{patch}': dict(depth=d, hidden_size=hd, num_heads=nh, patch_size=patch)
    for size, (d, hd, nh) in _SIZE_SHAPES.items()
    for patch in (1, 2, 4, 8)
}


def sit_from_name(name: str, *, input_size: int | Sequence[int], in_channels: int,
                  num_classes: int, rngs: nnx.Rngs, dtype: Dtype = jnp.float32,
                  param_dtype: Dtype = jnp.float32, remat: bool = False,
                  two_time: bool = False, **options) -> SiT:
  """Builds a named size, e.g. `sit_from_name('SiT-XL/2', input_size=32, ...)`."""
  if name not in SIT_SIZES:
    raise ValueError(f'unknown SiT size {name!r}; valid names: {", ".join(SIT_SIZES)}.')
  return SiT(**SIT_SIZES[name], input_size=input_size, in_channels=in_channels,
             num_classes=num_classes, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
             remat=remat, two_time=two_time, **options)
