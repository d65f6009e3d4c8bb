"""The layout the architecture relies on, checked statically (ast, no imports run, no Ray).

- no import cycle among the modules of `vpn/` and `pipeline/`;
- `vpn/` imports no Ray, MLflow or DVC, not even inside a function (it is the model library);
- no module over MAX_MODULE_LINES lines and no function over MAX_FUNCTION_LINES lines there;
- every DVC stage's deps cover each `vpn/` or `pipeline/` file its command's module imports,
  transitively, so that editing one reruns the stage;
- `pipeline/sweep/` is its wings (SWEEP_WINGS, lowest first): a wing imports only the wings before it,
  the spec wing knows no Ray or MLflow and the record wing no Ray, no wing holds more than
  MAX_WING_MODULES modules, and at most MAX_LOOSE_MODULES modules stand beside them.

Each check is a function of a source root, unit-tested below on a tiny synthetic package in tmp_path
that holds exactly the fault the check names.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vpn", "pipeline")
# The bounds of issue 17 ("no function over about 80 lines, and no module over about 500").
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
# What the model library must not know of (style.md: vpn/ knows nothing of Ray, MLflow or DVC).
FORBIDDEN_IN_VPN = ("ray", "mlflow", "dvc")
# The sweep package's wings, lowest first (issue 26): each may import only those before it.
SWEEP = "pipeline.sweep"
SWEEP_WINGS = ("spec", "record", "trials", "cluster")
# What a wing must not know of: what a sweep is needs no Ray or MLflow, what MLflow keeps no Ray.
FORBIDDEN_IN_WING = {"spec": ("ray", "mlflow", "dvc"), "record": ("ray", "dvc")}
MAX_WING_MODULES = 12
MAX_LOOSE_MODULES = 2  # beside __init__ and __main__: the driver, which runs a sweep through every wing


# ------------------------------------------------------------------------------------------------
# Modules and their imports


def find_modules(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under root/<package> (a package is its __init__)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    # `if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`: imports that only annotations need, never run.
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_nodes(tree: ast.AST, *, type_checking: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement in `tree`, inside functions and classes too; those under
    `if TYPE_CHECKING:` only if `type_checking` (its `else:` branch runs, so it is always walked)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and not type_checking and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _known_module(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is one of `modules` (`vpn.files.atomic_path` -> vpn.files)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def _from_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module of `from X import ...`, a relative X resolved against `module`."""
    if not node.level:
        return node.module or ""
    # A relative import starts from the module's package (a package's __init__: the package itself).
    package = module.split(".") if is_package else module.split(".")[:-1]
    anchor = package[: len(package) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def imported_modules(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict[str, Path]):
    """The modules of `modules` that one import statement in `module` imports: `import a.b` -> a.b;
    `from a import b` -> a.b when that is a module, else a (b is a name defined in a)."""
    if isinstance(node, ast.Import):
        found = {_known_module(alias.name, modules) for alias in node.names}
    else:
        base = _from_base(node, module, is_package)
        found = {
            f"{base}.{a.name}" if f"{base}.{a.name}" in modules else _known_module(base, modules) for a in node.names
        }
    return found - {None}


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules of `packages` it imports (at any depth of its code, not under TYPE_CHECKING).

    The parent packages that an import runs first are not edges: a package's __init__ that imports
    its own submodules would otherwise make every `from pkg.sub import x` inside the package a cycle.
    """
    modules = find_modules(root, packages)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        edges = set()
        for node in import_nodes(tree, type_checking=False):
            edges |= imported_modules(node, module, is_package, modules)
        graph[module] = edges - {module}
    return graph


# ------------------------------------------------------------------------------------------------
# The checks


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle of `graph`, one per strongly connected component of two or more modules,
    as the modules of one cycle in import order (the first module repeated at the end)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm; the graphs here are small enough to recurse
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_through(graph, component) for component in components]


def _cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One cycle inside a strongly connected component: a shortest path from its first module back."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def forbidden_imports(root: Path, package: str, forbidden: Iterable[str]) -> list[str]:
    """`path:line: import X` for every import in `package` of a module of `forbidden` (or under it),
    wherever it stands: top level, inside a function, or under TYPE_CHECKING."""
    forbidden = tuple(forbidden)
    found = []
    for module, path in find_modules(root, [package]).items():
        for node in import_nodes(ast.parse(path.read_text(), str(path)), type_checking=True):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.level:
                continue  # relative: inside the package itself
            for name in names:
                if name.split(".")[0] in forbidden:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: import {name} (in {module})")
    return sorted(found)


def oversized(
    root: Path,
    packages: Iterable[str] = PACKAGES,
    max_module_lines: int = MAX_MODULE_LINES,
    max_function_lines: int = MAX_FUNCTION_LINES,
) -> list[str]:
    """Modules over `max_module_lines` lines and functions (methods and nested ones too, from `def`
    to their last line) over `max_function_lines`, as `path: N lines` / `path:line name: N lines`."""
    found = []
    for path in find_modules(root, packages).values():
        text = path.read_text()
        where = path.relative_to(root)
        lines = len(text.splitlines())
        if lines > max_module_lines:
            found.append(f"{where}: module of {lines} lines (max {max_module_lines})")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > max_function_lines:
                    found.append(f"{where}:{node.lineno} {node.name}: {length} lines (max {max_function_lines})")
    return found


def _parents(module: str) -> list[str]:
    """The packages that importing `module` runs first: a.b.c -> a, a.b."""
    parts = module.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def imported_files(root: Path, module: str, packages: Iterable[str] = PACKAGES) -> set[Path]:
    """Files (relative to root) of every module of `packages` that `python -m module` runs: the module
    (a package's __main__ too), what it imports, transitively, and each one's parent packages."""
    modules = find_modules(root, packages)
    graph = import_graph(root, packages)
    todo = [module, *([f"{module}.__main__"] if modules.get(module, Path()).name == "__init__.py" else [])]
    seen: set[str] = set()
    while todo:
        m = todo.pop()
        if m in seen or m not in modules:
            continue
        seen.add(m)
        todo.extend(graph[m])
        todo.extend(_parents(m))
    return {modules[m].relative_to(root) for m in seen}


def uncovered_deps(root: Path, dvc_yaml: Path, packages: Iterable[str] = PACKAGES) -> list[str]:
    """`stage: file` for each file that a stage's `python -m X` imports (imported_files) which none
    of the stage's deps covers (a dep covers itself and, as a folder, everything under it)."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    found = []
    for name, stage in stages.items():
        match = re.search(r"\bpython3?\s+-m\s+(\S+)", stage["cmd"])
        if match is None:
            continue
        deps = [Path(d.rstrip("/")) for d in stage.get("deps", [])]
        for file in sorted(imported_files(root, match.group(1), packages)):
            if not any(file == d or d in file.parents for d in deps):
                found.append(f"{name}: {file} (imported by `python -m {match.group(1)}`) is not in its deps")
    return found


def wing_of(module: str, package: str = SWEEP) -> str | None:
    """The wing of a module of `package` (pipeline.sweep.record.runs -> record); None for one outside
    every wing (the package's own __init__, __main__ and loose modules, or another package)."""
    if not module.startswith(package + "."):
        return None
    parts = module[len(package) + 1 :].split(".")
    return parts[0] if len(parts) > 1 else None


def wing_violations(graph: dict[str, set[str]], wings: tuple[str, ...], package: str = SWEEP) -> list[str]:
    """`a -> b` for each import from a wing to a later wing, or to a module of `package` outside every
    wing (the loose modules stand above the wings), or into a folder that is no known wing."""
    rank = {wing: i for i, wing in enumerate(wings)}
    found = []
    for module, targets in sorted(graph.items()):
        wing = wing_of(module, package)
        if wing is None:
            continue
        if wing not in rank:
            found.append(f"{module}: in {package}.{wing}, which is no wing ({', '.join(wings)})")
            continue
        for target in sorted(targets):
            if not target.startswith(package + ".") or target == f"{package}.{wing}":
                continue
            other = wing_of(target, package)
            if other is None or other not in rank or rank[other] > rank[wing]:
                where = f"the {other} wing" if other in rank else "outside the wings"
                found.append(f"{module} -> {target} (the {wing} wing imports {where})")
    return found


def wing_sizes(root: Path, package: str = SWEEP) -> tuple[dict[str, int], list[str]]:
    """(modules per wing, excluding its __init__; the package's loose modules beside __init__/__main__)."""
    folder = root.joinpath(*package.split("."))
    sizes = {
        d.name: len([f for f in d.glob("*.py") if f.name != "__init__.py"])
        for d in sorted(folder.iterdir())
        if (d / "__init__.py").is_file()
    }
    loose = sorted(f.stem for f in folder.glob("*.py") if f.name not in ("__init__.py", "__main__.py"))
    return sizes, loose


# ------------------------------------------------------------------------------------------------
# The repository


def test_no_import_cycle_in_vpn_or_pipeline():
    cycles = import_cycles(import_graph(REPO))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_vpn_imports_no_ray_mlflow_or_dvc():
    found = forbidden_imports(REPO, "vpn", FORBIDDEN_IN_VPN)
    assert not found, "vpn/ must know nothing of Ray, MLflow or DVC:\n" + "\n".join(found)


def test_the_sweep_wings_import_downwards_only():
    found = wing_violations(import_graph(REPO), SWEEP_WINGS)
    assert not found, "pipeline/sweep's wings must import only the wings before them:\n" + "\n".join(found)


def test_the_spec_and_record_wings_know_no_ray():
    found = [
        line
        for wing, forbidden in FORBIDDEN_IN_WING.items()
        for line in forbidden_imports(REPO, f"pipeline/sweep/{wing}", forbidden)
    ]
    assert not found, "\n".join(found)


def test_the_sweep_wings_stay_small_and_documented():
    sizes, loose = wing_sizes(REPO)
    assert sorted(sizes) == sorted(SWEEP_WINGS), f"pipeline/sweep's sub-packages {sorted(sizes)} are not its wings"
    assert all(n <= MAX_WING_MODULES for n in sizes.values()), sizes
    assert len(loose) <= MAX_LOOSE_MODULES, f"loose modules in pipeline/sweep: {loose}"
    for wing in SWEEP_WINGS:  # each wing says what it holds and what it may import
        doc = ast.get_docstring(ast.parse((REPO / "pipeline/sweep" / wing / "__init__.py").read_text()))
        assert doc and "May import" in doc, f"pipeline/sweep/{wing}/__init__.py: no docstring saying what it may import"


def test_no_module_or_function_over_the_bounds():
    found = oversized(REPO)
    assert not found, "over the bounds of issue 17:\n" + "\n".join(found)


def test_dvc_stage_deps_cover_what_their_commands_import():
    found = uncovered_deps(REPO, REPO / "dvc.yaml")
    assert not found, "a stage would not rerun when these change:\n" + "\n".join(found)


# ------------------------------------------------------------------------------------------------
# Each check catches what it names, on a tiny package


def write_package(root: Path, files: dict[str, str]) -> Path:
    """Write `files` (path relative to root -> source) under root; return root."""
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root


def test_cycle_check_catches_a_two_module_cycle_and_names_its_modules(tmp_path):
    root = write_package(
        tmp_path,
        {
            "vpn/__init__.py": "",
            "vpn/a.py": "from vpn.b import g\n",
            "vpn/b.py": "def g():\n    from vpn import a  # inside a function: still a cycle\n    return a\n",
            "vpn/c.py": "import vpn.a\n",
        },
    )
    assert import_cycles(import_graph(root, ["vpn"])) == [["vpn.a", "vpn.b", "vpn.a"]]


def test_cycle_check_follows_relative_imports(tmp_path):
    root = write_package(
        tmp_path,
        {"pipeline/__init__.py": "", "pipeline/x/__init__.py": "", "pipeline/x/a.py": "from . import b\n"}
        | {"pipeline/x/b.py": "from ..x.a import f\n"},
    )
    assert import_cycles(import_graph(root, ["pipeline"])) == [["pipeline.x.a", "pipeline.x.b", "pipeline.x.a"]]


def test_cycle_check_ignores_imports_under_type_checking(tmp_path):
    root = write_package(
        tmp_path,
        {
            "vpn/__init__.py": "",
            "vpn/model.py": "from vpn.sample import to_input\n",
            "vpn/sample.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vpn.model import Model\n",
            # a package that imports its own submodules is no cycle with them
            "vpn/sub/__init__.py": "from vpn.sub.x import f\n",
            "vpn/sub/x.py": "from vpn.sub.y import g\n",
            "vpn/sub/y.py": "def g():\n    pass\n",
        },
    )
    assert import_cycles(import_graph(root, ["vpn"])) == []


def test_forbidden_check_catches_mlflow_imported_inside_a_function(tmp_path):
    root = write_package(
        tmp_path,
        {
            "vpn/__init__.py": "import torch\n",
            "vpn/log.py": "def log(x):\n    import mlflow.tracking\n    mlflow.log_metric('x', x)\n",
            "vpn/ok.py": "from . import log\nimport rayon_like  # not ray\n",
        },
    )
    assert forbidden_imports(root, "vpn", FORBIDDEN_IN_VPN) == ["vpn/log.py:2: import mlflow.tracking (in vpn.log)"]


def test_size_check_lists_a_long_module_and_a_long_method(tmp_path):
    method = "    def long(self):\n" + "        x = 1\n" * 80  # 81 lines from `def`
    root = write_package(
        tmp_path,
        {
            "pipeline/__init__.py": "",
            "pipeline/big.py": "x = 1\n" * 501,
            "pipeline/cls.py": "class A:\n" + method + "    def short(self):\n        pass\n",
        },
    )
    assert sorted(oversized(root, ["pipeline"])) == [
        "pipeline/big.py: module of 501 lines (max 500)",
        "pipeline/cls.py:2 long: 81 lines (max 80)",
    ]


def test_deps_check_catches_an_import_the_stage_does_not_depend_on(tmp_path):
    root = write_package(
        tmp_path,
        {
            "pipeline/__init__.py": "",
            "pipeline/stage/__init__.py": "",
            "pipeline/stage/__main__.py": "from pipeline.stage.run import main\n",
            "pipeline/stage/run.py": "def main():\n    from pipeline.helpers import h\n    from vpn.model import m\n",
            "pipeline/helpers.py": "",
            "vpn/__init__.py": "",
            "vpn/model.py": "from vpn import layers\n",
            "vpn/layers.py": "",
            "vpn/unused.py": "",
        },
    )
    (root / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "covered": {
                        "cmd": "python -m pipeline.stage --flag",
                        "deps": ["pipeline/__init__.py", "pipeline/helpers.py", "pipeline/stage/", "vpn", "data/x"],
                    },
                    "uncovered": {
                        "cmd": "python -m pipeline.stage",
                        "deps": ["pipeline/__init__.py", "pipeline/stage", "vpn/model.py", "vpn/__init__.py"],
                    },
                    "no_python": {"cmd": "echo hi", "deps": []},
                }
            }
        )
    )
    assert uncovered_deps(root, root / "dvc.yaml", ["pipeline", "vpn"]) == [
        "uncovered: pipeline/helpers.py (imported by `python -m pipeline.stage`) is not in its deps",
        "uncovered: vpn/layers.py (imported by `python -m pipeline.stage`) is not in its deps",
    ]


