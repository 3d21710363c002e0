"""Documentation that cannot rot: README.md, docs/ and notebooks/README.md against the code.

Truths: the file tree (every relative link and image resolves, and an `#anchor` names a
heading of its target by GitHub's slug rule); the configs themselves (every
`--config.a.b=...` written in the docs names a field of the config the command uses); each
entry point's own `--helpfull` (every `python -m mod` exists, every flag it is given is one of
its flags and an enum flag's value one of its values); the Makefile (every `make target` is a
target, every `VAR=value` one of its variables, and `make -n` accepts the line).
"""

import functools
import importlib.util
import pathlib
import re
import shlex
import subprocess
import sys

import ml_collections
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _doc_files() -> list[pathlib.Path]:
  files = [REPO / 'README.md', *sorted((REPO / 'docs').rglob('*.md'))]
  notebooks = REPO / 'notebooks' / 'README.md'
  return files + ([notebooks] if notebooks.exists() else [])


DOCS = _doc_files()
_FENCE = re.compile(r'^(\s*)(```|~~~)(.*)$')


def _split_code(text: str) -> tuple[str, list[str]]:
  """(the prose with code blocks blanked, the code blocks)."""
  prose, blocks, block, fence = [], [], None, None
  for line in text.splitlines():
    match = _FENCE.match(line)
    if block is None and match:
      block, fence = [], match.group(2)
      prose.append('')
    elif block is not None and match and match.group(2) == fence and not match.group(3).strip():
      blocks.append('\n'.join(block))
      block = None
      prose.append('')
    elif block is not None:
      block.append(line)
      prose.append('')
    else:
      prose.append(line)
  return '\n'.join(prose), blocks


# ------------------------------------------------------------------------------- links

_LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
_HTML_SRC = re.compile(r'<(?:img|a)\b[^>]*?\b(?:src|href)="([^"]+)"', re.IGNORECASE)


def github_slug(heading: str) -> str:
  """The anchor GitHub gives a heading: its rendered text, lower case, punctuation other than
  '-' and '_' removed, spaces turned into '-'."""
  text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)   # a link renders as its text
  text = re.sub(r'<[^>]+>', '', text).strip().lower()
  return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


@functools.cache
def _anchors(path: pathlib.Path) -> frozenset[str]:
  prose, _ = _split_code(path.read_text())
  seen, anchors = {}, set()
  for line in prose.splitlines():
    match = re.match(r'^#{1,6}\s+(.*?)\s*#*\s*$', line)
    if not match:
      continue
    slug = github_slug(match.group(1))
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    anchors.add(slug if count == 0 else f'{slug}-{count}')
  return frozenset(anchors)


def _links(path: pathlib.Path) -> list[str]:
  prose, _ = _split_code(path.read_text())
  prose = re.sub(r'`[^`\n]*`', '', prose)   # inline code is not a link
  return _LINK.findall(prose) + _HTML_SRC.findall(prose)


def _broken(path: pathlib.Path, target: str) -> str | None:
  if re.match(r'^[a-z][a-z0-9+.-]*:', target):   # http:, https:, mailto: ...
    return None
  file_part, _, anchor = target.partition('#')
  resolved = (path.parent / file_part).resolve() if file_part else path
  if not resolved.exists():
    return f'{target}: no such file {resolved.relative_to(REPO) if REPO in resolved.parents else resolved}'
  if anchor and resolved.suffix == '.md' and anchor not in _anchors(resolved):
    return f'{target}: {resolved.name} has no heading with the anchor #{anchor}'
  return None


def test_the_documentation_pages_exist():
  names = {p.relative_to(REPO).as_posix() for p in DOCS}
  assert 'README.md' in names and len(names) > 1, names


