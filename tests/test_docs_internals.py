"""docs/internals.md: every python block of the page runs, in order, in one namespace (from
the repository root, where the demo's example image is)."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "internals.md"


def test_every_recipe_runs(capsys, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) == 6
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)  # the page's own recipes
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6 and out[0].startswith("layer 4, first visual token reads as")
    assert out[-1] == "layer 7, text rows updated: False"  # the recipe's own method froze them
    assert os.path.isfile(ROOT / "weights" / "llava-tiny-demo" / "example.png")
