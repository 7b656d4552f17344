"""The learning curve of a run (`<run>/learning_curve.png`): train and validation loss and
AUC against the step, read back from the run's `metrics.jsonl`."""

from __future__ import annotations

import json
from pathlib import Path

CURVE_FILE = "learning_curve.png"


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, the last record of a step winning: a restarted worker
    group logs again the steps it redoes."""
    by_step = {r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float))}
    steps = sorted(by_step)
    return steps, [float(by_step[s]) for s in steps]


def plot_learning_curve(metrics: Path, out: Path) -> Path | None:
    """Write the curve; None when the run logged no step. Agg canvas, no pyplot state (as
    `recsys.metrics.plot_report`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not metrics.exists():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    records = [r for r in records if "step" in r and not r.get("final")]
    if not records:
        return None
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    loss, auc = fig.subplots(1, 2)
    for axis, train_key, valid_key, title in (
        (loss, "loss", "valid_logloss", "logloss"),
        (auc, "running_auc", "valid_auc", "AUC"),
    ):
        axis.plot(*_series(records, train_key), label="train (recent batches)", linewidth=1)
        steps, values = _series(records, valid_key)
        if steps:
            axis.plot(steps, values, marker="o", label="validation")
        axis.set(xlabel="step", title=title)
        axis.legend()
    fig.savefig(out, dpi=100)
    return out
