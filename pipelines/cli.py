"""The `recsys` console script, at the top of the import order (it drives every pipeline).

Heavy modules are imported inside each command, so that `recsys --help` and `gen-data` do
not pay for torch, torchrec and Ray."""

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
    from recsys.convert.criteo import convert_criteo

    summary = convert_criteo(
        Path(args.input),
        Path(args.out),
        rows_per_day=args.rows_per_day,
        log_transform=args.log_transform,
    )
    print(json.dumps(summary, indent=2))


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
    print(json.dumps(summary, indent=2))


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
    print(json.dumps(summary, indent=2))


def _cmd_convert_movielens(args: argparse.Namespace) -> None:
    from recsys.convert.movielens import convert_movielens

    try:
        summary = convert_movielens(args.out, wheel=args.wheel, max_history=args.max_history)
    except RuntimeError as err:  # the download failed: pip's own words say why
        print(f"recsys convert movielens: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary, indent=2))


def _cmd_stats(args: argparse.Namespace) -> None:
    from recsys.stats import log_statistics

    cfg = load_config(args.config, args.overrides)
    data = args.data or cfg.data.train
    if data is None:
        raise ConfigError(f"{args.config}: no data given (--data or data.train)")
    print(json.dumps(log_statistics(cfg, data), indent=2))


def _cmd_validate(args: argparse.Namespace) -> None:
    from recsys.contract import BadRowCounts
    from recsys.logs import read_validated

    cfg = load_config(args.config, args.overrides)
    data = args.data or cfg.data.train
    if data is None:
        raise ConfigError(f"{args.config}: no data given (--data or data.train)")
    skipped = BadRowCounts()
    rows = sum(
        t.num_rows
        for t in read_validated(data, cfg.features, 262_144, cfg.data.on_bad_rows, skipped)
    )
    print(json.dumps({"data": str(data), "valid_rows": rows, "skipped": skipped.as_dict()}))


def _cmd_train(args: argparse.Namespace) -> None:
    from pipelines.train.driver import train

    cfg = load_config(args.config, args.overrides)
    print(json.dumps(train(cfg, address=args.address, resume=args.resume), indent=2, default=str))


def _cmd_sweep(args: argparse.Namespace) -> None:
    from pipelines.sweep import sweep

    cfg = load_config(args.config, args.overrides)
    budgets = [float(b) for b in args.budgets.split(",")]
    variants = [v.strip() for v in args.variants.split(",")]
    points = sweep(cfg, budgets, variants, args.out, address=args.address)
    print(json.dumps(points, indent=2, default=float))


def _cmd_optembed(args: argparse.Namespace) -> None:
    from pipelines import optembed

    cfg = load_config(args.config, args.overrides)
    step = getattr(optembed, args.command)
    print(json.dumps(step(cfg, address=args.address), indent=2, default=str))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from pipelines.evaluate import evaluate

    report = evaluate(
        args.checkpoint, args.data, workers=args.workers, report_dir=args.out, newest=args.newest
    )
    print(json.dumps(report, indent=2, default=float))


def _cmd_export(args: argparse.Namespace) -> None:
    from pipelines.export.writer import export

    result = export(
        args.checkpoint, args.out, dtype=args.dtype, since=args.since, newest=args.newest
    )
    print(json.dumps(result, indent=2))


def _cmd_predict(args: argparse.Namespace) -> None:
    import pyarrow.parquet as pq

    from recsys.logs import parquet_files
    from recsys.metrics import evaluate_predictions
    from recsys.serving.model import ServingModel

    model = ServingModel(args.export)
    if args.with_metrics:  # known from the schemas: refused before any row is scored
        label = model.features.label
        for file in parquet_files(args.data):
            if label not in pq.read_schema(file).names:
                raise ConfigError(f"--with-metrics: {file} has no label column {label!r}")
    scored = model.predict(args.data)
    probs = scored.column("prob").to_numpy()
    summary: dict = {"rows": len(probs), "mean_prediction": float(probs.mean())}
    if args.out:
        pq.write_table(scored, args.out)
        summary["out"] = args.out
    if args.with_metrics:
        groups = scored.column("group").to_numpy() if "group" in scored.column_names else None
        summary.update(evaluate_predictions(scored.column("label").to_numpy(), probs, groups))
    print(json.dumps(summary, indent=2, default=float))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help="experiment YAML, e.g. conf/criteo_synth.yaml")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.workers=2")

    def with_checkpoint(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--checkpoint",
            required=True,
            help="run directory (its best checkpoint by train.monitor) or one checkpoint_* in it",
        )
        p.add_argument(
            "--newest",
            action="store_true",
            help="a run directory's newest checkpoint, not its best",
        )

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

    p = sub.add_parser("stats", help="print statistics of a Parquet log")
    with_config(p)
    p.add_argument("--data", help="Parquet file or directory (default: data.train)")
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser("validate", help="check a Parquet log against the config's contract")
    with_config(p)
    p.add_argument("--data", help="Parquet file or directory (default: data.train)")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("train", help="train an experiment on Ray (embedded local Ray by default)")
    with_config(p)
    p.add_argument(
        "--address",
        help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="train a finished run further (an unfinished one resumes without it)",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "sweep", help="train table variants at parameter budgets; AUC/logloss frontier plot"
    )
    with_config(p)
    p.add_argument(
        "--budgets",
        default="0.01,0.05,0.25",
        help="fractions of the full per-feature tables' parameters (default 0.01,0.05,0.25)",
    )
    p.add_argument(
        "--variants",
        default="hash,multiplexed,qr,full",
        help="table variants to train (default hash,multiplexed,qr,full; full trains once)",
    )
    p.add_argument("--out", required=True, help="directory for runs, frontier.csv, frontier.png")
    p.add_argument("--address", help="Ray cluster address (default: as for train)")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser(
        "search", help="optembed: evolutionary search of per-feature dims on the trained supernet"
    )
    with_config(p)
    p.add_argument("--address", help="Ray cluster address (default: as for train)")
    p.set_defaults(func=_cmd_optembed)

    p = sub.add_parser(
        "retrain", help="optembed: train <name>-retrain with the searched dims and row masks"
    )
    with_config(p)
    p.add_argument("--address", help="Ray cluster address (default: as for train)")
    p.set_defaults(func=_cmd_optembed)

    p = sub.add_parser("evaluate", help="AUC, GAUC, logloss, NE, calibration of a trained run")
    with_checkpoint(p)
    p.add_argument("--data", help="held-out Parquet log (default: the run's data.test)")
    p.add_argument("--workers", type=int, default=1, help="parallel scoring actors")
    p.add_argument("--out", help="report directory (default: eval.report_dir or <run>/eval)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="write tables and the dense model for serving")
    with_checkpoint(p)
    p.add_argument("--out", required=True, help="export directory")
    p.add_argument("--dtype", choices=["float32", "float16", "int8"], help="table storage")
    p.add_argument(
        "--since",
        help="an earlier export: write only collisionless rows trained since, plus deletions",
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("predict", help="score a Parquet log from an export directory alone")
    p.add_argument("--export", required=True, help="directory written by `recsys export`")
    p.add_argument("--data", required=True, help="Parquet log to score")
    p.add_argument("--out", help="write the probabilities to this Parquet file")
    p.add_argument("--with-metrics", action="store_true", help="also print AUC etc. (needs labels)")
    p.set_defaults(func=_cmd_predict)
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
