"""The train step and loop: sharding, resumption, configs and bad input."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import fmnist_sit, sit_b2, sit_xl2
from pafm_jax import checkpointing, sharding, train, train_state
from pafm_jax.models import network
from pafm_jax.data import pipeline


def tiny_config(tfds_dir: str, **overrides) -> ml_collections.ConfigDict:
  c = fmnist_sit.get_config()
  c.data.tfds_dir = tfds_dir
  c.model.name = 'SiT-T/4'
  c.global_batch_size = 16
  c.total_steps = 4
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  c.sample_every_steps = 1000
  c.sample.num_steps = 2
  c.sample.per_class = 1
  c.mesh.data = -1
  c.mesh.fsdp = 2
  # In-batch PAFM in the main process: retrieval has its own tests (and one resume test here).
  c.objective.pafm.sources = 'batch'
  c.objective.pafm.stratified = False
  c.retrieval.mode = 'none'
  c.data.worker_count = 0
  return apply_overrides(c, overrides)


def apply_overrides(c: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """Sets each {'a.b.c': value} of `overrides` in `c` (in place) and returns `c`."""
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


# ---------------------------------------------------------------------------- configs


@pytest.mark.parametrize('module,expected', [(sit_b2, 130e6), (sit_xl2, 675e6)])
def test_paper_configs_build_abstractly(module, expected):
  """SiT-B/2 ≈ 130 M and SiT-XL/2 ≈ 675 M parameters (SiT paper), built with eval_shape."""
  config = module.get_config()
  assert (config.global_batch_size, config.total_steps) == (256, 400_000)
  assert config.optimizer.learning_rate == 1e-4 and config.optimizer.ema_decay == 0.9999
  assert (config.data.image_size, config.data.channels, config.data.num_classes) == (32, 4, 1000)
  net = network.build_network(config)
  n = network.count_params(net.abstract_params)
  assert abs(n - expected) / expected < 0.01, n
  # The optimizer state and EMA build abstractly too, and every leaf gets a sharding.
  mesh = sharding.create_mesh({'data': 2, 'fsdp': 4})
  tx = train_state.make_optimizer(config.optimizer)
  abstract = jax.eval_shape(
      lambda r: train_state.init_state(r, make_model=network.model_factory(config), tx=tx),
      jax.random.key(0))
  sh = train_state.state_shardings(abstract, net, tx, mesh, config.logical_axis_rules)
  assert jax.tree.structure(sh) == jax.tree.structure(abstract)


def test_mesh_shape_resolution():
  assert sharding.mesh_shape({'data': -1, 'fsdp': 4}, 8) == (2, 4)
  assert sharding.mesh_shape({'data': 1, 'fsdp': -1}, 8) == (1, 8)
  with pytest.raises(ValueError, match='-1'):
    sharding.mesh_shape({'data': -1, 'fsdp': -1}, 8)
  with pytest.raises(ValueError, match='devices'):
    sharding.mesh_shape({'data': 3, 'fsdp': 1}, 8)


def test_logical_rules_map_dims_and_replicate_indivisible():
  mesh = sharding.create_mesh({'data': 2, 'fsdp': 4})
  rules = (('embed', 'fsdp'), ('act_batch', ('data', 'fsdp')))
  P = jax.sharding.PartitionSpec
  assert sharding.logical_to_spec(('embed', 'mlp'), rules, (64, 256), mesh) == P('fsdp', None)
  assert sharding.logical_to_spec(('classes', 'embed'), rules, (11, 64), mesh) == P(None, 'fsdp')
  # 10 rows cannot be split 4 ways: replicated rather than a crash.
  assert sharding.logical_to_spec(('embed',), rules, (10,), mesh) == P(None)
  assert sharding.logical_to_spec(('act_batch', None), rules, (16, 3), mesh) == P(('data', 'fsdp'), None)


# ---------------------------------------------------------------------------- sharded step


def _run_steps(config, mesh, batches):
  setup = train_state.TrainSetup.create(config, mesh)
  state = setup.init()
  step = train.compile_step(setup)
  losses = []
  for b in batches:
    state, metrics = step(state, train.to_global_batch(b, setup.batch_spec, mesh))
    losses.append(float(metrics['loss']))
  return state, losses


def assert_sharded_step_matches_single_device(config):
  """Three real batches through the (data=2, fsdp=4) step on 8 devices and through the
  one-device step: the same losses and params (≤ 1e-5); returns both final states."""
  it = pipeline.create_train_iterator(config.data, local_batch_size=16, process_index=0,
                                      process_count=1, seed=0)
  batches = [next(it) for _ in range(3)]
  single = sharding.create_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
  multi = sharding.create_mesh({'data': 2, 'fsdp': 4})
  s1, l1 = _run_steps(config, single, batches)
  s8, l8 = _run_steps(config, multi, batches)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  flat8 = dict(jax.tree.leaves_with_path(s8['params']))
  for path, a in jax.tree.leaves_with_path(s1['params']):
    np.testing.assert_allclose(np.asarray(flat8[path]), np.asarray(a), rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
  return s1, s8


@pytest.mark.slow
@pytest.mark.parametrize('objective', ['fm', 'pafm', 'stablevm'])
def test_sharded_step_matches_single_device(fmnist_tfds_dir, objective):
  """(data=2, fsdp=4) on 8 devices gives the loss and params of the 1-device step.

  For PAFM the in-batch candidates are the global batch in both runs, so the targets agree
  only if the sharded step gathers every shard's endpoints; StableVM's bank is split along its
  slots over all 8 devices.
  """
  assert jax.device_count() == 8
  config = tiny_config(fmnist_tfds_dir, **{'objective.name': objective,
                                           'objective.stablevm.bank_capacity': 8})
  s1, s8 = assert_sharded_step_matches_single_device(config)
  # Parameters really are FSDP-sharded: the hidden dim (128) split 4 ways.
  fc1 = s8['params']['blocks'][0]['mlp']['fc1']['kernel']
  assert fc1.shape == (128, 512)
  assert {s.data.shape for s in fc1.addressable_shards} == {(32, 512)}
  mu = s8['opt_state'][1][0].mu['blocks'][0]['mlp']['fc1']['kernel']
  assert {s.data.shape for s in mu.addressable_shards} == {(32, 512)}
  if objective == 'stablevm':
    for a, b in zip(jax.tree.leaves(s1['memory']), jax.tree.leaves(s8['memory'])):
      np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    images = s8['memory']['images']   # [11 rows, 8 slots, 28, 28, 1]: one slot per device
    assert {s.data.shape[1] for s in images.addressable_shards} == {1}


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_state_and_tracks_fp32_loss(fmnist_tfds_dir):
  config = tiny_config(fmnist_tfds_dir)
  it = pipeline.create_train_iterator(config.data, local_batch_size=16, process_index=0,
                                      process_count=1, seed=0)
  batches = [next(it) for _ in range(2)]
  mesh = sharding.create_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
  s32, l32 = _run_steps(config, mesh, batches)
  config.model.dtype = 'bfloat16'
  s16, l16 = _run_steps(config, mesh, batches)
  assert {x.dtype for x in jax.tree.leaves(s16['params'])} == {jnp.dtype('float32')}
  assert {x.dtype for x in jax.tree.leaves(s16['ema_params'])} == {jnp.dtype('float32')}
  np.testing.assert_allclose(l16, l32, rtol=2e-2)


def test_flatten_config_for_hparams():
  flat = train.flatten_config(fmnist_sit.get_config())
  assert flat['model.name'] == 'SiT-T/4' and flat['optimizer.learning_rate'] == 2e-3
  assert flat['total_steps'] == 1000 and isinstance(flat['logical_axis_rules'], str)


# ---------------------------------------------------------------------------- the loop


@pytest.mark.slow
@pytest.mark.parametrize('objective', ['stablevm', 'pafm_noisy_retrieval'])
def test_resume_is_bit_identical(fmnist_tfds_dir, tmp_path, objective):
  """N steps, stop, resume to 2N == 2N uninterrupted: params, StableVM's bank, data stream
  (with retrieval: the neighbours, t and ε the pipeline attaches). In-batch PAFM's resume is
  tested through kills and restarts in test_fault_tolerance.py."""
  n = 3
  over = {'objective.name': objective, 'objective.stablevm.bank_capacity': 8,
          'checkpoint_every_steps': 100}
  if objective == 'pafm_noisy_retrieval':
    # The exact backend (no ScaNN build); one index shared by both runs.
    over.update({'objective.name': 'pafm', 'objective.pafm.sources': 'batch+retrieved',
                 'objective.pafm.stratified': True, 'retrieval.mode': 'noisy',
                 'retrieval.k': 4, 'retrieval.backend': 'exact',
                 'retrieval.index_dir': str(tmp_path / 'index')})
  c_half = tiny_config(fmnist_tfds_dir, total_steps=n, **over)
  c_full = tiny_config(fmnist_tfds_dir, total_steps=2 * n, **over)
  resumed_dir, straight_dir = str(tmp_path / 'resumed'), str(tmp_path / 'straight')
  first = train.train_and_evaluate(c_half, resumed_dir)
  assert int(first['state']['step']) == n
  assert sorted(os.listdir(os.path.join(resumed_dir, 'checkpoints'))) == [str(n)]
  resumed = train.train_and_evaluate(c_full, resumed_dir)
  straight = train.train_and_evaluate(c_full, straight_dir)
  assert set(resumed['state']) == set(straight['state'])
  for key in resumed['state']:
    for a, b in zip(jax.tree.leaves(resumed['state'][key]), jax.tree.leaves(straight['state'][key])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The data iterator saved at step N continues with the batches N+1.. of a fresh stream.
  fresh = pipeline.create_train_iterator(c_full.data, local_batch_size=16, process_index=0,
                                         process_count=1, seed=c_full.seed)
  expected = [next(fresh)['id'] for _ in range(2 * n)]
  restored_it = pipeline.create_train_iterator(c_full.data, local_batch_size=16,
                                               process_index=0, process_count=1,
                                               seed=c_full.seed)
  manager = checkpointing.create_manager(resumed_dir, save_every=1, max_to_keep=3)
  manager.restore(n, args=ocp.args.Composite(data=pipeline.iterator_restore_args(restored_it)))
  for i in range(n, 2 * n):
    np.testing.assert_array_equal(next(restored_it)['id'], expected[i])
  manager.close()
  # Both runs end with a checkpoint of their last step; a restart at total_steps does nothing.
  assert str(2 * n) in os.listdir(os.path.join(resumed_dir, 'checkpoints'))
  again = train.train_and_evaluate(c_full, resumed_dir)
  assert int(again['state']['step']) == 2 * n
  assert again['metrics'] == {}


@pytest.mark.slow
def test_checkpoint_params_restore_as_plain_arrays(fmnist_tfds_dir, tmp_path):
  config = tiny_config(fmnist_tfds_dir, total_steps=2)
  out = train.train_and_evaluate(config, str(tmp_path))
  ckpt = ocp.StandardCheckpointer().restore(str(tmp_path / 'checkpoints' / '2' / 'state'))
  leaves = jax.tree.leaves(ckpt['params'])
  assert leaves and all(isinstance(x, (np.ndarray, jax.Array)) for x in leaves)
  np.testing.assert_array_equal(
      np.asarray(ckpt['params']['final_layer']['linear']['kernel']),
      np.asarray(out['state']['params']['final_layer']['linear']['kernel']))
  assert int(ckpt['step']) == 2
  samples = os.listdir(tmp_path / 'samples')
  assert samples == ['samples_00000002.png']


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize('overrides,message', [
    ({'model.name': 'SiT-Q/2'}, 'config.model.name'),
    ({'model.name': 'SiT-T/8'}, 'not divisible by the patch size'),
    ({'objective.name': 'diffusion'}, 'config.objective.name'),
    ({'objective.path': 'spiral'}, 'config.objective.path'),
    ({'global_batch_size': 12}, 'not divisible by the 8 batch shards'),
    ({'sample.method': 'rk4'}, 'config.sample.method'),
    ({'objective.pafm.sources': 'batch+retrieved'}, 'config.retrieval.mode'),
    ({'retrieval.mode': 'noisy', 'retrieval.backend': 'faiss'}, 'config.retrieval.backend'),
    ({'retrieval.mode': 'noisy', 'retrieval.key': 'pca'}, 'config.retrieval.key'),
    ({'retrieval.mode': 'clean', 'retrieval.k': 0}, 'config.retrieval.k'),
])
def test_bad_config_fails_before_any_work(overrides, message, tmp_path):
  config = tiny_config('/nonexistent', **overrides)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_missing_dataset_names_package_and_field(tmp_path):
  config = tiny_config(str(tmp_path / 'tfds'), **{'data.idx_dir': str(tmp_path / 'nothing')})
  with pytest.raises(FileNotFoundError) as err:
    train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert 'dataset-fashion-mnist' in str(err.value)
  assert 'config.data.idx_dir' in str(err.value)


def test_workdir_with_other_model_shape_is_refused(tmp_path):
  config = tiny_config('/nonexistent')
  checkpointing.check_and_save_config(config, str(tmp_path))
  saved = json.load(open(tmp_path / 'config.json'))
  assert saved['model']['name'] == 'SiT-T/4'
  other = tiny_config('/nonexistent', **{'model.name': 'SiT-XS/4'})
  with pytest.raises(ValueError, match='model.name'):
    train.train_and_evaluate(other, str(tmp_path))
