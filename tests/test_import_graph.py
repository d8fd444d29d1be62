"""No import cycles inside the installed package (edgeprune, edgeprune.export, edgeprune.devices).

The graph is built from the AST of every module: each ``import`` / ``from ... import`` statement, at module level
and inside functions and methods (a deferred import is still a dependency), except those under
``if TYPE_CHECKING:``. An edge goes from the importing module to the module the statement names: for
``from P import x`` that is ``P.x`` when ``P.x`` is a module of the package, else ``P``. The implicit import of
a module's parent packages is not counted (every submodule would otherwise "import" its own ``__init__``).
"""

import ast
import importlib.util
import pkgutil
from pathlib import Path

import edgeprune.devices
import edgeprune.export

import edgeprune


def package_modules() -> dict[str, Path]:
    mods = {}
    for pkg in (edgeprune, edgeprune.export, edgeprune.devices):
        mods[pkg.__name__] = Path(pkg.__file__)
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            spec = importlib.util.find_spec(info.name)
            if spec is not None and spec.origin and spec.origin.endswith(".py"):
                mods[info.name] = Path(spec.origin)
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import edgeprune.x.y` names edgeprune.x.y, or its nearest package
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_graph_sees_the_package():
    modules = package_modules()
    assert {"edgeprune.cli", "edgeprune.pipeline.engine", "edgeprune.export.gguf", "edgeprune.devices.profiler",
            "edgeprune.rundir"} <= set(modules)
    assert "edgeprune.pipeline" in imports_of("edgeprune.cli", modules["edgeprune.cli"], modules)
    # a made-up cycle is found
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    modules = package_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert find_cycles(graph) == []


def test_imports_flow_one_way():
    """cli -> pipeline -> stages -> library: the library never imports the pipeline or the CLI, the pipeline
    never imports the CLI."""
    modules = package_modules()
    for name, path in modules.items():
        deps = imports_of(name, path, modules)
        if not name.startswith(("edgeprune.cli", "edgeprune.__main__")):
            assert not {d for d in deps if d.startswith("edgeprune.cli")}, name
        if not name.startswith(("edgeprune.cli", "edgeprune.__main__", "edgeprune.pipeline")):
            assert not {d for d in deps if d.startswith("edgeprune.pipeline")}, name


KNOWN_PRIVATE: set[tuple[str, str]] = set()  # no module reaches into another one's private names


def test_private_names_stay_in_their_module():
    modules = package_modules()
    found = set()
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("edgeprune"):
                found |= {(name, f"{node.module}.{a.name}") for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")}
    assert found <= KNOWN_PRIVATE, found - KNOWN_PRIVATE
