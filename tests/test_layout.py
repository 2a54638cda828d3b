"""The test suite's own layout: a test file imports helpers (tests/reference.py,
tests/conftest.py's fixtures, tests/data.py, ...), never another test file, so that each
test file can be read, run and moved on its own."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> list[str]:
    """The last dotted part of every module `path` imports (`from . import x` gives x)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name.rsplit(".", 1)[-1] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                names.append(node.module.rsplit(".", 1)[-1])
            if not node.module or node.module == "tests":  # `from . import x`, `from tests import x`
                names += [alias.name for alias in node.names]
    return names


def test_no_test_file_imports_another_test_file():
    offenders = {path.name: [m for m in imported_modules(path) if m.startswith("test_")]
                 for path in sorted(TESTS.glob("*.py"))}
    assert {name: mods for name, mods in offenders.items() if mods} == {}
