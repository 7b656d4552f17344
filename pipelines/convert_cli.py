"""`recsys convert`: the public log formats to the Parquet contract (a part of the
command line of its own, as it needs none of torch, torchrec or Ray)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from recsys.config import ConfigError

Show = Callable[[argparse.Namespace, str, dict], None]


def _cmd_convert_criteo(args: argparse.Namespace) -> None:
    from recsys.convert.criteo import convert_criteo

    summary = convert_criteo(
        Path(args.input),
        Path(args.out),
        rows_per_day=args.rows_per_day,
        log_transform=args.log_transform,
    )
    args.show(args, f"convert: {args.out}", summary)


def _cmd_convert_libsvm(args: argparse.Namespace) -> None:
    from recsys.convert.libsvm import convert_libfm, convert_libsvm, parse_indices

    numeric = parse_indices(args.numeric or "")
    if args.source == "libsvm":
        summary = convert_libsvm(
            Path(args.input), Path(args.out), args.rows_per_day, numeric, args.layout
        )
    else:
        multi = parse_indices(args.multi_valued or "")
        summary = convert_libfm(Path(args.input), Path(args.out), args.rows_per_day, numeric, multi)
    args.show(args, f"convert: {args.out}", summary)


def _cmd_convert_csv(args: argparse.Namespace) -> None:
    from recsys.convert.csv_spec import load_spec, spec_from_options
    from recsys.convert.delimited import convert_csv

    def names(text: str | None) -> list[str]:
        return [n.strip() for n in (text or "").split(",") if n.strip()]

    if args.spec:
        if args.label:
            raise ConfigError("give the columns either in --spec or as options, not both")
        spec = load_spec(args.spec)
    elif args.label:
        spec = spec_from_options(
            args.label,
            args.timestamp,
            names(args.categorical),
            names(args.numeric),
            args.sequence or [],
            names(args.skip),
            delimiter="\t" if args.delimiter in ("\\t", "tab") else args.delimiter,
            header=False if args.names else None,
            names=names(args.names) or None,
        )
    else:
        raise ConfigError("recsys convert csv needs --spec FILE or at least --label COLUMN")
    summary = convert_csv(Path(args.input), Path(args.out), spec, rows_per_day=args.rows_per_day)
    args.show(args, f"convert: {args.out}", summary)


def _cmd_convert_movielens(args: argparse.Namespace) -> None:
    from recsys.convert.movielens import convert_movielens

    try:
        summary = convert_movielens(args.out, wheel=args.wheel, max_history=args.max_history)
    except RuntimeError as err:  # the download failed: pip's own words say why
        print(f"recsys convert movielens: error: {err}", file=sys.stderr)
        sys.exit(2)
    args.show(args, f"convert: {args.out}", summary)


def add_convert_commands(sub: argparse._SubParsersAction, show: Show) -> None:
    """`convert criteo|libsvm|libfm|csv|movielens`, printing their summaries with `show`."""
    p = sub.add_parser("convert", help="convert a public log to the Parquet contract")
    conv = p.add_subparsers(dest="source", required=True)
    c = conv.add_parser("criteo", help="Criteo display-ads text (raw TSV or CSV with header)")
    c.add_argument("input", help="the text file (.tsv/.txt, optionally .gz)")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument(
        "--rows-per-day",
        type=int,
        default=None,
        help="rows per day for the derived timestamp and day partitions (default: one day)",
    )
    c.add_argument(
        "--log-transform",
        action="store_true",
        help="write I1..I13 as log(1 + x) for x > 0 (x <= 0 kept as is)",
    )
    c.set_defaults(func=_cmd_convert_criteo)

    rows_per_day_help = "rows per day of the derived timestamp and day partitions (default: one)"
    for fmt, token in (("libsvm", "index:value"), ("libfm", "field:feature:value")):
        c = conv.add_parser(fmt, help=f"{fmt} text, `label {token} ...` (one-hot IDs, value 1)")
        c.add_argument("input", help="the text file (optionally .gz)")
        c.add_argument("--out", required=True, help="output directory")
        c.add_argument("--rows-per-day", type=int, default=None, help=rows_per_day_help)
        what = "indices" if fmt == "libsvm" else "fields"
        c.add_argument(
            "--numeric", help=f"{what} holding numbers (float32 columns), e.g. 1-13 (default none)"
        )
        if fmt == "libsvm":
            c.add_argument(
                "--layout",
                choices=["positional", "bag"],
                default="positional",
                help="positional: the k-th ID of a line is column f<k> (default); bag: one "
                "list column `ids`",
            )
        else:
            c.add_argument("--multi-valued", help="fields written as lists even if never repeated")
        c.set_defaults(func=_cmd_convert_libsvm)

    c = conv.add_parser("csv", help="CSV / TSV with a feature spec (file or options)")
    c.add_argument("input", help="the text file (optionally .gz; *.tsv is tab-separated)")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--spec", help="YAML or JSON spec (see recsys/convert/csv_spec.py)")
    c.add_argument("--label", help="label column (0/1), instead of a spec file")
    c.add_argument("--timestamp", help="timestamp column (Unix seconds); default: derived")
    c.add_argument("--categorical", help="comma-separated ID columns (int64)")
    c.add_argument("--numeric", help="comma-separated number columns (float32)")
    c.add_argument(
        "--sequence", action="append", help="NAME=SEPARATOR: an ID-list column (repeatable)"
    )
    c.add_argument("--skip", help="comma-separated columns to leave out")
    c.add_argument("--delimiter", help="field delimiter (default: tab for .tsv, else comma)")
    c.add_argument("--names", help="the columns of a header-less file, comma-separated")
    c.add_argument("--rows-per-day", type=int, default=None, help=rows_per_day_help)
    c.set_defaults(func=_cmd_convert_csv)

    c = conv.add_parser(
        "movielens", help="MovieLens-100K (from the recbole wheel) as CTR and sequence logs"
    )
    c.add_argument("--out", required=True, help="output directory (gets ctr/ and sequence/)")
    c.add_argument("--wheel", help="a local recbole-1.2.1 wheel (default: download and cache)")
    c.add_argument(
        "--max-history", type=int, default=200, help="most recent ratings kept as history"
    )
    c.set_defaults(func=_cmd_convert_movielens)
    for parser in conv.choices.values():
        parser.set_defaults(show=show)
