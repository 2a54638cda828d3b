"""A method as plain data: `MethodSpec`, the method names and their options, and the one
builder every front end shares (`build`), which turns a spec into `shortv.load`'s method
keyword arguments.

The front ends only translate their own text forms into a spec: the command line's
--method/--n-frozen/... options (`shortv.cli.options`), the lmms-eval model's model_args
(`shortv.eval.lmms`) and the benchmark scripts' method entries (`parse_entry`). Every rule
about which options go together is checked here, once; the messages name the command
line's flags, which the lmms-eval model rewords as model_args.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ConfigError
from . import METHODS, Method, compose


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What a user asked for, before a model is known.

    names: registered method names (`METHODS`), composed when several, e.g.
        ("shortv", "fastv"); None: shortv when n_frozen / frozen_layers is given, else vanilla.
    n_frozen, frozen_layers, ranking: ShortV's layers (N of a ranking, or exact ids).
    k, r: FastV's layer and dropped fraction, VTW's layer. budget: visual tokens kept, for
        the methods with a token budget.
    params: any other method field as text, {"[METHOD.]NAME": "VALUE"}; an unqualified
        NAME goes to the one named method that has such a field.
    """

    names: tuple[str, ...] | None = None
    n_frozen: int | None = None
    frozen_layers: tuple[int, ...] | None = None
    ranking: str | None = None
    k: int | None = None
    r: float | None = None
    budget: int | None = None
    params: Mapping[str, str] = dataclasses.field(default_factory=dict)


# ---- the text forms -----------------------------------------------------------------------


def parse_names(text: str) -> tuple[str, ...]:
    """"shortv+fastv" → ("shortv", "fastv"): registered names, each once."""
    names = tuple(n.strip() for n in text.split("+"))
    for name in names:
        if name not in METHODS:
            raise ConfigError(
                f"unknown method {name!r}; use one of {', '.join(METHODS)}, or several joined by +")
    if len(set(names)) != len(names):
        raise ConfigError(f"{text!r} names a method twice")
    return names


def parse_params(entries: Iterable[str]) -> dict[str, str]:
    """"[METHOD.]NAME=VALUE" texts (the command line's --param) as {"[METHOD.]NAME": "VALUE"};
    a name given twice keeps its last value."""
    params: dict[str, str] = {}
    for entry in entries:
        key, eq, value = entry.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--param {entry!r}: expected NAME=VALUE or METHOD.NAME=VALUE")
        # Re-inserted so that the order is that of the last occurrences: "lam" and
        # "pdrop.lam" may name the same field, and the later one wins.
        params.pop(key, None)
        params[key] = value
    return params


def parse_entry(text: str, card: Any, num_layers: int) -> MethodSpec:
    """A spec from one line of a benchmark's method list, "NAME[+NAME] [PARAM=VALUE ...]"
    (budget= as --budget, any other field as --param), for a decoder of `num_layers` that
    may be cut from the card's model: ShortV freezes the card's N of its ranking restricted
    to those layers (none without a card)."""
    names_text, *pairs = text.split()
    fields = dict(p.split("=", 1) for p in pairs if "=" in p)
    if len(fields) != len(pairs):
        raise ConfigError(f"method entry {text!r}: parameters are NAME=VALUE")
    budget = fields.pop("budget", None)
    try:
        budget_tokens = None if budget is None else int(budget)
    except ValueError:
        raise ConfigError(f"method entry {text!r}: budget={budget} is not an integer") from None
    names = parse_names(names_text)
    frozen_layers = None
    if "shortv" in names:
        ranking = tuple(i for i in (card.ranking if card is not None else ()) if i < num_layers)
        frozen_layers = ranking[: card.n_frozen or 0] if card is not None else ()
    return MethodSpec(names=names, frozen_layers=frozen_layers,
                      budget=budget_tokens, params=fields)


# ---- the builder --------------------------------------------------------------------------


