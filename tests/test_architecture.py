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


# ------------------------------------------------------------------------- no command-line spellings in the library

FLAG = r"(?<![\w-])--[a-z][a-z-]+"
"""A long option as a user types it (``--top-k``), not ``---`` rules or ``a--b``."""

PRINTED_COMMANDS: dict[str, set[tuple[str, str]]] = {
    "`cachekd verify PATH --repair`": {("cachekd/cache/reader.py", "REPAIR_COMMAND")},
    "the same `cachekd precompute` command plus --force": {("cachekd/cache/reader.py", "PRECOMPUTE_AGAIN")},
    "the same `cachekd precompute` command again (after `--part i/n` jobs ...)": {
        ("cachekd/cache/reader.py", "FINISH_HINT")},
    "the same `cachekd prepare` command plus --force": {("cachekd/tokens/reader.py", "PREPARE_AGAIN")},
    "`cachekd prepare ... --tokenizer PATH`": {("cachekd/tokens/reader.py", "PREPARE_WITH_TOKENIZER")},
    "the precompute command line `verify --repair` prints": {("cachekd/verify.py", "precompute_command"),
                                                            ("cachekd/ensemble.py", "teacher_args")},
    "`cachekd train|distill -c CONFIG --resume` for an unfinished run": {
        ("cachekd/rundir.py", "RunDir.unfinished_message")},
    "`cachekd eval --max-windows N` in compare's notes on its columns": {("cachekd/compare.py", "COLUMN_NOTES")},
}
"""The only places the library spells a command-line option: commands printed for the user to run, each built in
one place (the holder: a module constant, or the function that builds the line). Every other sentence names config
keys (`ConfigFieldError`, `ConfigKeysError`) and the CLI names the option (`cachekd_cli.config_options`)."""


def _flag_spellings(path: Path) -> list[tuple[str, int, str]]:
    """(holder, line, spelling) of each long option inside a string literal of `path` that is not a docstring;
    the holder is the enclosing class.function, or the module-level name assigned."""
    import re

    tree = ast.parse(path.read_text())
    bodies = [n.body for n in ast.walk(tree) if isinstance(getattr(n, "body", None), list)]
    docstrings = {id(s.value) for body in bodies for s in body  # also the strings under attributes
                  if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)}
    found: list[tuple[str, int, str]] = []

    def visit(node: ast.AST, holder: list[str]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            holder = holder + [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and not holder:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            holder = [t.id for t in targets if isinstance(t, ast.Name)][:1]
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.extend((".".join(holder), node.lineno, m) for m in re.findall(FLAG, node.value))
        for child in ast.iter_child_nodes(node):
            visit(child, holder)

    visit(tree, [])
    return found


def test_the_library_spells_command_line_options_only_in_printed_commands():
    assert len(PRINTED_COMMANDS) <= 8
    allowed = set().union(*PRINTED_COMMANDS.values())
    found = {(str(p.relative_to(ROOT)), holder, line, flag)
             for p in sorted(ROOT.glob("cachekd/**/*.py")) for holder, line, flag in _flag_spellings(p)}
    stray = sorted(f"{p}:{line} ({holder}): {flag}" for p, holder, line, flag in found if (p, holder) not in allowed)
    assert stray == [], "name the config key (ConfigKeysError) and map it to the option in cli/:\n" + "\n".join(stray)
    assert {(p, holder) for p, holder, _, _ in found} == allowed  # every entry still prints its command


def test_the_spelling_check_finds_a_flag_in_a_message(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('"""Docs may say --top-k."""\nX = "--kept"\n\ndef f(k):\n    """--doc"""\n'
                   '    raise ValueError(f"--top-k must be at least 1 (got {k}); not a--b or ---.")\n')
    assert _flag_spellings(src) == [("X", 2, "--kept"), ("f", 6, "--top-k")]


def test_keyed_errors_name_keys_in_the_library_and_options_in_the_cli():
    import click

    from cachekd.errors import ConfigFieldError, ConfigKeysError
    from cachekd_cli.config_options import COMMAND_OPTIONS, error_message
    from cachekd_cli.main import cli

    e = ConfigKeysError("{top_k} {k} with {sample} leaves no tokens (τ={tau:g}, {names!r}).", k=70, tau=2.0,
                        names="a")
    assert str(e) == "top_k 70 with sample leaves no tokens (τ=2, 'a')." and e.keys == ["top_k", "sample"]
    assert error_message(e, "precompute") == "--top-k 70 with --sample leaves no tokens (τ=2, 'a')."
    assert error_message(ConfigFieldError("max_windows", "at least 1", 0), "eval") == \
        "--max-windows must be at least 1 (got 0)."
    assert error_message(ConfigFieldError("distill.alpha", "in [0, 1]", 2), "distill") == \
        "distill.alpha (--alpha) must be in [0, 1] (got 2)."
    assert str(ConfigKeysError("kept as written: {'a': 1}")) == "kept as written: {'a': 1}"
    # every option a map names is one its command takes
    for name, table in COMMAND_OPTIONS.items():
        command = cli.commands[name]
        opts = {o for p in command.get_params(click.Context(command)) for o in getattr(p, "opts", [])}
        assert set(table.values()) <= opts, (name, set(table.values()) - opts)


def test_a_keyed_note_reads_as_the_library_sentence_and_names_options_in_the_cli():
    from cachekd.errors import KeyedText
    from cachekd_cli.config_options import user_text

    note = KeyedText("a larger {precompute.top_k}, or {distill.tail_mode} renormalize (mass {m:.2f})", m=0.25)
    assert note == "a larger precompute.top_k, or distill.tail_mode renormalize (mass 0.25)"
    assert user_text(note, "distill") == "a larger --top-k, or --tail-mode renormalize (mass 0.25)"
    assert user_text(note, "cohort") == "a larger --top-k, or distill.tail_mode renormalize (mass 0.25)"
    assert user_text("plain", "distill") == "plain"
