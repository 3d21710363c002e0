"""The package's shape: no import cycle, README's layout names every module, short functions.

Truth: the source tree itself, parsed with `ast` (every import, including the ones inside
functions, counts: a late import only hides a cycle).
"""

import ast
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / 'pafm_jax'
MAX_FUNCTION_LINES = 100


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """pafm_jax modules imported anywhere in `path` (from-imports of a package's submodules
  count as imports of those submodules)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      found.add(node.module)
      found |= {f'{node.module}.{a.name}' for a in node.names}
  return {m for m in found if m in modules}


def _import_graph():
  files = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
  modules = set(files)
  graph = {}
  for name, path in files.items():
    # A package's __init__ is imported with any of its submodules; an edge to it alone would
    # be a cycle of Python's making, not of ours.
    graph[name] = {m for m in _imports(path, modules) if m != name and not name.startswith(m + '.')}
  return graph


def _cycle(graph):
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycle_in_the_package():
  graph = _import_graph()
  assert len(graph) > 30
  assert _cycle(graph) is None, ' -> '.join(_cycle(graph))


def test_nothing_below_the_loop_imports_the_trainer():
  """Evaluation, sampling, tools and models are reusable outside training."""
  graph = _import_graph()
  importers = sorted(m for m, deps in graph.items() if 'pafm_jax.train' in deps)
  assert importers == ['pafm_jax.main'], importers


def test_readme_layout_names_every_module():
  readme = (REPO / 'README.md').read_text()
  layout = re.search(r'## Layout\n\n```\n(.*?)```', readme, re.S).group(1)
  missing = []
  for path in sorted(PACKAGE.rglob('*.py')):
    rel = path.relative_to(PACKAGE)
    if rel.name == '__init__.py':
      continue
    # Named as 'file.py', 'dir/file.py', or listed under its directory's line.
    if rel.name not in layout and str(rel) not in layout:
      missing.append(str(rel))
  assert not missing, missing
  for name in re.findall(r'^  ([\w/]+\.py)', layout, re.M):
    assert (PACKAGE / name).exists() or list(PACKAGE.rglob(name.split('/')[-1])), name


def test_functions_stay_short():
  longest = max(
      ((node.end_lineno - node.lineno + 1, f'{path.relative_to(REPO)}:{node.lineno} {node.name}')
       for path in PACKAGE.rglob('*.py')
       for node in ast.walk(ast.parse(path.read_text()))
       if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))))
  assert longest[0] <= MAX_FUNCTION_LINES, longest
