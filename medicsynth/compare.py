"""Compare dataset variants (original, relabelled, augmented...) on the ORIGINAL test labels.

Input: one predictions TSV per variant (the evaluate stage writes
``data/predictions/{variant}-{arch}/test.tsv``) with ``image_path``, and per task
``{task}_true`` (original test label), ``{task}_pred`` (predicted class name) and optionally
``{task}_prob_{class}`` for every class of the task.

Every variant is scored on the same test images with the same labels, and all variants and tasks
share one set of paired bootstrap resamples of the test images
(:func:`medicsynth.metrics.joint_bootstrap_confusions`). So the interval of
"augmented − original" reflects the uncertainty of the difference itself, and the interval of the
mean macro-F1 over tasks is valid too. A difference is flagged ``significant`` when its interval
excludes 0; with 4 tasks × up to 7 classes × 2 differences many intervals are read at once, so a
few "significant" per-class flags are expected by chance alone (no multiplicity correction).

Minority classes are those whose share in the original training manifest is below
``minority_share``; they are highlighted in the Markdown report and the plots, because a
variant that lifts macro-F1 by helping majority classes is not what the project is after.
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

MINORITY_MARK = "★"


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


def read_predictions(path: str | Path, variant: str) -> Predictions:
    """Read and validate one predictions TSV (see the module docstring for the columns).

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
        has = [f"{task}_{kind}" in df.columns for kind in ("true", "pred")]
        if not any(has):
            continue
        if not all(has):
            missing = f"{task}_pred" if has[0] else f"{task}_true"
            raise PredictionsError(f"{path}: has {task} labels but no column {missing}")
        y_true[task] = _labels_column(df, f"{task}_true", task, path)
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


def _interval(value: float, boot: np.ndarray, alpha: float) -> dict[str, float]:
    low, high = percentile_ci(boot, alpha)
    return {"value": float(value), "low": low, "high": high}


