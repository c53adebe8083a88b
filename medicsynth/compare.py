"""Compare dataset variants over training seeds, on the ORIGINAL test labels.

Input: one predictions TSV per variant and training seed (the evaluate stage writes
``data/predictions/{variant}-{arch}-s{seed}/test.tsv``) with ``image_path``, and per task
``{task}_true`` (original test label), ``{task}_pred`` (predicted class name) and optionally
``{task}_prob_{class}`` for every class of the task.

A variant's score is the mean over its training seeds (reported with the sd over seeds). The
uncertainty of a score, and of a difference ``variant − original``, has two sources: which seeds
were trained and which test images were drawn. Both are resampled by a **two-way (crossed)
bootstrap**: each of ``n_boot`` resamples draws ``S`` seeds with replacement from the ``S``
trained ones and ``n`` test images with replacement from the ``n`` test images; every variant
and task is scored on the same seed draw and the same image draw (paired), a variant's value is
its mean over the drawn seeds. Seeds pair by their number: seed ``s`` of every variant started
from the same initial weights. The draws are indices from ``numpy.random.default_rng`` that depend
only on ``(seed, S, n, n_boot)``, never on predictions: adding or rescoring one variant leaves
every other variant's intervals exactly as they were.

A difference gets a plain verdict from its percentile interval: ``better`` (interval above 0),
``worse`` (below 0) or ``no evidence``. With 4 tasks × several minority classes × 4 differences
many intervals are read at once, so a few verdicts other than "no evidence" are expected by
chance alone (no multiplicity correction). With few seeds, resampling them understates the
seed variance by a factor ``(S − 1) / S``; read intervals from 3 seeds as optimistic.

Relabelled test labels (the study's setting, never the headline): when the relabel stage relabelled
test, the predictions also carry ``{task}_true_relabelled``; :func:`run_compare` then repeats the
comparison on those labels (same draws, same variants) and stores it under ``"test_relabelled"``
in the JSON and in its own, clearly titled section of the Markdown. Without those columns the
outputs are exactly as before.

Minority classes are those whose share in the original training manifest is below
``minority_share``; they are highlighted in the Markdown report and the plots, and get their
own verdict table, because a variant that lifts macro-F1 by helping majority classes is not what
the project is after.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medicsynth.io import write_json, write_text
from medicsynth.labels import CLASSES, TASKS, LabelError, validate_label
from medicsynth.manifest import read_manifest
from medicsynth.metrics import (
    joint_bootstrap_confusions,
    metrics_from_confusion,
    percentile_ci,
    summarise_diff,
    task_report,
)
from medicsynth.plots import plot_compare, plot_compare_diffs

MINORITY_MARK = "★"
VERDICTS: tuple[str, ...] = ("better", "no evidence", "worse")
METHOD = ("two-way bootstrap: each resample draws the training seeds and the test images with "
          "replacement, the same draws for every variant and task (paired)")


class PredictionsError(ValueError):
    """A predictions file that cannot be compared: names the file, row and value."""


@dataclass
class Predictions:
    """One variant's test predictions, rows in file order.

    ``y_true``/``y_pred`` hold class indices per task; ``probs`` holds ``(n, C)`` arrays for the
    tasks whose file has every ``{task}_prob_{class}`` column.
    """

    variant: str
    path: Path
    image_path: np.ndarray
    y_true: dict[str, np.ndarray]
    y_pred: dict[str, np.ndarray]
    probs: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return [t for t in TASKS if t in self.y_true]

    def reorder(self, order: np.ndarray) -> Predictions:
        """The same predictions with rows taken in ``order``."""
        return Predictions(
            self.variant,
            self.path,
            self.image_path[order],
            {t: v[order] for t, v in self.y_true.items()},
            {t: v[order] for t, v in self.y_pred.items()},
            {t: v[order] for t, v in self.probs.items()},
        )


def _labels_column(df: pd.DataFrame, column: str, task: str, path: Path) -> np.ndarray:
    values = df[column].to_numpy()
    lookup: dict[str, int] = {}
    for value in pd.unique(values):
        try:
            lookup[value] = CLASSES[task].index(validate_label(task, value))
        except LabelError as exc:
            row = int(np.flatnonzero(values == value)[0]) + 2  # header is line 1
            raise PredictionsError(f"{path}: row {row}: column {column}: {exc}") from None
    return np.array([lookup[v] for v in values], dtype=np.int64)


RELABELLED_TRUTH = "true_relabelled"  # column suffix of the relabelled test labels (evaluate stage)


def has_relabelled_truth(path: str | Path) -> bool:
    """Whether a predictions TSV carries relabelled test labels (``{task}_true_relabelled``) for every task
    that has ``{task}_true``."""
    header = Path(path).open(encoding="utf-8").readline().rstrip("\n").split("\t")
    tasks = [t for t in TASKS if f"{t}_true" in header]
    return bool(tasks) and all(f"{t}_{RELABELLED_TRUTH}" in header for t in tasks)


def read_predictions(path: str | Path, variant: str, truth: str = "true") -> Predictions:
    """Read and validate one predictions TSV (see the module docstring for the columns).

    ``truth`` is the suffix of the label column scored against: ``true`` (the original test
    labels, the default) or ``true_relabelled`` (:data:`RELABELLED_TRUTH`).

    Raises :class:`PredictionsError` naming the file, and the TSV line and value where one is at
    fault: missing ``image_path``, a task with only one of ``_true``/``_pred``, an unknown label,
    a duplicate ``image_path``, an incomplete or non-numeric set of probability columns.
    """
    path = Path(path)
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    if "image_path" not in df.columns:
        raise PredictionsError(f"{path}: missing column image_path")
    if len(df) == 0:
        raise PredictionsError(f"{path}: no rows")
    dup = df["image_path"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise PredictionsError(
            f"{path}: row {i + 2}: duplicate image_path {df['image_path'].iloc[i]!r}"
        )
    y_true, y_pred, probs = {}, {}, {}
    for task in TASKS:
        has = [f"{task}_{kind}" in df.columns for kind in (truth, "pred")]
        if not any(has):
            continue
        if not all(has):
            missing = f"{task}_pred" if has[0] else f"{task}_{truth}"
            raise PredictionsError(f"{path}: has {task} labels but no column {missing}")
        y_true[task] = _labels_column(df, f"{task}_{truth}", task, path)
        y_pred[task] = _labels_column(df, f"{task}_pred", task, path)
        prob_cols = [f"{task}_prob_{c}" for c in CLASSES[task]]
        present = [c for c in prob_cols if c in df.columns]
        if present and len(present) != len(prob_cols):
            missing = sorted(set(prob_cols) - set(present))
            raise PredictionsError(f"{path}: incomplete probabilities for {task}: no {', '.join(missing)}")
        if present:
            block = df[prob_cols].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
            bad = ~np.isfinite(block) | (block < 0) | (block > 1)
            if bad.any():
                i, j = (int(v) for v in np.argwhere(bad)[0])
                raise PredictionsError(
                    f"{path}: row {i + 2}: column {prob_cols[j]}: {df[prob_cols[j]].iloc[i]!r} "
                    "is not a probability in [0, 1]"
                )
            probs[task] = block
    if not y_true:
        raise PredictionsError(
            f"{path}: no task columns; expected {{task}}_true and {{task}}_pred for tasks of "
            + ", ".join(TASKS)
        )
    return Predictions(variant, path, df["image_path"].to_numpy(), y_true, y_pred, probs)


def train_shares(manifest_path: str | Path) -> dict[str, dict[str, float]]:
    """Share of every class of every task among the rows of a training manifest."""
    df = read_manifest(manifest_path)
    if len(df) == 0:
        raise ValueError(f"{manifest_path}: no rows")
    counts = {t: df[t].value_counts() for t in TASKS}
    return {t: {c: float(counts[t].get(c, 0)) / len(df) for c in CLASSES[t]} for t in TASKS}


def minority_classes(shares: Mapping[str, Mapping[str, float]], threshold: float) -> dict[str, list[str]]:
    """Classes with a training share strictly below ``threshold``, per task, in schema order."""
    return {t: [c for c in CLASSES[t] if shares[t][c] < threshold] for t in shares}


def _align(baseline: Predictions, other: Predictions) -> Predictions:
    # Rows are matched by image_path; a variant scored on different images is not comparable.
    base = pd.Index(baseline.image_path)
    mine = pd.Index(other.image_path)
    missing = base.difference(mine)
    extra = mine.difference(base)
    if len(missing) or len(extra):
        example = (missing if len(missing) else extra)[0]
        raise PredictionsError(
            f"{other.path}: {other.variant} covers different test images than {baseline.variant} "
            f"({baseline.path}): {len(missing)} missing, {len(extra)} extra (e.g. {example!r})"
        )
    return other.reorder(mine.get_indexer(base))


def _check_same_truth(baseline: Predictions, other: Predictions, task: str) -> None:
    diff = np.flatnonzero(baseline.y_true[task] != other.y_true[task])
    if len(diff):
        i = int(diff[0])
        raise PredictionsError(
            f"{other.path}: {task}_true differs from {baseline.path} on {len(diff)} image(s), e.g. "
            f"{other.image_path[i]!r}: {CLASSES[task][other.y_true[task][i]]!r} vs "
            f"{CLASSES[task][baseline.y_true[task][i]]!r}; every variant must be scored on the "
            "original test labels"
        )



def verdict(diff: Mapping[str, Any]) -> str:
    """``better`` / ``worse`` when the interval of a difference lies above / below 0, else ``no evidence``."""
    if diff.get("low") is None:
        return "no evidence"
    if diff["low"] > 0:
        return "better"
    if diff["high"] < 0:
        return "worse"
    return "no evidence"


def seed_draws(n_seeds: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n_seeds)`` seed positions drawn with replacement; depends only on the arguments.

    Drawn from ``numpy.random.default_rng([seed, 1])``, a stream separate from the test-image
    draws of :func:`medicsynth.metrics.joint_bootstrap_confusions` (``default_rng(seed)``).
    """
    if n_seeds < 1:
        raise ValueError("need at least one training seed")
    return np.random.default_rng([seed, 1]).integers(0, n_seeds, size=(n_boot, n_seeds))


