"""The Colab notebooks in notebooks/: each runs from a fresh kernel at its CI size, and the
committed files carry no outputs.

A notebook sizes itself from $PAFM_NOTEBOOK_SIZE; at 'ci' it trains for a few steps on
Fashion-MNIST (reproduce_sit_b2 rehearses its TPU recipe on a tiny image folder, a tiny VAE
and a random-weight Inception), so a notebook that no longer runs against the code fails here.
Truth: the notebook's own cells; any cell that raises (a failed command raises too) fails the
test with its source, its output and the error.
"""

import os
import pathlib
import re
import sys
import time

import nbformat
from nbclient import exceptions
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / 'notebooks'
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob('*.ipynb'))
EXPECTED = {'quickstart.ipynb', 'text_to_image.ipynb', 'reproduce_sit_b2.ipynb',
            'fewstep.ipynb'}
CELL_TIMEOUT_S = 600
# The domain classifier is trained once per dataset (5 epochs, minutes); the notebooks that
# score samples find it through $PAFM_CLASSIFIER_DIR, where the test puts a quick one.
NEEDS_CLASSIFIER = {'fewstep.ipynb'}
_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')


def test_the_notebooks_are_there():
  assert EXPECTED <= {p.name for p in NOTEBOOKS}, sorted(p.name for p in NOTEBOOKS)


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_carry_no_outputs(path):
  """Outputs are not committed: they would go stale, and bloat the history."""
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == 'code' and (
      cell.outputs or cell.execution_count is not None or 'execution' in cell.metadata)]
  assert not dirty, (f'{path.name}: code cells {dirty} (from 0) carry outputs or execution '
                     'counts; clear all outputs before committing (notebooks/README.md).')
  assert nb.metadata.kernelspec.name == 'python3'


@pytest.fixture(scope='session')
def classifier_root(fmnist_tfds_dir, tmp_path_factory):
  """$PAFM_CLASSIFIER_DIR holding a domain classifier trained for 30 steps (≈ 20 s)."""
  from configs import fmnist_sit
  from pafm_jax.evaluation import classifier
  root = tmp_path_factory.mktemp('classifier')
  config = fmnist_sit.get_config()
  config.data.tfds_dir = fmnist_tfds_dir
  config.eval.classifier_epochs = 1
  classifier.train(config, str(root / config.data.name), steps_per_epoch=30)
  return str(root)


def _kernel_env(tfds_dir: str, workdir: pathlib.Path, classifier_dir: str) -> dict:
  """The kernel's environment: a user's, at CI size, with every output under `workdir`."""
  env = dict(os.environ, PAFM_NOTEBOOK_SIZE='ci', PAFM_NOTEBOOK_WORKDIR=str(workdir),
             PAFM_TFDS_DIR=tfds_dir, PAFM_CLASSIFIER_DIR=classifier_dir)
  # conftest.py gives the test process 8 fake CPU devices; a user's notebook has one.
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', env.get('XLA_FLAGS', ''))
  env['XLA_FLAGS'] = flags.strip()
  if not env['XLA_FLAGS']:
    del env['XLA_FLAGS']
  return env


def _failure(name: str, nb, error: Exception) -> str:
  """The failing cell (its source, the end of its output, the error), for the test report."""
  for i, cell in enumerate(nb.cells):
    if cell.cell_type != 'code':
      continue
    errors = [o for o in cell.get('outputs', []) if o.output_type == 'error']
    timing = cell.metadata.get('execution', {})
    unfinished = 'iopub.execute_input' in timing and 'shell.execute_reply' not in timing
    if not errors and not unfinished:
      continue
    stream = ''.join(o.get('text', '') for o in cell.outputs if o.output_type == 'stream')
    if isinstance(error, exceptions.CellTimeoutError):
      what, trace = f'ran past the {CELL_TIMEOUT_S} s limit per cell', ''
    elif errors:
      what = f'raised {errors[0].ename}: {errors[0].evalue}'
      trace = _ANSI.sub('', '\n'.join(errors[0].traceback))
    else:
      what, trace = f'did not finish: {type(error).__name__}: {error}', ''
    # Cell 0 is the interpreter check the test puts first, so cell i is the notebook's i-th
    # cell counting from 1 (markdown cells included).
    return (f'{name}: cell {i} (counting from 1) {what}\n--- cell {i} ---\n{cell.source}\n'
            f'--- its output (end) ---\n{stream[-4000:]}\n--- traceback (end) ---\n'
            f'{trace[-4000:]}')
  return f'{name}: {type(error).__name__}: {_ANSI.sub("", str(error))[-6000:]}'


@pytest.mark.slow
@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_at_ci_size(path, fmnist_tfds_dir, tmp_path, request):
  """Executes the notebook from a fresh kernel (this interpreter's ipykernel) with
  PAFM_NOTEBOOK_SIZE=ci, in notebooks/, with its runs under a temporary directory."""
  import nbclient
  nb = nbformat.read(path, as_version=4)
  # The kernel is this interpreter's (kernel 'python3' resolves to the ipykernel installed
  # beside it), so the notebook sees the project's pinned packages.
  nb.cells.insert(0, nbformat.v4.new_code_cell(
      f'import sys\nassert sys.prefix == {sys.prefix!r}, (sys.prefix, sys.executable)'))
  classifier_dir = (request.getfixturevalue('classifier_root') if path.name in NEEDS_CLASSIFIER
                    else str(tmp_path / 'classifier'))
  env = _kernel_env(fmnist_tfds_dir, tmp_path / 'runs', classifier_dir)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                                   resources={'metadata': {'path': str(NOTEBOOK_DIR)}})
  start = time.perf_counter()
  try:
    client.execute(env=env)
  except (exceptions.CellExecutionError, exceptions.CellTimeoutError,
          exceptions.DeadKernelError) as e:
    pytest.fail(_failure(path.name, nb, e), pytrace=False)
  print(f'\n{path.name}: executed in {time.perf_counter() - start:.1f} s')
  # Its runs went where the test said, not into the repository's runs/.
  assert (tmp_path / 'runs' / f'{path.stem}_ci').is_dir()
