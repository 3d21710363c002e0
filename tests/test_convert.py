"""PyTorch checkpoints: the safe reader, the SiT converter and the import tool.

The truths are files made by torch 2.13 and the upstream PyTorch SiT (tests/fixtures/README.md):
the tensors torch wrote, and the velocities the upstream network computed.
"""

import collections
import contextlib
import functools
import io
import json
import os
import pickle
import subprocess
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from pafm_jax import checkpointing, config_checks, convert, sampling, torch_io, train, train_state
from pafm_jax.models import network

from pafm_jax.models.sit import SiT
from pafm_jax.tools import import_torch
from tests.test_train import tiny_config

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES_FILES = ['torch_dtypes.pt', 'torch_dtypes_legacy.pt']
# A: 8×8×4 latents, patch 2, bare EMA state dict in the legacy format.
LEGACY_SD = os.path.join(FIXTURES, 'sit_tiny_ema_legacy.pt')
ARCH_A = dict(depth=2, hidden_size=8, num_heads=2, patch_size=2, in_channels=4, input_size=8,
              num_classes=10)
# B: SiT-P/4 on 28×28×1, a training checkpoint {'model', 'ema', 'opt', 'args'} (zip format).
TRAIN_CKPT = os.path.join(FIXTURES, 'sit_p4_fmnist_checkpoint.pt')
ARCH_B = dict(depth=2, hidden_size=8, num_heads=2, patch_size=4, in_channels=1, input_size=28,
              num_classes=10)
TOL = 1e-4


@pytest.fixture(scope='module')
def ref():
  return dict(np.load(os.path.join(FIXTURES, 'sit_reference.npz')))


def model_of(arch, **overrides):
  """An abstract model (no initialisation work): load_torch_sit gives it its values."""
  return nnx.eval_shape(lambda: SiT(**{**arch, **overrides}, rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=None)
def _jitted_forward(graphdef):
  return jax.jit(lambda state, x, t, y: nnx.merge(graphdef, state)(x, t, y))


def forward(model, x, t, y):
  graphdef, state = nnx.split(model)
  return _jitted_forward(graphdef)(state, x, t, y)


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def ours_vs_upstream(model, ref, prefix, v_key, *, flipped=True):
  """Max |ours − truth|: ours(x, 1 − s, y) vs −v_up(x, s, y), or ours(x, s, y) vs v_up."""
  s = ref[f'{prefix}_s'].astype(np.float64)
  t = 1.0 - s if flipped else s
  got = forward(model, jnp.asarray(nhwc(ref[f'{prefix}_x'])), jnp.asarray(t, jnp.float32),
                jnp.asarray(ref[f'{prefix}_y']))
  want = nhwc(ref[v_key]) * (-1.0 if flipped else 1.0)
  return float(np.max(np.abs(np.asarray(got) - want)))


# ---------------------------------------------------------------------------- reader


@pytest.mark.parametrize('name', DTYPES_FILES)
def test_reader_reproduces_every_dtype_and_layout(name):
  """Both torch.save formats: dtypes, views, offsets, shared storages, a Parameter, 0-d."""
  expected = np.load(os.path.join(FIXTURES, 'torch_dtypes_expected.npz'))
  got = torch_io.load(os.path.join(FIXTURES, name))
  assert sorted(got) == sorted(expected.files)
  for key in expected.files:
    want = expected[key]
    dtype = np.dtype(ml_dtypes.bfloat16) if key == 'bfloat16' else want.dtype
    assert got[key].dtype == dtype and got[key].shape == want.shape, key
    np.testing.assert_array_equal(got[key].astype(want.dtype), want, err_msg=key)
  assert got['transposed'].flags.writeable and got['transposed'].flags.c_contiguous


def test_reader_training_checkpoint_and_lazy_refs():
  ckpt = torch_io.load(TRAIN_CKPT, lazy=True)
  assert sorted(ckpt) == ['args', 'ema', 'model', 'opt']
  assert isinstance(ckpt['args'], torch_io.PickledNamespace)
  assert ckpt['args'].model == 'SiT-P/4' and ckpt['args'].loss_weight is None
  assert ckpt['opt']['param_groups'][0]['betas'] == (0.9, 0.999)
  ema = ckpt['ema']
  assert isinstance(ema, collections.OrderedDict) and list(ema)[0] == 'pos_embed'
  ref = ema['x_embedder.proj.weight']
  assert isinstance(ref, torch_io.TensorRef) and ref.shape == (8, 1, 4, 4)
  assert np.asarray(ref).shape == (8, 1, 4, 4)
  bare = torch_io.load(LEGACY_SD)
  assert isinstance(bare, collections.OrderedDict)
  assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in bare.values())


