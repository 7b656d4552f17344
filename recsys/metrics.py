"""Offline CTR metrics (`recsys evaluate`): AUC, GAUC, logloss, NE, calibration, plots.

Everything is a sort plus segment sums over numpy arrays, so scoring a held-out day of
hundreds of millions of impressions costs a few array passes and no per-row or per-user
Python. AUC is computed from tie blocks (runs of equal scores) with the Mann-Whitney
statistic, where a tied positive/negative pair counts one half; that equals average ranks
for ties and matches scikit-learn's `roc_auc_score` exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

EPS = 1e-7  # probability clipping for logloss, so one confident mistake costs ~16, not inf


class GaucResult(NamedTuple):
    """GAUC and how many groups (users) it averaged over or skipped for having one class."""

    value: float  # NaN when no group has both classes
    groups_used: int
    groups_skipped: int


def _labels(labels: ArrayLike) -> NDArray[np.float64]:
    y = np.asarray(labels, dtype=np.float64).ravel()
    if y.size == 0:
        raise ValueError("no rows to evaluate")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return y


def _scores(scores: ArrayLike, rows: int, name: str = "scores") -> NDArray[np.float64]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size != rows:
        raise ValueError(f"{name} has {s.size} rows, labels have {rows}")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return s


def _both_classes(y: NDArray[np.float64], what: str) -> None:
    positives = y.sum()
    if positives == 0 or positives == y.size:
        raise ValueError(f"{what} is undefined: all {y.size} labels are {int(y[0])}")


def _block_terms(
    y: NDArray[np.float64], new_block: NDArray[np.bool_], new_group: NDArray[np.bool_]
) -> tuple[NDArray[np.intp], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Mann-Whitney terms over rows sorted by (group, score).

    `new_block` marks the first row of each run of equal (group, score), `new_group` the
    first row of each group (a subset). Returns, per tie block, its group index, positives,
    negatives and U contribution: positives x (negatives below it in its group + half the
    negatives tied with it).
    """
    starts = np.flatnonzero(new_block)
    pos = np.add.reduceat(y, starts)
    neg = np.diff(np.append(starts, y.size)) - pos
    group_of_block = np.cumsum(new_group)[starts] - 1
    negatives_before = np.cumsum(neg) - neg
    # Negatives of earlier groups, subtracted so the count restarts at each group.
    group_offset = negatives_before[np.flatnonzero(new_group[starts])]
    below = negatives_before - group_offset[group_of_block]
    return group_of_block, pos, neg, pos * (below + 0.5 * neg)


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve, ties counted one half (equals sklearn's roc_auc_score)."""
    y = _labels(labels)
    s = _scores(scores, y.size)
    _both_classes(y, "AUC")
    order = np.argsort(s, kind="stable")
    y, s = y[order], s[order]
    new_block = np.empty(y.size, dtype=bool)
    new_block[0] = True
    np.not_equal(s[1:], s[:-1], out=new_block[1:])
    new_group = np.zeros(y.size, dtype=bool)
    new_group[0] = True
    _, pos, neg, u = _block_terms(y, new_block, new_group)
    return float(u.sum() / (pos.sum() * neg.sum()))


def gauc(labels: ArrayLike, scores: ArrayLike, groups: ArrayLike) -> GaucResult:
    """Group AUC: per-group AUC averaged with weights = the group's impressions.

    Groups (users) with only clicks or only non-clicks have no AUC; they are skipped and
    counted rather than failing, since such users are common in real logs; a log with one
    class overall still raises, as it does for AUC. One lexsort by (group, score) and
    segment sums give every group's AUC at once.
    """
    y = _labels(labels)
    s = _scores(scores, y.size)
    _both_classes(y, "GAUC")
    g = np.asarray(groups).ravel()
    if g.size != y.size:
        raise ValueError(f"groups has {g.size} rows, labels have {y.size}")
    order = np.lexsort((s, g))
    y, s, g = y[order], s[order], g[order]
    new_group = np.empty(y.size, dtype=bool)
    new_group[0] = True
    np.not_equal(g[1:], g[:-1], out=new_group[1:])
    new_block = new_group.copy()
    new_block[1:] |= s[1:] != s[:-1]
    group_of_block, pos, neg, u = _block_terms(y, new_block, new_group)
    num_groups = int(new_group.sum())
    pos_g = np.bincount(group_of_block, weights=pos, minlength=num_groups)
    neg_g = np.bincount(group_of_block, weights=neg, minlength=num_groups)
    u_g = np.bincount(group_of_block, weights=u, minlength=num_groups)
    used = (pos_g > 0) & (neg_g > 0)
    num_used = int(used.sum())
    if num_used == 0:
        return GaucResult(math.nan, 0, num_groups)
    impressions = pos_g[used] + neg_g[used]
    per_group = u_g[used] / (pos_g[used] * neg_g[used])
    value = float((per_group * impressions).sum() / impressions.sum())
    return GaucResult(value, num_used, num_groups - num_used)


def logloss(labels: ArrayLike, probs: ArrayLike) -> float:
    """Mean binary cross-entropy, probabilities clipped to [EPS, 1 - EPS]."""
    y = _labels(labels)
    p = np.clip(_scores(probs, y.size, "probs"), EPS, 1.0 - EPS)
    return float(-(y * np.log(p) + (1.0 - y) * np.log1p(-p)).mean())


def ctr(labels: ArrayLike) -> float:
    """The click-through rate: the mean label."""
    return float(_labels(labels).mean())


def normalized_entropy(labels: ArrayLike, probs: ArrayLike) -> float:
    """Logloss divided by the entropy of the base rate (He et al. 2014).

    Below 1 means better than always predicting the observed CTR; unlike raw logloss it is
    comparable across days and datasets with different click rates.
    """
    y = _labels(labels)
    _both_classes(y, "normalized entropy")
    base = y.mean()
    entropy = -(base * math.log(base) + (1.0 - base) * math.log(1.0 - base))
    return float(logloss(y, probs) / entropy)


def calibration(labels: ArrayLike, probs: ArrayLike) -> float:
    """Mean prediction / mean label: 1 when the model predicts as many clicks as happened."""
    y = _labels(labels)
    p = _scores(probs, y.size, "probs")
    if y.sum() == 0:
        raise ValueError("calibration is undefined: no positive labels")
    return float(p.mean() / y.mean())


def evaluate_predictions(
    labels: ArrayLike, probs: ArrayLike, groups: ArrayLike | None = None
) -> dict[str, Any]:
    """All metrics of a scored log as a JSON-ready dict (GAUC only when groups are given).

    A GAUC without any usable group is reported as None (JSON null) next to its counts.
    """
    y = _labels(labels)
    p = _scores(probs, y.size, "probs")
    report: dict[str, Any] = {
        "rows": int(y.size),
        "positives": int(y.sum()),
        "ctr": float(y.mean()),
        "auc": auc(y, p),
        "logloss": logloss(y, p),
        "normalized_entropy": normalized_entropy(y, p),
        "calibration": calibration(y, p),
    }
    if groups is not None:
        result = gauc(y, p, groups)
        report["gauc"] = None if math.isnan(result.value) else result.value
        report["gauc_groups_used"] = result.groups_used
        report["gauc_groups_skipped"] = result.groups_skipped
    return report


def roc_curve_points(
    labels: ArrayLike, scores: ArrayLike, max_points: int = 1000
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(false positive rates, true positive rates) from (0, 0) to (1, 1), for plotting.

    One point per distinct score threshold, thinned evenly to at most `max_points` (the
    ends are always kept), so a plot of a billion rows stays a small file.
    """
    y = _labels(labels)
    s = _scores(scores, y.size)
    _both_classes(y, "the ROC curve")
    if max_points < 2:
        raise ValueError("max_points must be at least 2")
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    last_of_threshold = np.append(np.flatnonzero(s[1:] != s[:-1]), y.size - 1)
    tps = np.cumsum(y)[last_of_threshold]
    fps = last_of_threshold + 1 - tps
    tpr = np.concatenate([[0.0], tps / tps[-1]])
    fpr = np.concatenate([[0.0], fps / fps[-1]])
    if tpr.size > max_points:
        keep = np.unique(np.linspace(0, tpr.size - 1, max_points).round().astype(np.intp))
        tpr, fpr = tpr[keep], fpr[keep]
    return fpr, tpr


def calibration_bins(
    labels: ArrayLike, probs: ArrayLike, bins: int = 20
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(mean prediction, mean label) per equal-frequency bin of predictions.

    Equal-frequency rather than equal-width bins: CTR predictions crowd near the base rate,
    and fixed-width bins would leave most bins empty and one bin holding nearly all rows.
    """
    y = _labels(labels)
    p = _scores(probs, y.size, "probs")
    if bins < 1:
        raise ValueError("bins must be at least 1")
    order = np.argsort(p, kind="stable")
    y, p = y[order], p[order]
    starts = np.unique(np.linspace(0, y.size, bins + 1)[:-1].astype(np.intp))
    sizes = np.diff(np.append(starts, y.size))
    return np.add.reduceat(p, starts) / sizes, np.add.reduceat(y, starts) / sizes


def plot_report(
    metrics: dict[str, Any], labels: ArrayLike, probs: ArrayLike, path: str | Path
) -> Path:
    """Write a PNG with the ROC curve and the calibration plot side by side.

    Uses matplotlib's object API with the Agg canvas: no pyplot global state and no
    display, so it runs inside Ray workers and headless CI alike. Imported lazily to keep
    matplotlib out of training processes that only need the numbers.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(11, 5), layout="constrained")
    FigureCanvasAgg(fig)
    roc, cal = fig.subplots(1, 2)

    fpr, tpr = roc_curve_points(labels, probs)
    roc.plot(fpr, tpr, label=f"AUC {metrics['auc']:.4f}")
    roc.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    roc.legend(loc="lower right")

    mean_pred, mean_label = calibration_bins(labels, probs)
    top = max(float(mean_pred.max()), float(mean_label.max()))
    cal.plot([0, top], [0, top], linestyle="--", color="grey", linewidth=1)
    cal.plot(mean_pred, mean_label, marker="o")
    cal.set(
        xlabel="mean prediction",
        ylabel="observed click rate",
        title=(f"calibration {metrics['calibration']:.3f}, NE {metrics['normalized_entropy']:.4f}"),
    )

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
