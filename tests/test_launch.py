"""launch/*.sh: shellcheck-clean, and their --dry-run prints exactly the commands they would
run, whose pafm_jax.main flags are flags the entry point defines."""

import os
import shlex
import subprocess
import sys

import re

import pytest

from tests import runs

LAUNCH = os.path.join(runs.REPO, 'launch')
SCRIPTS = sorted(f for f in os.listdir(LAUNCH) if f.endswith('.sh'))


def _dry_run(script: str, *args: str, **env) -> list[list[str]]:
  out = subprocess.run([os.path.join(LAUNCH, script), '--dry-run', *args], cwd=runs.REPO,
                       env=dict(os.environ, **env), capture_output=True, text=True, check=True)
  return [shlex.split(line) for line in out.stdout.splitlines()
          if line.strip() and not line.startswith('#')]


@pytest.fixture(scope='module')
def main_flag_names() -> set[str]:
  """The flags pafm_jax.main defines, as its own --helpshort lists them."""
  # (absl exits with status 1 after printing help)
  out = subprocess.run([sys.executable, '-m', 'pafm_jax.main', '--helpshort'], cwd=runs.REPO,
                       capture_output=True, text=True).stdout
  names = set(re.findall(r'^  --(?:\[no\])?(\w+)', out, re.MULTILINE))
  assert {'config', 'workdir', 'distributed', 'process_id'} <= names
  return names


@pytest.fixture
def main_flags(main_flag_names):
  def flags_after_entry_point(argv: list[str]) -> list[str]:
    """The flags after `-m pafm_jax.main`; each one main.py defines (or a config field)."""
    flags = argv[argv.index('pafm_jax.main') + 1:]
    for flag in flags:
      name = flag.lstrip('-').split('=')[0]
      assert name.startswith('config.') or name in main_flag_names, flag
    return flags
  return flags_after_entry_point


def test_scripts_pass_shellcheck():
  shellcheck = os.path.join(os.path.dirname(sys.executable), 'shellcheck')
  assert SCRIPTS == ['gcp_tpu.sh', 'local.sh', 'slurm_gpu.sh']
  out = subprocess.run([shellcheck, *SCRIPTS], cwd=LAUNCH, capture_output=True, text=True)
  assert out.returncode == 0, out.stdout


def test_local_dry_run_starts_one_process_per_index_on_one_coordinator(main_flags):
  lines = _dry_run('local.sh', '3', '--config=configs/fmnist_sit.py', '--workdir=runs/x',
                   '--config.total_steps=4', PORT='12345', DEVICES_PER_PROCESS='2',
                   PYTHON='python3')
  assert len(lines) == 3
  for i, argv in enumerate(lines):
    assert argv[:3] == ['cd', runs.REPO, '&&']
    assert argv[3:7] == ['env', 'XLA_FLAGS=--xla_force_host_platform_device_count=2',
                         'JAX_PLATFORMS=cpu', 'python3']
    assert main_flags(argv) == [
        '--distributed', '--coordinator_address=127.0.0.1:12345', '--num_processes=3',
        f'--process_id={i}', '--config=configs/fmnist_sit.py', '--workdir=runs/x',
        '--config.total_steps=4']


def test_gcp_dry_run_prints_every_step_of_a_queued_run(main_flags):
  lines = _dry_run('gcp_tpu.sh', 'run', 'pafm', '--zone=us-central2-b', '--type=v4-64',
                   '--queued', '--spot', '--index=gs://b/index', '--config=configs/sit_xl2.py',
                   '--workdir=gs://b/run', '--', '--config.seed=1')
  assert lines[0] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'pafm',
                      '--node-id=pafm', '--zone=us-central2-b', '--accelerator-type=v4-64',
                      '--runtime-version=tpu-ubuntu2204-base', '--spot']
  assert lines[1][:5] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe']
  assert lines[2][:3] == ['git', '-C', runs.REPO] and lines[2][-1] == 'HEAD'
  assert lines[3][:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  ssh = [line for line in lines if line[3:5] == ['tpu-vm', 'ssh']]
  setup, index, train, logs = (shlex.split(line[-1].split('=', 1)[1]) for line in ssh)
  assert 'jax[tpu]==$(.venv/bin/python' in ' '.join(setup)
  assert 'gs://b/index' in index and index[-1] == '~/pafm_index'
  assert main_flags(train[:train.index('>')]) == [
      '--distributed', '--config=configs/sit_xl2.py', '--workdir=gs://b/run', '--config.seed=1',
      '--config.retrieval.index_dir=$HOME/pafm_index']
  assert all(line[5:8] == ['pafm', '--zone=us-central2-b', '--worker=all'] for line in ssh[:3])
  assert ssh[3][5:8] == ['pafm', '--zone=us-central2-b', '--worker=0']
  assert _dry_run('gcp_tpu.sh', 'delete', 'pafm', '--zone=z', '--queued') == [
      ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'pafm', '--zone=z', '--force',
       '--quiet']]
  assert _dry_run('gcp_tpu.sh', 'fetch', 'pafm', '--zone=z', '--workdir=gs://b/run',
                  '--to=out')[1] == ['gsutil', '-m', 'rsync', '-r', '-x',
                                     '^checkpoints/|^corrupt_checkpoints/', 'gs://b/run', 'out']


def test_slurm_dry_run_prints_the_batch_script(main_flags):
  out = subprocess.run([os.path.join(LAUNCH, 'slurm_gpu.sh'), '--dry-run', '--nodes=4',
                        '--partition=gpu', '--config=configs/sit_xl2.py', '--workdir=/shared/r',
                        '--', '--config.seed=1'], capture_output=True, text=True, check=True)
  lines = out.stdout.splitlines()
  assert {'#SBATCH --nodes=4', '#SBATCH --ntasks-per-node=8', '#SBATCH --gpus-per-node=8',
          '#SBATCH --partition=gpu', '#SBATCH --signal=TERM@300'} <= set(lines)
  srun = shlex.split(next(line for line in lines if line.startswith('srun')))
  assert main_flags(srun) == ['--distributed', '--config=configs/sit_xl2.py',
                               '--workdir=/shared/r', '--config.seed=1']
  assert lines[-1] == 'sbatch /shared/r/slurm/train.sbatch'


@pytest.mark.parametrize('argv', [
    ['local.sh'], ['local.sh', 'two'], ['gcp_tpu.sh', 'run'],
    ['gcp_tpu.sh', 'train', 'pafm', '--zone=z'], ['gcp_tpu.sh', 'train', 'pafm', '--bogus'],
    ['slurm_gpu.sh', '--nodes=2']])
def test_incomplete_commands_print_usage_and_exit_2(argv):
  out = subprocess.run([os.path.join(LAUNCH, argv[0]), '--dry-run', *argv[1:]], cwd=runs.REPO,
                       capture_output=True, text=True)
  assert out.returncode == 2, (out.stdout, out.stderr)
  assert 'launch/' in out.stdout or 'needs --' in out.stderr
