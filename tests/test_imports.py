"""No import cycles inside the package: every module's imports (module level and inside functions),
read with `ast`, form a graph without cycles.

Edges: `import a.b.c` -> a.b.c; `from a.b import c` -> a.b.c when that is a module of the package,
else -> a.b (a name taken from a.b); relative imports are resolved against the importing module;
`importlib.import_module("a.b")` with a literal name counts too. A package's __init__ runs before any
of its submodules, which is no cycle of ours: it is an edge only when a name is taken from it.
"""
from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "nextlat_jax"


def module_files(root: pathlib.Path = REPO / PACKAGE) -> dict[str, pathlib.Path]:
  """Module name -> file, for every .py file of the package (packages by their __init__.py)."""
  out = {}
  for path in sorted(root.rglob("*.py")):
    parts = path.relative_to(root.parent).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def imports_of(name: str, path: pathlib.Path, modules: set[str]) -> dict[str, int]:
  """The package modules that module `name` (file `path`) imports, each with the line of its first import."""
  is_package = path.name == "__init__.py"
  found: dict[str, int] = {}

  def add(target: str, line: int) -> None:
    if target in modules and target != name:
      found.setdefault(target, line)

  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name, node.lineno)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: from the module's package, one level up per extra dot
        base_parts = name.split(".") if is_package else name.split(".")[:-1]
        base_parts = base_parts[:len(base_parts) - (node.level - 1)]
        base = ".".join(base_parts + ([node.module] if node.module else []))
      else:
        base = node.module or ""
      for alias in node.names:
        sub = f"{base}.{alias.name}"
        add(sub if sub in modules else base, node.lineno)
    elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str)
          and ast.unparse(node.func) in ("importlib.import_module", "import_module")):
      add(node.args[0].value, node.lineno)
  return found


def import_graph() -> dict[str, dict[str, int]]:
  files = module_files()
  return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
  """One cycle (a list of modules, first == last) per strongly connected component with more than one
  module (Tarjan's algorithm, iterative)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  on_stack: set[str] = set()
  stack: list[str] = []
  components: list[list[str]] = []
  for root in sorted(graph):
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = len(index)
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = len(index)
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph[child]))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        if len(component) > 1:
          components.append(sorted(component))
  return [_cycle_in(graph, set(c), c[0]) for c in components]


def _cycle_in(graph: dict[str, dict[str, int]], members: set[str], start: str) -> list[str]:
  """A shortest cycle through `start` inside one strongly connected component (breadth-first)."""
  parent: dict[str, str] = {}
  frontier = [start]
  while frontier:
    nxt = []
    for node in frontier:
      for child in sorted(graph[node]):
        if child == start:
          path = [node]
          while path[-1] != start:
            path.append(parent[path[-1]])
          return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, node, start]
        if child in members and child not in parent:
          parent[child] = node
          nxt.append(child)
    frontier = nxt
  raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
  return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_package_has_no_import_cycles():
  graph = import_graph()
  assert len(graph) > 50 and "nextlat_jax.cli" in graph
  found = cycles(graph)
  assert not found, "import cycles:\n" + "\n".join(describe(graph, c) for c in found)


def test_cycle_finder_reads_function_level_and_submodule_imports(tmp_path: pathlib.Path):
  """The finder itself: a cycle through a function-level `from pkg import sub` and a relative import."""
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("def build():\n  from pkg import a\n  return a\n")
  (pkg / "a.py").write_text("from pkg.sub import b\n")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "sub" / "b.py").write_text("from .. import Thing\n")
  (pkg / "c.py").write_text("import pkg.a\n")
  files = module_files(pkg)
  graph = {name: imports_of(name, path, set(files)) for name, path in files.items()}
  assert graph["pkg"] == {"pkg.a": 2} and graph["pkg.a"] == {"pkg.sub.b": 1}
  assert graph["pkg.sub.b"] == {"pkg": 1} and graph["pkg.c"] == {"pkg.a": 1}
  assert cycles(graph) == [["pkg", "pkg.a", "pkg.sub.b", "pkg"]]
  (pkg / "sub" / "b.py").write_text("def f():\n  import importlib\n  return importlib.import_module('pkg.c')\n")
  graph["pkg.sub.b"] = imports_of("pkg.sub.b", pkg / "sub" / "b.py", set(files))
  assert graph["pkg.sub.b"] == {"pkg.c": 3}
  assert cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]
  (pkg / "c.py").write_text("x = 1\n")
  graph["pkg.c"] = imports_of("pkg.c", pkg / "c.py", set(files))
  assert cycles(graph) == []
