"""Representation alignment (REPA / VA-REPA, pafm_jax/repa.py): the schedules against their
closed forms, the loss against a brute-force computation and its normalisation by Σw, λ = 0
against the step without alignment, the sharded step against one device, and the projector
through the torch import."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pafm_jax import convert, objectives, paths, repa, sharding, train, train_state
from pafm_jax.data import pipeline
from pafm_jax.evaluation import classifier
from pafm_jax.models import network
from tests.test_train import assert_sharded_step_matches_single_device, tiny_config

TAU, K = 0.7, 20.0
T_GRID = np.concatenate([np.linspace(0.0, 1.0, 41), [TAU, 0.2, 0.85, 0.999]]).astype(np.float32)


def closed_form(schedule, t, path_name='linear'):
  """w(t) written out per schedule, scalar by scalar (the StableVelocity paper's formulas)."""
  out = []
  for s in map(float, t):
    if schedule == 'uniform':
      out.append(1.0)
    elif schedule == 'hard':   # t and τ both float32, as in the step
      out.append(1.0 if s < float(np.float32(TAU)) else 0.0)
    elif schedule == 'sigmoid':
      out.append(1.0 / (1.0 + math.exp(-K * (TAU - s))))
    elif schedule == 'cosine':
      out.append(0.5 * (1 + math.cos(math.pi * s / TAU)) if s < float(np.float32(TAU)) else 0.0)
    else:
      c = lambda u: min(max(u, 1e-6), 1 - 1e-6)
      if path_name == 'linear':
        snr = lambda u: ((1 - c(u)) / c(u)) ** 2
      else:
        snr = lambda u: 1.0 / math.tan(math.pi * c(u) / 2) ** 2
      out.append(snr(s) / (snr(s) + snr(TAU)))
  return np.array(out)


@pytest.mark.parametrize('schedule', repa.SCHEDULES)
def test_schedules_equal_their_closed_forms(schedule):
  got = np.asarray(repa.schedule_weights(jnp.asarray(T_GRID), schedule, tau=TAU, sharpness=K))
  np.testing.assert_allclose(got, closed_form(schedule, T_GRID), rtol=2e-6, atol=1e-7)
  assert np.all((got >= 0) & (got <= 1))


def test_schedule_landmarks_and_snr_on_the_cosine_path():
  w = lambda name, t, **kw: float(repa.schedule_weights(jnp.float32(t), name, tau=TAU,
                                                        sharpness=K, **kw))
  assert w('sigmoid', TAU) == pytest.approx(0.5)            # the split point
  assert w('snr', TAU) == pytest.approx(0.5, abs=1e-6)
  assert w('cosine', 0.0) == 1.0 and w('cosine', TAU) == 0.0 and w('hard', TAU) == 0.0
  assert w('snr', 0.0) == pytest.approx(1.0) and w('snr', 1.0) == pytest.approx(0.0, abs=1e-6)
  got = repa.schedule_weights(jnp.asarray(T_GRID), 'snr', tau=TAU, path=paths.CosinePath())
  np.testing.assert_allclose(np.asarray(got), closed_form('snr', T_GRID, 'cosine'),
                             rtol=1e-5, atol=1e-6)


def brute_force_loss(z_tilde, z, w):
  """Σ_b w_b·(−mean_n cos(z̃_bn, z_bn)) / Σ_b w_b with explicit loops (float64)."""
  per = []
  for b in range(z.shape[0]):
    cos = [np.dot(z_tilde[b, n], z[b, n]) / (np.linalg.norm(z_tilde[b, n]) * np.linalg.norm(z[b, n]))
           for n in range(z.shape[1])]
    per.append(-np.mean(cos))
  per = np.array(per)
  return float(np.sum(w * per) / np.sum(w)), per


def test_alignment_loss_is_the_weighted_mean_normalised_by_the_weights():
  rng = np.random.default_rng(0)
  z_tilde = rng.normal(size=(6, 5, 3)).astype(np.float32)
  z = rng.normal(size=(6, 5, 3)).astype(np.float32)
  w = np.array([0.0, 0.1, 1.0, 0.5, 0.0, 0.9], np.float32)
  want, per = brute_force_loss(z_tilde.astype(np.float64), z.astype(np.float64), w)
  loss, per_sample = repa.alignment_loss(jnp.asarray(z_tilde), jnp.asarray(z), jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(per_sample), per, rtol=1e-5)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  # Normalised: scaling every weight changes nothing; the weights are not a mean over B.
  scaled, _ = repa.alignment_loss(jnp.asarray(z_tilde), jnp.asarray(z), jnp.asarray(7.0 * w))
  assert float(scaled) == pytest.approx(want, rel=1e-5)
  assert abs(want - float(np.mean(w * per))) > 1e-3
  # Cosine: the loss of a positively rescaled projection is the same; of z itself it is −1.
  assert float(repa.alignment_loss(jnp.asarray(3 * z_tilde), jnp.asarray(z), jnp.asarray(w))[0]
               ) == pytest.approx(want, rel=1e-5)
  assert float(repa.alignment_loss(jnp.asarray(z), jnp.asarray(z), jnp.asarray(w))[0]
               ) == pytest.approx(-1.0, abs=1e-6)
  # Without weight the loss is 0, and rows of weight 0 get no gradient.
  zero, _ = repa.alignment_loss(jnp.asarray(z_tilde), jnp.asarray(z), jnp.zeros(6))
  assert float(zero) == 0.0
  grad = jax.grad(lambda p: repa.alignment_loss(p, jnp.asarray(z), jnp.asarray(w))[0])(
      jnp.asarray(z_tilde))
  assert np.all(np.asarray(grad)[w == 0] == 0) and np.all(np.abs(np.asarray(grad)[w > 0]) > 0)


# ---------------------------------------------------------------------------- the step


@pytest.fixture(scope='module')
def classifier_dir(fmnist_tfds_dir, tmp_path_factory):
  """A domain classifier trained briefly (2 steps of 1 epoch): the real architecture and
  loader, weights that are not a fresh init."""
  directory = tmp_path_factory.mktemp('classifier')
  config = tiny_config(fmnist_tfds_dir, **{'eval.classifier_epochs': 1,
                                           'eval.classifier_dir': str(directory)})
  classifier.train(config, str(directory), steps_per_epoch=2)
  return str(directory)


def repa_config(tfds_dir, classifier_dir, **overrides):
  """SiT-T/4 on Fashion-MNIST (7×7 tokens) aligned to the classifier's 7×7×64 feature map."""
  return tiny_config(tfds_dir, **{
      'model.projector': True, 'model.projector_depth': 2, 'model.projector_dim': 32,
      'model.projector_features': 64, 'objective.repa.weight': 0.5,
      'objective.repa.encoder': 'classifier', 'eval.classifier_dir': classifier_dir,
      **overrides})


def _loss_and_grads(config, alignment, params, batch, net):
  path = paths.get_path(config.objective.path)
  loss_fn = lambda p: objectives.velocity_loss(
      net.apply, p, batch, jax.random.key(3), path=path, target_fn=objectives.fm_target,
      t_sampling='uniform', label_drop=0.1, null_label=10, alignment=alignment)
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


def _model_and_batch(config, *, seed, size):
  """A fresh network of config, its params (rng `seed`) and a batch of the first `size` test
  images with their labels and the classifier's features."""
  net = network.build_network(config)
  params = nnx.to_pure_dict(nnx.state(network.model_factory(config)(jax.random.key(seed)),
                                      nnx.Param))
  images, labels = pipeline.load_arrays(config.data, 'test')
  encoder = repa.frozen_encoder(config)
  feats = encoder.apply(encoder.load_params(), jnp.asarray(images[:size]))
  return net, params, {'image': jnp.asarray(images[:size]), 'label': jnp.asarray(labels[:size]),
                       'repa_features': feats}


def test_lambda_zero_is_bit_identical_to_no_alignment(fmnist_tfds_dir, classifier_dir):
  """The alignment branch with λ = 0 (projector run, encoder features in the batch) gives the
  same loss and the same gradient, bit for bit, as the loss without it."""
  config = repa_config(fmnist_tfds_dir, classifier_dir, **{'objective.name': 'fm'})
  net, params, batch = _model_and_batch(config, seed=0, size=16)
  assert batch['repa_features'].shape == (16, 49, 64)
  zero = objectives.make_alignment(repa_config(fmnist_tfds_dir, classifier_dir),
                                   net.apply_with_projection)
  zero = zero.__class__(**{**zero.__dict__, 'weight': 0.0})
  (loss0, aux0), g0 = _loss_and_grads(config, zero, params, batch, net)
  (loss1, _), g1 = _loss_and_grads(config, None, params, batch, net)
  assert float(aux0['alignment_loss']) != 0.0
  assert np.asarray(loss0).tobytes() == np.asarray(loss1).tobytes()
  body = lambda g: {k: v for k, v in g.items() if k != 'projectors'}
  for (path, a), b in zip(jax.tree.leaves_with_path(body(g1)), jax.tree.leaves(body(g0))):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), jax.tree_util.keystr(path)
  for g in (g0, g1):
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g['projectors']))
  # With λ > 0 the projector and the blocks below it get the alignment's gradient.
  (_, _), g2 = _loss_and_grads(config, zero.__class__(**{**zero.__dict__, 'weight': 0.5}),
                               params, batch, net)
  assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(g2['projectors']))
  # ...and so do the layers below the tap (block 2), but not those above it.
  below = lambda g: np.asarray(g['x_embedder']['proj']['kernel'])
  above = lambda g: np.asarray(g['blocks'][3]['adaLN_modulation']['layers'][1]['kernel'])
  assert not np.array_equal(below(g2), below(g1))
  np.testing.assert_array_equal(above(g2), above(g1))


