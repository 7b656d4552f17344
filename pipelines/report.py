"""`recsys report RUN`: one HTML page that shows a run, readable offline.

A run folder holds its story in pieces: `config.yaml`, `metrics.jsonl` (interval lines,
validations, table counters), `result.json`, `learning_curve.png`, and one folder per
evaluation (`report.json`, `report.png` with ROC and calibration). The page puts them side
by side: the result, the learning curve with every validation, the newest evaluation, what
each table holds in memory and the collisionless counters, the config, and every other PNG
in the folder. Images are embedded as base64, so the page is one file that opens anywhere.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path
from typing import Any

from pipelines.train.curve import CURVE_FILE
from pipelines.train.meter import METRICS_FILE
from recsys.config import load_config

REPORT_FILE = "report.html"

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .5em 0; }
td, th { padding: .15em .8em; border-bottom: 1px solid #eee; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: 1em; overflow: auto; }
figure { margin: 1em 0; } img { max-width: 100%; }
figcaption { color: #666; font-size: .9em; }
"""


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Assemble the page for `run` (a run folder) into `out` (default `<run>/report.html`)."""
    run = Path(run)
    if not (run / "config.yaml").exists():
        raise FileNotFoundError(f"{run}: no run here (it has no config.yaml)")
    out = Path(out) if out else run / REPORT_FILE
    records = _records(run / METRICS_FILE)
    result = _json(run / "result.json")
    evaluation = _newest_evaluation(run)
    shown: set[Path] = set()
    body = [
        f"<h1>recsys run {_e(run.name)}</h1>",
        f"<p>{_e(run.resolve())}; page written "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}</p>",
        "<h2>Result</h2>",
        _result(result) if result else "<p>No result.json: the run has not finished.</p>",
        "<h2>Learning curve</h2>",
        _figure(run, run / CURVE_FILE, shown),
        _validations(records),
        "<h2>Evaluation</h2>",
        _evaluation(run, evaluation, shown),
        "<h2>Tables</h2>",
        _tables(run),
        _counters(records),
        "<h2>Config</h2>",
        f"<pre>{_e((run / 'config.yaml').read_text())}</pre>",
    ]
    others = [p for p in sorted(run.rglob("*.png")) if p not in shown]
    if others:
        body += ["<h2>Other plots</h2>", *(_figure(run, p, shown) for p in others)]
    page = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>recsys run {_e(run.name)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out


def _e(value: Any) -> str:
    return html.escape(str(value))


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _newest_evaluation(run: Path) -> Path | None:
    """The folder of the run's latest `recsys evaluate` (by its report's time)."""
    reports = sorted(run.glob("eval/*/report.json"), key=lambda p: p.stat().st_mtime)
    return reports[-1].parent if reports else None


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if value is None:
        return "<td></td>"
    if isinstance(value, float):
        text = f"{value:.4f}" if abs(value) < 1e4 else f"{value:,.0f}"
        return f'<td class="n">{text}</td>'
    if isinstance(value, int):
        return f'<td class="n">{value:,}</td>'
    if isinstance(value, dict):
        return f"<td>{_e(', '.join(f'{k} {v}' for k, v in value.items()) or 'none')}</td>"
    return f"<td>{_e(value)}</td>"


def _pairs(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{_e(k)}</th>{_cell(v)}</tr>" for k, v in rows if v is not None)
    return f"<table>{cells}</table>"


def _grid(records: list[dict[str, Any]], keys: list[str], first: str) -> str:
    head = "".join(f"<th>{_e(k)}</th>" for k in [first, *keys])
    body = "".join(
        "<tr>" + "".join(_cell(r.get(k)) for k in [first, *keys]) + "</tr>" for r in records
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(run: Path, png: Path, shown: set[Path]) -> str:
    """`png` embedded as base64, captioned with its path in the run folder."""
    if not png.exists():
        return f"<p>No {_e(png.relative_to(run))}.</p>"
    shown.add(png)
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    name = _e(png.relative_to(run))
    return (
        f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
        f"<figcaption>{name}</figcaption></figure>"
    )


def _result(result: dict[str, Any]) -> str:
    metrics = result.get("metrics", {})
    rows = [
        ("steps", metrics.get("step")),
        ("epochs completed", metrics.get("epoch")),
        ("training rows per epoch", metrics.get("train_rows")),
        ("rows unread per epoch", metrics.get("rows_unread_per_epoch")),
        ("rows skipped (bad)", result.get("skipped_rows")),
        ("best step", metrics.get("best_step")),
        *((k, v) for k, v in metrics.items() if k.startswith("valid_")),
        ("stopped early", metrics.get("stopped_early")),
        ("seconds", round(result.get("seconds", 0.0), 1)),
        ("peak memory of the process tree (MiB)", _mib(result.get("peak_tree_rss_bytes"))),
        ("best checkpoint", result.get("checkpoint")),
    ]
    return _pairs(rows)


def _mib(n: int | None) -> int | None:
    return None if n is None else round(n / 2**20)


def _validations(records: list[dict[str, Any]]) -> str:
    validations = [r for r in records if "valid_auc" in r and not r.get("final")]
    if not validations:
        return "<p>No validation ran.</p>"
    keys = ["valid_auc", "valid_logloss", "valid_gauc", "valid_calibration", "best", "lr_scale"]
    return _grid(validations, [k for k in keys if any(k in r for r in validations)], "step")


def _evaluation(run: Path, folder: Path | None, shown: set[Path]) -> str:
    if folder is None:
        return f"<p>Not evaluated yet: <code>recsys evaluate --checkpoint {_e(run)}</code>.</p>"
    report = json.loads((folder / "report.json").read_text())
    return "\n".join(
        [
            f"<p>{_e(folder.relative_to(run))}: newest of "
            f"{len(list(run.glob('eval/*/report.json')))} evaluation(s).</p>",
            _pairs(list(report.items())),
            _figure(run, folder / "report.png", shown),
        ]
    )


def _tables(run: Path) -> str:
    """Bytes of each table's rows and optimizer state, from the config and vocabularies
    (tables built on the meta device, so nothing is allocated)."""
    from pipelines.build import planned_table_bytes

    cfg = load_config(run / "config.yaml")
    sizes = planned_table_bytes(cfg, run)
    rows = [{"table": name, "bytes": n} for name, n in sorted(sizes.items())]
    rows.append({"table": "total", "bytes": sum(sizes.values())})
    note = (
        f"<p>Rows and {_e(cfg.train.sparse_optimizer)} state, float32, over all workers "
        "(as the planner is told).</p>"
    )
    return note + _grid(rows, ["bytes"], "table")


def _counters(records: list[dict[str, Any]]) -> str:
    """The collisionless tables' last counters, as training logged them."""
    logged = [r["tables"] for r in records if r.get("tables")]
    if not logged:
        return ""
    last = logged[-1]
    keys = list(dict.fromkeys(k for values in last.values() for k in values))
    rows = [{"table": name, **values} for name, values in last.items()]
    return "<h3>Collisionless tables (last logged interval)</h3>" + _grid(rows, keys, "table")
