"""Running the CLI's main() in-process, as the tests do."""

from __future__ import annotations

from shortv import cli


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `shortv ARGV`."""
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse errors exit from inside parse_args
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
