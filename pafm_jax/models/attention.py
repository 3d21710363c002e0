"""Multi-head attention through each backend's fused kernel, and the remat policies of blocks.

`attend(q, k, v, mask, implementation)` computes softmax(q·kᵀ/√d + mask)·v for q, k, v of
shape [B, T, heads, head_dim] (mask: [B, 1, 1, S] bool, True = attend), by one of:

  reference   einsum, float32 softmax, einsum: the textbook formula (and upstream SiT's)
  xla         jax.nn.dot_product_attention's XLA implementation (CPU, and the fallback)
  cudnn       jax.nn.dot_product_attention's cuDNN flash kernel (GPU; bf16/fp16 inputs)
  pallas_tpu  the Pallas flash-attention kernel of jax.experimental.pallas.ops.tpu (TPU; token
              counts that are multiples of 128; opt-in: no TPU was at hand to test it, and a
              sharded batch may need a shard_map around it)
  auto        cudnn on GPU for bf16/fp16 without a padding mask, else xla
              (config.model.attention)

All of them compute the same function; tests/test_attention.py checks it on CPU (xla against
reference, and that the compiled FLOPs agree) and benchmarks/train_step.py measures them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'pallas_tpu', 'reference')
# Block rematerialisation (config.model.remat_policy): what the backward pass may keep.
#   nothing  recompute the whole block (least memory; the default)
#   dots     keep matmul outputs without batch dimensions (weights × activations), recompute
#            the cheap elementwise work (LayerNorm, GELU, modulation, softmax): less compute,
#            more memory (the MLP's 4×D hidden layer is kept)
REMAT_POLICIES = {
    'nothing': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_config(config) -> None:
  model = config.model
  if model.attention not in IMPLEMENTATIONS:
    raise ValueError(f'config.model.attention={model.attention!r}; choose one of '
                     f'{IMPLEMENTATIONS}.')
  if model.remat_policy not in REMAT_POLICIES:
    raise ValueError(f'config.model.remat_policy={model.remat_policy!r}; choose one of '
                     f'{tuple(REMAT_POLICIES)}.')
  platform = jax.devices()[0].platform
  needs = {'cudnn': 'gpu', 'pallas_tpu': 'tpu'}.get(model.attention)
  if needs is not None and platform != needs:
    raise ValueError(f"config.model.attention='{model.attention}' runs on {needs.upper()} only "
                     f"and this run's devices are {platform}; use 'auto'.")


def resolve(implementation: str, dtype, masked: bool = False) -> str:
  """The implementation 'auto' stands for on this backend, for inputs of `dtype`."""
  if implementation != 'auto':
    return implementation
  platform = jax.devices()[0].platform
  # A padding mask (MMDiT's captions) stays on XLA: cuDNN's kernel wants sequence lengths.
  if platform == 'gpu' and not masked and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return 'cudnn'
  return 'xla'


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
           implementation: str = 'auto') -> jax.Array:
  """softmax(q kᵀ / √d) v → [B, T, N, H]; q: [B, T, N, H], k, v: [B, S, N, H], mask:
  [B, 1, 1, S] (True = attend)."""
  implementation = resolve(implementation, q.dtype, masked=mask is not None)
  if implementation == 'reference':
    return reference_attention(q, k, v, mask)
  if implementation == 'pallas_tpu':
    if mask is not None or q.shape[1] % 128 or k.shape[1] % 128:
      raise ValueError("attention 'pallas_tpu' needs token counts that are multiples of 128 "
                       f"and no padding mask (here {q.shape[1]} and {k.shape[1]} tokens, "
                       f"mask {mask is not None}); use 'auto' or 'xla'.")
    # Imported here: the TPU kernels' module is only needed (and only useful) on a TPU.
    from jax.experimental.pallas.ops.tpu import flash_attention  # pylint: disable=g-import-not-at-top
    # The kernel's layout is [B, N, T, H].
    out = flash_attention.flash_attention(
        q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
        sm_scale=1.0 / math.sqrt(q.shape[-1]))
    return out.transpose(0, 2, 1, 3)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        mask: jax.Array | None = None) -> jax.Array:
  """The textbook formula, softmax in float32 (shapes as `attend`)."""
  logits = jnp.einsum('btnh,bsnh->bnts', q, k, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(1.0 / math.sqrt(q.shape[-1]))
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bnts,bsnh->btnh', weights, v)
