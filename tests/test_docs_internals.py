"""docs/internals.md: every python block of the page runs, in order, in one namespace (from
the repository root, where the demo's example image is)."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "internals.md"


def test_every_recipe_runs(capsys, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) == 7
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)  # the page's own recipes
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 7 and out[0].startswith("layer 4, first visual token reads as")
    assert out[-2].startswith("layer 2, attention on the image per generated token: [")
    assert len(ast.literal_eval(out[-2].split(": ", 1)[1])) == 5  # 6 tokens: the steps after the first
    assert out[-1] == "layer 7, text rows updated: False"  # the recipe's own method froze them
    assert os.path.isfile(ROOT / "weights" / "llava-tiny-demo" / "example.png")
