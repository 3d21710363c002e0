"""Tests of the SiT velocity network against independent references (formulas, numpy forwards)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pafm_jax.models import sit as sit_lib
from pafm_jax.models.sit import SIT_SIZES, SiT, sit_from_name

# A tiny model: everything except the parameter counts runs at this size.
TINY = dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, in_channels=3, input_size=8,
            num_classes=5)


@functools.lru_cache(maxsize=None)
def _fresh(seed, overrides):
  return SiT(**{**TINY, **dict(overrides)}, rngs=nnx.Rngs(seed))


def make_tiny(seed=0, **overrides):
  """A freshly initialised tiny model (a clone of a cached one: initialisation is slow eagerly)."""
  return nnx.clone(_fresh(seed, tuple(sorted(overrides.items()))))


def perturb(model, seed=1, scale=0.1):
  """Adds N(0, scale^2) noise to every Param, so zero-initialised layers do something."""
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  state = jax.tree.map(
      lambda l: l + jnp.asarray(scale * rng.standard_normal(l.shape), l.dtype), state)
  nnx.update(model, state)
  return model


@nnx.jit
def fwd(model, x, t, y):
  return model(x, t, y)


def inputs(batch=3, seed=0, size=8, channels=3, num_classes=5):
  kx, kt, ky = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (batch, size, size, channels))
  t = jax.random.uniform(kt, (batch,))
  y = jax.random.randint(ky, (batch,), 0, num_classes + 1)  # includes the null label
  return x, t, y


def param_leaves(model):
  return list(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def n(a):
  return np.asarray(a, np.float64)


# ---------------------------------------------------------------------------------------------
# Independent numpy references
# ---------------------------------------------------------------------------------------------


def ref_pos_embed(dim, gh, gw):
  """DiT/MAE 2-D sin-cos, written per token: first half of the channels = column index j."""
  q = dim // 4
  omega = 1.0 / 10000.0**(np.arange(q) / q)
  out = np.zeros((gh * gw, dim))
  for i in range(gh):
    for j in range(gw):
      k = i * gw + j
      out[k, 0 * q:1 * q] = np.sin(j * omega)
      out[k, 1 * q:2 * q] = np.cos(j * omega)
      out[k, 2 * q:3 * q] = np.sin(i * omega)
      out[k, 3 * q:4 * q] = np.cos(i * omega)
  return out


def ref_timestep(t, dim=256):
  t = n(t)
  half = dim // 2
  out = np.zeros((t.shape[0], dim))
  for k in range(half):
    f = 10000.0**(-k / half)
    out[:, k] = np.cos(t * f)
    out[:, half + k] = np.sin(t * f)
  return out


def np_silu(x):
  return x / (1 + np.exp(-x))


def np_gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_ln(x, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu)**2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps)


def np_lin(x, lin):
  return x @ n(lin.kernel[...]) + n(lin.bias[...])


def np_attention(x, attn, heads):
  b, t, d = x.shape
  hd = d // heads
  qkv = np_lin(x, attn.qkv).reshape(b, t, 3, heads, hd)  # timm layout
  q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [B, h, T, hd]
  logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  o = (p @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
  return np_lin(o, attn.proj)


def np_block(x, c, block, heads):
  mod = np_lin(np_silu(c), block.adaLN_modulation.layers[1])
  s1, sc1, g1, s2, sc2, g2 = np.split(mod, 6, axis=-1)
  h = np_ln(x) * (1 + sc1[:, None]) + s1[:, None]
  x = x + g1[:, None] * np_attention(h, block.attn, heads)
  h = np_ln(x) * (1 + sc2[:, None]) + s2[:, None]
  x = x + g2[:, None] * np_lin(np_gelu_tanh(np_lin(h, block.mlp.fc1)), block.mlp.fc2)
  return x


def np_sit(model, x, t, y):
  x, y = n(x), np.asarray(y)
  b, hgt, wid, ch = x.shape
  p, d = model.patch_size, model.hidden_size
  gh, gw = hgt // p, wid // p
  # Patchify: token (i, j) is the p x p x C block flattened as (row, col, channel).
  patches = x.reshape(b, gh, p, gw, p, ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, -1)
  conv = model.x_embedder.proj
  h = patches @ n(conv.kernel[...]).reshape(p * p * ch, d) + n(conv.bias[...])
  h = h + ref_pos_embed(d, gh, gw)[None]
  mlp = model.t_embedder.mlp.layers
  c = np_lin(np_silu(np_lin(ref_timestep(t), mlp[0])), mlp[2])
  c = c + n(model.y_embedder.embedding_table.embedding[...])[y]
  for block in model.blocks:
    h = np_block(h, c, block, model.num_heads)
  fl = model.final_layer
  shift, scale = np.split(np_lin(np_silu(c), fl.adaLN_modulation.layers[1]), 2, axis=-1)
  tok = np_lin(np_ln(h) * (1 + scale[:, None]) + shift[:, None], fl.linear)  # [B, T, p*p*C]
  out = np.zeros_like(x)
  for i in range(gh):
    for j in range(gw):
      for pi in range(p):
        for pj in range(p):
          k = (pi * p + pj) * ch
          out[:, i * p + pi, j * p + pj, :] = tok[:, i * gw + j, k:k + ch]
  return out


# ---------------------------------------------------------------------------------------------
# Parameter counts (abstract, no allocation)
# ---------------------------------------------------------------------------------------------


def formula_param_count(depth, d, p, c, classes, mlp_ratio=4, freq=256):
  """Sum of the layer sizes of the architecture, counted by hand."""
  lin = lambda i, o: i * o + o
  hidden = int(d * mlp_ratio)
  patch = p * p * c * d + d
  time = lin(freq, d) + lin(d, d)
  label = (classes + 1) * d
  block = lin(d, 3 * d) + lin(d, d) + lin(d, hidden) + lin(hidden, d) + lin(d, 6 * d)
  final = lin(d, 2 * d) + lin(d, p * p * c)
  return patch + time + label + depth * block + final


def count_abstract(name):
  model = nnx.eval_shape(lambda: sit_from_name(name, input_size=32, in_channels=4,
                                               num_classes=1000, rngs=nnx.Rngs(0)))
  return sum(math.prod(v.shape) for _, v in param_leaves(model))


def test_param_count_xl2():
  got = count_abstract('SiT-XL/2')
  assert got == formula_param_count(28, 1152, 2, 4, 1000) == 674_816_272
  # DiT-XL/2's published 675,129,632 counts the frozen pos_embed (256 x 1152) and the 4 extra
  # learn_sigma output channels (1152 x 16 + 16); neither exists here.
  assert got == 675_129_632 - 256 * 1152 - (1152 * 16 + 16)
  assert abs(got / 675_129_632 - 1) < 0.005


def test_param_count_b2():
  got = count_abstract('SiT-B/2')
  assert got == formula_param_count(12, 768, 2, 4, 1000) == 130_303_504
  assert abs(got / 130e6 - 1) < 0.01  # DiT/SiT-B/2: "130M"


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------


def test_fresh_model_outputs_exact_zero():
  model = make_tiny()
  out = fwd(model, *inputs())
  assert out.shape == (3, 8, 8, 3) and out.dtype == jnp.float32
  assert np.all(np.asarray(out) == 0.0)


def test_initialisers():
  model = make_tiny()
  # Patch conv: Xavier on the flattened [p*p*C, D] view (fan_in 12, fan_out 64), not the stock
  # conv Xavier (which would use fan_out = 64 * p * p and a bound of ~0.15).
  k = np.abs(np.asarray(model.x_embedder.proj.kernel[...]))
  bound = math.sqrt(6 / (2 * 2 * 3 + 64))
  assert k.max() <= bound and k.max() > 0.95 * bound
  assert np.all(np.asarray(model.x_embedder.proj.bias[...]) == 0)
  # Time MLP and label table: N(0, 0.02).
  for arr in (model.t_embedder.mlp.layers[0].kernel[...], model.y_embedder.embedding_table.embedding[...]):
    assert abs(float(np.std(arr)) - 0.02) < 0.002
  # Other Linears: Xavier-uniform, zero bias.
  qkv = model.blocks[0].attn.qkv
  assert np.abs(np.asarray(qkv.kernel[...])).max() <= math.sqrt(6 / (64 + 192))
  assert np.all(np.asarray(qkv.bias[...]) == 0)
  # adaLN-Zero and the output layer.
  for lin in (model.blocks[0].adaLN_modulation.layers[1], model.final_layer.linear,
              model.final_layer.adaLN_modulation.layers[1]):
    assert np.all(np.asarray(lin.kernel[...]) == 0) and np.all(np.asarray(lin.bias[...]) == 0)


def test_label_table_has_null_row():
  model = make_tiny()
  table = model.y_embedder.embedding_table.embedding
  assert table.shape == (TINY['num_classes'] + 1, TINY['hidden_size'])
  perturb(model)
  x, t, _ = inputs()
  null = fwd(model, x, t, jnp.full((3,), TINY['num_classes']))
  cls0 = fwd(model, x, t, jnp.zeros((3,), jnp.int32))
  assert np.all(np.isfinite(np.asarray(null)))
  assert not np.allclose(null, cls0)


# ---------------------------------------------------------------------------------------------
# Fixed embeddings
# ---------------------------------------------------------------------------------------------


def test_pos_embed_formula_and_not_a_param():
  for dim, gh, gw in [(64, 4, 4), (32, 2, 3)]:
    np.testing.assert_allclose(sit_lib.get_2d_sincos_pos_embed(dim, gh, gw),
                               ref_pos_embed(dim, gh, gw), atol=1e-6)
  model = make_tiny()
  for path, v in param_leaves(model):
    assert 'pos' not in '.'.join(map(str, path))
    assert v.shape != (16, 64)  # [T, D]: no stored position table
  # It is really added: with the conv zeroed, the patch embedder returns the pos embed.
  model.x_embedder.proj.kernel[...] = jnp.zeros_like(model.x_embedder.proj.kernel[...])
  emb = model.x_embedder(inputs(batch=2)[0])
  np.testing.assert_allclose(emb, np.broadcast_to(ref_pos_embed(64, 4, 4), (2, 16, 64)),
                             atol=1e-6)


def test_timestep_embedding_formula():
  t = jnp.array([0.0, 0.013, 0.5, 0.999, 1.0])
  np.testing.assert_allclose(sit_lib.timestep_embedding(t), ref_timestep(t), atol=2e-6)


# ---------------------------------------------------------------------------------------------
# Forward pass vs numpy
# ---------------------------------------------------------------------------------------------


def test_block_matches_numpy():
  model = perturb(make_tiny())
  block = model.blocks[0]
  kx, kc = jax.random.split(jax.random.key(3))
  x = jax.random.normal(kx, (2, 16, 64))
  c = jax.random.normal(kc, (2, 64))
  got = block(x, c)
  want = np_block(n(x), n(c), block, TINY['num_heads'])
  assert np.abs(want).max() > 1.0  # the residual branches are active
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_full_model_matches_numpy():
  model = perturb(make_tiny())
  x, t, y = inputs()
  got = fwd(model, x, t, y)
  want = np_sit(model, x, t, y)
  assert np.abs(want).std() > 0.1
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_remat_gives_same_output_and_grads():
  plain = perturb(make_tiny())
  remat = perturb(make_tiny(remat=True))
  x, t, y = inputs()
  np.testing.assert_allclose(fwd(remat, x, t, y), fwd(plain, x, t, y), atol=1e-6, rtol=0)

  grad = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x, t, y)**2)))
  g_plain = jax.tree.leaves(grad(plain))
  g_remat = jax.tree.leaves(grad(remat))
  assert len(g_plain) == len(g_remat) > 0
  for a, b in zip(g_plain, g_remat):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_compute_returns_float32_close_to_fp32():
  ref = perturb(make_tiny())
  low = perturb(make_tiny(dtype=jnp.bfloat16))
  assert all(v.dtype == jnp.float32 for _, v in param_leaves(low))
  x, t, y = inputs()
  a, b = fwd(ref, x, t, y), fwd(low, x, t, y)
  assert b.dtype == jnp.float32
  assert float(jnp.abs(a - b).max()) < 0.05 * float(jnp.abs(a).max())


def test_scalar_time_broadcasts():
  model = perturb(make_tiny())
  x, _, y = inputs()
  np.testing.assert_allclose(fwd(model, x, 0.3, y), fwd(model, x, jnp.full((3,), 0.3), y), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Sharding annotations
# ---------------------------------------------------------------------------------------------

ALLOWED_LOGICAL = {'embed', 'qkv', 'heads', 'mlp', 'adaln', 'patch_out', 'classes', 'time_freq',
                   'cond', 'channels'}


def test_every_param_has_logical_axes():
  model = make_tiny()
  leaves = param_leaves(model)
  # conv 2 + time MLP 4 + label table 1, five Linears per block, two in the final layer.
  assert len(leaves) == 2 + 4 + 1 + 10 * TINY['depth'] + 4
  for path, v in leaves:
    meta = v.get_metadata()
    names = meta.get('out_sharding')
    assert names is not None, path
    assert len(names) == v.ndim, (path, names)
    used = [a for a in names if a is not None]
    assert len(used) == len(set(used)), (path, names)
    assert set(used) <= ALLOWED_LOGICAL, (path, names)
    assert meta['eager_sharding'] is False, path
  spec = {'.'.join(map(str, p)): v.get_metadata()['out_sharding'] for p, v in leaves}
  assert spec['blocks.0.attn.qkv.kernel'] == ('embed', 'qkv')
  assert spec['blocks.1.attn.proj.kernel'] == ('heads', 'embed')
  assert spec['blocks.0.mlp.fc1.kernel'] == ('embed', 'mlp')
  assert spec['blocks.0.mlp.fc2.kernel'] == ('mlp', 'embed')
  assert spec['blocks.0.mlp.fc2.bias'] == ('embed',)
  assert spec['blocks.0.adaLN_modulation.layers.1.kernel'] == ('embed', 'adaln')
  assert spec['final_layer.linear.kernel'] == ('embed', 'patch_out')
  assert spec['y_embedder.embedding_table.embedding'] == ('classes', 'embed')
  assert spec['t_embedder.mlp.layers.0.kernel'] == ('time_freq', 'embed')
  assert spec['t_embedder.mlp.layers.2.kernel'] == ('cond', 'embed')
  assert spec['x_embedder.proj.kernel'] == (None, None, 'channels', 'embed')


def test_runs_under_logical_rules():
  from pafm_jax import sharding
  mesh = sharding.create_mesh({'data': 1, 'fsdp': -1})
  rules = [('act_batch', ('data', 'fsdp')), ('act_length', None), ('act_embed', None),
           ('embed', 'fsdp')]
  model = perturb(make_tiny())
  x, t, y = inputs(batch=len(jax.devices()))
  want = fwd(model, x, t, y)
  with sharding.logical_rules(mesh, rules):
    got = nnx.jit(lambda m, x, t, y: m(x, t, y))(model, x, t, y)
  np.testing.assert_allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------


def test_registry():
  for size, (d, h, nh) in {'S': (12, 384, 6), 'B': (12, 768, 12), 'L': (24, 1024, 16),
                           'XL': (28, 1152, 16), 'T': (4, 128, 4), 'XS': (6, 256, 4),
                           'P': (2, 8, 2)}.items():
    for p in (1, 2, 4, 8):
      assert SIT_SIZES[f'SiT-{size}/{p}'] == dict(depth=d, hidden_size=h, num_heads=nh,
                                                   patch_size=p)
  with pytest.raises(ValueError, match='SiT-XL/2'):
    sit_from_name('SiT-XXL/2', input_size=32, in_channels=4, num_classes=10, rngs=nnx.Rngs(0))
  model = nnx.eval_shape(lambda: sit_from_name('SiT-T/4', input_size=16, in_channels=4,
                                               num_classes=10, rngs=nnx.Rngs(0), remat=True))
  assert (model.depth, model.hidden_size, model.patch_size, model.remat) == (4, 128, 4, True)


def test_bad_input_size_raises():
  with pytest.raises(ValueError, match='not divisible by patch_size'):
    make_tiny(input_size=9)
