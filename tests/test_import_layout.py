"""The folders are the architecture: imports point one way (tools → server → engine → workers/lora),
and no module imports one that imports it back, however long the way round."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cluster", "workers", "lora")
# a module under the first prefix must not import one under any of the second
FORBIDDEN = {
    "workers": ("cluster.server", "cluster.bench", "cluster.tiny", "cluster.engine"),
    "lora": ("cluster.server", "cluster.bench", "cluster.tiny", "cluster.engine"),
    "cluster.engine": ("cluster.server", "cluster.bench", "cluster.tiny", "cluster.cli"),
    "cluster.server": ("cluster.bench", "cluster.tiny", "cluster.cli"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports() -> dict[str, set[str]]:
    """Each project module and the project modules it imports (anywhere in its body)."""
    sources = {module_name(path): path for package in PACKAGES for path in (REPO / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in sources.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        graph[name] = {target for target in targets if target in sources and target != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in graph:
        if module not in index:
            visit(module)
    return groups


def test_no_module_imports_one_that_imports_it_back():
    assert import_cycles(project_imports()) == []


def test_imports_point_one_way():
    wrong = [
        f"{module} imports {target}"
        for module, targets in project_imports().items()
        for prefix, banned in FORBIDDEN.items()
        if module == prefix or module.startswith(prefix + ".")
        for target in targets
        if any(target == b or target.startswith(b + ".") for b in banned)
    ]
    assert wrong == []


def test_the_checks_see_a_cycle_and_a_wrong_direction():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "cluster.engine.driver" in project_imports()