def compare_variants(
    predictions: Sequence[Predictions],
    *,
    baseline: str = "original",
    shares: Mapping[str, Mapping[str, float]] | None = None,
    minority_share: float = 0.10,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Per-task and per-class comparison of variants with paired bootstrap intervals.

    Args:
        predictions: one :class:`Predictions` per variant; ``baseline`` must be among them.
        baseline: the variant the differences are taken against (``variant - baseline``).
        shares: training class shares (:func:`train_shares`) that define minority classes;
            ``None`` marks no class as minority.
        minority_share: a class with training share below this is a minority class.
        n_boot, seed: paired bootstrap resamples of the test images and their seed.
        ci: confidence level of the percentile intervals.

    Returns:
        A JSON-ready dict::

            {"baseline", "variants": [...], "n_test", "n_boot", "seed", "ci", "minority_share",
             "notes": [...],
             "mean_macro_f1": {variant: {"value", "low", "high"}},
             "mean_macro_f1_diff": {"<v>-<baseline>": {"diff", "low", "high", "p_value",
                                                       "significant"}},
             "tasks": {task: {
                 "macro_f1": {variant: {"value", "low", "high"}},
                 "accuracy": {variant: {...}},
                 "ece": {variant: float}            # variants with probabilities only
                 "classes": {class: {"support", "train_share", "minority",
                                     "f1": {variant: {"value", "low", "high"}}}},
                 "diff": {"<v>-<baseline>": {"macro_f1": {...}, "accuracy": {...},
                                             "per_class_f1": {class: {...}}}}}}}

        ``train_share`` is ``None`` without ``shares``. Per-class differences of a class with
        no test sample have ``None`` bounds and are never significant.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    by_name = {p.variant: p for p in predictions}
    if len(by_name) != len(predictions):
        raise ValueError("each variant may appear only once")
    if baseline not in by_name:
        raise PredictionsError(f"baseline variant {baseline!r} has no predictions")
    base = by_name[baseline]
    variants = [baseline] + [p.variant for p in predictions if p.variant != baseline]
    preds = [base] + [_align(base, by_name[v]) for v in variants[1:]]
    notes: list[str] = []
    tasks = [t for t in base.tasks if all(t in p.y_true for p in preds)]
    for t in base.tasks:
        if t not in tasks:
            lacking = [p.variant for p in preds if t not in p.y_true]
            notes.append(f"{t} not compared: no predictions from {', '.join(lacking)}")
    if not tasks:
        raise PredictionsError("no task is predicted by every variant")
    for t in tasks:
        for p in preds[1:]:
            _check_same_truth(base, p, t)

    alpha = 1.0 - ci
    boot_cms = joint_bootstrap_confusions(
        [base.y_true[t] for t in tasks],
        [[p.y_pred[t] for p in preds] for t in tasks],
        [len(CLASSES[t]) for t in tasks],
        n_boot=n_boot,
        seed=seed,
    )
    pairs = [(v, f"{v}-{baseline}") for v in variants[1:]]
    result_tasks: dict[str, Any] = {}
    boot_macro = []  # per task: (n_boot, K)
    point_macro = []  # per task: (K,)
    for t, cms in zip(tasks, boot_cms):
        reports = [
            task_report(base.y_true[t], p.y_pred[t], CLASSES[t], p.probs.get(t)) for p in preds
        ]
        boot = metrics_from_confusion(cms)  # arrays (n_boot, K[, C])
        macro = np.array([r["macro_f1"] for r in reports])
        acc = np.array([r["accuracy"] for r in reports])
        f1 = np.array([[r["per_class"][c]["f1"] for c in CLASSES[t]] for r in reports])  # (K, C)
        boot_macro.append(boot["macro_f1"])
        point_macro.append(macro)
        minority = set(minority_classes(shares, minority_share)[t]) if shares else set()
        entry: dict[str, Any] = {
            "macro_f1": {v: _interval(macro[k], boot["macro_f1"][:, k], alpha) for k, v in enumerate(variants)},
            "accuracy": {v: _interval(acc[k], boot["accuracy"][:, k], alpha) for k, v in enumerate(variants)},
        }
        ece = {v: r["ece"] for v, r in zip(variants, reports) if "ece" in r}
        if ece:
            entry["ece"] = ece
        support = reports[0]["per_class"]
        entry["classes"] = {
            c: {
                "support": support[c]["support"],
                "train_share": float(shares[t][c]) if shares else None,
                "minority": c in minority,
                "f1": {v: _interval(f1[k, j], boot["f1"][:, k, j], alpha) for k, v in enumerate(variants)},
            }
            for j, c in enumerate(CLASSES[t])
        }
        diffs: dict[str, Any] = {}
        for k, (v, key) in enumerate(pairs, start=1):
            per_class = {}
            for j, c in enumerate(CLASSES[t]):
                if support[c]["support"] == 0:
                    per_class[c] = {"diff": float(f1[k, j] - f1[0, j]), "low": None, "high": None,
                                    "p_value": None, "significant": False}
                else:
                    per_class[c] = summarise_diff(
                        f1[k, j] - f1[0, j], boot["f1"][:, k, j] - boot["f1"][:, 0, j], alpha
                    )
            diffs[key] = {
                "macro_f1": summarise_diff(
                    macro[k] - macro[0], boot["macro_f1"][:, k] - boot["macro_f1"][:, 0], alpha
                ),
                "accuracy": summarise_diff(
                    acc[k] - acc[0], boot["accuracy"][:, k] - boot["accuracy"][:, 0], alpha
                ),
                "per_class_f1": per_class,
            }
        entry["diff"] = diffs
        result_tasks[t] = entry

    # Mean macro-F1 over tasks, resample by resample (the resamples are shared across tasks).
    mean_boot = np.mean(np.stack(boot_macro), axis=0)  # (n_boot, K)
    mean_point = np.mean(np.stack(point_macro), axis=0)  # (K,)
    return {
        "baseline": baseline,
        "variants": variants,
        "tasks_compared": tasks,
        "n_test": int(len(base.image_path)),
        "n_boot": int(n_boot),
        "seed": int(seed),
        "ci": float(ci),
        "minority_share": float(minority_share) if shares else None,
        "notes": notes,
        "mean_macro_f1": {v: _interval(mean_point[k], mean_boot[:, k], alpha) for k, v in enumerate(variants)},
        "mean_macro_f1_diff": {
            key: summarise_diff(mean_point[k] - mean_point[0], mean_boot[:, k] - mean_boot[:, 0], alpha)
            for k, (v, key) in enumerate(pairs, start=1)
        },
        "tasks": result_tasks,
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt_interval(x: Mapping[str, Any]) -> str:
    if x.get("low") is None:
        return f"{x['value']:.3f}"
    return f"{x['value']:.3f} [{x['low']:.3f}, {x['high']:.3f}]"


def _fmt_diff(d: Mapping[str, Any]) -> str:
    if d.get("low") is None:
        return f"{d['diff']:+.3f} (no CI)"
    text = f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
    if d["significant"]:
        return f"**{text}** {'↑' if d['diff'] > 0 else '↓'}"
    return text


def _class_cell(name: str, minority: bool) -> str:
    return f"**{MINORITY_MARK} {name}**" if minority else name


def render_markdown(result: Mapping[str, Any], title: str | None = None) -> str:
    """The comparison as Markdown: a macro-F1 summary table and one per-class table per task."""
    variants = result["variants"]
    baseline = result["baseline"]
    diff_keys = [f"{v}-{baseline}" for v in variants[1:]]
    pct = f"{result['ci'] * 100:g}%"
    lines = [f"# {title or 'Variant comparison'}", ""]
    lines.append(
        f"Test set: {result['n_test']} images with their **original** labels. Intervals: {pct} "
        f"percentile intervals from {result['n_boot']} paired bootstrap resamples of the test "
        f"images (seed {result['seed']}), shared by all variants and tasks. Differences are "
        f"variant − {baseline}; **bold** with ↑/↓ = the interval excludes 0. With many classes "
        "some per-class flags are expected by chance (no multiplicity correction)."
    )
    if result.get("minority_share") is not None:
        lines.append("")
        lines.append(
            f"{MINORITY_MARK} **bold class** = minority class (share of the original training set "
            f"< {result['minority_share'] * 100:g}%)."
        )
    skipped = result.get("skipped") or {}
    notes = list(result.get("notes") or [])
    if skipped or notes:
        lines.append("")
        for v, reason in skipped.items():
            lines.append(f"- Variant **{v}** skipped: {reason}")
        for note in notes:
            lines.append(f"- {note}")
    lines += ["", "## Macro-F1 per task", ""]
    header = ["task", *variants, *[k.replace("-", " − ") for k in diff_keys]]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for t, entry in result["tasks"].items():
        cells = [t, *[_fmt_interval(entry["macro_f1"][v]) for v in variants],
                 *[_fmt_diff(entry["diff"][k]["macro_f1"]) for k in diff_keys]]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["**mean over tasks**", *[_fmt_interval(result["mean_macro_f1"][v]) for v in variants],
             *[_fmt_diff(result["mean_macro_f1_diff"][k]) for k in diff_keys]]
    lines.append("| " + " | ".join(cells) + " |")

    for t, entry in result["tasks"].items():
        lines += ["", f"## {t}", ""]
        extra = ["accuracy: " + ", ".join(f"{v} {_fmt_interval(entry['accuracy'][v])}" for v in variants)]
        if "ece" in entry:
            extra.append("ECE: " + ", ".join(f"{v} {e:.3f}" for v, e in entry["ece"].items()))
        lines += [line + "  " for line in extra] + [""]
        header = ["class", "train share", "test n", *[f"{v} F1" for v in variants],
                  *[k.replace("-", " − ") for k in diff_keys]]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for c, info in entry["classes"].items():
            share = "—" if info["train_share"] is None else f"{info['train_share'] * 100:.1f}%"
            cells = [_class_cell(c, info["minority"]), share, str(info["support"]),
                     *[_fmt_interval(info["f1"][v]) for v in variants],
                     *[_fmt_diff(entry["diff"][k]["per_class_f1"][c]) for k in diff_keys]]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(result: Mapping[str, Any], macro_path: str | Path, per_class_path: str | Path) -> None:
    """Write the macro-F1 plot (tasks × variants) and the per-class F1 plot (one panel per task)."""
    from medicsynth.plots import plot_compare

    variants = result["variants"]
    tasks = result["tasks"]
    macro = {"macro-F1 per task": {v: {t: tasks[t]["macro_f1"][v] for t in tasks} for v in variants}}
    macro["macro-F1 per task"] = {
        v: {**groups, "mean over tasks": result["mean_macro_f1"][v]}
        for v, groups in macro["macro-F1 per task"].items()
    }
    plot_compare(macro, macro_path, xlabel="macro-F1",
                 title=f"macro-F1 on original test labels ({result['ci'] * 100:g}% bootstrap CI)")
    per_class = {
        t: {v: {c: info["f1"][v] for c, info in tasks[t]["classes"].items()} for v in variants}
        for t in tasks
    }
    minority = {(t, c) for t in tasks for c, info in tasks[t]["classes"].items() if info["minority"]}
    plot_compare(per_class, per_class_path, minority=minority, xlabel="F1",
                 title=f"per-class F1 ({result['ci'] * 100:g}% bootstrap CI; * orange = minority)")


def run_compare(
    *,
    predictions_dir: str | Path,
    variants: Sequence[str],
    arch: str,
    train_manifest: str | Path | None,
    out_json: str | Path,
    out_md: str | Path,
    macro_plot: str | Path,
    per_class_plot: str | Path,
    baseline: str = "original",
    minority_share: float = 0.10,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Read ``{predictions_dir}/{variant}-{arch}/test.tsv`` per variant, compare, write outputs.

    Variants without a predictions file are skipped and listed under ``"skipped"`` (in the JSON
    and the report); the baseline is required. ``train_manifest`` (the original training set)
    defines minority classes; ``None`` disables the highlighting. Returns the result dict.
    """
    if baseline not in variants:
        variants = [baseline, *variants]
    loaded, skipped = [], {}
    for v in dict.fromkeys(variants):
        path = Path(predictions_dir) / f"{v}-{arch}" / "test.tsv"
        if not path.exists():
            if v == baseline:
                raise FileNotFoundError(f"{path}: predictions of the baseline variant {v!r} are required")
            skipped[v] = f"no predictions at {path}"
            continue
        loaded.append(read_predictions(path, v))
    shares = train_shares(train_manifest) if train_manifest is not None else None
    result = compare_variants(loaded, baseline=baseline, shares=shares, minority_share=minority_share,
                              n_boot=n_boot, seed=seed, ci=ci)
    result = {"arch": arch, **result, "skipped": skipped,
              "train_manifest": None if train_manifest is None else str(train_manifest)}
    write_json(result, out_json)
    write_text(render_markdown(result, title=f"Variant comparison ({arch})"), out_md)
    plot_comparison(result, macro_plot, per_class_plot)
    return result


