"""The package's import graph, read from the source (no imports): no circles, writers that never reach into
the score stage, private names kept private, no scorer named in generic code.

Every import counts: module level, inside functions (a lazy import is still a dependency), and
``importlib.import_module("wsi_her2....")`` with a literal name.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "wsi_her2"

#: Circles known and owned elsewhere, each with the change that removes it. Nothing may join this list.
KNOWN_CIRCLES: set[frozenset[str]] = set()
#: Private names imported across modules, known and owned elsewhere.
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()
#: What the writers (``wsi_her2/outputs``) may import from the package: the store, the result types and
#: vocabulary, and the foundation modules. Never the score stage (nor models, train, batch, tile, slide, cli).
OUTPUTS_MAY_IMPORT = ("wsi_her2.outputs", "wsi_her2.store", "wsi_her2.result", "wsi_her2.vocab", "wsi_her2.criteria",
                      "wsi_her2.errors", "wsi_her2.files", "wsi_her2.locks", "wsi_her2.csv_cells", "wsi_her2.digests",
                      "wsi_her2.jsonable", "wsi_her2.metrics", "wsi_her2.optional")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=1)
def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, tree: ast.Module) -> list[tuple[str, str]]:
    """``(module imported, name imported from it or "")`` for every import in ``tree``, at any depth."""
    modules = _modules()
    package = name if name in modules and _is_package(name) else name.rpartition(".")[0]
    found: list[tuple[str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.startswith("wsi_her2")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            if base.startswith("wsi_her2"):
                found += [(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base, a.name) for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("wsi_her2")):
            found.append((node.args[0].value, ""))
    return found


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m, _ in _imports(name, tree) if m in modules and m != name} for name, tree in modules.items()}


def _circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def test_the_circle_finder_finds_circles_lazy_or_not():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _circles(graph) == [frozenset({"a", "b", "c"})]
    tree = ast.parse("def f():\n    from wsi_her2.files import atomic_write_text\n    importlib.import_module('wsi_her2.locks')\n")
    assert {m for m, _ in _imports("wsi_her2.x", tree)} == {"wsi_her2.files", "wsi_her2.locks"}


def test_no_import_circles_lazy_or_not():
    new = [sorted(c) for c in _circles(_graph()) if c not in KNOWN_CIRCLES]
    assert new == [], f"import circles (counting imports inside functions): {new}"


def test_the_writers_never_import_the_score_stage():
    bad = sorted(
        f"{name} imports {module}"
        for name, tree in _modules().items() if name.startswith("wsi_her2.outputs")
        for module, _ in _imports(name, tree)
        if module != "wsi_her2" and not module.startswith(OUTPUTS_MAY_IMPORT)
    )
    assert bad == [], "outputs/ may import the store, result types, vocabulary and foundation modules only"


def test_the_result_types_need_neither_torch_nor_the_score_stage():
    tree = _modules()["wsi_her2.result"]
    assert {m for m, _ in _imports("wsi_her2.result", tree)} <= {"wsi_her2.vocab"}
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {(n.module or "").split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert "torch" not in top


def test_private_names_stay_in_their_module():
    found = {(name, module, imported) for name, tree in _modules().items() for module, imported in _imports(name, tree)
             if imported.startswith("_") and not imported.startswith("__")}
    assert found - KNOWN_PRIVATE_IMPORTS == set()


def test_generic_code_names_no_scorer():
    """Outside the models package nothing compares with a scorer's name or imports its class: it asks the capabilities."""
    bad = []
    for name, tree in _modules().items():
        if name.startswith("wsi_her2.models"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value == "ihc_dab"
                                                     for c in (node.left, *node.comparators)):
                bad.append(f"{name}:{node.lineno} compares with 'ihc_dab'")
            if isinstance(node, ast.ImportFrom) and any(a.name == "IhcDabScorer" for a in node.names):
                bad.append(f"{name}:{node.lineno} imports IhcDabScorer")
    assert bad == []
