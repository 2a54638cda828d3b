"""What the commands share: one-line usage errors, option types, and the method options
(--method/--n-frozen/--frozen-layers/--ranking/--k/--r/--budget/--param) turned into a
method."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from ..errors import ConfigError, require_model_name
from ..loading import DTYPES
from ..methods import METHODS, Method, compose, parse_layer_list
from ..ranking import choose_method

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (and exits 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---- option types -------------------------------------------------------------------------


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    return parse


def float_in(low: float, high: float, *, open_low: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (low < value if open_low else low <= value) or value > high:
            raise argparse.ArgumentTypeError(
                f"{value} must be in {'(' if open_low else '['}{low}, {high}]")
        return value

    return parse


def layer_list(text: str) -> list[int]:
    try:
        return parse_layer_list(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


# ---- shared options -----------------------------------------------------------------------


def add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=tuple(DTYPES),
                   help="default: bfloat16 on CUDA, float32 on CPU")


def add_sampling(p: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    """--max-new-tokens, --temperature, --top-p, --seed (greedy by default)."""
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=max_new_tokens)
    p.add_argument("--temperature", type=float_in(0.0, 100.0), default=0.0,
                   help="0 (default): greedy, as LLaVA's eval scripts")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, open_low=True))
    p.add_argument("--seed", type=int)


def add_compile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (same tokens; pays off on "
                        "long answers, after a one-time compilation; on CUDA it replays "
                        "CUDA graphs over a static KV cache)")


def generation_options(args: argparse.Namespace) -> Any:
    """The GenerationOptions of the --max-new-tokens/--temperature/--top-p/--seed options."""
    from ..generate import GenerationOptions

    return GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed)


def add_method(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(f"method ({', '.join(METHODS)}; compose with +, e.g. shortv+fastv)")
    g.add_argument("--method", type=method_spec, metavar="NAME[+NAME]",
                   help="default: shortv if --n-frozen/--frozen-layers is given, else vanilla")
    g.add_argument("--n-frozen", type=int_at_least(0), metavar="N",
                   help="ShortV: freeze the first N layers of the ranking")
    g.add_argument("--frozen-layers", type=layer_list, metavar="I,J,...",
                   help="ShortV: freeze exactly these layer ids")
    g.add_argument("--ranking", metavar="REPORT",
                   help="ranking for --n-frozen: an LC report from `shortv lc` (default: the "
                        "zoo card's)")
    g.add_argument("--k", type=int_at_least(0), help="FastV/VTW layer K (FastV default 2, "
                                                      "VTW default half the layers)")
    g.add_argument("--r", type=float_in(0.0, 1.0), help="FastV fraction of visual tokens "
                                                        "dropped (default 0.5)")
    g.add_argument("--budget", type=int_at_least(1), metavar="N",
                   help="visual tokens kept, for the methods with a token budget")
    g.add_argument("--param", action="append", default=[], metavar="[METHOD.]NAME=VALUE",
                   help="any other method parameter (repeatable), e.g. --param pdrop.lam=0.5")


def method_spec(text: str) -> tuple[str, ...]:
    """"shortv+fastv" → ("shortv", "fastv"): registered names, each once."""
    names = tuple(n.strip() for n in text.split("+"))
    for name in names:
        if name not in METHODS:
            raise argparse.ArgumentTypeError(
                f"unknown method {name!r}; use one of {', '.join(METHODS)}, or several joined by +")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} names a method twice")
    return names


def method_options(args: argparse.Namespace, card: Any = None) -> dict[str, Any]:
    """The method options as `shortv.load` keyword arguments (n_frozen, frozen_layers,
    ranking, method). --method shortv without N or layers takes the card's paper N; other
    methods are built from --k/--r/--budget/--param and composed (`shortv.compose`)."""
    freezing = args.n_frozen is not None or args.frozen_layers is not None
    names = args.method or (("shortv",) if freezing else ("vanilla",))
    if isinstance(names, str):
        names = method_spec(names)
    _check_ranking_use(args)
    if "shortv" not in names and (freezing or args.ranking is not None):
        raise ConfigError("--n-frozen/--frozen-layers/--ranking are for --method shortv, "
                          f"not {'+'.join(names)}")
    if not {"fastv", "vtw"} & set(names) and (args.k is not None or args.r is not None):
        raise ConfigError("--k/--r are for --method fastv or vtw")
    if "fastv" not in names and args.r is not None:
        raise ConfigError("--r is for --method fastv")
    if "vanilla" in names and len(names) > 1:
        raise ConfigError("vanilla cannot be composed with other methods")
    params = _params(getattr(args, "param", None) or [], names)
    budget = getattr(args, "budget", None)
    others = [_build(name, args, budget, params.get(name, {})) for name in names if name != "shortv"]
    if budget is not None and not any(_has_field(METHODS[n], "budget") for n in names):
        raise ConfigError(f"--budget is for methods with a token budget, not {'+'.join(names)}")
    method: Method | None = others[0] if len(others) == 1 else compose(*others) if others else None
    n_frozen = args.n_frozen
    if "shortv" in names and not freezing:
        n_frozen = card.n_frozen if card is not None else None
        if n_frozen is None:
            raise ConfigError("--method shortv needs --n-frozen N (with the card's or your "
                              "--ranking) or --frozen-layers I,J,...")
    return {"n_frozen": n_frozen, "frozen_layers": args.frozen_layers, "ranking": args.ranking,
            "method": method}


def _check_ranking_use(args: argparse.Namespace) -> None:
    """--ranking says which layers come first, not how many to freeze: it needs --n-frozen N
    (or --method shortv, which takes the card's paper N), and --frozen-layers names the layers
    itself."""
    if args.ranking is None or args.n_frozen is not None:
        return
    if args.frozen_layers is not None:
        raise ConfigError("--ranking is used with --n-frozen N, not with --frozen-layers (which "
                          "names the layers itself): drop one of them")
    if args.method is None:
        raise ConfigError("--ranking needs --n-frozen N (how many of its first layers to freeze)")


def method_entry(text: str, card: Any, num_layers: int) -> Method:
    """A method from one line of a benchmark's method list: "NAME[+NAME] [PARAM=VALUE ...]"
    (budget= as --budget, any other field as --param; ShortV takes the card's N and
    ranking restricted to the first `num_layers`), fitted to `num_layers`."""
    spec, *params = text.split()
    fields = dict(p.split("=", 1) for p in params if "=" in p)
    if len(fields) != len(params):
        raise ConfigError(f"method entry {text!r}: parameters are NAME=VALUE")
    args = argparse.Namespace(
        method=method_spec(spec), n_frozen=None, frozen_layers=None, ranking=None, k=None, r=None,
        budget=int(fields.pop("budget")) if "budget" in fields else None,
        param=[f"{k}={v}" for k, v in fields.items()])
    if "shortv" in args.method:
        ranking = tuple(i for i in (card.ranking if card is not None else ()) if i < num_layers)
        args.frozen_layers = list(ranking[: card.n_frozen or 0]) if card is not None else []
    return choose_method(num_layers, **method_options(args, card),
                         default_ranking=card.ranking if card is not None else ())


def _has_field(cls: type, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(cls)}


def _params(entries: list[str], names: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """--param [METHOD.]NAME=VALUE entries by method; an unqualified NAME goes to the one
    method of `names` that has such a parameter."""
    out: dict[str, dict[str, str]] = {}
    for entry in entries:
        key, eq, value = entry.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--param {entry!r}: expected NAME=VALUE or METHOD.NAME=VALUE")
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


def _build(name: str, args: argparse.Namespace, budget: int | None, params: dict[str, str]) -> Method:
    """One registered method from the options (its dataclass fields, coerced from text)."""
    cls = METHODS[name]
    kwargs: dict[str, Any] = {}
    if name == "fastv":
        kwargs = {"k": 2 if args.k is None else args.k, "r": 0.5 if args.r is None else args.r}
    elif name == "vtw":
        kwargs = {"k": args.k}
    if budget is not None and _has_field(cls, "budget"):
        kwargs["budget"] = budget
    hints = typing.get_type_hints(cls)
    for field, text in params.items():
        kwargs[field] = _coerce(f"{name}.{field}", text, hints.get(field))
    return cls(**kwargs)


def _coerce(where: str, text: str, kind: Any) -> Any:
    """A parameter's text as its field's type: int, float, bool, tuple of ints, or None."""
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
            elif typing.get_origin(option) is tuple:
                return tuple(int(p) if typing.get_args(option)[0] is int else float(p)
                             for p in text.split(",") if p.strip())
        except ValueError:
            continue
    raise ConfigError(f"--param {where}={text!r}: not a valid value for this parameter")


def method_for(args: argparse.Namespace, num_layers: int, card: Any = None,
               model_name: str | None = None) -> Method:
    """The method the options ask for, for a decoder of `num_layers` (without loading one)."""
    return choose_method(num_layers, **method_options(args, card),
                         default_ranking=card.ranking if card is not None else (),
                         model_name=model_name)


def model_config(source: str) -> tuple[Any, Any]:
    """(LlavaConfig, card or None): a zoo card's config, or a local checkpoint's (read
    without loading weights)."""
    from .. import zoo
    from ..loading import config_of_directory

    require_model_name(source)
    card = zoo.card(source)
    if card is not None:
        return card.config, card
    return config_of_directory(zoo.locate(source)), None