def test_lazy_load_reads_tensor_bytes_only_when_asked(tmp_path):
  """A damaged record does not stop a lazy load; reading that tensor names the problem."""
  src = os.path.join(FIXTURES, 'torch_dtypes.pt')
  dst = tmp_path / 'damaged.pt'
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w') as zout:
    for item in zin.infolist():
      data = zin.read(item)
      zout.writestr(item, data[:3] if item.filename.endswith('/data/0') else data)
  lazy = torch_io.load(dst, lazy=True)
  damaged = [k for k, v in lazy.items() if v.storage.key == '0']
  with pytest.raises(torch_io.TorchFileError, match='truncated'):
    np.asarray(lazy[damaged[0]])
  with pytest.raises(torch_io.TorchFileError, match='truncated'):
    torch_io.load(dst)


class _RunsCommand:
  """Unpickling this would run a shell command (it pickles as a call of os.system)."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def _as_zip(path, pickled):
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('exploit/data.pkl', pickled)
    zf.writestr('exploit/byteorder', 'little')


def _as_legacy(path, pickled, header=None):
  with open(path, 'wb') as f:
    f.write(header or pickle.dumps(torch_io.LEGACY_MAGIC, protocol=2))
    f.write(pickle.dumps(torch_io.LEGACY_PROTOCOL, protocol=2))
    f.write(pickle.dumps({'little_endian': True}, protocol=2))
    f.write(pickled)
    f.write(pickle.dumps([], protocol=2))


@pytest.mark.parametrize('layout', ['zip', 'legacy', 'legacy_header'])
def test_reader_refuses_foreign_globals_and_runs_nothing(layout, tmp_path):
  marker = tmp_path / 'pwned'
  payload = pickle.dumps({'model': collections.OrderedDict(w=_RunsCommand(f'touch {marker}'))},
                         protocol=2)
  path = tmp_path / 'evil.pt'
  if layout == 'zip':
    _as_zip(path, payload)
  elif layout == 'legacy':
    _as_legacy(path, payload)
  else:  # the very first pickle of a legacy file goes through the same gate
    _as_legacy(path, pickle.dumps(0), header=payload)
  with pytest.raises(torch_io.UnsafePickleError, match=rf'{os.system.__module__}\.system'):
    torch_io.load(path)
  with pytest.raises(torch_io.UnsafePickleError):
    torch_io.load(path, lazy=True)
  assert not marker.exists()


def test_reader_refuses_args_holding_other_objects(tmp_path):
  """argparse.Namespace is allowed as an attribute bag; what it holds is checked like the rest."""
  import argparse
  import pathlib
  ok, bad = tmp_path / 'ok.pt', tmp_path / 'bad.pt'
  _as_zip(ok, pickle.dumps({'args': argparse.Namespace(model='SiT-XL/2', lr=1e-4)}, protocol=2))
  assert vars(torch_io.load(ok)['args']) == {'model': 'SiT-XL/2', 'lr': 1e-4}
  _as_zip(bad, pickle.dumps({'args': argparse.Namespace(out=pathlib.PurePosixPath('/x'))},
                            protocol=2))
  with pytest.raises(torch_io.UnsafePickleError, match='pathlib.PurePosixPath'):
    torch_io.load(bad)


@contextlib.contextmanager
def _torch_named_globals():
  """Stand-ins that pickle under torch's names, so the stdlib pickler can write torch files
  (torch itself is not installed here)."""
  saved = {k: sys.modules.get(k) for k in ('torch', 'torch._utils')}
  mod, utils = types.ModuleType('torch'), types.ModuleType('torch._utils')

  def _rebuild_tensor_v2(*args):
    del args

  class FloatStorage:
    pass

  for obj, module in ((_rebuild_tensor_v2, utils), (FloatStorage, mod)):
    obj.__module__, obj.__qualname__ = module.__name__, obj.__name__
    setattr(module, obj.__name__, obj)
  sys.modules.update({'torch': mod, 'torch._utils': utils})
  try:
    yield _rebuild_tensor_v2, FloatStorage
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


def _write_tensor_file(path, numel, size, stride, offset=0, state=None):
  """A zip torch file with one float32 tensor `t` viewing a storage of `numel` elements
  (`state`: what pickle's BUILD opcode then sets on the rebuilt tensor)."""
  with _torch_named_globals() as (rebuild, float_storage):

    class Storage:
      pass

    class Tensor:

      def __reduce__(self):
        args = (Storage(), offset, size, stride, False, collections.OrderedDict())
        return (rebuild, args) if state is None else (rebuild, args, state)

    class Writer(pickle.Pickler):

      def persistent_id(self, obj):
        return ('storage', float_storage, '0', 'cpu', numel) if isinstance(obj, Storage) else None

    buf = io.BytesIO()
    Writer(buf, protocol=2).dump({'t': Tensor()})
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr('f/data.pkl', buf.getvalue())
    zf.writestr('f/data/0', np.arange(numel, dtype=np.float32).tobytes())


def test_reader_bounds_checks_views(tmp_path):
  good, bad = tmp_path / 'good.pt', tmp_path / 'bad.pt'
  _write_tensor_file(good, numel=12, size=(3, 2), stride=(1, 3), offset=3)
  np.testing.assert_array_equal(torch_io.load(good)['t'], [[3, 6], [4, 7], [5, 8]])
  _write_tensor_file(bad, numel=12, size=(3, 4), stride=(4, 1), offset=1)  # reaches element 12
  with pytest.raises(torch_io.TorchFileError, match='reaches past its storage'):
    torch_io.load(bad, lazy=True)


@pytest.mark.parametrize('state', [{'shape': (1000,)}, (None, {'stride': (1000,)})])
def test_reader_refuses_to_alter_rebuilt_tensors(state, tmp_path):
  """BUILD after the bounds check (dict or slot state) would make the view reach anywhere."""
  path = tmp_path / 'grow.pt'
  _write_tensor_file(path, numel=4, size=(2,), stride=(1,), state=state)
  with pytest.raises(torch_io.UnsafePickleError, match='set the state of TensorRef'):
    torch_io.load(path, lazy=True)


@pytest.mark.parametrize('module,name', [('collections', 'OrderedDict'),
                                         ('argparse', 'Namespace'),
                                         ('torch._utils', '_rebuild_tensor_v2'),
                                         ('torch', 'FloatStorage')])
def test_reader_refuses_to_alter_allowed_globals(module, name, tmp_path):
  """BUILD on an allowed global itself (GLOBAL, state, BUILD), with a dict state or a slot
  state (None, {...}), is refused and changes nothing for later loads."""
  state = b'}X\x08\x00\x00\x00__repr__K\x01s'  # {'__repr__': 1}
  for raw_state in (state, b'N' + state + b'\x86'):
    path = tmp_path / 'patch.pt'
    _as_zip(path, b'\x80\x02c' + f'{module}\n{name}\n'.encode() + raw_state + b'b.')
    with pytest.raises(torch_io.UnsafePickleError):
      torch_io.load(path)
  # The stand-ins still behave: the real fixtures load as before.
  assert torch_io.load(TRAIN_CKPT)['args'].model == 'SiT-P/4'


def test_reader_rejects_non_checkpoints(tmp_path):
  junk = tmp_path / 'junk.pt'
  junk.write_bytes(b'not a checkpoint at all')
  with pytest.raises(torch_io.TorchFileError, match='neither a torch zip'):
    torch_io.load(junk)
  with pytest.raises(FileNotFoundError):
    torch_io.load(tmp_path / 'missing.pt')


# ---------------------------------------------------------------------------- converter


def test_parity_legacy_state_dict_with_time_flip(ref):
  """Upstream SiT (t = 1 data) in our convention: ours(x, t, y) = −v_up(x, 1 − t, y)."""
  model = model_of(ARCH_A)
  info = convert.load_torch_sit(model, torch_io.load(LEGACY_SD))
  assert (info.source, info.flipped_time, info.dropped_sigma) == ('sit', True, True)
  assert info.dropped == ['pos_embed'] and info.projectors is None
  assert ours_vs_upstream(model, ref, 'a', 'a_v') <= TOL
  assert 10 in ref['a_y'] and {0.0, 1.0} <= set(ref['a_s'].tolist())


def test_parity_without_flip_for_data_at_zero_sources(ref):
  """'repa' / 'stablevm' share our convention: the same weights, copied as they are."""
  model = model_of(ARCH_A)
  info = convert.load_torch_sit(model, torch_io.load(LEGACY_SD), source='stablevm')
  assert not info.flipped_time
  assert ours_vs_upstream(model, ref, 'a', 'a_v', flipped=False) <= TOL


@pytest.mark.parametrize('which', ['ema', 'model'])
def test_parity_training_checkpoint(which, ref):
  model = model_of(ARCH_B)
  convert.load_torch_sit(model, torch_io.load(TRAIN_CKPT)[which])
  assert ours_vs_upstream(model, ref, 'b', f'b_v_{which}') <= TOL


def test_wrapper_prefix_and_learn_sigma_false(ref):
  """'module.' keys (DDP) load; a C-channel head (learn_sigma=False) needs the source named."""
  sd = torch_io.load(LEGACY_SD)
  p, c = ARCH_A['patch_size'], ARCH_A['in_channels']
  # Upstream's per-token output order is (p_row, p_col, channel): keep the first C channels.
  for key in ('final_layer.linear.weight', 'final_layer.linear.bias'):
    v = sd[key]
    sd[key] = v.reshape(p, p, 2 * c, *v.shape[1:])[:, :, :c].reshape(p * p * c, *v.shape[1:])
  wrapped = {f'module.{k}': v for k, v in sd.items()}
  with pytest.raises(convert.ConversionError, match="source='sit'"):
    convert.load_torch_sit(model_of(ARCH_A), wrapped)
  model = model_of(ARCH_A)
  info = convert.load_torch_sit(model, wrapped, source='sit')
  assert not info.dropped_sigma
  assert ours_vs_upstream(model, ref, 'a', 'a_v') <= TOL


def test_projectors_dropped_or_kept(ref):
  """REPA projectors mark a t = 0-is-data checkpoint; dropped by default, returned if kept."""
  sd = dict(torch_io.load(LEGACY_SD))
  rng = np.random.default_rng(0)
  proj = {'projectors.0.0.weight': rng.normal(size=(16, 8)).astype(np.float32),
          'projectors.0.0.bias': rng.normal(size=(16,)).astype(np.float32),
          'projectors.0.4.weight': rng.normal(size=(5, 16)).astype(np.float32)}
  sd.update(proj)
  model = model_of(ARCH_A)
  info = convert.load_torch_sit(model, sd)
  assert info.source == 'repa' and info.projectors is None
  assert set(proj) <= set(info.dropped)
  assert ours_vs_upstream(model, ref, 'a', 'a_v', flipped=False) <= TOL
  info = convert.load_torch_sit(model_of(ARCH_A), sd, keep_projectors=True)
  assert sorted(info.projectors) == sorted(proj)
  for k, v in proj.items():
    np.testing.assert_array_equal(info.projectors[k], v)
  assert not any(k.startswith('projectors.') for k in info.dropped)


def _shapes_only(sd):
  """Stand-ins with a shape and no data: the checks must not need any tensor values."""
  return {k: types.SimpleNamespace(shape=v.shape) for k, v in sd.items()}


@pytest.mark.parametrize('overrides,first', [
    ({'num_classes': 5}, "'y_embedder.embedding_table.weight' has shape (11, 8) in the "
                         "checkpoint, the model needs (6, 8)"),
    ({'hidden_size': 12}, "'x_embedder.proj.weight' has shape (8, 4, 2, 2)"),
    ({'depth': 3}, "'blocks.2.adaLN_modulation.1.weight' is missing"),
    ({'in_channels': 3}, "'x_embedder.proj.weight' has shape (8, 4, 2, 2) in the checkpoint, "
                         "the model needs (8, 3, 2, 2)"),
])
def test_shape_mismatch_names_the_first_problem(overrides, first):
  sd = torch_io.load(LEGACY_SD)
  model = model_of(ARCH_A, **overrides)
  target = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with pytest.raises(convert.ConversionError) as err:
    convert.convert_sit_state_dict(_shapes_only(sd), target, grid_size=model.grid_size,
                                   source='sit')
  assert first in str(err.value), str(err.value)
  assert 'depth 2, hidden size 8, patch 2, 4 input channels' in str(err.value)


@pytest.mark.parametrize('upstream,source', [('sit_xl2', 'sit'), ('repa_sit_xl2', 'repa')])
def test_released_xl2_layouts_fit_configs_sit_xl2(upstream, source):
  """Names and shapes of the upstream SiT-XL/2 and REPA SiT-XL/2 state dicts (made by the
  upstream code, tests/fixtures/README.md) fit configs/sit_xl2.py as they are."""
  from configs import sit_xl2
  with open(os.path.join(FIXTURES, 'upstream_xl2_shapes.json')) as f:
    shapes = json.load(f)[upstream]
  sd = {k: types.SimpleNamespace(shape=tuple(v)) for k, v in shapes.items()}
  target = network.build_network(sit_xl2.get_config()).abstract_params
  assert convert.resolve_source(sd, target, 'auto') == source
  learn_sigma = convert.check_sit_state_dict(sd, target, (16, 16))
  assert learn_sigma == (source == 'sit')


def test_unexpected_tensor_and_foreign_pos_embed_are_refused():
  sd = dict(torch_io.load(LEGACY_SD))
  extra = dict(sd, **{'blocks.0.attn.q_norm.weight': np.ones(4, np.float32)})
  with pytest.raises(convert.ConversionError, match="'blocks.0.attn.q_norm.weight' is in the "
                     'checkpoint but not in the model'):
    convert.load_torch_sit(model_of(ARCH_A), extra)
  moved = dict(sd, pos_embed=sd['pos_embed'] + 0.01)
  with pytest.raises(convert.ConversionError, match='pos_embed differs'):
    convert.load_torch_sit(model_of(ARCH_A), moved)


# ---------------------------------------------------------------------------- import tool


def p4_config(tfds_dir, **overrides):
  """The tiny Fashion-MNIST job with the fixtures' model, fine-tuning with PAFM."""
  return tiny_config(tfds_dir, **{'model.name': 'SiT-P/4', 'objective.name': 'pafm',
                                  'total_steps': 5, 'checkpoint_every_steps': 100,
                                  'sample.method': 'euler', 'sample.cfg_scale': 1.0,
                                  **overrides})


def _restore_state(workdir, step):
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, 'checkpoints', str(step), 'state'))


