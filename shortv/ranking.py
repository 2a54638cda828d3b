"""Which layers to freeze: `n_frozen` of a ranking, or layer ids named exactly.

A ranking is the layer ids sorted by ascending visual Layer Contribution
(docs/design.md §7): a zoo card's (the paper's), an LC report written by `shortv lc`, a
"31,29,30" string or a list.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .methods import VANILLA, Method, ShortV, check_layer_ids, compose, layer_ids, parse_layer_list
from .methods.spec import MethodSpec, build, parse_entry

RankingLike = str | os.PathLike | Sequence[int]


def load_ranking(
    ranking: RankingLike, *, num_layers: int | None = None, model_name: str | None = None
) -> tuple[int, ...]:
    """A ranking from an LC report file (its "ranking"), a "31,29,30" string, or a list.

    An LC report measured on a model with another layer count is refused (its ranking
    would freeze the wrong layers); one measured on a model of another name only warns,
    since a renamed directory or a zoo name and its repo id are the same model.
    """
    if isinstance(ranking, (str, os.PathLike)):
        text = os.fspath(ranking)
        if isinstance(text, str) and _looks_like_layer_list(text):
            return tuple(parse_layer_list(text))
        return _report_ranking(Path(text), num_layers, model_name)
    return tuple(layer_ids(ranking))


def _looks_like_layer_list(text: str) -> bool:
    return bool(text.strip()) and all(p.strip().lstrip("-").isdigit() for p in text.split(","))


def _report_ranking(path: Path, num_layers: int | None, model_name: str | None) -> tuple[int, ...]:
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"ranking file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read ranking file {path}: {e}") from None
    if not isinstance(report, dict) or "ranking" not in report:
        raise ConfigError(f"{path} has no 'ranking'; expected an LC report from `shortv lc`")
    ranking = tuple(layer_ids(report["ranking"]))
    measured = report.get("visual")
    layers = len(measured) if isinstance(measured, list) else len(ranking)
    made_on = report.get("model")
    if num_layers is not None and layers != num_layers:
        # A hand-written report may not say which model it came from.
        which = f" ({made_on!r})" if made_on else ""
        raise ConfigError(
            f"{path} was measured on a model with {layers} layers{which}, "
            f"but this model has {num_layers}; run `shortv lc` on this model"
        )
    if model_name and made_on and made_on != model_name:
        warnings.warn(f"{path} was measured on {made_on!r}, not {model_name!r}; using its ranking "
                      "anyway (same layer count)", stacklevel=3)
    return ranking


def resolve_frozen_layers(
    num_layers: int,
    *,
    n_frozen: int | None = None,
    frozen_layers: Sequence[int] | None = None,
    ranking: RankingLike | None = None,
    default_ranking: Sequence[int] = (),
    model_name: str | None = None,
) -> tuple[int, ...] | None:
    """Sorted layer ids to freeze, or None when nothing was asked for.

    `default_ranking` (a zoo card's) is used when `n_frozen` is given without `ranking`.
    """
    if n_frozen is not None and frozen_layers is not None:
        raise ConfigError("give either n_frozen or frozen_layers, not both")
    if frozen_layers is not None:
        if ranking is not None:
            raise ConfigError("ranking= is used with n_frozen=, not with frozen_layers=")
        ids = tuple(layer_ids(frozen_layers))
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
    if ranking is not None:
        order = load_ranking(ranking, num_layers=num_layers, model_name=model_name)
    else:
        order = tuple(default_ranking)
    if n_frozen and not order:
        raise ConfigError(no_ranking_message(model_name))
    check_layer_ids(order, num_layers)
    if n_frozen > len(order):
        raise ConfigError(f"n_frozen={n_frozen} but the ranking lists only {len(order)} layers")
    return tuple(sorted(order[:n_frozen]))


def no_ranking_message(model_name: str | None = None) -> str:
    """What to do when n_frozen is asked for but no ranking is known (a zoo card without a
    published one, or a checkpoint directory): compute one with `shortv lc`."""
    model = model_name or "MODEL"
    whose = f"{model!r} has" if model_name else "this model has"
    return (
        f"n_frozen needs a ranking of the layers and {whose} none published: compute one with "
        f"`shortv lc {model} --data calib.jsonl --out lc.json` (calib.jsonl: one "
        '{"image": ..., "prompt": ...} per line; the paper used 40 samples) and pass it '
        "(ranking='lc.json' or --ranking lc.json), or name the layers (frozen_layers= or "
        "--frozen-layers)"
    )


def choose_method(
    num_layers: int,
    *,
    n_frozen: int | None = None,
    frozen_layers: Sequence[int] | None = None,
    ranking: RankingLike | None = None,
    method: Method | None = None,
    default_ranking: Sequence[int] = (),
    model_name: str | None = None,
) -> Method:
    """The method `shortv.load`'s options ask for, fitted to a decoder of `num_layers`:
    ShortV when n_frozen / frozen_layers are given, else `method`, else Vanilla."""
    layers = resolve_frozen_layers(
        num_layers, n_frozen=n_frozen, frozen_layers=frozen_layers, ranking=ranking,
        default_ranking=default_ranking, model_name=model_name,
    )
    if method is not None and not isinstance(method, Method):
        raise ConfigError(f"method must be a shortv method (Vanilla, ShortV, FastV, ...), got {method!r}")
    if layers is not None:
        # With a token-wise method too: both, composed (ShortV's layers, the method's drops).
        method = ShortV(layers) if method is None else compose(ShortV(layers), method)
    return (method or VANILLA).for_layers(num_layers)


def fitted_method(spec: MethodSpec, num_layers: int, card: Any = None, *,
                  model_name: str | None = None) -> Method:
    """The method a spec asks for (`shortv.methods.spec.build`, with the card's paper N and
    ranking), fitted to a decoder of `num_layers` as `shortv.load` fits it."""
    return choose_method(num_layers, **build(spec, card),
                         default_ranking=card.ranking if card is not None else (),
                         model_name=model_name)


def entry_method(text: str, card: Any, num_layers: int) -> Method:
    """The method one line of a benchmark's method list asks for
    (`shortv.methods.spec.parse_entry`), fitted to a decoder of `num_layers`."""
    return fitted_method(parse_entry(text, card, num_layers), num_layers, card)


def with_family_defaults(config: Any, method: Method) -> Method:
    """`method` with the defaults its authors use on this config's model family filled in
    (DART: the Qwen2-VL code's count from the ratio; LLaVA-NeXT's 320-token budget). What a
    loaded model's `check_method` and the config-only commands (flops, bench) both apply."""
    from .methods import dart
    from .methods.compose import map_parts
    from .models.qwen_config import QwenVLConfig

    if isinstance(config, QwenVLConfig):
        return map_parts(method, dart.for_qwen)
    if getattr(config, "image_aspect_ratio", None) == "anyres":
        return map_parts(method, dart.for_llava_next)
    return method