def build(spec: MethodSpec, card: Any = None) -> dict[str, Any]:
    """The spec as `shortv.load` keyword arguments (n_frozen, frozen_layers, ranking,
    method). shortv without N or layers takes the card's paper N; the other methods are
    built from k/r/budget/params and composed (`shortv.compose`)."""
    freezing = spec.n_frozen is not None or spec.frozen_layers is not None
    names = spec.names or (("shortv",) if freezing else ("vanilla",))
    _check_ranking_use(spec)
    if "shortv" not in names and (freezing or spec.ranking is not None):
        raise ConfigError("--n-frozen/--frozen-layers/--ranking are for --method shortv, "
                          f"not {'+'.join(names)}")
    if not {"fastv", "vtw"} & set(names) and (spec.k is not None or spec.r is not None):
        raise ConfigError("--k/--r are for --method fastv or vtw")
    if "fastv" not in names and spec.r is not None:
        raise ConfigError("--r is for --method fastv")
    if "vanilla" in names and len(names) > 1:
        raise ConfigError("vanilla cannot be composed with other methods")
    params = _params_by_method(spec.params, names)
    others = [_build_one(name, spec, params.get(name, {})) for name in names if name != "shortv"]
    if spec.budget is not None and not any(_has_field(METHODS[n], "budget") for n in names):
        raise ConfigError(f"--budget is for methods with a token budget, not {'+'.join(names)}")
    method: Method | None = others[0] if len(others) == 1 else compose(*others) if others else None
    n_frozen = spec.n_frozen
    if "shortv" in names and not freezing:
        n_frozen = card.n_frozen if card is not None else None
        if n_frozen is None:
            raise ConfigError("--method shortv needs --n-frozen N (with the card's or your "
                              "--ranking) or --frozen-layers I,J,...")
    return {"n_frozen": n_frozen, "frozen_layers": spec.frozen_layers, "ranking": spec.ranking,
            "method": method}


def _check_ranking_use(spec: MethodSpec) -> None:
    """A ranking says which layers come first, not how many to freeze: it needs n_frozen
    (or the name shortv, which takes the card's paper N), and frozen_layers names the layers
    itself."""
    if spec.ranking is None or spec.n_frozen is not None:
        return
    if spec.frozen_layers is not None:
        raise ConfigError("--ranking is used with --n-frozen N, not with --frozen-layers (which "
                          "names the layers itself): drop one of them")
    if spec.names is None:
        raise ConfigError("--ranking needs --n-frozen N (how many of its first layers to freeze)")


def _has_field(cls: type, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(cls)}


def _params_by_method(params: Mapping[str, str], names: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """The params by method; an unqualified NAME goes to the one method of `names` that has
    such a field."""
    out: dict[str, dict[str, str]] = {}
    for key, value in params.items():
        entry = f"{key}={value}"
        owner, dot, field = key.strip().rpartition(".")
        if dot:
            if owner not in names:
                raise ConfigError(f"--param {entry!r}: {owner!r} is not one of the methods "
                                  f"({'+'.join(names)})")
            owners = [owner] if _has_field(METHODS[owner], field) else []
        else:
            owners = [n for n in names if _has_field(METHODS[n], field)]
        if not owners:
            known = {n: [f.name for f in dataclasses.fields(METHODS[n])] for n in names}
            raise ConfigError(f"--param {entry!r}: no parameter {field!r}; the methods have " + "; ".join(
                f"{n}: {', '.join(fs) or 'none'}" for n, fs in known.items()))
        if len(owners) > 1:
            raise ConfigError(f"--param {entry!r}: {'+'.join(owners)} all have {field!r}; "
                              f"write METHOD.{field}=...")
        out.setdefault(owners[0], {})[field] = value.strip()
    return out


def _build_one(name: str, spec: MethodSpec, params: dict[str, str]) -> Method:
    """One registered method from the spec (its dataclass fields, coerced from text)."""
    cls = METHODS[name]
    kwargs: dict[str, Any] = {}
    if name == "fastv":
        kwargs = {f: v for f, v in (("k", spec.k), ("r", spec.r)) if v is not None}
    elif name == "vtw":
        kwargs = {"k": spec.k}
    if spec.budget is not None and _has_field(cls, "budget"):
        kwargs["budget"] = spec.budget
    hints = typing.get_type_hints(cls)
    for field, text in params.items():
        kwargs[field] = _coerce(f"{name}.{field}", text, hints.get(field))
    return cls(**kwargs)


def _coerce(where: str, text: str, kind: Any) -> Any:
    """A parameter's text as its field's type: int, float, bool, str, tuple of ints, or None
    (a str field checks its own values when the method is built)."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    if type(None) in options and text.lower() in ("none", ""):
        return None
    for option in options:
        try:
            if option is bool:
                if text.lower() in ("true", "1", "yes", "false", "0", "no"):
                    return text.lower() in ("true", "1", "yes")
            elif option in (int, float):
                return option(text)
            elif option is str:
                return text
            elif typing.get_origin(option) is tuple:
                return tuple(int(p) if typing.get_args(option)[0] is int else float(p)
                             for p in text.split(",") if p.strip())
        except ValueError:
            continue
    raise ConfigError(f"--param {where}={text!r}: not a valid value for this parameter")