def with_params(model, params):
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(model, state)
  return model


@pytest.mark.slow
def test_import_finetune_sample_end_to_end(fmnist_tfds_dir, tmp_path, ref):
  config = p4_config(fmnist_tfds_dir)
  workdir = str(tmp_path / 'run')
  import_torch.import_checkpoint(config, TRAIN_CKPT, workdir)
  imported = _restore_state(workdir, 0)
  assert int(imported['step']) == 0
  # params <- 'model', ema_params <- 'ema', each the upstream network in our convention.
  for key, v_key in (('params', 'b_v_model'), ('ema_params', 'b_v_ema')):
    assert ours_vs_upstream(with_params(model_of(ARCH_B), imported[key]), ref, 'b',
                            v_key) <= TOL, key
  assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(imported['opt_state'])), \
      'the optimizer state must be fresh (zero moments and counts)'

  # Fine-tune 5 steps: the loop resumes from the imported checkpoint (it has no data item).
  out = train.train_and_evaluate(config, workdir)
  assert int(out['state']['step']) == 5 and np.isfinite(out['metrics']['loss'])
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['0', '5']
  assert os.listdir(os.path.join(workdir, 'samples')) == ['samples_00000005.png']
  # It trained from the imported weights: they moved, but far less than their size (a fresh
  # start would have zero adaLN and output layers).
  tuned = _restore_state(workdir, 5)
  moved = tree_dist(tuned['params'], imported['params'])
  assert 0 < moved < 0.05 * tree_dist(imported['params'], jax.tree.map(np.zeros_like,
                                                                       imported['params']))

  # Sample from the restored EMA with the library's sampler (label 10 = null).
  net = network.build_network(config)
  draw = jax.jit(lambda params, rng: sampling.sample(
      functools.partial(net.apply, params), rng, jnp.array([0, 4, 10]), (28, 28, 1),
      method='euler', num_steps=2))
  images = draw(tuned['ema_params'], jax.random.key(1))
  assert images.shape == (3, 28, 28, 1) and bool(jnp.all(jnp.isfinite(images)))


