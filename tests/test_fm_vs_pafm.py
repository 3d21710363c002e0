"""The FM-vs-PAFM sweep: method configs, checkpoint plan, aggregation against numpy, skipping
of finished runs, resumption of an interrupted evaluation, and one tiny real run."""

import dataclasses
import json
import os

import numpy as np
import pytest

from configs import fmnist_sit
from experiments import fm_vs_pafm as exp
from pafm_jax import train
from pafm_jax.evaluation import classifier
from tests.test_train import tiny_config


def _flat(config) -> dict:
  return train.flatten_config(config)


def _changed(a, b) -> set[str]:
  fa, fb = _flat(a), _flat(b)
  return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}


# ----------------------------------------------------------------------------- configs


def test_method_configs_are_the_base_with_their_overrides():
  base = fmnist_sit.get_config()
  # Written out by hand from the issue and docs/experiments.md, not from exp.METHODS.
  expected = {name: fmnist_sit.get_config() for name in exp.METHODS}
  for name, objective in (('fm', 'fm'), ('pafm_batch', 'pafm'), ('stablevm', 'stablevm')):
    c = expected[name]
    c.objective.name = objective
    c.objective.pafm.sources = 'batch'
    c.objective.pafm.stratified = False
    c.retrieval.mode = 'none'
  strat = expected['pafm_stratified']
  strat.objective.name = 'pafm'
  strat.objective.pafm.sources = 'batch+retrieved'
  strat.objective.pafm.stratified = True
  strat.retrieval.mode = 'noisy'
  strat.retrieval.k = 16
  assert set(exp.METHODS) == {'fm', 'pafm_batch', 'pafm_stratified', 'stablevm'}
  for name in exp.METHODS:
    assert _flat(exp.method_config(base, name)) == _flat(expected[name]), name
  # The default job is stratified PAFM: that method leaves it as it is.
  assert _flat(exp.method_config(base, 'pafm_stratified')) == _flat(base)
  # Whatever method the base config is, a method's config is the same.
  other = exp.method_config(base, 'stablevm')
  for name in exp.METHODS:
    assert _flat(exp.method_config(other, name)) == _flat(expected[name]), name
  with pytest.raises(ValueError, match='unknown method'):
    exp.method_config(base, 'pafm_everything')


def test_runs_differ_only_in_method_fields_and_seed():
  base = fmnist_sit.get_config()
  budget = exp.REDUCED
  fm = exp.run_config(base, 'fm', 0, budget)
  assert _changed(fm, exp.run_config(base, 'stablevm', 0, budget)) == {'objective.name'}
  assert _changed(fm, exp.run_config(base, 'pafm_batch', 0, budget)) == {'objective.name'}
  assert _changed(fm, exp.run_config(base, 'fm', 1, budget)) == {'seed'}
  assert _changed(fm, exp.run_config(base, 'pafm_stratified', 2, budget)) == {
      'seed', 'objective.name', 'objective.pafm.sources', 'objective.pafm.stratified',
      'retrieval.mode'}
  # The budget lands where the train loop and the evaluator read it.
  assert (fm.total_steps, fm.checkpoint_every_steps, fm.keep_checkpoints) == (
      budget.steps, budget.eval_every, len(exp.eval_steps(budget)))
  assert (fm.eval.num_samples, fm.sample.method, fm.sample.num_steps) == (
      budget.eval_samples, budget.sampler, budget.sampler_steps)
  assert fm.eval.every_steps == 0 and fm.model.name == base.model.name


@pytest.mark.parametrize('steps,every,expected', [
    (600, 200, [200, 400, 600]), (500, 200, [200, 400, 500]), (50, 100, [50]), (1, 1, [1])])
def test_eval_steps_are_the_saved_checkpoints(steps, every, expected):
  budget = exp.resolve_budget(False, steps=steps, eval_every=every)
  assert exp.eval_steps(budget) == expected
  # The loop saves at multiples of the interval and forces the last step: the same set, and
  # keep_checkpoints keeps all of them.
  saved = sorted({s for s in range(1, steps + 1) if s % every == 0} | {steps})
  assert saved == expected
  assert exp.run_config(fmnist_sit.get_config(), 'fm', 0, budget).keep_checkpoints == len(saved)


