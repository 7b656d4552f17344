"""The `recsys` console script, at the top of the import order (it drives every pipeline).

Heavy modules are imported inside each command, so that `recsys --help` and `gen-data` do
not pay for torch, torchrec and Ray."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipelines.console import chatter_to, report, run_folder, run_log, set_verbosity
from pipelines.convert_cli import add_convert_commands
from recsys.config import ConfigError, load_config


def _show(args: argparse.Namespace, title: str, result: dict) -> None:
    """A command's result: tables for people, JSON with --json."""
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(report(title, result))


def _cmd_gen_data(args: argparse.Namespace) -> None:
    from recsys.synth import generate

    cfg = load_config(args.config, args.overrides)
    summary = generate(cfg, rows=args.rows, out=Path(args.out))
    _show(args, f"gen-data: {args.out}", summary)


def _cmd_stats(args: argparse.Namespace) -> None:
    from recsys.stats import log_statistics

    cfg = load_config(args.config, args.overrides)
    data = args.data or cfg.data.train
    if data is None:
        raise ConfigError(f"{args.config}: no data given (--data or data.train)")
    _show(args, f"stats: {data}", log_statistics(cfg, data))


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
    result = {
        "data": str(data),
        "valid_rows": rows,
        "skipped": skipped.as_dict(),
        "columns_not_read": _columns_not_read(data, cfg.features.column_names()),
    }
    _show(args, f"validate: {data}", result)


def _columns_not_read(data: str | Path, read: list[str]) -> dict[str, int]:
    """Columns of the log that no feature names, with the number of files holding each:
    ignored by every reader, and worth a look in case one is a misspelt feature."""
    import pyarrow.parquet as pq

    from recsys.logs import parquet_files

    counts: dict[str, int] = {}
    for file in parquet_files(data):
        for name in pq.read_schema(file).names:
            if name not in read:
                counts[name] = counts.get(name, 0) + 1
    return counts


def _cmd_train(args: argparse.Namespace) -> None:
    from pipelines.train.driver import train
    from pipelines.train.summary import train_table

    cfg = load_config(args.config, args.overrides)
    if args.follow:
        from pipelines.train.follow import event_time, follow

        until = None if args.until is None else event_time(args.until)
        result = follow(cfg, args.follow, args.address, args.resume, args.max_partitions, until)
        _show(args, f"train --follow {args.follow}", result)
        return
    summary = train(cfg, address=args.address, resume=args.resume)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(train_table(summary))


def _cmd_sweep(args: argparse.Namespace) -> None:
    from pipelines.sweep import sweep

    cfg = load_config(args.config, args.overrides)
    budgets = [float(b) for b in args.budgets.split(",")]
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    rows = sweep(
        cfg, budgets, variants, args.out, args.address, seeds=seeds, min_count=args.min_count
    )
    _show(args, f"sweep: {args.out}", {"frontier": rows})


def _cmd_optembed(args: argparse.Namespace) -> None:
    from pipelines import optembed

    cfg = load_config(args.config, args.overrides)
    step = getattr(optembed, args.command)
    _show(args, f"{args.command}: {cfg.name}", step(cfg, address=args.address))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from pipelines.evaluate import evaluate

    chatter_to(run_log(args.checkpoint, "evaluate"))
    result = evaluate(
        args.checkpoint, args.data, workers=args.workers, report_dir=args.out, newest=args.newest
    )
    _show(args, f"evaluate: {result['data']} (step {result['step']})", result)


def _cmd_export(args: argparse.Namespace) -> None:
    from pipelines.export.writer import export

    chatter_to(run_log(args.checkpoint, "export"))
    out = args.out or _run_config(args.checkpoint).export.out
    if out is None:
        raise ConfigError("export: give --out DIR, or set export.out in the experiment's config")
    result = export(args.checkpoint, out, dtype=args.dtype, since=args.since, newest=args.newest)
    _show(args, f"export: {out}", result)


def _run_config(checkpoint: str) -> Any:
    """The config a run (or one of its checkpoints) was trained with."""
    run = run_folder(checkpoint)
    if not (run / "config.yaml").exists():
        raise FileNotFoundError(f"{checkpoint}: no run here (it has no config.yaml)")
    return load_config(run / "config.yaml")


