"""The package's import graph: no module imports one that (directly or through others) imports it back, at module
level or inside a function, so every module imports on its own in any order."""

import ast
from pathlib import Path

import tailor

SOURCE = Path(tailor.__file__).parent


def import_graph() -> dict[str, set[str]]:
    modules = {".".join(("tailor", *path.relative_to(SOURCE).with_suffix("").parts)).removesuffix(".__init__"): path
               for path in SOURCE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        # a package and its own modules (tailor.methods → tailor.methods.registry) are not a cycle
        graph[name] = {other for other in imported & modules.keys()
                       if other != name and not other.startswith(name + ".") and not name.startswith(other + ".")}
    return graph


def cycle_from(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as the modules along it, or None (depth-first search, grey/black marks)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                return path[path.index(other):] + [other]
            if other not in state and (found := visit(other)):
                return found
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    assert cycle_from(import_graph()) is None, " → ".join(cycle_from(import_graph()))


def test_the_cycle_check_finds_one():
    assert cycle_from({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
