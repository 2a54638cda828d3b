"""What the commands share: one-line usage errors, option types, and the method options
(--method/--n-frozen/--frozen-layers/--ranking/--k/--r/--budget/--param) turned into a
`shortv.methods.spec.MethodSpec`, which `shortv.methods.spec.build` makes a method of."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any, NoReturn

from ..errors import ConfigError, require_model_name
from ..loading import DTYPES
from ..methods import METHODS, Method, parse_layer_list
from ..methods.spec import MethodSpec, build, parse_names, parse_params
from ..models.quant import DEFAULT_GROUP_SIZE, GROUP_SIZES, SCHEMES, Quantization
from ..ranking import fitted_method

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


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


# ---- shared options -----------------------------------------------------------------------


def add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=tuple(DTYPES),
                   help="default: bfloat16 on CUDA and for a quantized model, float32 on CPU")
    add_quantize(p)


def add_quantize(p: argparse.ArgumentParser) -> None:
    """--quantize and --group-size (`shortv.load`'s quantize and group_size)."""
    p.add_argument("--quantize", choices=SCHEMES,
                   help="weight-only quantization of the language model's Linear layers (CPU)")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES,
                   help=f"int4: inputs per scale (default {DEFAULT_GROUP_SIZE})")


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """`shortv.load`'s device, dtype, quantize and group_size from the runtime options."""
    return {"device": args.device, "dtype": args.dtype, **quantize_options(args)}


def quantize_options(args: argparse.Namespace) -> dict[str, Any]:
    """quantize and group_size from --quantize / --group-size (checked together)."""
    Quantization.of(args.quantize, args.group_size)  # ConfigError for a bad combination, early
    return {"quantize": args.quantize, "group_size": args.group_size}


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
    """--method's type: "shortv+fastv" → ("shortv", "fastv"), registered names, each once."""
    try:
        return parse_names(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def spec_of(args: argparse.Namespace) -> MethodSpec:
    """The method options (--method/--n-frozen/--frozen-layers/--ranking/--k/--r/--budget/
    --param) as a MethodSpec."""
    layers = args.frozen_layers
    return MethodSpec(names=args.method, n_frozen=args.n_frozen,
                      frozen_layers=None if layers is None else tuple(layers),
                      ranking=args.ranking, k=args.k, r=args.r, budget=getattr(args, "budget", None),
                      params=parse_params(getattr(args, "param", None) or []))


def method_options(args: argparse.Namespace, card: Any = None) -> dict[str, Any]:
    """The method options as `shortv.load` keyword arguments (n_frozen, frozen_layers,
    ranking, method): see `shortv.methods.spec.build`."""
    return build(spec_of(args), card)


def method_for(args: argparse.Namespace, num_layers: int, card: Any = None,
               model_name: str | None = None) -> Method:
    """The method the options ask for, for a decoder of `num_layers` (without loading one)."""
    return fitted_method(spec_of(args), num_layers, card, model_name=model_name)


def model_config(source: str) -> tuple[Any, Any]:
    """(LlavaConfig, card or None): a zoo card's config, or a local checkpoint's (read
    without loading weights)."""
    from .. import store, zoo
    from ..loading import config_of_directory

    require_model_name(source)
    card = zoo.card(source)
    if card is not None:
        return card.config, card
    return config_of_directory(store.locate(source)), None
