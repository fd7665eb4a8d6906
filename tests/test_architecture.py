"""The shape of the code: no import cycles, short functions, short parameter lists.

Read from the source with ``ast`` (nothing is imported), so these hold for every module,
including those only a GPU or a subprocess would import.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rhn_cli"
MAX_FUNCTION_LINES = 80
MAX_PARAMETERS = 8  # self and cls not counted; click commands excepted (their options)


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of rhn_cli (a package's __init__.py
    is the package's own module)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(node: ast.Import | ast.ImportFrom, module: str, modules: dict[str, Path]) -> set[str]:
    """The rhn_cli modules one import statement in ``module`` imports."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    package = module if modules[module].name == "__init__.py" else module.rpartition(".")[0]
    if node.level:  # relative: each level above the first goes one package up
        parts = package.split(".")
        package = ".".join(parts[: len(parts) - node.level + 1])
        source = f"{package}.{node.module}" if node.module else package
    else:
        source = node.module or ""
    # 'from source import name': the submodule source.name if there is one, else source.
    found = {f"{source}.{alias.name}" for alias in node.names} & modules.keys()
    if len(found) < len(node.names) and source in modules:
        found.add(source)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the rhn_cli modules it imports anywhere in its body: at module level,
    inside functions and under ``if TYPE_CHECKING`` alike."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets |= _imports(node, module, modules)
        graph[module] = targets - {module}
    return graph


def import_groups(graph: dict[str, set[str]]) -> list[set[str]]:
    """The groups of modules that import each other, directly or not (the strongly
    connected components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:  # the root of a group: pop the whole group
            group = {stack.pop()}
            while module not in group:
                group.add(stack.pop())
            if len(group) > 1:
                groups.append(group)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return groups


def cycle_within(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest cycle (the first module repeated at the end) through the first module,
    by name, of ``group``."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for target in sorted(graph[module] & group):
                if target == start:
                    return [*paths[module], start]
                if target not in paths:
                    paths[target] = [*paths[module], target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


def _functions():
    """(where, function node) for every function and method of rhn_cli."""
    for path in _modules().values():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}"
                yield where, node


def _parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = function.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    if names and names[0] in ("self", "cls") and (args.posonlyargs or args.args):
        names.pop(0)
    return len(names)


def _is_click_command(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Decorated with ``@<something>.command`` or ``.group``: its parameters are options."""
    for decorator in function.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Attribute) and target.attr in ("command", "group"):
            return True
    return False


def test_the_import_graph_sees_every_kind_of_import():
    graph = import_graph()
    # Module level, inside a function, 'from package import module', and a package's
    # __init__ as a node of its own.
    assert "rhn_cli.data.spec" in graph["rhn_cli.data.registry"]
    assert "rhn_cli.data.loading" in graph["rhn_cli.data.registry"]  # inside load_corpus
    assert "rhn_cli.data.cache" in graph["rhn_cli.data.store"]  # from rhn_cli.data import cache
    assert "rhn_cli" in graph["rhn_cli.data.loading"]  # from rhn_cli import __version__
    assert "rhn_cli.tracking" in graph["rhn_cli.experiment.resolve"]  # quiet_sacred_import
    graph = {"a": {"b"}, "b": {"c", "a"}, "c": {"a", "d"}, "d": set()}
    assert import_groups(graph) == [{"a", "b", "c"}]
    assert cycle_within(graph, {"a", "b", "c"}) == ["a", "b", "a"]


def test_no_import_cycles():
    graph = import_graph()
    found = [
        f"{' -> '.join(cycle_within(graph, group))} (all of {', '.join(sorted(group))})"
        for group in import_groups(graph)
    ]
    assert not found, "import cycles (move what both sides need into a lower module):\n" + (
        "\n".join(found)
    )


def test_no_long_functions():
    long = [
        f"{where}: {node.end_lineno - node.lineno + 1} lines"
        for where, node in _functions()
        if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_no_long_parameter_lists():
    long = [
        f"{where}: {_parameters(node)} parameters"
        for where, node in _functions()
        if _parameters(node) > MAX_PARAMETERS and not _is_click_command(node)
    ]
    assert not long, (
        f"functions with more than {MAX_PARAMETERS} parameters (pass a small named "
        "structure):\n" + "\n".join(long)
    )


# The layers, top to bottom: a package imports only packages of a lower rank (so nothing
# imports the CLI, the engine never reaches up into Sacred glue, kernels stand alone).
LAYER_RANKS = {
    "__main__": 9,
    "cli": 8,
    "commands": 7,
    "cluster": 6,
    "experiment": 5,
    "board": 5,
    "engine": 4,
    "models": 3,
    "data": 3,
    "tracking": 3,
    "kernels": 2,
    "atomic": 1,
    "": 0,  # rhn_cli itself (its __version__)
}


def test_packages_import_only_the_layers_below_them():
    def layer(module: str) -> str:
        return module.split(".")[1] if "." in module else ""

    upward = sorted(
        f"{source} imports {target}"
        for source, targets in import_graph().items()
        for target in targets
        if layer(source) != layer(target)
        and LAYER_RANKS[layer(source)] <= LAYER_RANKS[layer(target)]
    )
    assert not upward, "imports that go up or sideways between layers:\n" + "\n".join(upward)