@pytest.mark.parametrize('path', DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_and_image_resolves(path):
  broken = [b for b in (_broken(path, t) for t in _links(path)) if b]
  assert not broken, f'{path.relative_to(REPO)}:\n  ' + '\n  '.join(broken)


def test_the_link_checker_catches_what_it_should(tmp_path):
  """The checker itself, on a page with one good and three broken links."""
  (tmp_path / 'img.png').write_bytes(b'')
  page = tmp_path / 'page.md'
  page.write_text('# Top\n## Flow maps: X_{s,t}\n[a](page.md#top) ![b](img.png) '
                  '[c](missing.md) [d](#flow-maps-x_st) [e](#nowhere) `[f](inline.md)`\n'
                  '```\n[g](in_code.md)\n```\n')
  problems = [b for b in (_broken(page, t) for t in _links(page)) if b]
  assert len(problems) == 2 and 'missing.md' in problems[0] and '#nowhere' in problems[1]


# ---------------------------------------------------------------------------- commands


def _commands(path: pathlib.Path) -> list[list[str]]:
  """Every shell command in the page's code blocks, as tokens (continuations joined, comments,
  prompts and `VAR=value` prefixes dropped, `&&` / `;` / `|` split)."""
  _, blocks = _split_code(path.read_text())
  commands = []
  for block in blocks:
    text = re.sub(r'\\\n', ' ', block)
    for line in text.splitlines():
      line = line.strip()
      if line.startswith('$ '):
        line = line[2:]
      if not line or line.startswith('#'):
        continue
      try:
        tokens = shlex.split(line, comments=True)
      except ValueError:
        tokens = line.split()
      command = []
      for token in tokens + [';']:
        if token in ('&&', ';', '|', '||') or token.endswith(';'):
          if token.endswith(';') and token != ';':
            command.append(token[:-1])
          if command:
            commands.append(command)
          command = []
        elif command or not re.match(r'^[A-Z_][A-Z0-9_]*=', token):
          command.append(token)
  return commands


def _python_module(tokens: list[str]) -> tuple[str, list[str]] | None:
  """(module, its arguments) of `... python -m module args`."""
  for i, token in enumerate(tokens[:-2]):
    if re.search(r'(^|/)python3?$', token) and tokens[i + 1] == '-m':
      return tokens[i + 2], tokens[i + 3:]
  return None


def _inline_overrides(path: pathlib.Path) -> list[str]:
  prose, _ = _split_code(path.read_text())
  spans = re.findall(r'`([^`\n]*)`', prose)
  # `--config.a.b=value` is the generic form, not an override.
  return [field for span in spans if '--config=' not in span
          for field, value in re.findall(r'--config\.([\w.]+)=(\S*)', span)
          if value.strip('<>.') not in ('value', '')]


def _all_commands():
  return [(path, c) for path in DOCS for c in _commands(path)]


def _python_commands():
  return [(path, *m) for path, c in _all_commands() if (m := _python_module(c))]


def _config_file(args: list[str], module: str) -> str:
  """The config file a command runs with: its --config=, else the entry point's default."""
  for arg in args:
    if arg.startswith('--config='):
      return arg.split('=', 1)[1].split(':', 1)[0]
  return _config_default(module)


@functools.cache
def _config_default(module: str) -> str:
  spec = importlib.util.find_spec(module)
  source = pathlib.Path(spec.origin).read_text()
  match = re.search(r"DEFINE_config_file\(\s*'config',\s*'([^']+)'", source)
  return match.group(1) if match else 'configs/base.py'


@functools.cache
def _load_config(path: str) -> ml_collections.ConfigDict:
  file = REPO / path
  if not file.exists():
    raise AssertionError(f'no config file {path}')
  spec = importlib.util.spec_from_file_location(f'_doc_config_{file.stem}', file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _has_field(config: ml_collections.ConfigDict, dotted: str) -> bool:
  node = config
  for part in dotted.split('.'):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return False
    node = node[part]
  return True


def test_every_config_override_names_a_field_of_its_config():
  problems, checked = [], 0
  for path, module, args in _python_commands():
    overrides = [a[len('--config.'):].split('=', 1)[0] for a in args
                 if a.startswith('--config.')]
    if not overrides:
      continue
    config_path = _config_file(args, module)
    config = _load_config(config_path)
    for field in overrides:
      checked += 1
      if not _has_field(config, field):
        problems.append(f'{path.relative_to(REPO)}: --config.{field} is not a field of '
                        f'{config_path} ({module})')
  base = _load_config('configs/base.py')
  for path in DOCS:
    for field in _inline_overrides(path):   # prose: every config inherits configs/base.py
      checked += 1
      if not _has_field(base, field):
        problems.append(f'{path.relative_to(REPO)}: `--config.{field}=` is not a config field')
  assert checked > 10, 'the docs were expected to show config overrides'
  assert not problems, '\n'.join(problems)


def test_the_override_checker_rejects_an_unknown_field():
  base = _load_config('configs/base.py')
  assert _has_field(base, 'objective.pafm.stratified')
  assert not _has_field(base, 'objective.pafm.stratifed')
  assert not _has_field(base, 'objective.name.extra')


_FLAG = re.compile(r'^\s+--(?:\[no\])?([\w.-]+):', re.MULTILINE)
_ENUM = re.compile(r'^\s+--([\w.-]+):\s*\n\s+<([^>]+)>', re.MULTILINE)


@functools.cache
def _help(module: str) -> tuple[frozenset[str], dict[str, frozenset[str]]]:
  """(flags, {enum flag: values}) from the entry point's own --helpfull."""
  source = pathlib.Path(importlib.util.find_spec(module).origin).read_text()
  if 'app.run(' not in source:   # it would not print help but run
    raise AssertionError(f'python -m {module} is not an absl entry point: no --help to check')
  out = subprocess.run([sys.executable, '-m', module, '--helpfull'], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  text = out.stdout + out.stderr
  flags = frozenset(_FLAG.findall(text))
  if out.returncode not in (0, 1) or 'Traceback' in text or not flags:
    raise AssertionError(f'python -m {module} --helpfull failed (exit {out.returncode}):\n'
                         f'{text[-3000:]}')
  enums = {name: frozenset(values.split('|')) for name, values in _ENUM.findall(text)}
  return flags, enums


def _flag_problems(module: str, args: list[str]) -> list[str]:
  flags, enums = _help(module)
  problems = []
  for arg in args:
    if not arg.startswith('--') or arg == '--':
      continue
    name, has_value, value = arg[2:].partition('=')
    if name.startswith('config.'):
      continue   # the config's fields: test_every_config_override_names_a_field_of_its_config
    bare = name[2:] if name.startswith('no') and name[2:] in flags else name
    if bare not in flags:
      problems.append(f'--{name} is not a flag of python -m {module}')
    elif has_value and bare in enums and value not in enums[bare] and not value.startswith('$'):
      problems.append(f'--{name}={value}: python -m {module} takes one of {sorted(enums[bare])}')
  return problems


def test_every_python_command_is_an_entry_point_with_those_flags():
  commands = _python_commands()
  assert len({m for _, m, _ in commands}) >= 5, 'the docs were expected to show entry points'
  problems = []
  for path, module, args in commands:
    if importlib.util.find_spec(module) is None:
      problems.append(f'{path.relative_to(REPO)}: no module {module}')
      continue
    problems += [f'{path.relative_to(REPO)}: {p}' for p in _flag_problems(module, args)]
  assert not problems, '\n'.join(sorted(set(problems)))


def test_the_flag_checker_rejects_unknown_flags_and_enum_values():
  assert not _flag_problems('pafm_jax.main', ['--config=configs/fmnist_sit.py', '--mode=eval',
                                              '--workdir=runs/x', '--config.seed=1'])
  problems = _flag_problems('pafm_jax.main', ['--mode=evaluate', '--work_dir=x'])
  assert len(problems) == 2 and 'evaluate' in problems[0] and 'work_dir' in problems[1]


@functools.cache
def _make_database() -> str:
  return subprocess.run(['make', '-pn', '-f', str(REPO / 'Makefile'), '.DEFAULT'], cwd=REPO,
                        capture_output=True, text=True, timeout=60).stdout


def _make_problems(args: list[str]) -> list[str]:
  database = _make_database()
  targets = set(re.findall(r'^([\w.-]+):', database, re.MULTILINE))
  variables = set(re.findall(r'^([A-Za-z_]\w*) [:?+]?= ', database, re.MULTILINE))
  problems = []
  for arg in args:
    if '=' in arg:
      if arg.split('=', 1)[0] not in variables:
        problems.append(f'make has no variable {arg.split("=")[0]}')
    elif not arg.startswith('-') and arg not in targets:
      problems.append(f'make has no target {arg}')
  if not problems:
    dry = subprocess.run(['make', '-n', *args], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    if dry.returncode:
      problems.append(f'make -n {" ".join(args)}: {dry.stderr.strip()}')
  return problems


def test_every_make_command_names_a_target_and_its_variables():
  makes = [(path, c[1:]) for path, c in _all_commands() if c and c[0] == 'make']
  assert makes, 'the docs were expected to show make commands'
  problems = [f'{path.relative_to(REPO)}: {p}' for path, args in makes
              for p in _make_problems(args)]
  assert not problems, '\n'.join(sorted(set(problems)))


def test_the_command_checkers_reject_unknown_commands(tmp_path):
  page = tmp_path / 'page.md'
  page.write_text('```bash\n# a comment\nmake trian WORKDIR=x\nmake test PYTEST_ARG=-x\n'
                  'PAFM_X=1 .venv/bin/python -m pafm_jax.mian --config=configs/fmnist_sit.py \\\n'
                  '    --config.seed=3 && make test-fast\n```\n')
  commands = _commands(page)
  assert commands == [['make', 'trian', 'WORKDIR=x'], ['make', 'test', 'PYTEST_ARG=-x'],
                      ['.venv/bin/python', '-m', 'pafm_jax.mian',
                       '--config=configs/fmnist_sit.py', '--config.seed=3'],
                      ['make', 'test-fast']]
  assert _make_problems(['trian', 'WORKDIR=x']) == ['make has no target trian']
  assert _make_problems(['test', 'PYTEST_ARG=-x']) == ['make has no variable PYTEST_ARG']
  assert not _make_problems(['test-fast', 'PYTEST_ARGS=-x'])
  assert importlib.util.find_spec(_python_module(commands[2])[0]) is None


def test_every_script_a_page_runs_exists():
  problems, scripts = [], 0
  for path, command in _all_commands():
    script = command[1] if command[0] in ('bash', 'sh') and len(command) > 1 else command[0]
    if script.endswith('.sh') or (command[0] in ('bash', 'sh') and script.endswith('.py')):
      scripts += 1
      if not (REPO / script).is_file():
        problems.append(f'{path.relative_to(REPO)}: no script {script}')
  assert scripts, 'the docs were expected to show the launch scripts'
  assert not problems, '\n'.join(problems)


def _entry_points_in(tokens: list[str]) -> list[tuple[str, list[str]]]:
  """Every `python -m module args` in a command, including one quoted inside an argument
  (`gcloud ... ssh --command='... python -m pafm_jax.main ...'`)."""
  found = [m] if (m := _python_module(tokens)) else []
  for token in tokens:
    if ' -m ' in token:
      inner = token.split('=', 1)[1] if token.startswith('--') else token
      for part in re.split(r'&&|;', inner):
        try:
          found += _entry_points_in(shlex.split(part))
        except ValueError:
          pass
  return found


def test_every_launch_command_dry_runs_into_real_entry_points():
  """A launch script line of the docs, run with --dry-run, prints the commands it would run;
  each of their entry points must take the flags and config fields it is given."""
  launches = [(path, c) for path, c in _all_commands()
              if c[0].startswith(('launch/', './launch/')) and c[0].endswith('.sh')]
  assert launches, 'the docs were expected to show the launch scripts'
  problems, entry_points = [], 0
  for path, command in launches:
    args = command[2:] if command[1:2] == ['--dry-run'] else command[1:]
    out = subprocess.run([str(REPO / command[0]), '--dry-run', *args], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    where = f'{path.relative_to(REPO)}: {" ".join(command)[:80]}'
    if out.returncode:
      problems.append(f'{where}: --dry-run failed: {out.stderr.strip()[-500:]}')
      continue
    for line in out.stdout.splitlines():
      if line.startswith('#') or ' -m ' not in line:
        continue
      for module, module_args in _entry_points_in(shlex.split(line)):
        entry_points += 1
        problems += [f'{where}: {p}' for p in _flag_problems(module, module_args)]
        config = _load_config(_config_file(module_args, module))
        problems += [f'{where}: {a.split("=")[0]} is not a config field'
                     for a in module_args if a.startswith('--config.')
                     and not _has_field(config, a[len('--config.'):].split('=', 1)[0])]
  assert entry_points, 'the launch scripts were expected to start pafm_jax.main'
  assert not problems, '\n'.join(problems)
