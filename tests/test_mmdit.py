"""MMDiT (models/mmdit.py): zero-initialised output, masked caption padding, the text stream's
influence after a training step, and logical axis names on every parameter."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pafm_jax.models import mmdit


def _model(seed=0):
  return mmdit.MMDiT(depth=3, hidden_size=32, num_heads=2, patch_size=2, in_channels=1,
                     input_size=8, text_width=16, rngs=nnx.Rngs(params=seed))


def _text(rng, b=3, length=5, real=(5, 3, 1)):
  k1, k2 = jax.random.split(rng)
  tokens = jax.random.normal(k1, (b, length, 16))
  mask = (jnp.arange(length)[None] < jnp.array(real)[:, None]).astype(jnp.int32)
  return tokens, mask, jax.random.normal(k2, (b, 16))


def _jitted(graphdef):
  """The model as a jitted function of its parameters (eager NNX calls are slow to test)."""
  return jax.jit(lambda params, x, t, text: nnx.merge(graphdef, params)(x, t, text))


def _perturbed(model, scale=0.1):
  graphdef, state = nnx.split(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(state))
  keys = jax.random.split(jax.random.key(7), len(leaves))
  leaves = [a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
  return graphdef, jax.tree.unflatten(treedef, leaves)


def test_untrained_model_predicts_exactly_zero():
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  graphdef, params = nnx.split(_model(), nnx.Param)
  out = _jitted(graphdef)(params, x, jnp.array([0.1, 0.5, 0.9]), _text(jax.random.key(1)))
  assert out.shape == x.shape
  np.testing.assert_array_equal(out, np.zeros(x.shape))


def test_caption_padding_is_masked_out():
  """More padding tokens, with arbitrary values, leave the output unchanged."""
  graphdef, params = _perturbed(_model())
  model = functools.partial(_jitted(graphdef), params)
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  t = jnp.array([0.2, 0.5, 0.8])
  tokens, mask, pooled = _text(jax.random.key(1))
  junk = 5.0 * jax.random.normal(jax.random.key(2), (3, 4, 16))
  longer = (jnp.concatenate([tokens, junk], 1),
            jnp.concatenate([mask, jnp.zeros((3, 4), jnp.int32)], 1), pooled)
  np.testing.assert_allclose(model(x, t, longer), model(x, t, (tokens, mask, pooled)),
                             rtol=1e-5, atol=1e-5)
  # ... while a real token does change it.
  changed = (tokens.at[1, 0].add(1.0), mask, pooled)
  assert not np.allclose(model(x, t, changed)[1], model(x, t, (tokens, mask, pooled))[1])


def test_text_tokens_change_the_output_once_training_opens_the_gates():
  """From the zero-initialised model, Adam steps of the FM loss make the output depend on the
  caption's tokens (not only its pooled vector). With adaLN-Zero gates and a zero output
  layer, the first step can only move the output layer (every other gradient passes through
  it), so the tokens matter from the second step on — exactly then, not later."""
  model = _model()
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  x0 = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  eps = jax.random.normal(jax.random.key(1), x0.shape)
  t = jnp.array([0.3, 0.6, 0.9])
  text = _text(jax.random.key(2))
  x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps

  apply = _jitted(graphdef)
  tx = optax.adam(1e-2)

  @jax.jit
  def step(p, opt_state):
    grads = jax.grad(lambda q: jnp.mean((apply(q, x_t, t, text) - (eps - x0)) ** 2))(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  opt_state = tx.init(params)
  other_tokens = (text[0] + 1.0, text[1], text[2])
  token_effect = []
  for _ in range(2):
    params, opt_state = step(params, opt_state)
    token_effect.append(float(jnp.max(jnp.abs(apply(params, x_t, t, text) -
                                              apply(params, x_t, t, other_tokens)))))
  assert token_effect[0] == 0.0 and token_effect[1] > 1e-4, token_effect


def test_last_text_block_is_pre_only_and_every_parameter_has_logical_axes():
  model = _model()
  assert model.blocks[-1].context_out is None and model.blocks[-1].context_in.pre_only
  assert all(b.context_out is not None for b in list(model.blocks)[:-1])
  state = nnx.state(model, nnx.Param)
  for path, leaf in jax.tree.leaves_with_path(
      state, is_leaf=lambda v: isinstance(v, nnx.Variable)):
    axes = getattr(leaf, 'out_sharding', None) or getattr(leaf, 'sharding_names', None)
    assert axes is not None and len(axes) == leaf.get_value().ndim, jax.tree_util.keystr(path)


def test_named_sizes_match_sit():
  from pafm_jax.models import sit
  for name, shape in mmdit.MMDIT_SIZES.items():
    assert sit.SIT_SIZES[name.replace('MMDiT', 'SiT')] == shape
