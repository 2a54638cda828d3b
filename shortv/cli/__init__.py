"""The `shortv` command line: chat, zoo, download, eval, flops, bench, lc, serve, inspect.

Every command that reports numbers takes --json and then prints one JSON object on
stdout. Errors print one line on stderr and exit with status 2 (under torchrun, on the
rank that failed; the others stop silently, see `shortv.parallel`). `--help`
shows every option's default. One module per command (`zoo` also holds `download`);
`options` holds what they share.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..errors import ShortVError
from ..parallel import RankError
from ..version import __version__
from . import bench, chat, eval, flops, inspect, lc, serve, zoo
from .options import EXIT_USAGE, Parser


def build_parser() -> Parser:
    parser = Parser(prog="shortv", description="LLaVA with ShortV: chat, zoo, download, eval, "
                                               "flops, bench, lc, serve, inspect.")
    parser.add_argument("--version", action="version", version=f"shortv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in (chat, zoo, eval, flops, bench, lc, serve, inspect):
        command.add_parser(sub)
    for command_parser in sub.choices.values():
        command_parser.set_defaults(command_parser=command_parser)
        show_defaults(command_parser)
    return parser


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default: X)" to the help of every option whose default says something: not
    None, False (an unset flag) or an empty list, and not already told by the help."""
    for action in parser._actions:
        default = action.default
        if (not action.option_strings or default in (None, False, argparse.SUPPRESS)
                or default == [] or "default" in (action.help or "")):
            continue
        action.help = f"{action.help} (default: %(default)s)" if action.help else "(default: %(default)s)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status (0, 2 for anything a user can cause, 1 for a bug)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse blames the top-level parser; the command's own help is the useful one
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args)
    except RankError as e:
        if e.relayed:  # another rank failed and says so; torchrun reports that rank's exit
            return 0
        print(f"shortv {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ShortVError as e:
        print(f"shortv {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:  # a bug: say so on one line unless asked for the traceback
        if os.environ.get("SHORTV_DEBUG"):
            raise
        print(f"shortv {args.command}: internal error: {e.__class__.__name__}: {e} "
              "(set SHORTV_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


__all__ = ["build_parser", "main"]
