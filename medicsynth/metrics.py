"""Classification metrics and paired bootstrap comparisons for MEDIC's four tasks.

Everything is computed from confusion counts with numpy, so the point estimates and the bootstrap
resamples go through exactly the same code (the tests check the point estimates against
scikit-learn).

Conventions, chosen so that reports and plots are stable and comparisons are fair:

- Labels are class indices in ``medicsynth.labels.CLASSES[task]`` order, or the class names
  themselves; anything else is an error naming the value.
- ``per_class`` always lists all ``C`` classes of the task, in schema order, including classes
  with no test sample (their recall and F1 are 0, their support 0), so plots keep their axes.
- Per-class precision, recall and F1 use ``zero_division=0`` (as sklearn with that argument).
- **Macro averages (macro-F1, balanced accuracy) run over the classes present in** ``y_true``.
  A class absent from the ground truth carries no evidence about a model; averaging it in as a
  0 (sklearn with ``labels=range(C)``) would lower every system's score by the same arbitrary
  amount on small subsets, and sklearn's default (classes in ``y_true`` ∪ ``y_pred``) would let
  two systems be averaged over different class sets, which breaks paired comparisons. Errors
  into an absent class still count: they are missed recall of the true class. This equals
  ``sklearn.metrics.f1_score(..., average="macro", labels=<classes in y_true>)`` and
  ``balanced_accuracy_score``. On the full MEDIC test split every class is present, so the
  choice only matters for subsets and bootstrap resamples.
- Weighted F1 weights per-class F1 by support (absent classes weigh 0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from medicsynth.labels import CLASSES, TASKS

#: Metrics that :func:`bootstrap_diff_ci` computes from resampled confusion counts.
NAMED_METRICS: tuple[str, ...] = ("accuracy", "macro_f1", "weighted_f1", "balanced_accuracy")


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


def as_indices(values: Any, classes: Sequence[str], name: str = "labels") -> np.ndarray:
    """1-D int64 array of class indices from indices or class names.

    Raises ``ValueError`` naming ``name``, the position and the value of the first entry that is
    not a class of ``classes``.
    """
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    n_classes = len(classes)
    if arr.dtype.kind in "US" or arr.dtype == object:
        lookup = {c: k for k, c in enumerate(classes)}
        out = np.empty(len(arr), dtype=np.int64)
        for i, value in enumerate(arr.tolist()):
            k = lookup.get(value)
            if k is None:
                raise ValueError(
                    f"{name}[{i}]: {value!r} is not one of {', '.join(classes)}"
                )
            out[i] = k
        return out
    if arr.dtype.kind == "b" or arr.dtype.kind not in "iuf":
        raise ValueError(f"{name}: expected class indices or names, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr) & (arr == np.round(arr))):
        i = int(np.flatnonzero(~(np.isfinite(arr) & (arr == np.round(arr))))[0])
        raise ValueError(f"{name}[{i}]: {arr[i]!r} is not a class index")
    out = arr.astype(np.int64)
    bad = (out < 0) | (out >= n_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}[{i}]: index {out[i]} outside 0..{n_classes - 1}")
    return out


def _check_pair(y_true: np.ndarray, y_pred: np.ndarray) -> None:
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} samples but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("no samples to score")


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``(C, C)`` int64 confusion matrix, rows = true class, columns = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    flat = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


# --------------------------------------------------------------------------------------------
# Metrics from confusion counts (vectorised over any leading axes)
# --------------------------------------------------------------------------------------------


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # zero_division=0: a ratio with an empty denominator is 0, as sklearn with zero_division=0.
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def metrics_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics of one or many confusion matrices of shape ``(..., C, C)`` (rows = true).

    Returns arrays with the leading shape ``...``: ``accuracy``, ``macro_f1``, ``weighted_f1``,
    ``balanced_accuracy``, and with shape ``(..., C)``: ``precision``, ``recall``, ``f1``,
    ``support``. Macro averages run over classes with support > 0 (see the module docstring);
    a matrix with no sample at all gives NaN for them.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(axis=-1)
    predicted = cm.sum(axis=-2)
    total = support.sum(axis=-1)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    # F1 = 2tp / (2tp + fp + fn) equals the harmonic mean of precision and recall and is 0 when
    # the class is neither present nor predicted, matching sklearn's zero_division=0.
    f1 = _safe_div(2.0 * tp, support + predicted)
    present = support > 0
    n_present = present.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        macro_f1 = np.where(present, f1, 0.0).sum(axis=-1) / n_present
        balanced = np.where(present, recall, 0.0).sum(axis=-1) / n_present
        weighted = (f1 * support).sum(axis=-1) / total
        accuracy = tp.sum(axis=-1) / total
    return {
        "accuracy": accuracy,
        "macro_f1": macro_f1,
        "weighted_f1": weighted,
        "balanced_accuracy": balanced,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support,
    }


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


_PROB_TOL = 1e-4


def _check_probs(probs: Any, n: int, n_classes: int | None = None) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != n:
        raise ValueError(f"probs: expected shape ({n}, C), got {probs.shape}")
    if n_classes is not None and probs.shape[1] != n_classes:
        raise ValueError(f"probs: expected {n_classes} columns, got {probs.shape[1]}")
    # float32 softmax outputs can overshoot 1 by an ulp; tolerate that, reject real garbage.
    bad = ~np.isfinite(probs) | (probs < -_PROB_TOL) | (probs > 1 + _PROB_TOL)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(f"probs[{i}, {j}]: {probs[i, j]!r} is not a probability in [0, 1]")
    return np.clip(probs, 0.0, 1.0)


def expected_calibration_error(probs: Any, y_true: Any, n_bins: int = 15) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width confidence bins.

    For each sample the confidence is ``max(probs[i])`` and the prediction ``argmax(probs[i])``
    (ties to the lowest index). Bin ``m`` (1-based) holds confidences in ``((m-1)/M, m/M]``, the
    first bin also 0. ``ECE = sum_m |B_m|/n * |accuracy(B_m) - mean_confidence(B_m)|``
    (Guo et al., 2017). Rows are used as given, not renormalised.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y = np.asarray(y_true, dtype=np.int64)
    if y.ndim != 1 or len(y) == 0:
        raise ValueError("y_true: expected a non-empty 1-D array")
    probs = _check_probs(probs, len(y))
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    # ceil(conf*M)-1 puts a confidence exactly on an edge m/M in bin m (right-closed bins).
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    return float(np.abs(acc_sum - conf_sum).sum() / len(y))


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def task_report(
    y_true: Any,
    y_pred: Any,
    classes: Sequence[str],
    probs: Any | None = None,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Metrics of one task.

    Args:
        y_true, y_pred: class indices (into ``classes``) or class names, same length.
        classes: the task's class names in model output order.
        probs: optional ``(n, C)`` class probabilities in ``classes`` order; adds ``ece``.
        n_bins: bins of the expected calibration error.

    Returns:
        ``{"n", "accuracy", "macro_f1", "weighted_f1", "balanced_accuracy",
        "per_class": {class: {"precision", "recall", "f1", "support"}},
        "confusion": [[int]] (rows = true class, columns = predicted, schema order),
        "classes": [...], "ece" (only with probs)}``. Macro averages run over classes present
        in ``y_true``; ``per_class`` keeps every class (see the module docstring).
    """
    classes = list(classes)
    yt = as_indices(y_true, classes, "y_true")
    yp = as_indices(y_pred, classes, "y_pred")
    _check_pair(yt, yp)
    cm = confusion_counts(yt, yp, len(classes))
    m = metrics_from_confusion(cm)
    report: dict[str, Any] = {
        "n": int(len(yt)),
        "accuracy": float(m["accuracy"]),
        "macro_f1": float(m["macro_f1"]),
        "weighted_f1": float(m["weighted_f1"]),
        "balanced_accuracy": float(m["balanced_accuracy"]),
        "per_class": {
            c: {
                "precision": float(m["precision"][k]),
                "recall": float(m["recall"][k]),
                "f1": float(m["f1"][k]),
                "support": int(m["support"][k]),
            }
            for k, c in enumerate(classes)
        },
        "confusion": cm.tolist(),
        "classes": classes,
    }
    if probs is not None:
        p = _check_probs(probs, len(yt), len(classes))
        report["ece"] = expected_calibration_error(p, yt, n_bins=n_bins)
    return report


