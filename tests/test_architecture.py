"""The code's shape, as a newcomer relies on it: one owner of cancellation, and the size limits.

The layers and the absence of import cycles are import-linter's contracts (``make lint``,
``[tool.importlinter]`` in pyproject.toml); these tests check what a linter cannot.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llm_server"


def _calls(attribute: str) -> list[tuple[str, str, ast.Call]]:
    """(file, enclosing function, call) of every ``<x>.<attribute>(...)`` in the library."""
    found: list[tuple[str, str, ast.Call]] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr == attribute:
                    found.append((str(path.relative_to(PACKAGE)), func.name, node))
    return found


def test_a_turn_is_cancelled_in_one_place_with_a_reason() -> None:
    """``TurnStream.cancel(reason)`` (the serving layer's one owner of a turn's generation) is called
    by the stream itself when its reader leaves, and by the HTTP layer only through ``Turn.stop``:
    disconnects, the shutdown cut and abandoned opens all go through it."""
    with_reason = [(file, func) for file, func, call in _calls("cancel")
                   if call.args and isinstance(call.args[0], (ast.Attribute, ast.Name))
                   and ast.unparse(call.args[0]).startswith(("Cancel.", "reason"))]
    assert sorted(with_reason) == [("api/protocols/turns.py", "stop"), ("serving/turn_stream.py", "_iterate")]


def test_the_engines_generation_is_cancelled_only_by_the_turn_stream() -> None:
    """Outside the engine, only the TurnStream cancels an engine ``GenerationStream`` (``.cancel()``,
    no reason): no layer above reaches past it to the engine's streams."""
    generation_cancels = {
        (file, ast.unparse(call.func.value))  # type: ignore[attr-defined]  # _calls yields attribute calls
        for file, _, call in _calls("cancel")
        if not call.args and not file.startswith("engine/")
        and not ast.unparse(call.func).split(".")[-2].endswith(("task", "timer", "watcher", "work", "publisher"))
    }
    assert generation_cancels == {("serving/turn_stream.py", "stream")}


def test_no_library_file_over_400_lines_and_no_function_over_60() -> None:
    long_files, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = str(path.relative_to(PACKAGE))
        if len(text.splitlines()) > 400:
            long_files.append(name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None \
                    and node.end_lineno - node.lineno + 1 > 60:
                long_functions.append(f"{name}:{node.name}")
    assert long_files == [] and long_functions == []


def test_every_module_opens_with_a_docstring() -> None:
    missing = [str(path.relative_to(PACKAGE)) for path in sorted(PACKAGE.rglob("*.py"))
               if ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) is None]
    assert missing == []


def test_the_readme_layout_names_every_library_file() -> None:
    """The README's layout lists every module (docs/architecture.md explains them)."""
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout"):readme.index("## HTTP API in brief")]
    missing = [str(path.relative_to(PACKAGE)) for path in sorted(PACKAGE.rglob("*.py"))
               if path.name != "__init__.py" and path.name not in layout]
    assert missing == []