def _cmd_predict(args: argparse.Namespace) -> None:
    import pyarrow.parquet as pq

    from recsys.logs import parquet_files
    from recsys.metrics import evaluate_predictions
    from recsys.serving.model import ServingModel

    # library chatter (torch.export's loader) beside the output: there is no run folder here
    chatter_to(Path(args.out).with_suffix(".log") if args.out else None)
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
    _show(args, f"predict: {args.data}", summary)


def _cmd_report(args: argparse.Namespace) -> None:
    from pipelines.report import write_report

    chatter_to(run_log(args.run, "report"))
    _show(args, f"report: {args.run}", {"page": str(write_report(args.run, args.out))})


def _cmd_serve(args: argparse.Namespace) -> None:
    from pipelines.serve.run import serve_command

    serve_command(args)


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

    add_convert_commands(sub, _show)

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
    online = p.add_argument_group("online training")
    online.add_argument(
        "--follow",
        metavar="DIR",
        help="train on DIR's Parquet partitions as they appear, in event-time order, "
        "exporting every train.follow.export_every_s for `recsys serve --follow` "
        "(stop with Ctrl-C or SIGTERM: the partition in training finishes first)",
    )
    online.add_argument(
        "--max-partitions", type=int, metavar="N", help="--follow: stop after N partitions"
    )
    online.add_argument(
        "--until",
        metavar="TIME",
        help="--follow: stop after a partition whose events reach TIME "
        "(seconds since the epoch or an ISO date, UTC)",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "sweep",
        help="train table variants at parameter budgets and seeds; AUC/logloss frontier plot",
    )
    with_config(p)
    p.add_argument(
        "--budgets",
        default="0.01,0.05,0.25",
        help="fractions of the full per-feature tables' parameters (default 0.01,0.05,0.25)",
    )
    p.add_argument(
        "--variants",
        help="table variants to train (default all: full,hash,multiplexed,qr,collisionless,"
        "collisionless_filtered,optembed; those a budget does not size train once per seed)",
    )
    p.add_argument(
        "--seeds", help="comma-separated train.seed values, one run each (default: the config's)"
    )
    p.add_argument(
        "--min-count",
        type=int,
        default=2,
        help="collisionless_filtered's frequency filter, sightings before an ID gets a row "
        "(default 2)",
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
    p.add_argument("--out", help="export directory (default: the config's export.out)")
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

    p = sub.add_parser("report", help="one self-contained HTML page of a run, readable offline")
    p.add_argument("run", help="run directory (train.run_dir/name)")
    p.add_argument("--out", help="HTML file to write (default: <run>/report.html)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "serve",
        help="score HTTP requests from an export on Ray Serve, following new exports live",
        description="POST /predict: JSON rows, an Arrow IPC stream or Parquet; GET /version. "
        "--follow swaps in each newer export (by training step; full, or a delta made with "
        "--since) as it appears. Starts an embedded Ray and serves until Ctrl-C; with "
        "--address (or RAY_ADDRESS) it deploys to that cluster and returns, the app staying up.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--export", metavar="DIR", help="serve this export directory")
    source.add_argument(
        "--follow", metavar="DIR", help="serve the newest export among DIR's subfolders"
    )
    for flag, kind, default, what in (
        ("--replicas", int, 1, "Serve replicas, one CPU each"),
        ("--host", str, "127.0.0.1", "HTTP host"),
        ("--port", int, 8000, "HTTP port"),
        ("--max-batch-size", int, 32, "requests per server-side batch"),
        ("--batch-wait-ms", float, 5.0, "how long a batch waits to fill"),
        ("--poll-s", float, 5.0, "seconds between looks at the --follow folder"),
    ):
        p.add_argument(flag, type=kind, default=default, help=f"{what} (default {default})")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else local)")
    p.set_defaults(func=_cmd_serve)

    for command in _leaves(sub):
        output = command.add_argument_group("output")
        output.add_argument("--json", action="store_true", help="print the result as JSON")
        loudness = output.add_mutually_exclusive_group()
        loudness.add_argument(
            "--verbose", action="store_true", help="libraries' output on the console too"
        )
        loudness.add_argument("--quiet", action="store_true", help="only errors and the result")
    return parser


def _leaves(sub: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    """Every command's parser (`convert`'s formats included)."""
    found = []
    for parser in dict.fromkeys(sub.choices.values()):
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        found += _leaves(nested[0]) if nested else [parser]
    return found


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    set_verbosity("verbose" if args.verbose else "quiet" if args.quiet else "normal")
    try:
        args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"recsys {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
