"""The layout keeps its promises (architecture.md, "Layout"): read with `ast`, malmm_cli/ and
models/ have no import circle, import no underscore name from another file, and import only
downwards:

    cli -> serve -> learn -> runs -> engine -> results -> sources -> models
    (and the bottom modules malmm_cli/{errors,times,interrupts,messages,terminal}.py, importable by all)

An import counts wherever it is written: at the top of a module, inside a function, under
`if TYPE_CHECKING`. A module may import its own package's modules freely (circles aside).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("malmm_cli", "models")

# Layers of malmm_cli, lowest first: a module may import from its own layer's package and from
# any layer below it, never above. `models` is below everything and imports none of malmm_cli.
LAYERS = ("models", "malmm_cli.bottom", "malmm_cli.sources", "malmm_cli.results", "malmm_cli.engine",
          "malmm_cli.runs", "malmm_cli.learn", "malmm_cli.serve", "malmm_cli.cli")
BOTTOM = {"malmm_cli", "malmm_cli.errors", "malmm_cli.times", "malmm_cli.interrupts", "malmm_cli.messages",
          "malmm_cli.terminal"}
ENTRY_POINTS = {"malmm_cli.__main__": "malmm_cli.cli"}  # `python -m malmm_cli` is the command line


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_modules(root: Path = ROOT) -> dict[str, tuple[Path, ast.Module]]:
    """Every module of PACKAGES under `root`: name -> (file, syntax tree)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            found[module_name(path, root)] = (path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return found


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The module an ImportFrom names, with relative levels resolved against `module`."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(modules: dict[str, tuple[Path, ast.Module]]) -> list[tuple[str, str, str | None, int]]:
    """(importer, imported module, name taken from it or None, line) for every import of a
    module of ours, anywhere in the file."""
    found = []
    for name, (path, tree) in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = alias.name
                    while target and target not in modules:  # `import a.b.c`: the deepest module of ours
                        target = target.rpartition(".")[0]
                    if target:
                        found.append((name, target, None, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(name, is_package, node)
                for alias in node.names:
                    if f"{source}.{alias.name}" in modules:  # `from package import module`
                        found.append((name, f"{source}.{alias.name}", None, node.lineno))
                    elif source in modules:
                        found.append((name, source, alias.name, node.lineno))
    return found


def circles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        if a != b:
            graph.setdefault(a, set()).add(b)
            graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> str:
    """The layer (an entry of LAYERS) a module belongs to."""
    if module in ENTRY_POINTS:
        return ENTRY_POINTS[module]
    if module == "models" or module.startswith("models."):
        return "models"
    if module in BOTTOM:
        return "malmm_cli.bottom"
    for candidate in LAYERS:
        if module == candidate or module.startswith(candidate + "."):
            return candidate
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS")


def upward(found: list[tuple[str, str, str | None, int]]) -> list[str]:
    """Imports against the direction of the layers."""
    bad = []
    for importer, imported, _, line in found:
        a, b = layer(importer), layer(imported)
        if LAYERS.index(b) > LAYERS.index(a):
            bad.append(f"{importer} (line {line}) imports {imported}: {a} may not import {b}")
    return bad


def private_names(found: list[tuple[str, str, str | None, int]]) -> list[str]:
    """Underscore names imported from another file (dunders such as __version__ are public)."""
    return [f"{importer} (line {line}) imports {name} from {imported}"
            for importer, imported, name, line in found
            if name and name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
            and importer != imported]


# ---- the checks on the real code ----------------------------------------------------------------


@pytest.fixture(scope="module")
def found():
    modules = read_modules()
    assert len(modules) > 40, "the packages were not found"
    edges = imports(modules)
    assert len(edges) > 100, "too few imports found: the reader is broken"
    return edges


def test_no_import_circles(found):
    assert circles({(a, b) for a, b, _, _ in found}) == []


def test_no_private_name_is_imported_from_another_file(found):
    assert private_names(found) == []


def test_imports_point_one_way(found):
    assert upward(found) == []


def test_every_import_of_ours_names_a_module_that_exists():
    """An import left pointing where a module used to be (a merge across the move, a moved
    module's relative import) fails here, not only when that line first runs. In strings too:
    code run in a child process (`python -c "from malmm_cli... import ..."`) names modules."""
    import re

    modules = read_modules()
    missing = []
    for name, (path, tree) in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = [_absolute(name, path.name == "__init__.py", node)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                targets = re.findall(r"(?:from|import) ((?:malmm_cli|models)(?:\.\w+)*)", node.value)
            else:
                continue
            missing += [f"{name} (line {node.lineno}): {target}" for target in targets
                        if target.split(".")[0] in PACKAGES and target not in modules]
    assert missing == []


def test_every_package_says_its_one_job():
    for package in sorted(p for p in (ROOT / "malmm_cli").iterdir() if (p / "__init__.py").exists()):
        if package.name in ("labels", "data"):  # package data, not code
            continue
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
        assert doc and len(doc.split()) >= 6, f"{package.name}/__init__.py needs a docstring saying its job"


# ---- the checks catch what they are for ---------------------------------------------------------


def _fake(tmp_path: Path, files: dict[str, str]) -> dict[str, tuple[Path, ast.Module]]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return read_modules(tmp_path)


def test_the_checks_find_a_circle_inside_a_function_a_private_name_and_an_upward_import(tmp_path):
    modules = _fake(tmp_path, {
        "malmm_cli/__init__.py": "",
        "malmm_cli/engine/__init__.py": "",
        "malmm_cli/engine/a.py": "def f():\n    from .b import helper\n",
        "malmm_cli/engine/b.py": "from malmm_cli.engine import a\nfrom ..runs.c import _hidden\n",
        "malmm_cli/runs/__init__.py": "",
        "malmm_cli/runs/c.py": "_hidden = 1\n",
        "models/__init__.py": "",
        "models/m.py": "from malmm_cli.errors import MalmmError\n",
        "malmm_cli/errors.py": "",
    })
    found = imports(modules)
    assert circles({(a, b) for a, b, _, _ in found}) == [["malmm_cli.engine.a", "malmm_cli.engine.b"]]
    assert private_names(found) == ["malmm_cli.engine.b (line 2) imports _hidden from malmm_cli.runs.c"]
    assert sorted(upward(found)) == [
        "malmm_cli.engine.b (line 2) imports malmm_cli.runs.c: malmm_cli.engine may not import malmm_cli.runs",
        "models.m (line 1) imports malmm_cli.errors: models may not import malmm_cli.bottom",
    ]
