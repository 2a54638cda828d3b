"""Inference methods: how the decoder treats visual tokens layer by layer.

- `Vanilla()`: every token computed in every layer.
- `ShortV(layers)`: visual tokens frozen in the named layers (`methods/shortv.py`).
- `FastV(k, r)`: at layer k drop the fraction r of visual tokens least attended by the
  last token (`methods/fastv.py`).
- `VTW(k)`: drop all visual tokens from layer k on (`methods/vtw.py`).

`METHODS` maps each command-line name to its class.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import (
    VANILLA,
    Capture,
    ImageView,
    LayerView,
    Method,
    Queries,
    Vanilla,
    check_layer_ids,
    layer_ids,
    parse_layer_list,
)
from .compose import Compose, compose
from .fastv import FastV, fastv_kept
from .shortv import ShortV
from .vtw import VTW

METHODS: dict[str, type[Method]] = {"vanilla": Vanilla, "shortv": ShortV, "fastv": FastV, "vtw": VTW}


def method_class(name: str) -> type[Method]:
    """The method class registered under `name` ("vanilla", "shortv", "fastv", "vtw")."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; use one of {', '.join(METHODS)}") from None


__all__ = [
    "METHODS",
    "VANILLA",
    "VTW",
    "Capture",
    "Compose",
    "FastV",
    "ImageView",
    "LayerView",
    "Method",
    "Queries",
    "ShortV",
    "Vanilla",
    "check_layer_ids",
    "compose",
    "fastv_kept",
    "layer_ids",
    "method_class",
    "parse_layer_list",
]
