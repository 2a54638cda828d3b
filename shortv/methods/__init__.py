"""Inference methods: how the model treats visual tokens, at three hook points
(`methods.base`, docs/design.md §9).

- `Vanilla()`: every token computed in every layer.
- `ShortV(layers)`: visual tokens frozen in the named layers (`methods/shortv.py`).
- `FastV(k, r)`: at layer k drop the fraction r of visual tokens least attended by the
  last token (`methods/fastv.py`).
- `VTW(k)`: drop all visual tokens from layer k on (`methods/vtw.py`).
- `PDrop(layers, lam)`: PyramidDrop's stages, each keeping λ of the visual tokens by the
  last token's attention (`methods/pdrop.py`).
- `VisionZip(budget)`: before the language model, dominant tokens by class-token attention
  plus contextual tokens merged by key similarity (`methods/visionzip.py`).
- `DART(k, budget)`: at layer k keep the tokens least duplicated with pivot tokens
  (`methods/dart.py`).
- `SparseVLM(layers, budget)`: text raters score the visual tokens at its pruning layers
  (`methods/sparsevlm.py`).
- `compose(...)`: a layer-wise method with token-wise ones (`methods/compose.py`).

`layer_plan(method, num_layers)` turns a method's per-layer answers into `LayerStep`s and
`walk_plan` runs them in the one order both the decoder and the FLOPs count follow
(`methods/plan.py`).

Every method at its full budget (FastV r=0, PDrop λ=1, budgets of every token, ShortV with
no layers) is the vanilla model. Options that cannot work on
any model are a ConfigError when the method is built; those that depend on the depth, when
it is attached (`Method.for_layers`, which also fills in depth-dependent defaults).

`METHODS` maps each command-line name to its class.
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import (
    VANILLA,
    Capture,
    Hook,
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
from .dart import DART
from .fastv import FastV, fastv_kept
from .pdrop import PDrop
from .plan import LayerStep, PlanPass, layer_plan, walk_plan
from .shortv import ShortV
from .sparsevlm import SparseVLM
from .visionzip import VisionZip
from .vtw import VTW

METHODS: dict[str, type[Method]] = {
    "vanilla": Vanilla, "shortv": ShortV, "fastv": FastV, "vtw": VTW,
    "pdrop": PDrop, "visionzip": VisionZip, "dart": DART, "sparsevlm": SparseVLM,
}


def method_class(name: str) -> type[Method]:
    """The method class registered under `name` (a key of `METHODS`)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; use one of {', '.join(METHODS)}") from None


__all__ = [
    "DART",
    "METHODS",
    "VANILLA",
    "VTW",
    "Capture",
    "Compose",
    "FastV",
    "Hook",
    "ImageView",
    "LayerStep",
    "LayerView",
    "Method",
    "PDrop",
    "PlanPass",
    "Queries",
    "ShortV",
    "SparseVLM",
    "Vanilla",
    "VisionZip",
    "check_layer_ids",
    "compose",
    "fastv_kept",
    "layer_ids",
    "layer_plan",
    "method_class",
    "parse_layer_list",
    "walk_plan",
]
