"""OptEmbed quality on the synthetic Criteo-like log: full tables against the compact table.

    python bench/optembed_quality.py [--rows N] [--quick] [--out DIR]

Generates the log (conf/demo.yaml's generator), then runs the whole pipeline the way a user
does, on the embedded Ray: `recsys train` with full tables (the baseline) and with
`variant: optembed` over the same full storage (the supernet), `recsys search`,
`recsys retrain`, `recsys export` of the baseline and of the retrained run (compact), and
scores a test day (generated after the log's days, never seen by training or search) from
both export directories with the serving loader. Bytes are
the exported tables' embedding bytes (rows x dim x 4); the ID maps (8 bytes per kept ID)
are reported beside them.

Goal (issue 6): the compact table keeps AUC within 0.002 of the full table while cutting
embedding bytes by at least half. Last line: `RESULT optembed_quality ratio=<compact bytes /
full bytes> goal=0.5 met=yes|no auc_full=... auc_compact=... ...`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from pipelines.export.writer import export
from pipelines.optembed import retrain, search
from pipelines.train.driver import train
from recsys.config import ExperimentConfig, load_config
from recsys.metrics import auc
from recsys.serving.model import ServingModel
from recsys.synth import generate

REPO = Path(__file__).resolve().parents[1]
GOAL_BYTES = 0.5
GOAL_AUC = 0.002


def _timed(step: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = step(*args)
    return result, time.perf_counter() - start


def _served_auc(export_dir: Path, data: Path) -> float:
    scored = ServingModel(export_dir).predict(data)
    return auc(scored.column("label").to_numpy(), scored.column("prob").to_numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--quick", action="store_true", help="60k rows, 3 search rounds")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=1e-4, help="optembed.alpha")
    parser.add_argument("--threshold-lr", type=float, default=1e-2, help="optembed.threshold_lr")
    parser.add_argument("--rounds", type=int, default=30, help="search rounds (paper: 30)")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench_optembed_quality")
    args = parser.parse_args()
    rows = 60_000 if args.quick else args.rows
    rounds = 3 if args.quick else args.rounds

    shutil.rmtree(args.out, ignore_errors=True)
    log = args.out / "log"
    common = [f"data.train={log}", f"train.epochs={args.epochs}", "train.workers=1"]
    full_cfg = load_config(
        REPO / "conf" / "demo.yaml", [*common, f"train.run_dir={args.out / 'full'}"]
    )
    # One day more than the config's, moved out of the training log: search picks dims by
    # the validation day's AUC, so only an unseen day scores full and compact tables fairly.
    days = full_cfg.data.synthetic.days + 1  # type: ignore[union-attr]
    generated = generate(
        load_config(REPO / "conf" / "demo.yaml", [f"data.synthetic.days={days}"]),
        rows=rows * days // (days - 1),
        out=log,
    )
    day = sorted(generated["oracle_auc_per_day"])[-1]
    held_out = args.out / "test" / f"day={day}"
    held_out.parent.mkdir(parents=True)
    (log / f"day={day}").rename(held_out)
    cfg: ExperimentConfig = load_config(
        REPO / "conf" / "demo.yaml",
        [
            *common,
            f"train.run_dir={args.out / 'optembed'}",
            "tables.0.variant=optembed",
            "tables.0.storage=full",
            f"optembed.alpha={args.alpha}",
            f"optembed.threshold_lr={args.threshold_lr}",
            f"optembed.search.rounds={rounds}",
        ],
    )
    seconds = {}
    full, seconds["full_train"] = _timed(train, full_cfg)
    supernet, seconds["supernet_train"] = _timed(train, cfg)
    best, seconds["search"] = _timed(search, cfg)
    retrained, seconds["retrain"] = _timed(retrain, cfg)
    full_export = export(full["run_dir"], args.out / "export_full")
    compact_export = export(retrained["run_dir"], args.out / "export_compact")
    auc_full = _served_auc(args.out / "export_full", held_out)
    auc_compact = _served_auc(args.out / "export_compact", held_out)

    ratio = compact_export["bytes"] / full_export["bytes"]
    with_ids = (compact_export["bytes"] + compact_export["id_bytes"]) / (
        full_export["bytes"] + 8 * sum(t["rows"] for t in _manifest(args.out / "export_full"))
    )
    kept = sum(best["kept_rows"].values()) / sum(best["rows"].values())
    report = {
        "rows": rows,
        "test_day": day,
        "oracle_auc": generated["oracle_auc_per_day"][day],
        "auc": {
            "full": auc_full,
            "compact": auc_compact,
            "full_valid": full["metrics"]["valid_auc"],
            "supernet_valid": supernet["metrics"]["valid_auc"],
            "search_best_valid": best["valid_auc"],
            "retrain_valid": retrained["metrics"]["valid_auc"],
        },
        "bytes": {
            "full": full_export["bytes"],
            "compact": compact_export["bytes"],
            "compact_id_map": compact_export["id_bytes"],
            "ratio": ratio,
            "ratio_with_id_maps": with_ids,
        },
        "kept_row_share": kept,
        "sparsity": best["sparsity"],
        "dims": best["dims"],
        "settings": {"alpha": args.alpha, "threshold_lr": args.threshold_lr, "rounds": rounds},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    (args.out / "optembed_quality.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    delta = auc_full - auc_compact
    met = ratio <= GOAL_BYTES and delta <= GOAL_AUC
    print(
        f"RESULT optembed_quality ratio={ratio:.3f} goal={GOAL_BYTES} met={'yes' if met else 'no'} "
        f"auc_full={auc_full:.4f} auc_compact={auc_compact:.4f} auc_loss={delta:.4f} "
        f"auc_goal={GOAL_AUC} ratio_with_id_maps={with_ids:.3f} kept_rows={kept:.3f} "
        f"sparsity={best['sparsity']:.3f} full_mib={full_export['bytes'] / 2**20:.2f} "
        f"compact_mib={compact_export['bytes'] / 2**20:.2f} rows={rows}"
    )


def _manifest(export_dir: Path) -> list[dict[str, Any]]:
    return json.loads((export_dir / "manifest.json").read_text())["tables"]


if __name__ == "__main__":
    main()
