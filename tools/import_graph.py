"""Count what makes joules' import graph hard to follow: upward imports, cycles, function-local imports.

    $ python tools/import_graph.py            # a short table and every offending arrow
    $ python tools/import_graph.py --json     # the same, machine-readable

joules is built in layers that only point down (the order is LAYERS below, and the same order is
the import-linter contract in pyproject.toml that `make test` runs). import-linter says whether the
contract holds; this script says *how far* the code is from it and where, including what
import-linter does not see: imports inside functions (they hide cycles and upward arrows from a
reader and from the linter's error message alike) and cycles inside one package.

It parses every module under src/joules with `ast` (nothing is imported, so it runs in a second
without torch) and reports:

- the layer order, bottom first;
- every upward import: an import of a module in a higher layer, at module level or inside a
  function (``TYPE_CHECKING`` imports are listed but do not count: they never run);
- every cycle between modules (strongly connected components of the module graph, both module-level
  and function-local edges; a package's ``__init__`` re-exporting its own submodules is not counted
  as a cycle) and every cycle between layers;
- every function-local ``joules`` import, per file, with the count outside ``cli/`` (where lazy
  imports keep ``joules --help`` fast).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "joules"

# Bottom first. A module may import from its own layer and the layers below it. The ground floor
# holds the single-file modules directly under joules/ (errors, paths, system, serialize, ...).
LAYERS: tuple[str, ...] = (
    "ground",
    "data",
    "measure",
    "formats",
    "models",
    "compress",
    "evaluate",
    "deploy",
    "bench",
    "predict",
    "sweep",
    "report",
    "cli",
    "testing",  # fakes for tests and scripts: may import anything, imported by nothing
)
# data, measure and formats share one floor: none imports another (import-linter's `|` syntax).
SAME_FLOOR: tuple[frozenset[str], ...] = (frozenset({"data", "measure", "formats"}),)


def floor(layer: str) -> int:
    """The height of a layer; layers on one floor share a height."""
    for group in SAME_FLOOR:
        if layer in group:
            return min(LAYERS.index(name) for name in group)
    return LAYERS.index(layer)


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted
    target: str  # imported joules module, dotted (a submodule when `from pkg import submodule`)
    line: int
    kind: str  # "module" | "function" | "type_checking"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """The layer a joules module belongs to; None for the root package `joules` itself."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    if parts[1] in LAYERS:
        return parts[1]
    return "ground"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, kind: str):
    """Yield (import node, kind) pairs; kind becomes "function" inside a def or lambda."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, kind
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(child, "function")
        elif isinstance(child, ast.If) and kind == "module" and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), "type_checking")
            for stmt in child.orelse:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), kind)
        else:
            yield from _walk(child, kind)


def collect(src: Path = SRC) -> tuple[set[str], list[Edge]]:
    """Every joules module and every import of a joules module among them."""
    files = sorted((src / PACKAGE).rglob("*.py"))
    modules = {module_name(path) for path in files}
    edges: list[Edge] = []
    seen: set[Edge] = set()  # `from joules.x import a, b` is one arrow, not two
    for path in files:
        source = module_name(path)
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, kind in _walk(tree, "module"):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = source.split(".") if is_package else source.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    targets.append(candidate if candidate in modules else base)
            for target in targets:
                if target != PACKAGE and not target.startswith(PACKAGE + "."):
                    continue
                # `import joules.a.b.c` where c is a name: keep the longest existing module prefix.
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                edge = Edge(source, target, node.lineno, kind)
                if target != source and edge not in seen:
                    seen.add(edge)
                    edges.append(edge)
    return modules, edges


def _sccs(nodes: set[str], graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    result: list[list[str]] = []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    result.append(sorted(component))
    return sorted(result)


def analyse(src: Path = SRC) -> dict:
    modules, edges = collect(src)
    runtime_edges = [edge for edge in edges if edge.kind != "type_checking"]

    upward = []
    for edge in edges:
        source_layer, target_layer = layer_of(edge.source), layer_of(edge.target)
        if source_layer is None or target_layer is None:
            continue
        if floor(target_layer) > floor(source_layer) or (
            floor(target_layer) == floor(source_layer) and target_layer != source_layer
        ):
            upward.append(edge)

    # Module cycles. A package __init__ importing its own submodules is how re-exports work, not a
    # cycle anyone has to reason about, so those edges are left out.
    graph: dict[str, set[str]] = {}
    for edge in runtime_edges:
        if edge.target.startswith(edge.source + ".") and edge.source != PACKAGE:
            continue
        graph.setdefault(edge.source, set()).add(edge.target)
    module_cycles = _sccs(modules, graph)

    layer_graph: dict[str, set[str]] = {}
    for edge in runtime_edges:
        a, b = layer_of(edge.source), layer_of(edge.target)
        if a and b and a != b:
            layer_graph.setdefault(a, set()).add(b)
    layer_cycles = _sccs(set(LAYERS), layer_graph)

    local = [edge for edge in edges if edge.kind == "function"]
    local_outside_cli = [edge for edge in local if layer_of(edge.source) not in ("cli", None)]
    return {
        "layers": list(LAYERS),
        "same_floor": [sorted(group) for group in SAME_FLOOR],
        "modules": len(modules),
        "edges": len({(edge.source, edge.target) for edge in runtime_edges}),
        "upward": [asdict(edge) for edge in upward],
        "upward_count": sum(edge.kind != "type_checking" for edge in upward),
        "module_cycles": module_cycles,
        "layer_cycles": layer_cycles,
        "function_local": [asdict(edge) for edge in local],
        "function_local_count": len(local),
        "function_local_outside_cli": len(local_outside_cli),
        "function_local_by_file": dict(
            sorted(Counter(edge.source for edge in local).items(), key=lambda item: -item[1])
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when there is an upward import or a cycle",
    )
    args = parser.parse_args(argv)
    report = analyse()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        order = []
        for layer in LAYERS:
            group = next((g for g in SAME_FLOOR if layer in g), None)
            if group and order and isinstance(order[-1], list) and layer in group:
                order[-1].append(layer)
            elif group:
                order.append([layer])
            else:
                order.append(layer)
        print(
            "layers (bottom first): "
            + " → ".join(" | ".join(item) if isinstance(item, list) else item for item in order)
        )
        print(f"modules {report['modules']}, joules→joules arrows {report['edges']}")
        print(f"upward imports: {report['upward_count']}")
        for edge in report["upward"]:
            tag = "" if edge["kind"] == "module" else f"  ({edge['kind']})"
            print(f"  {edge['source']}:{edge['line']} → {edge['target']}{tag}")
        print(f"module cycles: {len(report['module_cycles'])}")
        for cycle in report["module_cycles"]:
            print("  " + " ↔ ".join(cycle))
        print(f"layer cycles: {len(report['layer_cycles'])}")
        for cycle in report["layer_cycles"]:
            print("  " + " ↔ ".join(cycle))
        print(
            f"function-local joules imports: {report['function_local_count']} "
            f"({report['function_local_outside_cli']} outside cli/)"
        )
        for source, count in report["function_local_by_file"].items():
            print(f"  {count:4d}  {source}")
    failed = report["upward_count"] or report["module_cycles"] or report["layer_cycles"]
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
