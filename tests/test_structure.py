"""The package structure the code relies on, checked on the source (cheap: ``ast`` and ``--help`` only).

* No import cycle among module-level imports of ``train``, ``data`` and ``sparse_attn`` (imports under
  ``if TYPE_CHECKING:`` are left out everywhere: they never run). Function-level (lazy) imports are allowed to point back, because they do not
  make import order matter; the cycles they still close are listed in ``LAZY_CYCLES_ALLOWED`` with their reason.
* ``sparse_attn`` imports neither ``train`` nor ``data`` (anywhere, lazy imports included).
* Library code never imports an entry-point script (anywhere, lazy imports included).
* Every console script of pyproject.toml resolves to an entry point's ``main`` and answers ``--help``.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("train", "data", "sparse_attn")
SCRIPTS = {"train.finetune", "train.export", "train.sample", "train.precompute"}
# Cycles closed only by function-level imports: (module, module) -> why it is still there. None today.
LAZY_CYCLES_ALLOWED: dict[frozenset[str], str] = {}


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            found[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return found


MODULES = _modules()


def _module_level(tree: ast.Module) -> list[ast.stmt]:
    """Import statements that run when the module is imported (inside module-level if/try/with too)."""
    out: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            out += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
    return out


def _targets(name: str, node: ast.stmt) -> set[str]:
    """Our modules an import statement of module ``name`` loads (the most specific one that exists)."""
    if isinstance(node, ast.Import):
        wanted = [a.name for a in node.names]
    else:
        assert isinstance(node, ast.ImportFrom)
        base = node.module or ""
        if node.level:
            parts = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        wanted = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = set()
    for target in wanted:
        while target and target not in MODULES:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def _all_imports(tree: ast.AST) -> list[ast.stmt]:
    """Every import statement that can run, at any depth (``if TYPE_CHECKING:`` blocks never do)."""
    out: list[ast.stmt] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        out += _all_imports(node)
    return out


def _graph(lazy: bool) -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        nodes = _all_imports(tree) if lazy else _module_level(tree)
        graph[name] = set().union(*(_targets(name, n) for n in nodes)) if nodes else set()
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

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
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_packages() -> None:
    graph = _graph(lazy=False)
    assert {"train.trainer", "train.checkpointing", "data.dataset", "sparse_attn.ops"} <= set(graph)
    assert "train.checkpointing" in graph["train.resume"]  # edges are found (a broken walker finds none)


def test_no_import_cycle_among_module_level_imports() -> None:
    assert _cycles(_graph(lazy=False)) == []


def test_lazy_imports_close_only_the_listed_cycles() -> None:
    unexpected = [sorted(c) for c in _cycles(_graph(lazy=True)) if frozenset(c) not in LAZY_CYCLES_ALLOWED]
    assert unexpected == []


def test_sparse_attn_imports_neither_train_nor_data() -> None:
    graph = _graph(lazy=True)
    bad = {m: sorted(t for t in ts if t.split(".")[0] in ("train", "data")) for m, ts in graph.items() if m.startswith("sparse_attn")}
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_library_code_never_imports_an_entry_point() -> None:
    assert SCRIPTS <= set(MODULES)
    graph = _graph(lazy=True)
    bad = {m: sorted(ts & SCRIPTS) for m, ts in graph.items() if ts & SCRIPTS}
    assert bad == {}


def _console_scripts() -> dict[str, str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_entry_point_is_a_console_script() -> None:
    targets = set(_console_scripts().values())
    assert targets == {f"{m}:main" for m in SCRIPTS}


@pytest.mark.parametrize("name", sorted(_console_scripts()))
def test_console_script_resolves_and_answers_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module, func = _console_scripts()[name].split(":")
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")
