"""Metrics against scikit-learn, ECE by hand, and the paired bootstrap's behaviour and speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn import metrics as skm

from medicsynth.labels import CLASSES, TASKS
from medicsynth.metrics import (
    bootstrap_diff_ci,
    bootstrap_per_class_f1_diff,
    classification_report,
    confusion_counts,
    expected_calibration_error,
    joint_bootstrap_confusions,
    metrics_from_confusion,
    paired_bootstrap_confusions,
    task_report,
)


def noisy(y, accuracy, n_classes, rng):
    """Predictions equal to ``y`` with probability ``accuracy``, uniform otherwise."""
    return np.where(rng.random(len(y)) < accuracy, y, rng.integers(0, n_classes, len(y)))


@pytest.fixture
def arrays():
    rng = np.random.default_rng(7)
    classes = CLASSES["disaster_types"]
    # Imbalanced truth, like MEDIC's disaster types.
    y = rng.choice(len(classes), size=3000, p=[0.17, 0.05, 0.1, 0.1, 0.03, 0.51, 0.04])
    return classes, y, noisy(y, 0.6, len(classes), rng)


def test_task_report_matches_sklearn(arrays):
    classes, y, p = arrays
    r = task_report(y, p, classes)
    labels = list(range(len(classes)))
    assert r["n"] == len(y)
    assert r["accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert r["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro", labels=labels))
    assert r["weighted_f1"] == pytest.approx(skm.f1_score(y, p, average="weighted", labels=labels))
    assert r["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p))
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, p, labels=labels, zero_division=0)
    assert list(r["per_class"]) == list(classes)
    for k, c in enumerate(classes):
        assert r["per_class"][c]["precision"] == pytest.approx(prec[k])
        assert r["per_class"][c]["recall"] == pytest.approx(rec[k])
        assert r["per_class"][c]["f1"] == pytest.approx(f1[k])
        assert r["per_class"][c]["support"] == sup[k]
    assert r["confusion"] == skm.confusion_matrix(y, p, labels=labels).tolist()
    assert "ece" not in r


def test_class_names_and_indices_give_the_same_report(arrays):
    classes, y, p = arrays
    by_name = task_report([classes[i] for i in y], np.array([classes[i] for i in p]), classes)
    assert by_name == task_report(y, p, classes)


def test_absent_class_kept_in_per_class_but_not_in_macro_average():
    classes = CLASSES["humanitarian"]
    # Class 3 (rescue) never occurs in the truth; one sample is wrongly predicted as it.
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    p = np.array([0, 1, 1, 1, 2, 2, 3])
    r = task_report(y, p, classes)
    present = [0, 1, 2]
    assert r["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro", labels=present))
    assert r["balanced_accuracy"] == pytest.approx(np.mean([0.5, 1.0, 2 / 3]))
    rescue = r["per_class"]["rescue_volunteering_or_donation_effort"]
    assert rescue == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # Weighted F1 weighs by support, so absent classes drop out either way.
    assert r["weighted_f1"] == pytest.approx(
        skm.f1_score(y, p, average="weighted", labels=list(range(4)), zero_division=0)
    )


def test_bad_labels_are_named():
    classes = CLASSES["damage_severity"]
    with pytest.raises(ValueError, match=r"y_pred\[2\]: 'moderate' is not one of"):
        task_report(["mild", "severe", "mild"], ["mild", "severe", "moderate"], classes)
    with pytest.raises(ValueError, match=r"y_true\[1\]: index 3 outside 0..2"):
        task_report([0, 3], [0, 1], classes)
    with pytest.raises(ValueError, match="3 samples but y_pred has 2"):
        task_report([0, 1, 2], [0, 1], classes)


def test_ece_by_hand():
    # Confidences kept off the bin edges (k/5) so float rounding cannot move a sample.
    probs = np.array([[0.9, 0.1], [0.25, 0.75], [0.55, 0.45], [0.35, 0.65]])
    y = np.array([0, 0, 0, 1])
    # Top labels: 0 (right, 0.9), 1 (wrong, 0.75), 0 (right, 0.55), 1 (right, 0.65).
    # bin (0.8, 1.0]: {0.9}        acc 1.0, conf 0.90 -> 0.10 * 1/4
    # bin (0.6, 0.8]: {0.75, 0.65} acc 0.5, conf 0.70 -> 0.20 * 2/4
    # bin (0.4, 0.6]: {0.55}       acc 1.0, conf 0.55 -> 0.45 * 1/4
    assert expected_calibration_error(probs, y, n_bins=5) == pytest.approx(0.2375)
    # One bin: |mean accuracy - mean confidence| = |0.75 - 0.7125|.
    assert expected_calibration_error(probs, y, n_bins=1) == pytest.approx(0.0375)
    # Perfectly confident and right: 0.
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


def test_ece_rejects_bad_probabilities():
    with pytest.raises(ValueError, match=r"probs\[1, 0\]"):
        expected_calibration_error(np.array([[0.5, 0.5], [1.5, -0.5]]), np.array([0, 1]))
    with pytest.raises(ValueError, match="expected shape"):
        expected_calibration_error(np.ones((3, 2)) / 2, np.array([0, 1]))


def test_task_report_with_probs_has_ece(arrays):
    classes, y, p = arrays
    probs = np.full((len(y), len(classes)), 0.05)
    probs[np.arange(len(y)), p] = 0.7
    r = task_report(y, p, classes, probs=probs)
    assert r["ece"] == pytest.approx(abs(np.mean(p == y) - 0.7))


def test_classification_report_over_present_tasks():
    rng = np.random.default_rng(0)
    y, pred = {}, {}
    for task in ("humanitarian", "damage_severity"):
        c = len(CLASSES[task])
        y[task] = rng.integers(0, c, 200)
        pred[task] = noisy(y[task], 0.7, c, rng)
    r = classification_report(y, pred)
    assert list(r["tasks"]) == ["damage_severity", "humanitarian"]  # TASKS order
    assert r["mean_macro_f1"] == pytest.approx(
        np.mean([skm.f1_score(y[t], pred[t], average="macro") for t in y])
    )
    assert r["mean_accuracy"] == pytest.approx(np.mean([np.mean(y[t] == pred[t]) for t in y]))
    assert "mean_ece" not in r
    with pytest.raises(ValueError, match="unknown task"):
        classification_report({"severity": y["damage_severity"]}, pred)
    with pytest.raises(ValueError, match="y_pred lacks task"):
        classification_report(y, {"humanitarian": pred["humanitarian"]})
    with pytest.raises(ValueError, match=r"humanitarian: y_pred\[0\]"):
        classification_report(y, {**pred, "humanitarian": np.full(200, 9)})


def test_metrics_from_confusion_vectorised_matches_single(arrays):
    classes, y, p = arrays
    c = len(classes)
    stacked = np.stack([confusion_counts(y, p, c), confusion_counts(y, y, c)])
    many = metrics_from_confusion(stacked)
    one = metrics_from_confusion(stacked[0])
    for key in ("accuracy", "macro_f1", "weighted_f1", "balanced_accuracy"):
        assert many[key][0] == pytest.approx(one[key])
        assert many[key][1] == pytest.approx(1.0)
    np.testing.assert_allclose(many["f1"][0], one["f1"])


def test_bootstrap_identical_predictions_gives_zero_interval(arrays):
    classes, y, p = arrays
    for metric in ("macro_f1", "accuracy", "weighted_f1", "balanced_accuracy"):
        d = bootstrap_diff_ci(y, p, p.copy(), metric, n_boot=200)
        assert (d["diff"], d["low"], d["high"]) == (0.0, 0.0, 0.0)
        assert d["p_value"] == 1.0 and not d["significant"]
    for row in bootstrap_per_class_f1_diff(y, p, p, len(classes), n_boot=200):
        assert (row["diff"], row["low"], row["high"], row["significant"]) == (0.0, 0.0, 0.0, False)


def test_bootstrap_detects_a_clearly_better_system(arrays):
    classes, y, p = arrays
    better = noisy(y, 0.85, len(classes), np.random.default_rng(3))
    d = bootstrap_diff_ci(y, better, p, "macro_f1", n_boot=500)
    assert d["diff"] == pytest.approx(
        skm.f1_score(y, better, average="macro") - skm.f1_score(y, p, average="macro")
    )
    assert d["low"] > 0 and d["significant"]
    assert d["low"] <= d["diff"] <= d["high"]
    assert d["p_value"] == pytest.approx(2 / 501)  # never 0: +1 correction
    # Reversed order flips the sign.
    r = bootstrap_diff_ci(y, p, better, "macro_f1", n_boot=500)
    assert r["high"] < 0 and r["diff"] == pytest.approx(-d["diff"])


def test_bootstrap_per_class_localises_the_improvement(arrays):
    classes, y, p = arrays
    # Fix only landslide (class 4): predict it perfectly, leave everything else as is.
    fixed = p.copy()
    fixed[y == 4] = 4
    fixed[(p == 4) & (y != 4)] = y[(p == 4) & (y != 4)]
    rows = bootstrap_per_class_f1_diff(y, fixed, p, len(classes), n_boot=400)
    assert rows[4]["significant"] and rows[4]["low"] > 0
    assert rows[4]["a"] == pytest.approx(1.0)
    expected = skm.f1_score(y, fixed, average=None) - skm.f1_score(y, p, average=None)
    np.testing.assert_allclose([r["diff"] for r in rows], expected, atol=1e-12)
    assert [r["support"] for r in rows] == np.bincount(y, minlength=len(classes)).tolist()


def test_bootstrap_is_deterministic_by_seed(arrays):
    classes, y, p = arrays
    q = noisy(y, 0.62, len(classes), np.random.default_rng(11))
    a = bootstrap_diff_ci(y, q, p, "macro_f1", n_boot=300, seed=5)
    assert a == bootstrap_diff_ci(y, q, p, "macro_f1", n_boot=300, seed=5)
    assert a != bootstrap_diff_ci(y, q, p, "macro_f1", n_boot=300, seed=6)
    # A callable metric uses index resampling; also deterministic.
    acc = lambda t, s: float(np.mean(t == s))  # noqa: E731
    b = bootstrap_diff_ci(y, q, p, acc, n_boot=50, seed=1)
    assert b == bootstrap_diff_ci(y, q, p, acc, n_boot=50, seed=1)
    assert b["diff"] == pytest.approx(np.mean(q == y) - np.mean(p == y))


def test_resamples_are_index_draws_independent_of_the_predictions(arrays):
    classes, y, p = arrays
    c, n = len(classes), len(y)
    q = noisy(y, 0.65, len(classes), np.random.default_rng(2))
    r = noisy(y, 0.55, len(classes), np.random.default_rng(3))
    cms = paired_bootstrap_confusions(y, [q, p], c, n_boot=40, seed=7)
    # Exactly the confusion matrices of default_rng(seed)'s index draws.
    idx = np.random.default_rng(7).integers(0, n, size=(40, n))
    for b in (0, 17, 39):
        np.testing.assert_array_equal(cms[b, 0], confusion_counts(y[idx[b]], q[idx[b]], c))
        np.testing.assert_array_equal(cms[b, 1], confusion_counts(y[idx[b]], p[idx[b]], c))
    # Re-scoring the other system leaves this one's resamples (and intervals) unchanged.
    np.testing.assert_array_equal(paired_bootstrap_confusions(y, [q, r], c, n_boot=40, seed=7)[:, 0], cms[:, 0])


def test_cell_aggregation_matches_index_resampling_distribution(arrays):
    # The fast bootstrap must have the same distribution as resampling indices.
    classes, y, p = arrays
    q = noisy(y, 0.65, len(classes), np.random.default_rng(2))
    c = len(classes)
    fast = metrics_from_confusion(paired_bootstrap_confusions(y, [q, p], c, n_boot=1000, seed=0))
    fast_diff = fast["macro_f1"][:, 0] - fast["macro_f1"][:, 1]
    rng = np.random.default_rng(1)
    slow_diff = []
    for _ in range(400):
        i = rng.integers(0, len(y), len(y))
        m = metrics_from_confusion(np.stack([confusion_counts(y[i], q[i], c), confusion_counts(y[i], p[i], c)]))
        slow_diff.append(m["macro_f1"][0] - m["macro_f1"][1])
    slow_diff = np.array(slow_diff)
    # Standard errors agree within sampling noise of 400/1000 resamples (~10%).
    assert fast_diff.std() == pytest.approx(slow_diff.std(), rel=0.2)
    assert fast_diff.mean() == pytest.approx(slow_diff.mean(), abs=0.3 * slow_diff.std())


def test_joint_bootstrap_shares_resamples_across_tasks():
    rng = np.random.default_rng(0)
    n = 500
    ys = [rng.integers(0, len(CLASSES[t]), n) for t in TASKS]
    preds = [[noisy(y, 0.7, len(CLASSES[t]), rng), y] for y, t in zip(ys, TASKS)]
    cms = joint_bootstrap_confusions(ys, preds, [len(CLASSES[t]) for t in TASKS], n_boot=50, seed=0)
    assert [cm.shape for cm in cms] == [(50, 2, len(CLASSES[t]), len(CLASSES[t])) for t in TASKS]
    for cm in cms:
        assert (cm.sum(axis=(2, 3)) == n).all()
        # The same draw for both systems: identical row sums (true-class supports).
        np.testing.assert_array_equal(cm[:, 0].sum(axis=2), cm[:, 1].sum(axis=2))
    # Tasks 0 and 1 are resampled jointly: with y_task1 a function of y_task0, supports co-vary exactly.
    y0 = rng.integers(0, 3, n)
    y1 = (y0 == 0).astype(np.int64)
    cm0, cm1 = joint_bootstrap_confusions([y0, y1], [[y0], [y1]], [3, 2], n_boot=30, seed=4)
    np.testing.assert_array_equal(cm0[:, 0, 0].sum(axis=1), cm1[:, 0, 1].sum(axis=1))


def test_bootstrap_is_fast_on_medic_sized_test_set():
    rng = np.random.default_rng(0)
    n, c = 15688, 7
    y = rng.integers(0, c, n)
    a, b = noisy(y, 0.7, c, rng), noisy(y, 0.72, c, rng)
    start = time.perf_counter()
    bootstrap_diff_ci(y, a, b, "macro_f1", n_boot=1000)
    bootstrap_per_class_f1_diff(y, a, b, c, n_boot=1000)
    assert time.perf_counter() - start < 10  # ~0.4 s measured (2-core CPU, index resampling); generous for shared CPUs


def test_plots_write_readable_pngs(tmp_path, arrays):
    from PIL import Image

    from medicsynth.plots import plot_confusion, plot_per_class_f1

    classes, y, p = arrays
    report = classification_report({"disaster_types": y, "damage_severity": y % 3},
                                    {"disaster_types": p, "damage_severity": p % 3})
    cm = report["tasks"]["disaster_types"]["confusion"]
    for path in (
        plot_confusion(cm, classes, "disaster_types", tmp_path / "a/cm.png"),
        plot_confusion(cm, classes, "counts", tmp_path / "cm_counts.png", normalise=False),
        plot_per_class_f1(report, tmp_path / "f1.png", minority={"landslide", ("damage_severity", "mild")}),
    ):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 300
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files
    with pytest.raises(ValueError, match="does not match 3 classes"):
        plot_confusion(cm, CLASSES["damage_severity"], "x", tmp_path / "bad.png")
