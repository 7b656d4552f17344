"""Offline metrics against scikit-learn and slow per-group references, ties included."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score, roc_curve

from recsys.metrics import (
    EPS,
    auc,
    calibration,
    calibration_bins,
    ctr,
    evaluate_predictions,
    gauc,
    logloss,
    normalized_entropy,
    plot_report,
    roc_curve_points,
)

ROWS = 100_000


@pytest.fixture
def scored() -> tuple[np.ndarray, np.ndarray]:
    """Labels correlated with probabilities rounded to 2 decimals, so ties are everywhere."""
    rng = np.random.default_rng(0)
    probs = np.round(rng.beta(2, 5, ROWS), 2)
    labels = (rng.random(ROWS) < probs).astype(np.int64)
    return labels, probs


@pytest.mark.parametrize("decimals", [1, 2, 6])
def test_auc_equals_sklearn_with_ties(scored: tuple[np.ndarray, np.ndarray], decimals: int):
    labels, probs = scored
    scores = np.round(probs + np.random.default_rng(1).normal(0, 0.05, ROWS), decimals)
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_of_all_tied_scores_is_one_half():
    assert auc([0, 1, 0, 1, 1], [0.3] * 5) == 0.5


def _slow_gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    total, weight, skipped = 0.0, 0, 0
    for group in np.unique(groups):
        mask = groups == group
        if len(np.unique(labels[mask])) < 2:
            skipped += 1
            continue
        total += roc_auc_score(labels[mask], scores[mask]) * mask.sum()
        weight += mask.sum()
    return total / weight, skipped


def test_gauc_equals_per_group_sklearn_loop(scored: tuple[np.ndarray, np.ndarray]):
    labels, probs = scored
    rows = 20_000
    labels, probs = labels[:rows], probs[:rows]
    # Zipf-sized groups: a few heavy users and many with one or two impressions (one class).
    groups = np.random.default_rng(2).zipf(1.5, rows) % 1_000
    expected, skipped = _slow_gauc(labels, probs, groups)
    result = gauc(labels, probs, groups)
    assert result.value == pytest.approx(expected, abs=1e-12)
    assert result.groups_skipped == skipped > 0
    assert result.groups_used + result.groups_skipped == len(np.unique(groups))


def test_gauc_accepts_string_groups_and_skips_single_class_groups():
    labels = np.array([1, 0, 1, 1, 0, 0, 1])
    scores = np.array([0.9, 0.1, 0.4, 0.5, 0.2, 0.7, 0.3])
    groups = np.array(["a", "a", "b", "b", "c", "c", "c"])
    result = gauc(labels, scores, groups)
    # a: AUC 1 over 2 rows; b: one class, skipped; c: AUC 0.5 over 3 rows.
    assert result.value == pytest.approx((1.0 * 2 + 0.5 * 3) / 5)
    assert (result.groups_used, result.groups_skipped) == (2, 1)


def test_gauc_without_any_two_class_group_is_nan_and_counted():
    result = gauc([1, 0], [0.2, 0.4], [7, 8])
    assert math.isnan(result.value)
    assert (result.groups_used, result.groups_skipped) == (0, 2)
    assert evaluate_predictions([1, 0], [0.2, 0.4], [7, 8])["gauc"] is None


@pytest.mark.parametrize(
    "metric",
    [
        lambda y, p: auc(y, p),
        lambda y, p: gauc(y, p, np.arange(len(y)) % 2),
        normalized_entropy,
        calibration,
        evaluate_predictions,
    ],
    ids=["auc", "gauc", "normalized_entropy", "calibration", "evaluate"],
)
def test_single_class_overall_raises(metric):
    with pytest.raises(ValueError, match="undefined"):
        metric(np.zeros(4), np.full(4, 0.2))


def test_bad_inputs_raise_clearly():
    with pytest.raises(ValueError, match="0 or 1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="rows"):
        logloss([0, 1], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        auc([0, 1], [0.1, math.nan])


def test_logloss_equals_sklearn(scored: tuple[np.ndarray, np.ndarray]):
    labels, probs = scored
    probs = np.clip(probs, 0.01, 0.99)
    assert logloss(labels, probs) == pytest.approx(log_loss(labels, probs), rel=1e-12)


def test_logloss_clips_certain_mistakes():
    # One certain miss and one certain hit, each clipped EPS away from 0 or 1.
    expected = -(math.log(EPS) + math.log1p(-EPS)) / 2
    assert logloss([1, 1], [0.0, 1.0]) == pytest.approx(expected, rel=1e-9)


def test_normalized_entropy_is_one_for_the_base_rate_and_lower_for_a_useful_model(
    scored: tuple[np.ndarray, np.ndarray],
):
    labels, probs = scored
    base = labels.mean()
    entropy = -(base * math.log(base) + (1 - base) * math.log(1 - base))
    assert normalized_entropy(labels, np.full(ROWS, base)) == pytest.approx(1.0)
    ne = normalized_entropy(labels, np.clip(probs, 0.01, 0.99))
    assert ne == pytest.approx(log_loss(labels, np.clip(probs, 0.01, 0.99)) / entropy)
    assert ne < 1.0


def test_calibration_and_ctr():
    labels, probs = [1, 0, 0, 0], [0.5, 0.5, 0.25, 0.25]
    assert ctr(labels) == 0.25
    assert calibration(labels, probs) == pytest.approx(1.5)


def test_evaluate_predictions_reports_everything(scored: tuple[np.ndarray, np.ndarray]):
    labels, probs = scored
    probs = np.clip(probs, 0.01, 0.99)
    groups = np.arange(ROWS) % 500
    report = evaluate_predictions(labels, probs, groups)
    assert report["rows"] == ROWS
    assert report["positives"] == labels.sum()
    assert report["auc"] == pytest.approx(roc_auc_score(labels, probs))
    assert report["gauc"] == pytest.approx(gauc(labels, probs, groups).value)
    assert report["gauc_groups_used"] == 500
    assert set(report) >= {"ctr", "logloss", "normalized_entropy", "calibration"}
    assert all(type(value) in (int, float) for value in report.values())  # plain JSON
    assert "gauc" not in evaluate_predictions(labels, probs)


def test_roc_points_equal_sklearn_curve_and_thin_out(scored: tuple[np.ndarray, np.ndarray]):
    labels, probs = scored
    fpr, tpr, _ = roc_curve(labels, probs, drop_intermediate=False)
    ours_fpr, ours_tpr = roc_curve_points(labels, probs)
    np.testing.assert_allclose(ours_fpr, fpr)
    np.testing.assert_allclose(ours_tpr, tpr)

    fine = probs + np.random.default_rng(3).normal(0, 1e-3, ROWS)
    thin_fpr, thin_tpr = roc_curve_points(labels, fine, max_points=50)
    assert len(thin_fpr) <= 50
    assert (thin_fpr[0], thin_tpr[0], thin_fpr[-1], thin_tpr[-1]) == (0, 0, 1, 1)
    assert (np.diff(thin_fpr) >= 0).all() and (np.diff(thin_tpr) >= 0).all()


def test_calibration_bins_hold_equal_numbers_of_rows():
    rng = np.random.default_rng(4)
    probs = rng.random(1_000)
    labels = (rng.random(1_000) < probs).astype(float)
    mean_pred, mean_label = calibration_bins(labels, probs, bins=20)
    order = np.argsort(probs)
    np.testing.assert_allclose(mean_pred, probs[order].reshape(20, 50).mean(axis=1))
    np.testing.assert_allclose(mean_label, labels[order].reshape(20, 50).mean(axis=1))
    assert len(calibration_bins([0, 1, 1], [0.1, 0.2, 0.3], bins=20)[0]) == 3


def test_plot_report_writes_a_png(scored: tuple[np.ndarray, np.ndarray], tmp_path: Path):
    labels, probs = scored
    probs = np.clip(probs, 0.01, 0.99)
    path = plot_report(evaluate_predictions(labels, probs), labels, probs, tmp_path / "r/p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