def test_reported_alignment_loss_is_brute_force_of_the_projection(fmnist_tfds_dir,
                                                                  classifier_dir):
  """The step's alignment loss equals Σw·(−cos)/Σw computed in numpy from the projector's
  own output and the classifier's feature map, at the step's times."""
  config = repa_config(fmnist_tfds_dir, classifier_dir, **{'objective.name': 'fm',
                                                           'objective.label_drop': 0.0})
  net, params, batch = _model_and_batch(config, seed=1, size=8)
  images, labels, feats = batch['image'], batch['label'], batch['repa_features']
  alignment = objectives.make_alignment(config, net.apply_with_projection)
  (_, aux), _ = _loss_and_grads(config, alignment, params, batch, net)
  t = np.asarray(aux['t'])
  eps = jax.random.normal(jax.random.split(jax.random.key(3), 3)[1], images.shape)
  x_t = paths.interpolate(paths.LinearPath(), jnp.asarray(images), eps, jnp.asarray(t))
  _, z_tilde = net.apply_with_projection(params, x_t, jnp.asarray(t), jnp.asarray(labels))
  w = closed_form('sigmoid', t)
  want, _ = brute_force_loss(np.asarray(z_tilde, np.float64), np.asarray(feats, np.float64), w)
  assert float(aux['alignment_loss']) == pytest.approx(want, rel=1e-4)


