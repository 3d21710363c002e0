"""What every notebook in notebooks/ shares once its set-up cell has found (or, in Colab,
installed) the repository and put it on sys.path: a runner for the project's commands and
small display helpers.

Importing this module keeps the notebook's own Python off the accelerator (a TPU can be held
by only one process, and the commands need it); CHILD_ENV, the environment the commands run
in, is taken before that.
"""

import glob
import io
import os
import pathlib
import shlex
import subprocess
import sys

from IPython.display import Image, display

REPO = pathlib.Path(__file__).resolve().parent.parent
CHILD_ENV = dict(os.environ)
os.environ['JAX_PLATFORMS'] = 'cpu'


def run(*args):
  """Runs a command from the repository root ('python' is this notebook's interpreter),
  prints its output as it comes (long log lines cut short) and raises if it fails."""
  args = [str(a) for a in args]
  print('$', shlex.join(args), flush=True)
  command = [sys.executable if args[0] == 'python' else args[0], *args[1:]]
  with subprocess.Popen(command, cwd=REPO, env=CHILD_ENV, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, errors='replace') as process:
    for line in process.stdout:
      print(line if len(line) <= 240 else line[:236] + ' ...\n', end='', flush=True)
  if process.returncode:
    raise RuntimeError(f'exit status {process.returncode}: {shlex.join(args)} (output above)')


def config_flags(overrides):
  """{'a.b': value} -> ['--config.a.b=value', ...]: config fields set on the command line."""
  return [f'--config.{field}={value}' for field, value in overrides.items()]


def show(path, scale=2):
  """Displays a PNG (a local path or a gs:// URL), enlarged `scale` times."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from PIL import Image as PILImage  # pylint: disable=g-import-not-at-top
  data = epath.Path(path).read_bytes()
  width = PILImage.open(io.BytesIO(data)).width
  print(path)
  display(Image(data=data, width=width * scale))


def newest(pattern):
  """The most recently written file matching a glob pattern."""
  matches = glob.glob(str(pattern))
  if not matches:
    raise FileNotFoundError(f'nothing matches {pattern}')
  return max(matches, key=os.path.getmtime)