def test_budget_presets_and_overrides():
  assert exp.resolve_budget(False) == exp.REDUCED
  assert exp.resolve_budget(True) == exp.FULL
  b = exp.resolve_budget(True, steps=10, seeds=(3, 4, 5), sampler=None)
  assert (b.steps, b.seeds, b.sampler) == (10, (3, 4, 5), exp.FULL.sampler)
  assert len(exp.REDUCED.seeds) >= 3 and len(exp.FULL.seeds) >= 3
  with pytest.raises(ValueError, match='distinct'):
    exp.resolve_budget(False, seeds=(1, 1))


# ------------------------------------------------------------ aggregation and skipping


def _fabricate(workdir, methods, seeds, steps, rng):
  """Writes finished runs' result.json files with random metrics; returns them."""
  runs = {}
  for seed in seeds:
    for m in methods:
      metrics = {str(s): {'fd': float(rng.uniform(10, 100)), 'accuracy': float(rng.uniform()),
                          'precision': float(rng.uniform()), 'recall': float(rng.uniform()),
                          'memorized_fraction': float(rng.uniform(0, 0.01)),
                          'nn_ratio_median': float(rng.uniform(0.5, 1)), 'nfe': 16.0}
                 for s in steps}
      d = os.path.join(workdir, 'runs', f'{m}_seed{seed}')
      os.makedirs(d)
      with open(os.path.join(d, 'result.json'), 'w') as f:
        json.dump({'method': m, 'seed': seed, 'metrics': metrics,
                   'seconds': {'train': 100.0, 'eval': {}}, 'fingerprint': ['abc']}, f)
      runs[(m, seed)] = metrics
  return runs


def _refuse(*args, **kwargs):
  raise AssertionError('a finished run was trained or evaluated again')