def tree_dist(a, b):
  return float(np.sqrt(sum(np.sum((np.asarray(x, np.float64) - np.asarray(y)) ** 2)
                           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))))


def test_import_checks_everything_before_writing(tmp_path):
  config = p4_config('/nonexistent')
  workdir = tmp_path / 'run'
  # args.model says SiT-P/4: another size is refused (heads are not visible in the weights).
  with pytest.raises(ValueError, match='--config.model.name=SiT-P/4'):
    import_torch.import_checkpoint(p4_config('/nonexistent', **{'model.name': 'SiT-T/4'}),
                                   TRAIN_CKPT, str(workdir))
  with pytest.raises(convert.ConversionError, match='y_embedder.embedding_table.weight'):
    import_torch.import_checkpoint(p4_config('/nonexistent', **{'data.num_classes': 7}),
                                   TRAIN_CKPT, str(workdir))
  evil = tmp_path / 'evil.pt'
  _as_zip(evil, pickle.dumps(_RunsCommand('true'), protocol=2))
  with pytest.raises(torch_io.UnsafePickleError):
    import_torch.import_checkpoint(config, str(evil), str(workdir))
  assert not workdir.exists()

  import_torch.import_checkpoint(config, TRAIN_CKPT, str(workdir), step=3, params_from='ema')
  st = _restore_state(str(workdir), 3)
  for a, b in zip(jax.tree.leaves(st['params']), jax.tree.leaves(st['ema_params'])):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='--force'):
    import_torch.import_checkpoint(config, TRAIN_CKPT, str(workdir))
  import_torch.import_checkpoint(config, TRAIN_CKPT, str(workdir), force=True)
  assert os.listdir(workdir / 'checkpoints') == ['0']


