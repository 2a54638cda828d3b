"""Output files: checked before the work that fills them."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError


def output_path(path: str | None) -> Path | None:
    """Check, before any work, that a file can be written at `path` (its folder exists
    and is writable), so results are not lost at the end of a long computation."""
    if path is None:
        return None
    out = Path(path).expanduser()
    folder = out.parent
    if out.is_dir():
        raise ConfigError(f"{path} is a directory; give a file name")
    if not folder.is_dir():
        raise ConfigError(f"cannot write {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"cannot write {path}: the folder {folder} is not writable")
    return out
