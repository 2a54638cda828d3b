"""`shortv lc`: Layer Contribution analysis, the ranking that ShortV freezes by."""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError
from ..paths import output_path
from .options import add_runtime, int_at_least, load_options, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lc", help="Layer Contribution analysis: rank layers for freezing")
    p.add_argument("model", help="zoo name, checkpoint directory or Hub repo id")
    p.add_argument("--data", required=True,
                   help='JSONL calibration file: {"image": path or [paths], "prompt": text} per '
                        "line, or an eval question file (shortv eval --questions)")
    p.add_argument("--image-folder", metavar="DIR",
                   help="where relative image paths resolve (default: the data file's folder)")
    p.add_argument("--out", help="write the report (JSON) here")
    p.add_argument("--plot", help="write a PNG bar chart here (needs matplotlib)")
    p.add_argument("--limit", type=int_at_least(1), help="use only the first N samples")
    p.add_argument("--batch-size", type=int_at_least(1), default=1,
                   help="samples run together (more memory, faster on GPUs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true")
    add_runtime(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import warnings

    from .. import lc, load, parallel

    # Fail on bad data and unwritable outputs before loading and computing.
    samples = lc.read_samples(args.data, limit=args.limit, image_folder=args.image_folder)
    out, plot = output_path(args.out), output_path(args.plot)
    if out is not None and plot is not None and out.resolve() == plot.resolve():
        raise ConfigError("--out and --plot name the same file")
    if plot is not None:
        lc.require_matplotlib()
    ranks = parallel.start(args.device)  # one process, or one of a torchrun group
    try:
        model = load(args.model, **{**load_options(args), "device": ranks.device or args.device})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the noise case is reported below, on one line
            report = lc.layer_contribution(model, samples, batch_size=args.batch_size,
                                           progress=not args.json and not args.quiet,
                                           data=str(args.data), ranks=ranks)
    finally:
        parallel.stop(ranks)
    if not ranks.main:
        return 0
    if out is not None:
        report.save(out)
    if plot is not None:
        lc.plot(report, plot)
    if args.json:
        if plot is not None:  # on stderr: stdout holds the JSON report alone
            print(f"plot written to {args.plot}", file=sys.stderr)
        print_json(report.to_dict())
        return 0
    print(f"Layer Contribution of {model.name} over {report.samples} samples "
          "(KL(Q||P) >= 0; rounding below 0 shown as 0):")
    print("layer  visual        text")
    for i in range(model.num_layers):
        print(f"{i:5d}  {max(report.visual[i], 0.0):.6e}  {max(report.text[i], 0.0):.6e}")
    if report.visual_is_noise:
        print(f"warning: {lc.NOISE_WARNING}")
    print(f"ranking (ascending visual LC): {','.join(map(str, report.ranking))}")
    if out is not None:
        print(f"report written to {args.out}; freeze with: shortv chat --model {args.model} "
              f"--ranking {args.out} --n-frozen N")
    if plot is not None:
        print(f"plot written to {args.plot}")
    return 0