def _mean_over_drawn_seeds(values: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """``values`` ``(B, V, S, ...)`` averaged over the seeds each resample drew: ``(B, V, ...)``."""
    b, v = values.shape[:2]
    picked = values[np.arange(b)[:, None, None], np.arange(v)[None, :, None], draws[:, None, :]]
    return np.nanmean(picked, axis=2) if np.isnan(picked).any() else picked.mean(axis=2)


def _score(per_seed: np.ndarray, boot: np.ndarray, alpha: float, seeds: Sequence[int]) -> dict[str, Any]:
    """``{"mean", "sd", "low", "high", "per_seed"}`` of one variant: ``per_seed`` ``(S,)``, ``boot`` ``(B,)``."""
    low, high = percentile_ci(boot, alpha)
    return {"mean": float(per_seed.mean()),
            "sd": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0,
            "low": low, "high": high,
            "per_seed": {str(s): float(x) for s, x in zip(seeds, per_seed)}}


def _diff(per_seed: np.ndarray, boot: np.ndarray, alpha: float) -> dict[str, Any]:
    """A difference's mean over seeds, interval, p-value and verdict (``per_seed`` ``(S,)``)."""
    out = summarise_diff(float(per_seed.mean()), boot, alpha)
    out["verdict"] = verdict(out)
    return out


# --------------------------------------------------------------------------------------------
# Steps of compare_variants
# --------------------------------------------------------------------------------------------


def check_runs(runs: Mapping[str, Sequence[Predictions]], baseline: str) -> tuple[list[str], list[str], list[Predictions]]:
    """Step 1: validate and align the runs; returns ``(variants, tasks, flat)``.

    ``runs`` maps each variant to its predictions, one per training seed, every variant with
    the same number of seeds. ``variants`` starts with ``baseline``; ``flat`` lists the runs
    variant by variant (``V × S``), rows aligned on the baseline's first run by ``image_path``.
    ``tasks`` are the tasks every run predicts. Raises :class:`PredictionsError` for a missing
    baseline, a run on other images or with other test labels, or no common task.
    """
    if baseline not in runs:
        raise PredictionsError(f"baseline variant {baseline!r} has no predictions")
    variants = [baseline] + [v for v in runs if v != baseline]
    n_seeds = {v: len(runs[v]) for v in variants}
    if len(set(n_seeds.values())) != 1 or not n_seeds[baseline]:
        raise ValueError(f"every variant needs the same, non-zero number of seeds; got {n_seeds}")
    ref = runs[baseline][0]
    flat = [ref] + [_align(ref, p) for v in variants for p in runs[v]][1:]
    tasks = [t for t in ref.tasks if all(t in p.y_true for p in flat)]
    if not tasks:
        raise PredictionsError("no task is predicted by every variant")
    for t in tasks:
        for p in flat[1:]:
            _check_same_truth(ref, p, t)
    return variants, tasks, flat


def bootstrap_task_metrics(flat: Sequence[Predictions], tasks: Sequence[str], n_variants: int, n_boot: int,
                           seed: int) -> list[dict[str, np.ndarray]]:
    """Step 2: per task, resampled metrics averaged over the drawn seeds.

    Every run is scored on the same ``n_boot`` test-image draws
    (:func:`medicsynth.metrics.joint_bootstrap_confusions`); then each resample averages each
    variant over its seed draw (:func:`seed_draws`). Returns per task
    ``{"macro_f1": (B, V), "accuracy": (B, V), "f1": (B, V, C)}``.
    """
    n_seeds = len(flat) // n_variants
    cms = joint_bootstrap_confusions(
        [flat[0].y_true[t] for t in tasks], [[p.y_pred[t] for p in flat] for t in tasks],
        [len(CLASSES[t]) for t in tasks], n_boot=n_boot, seed=seed,
    )
    draws = seed_draws(n_seeds, n_boot, seed)
    out = []
    for t, cm in zip(tasks, cms):
        m = metrics_from_confusion(cm)  # (B, V*S[, C])
        out.append({
            key: _mean_over_drawn_seeds(m[key].reshape(n_boot, n_variants, n_seeds, *m[key].shape[2:]), draws)
            for key in ("macro_f1", "accuracy", "f1")
        })
    return out


def point_task_metrics(flat: Sequence[Predictions], tasks: Sequence[str], n_variants: int) -> list[dict[str, Any]]:
    """Step 3: per task, each run's metrics on the full test set.

    Returns per task ``{"macro_f1": (V, S), "accuracy": (V, S), "f1": (V, S, C), "ece": {variant
    index: (S,)} (variants whose every run has probabilities), "support": {class: n}}``.
    """
    n_seeds = len(flat) // n_variants
    out = []
    for t in tasks:
        reports = [task_report(flat[0].y_true[t], p.y_pred[t], CLASSES[t], p.probs.get(t)) for p in flat]
        shape = (n_variants, n_seeds)
        # ECE of the variants whose every seed has probabilities: {variant index: (S,)}.
        ece = {k: np.array([r["ece"] for r in reports[k * n_seeds:(k + 1) * n_seeds]]) for k in range(n_variants)
               if all("ece" in r for r in reports[k * n_seeds:(k + 1) * n_seeds])}
        out.append({
            "macro_f1": np.array([r["macro_f1"] for r in reports]).reshape(shape),
            "accuracy": np.array([r["accuracy"] for r in reports]).reshape(shape),
            "f1": np.array([[r["per_class"][c]["f1"] for c in CLASSES[t]] for r in reports]).reshape(*shape, -1),
            "ece": ece,
            "support": {c: reports[0]["per_class"][c]["support"] for c in CLASSES[t]},
        })
    return out


def task_table(task: str, variants: Sequence[str], seeds: Sequence[int], point: Mapping[str, Any],
               boot: Mapping[str, np.ndarray], alpha: float, minority: set[str],
               shares: Mapping[str, Mapping[str, float]] | None) -> dict[str, Any]:
    """Step 4: one task's entry: per-variant scores, per-class F1, differences to the baseline.

    ``{"macro_f1": {v: score}, "accuracy": {v: score}, "ece": {v: mean}, "classes": {c: {"support",
    "train_share", "minority", "f1": {v: score}}}, "diff": {"<v>-<base>": {"macro_f1": diff,
    "accuracy": diff, "per_class_f1": {c: diff}}}}`` where a score is :func:`_score` and a diff
    :func:`_diff`. A class without test samples has no interval and the verdict ``no evidence``.
    """
    entry: dict[str, Any] = {
        key: {v: _score(point[key][k], boot[key][:, k], alpha, seeds) for k, v in enumerate(variants)}
        for key in ("macro_f1", "accuracy")
    }
    if point["ece"]:
        entry["ece"] = {v: float(point["ece"][k].mean()) for k, v in enumerate(variants) if k in point["ece"]}
    support = point["support"]
    entry["classes"] = {
        c: {"support": support[c], "train_share": float(shares[task][c]) if shares else None,
            "minority": c in minority,
            "f1": {v: _score(point["f1"][k, :, j], boot["f1"][:, k, j], alpha, seeds) for k, v in enumerate(variants)}}
        for j, c in enumerate(CLASSES[task])
    }
    diffs = {}
    for k, v in enumerate(variants[1:], start=1):
        per_class = {}
        for j, c in enumerate(CLASSES[task]):
            d = point["f1"][k, :, j] - point["f1"][0, :, j]
            per_class[c] = (_diff(d, boot["f1"][:, k, j] - boot["f1"][:, 0, j], alpha) if support[c]
                            else {"diff": float(d.mean()), "low": None, "high": None, "p_value": None,
                                  "significant": False, "verdict": "no evidence"})
        diffs[f"{v}-{variants[0]}"] = {
            key: _diff(point[key][k] - point[key][0], boot[key][:, k] - boot[key][:, 0], alpha)
            for key in ("macro_f1", "accuracy")
        } | {"per_class_f1": per_class}
    entry["diff"] = diffs
    return entry


def mean_over_tasks(variants: Sequence[str], seeds: Sequence[int], points: Sequence[Mapping[str, Any]],
                    boots: Sequence[Mapping[str, np.ndarray]], alpha: float) -> tuple[dict, dict]:
    """Step 5: ``(scores, diffs)`` of the mean macro-F1 over tasks (resample by resample)."""
    point = np.mean([p["macro_f1"] for p in points], axis=0)  # (V, S)
    boot = np.mean([b["macro_f1"] for b in boots], axis=0)  # (B, V)
    scores = {v: _score(point[k], boot[:, k], alpha, seeds) for k, v in enumerate(variants)}
    diffs = {f"{v}-{variants[0]}": _diff(point[k] - point[0], boot[:, k] - boot[:, 0], alpha)
             for k, v in enumerate(variants[1:], start=1)}
    return scores, diffs


def verdict_table(result_tasks: Mapping[str, Any], mean_diff: Mapping[str, Any]) -> dict[str, Any]:
    """Step 6: per difference, the verdicts on mean macro-F1, each task and each minority class."""
    out = {}
    for key, d in mean_diff.items():
        out[key] = {
            "mean_macro_f1": d["verdict"],
            "tasks": {t: e["diff"][key]["macro_f1"]["verdict"] for t, e in result_tasks.items()},
            "minority_classes": {f"{t}/{c}": e["diff"][key]["per_class_f1"][c]["verdict"]
                                 for t, e in result_tasks.items() for c, info in e["classes"].items()
                                 if info["minority"]},
        }
    return out


def compare_variants(
    runs: Mapping[str, Sequence[Predictions]],
    seeds: Sequence[int],
    *,
    baseline: str = "original",
    shares: Mapping[str, Mapping[str, float]] | None = None,
    minority_share: float = 0.10,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Per-task and per-class comparison of variants over training seeds, with two-way bootstrap intervals.

    Args:
        runs: ``{variant: [Predictions per training seed]}``, seeds in the order of ``seeds``,
            the same seeds for every variant; ``baseline`` must be among the variants.
        seeds: the training seeds (labels of the per-seed values).
        baseline: the variant the differences are taken against (``variant − baseline``).
        shares: training class shares (:func:`train_shares`) that define minority classes;
            ``None`` marks no class as minority.
        minority_share: a class with training share below this is a minority class.
        n_boot, seed: two-way bootstrap resamples and their seed (see the module docstring).
        ci: confidence level of the percentile intervals.

    Returns:
        A JSON-ready dict::

            {"baseline", "variants", "seeds", "tasks_compared", "n_test", "n_boot", "seed", "ci",
             "method", "minority_share", "notes",
             "mean_macro_f1": {variant: score},
             "mean_macro_f1_diff": {"<v>-<baseline>": diff},
             "tasks": {task: see task_table},
             "verdicts": {"<v>-<baseline>": {"mean_macro_f1", "tasks": {task: verdict},
                                              "minority_classes": {"task/class": verdict}}}}

        A score is ``{"mean", "sd", "low", "high", "per_seed": {seed: value}}`` (mean and sd over
        seeds, two-way bootstrap interval); a diff is ``{"diff", "low", "high", "p_value",
        "significant", "verdict"}`` with ``diff`` the mean over seeds of the per-seed difference.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if any(len(r) != len(seeds) for r in runs.values()):
        raise ValueError(f"every variant needs one run per seed {list(seeds)}")
    alpha = 1.0 - ci
    variants, tasks, flat = check_runs(runs, baseline)  # 1
    notes = [f"{t} not compared: not predicted by every run" for t in flat[0].tasks if t not in tasks]
    boots = bootstrap_task_metrics(flat, tasks, len(variants), n_boot, seed)  # 2
    points = point_task_metrics(flat, tasks, len(variants))  # 3
    minority = minority_classes(shares, minority_share) if shares else {}
    result_tasks = {t: task_table(t, variants, seeds, p, b, alpha, set(minority.get(t, [])), shares)  # 4
                    for t, p, b in zip(tasks, points, boots)}
    mean_scores, mean_diff = mean_over_tasks(variants, seeds, points, boots, alpha)  # 5
    return {
        "baseline": baseline,
        "variants": variants,
        "seeds": [int(s) for s in seeds],
        "tasks_compared": tasks,
        "n_test": int(len(flat[0].image_path)),
        "n_boot": int(n_boot),
        "seed": int(seed),
        "ci": float(ci),
        "method": METHOD,
        "minority_share": float(minority_share) if shares else None,
        "notes": notes,
        "mean_macro_f1": mean_scores,
        "mean_macro_f1_diff": mean_diff,
        "tasks": result_tasks,
        "verdicts": verdict_table(result_tasks, mean_diff),  # 6
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt_score(x: Mapping[str, Any]) -> str:
    return f"{x['mean']:.3f} ± {x['sd']:.3f} [{x['low']:.3f}, {x['high']:.3f}]"


def _fmt_diff(d: Mapping[str, Any]) -> str:
    if d.get("low") is None:
        return f"{d['diff']:+.3f} (no CI)"
    text = f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
    if d["verdict"] != "no evidence":
        return f"**{text} {d['verdict']}**"
    return text


def _class_cell(name: str, minority: bool) -> str:
    return f"**{MINORITY_MARK} {name}**" if minority else name


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _intro(result: Mapping[str, Any]) -> list[str]:
    pct = f"{result['ci'] * 100:g}%"
    lines = [
        f"Test set: {result['n_test']} images with their **original** labels. Every variant is trained "
        f"with seed{'s' if len(result['seeds']) > 1 else ''} {', '.join(map(str, result['seeds']))}; a score is the mean over seeds ± the sd over "
        f"seeds, with a {pct} interval. Intervals come from a {result['method']}, {result['n_boot']} "
        f"resamples (bootstrap seed {result['seed']}), so they include both seed and test-sample variance. "
        f"Differences are variant − {result['baseline']} (mean over seeds of the per-seed difference); "
        "verdict: **better** / **worse** when the interval excludes 0, else no evidence. Many intervals "
        "are read at once, so a few verdicts are expected by chance (no multiplicity correction); with "
        f"{len(result['seeds'])} seeds, resampling them understates seed variance by a factor "
        f"{len(result['seeds']) - 1}/{len(result['seeds'])}.",
    ]
    if result.get("minority_share") is not None:
        lines += ["", f"{MINORITY_MARK} **bold class** = minority class (share of the original training set "
                      f"< {result['minority_share'] * 100:g}%)."]
    skipped = result.get("skipped") or {}
    notes = list(result.get("notes") or [])
    if skipped or notes:
        lines.append("")
        lines += [f"- Variant **{v}** skipped: {reason}" for v, reason in skipped.items()]
        lines += [f"- {note}" for note in notes]
    return lines


def _verdict_section(result: Mapping[str, Any]) -> list[str]:
    keys = list(result["verdicts"])
    tasks = list(result["tasks"])
    rows = [["**mean macro-F1**", *[result["verdicts"][k]["mean_macro_f1"] for k in keys]]]
    rows += [[f"{t} macro-F1", *[result["verdicts"][k]["tasks"][t] for k in keys]] for t in tasks]
    minority = list(next(iter(result["verdicts"].values()))["minority_classes"]) if keys else []
    rows += [[f"{MINORITY_MARK} {name} F1", *[result["verdicts"][k]["minority_classes"][name] for k in keys]]
             for name in minority]
    return ["## Verdicts", "", *_table(["", *[k.replace("-", " − ") for k in keys]], rows)]


def _macro_section(result: Mapping[str, Any]) -> list[str]:
    variants = result["variants"]
    keys = list(result["mean_macro_f1_diff"])
    scores = [[v, ", ".join(f"{result['mean_macro_f1'][v]['per_seed'][str(s)]:.3f}" for s in result["seeds"]),
               _fmt_score(result["mean_macro_f1"][v]),
               *[_fmt_score(e["macro_f1"][v]) for e in result["tasks"].values()]] for v in variants]
    diffs = [[k.replace("-", " − "), _fmt_diff(result["mean_macro_f1_diff"][k]),
              *[_fmt_diff(e["diff"][k]["macro_f1"]) for e in result["tasks"].values()]] for k in keys]
    tasks = list(result["tasks"])
    return ["## Macro-F1 per task", "",
            *_table(["variant", "per seed (mean over tasks)", "mean over tasks", *tasks], scores), "",
            *_table(["difference", "mean over tasks", *tasks], diffs)]


def _minority_section(result: Mapping[str, Any]) -> list[str]:
    keys = list(result["mean_macro_f1_diff"])
    variants = result["variants"]
    rows = []
    for t, entry in result["tasks"].items():
        for c, info in entry["classes"].items():
            if info["minority"]:
                rows.append([f"{t} / {c}", str(info["support"]),
                             *[f"{info['f1'][v]['mean']:.3f} ± {info['f1'][v]['sd']:.3f}" for v in variants],
                             *[_fmt_diff(entry["diff"][k]["per_class_f1"][c]) for k in keys]])
    if not rows:
        return []
    return ["## Minority classes (F1)", "",
            *_table(["class", "test n", *variants, *[k.replace("-", " − ") for k in keys]], rows)]


def _task_section(result: Mapping[str, Any], task: str, entry: Mapping[str, Any]) -> list[str]:
    variants = result["variants"]
    keys = list(result["mean_macro_f1_diff"])
    extra = ["accuracy: " + ", ".join(f"{v} {_fmt_score(entry['accuracy'][v])}" for v in variants)]
    if "ece" in entry:
        extra.append("ECE (mean over seeds): " + ", ".join(f"{v} {e:.3f}" for v, e in entry["ece"].items()))
    rows = []
    for c, info in entry["classes"].items():
        share = "—" if info["train_share"] is None else f"{info['train_share'] * 100:.1f}%"
        rows.append([_class_cell(c, info["minority"]), share, str(info["support"]),
                     *[f"{info['f1'][v]['mean']:.3f} ± {info['f1'][v]['sd']:.3f}" for v in variants],
                     *[_fmt_diff(entry["diff"][k]["per_class_f1"][c]) for k in keys]])
    return [f"## {task}", "", *[line + "  " for line in extra], "",
            *_table(["class", "train share", "test n", *[f"{v} F1" for v in variants],
                     *[k.replace("-", " − ") for k in keys]], rows)]


def render_markdown(result: Mapping[str, Any], title: str | None = None) -> str:
    """The comparison as Markdown: method, macro-F1 tables, verdicts, minority classes, one table per task;
    then, when ``result`` has ``test_relabelled``, the same on the relabelled test labels, titled as such."""
    lines = [f"# {title or 'Variant comparison'}", "", *_intro(result), "", *_macro_section(result), "",
             *_verdict_section(result)]
    minority = _minority_section(result)
    if minority:
        lines += ["", *minority]
    for t, entry in result["tasks"].items():
        lines += ["", *_task_section(result, t, entry)]
    relabelled = result.get("test_relabelled")
    if relabelled:
        lines += ["", "# On the relabelled test labels (not the headline)", "",
                  f"The same predictions scored on the test labels as the relabel stage changed them "
                  f"({relabelled['n_test_changed']} of {relabelled['n_test']} test images have a changed label). "
                  "The study reported these; labels changed by the same voters that judge the models favour "
                  "them, so the scores above, on the original labels, are the headline.",
                  "", *[line.replace("## ", "### ", 1) if line.startswith("## ") else line
                        for line in [*_macro_section(relabelled), "", *_verdict_section(relabelled)]]]
    return "\n".join(lines) + "\n"


def plot_comparison(result: Mapping[str, Any], macro_path: str | Path, per_class_path: str | Path,
                    diff_path: str | Path) -> None:
    """Write the macro-F1 plot, the per-class F1 plot and the differences-to-baseline plot."""
    variants = result["variants"]
    tasks = result["tasks"]

    def bar(score: Mapping[str, Any]) -> dict[str, float]:
        return {"value": score["mean"], "low": score["low"], "high": score["high"]}

    pct = f"{result['ci'] * 100:g}%"
    seeds = len(result["seeds"])
    macro = {"macro-F1 per task": {v: {**{t: bar(tasks[t]["macro_f1"][v]) for t in tasks},
                                       "mean over tasks": bar(result["mean_macro_f1"][v])} for v in variants}}
    plot_compare(macro, macro_path, xlabel=f"macro-F1 (mean of {seeds} seeds)",
                 title=f"macro-F1 on original test labels ({pct} CI: seeds × test images)")
    per_class = {t: {v: {c: bar(info["f1"][v]) for c, info in tasks[t]["classes"].items()} for v in variants}
                 for t in tasks}
    minority = {(t, c) for t in tasks for c, info in tasks[t]["classes"].items() if info["minority"]}
    plot_compare(per_class, per_class_path, minority=minority, xlabel=f"F1 (mean of {seeds} seeds)",
                 title=f"per-class F1 ({pct} CI: seeds × test images; * orange = minority)")
    keys = list(result["mean_macro_f1_diff"])
    rows = {"mean macro-F1": {k: result["mean_macro_f1_diff"][k] for k in keys}}
    rows.update({f"{t} macro-F1": {k: tasks[t]["diff"][k]["macro_f1"] for k in keys} for t in tasks})
    rows.update({f"{t}/{c} F1": {k: tasks[t]["diff"][k]["per_class_f1"][c] for k in keys}
                 for t in tasks for c, info in tasks[t]["classes"].items() if info["minority"]})
    plot_compare_diffs(rows, diff_path, title=f"difference to {result['baseline']} ({pct} CI: seeds × test images)")


def compare_relabelled(runs: Mapping[str, Sequence[Predictions]], seeds: Sequence[int],
                       **kwargs: Any) -> dict[str, Any] | None:
    """:func:`compare_variants` of ``runs`` on the relabelled test labels, or ``None`` when the
    baseline's predictions carry none (test was not relabelled).

    Variants whose predictions lack ``{task}_true_relabelled`` (written before test was
    relabelled) are left out and named under ``"skipped"``. Adds ``n_test_changed``: test images
    with at least one relabelled label differing from the original.
    """
    baseline = kwargs.get("baseline", "original")
    if not all(has_relabelled_truth(p.path) for p in runs[baseline]):
        return None
    rel_runs, skipped = {}, {}
    for v, preds in runs.items():
        if all(has_relabelled_truth(p.path) for p in preds):
            rel_runs[v] = [read_predictions(p.path, v, truth=RELABELLED_TRUTH) for p in preds]
        else:
            skipped[v] = "predictions without relabelled test labels (evaluate ran before test was relabelled)"
    result = compare_variants(rel_runs, seeds, **kwargs)
    original, relabelled = runs[baseline][0], rel_runs[baseline][0]
    tasks = [t for t in TASKS if t in original.y_true and t in relabelled.y_true]
    changed = np.zeros(len(original.image_path), dtype=bool)
    for t in tasks:
        changed |= original.y_true[t] != relabelled.y_true[t]
    return {"labels": "relabelled test labels (relabel stage; original labels untouched in data/prepared/test.tsv)",
            "n_test_changed": int(changed.sum()), **result, "skipped": skipped}


def run_dir(predictions_dir: str | Path, variant: str, arch: str, seed: int) -> Path:
    """Where the evaluate stage writes one run's predictions: ``{dir}/{variant}-{arch}-s{seed}``."""
    return Path(predictions_dir) / f"{variant}-{arch}-s{seed}"


def run_compare(
    *,
    predictions_dir: str | Path,
    variants: Sequence[str],
    arch: str,
    seeds: Sequence[int],
    train_manifest: str | Path | None,
    out_json: str | Path,
    out_md: str | Path,
    macro_plot: str | Path,
    per_class_plot: str | Path,
    diff_plot: str | Path,
    baseline: str = "original",
    minority_share: float = 0.10,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Read ``{predictions_dir}/{variant}-{arch}-s{seed}/test.tsv`` per variant and seed, compare, write outputs.

    A variant lacking the predictions of any seed is skipped and listed under ``"skipped"`` (in
    the JSON and the report); the baseline is required with every seed. ``train_manifest`` (the
    original training set) defines minority classes; ``None`` disables the highlighting.
    Returns the result dict.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no training seeds to compare (params.yaml: train.seeds or compare.seeds)")
    if baseline not in variants:
        variants = [baseline, *variants]
    runs, skipped = {}, {}
    for v in dict.fromkeys(variants):
        paths = [run_dir(predictions_dir, v, arch, s) / "test.tsv" for s in seeds]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            if v == baseline:
                raise FileNotFoundError(f"predictions of the baseline variant {v!r} are required: "
                                        f"missing {', '.join(missing)}")
            skipped[v] = f"no predictions at {', '.join(missing)}"
            continue
        runs[v] = [read_predictions(p, v) for p in paths]
    shares = train_shares(train_manifest) if train_manifest is not None else None
    result = compare_variants(runs, seeds, baseline=baseline, shares=shares, minority_share=minority_share,
                              n_boot=n_boot, seed=seed, ci=ci)
    result = {"arch": arch, **result, "skipped": skipped,
              "train_manifest": None if train_manifest is None else str(train_manifest)}
    relabelled = compare_relabelled(runs, seeds, baseline=baseline, shares=shares, minority_share=minority_share,
                                    n_boot=n_boot, seed=seed, ci=ci)
    if relabelled is not None:
        result["test_relabelled"] = relabelled
    write_json(result, out_json)
    write_text(render_markdown(result, title=f"Variant comparison ({arch})"), out_md)
    plot_comparison(result, macro_plot, per_class_plot, diff_plot)
    return result
