"""The attention kernels compute the textbook formula, the fused path costs no more FLOPs than
the plain one, and every remat policy gives the un-rematerialised outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pafm_jax.models import attention
from tests.test_sit import fwd, inputs, make_tiny, perturb
from tests.test_train import tiny_config


def _numpy_attention(q, k, v, mask=None):
  """softmax(q kᵀ/√d) v in float64, one (batch, head) at a time."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  out = np.zeros_like(q)
  for b in range(q.shape[0]):
    for n in range(q.shape[2]):
      logits = q[b, :, n] @ k[b, :, n].T / np.sqrt(q.shape[-1])
      if mask is not None:
        logits = np.where(np.asarray(mask)[b, 0, 0][None, :], logits, -np.inf)
      w = np.exp(logits - logits.max(-1, keepdims=True))
      out[b, :, n] = (w / w.sum(-1, keepdims=True)) @ v[b, :, n]
  return out


@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('implementation', ['auto', 'xla', 'reference'])
def test_every_cpu_implementation_is_the_formula(implementation, masked):
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 9, 4, 16))
  mask = (jnp.arange(9)[None, None, None, :] < jnp.asarray([9, 5])[:, None, None, None]
          if masked else None)
  got = attention.attend(q, k, v, mask, implementation)
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, mask), rtol=1e-5, atol=1e-6)


def _forward_flops(model, x, t, y):
  graphdef, params = nnx.split(model)
  return jax.jit(lambda p: nnx.merge(graphdef, p)(x, t, y)).lower(params).compile(
      ).cost_analysis()['flops']


def _train_step_flops(model, x, t, y):
  graphdef, params = nnx.split(model)

  def loss(p):
    return jnp.mean(nnx.merge(graphdef, p)(x, t, y) ** 2)

  compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
  return compiled.cost_analysis()['flops'], compiled(params)


def test_fused_attention_equals_the_plain_one_at_the_same_compiled_flops():
  x, t, y = inputs()
  fused = perturb(make_tiny(attention_impl='auto'))
  plain = perturb(make_tiny(attention_impl='reference'))
  np.testing.assert_allclose(fwd(fused, x, t, y), fwd(plain, x, t, y), rtol=1e-5, atol=1e-6)
  assert _forward_flops(fused, x, t, y) == _forward_flops(plain, x, t, y)
  flops_fused, (loss_fused, grads_fused) = _train_step_flops(fused, x, t, y)
  flops_plain, (loss_plain, grads_plain) = _train_step_flops(plain, x, t, y)
  # The backward passes differentiate two ways of writing the softmax (0.09 % apart here).
  assert abs(flops_fused / flops_plain - 1) < 5e-3
  np.testing.assert_allclose(loss_fused, loss_plain, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_fused), jax.tree.leaves(grads_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_remat_policies_keep_outputs_and_gradients_and_recompute_what_they_drop():
  x, t, y = inputs()
  flops_plain, (loss_plain, grads_plain) = _train_step_flops(perturb(make_tiny()), x, t, y)
  flops = {}
  for policy in attention.REMAT_POLICIES:
    flops[policy], (loss, grads) = _train_step_flops(
        perturb(make_tiny(remat=True, remat_policy=policy)), x, t, y)
    np.testing.assert_allclose(loss, loss_plain, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_plain)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # Keeping the matmuls recomputes only elementwise work; keeping nothing redoes the forward.
  assert flops_plain < flops['dots'] < flops['nothing']


@pytest.mark.parametrize('field,value,message', [
    ('model.attention', 'cudnn', 'GPU only'), ('model.attention', 'pallas_tpu', 'TPU only'),
    ('model.attention', 'flash', 'choose one of'), ('model.remat_policy', 'some', 'choose one of')])
def test_unavailable_kernels_are_refused_up_front(field, value, message):
  if value == {'gpu': 'cudnn', 'tpu': 'pallas_tpu'}.get(jax.devices()[0].platform):
    pytest.skip(f'{value} runs on this backend')
  with pytest.raises(ValueError, match=message):
    attention.check_config(tiny_config('/nonexistent', **{field: value}))
