"""Config validation in one place: refusals before any work, fields declared where read, and
the inputs a checkpoint records (the retrieval index's content) checked on resume.

Truths: the file system (nothing created or read before the refusal), the source of
pafm_jax/ (every config field it reads), and an uninterrupted run's index.
"""

import io
import json
import os
import pathlib
import tokenize

import numpy as np
import pytest

from configs import base, fmnist_sit
from pafm_jax import config_checks, train
from pafm_jax.retrieval import index as index_lib
from tests.test_train import apply_overrides, tiny_config

REPO = pathlib.Path(__file__).resolve().parent.parent


_FLOW_MAP = {'objective.name': 'flow_map'}


@pytest.mark.parametrize('overrides,match', [
    ({'objective.pafm.condition': 'text'}, "condition='class'"),
    ({'retrieval.mode': 'clean'}, "config.retrieval.mode='noisy'"),
    ({'sample.method': 'flow_map'}, "objective.name='flow_map'"),
    ({**_FLOW_MAP, 'objective.flow_map.loss': 'lmd'}, 'teacher_workdir'),
    ({**_FLOW_MAP, 'objective.flow_map.diagonal_fraction': 0.25}, 'too small'),
    ({**_FLOW_MAP, 'objective.flow_map.pair_sampling': 'sorted'}, "pair_sampling='below'"),
])
def test_unsupported_combinations_are_refused_before_data_or_index(tmp_path, overrides, match):
  """Stratified PAFM on noisy retrieval (the default job) with one field changed: refused with
  the field to use instead, before the dataset is prepared, an index is built or the workdir
  written."""
  c = fmnist_sit.get_config()
  c.data.tfds_dir = str(tmp_path / 'tfds')
  c.data.idx_dir = str(tmp_path / 'idx')
  c.retrieval.index_dir = str(tmp_path / 'index')
  apply_overrides(c, overrides)
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)


def test_every_check_runs_from_validate():
  """A field of each subsystem, set wrong, is refused by config_checks.validate."""
  cases = {'data.read_threads': 0, 'model.name': 'SiT-Q/2', 'objective.path': 'spiral',
           'objective.name': 'diffusion', 'retrieval.backend': 'faiss', 'sample.method': 'rk9',
           'log_every_steps': 0, 'global_batch_size': 7, 'eval.features': 'dino',
           'eval.fd_bootstrap': 1, 'eval.classifier_epochs': 0}
  for field, value in cases.items():
    c = apply_overrides(fmnist_sit.get_config(), {field: value})
    with pytest.raises(ValueError):
      config_checks.validate(c, 2, 1)
  config_checks.validate(fmnist_sit.get_config(), 2, 1)


def _config_fields_read(source: str):
  """Dotted paths after the name `config` in Python code (strings and comments ignored)."""
  tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
            if t.type in (tokenize.NAME, tokenize.OP)]
  for i, tok in enumerate(tokens):
    if tok.string != 'config' or (i and tokens[i - 1].string == '.'):
      continue
    path, j = [], i + 1
    while j + 1 < len(tokens) and tokens[j].string == '.' and tokens[j + 1].type == tokenize.NAME:
      path.append(tokens[j + 1].string)
      j += 2
    if path:
      yield path


def test_every_config_field_the_code_reads_is_declared_in_base():
  """So every field can be set from the command line (--config.a.b=...)."""
  declared = base.get_config()
  methods = {'get', 'to_dict', 'to_json_best_effort', 'lock', 'unlock', 'items', 'keys',
             'copy_and_resolve_references'}
  missing = set()
  for path in (REPO / 'pafm_jax').rglob('*.py'):
    if path.name == 'index.py':  # its `config` is ScaNN's protobuf, not ours
      continue
    for fields in _config_fields_read(path.read_text()):
      node = declared
      for name in fields:
        if name in methods:
          break
        if not hasattr(node, 'keys') or name not in node:
          missing.add('.'.join(fields))
          break
        node = node[name]
  assert not missing, sorted(missing)
  assert declared.data.read_threads == 2 and declared.data.shuffle_seed == -1


@pytest.mark.slow
def test_resume_with_another_retrieval_index_is_reported(fmnist_tfds_dir, tmp_path):
  """The index's content hash is recorded in each checkpoint: resuming over an index with the
  same config but other content (a differently built copy) stops with a message, where it
  would otherwise silently train on other neighbours."""
  workdir = str(tmp_path / 'run')
  config = tiny_config(fmnist_tfds_dir, **{
      'objective.pafm.sources': 'batch+retrieved', 'objective.pafm.stratified': True,
      'retrieval.mode': 'noisy', 'retrieval.backend': 'exact', 'retrieval.k': 4,
      'total_steps': 2, 'mesh.fsdp': 1})
  train.train_and_evaluate(config, workdir)
  index_dir = os.path.join(workdir, 'retrieval_index')
  # Another build of the same data and config: keys of partition 0 perturbed, metadata
  # re-hashed so the index loads and matches the config.
  keys_path = os.path.join(index_dir, 'part_0', 'keys.npy')
  keys = np.load(keys_path)
  np.save(keys_path, keys + np.float32(1e-3))
  meta_path = os.path.join(index_dir, index_lib.METADATA)
  with open(meta_path) as f:
    meta = json.load(f)
  meta['files']['part_0/keys.npy'] = index_lib.sha256_file(keys_path)
  meta['content_hash'] = index_lib.content_hash(meta['files'])
  with open(meta_path, 'w') as f:
    json.dump(meta, f)
  config.total_steps = 4
  with pytest.raises(ValueError, match='retrieval_index'):
    train.train_and_evaluate(config, workdir)
  # The original index resumes.
  np.save(keys_path, keys)
  meta['files']['part_0/keys.npy'] = index_lib.sha256_file(keys_path)
  meta['content_hash'] = index_lib.content_hash(meta['files'])
  with open(meta_path, 'w') as f:
    json.dump(meta, f)
  out = train.train_and_evaluate(config, workdir)
  assert int(out['state']['step']) == 4
