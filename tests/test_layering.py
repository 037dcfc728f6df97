"""The package's layers: every module under ``dig_torchrec/`` imports only from its own layer
or the ones below it, and no modules import each other in a cycle.

Imports are read from the source (every ``import`` statement, including function-local and
``TYPE_CHECKING`` ones), so the test needs no torch and sees imports that only run on
some paths.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "dig_torchrec"

# Lowest first. A module belongs to the first layer whose prefix matches it (most specific
# prefixes are listed before their package, e.g. ``*.cli`` before the layer's package).
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("core", ("dig_torchrec", "dig_torchrec.errors", "dig_torchrec.config", "dig_torchrec.files")),
    ("data+modules", ("dig_torchrec.data", "dig_torchrec.modules")),
    ("model", ("dig_torchrec.model", "dig_torchrec.losses")),
    ("distributed", ("dig_torchrec.distributed",)),
    # what runs a model: training, checkpoints, inference loading, evaluation, retrieval, export
    ("pipelines", ("dig_torchrec.training", "dig_torchrec.retrieval", "dig_torchrec.export",
                   "dig_torchrec.inference", "dig_torchrec.eval_loop")),
    ("apps", ("dig_torchrec.demo",)),
    ("cli", ("dig_torchrec.cli", "dig_torchrec.bench", "dig_torchrec.data.cli", "dig_torchrec.training.cli",
             "dig_torchrec.retrieval.cli", "dig_torchrec.export.cli")),
]

# Known exceptions: (importer, imported) pairs / cycles that are allowed for a stated reason.
# Each entry must still occur: when it is fixed, test_known_exceptions_still_occur fails until
# the entry is deleted here. Empty: the package has none.
KNOWN_LAYER_VIOLATIONS: Dict[Tuple[str, str], str] = {}
KNOWN_CYCLES: Dict[frozenset, str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> Dict[str, Set[str]]:
    """module -> the ``dig_torchrec`` modules it imports anywhere in its source."""
    modules = _modules()
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        targets: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:  # ``from pkg import submodule`` imports the submodule
                    sub = f"{node.module}.{a.name}"
                    targets.add(sub if sub in modules else node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (module.startswith(prefix + ".") and prefix != "dig_torchrec")
            if matches and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module}: in no layer; add it to LAYERS in {Path(__file__).name}"
    return best


def layer_violations(graph: Dict[str, Set[str]]) -> Set[Tuple[str, str]]:
    return {(src, dst) for src, dsts in graph.items() for dst in dsts if layer_of(dst) > layer_of(src)}


def import_cycles(graph: Dict[str, Set[str]]) -> List[frozenset]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[frozenset] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for module in _modules():
        layer_of(module)


def test_modules_import_only_their_layer_or_below():
    found = layer_violations(import_graph())
    new = sorted(found - set(KNOWN_LAYER_VIOLATIONS))
    assert not new, "imports from a higher layer:\n" + "\n".join(
        f"  {s} ({LAYERS[layer_of(s)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})" for s, d in new)


def test_no_import_cycles():
    new = [c for c in import_cycles(import_graph()) if c not in KNOWN_CYCLES]
    assert not new, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in new)


def test_known_exceptions_still_occur():
    """Fails once a known exception is fixed, so its entry is removed after the merge."""
    graph = import_graph()
    fixed = [f"{s} -> {d}" for s, d in KNOWN_LAYER_VIOLATIONS if (s, d) not in layer_violations(graph)]
    fixed += [" <-> ".join(sorted(c)) for c in KNOWN_CYCLES if c not in import_cycles(graph)]
    assert not fixed, f"fixed, delete from the known exceptions in {Path(__file__).name}: {fixed}"


def test_the_checker_sees_violations_and_cycles():
    graph = {"dig_torchrec.config": {"dig_torchrec.model"}, "dig_torchrec.model": {"dig_torchrec.config"}}
    assert layer_violations(graph) == {("dig_torchrec.config", "dig_torchrec.model")}
    assert import_cycles(graph) == [frozenset(graph)]
