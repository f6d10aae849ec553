"""The package's architecture, checked on its source (parsed with `ast`, nothing imported): no import cycle, imports
run one way through the layers below, and no module grows past MAX_LINES unless it is allowed to, with a reason.

Every import of the package counts, wherever it is written: at the top of a module, inside a function (a lazy
import is still a dependency), under `if TYPE_CHECKING:`, or as `importlib.import_module("laffi_exp....")`.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "laffi_exp"

# The layers, low to high. A module may import from its own layer's package (or module) and from lower layers only;
# two names on one layer must not import each other. Keys are the names directly under laffi_exp/: a package
# (core/ ...) or a module (pipeline.py, the command modules). laffi_exp/__init__.py imports nothing of the package.
LAYERS: dict[str, int] = {
    "core": 0,
    "distributed": 1,
    "scoring": 1,
    "data": 2,
    "models": 3,
    "feedback": 4,
    "stages": 5,
    "attention": 6,
    "runs": 7,
    "pipeline": 8,  # laffi_exp/pipeline.py
    "annotation_app": 9,
    "__main__": 10,  # the command modules: python -m laffi_exp[.annotate|.score|.report]
    "annotate": 10,
    "score": 10,
    "report": 10,
}

MAX_LINES = 400
# Modules allowed past MAX_LINES: path (as in the messages) -> one line saying why it is not split.
LONG_MODULES_ALLOWED: dict[str, str] = {}


@dataclass(frozen=True)
class Import:
    """One import of a package module: `target` is the module it loads (a submodule where the name is one)."""

    source: str  # the importing module, dotted
    target: str  # the imported module, dotted
    path: str  # the importing file, relative to the package's parent (laffi_exp/stages/train.py)
    line: int

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def package_root(name: str = PACKAGE) -> Path:
    """The installed package's source directory, found without importing (executing) the package."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name} is not installed in this environment"
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package at `root`, dotted name -> file (a package is its __init__.py)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _resolve(name: str, known: Mapping[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is a module (`pkg.mod.func` -> `pkg.mod`), or None."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


def imports_of(root: Path) -> tuple[list[Import], list[str]]:
    """All imports of the package's own modules, and the ones naming no module of it (stale imports: file:line)."""
    known = modules(root)
    pkg = root.name
    found: list[Import] = []
    unresolved: list[str] = []
    for module, path in known.items():
        rel = path.relative_to(root.parent).as_posix()
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []  # dotted names this node imports
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                    stem = ".".join([*base, node.module] if node.module else base)
                else:
                    stem = node.module or ""
                # `from pkg.sub import name`: the submodule pkg.sub.name where there is one, else pkg.sub itself.
                names = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
            elif (
                isinstance(node, ast.Call)
                and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                names = [node.args[0].value]
            for name in dict.fromkeys(names):
                if name != pkg and not name.startswith(pkg + "."):
                    continue
                target = name if name in known else None
                if target is None:
                    unresolved.append(f"{rel}:{node.lineno}: {name}")
                    target = _resolve(name, known)
                if target is not None and target != module:
                    found.append(Import(module, target, rel, node.lineno))
    return found, unresolved


def import_graph(imports: list[Import]) -> dict[str, dict[str, Import]]:
    """module -> {module it loads: the first import that does}. Importing pkg.a.b also runs pkg.a's __init__, so an
    import from outside pkg.a depends on that too (a re-export there can close a cycle); from inside it does not."""
    graph: dict[str, dict[str, Import]] = {}
    for imp in imports:
        edges = graph.setdefault(imp.source, {})
        parts = imp.target.split(".")
        for n in range(len(parts), 0, -1):
            target = ".".join(parts[:n])
            if imp.source == target or imp.source.startswith(target + "."):
                break  # an ancestor of the importer: already running when the importer runs
            edges.setdefault(target, imp)
    return graph


def find_cycles(graph: Mapping[str, Mapping[str, Import]]) -> list[list[Import]]:
    """One cycle for every strongly connected component of more than one module, as the imports that close it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for component in sorted(components):
        members, start = set(component), component[0]
        # Shortest way back to `start` inside the component (breadth first).
        previous: dict[str, str] = {}
        frontier, closing = [start], None
        while frontier and closing is None:
            following = []
            for v in frontier:
                for w in sorted(graph.get(v, {})):
                    if w == start:
                        closing = v
                        break
                    if w in members and w not in previous:
                        previous[w] = v
                        following.append(w)
                if closing is not None:
                    break
            frontier = following
        path = [closing]
        while path[-1] != start:
            path.append(previous[path[-1]])
        path.reverse()  # start ... closing
        cycles.append([graph[a][b] for a, b in zip(path, [*path[1:], start], strict=True)])
    return cycles


def describe_cycle(cycle: list[Import]) -> str:
    chain = " -> ".join([*(imp.source for imp in cycle), cycle[0].source])
    steps = "".join(f"\n    {imp.where()}: {imp.source} imports {imp.target}" for imp in cycle)
    return chain + steps


def layer_of(module: str) -> str | None:
    """The layer key of a module: its first name under the package (None for the package's own __init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layering_violations(root: Path, layers: Mapping[str, int], imports: list[Import] | None = None) -> list[str]:
    """Every import against the layering, and every module on no layer, as messages naming file:line."""
    pkg = root.name
    problems = []
    for module, path in modules(root).items():
        layer = layer_of(module)
        if layer is not None and layer not in layers:
            rel = path.relative_to(root.parent).as_posix()
            problems.append(f"{rel}: {module} is on no layer: add {layer!r} to LAYERS")
    for imp in imports_of(root)[0] if imports is None else imports:
        source, target = layer_of(imp.source), layer_of(imp.target)
        if source is None:
            problems.append(f"{imp.where()}: {pkg}/__init__.py imports {imp.target}: it must import nothing of {pkg}")
            continue
        if target is None or source == target or source not in layers or target not in layers:
            continue  # the package's own __init__ (which imports nothing), the same layer, or reported above
        if layers[target] >= layers[source]:
            kind = "upward" if layers[target] > layers[source] else "sideways"
            problems.append(
                f"{imp.where()}: {imp.source} imports {imp.target}: {kind}, from layer {source!r} ({layers[source]})"
                f" to layer {target!r} ({layers[target]})"
            )
    return problems


def long_modules(root: Path, limit: int, allowed: Mapping[str, str]) -> list[str]:
    """Modules over `limit` lines that `allowed` does not list, and entries of `allowed` that no longer apply."""
    problems = []
    sizes = {
        path.relative_to(root.parent).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
        for path in modules(root).values()
    }
    for rel, n in sorted(sizes.items()):
        if n > limit and rel not in allowed:
            problems.append(f"{rel}: {n} lines (> {limit}): split it, or add it to LONG_MODULES_ALLOWED with a reason")
    for rel in sorted(allowed):
        if rel not in sizes:
            problems.append(f"{rel}: in LONG_MODULES_ALLOWED but no such module: remove the entry")
        elif sizes[rel] <= limit:
            problems.append(f"{rel}: in LONG_MODULES_ALLOWED but {sizes[rel]} lines (<= {limit}): remove the entry")
    return problems


# --- the package --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root() -> Path:
    return package_root()


@pytest.fixture(scope="module")
def package_imports(root) -> tuple[list[Import], list[str]]:
    return imports_of(root)  # parsed once for the tests below


def test_no_import_cycle(package_imports):
    cycles = find_cycles(import_graph(package_imports[0]))
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(map(describe_cycle, cycles))


def test_imports_follow_the_layers(root, package_imports):
    problems = layering_violations(root, LAYERS, package_imports[0])
    assert not problems, f"{len(problems)} import(s) against the layering:\n" + "\n".join(problems)


def test_every_package_import_names_a_module(package_imports):
    unresolved = package_imports[1]
    assert not unresolved, "imports of no module of the package (stale after a move?):\n" + "\n".join(unresolved)


def test_no_module_is_too_long(root):
    problems = long_modules(root, MAX_LINES, LONG_MODULES_ALLOWED)
    assert not problems, "\n".join(problems)


def test_the_layer_table_names_what_the_package_has(root):
    present = {layer_of(m) for m in modules(root)} - {None}
    assert not set(LAYERS) - present, f"LAYERS names what the package lacks: {sorted(set(LAYERS) - present)}"


# --- the checker itself, on small fake packages -------------------------------------------------------------------


def make_package(base: Path, files: Mapping[str, str], name: str = "fakepkg") -> Path:
    root = base / name
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    return root


FAKE_LAYERS = {"low": 0, "left": 1, "right": 1, "high": 2, "cli": 3}


def test_the_checker_passes_a_clean_package(tmp_path):
    root = make_package(
        tmp_path,
        {
            "low/a.py": "import os\n",
            "low/b.py": "from . import a\nfrom .a import thing\n",
            "left/x.py": "from fakepkg.low import a\nimport fakepkg.low.b\n",
            "right/y.py": "from fakepkg.low.b import thing\n",
            "high/h.py": "from ..left import x\nfrom ..right.y import thing\nfrom fakepkg import __version__\n",
            "cli.py": "def main():\n    from fakepkg.high.h import run\n",
        },
    )
    imports, unresolved = imports_of(root)
    assert ("fakepkg.high.h", "fakepkg.left.x") in {(i.source, i.target) for i in imports}  # relative, resolved
    assert ("fakepkg.cli", "fakepkg.high.h") in {(i.source, i.target) for i in imports}  # lazy, still counted
    assert not unresolved
    assert not find_cycles(import_graph(imports))
    assert not layering_violations(root, FAKE_LAYERS)
    assert not long_modules(root, 400, {})


def test_the_checker_catches_a_cycle_through_a_lazy_import(tmp_path):
    root = make_package(
        tmp_path,
        {
            "low/a.py": "from fakepkg.low.b import f\n",
            "low/b.py": "def f():\n    import fakepkg.low.c\n",
            "low/c.py": "\n\nfrom .a import g\n",
            "high/h.py": "from fakepkg.low import a\n",  # depends on the cycle, is not in it
        },
    )
    cycles = find_cycles(import_graph(imports_of(root)[0]))
    assert len(cycles) == 1
    assert sorted(imp.source for imp in cycles[0]) == ["fakepkg.low.a", "fakepkg.low.b", "fakepkg.low.c"]
    message = describe_cycle(cycles[0])
    assert "fakepkg.low.a -> fakepkg.low.b -> fakepkg.low.c -> fakepkg.low.a" in message
    assert "fakepkg/low/b.py:2: fakepkg.low.b imports fakepkg.low.c" in message
    assert "fakepkg/low/c.py:3: fakepkg.low.c imports fakepkg.low.a" in message


def test_the_checker_catches_a_cycle_through_a_package_init(tmp_path):
    # high/__init__ re-exports high.h; high.h uses low.a; low.a imports high.k, which runs high/__init__ first.
    root = make_package(
        tmp_path,
        {
            "high/__init__.py": "from .h import run\n",
            "high/h.py": "from fakepkg.low.a import f\n",
            "high/k.py": "",
            "low/a.py": "from fakepkg.high.k import g\n",
        },
    )
    (cycle,) = find_cycles(import_graph(imports_of(root)[0]))
    assert {imp.source for imp in cycle} == {"fakepkg.high", "fakepkg.high.h", "fakepkg.low.a"}
    # A package importing its own submodules, which import each other through it, is no cycle.
    files = {"p/__init__.py": "from .m import x\n", "p/m.py": "from fakepkg.p import n\n", "p/n.py": ""}
    assert not find_cycles(import_graph(imports_of(make_package(tmp_path / "2", files))[0]))


def test_the_checker_catches_upward_and_sideways_imports(tmp_path):
    root = make_package(
        tmp_path,
        {
            "__init__.py": "from fakepkg.low import a\n",
            "low/a.py": "import os\n\n\ndef f():\n    from fakepkg.high.h import run\n",
            "left/x.py": "from ..right import y\n",
            "right/y.py": "",
            "high/h.py": "from fakepkg import cli\n",
            "cli.py": "",
            "extra/z.py": "",
        },
    )
    problems = layering_violations(root, FAKE_LAYERS)
    assert sorted(problems) == sorted(
        [
            "fakepkg/extra/z.py: fakepkg.extra.z is on no layer: add 'extra' to LAYERS",
            "fakepkg/extra/__init__.py: fakepkg.extra is on no layer: add 'extra' to LAYERS",
            "fakepkg/__init__.py:1: fakepkg/__init__.py imports fakepkg.low.a: it must import nothing of fakepkg",
            (
                "fakepkg/low/a.py:5: fakepkg.low.a imports fakepkg.high.h: upward, from layer 'low' (0)"
                " to layer 'high' (2)"
            ),
            (
                "fakepkg/left/x.py:1: fakepkg.left.x imports fakepkg.right.y: sideways, from layer 'left' (1)"
                " to layer 'right' (1)"
            ),
            (
                "fakepkg/high/h.py:1: fakepkg.high.h imports fakepkg.cli: upward, from layer 'high' (2)"
                " to layer 'cli' (3)"
            ),
        ]
    )


def test_the_checker_reports_stale_imports_and_long_modules(tmp_path):
    root = make_package(
        tmp_path,
        {
            "low/a.py": "from fakepkg.moved import thing\nimport importlib\nimportlib.import_module('fakepkg.gone')\n",
            "low/long.py": "x = 1\n" * 401,
            "low/ok.py": "x = 1\n" * 400,
        },
    )
    assert imports_of(root)[1] == ["fakepkg/low/a.py:1: fakepkg.moved", "fakepkg/low/a.py:3: fakepkg.gone"]
    assert long_modules(root, 400, {}) == [
        "fakepkg/low/long.py: 401 lines (> 400): split it, or add it to LONG_MODULES_ALLOWED with a reason"
    ]
    assert not long_modules(root, 400, {"fakepkg/low/long.py": "one table of constants"})
    assert long_modules(root, 400, {"fakepkg/low/long.py": "r", "fakepkg/low/ok.py": "r", "fakepkg/nope.py": "r"}) == [
        "fakepkg/low/ok.py: in LONG_MODULES_ALLOWED but 400 lines (<= 400): remove the entry",
        "fakepkg/nope.py: in LONG_MODULES_ALLOWED but no such module: remove the entry",
    ]
