"""MMDiT: the text-conditional transformer of Stable Diffusion 3 (Esser et al. 2024), in NNX.

Two token streams, image patches and caption tokens, each with its own weights (adaLN
modulation, qkv, output projection, MLP) and one attention over their concatenation, so text
and image attend to each other in every block. The conditioning vector is
c = t_emb(t) + MLP(pooled caption vector); the last block's text stream is "pre-only" (it
supplies keys and values and is then dropped); the output layer starts at zero, so an
untrained model predicts 0. Padding tokens of the caption are masked out as keys.

Call: `model(x, t, text)` with x [B, H, W, C], t [B] in [0, 1] and `text` = (tokens [B, L, E],
mask [B, L] (1 = token), pooled [B, E]) → velocity [B, H, W, C] float32. The null condition of
classifier-free guidance is the empty caption's encoding, supplied by the data layer.

Parameters carry logical axis names like SiT's ('embed', 'mlp', 'qkv', 'heads', ...), so the
logical-axis rules of the configs shard both families alike; attention kernels and block remat
are SiT's (models/attention.py).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pafm_jax.models import attention
from pafm_jax.models.sit import (ACT_AXES, Dtype, FinalLayer, Mlp, PatchEmbed, TimestepEmbedder,
                                 _layer_norm, _linear, _normal02, _pair, _xavier, _zeros,
                                 modulate)
from pafm_jax.sharding import constrain


class StreamIn(nnx.Module):
  """One stream's half of a joint block before attention: adaLN modulation and q, k, v.

  pre_only: the stream's output is not used after this block (SD3's last context block), so
  only the attention input's shift and scale are made.
  """

  def __init__(self, hidden_size: int, num_heads: int, *, pre_only: bool, rngs: nnx.Rngs,
               dtype: Dtype, param_dtype: Dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.num_heads = num_heads
    self.pre_only = pre_only
    chunks = 2 if pre_only else 6
    self.adaLN_modulation = nnx.Sequential(
        nnx.silu, _linear(hidden_size, chunks * hidden_size, ('embed', 'adaln'),
                          kernel_init=_zeros, **kw))
    self.qkv = _linear(hidden_size, 3 * hidden_size, ('embed', 'qkv'), kernel_init=_xavier, **kw)

  def __call__(self, x: jax.Array, c: jax.Array):
    """x [B, N, D], c [B, D] → (q, k, v each [B, N, heads, hd], the block's modulation)."""
    b, n, d = x.shape
    mod = jnp.split(self.adaLN_modulation(c), 2 if self.pre_only else 6, axis=-1)
    qkv = self.qkv(modulate(_layer_norm(x), mod[0], mod[1]))
    qkv = qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mod


class StreamOut(nnx.Module):
  """One stream's half after attention: gated projection and gated, modulated MLP."""

  def __init__(self, hidden_size: int, mlp_ratio: float, *, rngs: nnx.Rngs, dtype: Dtype,
               param_dtype: Dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.proj = _linear(hidden_size, hidden_size, ('heads', 'embed'), kernel_init=_xavier, **kw)
    self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), **kw)

  def __call__(self, x: jax.Array, attended: jax.Array, mod) -> jax.Array:
    _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
    x = x + gate_msa[:, None] * self.proj(attended)
    return x + gate_mlp[:, None] * self.mlp(modulate(_layer_norm(x), shift_mlp, scale_mlp))


class JointBlock(nnx.Module):
  """Image stream x [B, N, D] and text stream ctx [B, L, D] attending jointly."""

  def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, *, context_pre_only,
               rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype, attention_impl: str = 'auto'):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.attention_impl = attention_impl  # models/attention.py
    self.x_in = StreamIn(hidden_size, num_heads, pre_only=False, **kw)
    self.context_in = StreamIn(hidden_size, num_heads, pre_only=context_pre_only, **kw)
    self.x_out = StreamOut(hidden_size, mlp_ratio, **kw)
    self.context_out = None if context_pre_only else StreamOut(hidden_size, mlp_ratio, **kw)

  def __call__(self, x, ctx, c, text_mask):
    qx, kx, vx, mod_x = self.x_in(x, c)
    qc, kc, vc, mod_c = self.context_in(ctx, c)
    length = ctx.shape[1]
    # Keys: every image token, and the caption's real tokens (padding masked out).
    keys_valid = jnp.concatenate([text_mask.astype(bool),
                                  jnp.ones(x.shape[:2], bool)], axis=1)
    attended = attention.attend(
        jnp.concatenate([qc, qx], 1), jnp.concatenate([kc, kx], 1),
        jnp.concatenate([vc, vx], 1), mask=keys_valid[:, None, None, :],
        implementation=self.attention_impl)
    attended = attended.reshape(attended.shape[:2] + (-1,))
    x = self.x_out(x, attended[:, length:], mod_x)
    if self.context_out is not None:
      ctx = self.context_out(ctx, attended[:, :length], mod_c)
    return x, ctx


