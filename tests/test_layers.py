"""The import layers of CONTRIBUTING.md: a module imports only from its own layer or below, and no modules import
each other round in a circle. Every import counts, those inside functions too (they run, only later)."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ecellm"


def layer_table() -> dict[str, int]:
    """CONTRIBUTING.md's layers: {"errors": 0, "models": 1, ...}; a name is a module or a whole sub-package."""
    text = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")
    rows = re.findall(r"^- layer (\d): ([^.]+)\.", text, flags=re.M)
    assert rows, "CONTRIBUTING.md lists no '- layer N: a, b, c.' lines"
    return {name.strip().strip("`"): int(n) for n, names in rows for name in names.split(",")}


def module_names() -> dict[str, Path]:
    """{"ecellm.models.llama": path, "ecellm.models": .../models/__init__.py, ...} for every module of the package."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `module` imports anywhere in its file (a name imported from a package is the
    submodule when there is one, else the package)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names)
    return {name for name in found if name in modules and name != module}


def layer_of(module: str, table: dict[str, int]) -> int | None:
    """The layer of `ecellm.a.b`: that of "a.b", else of "a" (a sub-package's modules share its layer)."""
    parts = module.split(".")[1:]
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in table:
            return table[".".join(parts[:end])]
    return None


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {module: imported(module, path, modules) for module, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other round (strongly connected, more than one module), each sorted."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def test_every_module_has_a_layer():
    table = layer_table()
    missing = [m for m in module_names() if m != "ecellm" and layer_of(m, table) is None]
    assert not missing, f"modules in no layer of CONTRIBUTING.md: {', '.join(missing)}"


def test_imports_go_down_the_layers():
    table = layer_table()
    upward = [f"{m} (layer {layer_of(m, table)}) imports {o} (layer {layer_of(o, table)})"
              for m, others in import_graph().items() for o in sorted(others)
              if m != "ecellm" and (layer_of(o, table) or 0) > (layer_of(m, table) or 0)]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "modules importing each other round: " + "; ".join(" <-> ".join(group) for group in found)


@pytest.mark.parametrize("source, expected", [
    ("from . import b\n", {"ecellm.b"}),
    ("from .sub import c\n", {"ecellm.sub.c"}),
    ("from .sub import name_in_init\n", {"ecellm.sub"}),
    ("def f():\n    from .b import thing\n", {"ecellm.b"}),  # an import inside a function counts
    ("import ecellm.sub.c\nimport torch\n", {"ecellm.sub.c"}),
])
def test_the_scan_finds_every_kind_of_import(source, expected, tmp_path):
    (tmp_path / "a.py").write_text(source)
    modules = {"ecellm.a": tmp_path / "a.py", "ecellm.b": None, "ecellm.sub": None, "ecellm.sub.c": None}
    assert imported("ecellm.a", tmp_path / "a.py", modules) == expected
    (tmp_path / "__init__.py").write_text("from ..b import x\n")  # ecellm/sub/__init__.py: two dots up
    assert imported("ecellm.sub", tmp_path / "__init__.py", modules) == {"ecellm.b"}


def test_circles_are_found_and_named():
    graph = {"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}, "u": set()}
    assert circles(graph) == [["x", "y", "z"]]
