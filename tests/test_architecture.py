"""The house's shape, checked: no import circle anywhere in the project (module-level, TYPE_CHECKING and
function-level imports alike), and the library knows nothing of click."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted(ROOT.glob("cachekd/**/*.py")) + sorted(ROOT.glob("cli/*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "cli":
            parts[0] = "cachekd_cli"
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every project module `path` imports, anywhere in the file (``from a.b import c`` counts as a.b, and as a.b.c
    when that is a module)."""
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            out.add(n.module)
            out.update(f"{n.module}.{a.name}" for a in n.names)
    return out & known


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_in_the_project():
    mods = _modules()
    graph = {m: _imports(p, set(mods)) - {m} for m, p in mods.items()}
    assert _cycles(graph) == []
    # the checker finds a circle when there is one
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_library_does_not_import_click():
    mods = _modules()
    users = [m for m, p in mods.items() if m.startswith("cachekd.") or m == "cachekd"
             if "click" in {a.split(".")[0] for a in _imports_any(p)}]
    assert users == []


def _imports_any(path: Path) -> set[str]:
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom) and n.module:
            out.add(n.module)
    return out


def test_the_cache_package_is_formats_only():
    """`cachekd/cache/` is the cache's format, encoding, reader, writer and summary: it imports no stage or component
    (verify, which loads teachers, is a stage: `cachekd/verify.py`)."""
    mods = _modules()
    allowed = ("cachekd.cache", "cachekd.errors", "cachekd.io", "cachekd.storage", "cachekd.tokens.format")
    # ("cachekd" itself: its __version__)
    for m, p in mods.items():
        if m.startswith("cachekd.cache"):
            outside = {d for d in _imports(p, set(mods)) if d != "cachekd" and not d.startswith(allowed)}
            assert not outside, (m, outside)