def test_wing_check_catches_an_upward_import_and_one_into_the_loose_driver(tmp_path):
    root = write_package(
        tmp_path,
        {
            "pipeline/__init__.py": "",
            "pipeline/sweep/__init__.py": "",
            "pipeline/sweep/driver.py": "from pipeline.sweep.low import a\nfrom pipeline.sweep.high import b\n",
            "pipeline/sweep/low/__init__.py": "",
            "pipeline/sweep/low/a.py": "def f():\n    from pipeline.sweep.high.b import g  # upwards, in a function\n",
            "pipeline/sweep/low/c.py": "from pipeline.sweep import driver\n",  # the loose driver stands above
            "pipeline/sweep/high/__init__.py": "",
            "pipeline/sweep/high/b.py": "from pipeline.sweep.low import a\nfrom pipeline.sweep.high import d\n",
            "pipeline/sweep/high/d.py": "",
            "pipeline/sweep/odd/__init__.py": "",
            "pipeline/sweep/odd/e.py": "",
        },
    )
    graph = import_graph(root, ["pipeline"])
    assert wing_violations(graph, ("low", "high"), "pipeline.sweep") == [
        "pipeline.sweep.low.a -> pipeline.sweep.high.b (the low wing imports the high wing)",
        "pipeline.sweep.low.c -> pipeline.sweep.driver (the low wing imports outside the wings)",
        "pipeline.sweep.odd.e: in pipeline.sweep.odd, which is no wing (low, high)",
    ]
    assert wing_sizes(root, "pipeline.sweep") == ({"high": 2, "low": 2, "odd": 1}, ["driver"])
