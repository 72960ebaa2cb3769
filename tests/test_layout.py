"""The layout a newcomer can read (issue 13), kept by walking the package's own source: no import
circles, no module reaching into another's private names, modules and functions of a readable
size, and ARCHITECTURE.md naming every module."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "pipeline"
MAX_MODULE_LINES = 420  # "about 400"
MAX_FUNCTION_LINES = 65  # "about 60"


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import at any depth, those under
    `if TYPE_CHECKING:` left out (they never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[tuple[str, list[str], int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                continue
            if isinstance(child, ast.ImportFrom):
                base = package[: len(package) - child.level + 1] if child.level else []
                target = ".".join(base + ([child.module] if child.module else []))
                found.append((target, [a.name for a in child.names], child.lineno))
            elif isinstance(child, ast.Import):
                found.extend((a.name, [], child.lineno) for a in child.names)
            visit(child)

    visit(tree)
    return [(t, n, line) for t, n, line in found if t == "pipeline" or t.startswith("pipeline.")]


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, names, _ in imports(name, path):
            # `from pipeline.io import journal`: the submodule is the edge, when it is one
            for n in names or [""]:
                sub = f"{target}.{n}" if n else target
                edges[name].add(sub if sub in mods else target)
    return edges


def test_no_import_circles() -> None:
    edges = graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt == node or nxt not in edges:
                continue
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            walk(node)


# Each layer may import the layers before it, never one after: the folders read bottom-up.
LAYERS = [
    {"pipeline.errors", "pipeline.records", "pipeline.redact", "pipeline.lifeline", "pipeline.crashpoints",
     "pipeline.durations", "pipeline.waits"},
    {"pipeline.config"},
    {"pipeline.io"},
    {"pipeline.net"},
    {"pipeline.rows"},
    {"pipeline.tools"},
    {"pipeline.engine"},
    {"pipeline.cli", "pipeline.api", "pipeline.__main__", "pipeline"},
]


def _layer(module: str) -> int:
    for depth in (2, 1):
        head = ".".join(module.split(".")[:depth])
        for i, names in enumerate(LAYERS):
            if head in names:
                return i
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py")


def test_packages_import_only_the_layers_below_them() -> None:
    edges = graph()
    upward = [f"{a} imports {b}" for a, targets in edges.items() for b in targets
              if b in edges and _layer(b) > _layer(a)]
    assert not upward, "\n".join(upward)


def test_no_module_imports_another_modules_private_names() -> None:
    bad = []
    for name, path in modules().items():
        for target, names, line in imports(name, path):
            bad += [f"{path.relative_to(ROOT)}:{line} takes {n} from {target}"
                    for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_modules_and_functions_stay_readable() -> None:
    long_modules, long_functions = [], []
    for path in modules().values():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {size} lines")
    assert not long_modules and not long_functions, "\n".join(long_modules + long_functions)


def test_architecture_names_every_module() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [str(path.relative_to(PACKAGE)) for name, path in modules().items()
               if path.name != "__init__.py" and path.name != "__main__.py" and path.stem not in text]
    assert not missing, f"ARCHITECTURE.md does not name: {', '.join(missing)}"


def test_one_atomic_write() -> None:
    """A file is replaced whole in one place, io/durable.py (temporary name, fsync, rename, fsync
    of the folder); everything else writes through it or through a store (issue 25)."""
    renames = ("os.replace(", "os.rename(", ".rename(", "shutil.move(")
    found = sorted(name for name, path in modules().items()
                   if any(r in path.read_text(encoding="utf-8") for r in renames))
    assert found == ["pipeline.io.durable"], found


def test_the_built_in_endpoint_and_status_start_without_arrow() -> None:
    """`pipeline serve` starts once per test endpoint and per [serve] run: it must not pay for
    pyarrow (~0.3 s); nor must reading a job file."""
    import subprocess
    import sys

    code = ("import sys, pipeline.cli, pipeline.tools.serve, pipeline.config, pipeline.engine.process; "
            "print(sorted(m for m in ('pyarrow', 'pandas', 'jsonschema', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]", out
