"""The package's import graph: no loops, and the CLI on top.

Every import counts, including those inside functions and under ``TYPE_CHECKING``: a lazy
import still ties the two modules together, and a loop through one is a loop waiting for
the import to move to the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "nbdnats"


def module_files() -> dict[str, Path]:
    """Each module of the package by its dotted name; a package's ``__init__`` is the
    package's own module, and the compiled core is known by its stub."""
    sources = list(PACKAGE.rglob("*.py"))
    stubs = [p for p in PACKAGE.rglob("*.pyi") if not p.with_suffix(".py").exists()]
    modules = {}
    for path in sorted(sources + stubs):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package's modules that a module's tree imports, relative imports made absolute.
    ``from a import b`` imports the module ``a.b`` when there is one, else a name of ``a``."""
    base = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - node.level + 1]
                source = ".".join([*parent, node.module] if node.module else parent)
            else:
                source = node.module or ""
            for alias in node.names:
                child = f"{source}.{alias.name}"
                found.add(child if child in modules else source)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = module_files()
    return {
        name: imports(
            ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", set(modules)
        )
        for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """A loop in each strongly connected component of more than one module (Tarjan's
    algorithm), naming the component's other modules when the loop misses some."""
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
                loop = a_cycle(graph, set(component))
                more = sorted(set(component) - set(loop))
                found.append(loop + ([f"(and through {', '.join(more)})"] if more else []))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def a_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest loop through the component's first module, as a path that ends where it
    starts."""
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
    raise AssertionError(f"no loop in {component}")


def test_the_package_has_no_import_loops() -> None:
    loops = [" -> ".join(c) for c in cycles(import_graph())]
    assert loops == [], "import loops:\n" + "\n".join(loops)


def test_only_the_cli_imports_the_cli() -> None:
    """The CLI imports the parts; a part that imported the CLI would drag argparse and every
    subcommand into a library user's process, and turn the layers upside down."""

    def in_cli(module: str) -> bool:
        return module == "nbdnats.cli" or module.startswith("nbdnats.cli.")

    offenders = [
        f"{name} imports {target}"
        for name, targets in sorted(import_graph().items())
        if not in_cli(name)
        for target in sorted(targets)
        if in_cli(target)
    ]
    assert offenders == []


def test_lazy_and_type_checking_imports_are_edges_too() -> None:
    """The checker itself: once the package has no loops, its own tests keep it honest."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import b\n"
        "from p.c import NAME\n"
        "if TYPE_CHECKING:\n"
        "    from p.d import Type\n"
        "def later():\n"
        "    import p.e\n"
    )
    modules = {"p", "p.a", "p.b", "p.c", "p.d", "p.e"}
    assert imports(ast.parse(source), "p.a", False, modules) == {"p.b", "p.c", "p.d", "p.e"}
    assert imports(ast.parse("from p import c\n"), "p.a", False, modules) == {"p.c"}


def test_a_loop_is_named_by_its_modules() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": {"a", "c"}, "c": {"b"}}) == [["a", "b", "a", "(and through c)"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
