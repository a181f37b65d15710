"""The import graph of `tqjax` and `pallas_kernels`: no cycle, and every import points down the
layers (quantizer < cache < partials < pallas_kernels < ops < nn < models), function-level
(lazy) imports included."""

import ast
import pathlib

import pytest

pytestmark = pytest.mark.math

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("tqjax", "pallas_kernels")

# Layer of each module (a module imports only modules of its own layer or below, acyclically).
# A new module gets its place here: the test fails for a module it does not know.
LAYERS = {
    "tqjax.codebook": 0, "tqjax.rotation": 0, "tqjax.packing": 0, "tqjax.qjl": 0, "tqjax.data": 0,
    "tqjax.quantizer": 1,
    "tqjax.cache": 2,
    "tqjax.partials": 3,
    "pallas_kernels": 4,  # every module of the package
    "tqjax.ops": 5,
    "tqjax.compat": 6, "tqjax.dense_cache": 6, "tqjax.search": 6, "tqjax.baselines": 6, "tqjax.synthetic": 6,
    "tqjax.fidelity": 6, "tqjax.sharding": 6,
    "tqjax.nn": 7,
    "tqjax.models": 8,  # every module of the package
    "tqjax.__main__": 9, "tqjax": 9,
}


def _modules() -> dict[str, pathlib.Path]:
  mods = {}
  for pkg in PACKAGES:
    for path in sorted((ROOT / pkg).rglob("*.py")):
      parts = path.relative_to(ROOT).with_suffix("").parts
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      mods[name] = path
  return mods


def _layer(name: str) -> int:
  while name:
    if name in LAYERS:
      return LAYERS[name]
    name = name.rpartition(".")[0]
  raise KeyError(name)


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """Modules of `known` that `name` imports anywhere in its file."""
  out = set()
  is_pkg = path.name == "__init__.py"
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = name.split(".") if is_pkg else name.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      targets = [f"{base}.{a.name}" for a in node.names] + [base]
    else:
      continue
    for t in targets:
      while t and t not in known:
        t = t.rpartition(".")[0]
      if t and t != name:
        out.add(t)
  return out


def _graph():
  mods = _modules()
  known = set(mods)
  graph = {m: _imports(m, p, known) for m, p in mods.items()}
  # `from tqjax import x` names the package first: keep only the submodule it reaches.
  for m, deps in graph.items():
    if any(d.startswith("tqjax.") for d in deps):
      deps.discard("tqjax")
  return graph


def test_every_module_has_a_layer():
  missing = [m for m in _modules() if not any(m == k or m.startswith(k + ".") for k in LAYERS)]
  assert not missing, f"modules without a layer in LAYERS: {missing}"


def test_imports_point_down_the_layers():
  bad = [(m, d) for m, deps in _graph().items() for d in deps if _layer(d) > _layer(m)]
  assert not bad, f"upward imports (module → imported): {bad}"


def test_import_graph_has_no_cycle():
  graph = _graph()
  state: dict[str, int] = {}  # 1 on the stack, 2 done
  stack: list[str] = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for d in sorted(graph[m]):
      if state.get(d) == 1:
        raise AssertionError("import cycle: " + " → ".join(stack[stack.index(d):] + [d]))
      if d not in state:
        visit(d)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m)


def test_the_check_sees_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
  """The checks can fail: a fake cache that imports ops is reported both ways."""
  fake = {"tqjax.cache": {"tqjax.ops"}, "tqjax.ops": {"tqjax.cache"}}
  monkeypatch.setattr(__import__(__name__), "_graph", lambda: fake)
  with pytest.raises(AssertionError, match="import cycle"):
    test_import_graph_has_no_cycle()
  with pytest.raises(AssertionError, match="upward imports"):
    test_imports_point_down_the_layers()