def classification_report(
    y_true: Mapping[str, Any],
    y_pred: Mapping[str, Any],
    probs: Mapping[str, Any] | None = None,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Per-task reports for the tasks of :data:`medicsynth.labels.TASKS` present in ``y_true``.

    Args:
        y_true, y_pred: ``{task: labels}`` (indices into ``CLASSES[task]`` or class names);
            every task of ``y_true`` must be in ``y_pred``. Keys outside ``TASKS`` are an error.
        probs: optional ``{task: (n, C) probabilities}``; tasks missing from it get no ECE.

    Returns:
        ``{"tasks": {task: task_report(...)}, "mean_macro_f1", "mean_accuracy"}``; the means are
        unweighted over the reported tasks (and ``mean_ece`` when every task has probs).
    """
    unknown = sorted(set(y_true) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; expected {', '.join(TASKS)}")
    tasks = [t for t in TASKS if t in y_true]
    if not tasks:
        raise ValueError("y_true has none of the tasks " + ", ".join(TASKS))
    missing = [t for t in tasks if t not in y_pred]
    if missing:
        raise ValueError(f"y_pred lacks task(s) {', '.join(missing)}")
    probs = probs or {}
    reports: dict[str, Any] = {}
    for task in tasks:
        try:
            reports[task] = task_report(
                y_true[task], y_pred[task], CLASSES[task], probs.get(task), n_bins=n_bins
            )
        except ValueError as exc:
            raise ValueError(f"{task}: {exc}") from None
    out: dict[str, Any] = {
        "tasks": reports,
        "mean_macro_f1": float(np.mean([r["macro_f1"] for r in reports.values()])),
        "mean_accuracy": float(np.mean([r["accuracy"] for r in reports.values()])),
    }
    if all("ece" in r for r in reports.values()):
        out["mean_ece"] = float(np.mean([r["ece"] for r in reports.values()]))
    return out


# --------------------------------------------------------------------------------------------
# Paired bootstrap
# --------------------------------------------------------------------------------------------


def joint_bootstrap_confusions(
    y_true: Sequence[Any],
    preds: Sequence[Sequence[Any]],
    n_classes: Sequence[int],
    n_boot: int = 1000,
    seed: int = 0,
) -> list[np.ndarray]:
    """Confusion matrices of ``K`` systems on ``T`` tasks over ``n_boot`` shared resamples.

    A resample draws ``n`` test samples (images) with replacement; every system and every task
    is scored on the same draw (paired bootstrap), so differences between systems and averages
    over tasks get valid intervals. The draws are sample indices from
    ``numpy.random.default_rng(seed)`` and depend only on ``(seed, n, n_boot)``, never on the
    labels or predictions: re-scoring one system (a new experiment) leaves every other system's
    resamples, and so its intervals, exactly as they were. The drawn counts are then summed over
    cells of samples with identical labels ``(true_t, pred_t1, ..., pred_tK for every task t)``,
    so the confusion matrices cost ``O(n_boot x cells)`` after the ``O(n_boot x n)`` draw.

    Args:
        y_true: ``T`` arrays of class indices, all of length ``n``.
        preds: ``T`` sequences of ``K`` prediction arrays (same systems, same order per task).
        n_classes: class count of each task.
        n_boot, seed: resamples and the seed of ``numpy.random.default_rng``.

    Returns:
        ``T`` int64 arrays of shape ``(n_boot, K, C_t, C_t)`` (rows = true class).
    """
    if not (len(y_true) == len(preds) == len(n_classes)) or not y_true:
        raise ValueError("y_true, preds and n_classes must have the same, non-zero length")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    k = len(preds[0])
    if k == 0 or any(len(p) != k for p in preds):
        raise ValueError("every task needs the same, non-zero number of systems")
    columns = []
    for t, (yt, ps) in enumerate(zip(y_true, preds)):
        yt = np.asarray(yt, dtype=np.int64)
        for p in ps:
            _check_pair(yt, np.asarray(p))
        if len(yt) != len(np.asarray(y_true[0])):
            raise ValueError(f"task {t} has {len(yt)} samples, task 0 has {len(y_true[0])}")
        columns.append(yt)
        columns.extend(np.asarray(p, dtype=np.int64) for p in ps)
    table = np.stack(columns, axis=1)  # (n, T*(K+1))
    n = len(table)
    cells, inverse = np.unique(table, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).ravel()
    # Slot of each cell in every (task, system) confusion matrix, and cells sorted by slot so
    # that one np.add.reduceat per (task, system) sums the drawn counts into its matrix.
    plans = []
    for t, c in enumerate(n_classes):
        base = t * (k + 1)
        for s in range(k):
            slot = cells[:, base] * c + cells[:, base + s + 1]
            order = np.argsort(slot, kind="stable")
            starts = np.flatnonzero(np.r_[True, np.diff(slot[order]) != 0])
            plans.append((t, s, order, starts, slot[order][starts]))
    out = [np.zeros((n_boot, k, c * c), dtype=np.int64) for c in n_classes]
    n_cells = len(cells)
    rng = np.random.default_rng(seed)
    # Bound the (chunk x n) block of drawn indices to ~4M (32 MB).
    chunk = max(1, min(n_boot, 4_000_000 // n))
    for lo in range(0, n_boot, chunk):
        hi = min(n_boot, lo + chunk)
        idx = rng.integers(0, n, size=(hi - lo, n))
        # Each drawn sample counted in its cell, one row of cells per resample.
        flat = (inverse[idx] + np.arange(hi - lo)[:, None] * n_cells).ravel()
        draws = np.bincount(flat, minlength=(hi - lo) * n_cells).reshape(hi - lo, n_cells)
        for t, s, order, starts, slots in plans:
            out[t][lo:hi, s][:, slots] = np.add.reduceat(draws[:, order], starts, axis=1)
    return [o.reshape(n_boot, k, c, c) for o, c in zip(out, n_classes)]


def paired_bootstrap_confusions(
    y_true: Any,
    preds: Sequence[Any],
    n_classes: int,
    n_boot: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """Confusion matrices of ``K`` systems on one task over ``n_boot`` shared resamples.

    Single-task case of :func:`joint_bootstrap_confusions`. Returns an int64 array of shape
    ``(n_boot, K, C, C)`` (rows = true class).
    """
    if not len(preds):
        raise ValueError("no predictions to bootstrap")
    return joint_bootstrap_confusions([y_true], [list(preds)], [n_classes], n_boot, seed)[0]


def summarise_diff(point: float, boot: np.ndarray, alpha: float = 0.05) -> dict[str, Any]:
    """``{"diff", "low", "high", "p_value", "significant"}`` of a bootstrapped difference.

    ``point`` is the difference on the full test set, ``boot`` the resampled differences (NaNs
    ignored). The interval is the percentile interval at level ``1 - alpha``; the p-value is
    two-sided (see :func:`bootstrap_diff_ci`); ``significant`` means the interval excludes 0.
    """
    boot = boot[np.isfinite(boot)]
    if len(boot) == 0:
        return {"diff": point, "low": None, "high": None, "p_value": None, "significant": False}
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    b = len(boot)
    # Two-sided p-value: twice the smaller tail share on either side of 0, with the +1
    # correction so that it is never reported as exactly 0 with finitely many resamples.
    p_le = (np.count_nonzero(boot <= 0) + 1) / (b + 1)
    p_ge = (np.count_nonzero(boot >= 0) + 1) / (b + 1)
    p_value = min(1.0, 2 * min(p_le, p_ge))
    return {
        "diff": float(point),
        "low": float(low),
        "high": float(high),
        "p_value": float(p_value),
        "significant": bool(low > 0 or high < 0),
    }


def _resolve_n_classes(arrays: Sequence[np.ndarray], n_classes: int | None) -> int:
    top = int(max(a.max() for a in arrays)) + 1
    if n_classes is None:
        return top
    if top > n_classes:
        raise ValueError(f"label index {top - 1} outside 0..{n_classes - 1}")
    return int(n_classes)


def _as_int_labels(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected a 1-D array of class indices, got {arr.dtype} {arr.shape}")
    if len(arr) and arr.min() < 0:
        raise ValueError(f"{name}: negative class index {arr.min()}")
    return arr.astype(np.int64)


def bootstrap_diff_ci(
    y_true: Any,
    pred_a: Any,
    pred_b: Any,
    metric_fn: str | Callable[[np.ndarray, np.ndarray], float] = "macro_f1",
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    n_classes: int | None = None,
) -> dict[str, Any]:
    """Paired bootstrap confidence interval of ``metric(pred_a) - metric(pred_b)``.

    Both systems are scored on the same resamples of the test samples, so the interval reflects
    the uncertainty of the *difference*, which is much tighter than two independent intervals.

    Args:
        y_true, pred_a, pred_b: class indices (ints), same length.
        metric_fn: one of :data:`NAMED_METRICS` (computed from resampled confusion counts via
            :func:`paired_bootstrap_confusions`: under a second for 1000 resamples of 15k samples), or a
            callable ``f(y_true, y_pred) -> float`` evaluated on index resamples (slower; the
            same indices are used for both systems).
        n_boot: number of resamples. seed: seed of ``numpy.random.default_rng``.
        alpha: ``1 - confidence level``; 0.05 gives a 95% percentile interval.
        n_classes: class count for named metrics; inferred as ``max label + 1`` when omitted
            (classes beyond it occur nowhere, so they change nothing).

    Returns:
        ``{"diff", "low", "high", "p_value", "significant", "a", "b", "n_boot", "alpha"}``:
        ``diff`` is the point estimate on the full test set, ``low``/``high`` the percentile
        interval, ``p_value`` the two-sided bootstrap p-value (twice the smaller share of
        resampled differences on either side of 0, +1-corrected), ``significant`` whether the
        interval excludes 0, ``a``/``b`` each system's point metric.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    yt = _as_int_labels(y_true, "y_true")
    pa = _as_int_labels(pred_a, "pred_a")
    pb = _as_int_labels(pred_b, "pred_b")
    _check_pair(yt, pa)
    _check_pair(yt, pb)
    if isinstance(metric_fn, str):
        if metric_fn not in NAMED_METRICS:
            raise ValueError(f"unknown metric {metric_fn!r}; expected one of {NAMED_METRICS}")
        c = _resolve_n_classes([yt, pa, pb], n_classes)
        point = metrics_from_confusion(
            np.stack([confusion_counts(yt, pa, c), confusion_counts(yt, pb, c)])
        )[metric_fn]
        boot = metrics_from_confusion(paired_bootstrap_confusions(yt, [pa, pb], c, n_boot, seed))
        values = boot[metric_fn]  # (n_boot, 2)
        diffs = values[:, 0] - values[:, 1]
        a, b = float(point[0]), float(point[1])
    else:
        a, b = float(metric_fn(yt, pa)), float(metric_fn(yt, pb))
        rng = np.random.default_rng(seed)
        n = len(yt)
        diffs = np.empty(n_boot, dtype=np.float64)
        chunk = max(1, min(n_boot, 2_000_000 // max(n, 1)))
        for start in range(0, n_boot, chunk):
            idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
            for j, row in enumerate(idx):
                diffs[start + j] = metric_fn(yt[row], pa[row]) - metric_fn(yt[row], pb[row])
    out = summarise_diff(a - b, diffs, alpha)
    out.update({"a": a, "b": b, "n_boot": int(n_boot), "alpha": float(alpha)})
    return out


def bootstrap_per_class_f1_diff(
    y_true: Any,
    pred_a: Any,
    pred_b: Any,
    n_classes: int,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> list[dict[str, Any]]:
    """Paired bootstrap CI of ``F1_c(pred_a) - F1_c(pred_b)`` for every class ``c``.

    Same resampling as :func:`bootstrap_diff_ci` with a named metric (one shared set of
    resamples for all classes). Returns one dict per class index, with the keys of
    :func:`bootstrap_diff_ci` plus ``support`` (test samples of the class). A class without
    test samples gets ``low = high = p_value = None`` and ``significant = False``: its F1 only
    measures false positives and is not a per-class quality.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    yt = _as_int_labels(y_true, "y_true")
    pa = _as_int_labels(pred_a, "pred_a")
    pb = _as_int_labels(pred_b, "pred_b")
    _check_pair(yt, pa)
    _check_pair(yt, pb)
    c = _resolve_n_classes([yt, pa, pb], n_classes)
    point = metrics_from_confusion(
        np.stack([confusion_counts(yt, pa, c), confusion_counts(yt, pb, c)])
    )
    boot = metrics_from_confusion(paired_bootstrap_confusions(yt, [pa, pb], c, n_boot, seed))
    diffs = boot["f1"][:, 0, :] - boot["f1"][:, 1, :]  # (n_boot, C)
    out = []
    for k in range(c):
        a, b = float(point["f1"][0, k]), float(point["f1"][1, k])
        support = int(point["support"][0, k])
        if support == 0:
            row = {"diff": a - b, "low": None, "high": None, "p_value": None, "significant": False}
        else:
            row = summarise_diff(a - b, diffs[:, k], alpha)
        row.update({"a": a, "b": b, "support": support, "n_boot": int(n_boot), "alpha": float(alpha)})
        out.append(row)
    return out


def percentile_ci(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """``(low, high)`` percentile interval of bootstrap values (NaNs ignored)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return (float("nan"), float("nan"))
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return (float(low), float(high))