@pytest.mark.slow
def test_sharded_alignment_step_matches_single_device(fmnist_tfds_dir, classifier_dir):
  """(data=2, fsdp=4) on 8 devices gives the losses and params of the 1-device step, with the
  alignment loss added to StableVM's (whose features come from its drawn pairs, gathered
  across the devices like PAFM's candidates)."""
  config = repa_config(fmnist_tfds_dir, classifier_dir, **{
      'objective.name': 'stablevm', 'objective.stablevm.bank_capacity': 8})
  s1, s8 = assert_sharded_step_matches_single_device(config)
  assert 'projectors' in s8['params'] and 'repa_encoder' in s8
  for a, b in zip(jax.tree.leaves(s1['repa_encoder']), jax.tree.leaves(s8['repa_encoder'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_step_reports_alignment_and_checks_config(fmnist_tfds_dir, classifier_dir):
  config = repa_config(fmnist_tfds_dir, classifier_dir, **{'objective.name': 'fm'})
  mesh = sharding.create_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
  setup = train_state.TrainSetup.create(config, mesh)
  state = setup.init()
  it = pipeline.create_train_iterator(config.data, local_batch_size=16, seed=0)
  step = train.compile_step(setup)
  before = jax.tree.map(np.asarray, state['repa_encoder'])
  state, metrics = step(state, train.to_global_batch(next(it), setup.batch_spec, mesh))
  assert -1.0 <= float(metrics['alignment_loss']) <= 1.0
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state['repa_encoder'])):
    np.testing.assert_array_equal(a, np.asarray(b))   # frozen
  bad = {'model.projector': False}
  with pytest.raises(ValueError, match='config.model.projector=True'):
    objectives.check_config(repa_config(fmnist_tfds_dir, classifier_dir, **bad))
  with pytest.raises(ValueError, match='projector_features=64'):
    objectives.check_config(repa_config(fmnist_tfds_dir, classifier_dir,
                                        **{'model.projector_features': 32}))
  with pytest.raises(ValueError, match='49 patch features'):
    objectives.check_config(repa_config(fmnist_tfds_dir, classifier_dir,
                                        **{'model.name': 'SiT-T/2'}))
  with pytest.raises(ValueError, match='schedule must be one of'):
    objectives.check_config(repa_config(fmnist_tfds_dir, classifier_dir,
                                        **{'objective.repa.schedule': 'linear'}))


def test_dinov2_encoder_rides_in_the_state(fmnist_tfds_dir, classifier_dir):
  """With encoder='dinov2' the state carries the DINOv2 weights read from the directory, and
  the step's features are DINOv2's patch features (patch 4 at 28 px: 7×7, SiT-T/4's tokens)."""
  from pafm_jax.models import dinov2
  path = os.path.join(os.path.dirname(__file__), 'fixtures', 'dinov2_tiny')
  config = repa_config(fmnist_tfds_dir, classifier_dir, **{
      'objective.name': 'fm', 'objective.repa.encoder': 'dinov2',
      'objective.repa.encoder_path': path, 'objective.repa.encoder_resolution': 28,
      'model.projector_features': 32})
  mesh = sharding.create_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
  setup = train_state.TrainSetup.create(config, mesh)
  state = setup.init()
  for a, b in zip(jax.tree.leaves(dinov2.read_params(path)),
                  jax.tree.leaves(state['repa_encoder'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  images, _ = pipeline.load_arrays(config.data, 'test')
  ours = setup.repa_encoder.apply(state['repa_encoder'], jnp.asarray(images[:5]))
  theirs = dinov2.load_dinov2(path, resolution=28).patch_features(images[:5])
  np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)
  it = pipeline.create_train_iterator(config.data, local_batch_size=16, seed=0)
  _, metrics = train.compile_step(setup)(
      state, train.to_global_batch(next(it), setup.batch_spec, mesh))
  assert np.isfinite(float(metrics['alignment_loss']))
  with pytest.raises(ValueError, match='encoder_path'):
    objectives.check_config(repa_config(fmnist_tfds_dir, classifier_dir, **{
        'objective.repa.encoder': 'dinov2'}))


# ---------------------------------------------------------------------------- torch import


def test_projector_round_trips_through_the_torch_import():
  """A REPA state dict's projectors.0.{0,2,4} land in our projector (transposed), and the
  projector computes the upstream MLP Linear → SiLU → Linear → SiLU → Linear in numpy."""
  model = network.sit.SiT(depth=2, hidden_size=8, num_heads=2, patch_size=2, in_channels=4,
                          input_size=8, num_classes=10, rngs=nnx.Rngs(0),
                          projector=(1, 16, 5))
  target = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(0)
  sd = {}
  for path, leaf in jax.tree.leaves_with_path(target):
    name = convert.upstream_name(tuple(k.key for k in path))
    shape = convert._upstream_shape(name, tuple(leaf.shape), False)   # noqa: SLF001
    sd[name] = rng.normal(size=shape).astype(np.float32)
  assert {k for k in sd if k.startswith('projectors.')} == {
      f'projectors.0.{i}.{w}' for i in (0, 2, 4) for w in ('weight', 'bias')}
  params, info = convert.convert_sit_state_dict(sd, target, grid_size=(4, 4), source='repa')
  assert not any(k.startswith('projectors') for k in info.dropped)
  mlp = params['projectors'][0]['layers']
  for i in (0, 2, 4):
    np.testing.assert_array_equal(mlp[i]['kernel'], sd[f'projectors.0.{i}.weight'].T)
    np.testing.assert_array_equal(mlp[i]['bias'], sd[f'projectors.0.{i}.bias'])
  h = rng.normal(size=(3, 8)).astype(np.float64)
  silu = lambda a: a / (1 + np.exp(-a))
  lin = lambda a, i: a @ sd[f'projectors.0.{i}.weight'].T.astype(np.float64) + sd[
      f'projectors.0.{i}.bias']
  want = lin(silu(lin(silu(lin(h, 0)), 2)), 4)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(model, state)
  got = model.projectors[0](jnp.asarray(h, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # A model with a projector needs the checkpoint's; one without drops it.
  missing = {k: v for k, v in sd.items() if not k.startswith('projectors.')}
  with pytest.raises(convert.ConversionError, match="'projectors.0.0.weight' is missing"):
    convert.convert_sit_state_dict(missing, target, grid_size=(4, 4), source='repa')
  plain = nnx.to_pure_dict(nnx.state(network.sit.SiT(
      depth=2, hidden_size=8, num_heads=2, patch_size=2, in_channels=4, input_size=8,
      num_classes=10, rngs=nnx.Rngs(0)), nnx.Param))
  _, info = convert.convert_sit_state_dict(sd, plain, grid_size=(4, 4), source='repa')
  assert {f'projectors.0.{i}.weight' for i in (0, 2, 4)} <= set(info.dropped)