def test_import_carries_the_objectives_state(tmp_path):
  """With StableVM the train state holds a memory bank: the import writes an empty one, and
  the checkpoint restores onto the trainer's own abstract state."""
  config = p4_config('/nonexistent', **{'objective.name': 'stablevm',
                                        'objective.stablevm.bank_capacity': 4})
  import_torch.import_checkpoint(config, TRAIN_CKPT, str(tmp_path))
  setup = train_state.TrainSetup.create(config, config_checks.validated_mesh(config))
  manager = checkpointing.create_manager(str(tmp_path), save_every=1, max_to_keep=1)
  state = checkpointing.restore(manager, 0, setup.sharded_abstract_state(), data_iterator=None)
  manager.close()
  assert jax.tree.structure(state) == jax.tree.structure(setup.abstract_state)
  assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(state['memory']))


def test_import_cli(tmp_path):
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'pafm_jax.tools.import_torch', f'--src={LEGACY_SD}',
         '--config=configs/imagenet_latents.py', f'--workdir={workdir}',
         '--config.model.name=SiT-P/2', '--config.data.image_size=8',
         '--config.data.num_classes=10', '--step=7']
  out = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, XLA_FLAGS=''), capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'source sit' in out.stderr
  assert os.listdir(workdir / 'checkpoints') == ['7']
  assert (workdir / 'config.json').exists()