def _joint_forward(block: JointBlock, x, ctx, c, mask):
  return block(x, ctx, c, mask)


_JOINT_FORWARD_REMAT = {name: nnx.remat(_joint_forward, policy=policy)
                        for name, policy in attention.REMAT_POLICIES.items()}


class MMDiT(nnx.Module):
  """Text-conditional MMDiT velocity network (module docstring)."""

  def __init__(self, *, depth: int, hidden_size: int, num_heads: int, patch_size: int,
               in_channels: int, input_size: int | Sequence[int], text_width: int,
               rngs: nnx.Rngs, mlp_ratio: float = 4.0, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, remat: bool = False, remat_policy: str = 'nothing',
               attention_impl: str = 'auto'):
    h, w = _pair(input_size)
    if h % patch_size or w % patch_size or hidden_size % num_heads or hidden_size % 4:
      raise ValueError(f'MMDiT: input {(h, w)} must be divisible by patch {patch_size}, and '
                       f'hidden {hidden_size} by heads {num_heads} and by 4.')
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.input_size, self.in_channels, self.patch_size = (h, w), in_channels, patch_size
    self.grid_size = (h // patch_size, w // patch_size)
    self.remat, self.remat_policy = remat, remat_policy
    self.x_embedder = PatchEmbed(self.grid_size, patch_size, in_channels, hidden_size, **kw)
    self.t_embedder = TimestepEmbedder(hidden_size, **kw)
    self.pooled_embedder = nnx.Sequential(
        _linear(text_width, hidden_size, ('text_embed', 'embed'), kernel_init=_normal02, **kw),
        nnx.silu,
        _linear(hidden_size, hidden_size, ('cond', 'embed'), kernel_init=_normal02, **kw))
    self.context_embedder = _linear(text_width, hidden_size, ('text_embed', 'embed'),
                                    kernel_init=_xavier, **kw)
    self.blocks = nnx.List([
        JointBlock(hidden_size, num_heads, mlp_ratio, context_pre_only=i == depth - 1,
                   attention_impl=attention_impl, **kw)
        for i in range(depth)])
    self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, **kw)

  def unpatchify(self, x: jax.Array) -> jax.Array:
    b = x.shape[0]
    (gh, gw), p, c = self.grid_size, self.patch_size, self.in_channels
    return x.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(
        b, gh * p, gw * p, c)

  def __call__(self, x: jax.Array, t: jax.Array, text) -> jax.Array:
    tokens, mask, pooled = text
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    x = constrain(self.x_embedder(x), ACT_AXES)
    ctx = constrain(self.context_embedder(tokens).astype(jnp.float32), ACT_AXES)
    c = self.t_embedder(t) + self.pooled_embedder(pooled)
    block_fn = _JOINT_FORWARD_REMAT[self.remat_policy] if self.remat else _joint_forward
    for block in self.blocks:
      x, ctx = block_fn(block, x, ctx, c, mask)
      x = constrain(x, ACT_AXES)
    return self.unpatchify(self.final_layer(x, c)).astype(jnp.float32)


# (depth, hidden_size, num_heads): SiT's sizes, so MMDiT-B/2 and SiT-B/2 are comparable.
_SIZE_SHAPES = {'T': (4, 128, 4), 'XS': (6, 256, 4), 'S': (12, 384, 6), 'B': (12, 768, 12),
                'L': (24, 1024, 16), 'XL': (28, 1152, 16)}
MMDIT_SIZES = {f'MMDiT-{size}/{patch}': dict(depth=d, hidden_size=hd, num_heads=nh,
                                             patch_size=patch)
               for size, (d, hd, nh) in _SIZE_SHAPES.items() for patch in (2, 4, 8)}


def mmdit_from_name(name: str, **kwargs) -> MMDiT:
  if name not in MMDIT_SIZES:
    raise ValueError(f'unknown MMDiT size {name!r}; valid names: {", ".join(MMDIT_SIZES)}.')
  return MMDiT(**MMDIT_SIZES[name], **kwargs)
