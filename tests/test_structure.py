"""The package's shape: no import cycle (function-local imports included) and no private names
borrowed across modules. Both are what lets a newcomer read one module without the others."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lmforge"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (never imported at run time)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_package = MODULES[module].name == "__init__.py"
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(module: str) -> tuple[set[str], list[tuple[str, str]]]:
    """(lmforge modules that ``module`` imports anywhere, (source module, name) of private names taken)."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    targets: set[str] = set()
    private: list[tuple[str, str]] = []
    aliases: dict[str, str] = {}
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    targets.add(alias.name)
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            if not source.startswith("lmforge"):
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in MODULES:
                    targets.add(submodule)
                    aliases[alias.asname or alias.name] = submodule
                else:
                    targets.add(source)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and source != module:
                        private.append((source, alias.name))
    for node in _runtime_nodes(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            private.append((aliases[node.value.id], node.attr))
    targets.discard(module)
    return targets, private


GRAPH = {module: _imports(module)[0] for module in MODULES}


def _cycle_from(start: str) -> list[str] | None:
    path: list[str] = []
    on_path: set[str] = set()
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for target in sorted(GRAPH.get(node, ())):
            if target in on_path:
                return path[path.index(target) :] + [target]
            if target not in done:
                found = visit(target)
                if found:
                    return found
        on_path.discard(path.pop())
        done.add(node)
        return None

    return visit(start)


def test_the_walk_sees_function_local_imports_and_private_names(tmp_path: Path) -> None:
    """The checks below can fail: a planted cycle through a function-local import is found."""
    global GRAPH
    saved = GRAPH
    GRAPH = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    try:
        assert _cycle_from("a") == ["a", "b", "c", "a"]
    finally:
        GRAPH = saved
    # a real module's function-local imports count as edges
    assert "lmforge.data.staging" in GRAPH["lmforge.trainer.checkpoint"]


def test_no_import_cycle() -> None:
    cycles = {tuple(cycle) for module in sorted(GRAPH) if (cycle := _cycle_from(module))}
    assert not cycles, "import cycles (function-local imports count): " + "; ".join(
        " -> ".join(cycle) for cycle in sorted(cycles)
    )


def test_no_module_takes_another_modules_private_name() -> None:
    taken = sorted(
        f"{module} uses {source}.{name}"
        for module in MODULES
        for source, name in _imports(module)[1]
        if source != module
    )
    assert not taken, "private names used across modules (make them public or move them): " + "; ".join(taken)


def test_the_readme_layout_table_matches_the_tree() -> None:
    """Every path the README's Layout table names exists, and every part of the package is named."""
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = {path for cell in re.findall(r"^\| ([^|]+) \|", section, flags=re.M) for path in re.findall(r"`([^`]+)`", cell)}
    missing = sorted(path for path in named if not (PACKAGE.parent / path.rstrip("/")).exists())
    assert not missing, f"the README's Layout table names paths that do not exist: {missing}"
    parts = {
        f"lmforge/{entry.name}{'/' if entry.is_dir() else ''}"
        for entry in PACKAGE.iterdir()
        if entry.name not in {"__init__.py", "__pycache__", "py.typed"}
    }
    assert parts - named == set(), f"parts of lmforge/ the README's Layout table does not name: {sorted(parts - named)}"