def test_finished_runs_are_skipped_and_aggregated_like_numpy(tmp_path, monkeypatch):
  methods, seeds = ['fm', 'stablevm', 'pafm_batch'], (0, 1, 2)
  budget = exp.resolve_budget(False, steps=40, eval_every=20, seeds=seeds)
  runs = _fabricate(str(tmp_path), methods, seeds, ['20', '40'], np.random.default_rng(0))
  monkeypatch.setattr(train, 'train_and_evaluate', _refuse)
  lines = []
  results = exp.sweep(fmnist_sit.get_config(), budget, methods, str(tmp_path),
                      log=lines.append, score=_refuse)
  assert sum('finished earlier, skipped' in line for line in lines) == 9

  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['summary'] == results['summary']
  for m in methods:
    for step in ('20', '40'):
      for k in ('fd', 'accuracy', 'precision', 'recall', 'memorized_fraction'):
        x = np.array([runs[(m, s)][step][k] for s in seeds])
        stat = saved['summary'][m][step][k]
        assert stat['n'] == 3
        np.testing.assert_allclose(stat['mean'], x.mean(), rtol=1e-12)
        np.testing.assert_allclose(stat['std'], x.std(ddof=1), rtol=1e-12)
    diff = np.array([runs[(m, s)]['40']['fd'] - runs[('fm', s)]['40']['fd'] for s in seeds])
    if m != 'fm':
      np.testing.assert_allclose(saved['fd_minus_fm'][m]['mean'], diff.mean(), rtol=1e-12)
      np.testing.assert_allclose(saved['fd_minus_fm'][m]['std'], diff.std(ddof=1), rtol=1e-12)

  # Convergence targets: the FD FM reaches at each checkpoint after the first.
  fm_40 = np.mean([runs[('fm', s)]['40']['fd'] for s in seeds])
  assert [(c['fm_step'], c['target']) for c in saved['convergence']] == [(40, pytest.approx(fm_40))]

  # The table shows the final checkpoint's numbers as numpy formats them.
  table = (tmp_path / 'results.md').read_text()
  fd = np.array([runs[('stablevm', s)]['40']['fd'] for s in seeds])
  row = next(l for l in table.splitlines() if l.startswith('| stablevm |'))
  assert row.split(' | ')[1] == f'{fd.mean():.2f} ± {fd.std(ddof=1):.2f}'
  assert 'step 20' in table and 'step 40' in table
  assert (tmp_path / 'fd_vs_steps.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

  # Other settings in the same workdir are refused, not mixed in.
  with pytest.raises(ValueError, match='other settings'):
    exp.sweep(fmnist_sit.get_config(), exp.resolve_budget(False, steps=60, eval_every=20,
                                                          seeds=seeds),
              methods, str(tmp_path), log=lines.append, score=_refuse)


def test_a_sweep_continues_from_its_records_on_another_machine(tmp_path, monkeypatch):
  """Runs finished under one workdir are mirrored into --records; a sweep with an empty
  workdir elsewhere (its retrieval index at another path) takes them as finished and gives
  the same tables, and a record with other settings is refused."""
  methods, seeds = ['fm', 'pafm_stratified'], (0, 1)
  budget = exp.resolve_budget(False, steps=20, eval_every=10, seeds=seeds)
  rng = np.random.default_rng(0)
  drawn = {}

  def score(workdir, step, seed):
    metrics = {'fd': float(rng.uniform(10, 100)), 'accuracy': float(rng.uniform()),
               'precision': float(rng.uniform()), 'recall': float(rng.uniform()),
               'memorized_fraction': 0.0, 'nn_ratio_median': 0.9, 'nfe': 16.0}
    drawn[(os.path.basename(workdir), str(step))] = metrics
    return metrics, {'sample': 1.0}, 'fp'

  records = str(tmp_path / 'records')
  monkeypatch.setattr(train, 'train_and_evaluate', lambda config, workdir: None)
  first = exp.sweep(fmnist_sit.get_config(), budget, methods, str(tmp_path / 'machine_a'),
                    log=lambda _: None, score=score, records=records)
  for seed in seeds:
    for m in methods:
      record = os.path.join(records, 'runs', f'{m}_seed{seed}')
      assert sorted(os.listdir(record)) == sorted(exp.RECORD_FILES)   # no partial files
      saved = json.loads(open(os.path.join(record, 'result.json')).read())
      assert saved['metrics'] == {k: v for (run, k), v in drawn.items()
                                  if run == f'{m}_seed{seed}'}
  assert sorted(os.listdir(records)) == sorted(('runs',) + exp.SWEEP_FILES)

  monkeypatch.setattr(train, 'train_and_evaluate', _refuse)
  lines = []
  second = exp.sweep(fmnist_sit.get_config(), budget, methods, str(tmp_path / 'machine_b'),
                     log=lines.append, score=_refuse, records=records)
  assert sum('finished earlier, skipped' in line for line in lines) == 4
  assert second['summary'] == first['summary']
  assert second['paired_to_fm'] == first['paired_to_fm']

  longer = exp.resolve_budget(False, steps=30, eval_every=10, seeds=seeds)
  with pytest.raises(ValueError, match='other settings'):
    exp.sweep(fmnist_sit.get_config(), longer, methods, str(tmp_path / 'machine_c'),
              log=lambda _: None, score=_refuse, records=records)


def test_every_metric_is_paired_at_every_checkpoint_and_subsets_share_one_table(tmp_path,
                                                                                monkeypatch):
  """Paired differences (and their t intervals) of every metric at every checkpoint against a
  direct numpy/scipy computation; the noise-floor table's binomial fallback; and the
  data-limited table over a subset sweep and a whole-split sweep."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(train, 'train_and_evaluate', _refuse)
  methods, seeds = ['fm', 'pafm_stratified'], (0, 1, 2)
  budget = exp.resolve_budget(False, steps=40, eval_every=20, seeds=seeds, eval_samples=500)
  sweeps = {}
  for per_class in (0, 60):
    workdir = tmp_path / f'subset_{per_class}'
    ran = methods if per_class else methods + ['stablevm']   # the whole split ran more
    runs = _fabricate(str(workdir), ran, seeds, ['20', '40'], np.random.default_rng(per_class))
    if per_class:
      for metrics in runs.values():
        for m in metrics.values():
          m['fd_train'] = m['fd'] / 2
      for (m, seed), metrics in runs.items():   # rewrite with fd_train
        path = workdir / 'runs' / f'{m}_seed{seed}' / 'result.json'
        record = json.loads(path.read_text())
        record['metrics'] = metrics
        path.write_text(json.dumps(record))
    base = fmnist_sit.get_config()
    base.data.subset_per_class = per_class
    sweeps[per_class] = (exp.sweep(base, budget, ran, str(workdir), log=lambda _: None,
                                   score=_refuse), runs)

  results, runs = sweeps[60]
  for step in ('20', '40'):
    for metric in ('fd', 'fd_train', 'accuracy', 'memorized_fraction'):
      a = np.array([runs[('pafm_stratified', s)][step][metric] for s in seeds])
      b = np.array([runs[('fm', s)][step][metric] for s in seeds])
      got = results['paired_to_fm'][step][metric]['pafm_stratified']
      ci = stats.ttest_rel(a, b).confidence_interval(0.95)
      np.testing.assert_allclose([got['mean'], got['low'], got['high']],
                                 [np.mean(a - b), ci.low, ci.high], rtol=1e-10)
  # No run carries a bootstrap floor here: shares fall back to √(p(1 − p)/N), the rest to none.
  p = np.array([runs[(m, s)]['40']['accuracy'] for m in methods for s in seeds])
  floor, how = exp.noise_floor(results['runs'], 'accuracy', '40', 500)
  np.testing.assert_allclose(floor, np.mean(np.sqrt(p * (1 - p) / 500)), rtol=1e-12)
  assert how.startswith('binomial')
  assert exp.noise_floor(results['runs'], 'recall', '40', 500) is None
  # Runs evaluated after the floors existed carry their own; the table averages those it has.
  mixed = json.loads(json.dumps(results['runs']))
  mixed[0]['metrics']['40']['recall_noise_std'] = 0.01
  mixed[1]['metrics']['40']['recall_noise_std'] = 0.03
  assert exp.noise_floor(mixed, 'recall', '40', 500) == (
      pytest.approx(0.02), 'halves of the samples (2 of the 6 runs)')
  table = (tmp_path / 'subset_60' / 'results.md').read_text()
  assert '600 images' not in table and '60 training images per class' in table

  joint = exp.data_limited_markdown([sweeps[0][0], sweeps[60][0]])
  rows = [line.split(' | ') for line in joint.splitlines() if line.startswith('| 600 ')
          or line.startswith('| whole split ')]
  # Smallest set first; a difference row follows each PAFM row.
  assert [(r[0], r[1]) for r in rows] == [
      ('| 600', 'fm'), ('| 600', 'pafm_stratified'), ('| 600', 'pafm_stratified − fm'),
      ('| whole split', 'fm'), ('| whole split', 'pafm_stratified'),
      ('| whole split', 'pafm_stratified − fm')]
  fd_train = np.array([runs[('fm', s)]['40']['fd_train'] for s in seeds])
  assert rows[0][5] == f'{fd_train.mean():.2f} ± {fd_train.std(ddof=1):.2f}'
  assert rows[3][5] == '—'   # the whole split has no subset to compare with
  old = json.loads(json.dumps(sweeps[60][0]))
  del old['settings']['subset_per_class']
  with pytest.raises(ValueError, match='older version'):
    exp.data_limited_markdown([old])
  # FDs from different classifiers are in different feature spaces: not one table.
  other = json.loads(json.dumps(sweeps[60][0]))
  other['settings']['fingerprints'] = ['another']
  with pytest.raises(ValueError, match='different classifiers'):
    exp.data_limited_markdown([sweeps[0][0], other])


def test_steps_to_reach_an_fd_by_linear_interpolation():
  steps, fds = [500, 1000, 1500, 2000], [40.0, 20.0, 12.0, 10.0]
  assert exp.steps_to_fd(steps, fds, 30.0) == 750.0          # halfway from 40 to 20
  assert exp.steps_to_fd(steps, fds, 12.0) == 1500.0         # exactly at a checkpoint
  assert exp.steps_to_fd(steps, fds, 11.0) == 1750.0
  assert exp.steps_to_fd(steps, fds, 50.0) == 500.0          # already there at the first
  assert exp.steps_to_fd(steps, fds, 9.0) is None            # never
  runs = [{'method': m, 'seed': s, 'metrics': {str(k): {'fd': f + off} for k, f in
                                                zip(steps, fds)}}
          for m, off in (('fm', 0.0), ('pafm', -4.0)) for s in (0, 1)]
  runs[3]["metrics"]["1000"]["fd"] = 14.0
  c = exp.convergence(runs, 12.0)
  assert c['fm']['mean'] == 1500.0 and c['fm']['reached'] == 2
  # pafm seed 0: 36, 16, 8 → crosses 12 at 1000 + (16 − 12)/(16 − 8)·500 = 1250;
  # seed 1: 36, 14, 8 → 1000 + (14 − 12)/(14 − 8)·500.
  np.testing.assert_allclose(c['pafm']['mean'], np.mean([1250.0, 1000 + 2 / 6 * 500]))


def test_interrupted_evaluation_resumes_at_the_missing_checkpoints(tmp_path, monkeypatch):
  budget = exp.resolve_budget(False, steps=30, eval_every=10, seeds=(7,))
  config = exp.run_config(fmnist_sit.get_config(), 'fm', 7, budget)
  run_dir = str(tmp_path / 'run')
  trained = []
  monkeypatch.setattr(train, 'train_and_evaluate', lambda c, w: trained.append(w))
  scored = []

  def score(workdir, step, seed):
    scored.append(step)
    if len(scored) == 2:
      raise KeyboardInterrupt  # killed while scoring the second checkpoint
    return {'fd': float(step)}, {'sampling': 0.0}, 'fp'

  with pytest.raises(KeyboardInterrupt):
    exp.run_one(config, 'fm', budget, run_dir, score, log=lambda _: None)
  assert scored == [10, 20] and not os.path.exists(os.path.join(run_dir, 'result.json'))
  result = exp.run_one(config, 'fm', budget, run_dir, score, log=lambda _: None)
  assert scored == [10, 20, 20, 30]     # step 10 came from the cache
  assert result['metrics'] == {'10': {'fd': 10.0}, '20': {'fd': 20.0}, '30': {'fd': 30.0}}
  assert len(trained) == 2              # the loop itself returns at once when finished


def _spec_without(run_dir: str, block: str) -> None:
  """Rewrites the run's spec.json as a version of the framework without config.<block> did."""
  path = os.path.join(run_dir, 'spec.json')
  with open(path) as f:
    spec = json.load(f)
  del spec['config'][block]
  with open(path, 'w') as f:
    json.dump(spec, f)


def test_a_run_saved_before_a_config_field_existed_resumes_only_at_its_default(tmp_path,
                                                                            monkeypatch):
  budget = exp.resolve_budget(False, steps=10, eval_every=10, seeds=(3,))
  config = exp.run_config(fmnist_sit.get_config(), 'fm', 3, budget)
  monkeypatch.setattr(train, 'train_and_evaluate', lambda c, w: None)
  score = lambda workdir, step, seed: ({'fd': 1.0}, {}, 'fp')
  run_dir = str(tmp_path / 'run')
  os.makedirs(run_dir)
  exp._write_json(os.path.join(run_dir, 'spec.json'),
                  {'method': 'fm', 'seed': 3, 'eval_steps': exp.eval_steps(budget),
                   'config': exp._json_normal(config)})
  _spec_without(run_dir, 'autoencoder')    # the block came later, at its default here
  assert exp.run_one(config, 'fm', budget, run_dir, score, log=lambda _: None)['seed'] == 3

  changed = config.copy_and_resolve_references()
  changed.autoencoder.steps += 1             # a new field set away from its default
  other_dir = str(tmp_path / 'other')
  os.makedirs(other_dir)
  exp._write_json(os.path.join(other_dir, 'spec.json'),
                  {'method': 'fm', 'seed': 3, 'eval_steps': exp.eval_steps(budget),
                   'config': exp._json_normal(changed)})
  _spec_without(other_dir, 'autoencoder')
  with pytest.raises(ValueError, match='autoencoder'):
    exp.run_one(changed, 'fm', budget, other_dir, score, log=lambda _: None)


# ------------------------------------------------------------------------ a real run


@pytest.mark.slow
def test_tiny_sweep_end_to_end(fmnist_tfds_dir, tmp_path, monkeypatch):
  """FM and stratified PAFM (exact retrieval), one seed, 2 steps: real training,
  checkpoints 1 and 2 scored; continuing it with another classifier is refused."""
  # The smallest model, data-parallel only: compilation is most of this test's time.
  base = tiny_config(fmnist_tfds_dir, **{
      'model.name': 'SiT-P/4', 'mesh.fsdp': 1, 'retrieval.backend': 'exact',
      'eval.classifier_dir': str(tmp_path / 'classifier'), 'eval.classifier_epochs': 1,
      'sample.batch_size': 16, 'sample.cfg_scale': 1.0})
  classifier.train(base, steps_per_epoch=3)
  budget = exp.resolve_budget(False, steps=2, eval_every=1, eval_samples=20, seeds=(0,),
                              sampler_steps=2, memorization_max_train=300)
  results = exp.sweep(base, budget, ['fm', 'pafm_stratified'], str(tmp_path / 'sweep'),
                      log=lambda _: None)
  for run in results['runs']:
    assert set(run['metrics']) == {'1', '2'}
    scored = {'fd', 'accuracy', 'precision', 'recall', 'memorized_fraction', 'nn_ratio_median'}
    assert set(run['metrics']['2']) == scored | {f'{k}_noise_std' for k in scored} | {'nfe'}
    assert run['metrics']['2']['nfe'] == 2.0
    assert 0 < run['metrics']['2']['fd_noise_std'] < run['metrics']['2']['fd']
  # One seed fixes the initialisation and the sampling noise, and the warm-up's learning rate
  # is 0 at the first step: after it both methods still hold the initial weights and must
  # score identically. After the second they have trained on different targets.
  fm, pafm = results['runs']
  assert fm['metrics']['1'] == pafm['metrics']['1']
  assert fm['metrics']['2']['fd'] != pafm['metrics']['2']['fd']
  ckpts = os.listdir(tmp_path / 'sweep' / 'runs' / 'fm_seed0' / 'checkpoints')
  assert ckpts == ['2']   # intermediate checkpoints are dropped once scored
  # The sweep's one shared retrieval index, not one per run.
  assert os.path.isdir(tmp_path / 'sweep' / 'retrieval_index')
  assert not os.path.exists(tmp_path / 'sweep' / 'runs' / 'pafm_stratified_seed0' /
                            'retrieval_index')

  # A seed added later, with a classifier trained otherwise (another fingerprint): refused
  # before anything trains, since its FDs would not compare with the finished runs'.
  other = base.copy_and_resolve_references()
  other.eval.classifier_dir = str(tmp_path / 'other_classifier')
  classifier.train(other, steps_per_epoch=2)
  monkeypatch.setattr(train, 'train_and_evaluate', _refuse)
  more_seeds = dataclasses.replace(budget, seeds=(0, 1))
  with pytest.raises(ValueError, match='scored with features'):
    exp.sweep(other, more_seeds, ['fm', 'pafm_stratified'], str(tmp_path / 'sweep'),
              log=lambda _: None)
