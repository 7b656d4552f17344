"""Quality on the synthetic long-sequence log: DIN, TWIN, TWIN with projections and DARE,
trained by `recsys train`'s pipeline on the same data for the same steps.

    python bench/sequence_quality.py [--rows N] [--quick] [--log DIR] [--out DIR]

Generates a Taobao-shaped log (conf/taobao_synth.yaml's generator, scaled down: 2,000
users, 50,000 items, 200 categories, histories of 50-200 behaviours, the paper's length)
unless `--log` names one, then trains each model on the embedded Ray with every field 16
wide (DARE: attention and representation tables both 16 wide, as in the paper's Table 1)
and reads each run's held-out AUC and per-user GAUC (the last day). Prints them next to
the paper's Taobao d16 AUCs and the generator's oracle AUC.

Goal (SPECS 4, issue 7): DARE above TWIN and DIN on AUC and GAUC. Last line:
`RESULT sequence_quality ratio=<DARE AUC - TWIN AUC> goal=>0 met=yes|no ...`.
About 15-25 minutes on 2 cores at the default 60,000 rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipelines.build import load_trained
from pipelines.train import train
from recsys.config import load_config
from recsys.synth import generate

REPO = Path(__file__).resolve().parents[1]
SCALE = [
    "data.synthetic.num_users=2000",
    "data.synthetic.num_items=50000",
    "data.synthetic.num_categories=200",
    "data.synthetic.min_history=50",
    "data.synthetic.max_history=200",
]
# Item vocabularies instead of the 1M-row hashed table: rows the small log actually uses.
COUPLED = ["tables.0.variant=full", "tables.0.num_embeddings=null"]
DECOUPLED = ["tables.0.storage=full", "tables.0.num_embeddings=null"]
ARMS = {
    "DIN": ("taobao_synth", ["model.name=din", *COUPLED]),
    "TWIN": ("taobao_synth", ["model.name=twin", *COUPLED]),
    "TWIN w/ proj": ("taobao_synth", ["model.name=twin_proj", *COUPLED]),
    "DARE": ("taobao_dare", DECOUPLED),
}
PAPER_TAOBAO_D16 = {"DIN": 0.90442, "TWIN": 0.91688, "TWIN w/ proj": 0.89642, "DARE": 0.92568}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--quick", action="store_true", help="12,000 rows")
    parser.add_argument("--log", type=Path, help="an existing log generated with SCALE")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench_sequence_quality")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dense-lr", type=float, default=0.003)
    args = parser.parse_args()
    rows = 12_000 if args.quick else args.rows

    log = args.log or args.out / "log"
    common = [
        *SCALE,
        f"data.train={log}",
        f"train.batch_size={args.batch_size}",
        f"train.dense_lr={args.dense_lr}",
        "train.workers=1",
        "train.log_every=50",
    ]
    oracle = None
    if args.log is None:
        cfg = load_config(REPO / "conf" / "taobao_synth.yaml", common)
        generated = generate(cfg, rows=rows, out=log)
        oracle = generated["oracle_auc_per_day"][sorted(generated["oracle_auc_per_day"])[-1]]

    results = {}
    for arm, (conf, overrides) in ARMS.items():
        run_dir = args.out / "runs" / arm.replace(" ", "_").replace("/", "")
        cfg = load_config(
            REPO / "conf" / f"{conf}.yaml", [*common, *overrides, f"train.run_dir={run_dir}"]
        )
        start = time.perf_counter()
        result = train(cfg)
        metrics = result["metrics"]
        specs = load_trained(result["run_dir"])[1].sequence.specs
        results[arm] = {
            "table_bytes": sum(s.bytes for s in specs),
            "auc": metrics["valid_auc"],
            "gauc": metrics["valid_gauc"],
            "logloss": metrics["valid_logloss"],
            "steps": metrics["step"],
            "examples_per_s": metrics["examples_per_s"],
            "seconds": time.perf_counter() - start,
        }
        print(f"{arm}: {json.dumps(results[arm])}", flush=True)

    print(f"\nheld-out day, {rows} rows; oracle AUC {oracle if oracle else 'n/a'}")
    print(
        "| model | AUC | GAUC (per user) | logloss | steps | examples/s | table MB "
        "| paper Taobao d16 AUC |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for arm, r in results.items():
        print(
            f"| {arm} | {r['auc']:.4f} | {r['gauc']:.4f} | {r['logloss']:.4f} | {r['steps']} "
            f"| {r['examples_per_s']:.0f} | {r['table_bytes'] / 1e6:.1f} "
            f"| {PAPER_TAOBAO_D16[arm]} |"
        )
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    gap = results["DARE"]["auc"] - results["TWIN"]["auc"]
    met = all(results["DARE"][k] > results[m][k] for k in ("auc", "gauc") for m in ("TWIN", "DIN"))
    print(
        f"RESULT sequence_quality ratio={gap:.4f} goal=>0 met={'yes' if met else 'no'} "
        + " ".join(
            f"{arm.replace(' ', '_').replace('/', '')}_auc={r['auc']:.4f}"
            f" {arm.replace(' ', '_').replace('/', '')}_gauc={r['gauc']:.4f}"
            for arm, r in results.items()
        )
    )


if __name__ == "__main__":
    main()
