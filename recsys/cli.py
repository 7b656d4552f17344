"""The `recsys` command line. Heavy modules are imported inside each command, so that
`recsys --help` is instant and `recsys` never imports the pipelines package at load time."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from recsys.config import ConfigError, load_config


def _cmd_gen_data(args: argparse.Namespace) -> None:
    from recsys.synth import generate

    cfg = load_config(args.config, args.overrides)
    summary = generate(cfg, rows=args.rows, out=Path(args.out))
    print(json.dumps(summary, indent=2))


def _cmd_convert_criteo(args: argparse.Namespace) -> None:
    from recsys.criteo import convert_criteo

    summary = convert_criteo(
        Path(args.input),
        Path(args.out),
        rows_per_day=args.rows_per_day,
        log_transform=args.log_transform,
    )
    print(json.dumps(summary, indent=2))


def _cmd_stats(args: argparse.Namespace) -> None:
    from recsys.stats import log_statistics

    cfg = load_config(args.config, args.overrides)
    data = args.data or cfg.data.train
    if data is None:
        raise ConfigError(f"{args.config}: no data given (--data or data.train)")
    print(json.dumps(log_statistics(cfg, data), indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="experiment YAML, e.g. conf/criteo_synth.yaml")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.workers=2")

    p = sub.add_parser("gen-data", help="write a synthetic Parquet log, partitioned by day")
    with_config(p)
    p.add_argument("--rows", type=int, required=True, help="number of impressions")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_cmd_gen_data)

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

    p = sub.add_parser("stats", help="print statistics of a Parquet log")
    with_config(p)
    p.add_argument("--data", help="Parquet file or directory (default: data.train)")
    p.set_defaults(func=_cmd_stats)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"recsys {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
