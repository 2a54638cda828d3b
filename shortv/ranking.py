"""Which layers to freeze: `n_frozen` of a ranking, or layer ids named exactly.

A ranking is the layer ids sorted by ascending visual Layer Contribution (DESIGN §7): a
zoo card's (the paper's), an LC report written by `shortv lc`, or a list.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError
from .methods import VTW, FastV, Method, ShortV, Vanilla, _layer_ids, check_layer_ids

RankingLike = str | os.PathLike | Sequence[int]


def load_ranking(ranking: RankingLike) -> tuple[int, ...]:
    """A ranking from an LC report file (its "ranking"), a "31,29,30" string, or a list."""
    if isinstance(ranking, (str, os.PathLike)) and not _is_comma_list(ranking):
        path = Path(ranking)
        try:
            report = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"ranking file not found: {path}") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read ranking file {path}: {e}") from None
        if not isinstance(report, dict) or "ranking" not in report:
            raise ConfigError(f"{path} has no 'ranking'; expected an LC report from `shortv lc`")
        ranking = report["ranking"]
    if isinstance(ranking, str):
        ranking = [int(p) for p in ranking.split(",") if p.strip()]
    try:
        ids = tuple(ranking)
    except TypeError:
        raise ConfigError(f"a ranking must be a list of layer ids, got {ranking!r}") from None
    return tuple(_layer_ids(ids))


def _is_comma_list(value: str | os.PathLike) -> bool:
    text = os.fspath(value)
    return isinstance(text, str) and all(p.strip().lstrip("-").isdigit() for p in text.split(","))


def resolve_frozen_layers(
    num_layers: int,
    *,
    n_frozen: int | None = None,
    frozen_layers: Sequence[int] | None = None,
    ranking: RankingLike | None = None,
    default_ranking: Sequence[int] = (),
) -> tuple[int, ...] | None:
    """Sorted layer ids to freeze, or None when nothing was asked for."""
    if n_frozen is not None and frozen_layers is not None:
        raise ConfigError("give either n_frozen or frozen_layers, not both")
    if frozen_layers is not None:
        if ranking is not None:
            raise ConfigError("ranking= is used with n_frozen=, not with frozen_layers=")
        ids = tuple(_layer_ids(frozen_layers))
        check_layer_ids(ids, num_layers)
        return tuple(sorted(ids))
    if n_frozen is None:
        if ranking is not None:
            raise ConfigError("ranking= needs n_frozen= (how many of its layers to freeze)")
        return None
    if isinstance(n_frozen, bool) or not isinstance(n_frozen, int):
        raise ConfigError(f"n_frozen must be an integer, got {n_frozen!r}")
    if not 0 <= n_frozen <= num_layers:
        raise ConfigError(f"n_frozen={n_frozen} must be between 0 and the model's {num_layers} layers")
    order = load_ranking(ranking) if ranking is not None else tuple(default_ranking)
    if n_frozen and not order:
        raise ConfigError(
            "n_frozen needs a ranking and this model's card has none: give one (ranking= or "
            "--ranking: an LC report from `shortv lc`, or a list of layer ids) or name the "
            "layers (frozen_layers= or --frozen-layers)"
        )
    check_layer_ids(order, num_layers)
    if n_frozen > len(order):
        raise ConfigError(f"n_frozen={n_frozen} but the ranking lists only {len(order)} layers")
    return tuple(sorted(order[:n_frozen]))


METHOD_NAMES = ("vanilla", "shortv", "fastv", "vtw")


def build_method(
    name: str | None,
    num_layers: int,
    *,
    n_frozen: int | None = None,
    frozen_layers: Sequence[int] | None = None,
    ranking: RankingLike | None = None,
    default_ranking: Sequence[int] = (),
    default_n_frozen: int | None = None,
    k: int | None = None,
    r: float | None = None,
) -> Method:
    """A method from command-line style options.

    No name: ShortV when n_frozen / frozen_layers are given, else Vanilla. "shortv" without
    either freezes the card's default N of its ranking; "fastv" defaults to k=2, r=0.5 and
    "vtw" to k = half the layers (the paper's K=16 for 32 layers, K=20 for 40)."""
    if name is None:
        name = "shortv" if n_frozen is not None or frozen_layers is not None else "vanilla"
    if name not in METHOD_NAMES:
        raise ConfigError(f"unknown method {name!r}; use one of {', '.join(METHOD_NAMES)}")
    freezing = n_frozen is not None or frozen_layers is not None or ranking is not None
    if name != "shortv" and freezing:
        raise ConfigError(f"--n-frozen/--frozen-layers/--ranking are for --method shortv, not {name}")
    if name in ("vanilla", "shortv") and (k is not None or r is not None):
        raise ConfigError("--k/--r are for --method fastv or vtw")
    if name == "vtw" and r is not None:
        raise ConfigError("--r is for --method fastv")
    method: Method
    if name == "vanilla":
        method = Vanilla()
    elif name == "shortv":
        if n_frozen is None and frozen_layers is None:
            if default_n_frozen is None:
                raise ConfigError("--method shortv needs --n-frozen N or --frozen-layers I,J,...")
            n_frozen = default_n_frozen
        layers = resolve_frozen_layers(num_layers, n_frozen=n_frozen, frozen_layers=frozen_layers,
                                       ranking=ranking, default_ranking=default_ranking)
        method = ShortV(layers or ())
    elif name == "fastv":
        method = FastV(k=2 if k is None else k, r=0.5 if r is None else r)
    else:
        method = VTW(k=num_layers // 2 if k is None else k)
    method.validate(num_layers)
    return method
