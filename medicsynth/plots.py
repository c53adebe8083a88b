"""All PNG plots of the pipeline: allocation, the filter grid, evaluation reports, comparisons.

Figures are built with :class:`matplotlib.figure.Figure` directly rather than ``pyplot``: no
global figure registry to leak, no interactive backend to select, and PNGs render with Agg on
headless machines. Every plot is written atomically (temp file + rename).

Minority classes are marked the same way everywhere: orange bars, a ``*`` before the class name,
and the name in bold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from medicsynth.io import atomic_path
from medicsynth.labels import CLASSES, TASKS
from medicsynth.manifest import resolve_file
from medicsynth.shards import open_image
from medicsynth.sampling import round_robin

MINORITY_COLOUR = "#e67e22"
MAJORITY_COLOUR = "#3b75af"
#: Colours of the variants in comparison plots, in order of appearance.
VARIANT_COLOURS = ("#7f7f7f", "#3b75af", "#2ca02c", "#9467bd", "#d62728", "#8c564b")
MINORITY_MARK = "*"


def _save(fig: Figure, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return Path(path)


def _is_minority(minority: Iterable[Any] | None, panel: str, name: str) -> bool:
    # Class names are unique across MEDIC's tasks, so a bare class name is unambiguous; a
    # (task, class) pair is accepted too for callers that carry the task.
    if not minority:
        return False
    return name in minority or (panel, name) in minority


def _label(name: str, minority: bool) -> str:
    return f"{MINORITY_MARK} {name}" if minority else name


def _style_minority_ticks(labels, flags: Sequence[bool]) -> None:
    for text, flag in zip(labels, flags):
        if flag:
            text.set_fontweight("bold")
            text.set_color(MINORITY_COLOUR)


def plot_confusion(
    cm: Any,
    classes: Sequence[str],
    title: str,
    path: str | Path,
    normalise: bool = True,
) -> Path:
    """Heatmap of a confusion matrix (rows = true class, columns = predicted class).

    With ``normalise`` each row is divided by its support, so cells read as "share of the true
    class predicted as ..." and the diagonal is per-class recall; each cell also shows the raw
    count. Rows without samples stay 0. Returns ``path``.
    """
    cm = np.asarray(cm, dtype=np.float64)
    c = len(classes)
    if cm.shape != (c, c):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {c} classes")
    support = cm.sum(axis=1, keepdims=True)
    shown = np.divide(cm, support, out=np.zeros_like(cm), where=support > 0) if normalise else cm
    size = max(4.0, 0.9 * c + 2.5)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalise else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
                 label="share of true class" if normalise else "count")
    threshold = (shown.max() or 1) / 2
    for i in range(c):
        for j in range(c):
            text = f"{shown[i, j]:.2f}\n({int(cm[i, j])})" if normalise else f"{int(cm[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if shown[i, j] > threshold else "black")
    ax.set_xticks(range(c), labels=classes, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(c), labels=[f"{name} (n={int(n)})" for name, n in zip(classes, support[:, 0])],
                  fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def plot_per_class_f1(
    report: Mapping[str, Any],
    path: str | Path,
    minority: Iterable[Any] | None = None,
) -> Path:
    """Per-class F1 of a :func:`medicsynth.metrics.classification_report`, one panel per task.

    Bars are sorted by test support (largest on top), annotated with F1 and ``n=support``;
    minority classes (names, or ``(task, class)`` pairs) are orange, starred and bold. The panel
    title carries the task's macro-F1. Returns ``path``.
    """
    tasks = [t for t in TASKS if t in report["tasks"]]
    if not tasks:
        raise ValueError("report has no task to plot")
    minority = set(minority or ())
    ncols = min(2, len(tasks))
    nrows = int(np.ceil(len(tasks) / ncols))
    fig = Figure(figsize=(7.0 * ncols, 3.2 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(tasks):]:
        ax.set_visible(False)
    for ax, task in zip(axes, tasks):
        per_class = report["tasks"][task]["per_class"]
        names = sorted(per_class, key=lambda c: -per_class[c]["support"])[::-1]
        f1 = [per_class[c]["f1"] for c in names]
        flags = [_is_minority(minority, task, c) for c in names]
        y = np.arange(len(names))
        ax.barh(y, f1, color=[MINORITY_COLOUR if f else MAJORITY_COLOUR for f in flags])
        for yi, c, v in zip(y, names, f1):
            ax.text(min(v, 1.0) + 0.01, yi, f"{v:.2f}  n={per_class[c]['support']}",
                    va="center", fontsize=8)
        ax.set_yticks(y, labels=[_label(c, f) for c, f in zip(names, flags)], fontsize=8)
        _style_minority_ticks(ax.get_yticklabels(), flags)
        ax.set_xlim(0, 1.3)
        ax.set_xticks(np.linspace(0, 1, 6))
        ax.set_xlabel("F1")
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(f"{task} (macro-F1 {report['tasks'][task]['macro_f1']:.3f})", fontsize=10)
    if minority:
        fig.suptitle(f"per-class F1 ({MINORITY_MARK} orange = minority class)", fontsize=11)
    return _save(fig, path)


def plot_compare(
    scores: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]],
    path: str | Path,
    *,
    minority: Iterable[Any] | None = None,
    xlabel: str = "F1",
    title: str | None = None,
) -> Path:
    """Grouped horizontal bars with confidence intervals, one panel per key of ``scores``.

    Args:
        scores: ``{panel: {variant: {group: {"value": v, "low": l, "high": h}}}}``; e.g. panels
            = tasks and groups = classes (per-class F1), or one panel with groups = tasks
            (macro-F1). ``low``/``high`` may be ``None`` (no error bar). Groups are drawn in the
            order of the first variant; every variant must have the same groups.
        minority: group names (or ``(panel, group)`` pairs) to highlight.
        xlabel, title: axis label and figure title.

    Returns ``path``.
    """
    panels = list(scores)
    if not panels:
        raise ValueError("nothing to plot")
    minority = set(minority or ())
    n_groups = max(len(next(iter(scores[p].values()))) for p in panels)
    n_variants = max(len(scores[p]) for p in panels)
    ncols = 1 if len(panels) == 1 else 2
    nrows = int(np.ceil(len(panels) / ncols))
    panel_height = 1.0 + n_groups * (0.13 * n_variants + 0.2)
    fig = Figure(figsize=(7.5 * ncols, panel_height * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes, panels):
        variants = list(scores[panel])
        groups = list(scores[panel][variants[0]])
        for v in variants[1:]:
            if list(scores[panel][v]) != groups:
                raise ValueError(f"{panel}: variant {v!r} has groups {list(scores[panel][v])}, "
                                 f"expected {groups}")
        flags = [_is_minority(minority, panel, g) for g in groups]
        height = 0.8 / len(variants)
        # Reversed so the first group is on top, as in a table.
        base = np.arange(len(groups))[::-1].astype(np.float64)
        for i, flag in enumerate(flags):
            if flag:
                ax.axhspan(base[i] - 0.45, base[i] + 0.45, color=MINORITY_COLOUR, alpha=0.12, lw=0)
        for k, v in enumerate(variants):
            y = base + 0.4 - height * (k + 0.5)
            vals = np.array([scores[panel][v][g]["value"] for g in groups], dtype=np.float64)
            lows = [scores[panel][v][g].get("low") for g in groups]
            highs = [scores[panel][v][g].get("high") for g in groups]
            err = np.array([[0.0 if lo is None else max(0.0, val - lo) for val, lo in zip(vals, lows)],
                            [0.0 if hi is None else max(0.0, hi - val) for val, hi in zip(vals, highs)]])
            ax.barh(y, vals, height=height * 0.9, xerr=err, capsize=2,
                    color=VARIANT_COLOURS[k % len(VARIANT_COLOURS)], label=v,
                    error_kw={"elinewidth": 0.9, "ecolor": "black"})
            for yi, val, hi in zip(y, vals, highs):
                right = val if hi is None else max(val, hi)
                ax.text(right + 0.01, yi, f"{val:.3f}", va="center", fontsize=7)
        ax.set_yticks(base, labels=[_label(g, f) for g, f in zip(groups, flags)], fontsize=8)
        _style_minority_ticks(ax.get_yticklabels(), flags)
        ax.set_xlim(0, 1.15)
        ax.set_xticks(np.linspace(0, 1, 6))
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(panel, fontsize=10)
    # One legend for the figure, below the panels, so it covers neither a bar nor the title.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# allocate: class shares before / after the planned synthetic images.


def plot_allocation(metrics: dict[str, Any], path: str | Path) -> None:
    """Per-task bar chart of class shares, real train vs real + planned, counts on the bars.

    ``metrics`` is :func:`medicsynth.allocation.allocate`'s ``metrics`` (``per_class`` with
    ``share_before``/``share_after``/``real``/``planned`` per class). Written atomically.
    """
    fig = Figure(figsize=(13, 8.5))
    axes = fig.subplots(2, 2)
    for ax, task in zip(axes.ravel(), TASKS):
        stats = metrics["per_class"][task]
        names = list(CLASSES[task])
        x = range(len(names))
        before = [100 * stats[c]["share_before"] for c in names]
        after = [100 * stats[c]["share_after"] for c in names]
        bars_b = ax.bar([i - 0.2 for i in x], before, 0.4, label="real train", color="#8c8c8c")
        bars_a = ax.bar([i + 0.2 for i in x], after, 0.4, label="real + planned", color="#d95f02")
        for bar, c in zip(bars_b, names):
            ax.annotate(str(stats[c]["real"]), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
        for bar, c in zip(bars_a, names):
            ax.annotate(f"+{stats[c]['planned']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, color="#d95f02")
        ax.set_xticks(list(x))
        ax.set_xticklabels([n.replace("_", " ") for n in names], rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("share of task (%)")
        ax.set_title(task)
        # Headroom so the legend and the count labels never cover the tallest bars.
        ax.set_ylim(0, 1.3 * max(before + after + [1.0]))
        ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.suptitle(
        f"allocate ({metrics['mode']}): {metrics['total']} planned images over "
        f"{metrics['combinations_planned']} combinations, {metrics['real_train']} real"
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


# ---------------------------------------------------------------------------------------------
# filter: kept vs rejected synthetic images per disaster type (the grid shows images: a private output).


_SHORT_TASK = {"damage_severity": "damage", "informative": "inform.", "humanitarian": "human.", "disaster_types": "disaster"}


def _filter_caption(row: pd.Series) -> str:
    reason = row["reason"]
    p = row.get("p_intended_disaster_types")
    p_txt = f" p={float(p):.2f}" if p is not None and pd.notna(p) and p != "" else ""
    if reason == "kept":
        return f"kept{p_txt}"
    if reason == "duplicate_synthetic":
        return f"dup synth d={int(row['dup_synthetic_dist'])}"
    if reason == "duplicate_real":
        return f"dup real d={int(row['dup_real_dist'])}"
    if reason == "blank":
        cause = str(row.get("blank_cause", ""))
        if "low_std" in cause:
            return f"blank std={float(row['pixel_std']):.1f}"
        if "dominant_colour" in cause:
            return f"blank 1 colour {float(row['dominant_share']):.0%}"
        return "blank (gen. flag)"
    if reason == "label_mismatch":
        worst = min(
            (t for t in TASKS if f"p_intended_{t}" in row and pd.notna(row[f"p_intended_{t}"])),
            key=lambda t: float(row[f"p_intended_{t}"]),
            default=None,
        )
        if worst is None:
            return "label mismatch"
        return f"label {_SHORT_TASK[worst]} p={float(row[f'p_intended_{worst}']):.2f}"
    if reason == "judge_disagrees":
        wrong = [t for t in TASKS if row.get(f"judge_agree_{t}") is False]
        return "judge: " + (str(row[f"judge_{wrong[0]}"])[:14] if wrong else "disagrees")
    if reason == "judge_failed":
        return "judge failed"
    return reason.replace("_", " ")


def _spread_reasons(rows: pd.DataFrame, k: int) -> pd.DataFrame:
    # Rejected samples round-robin over reasons, so one frequent reason does not hide the others.
    groups = [g.index for _, g in rows.groupby("reason", sort=True)]
    return rows.loc[round_robin(groups, k)]


def _thumbnail(path: str, cell: int) -> np.ndarray:
    try:
        with open_image(path) as im:  # a file or a shard member
            im.draft("RGB", (cell, cell))
            rgb = im.convert("RGB")
    except Exception:
        return np.full((cell, cell, 3), 128, dtype=np.uint8)
    if max(rgb.size) > cell:
        rgb.thumbnail((cell, cell), Image.Resampling.LANCZOS)
    # Small images (64 px demo renders) are enlarged with nearest so pixels stay honest.
    scale = cell / max(rgb.size)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    return np.asarray(rgb.resize(size, Image.Resampling.NEAREST))


def plot_filter_grid(
    decisions: pd.DataFrame,
    path: str | Path,
    *,
    root: str | Path = ".",
    per_class: int = 4,
    cell: int = 96,
    seed: int = 0,
) -> None:
    """PNG grid: one row per disaster type, ``per_class`` kept then ``per_class`` rejected samples.

    Captions give the decision (``kept`` with the intended-label probability, or the rejection
    reason with its measurement). Written atomically.
    """
    classes = CLASSES["disaster_types"]
    cols = 2 * per_class
    fig = Figure(figsize=(cols * 1.15 + 1.2, len(classes) * 1.3))
    axes = fig.subplots(len(classes), cols, squeeze=False)
    rng = np.random.default_rng(seed)
    for r, cls in enumerate(classes):
        rows = decisions[decisions["disaster_types"] == cls]
        kept = rows[rows["kept"].astype(bool)]
        rejected = rows[~rows["kept"].astype(bool)]
        if len(kept) > per_class:
            kept = kept.loc[np.sort(rng.choice(kept.index.to_numpy(), per_class, replace=False))]
        rejected = _spread_reasons(rejected.sample(frac=1.0, random_state=seed), per_class) if len(rejected) else rejected
        samples = [("kept", row) for _, row in kept.iterrows()] + [("rej", row) for _, row in rejected.iterrows()]
        slots = list(range(len(kept))) + [per_class + j for j in range(len(rejected))]
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        for slot, (kind, row) in zip(slots, samples):
            ax = axes[r, slot]
            ax.imshow(_thumbnail(resolve_file(row["file"], root), cell), interpolation="nearest")
            colour = "#1a7f37" if kind == "kept" else "#b42318"
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color(colour)
                spine.set_linewidth(2)
            ax.set_title(_filter_caption(row), fontsize=6.5, color=colour, pad=2)
        if not len(kept):
            axes[r, 0].text(0.5, 0.5, "none kept", ha="center", va="center", fontsize=7, transform=axes[r, 0].transAxes)
        if not len(rejected):
            axes[r, per_class].text(0.5, 0.5, "none rejected", ha="center", va="center", fontsize=7,
                                    transform=axes[r, per_class].transAxes)
        n_kept = int(rows["kept"].astype(bool).sum())
        axes[r, 0].set_ylabel(f"{cls}\n{n_kept}/{len(rows)} kept", fontsize=7.5, rotation=0, ha="right", va="center",
                              labelpad=6)
    fig.suptitle("filter: kept (green, left) vs rejected (red, right) per disaster type", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def plot_compare_diffs(
    rows: Mapping[str, Mapping[str, Mapping[str, Any]]],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Forest plot of differences to a baseline: one row per quantity, one marker per comparison.

    Args:
        rows: ``{row label: {comparison: {"diff", "low", "high", "verdict"}}}`` (e.g. row labels =
            "mean macro-F1", tasks and minority classes; comparisons = "augmented-original"...).
            ``low``/``high`` may be ``None`` (marker without interval). Every row must list the
            same comparisons.
        title: figure title.

    Intervals that exclude 0 (verdict better/worse) are drawn solid, the others faded; a
    vertical line marks 0. Returns ``path``.
    """
    labels = list(rows)
    if not labels:
        raise ValueError("nothing to plot")
    comparisons = list(rows[labels[0]])
    fig = Figure(figsize=(8.0, 1.2 + 0.32 * len(labels) * max(1, len(comparisons)) ** 0.5), layout="constrained")
    ax = fig.add_subplot()
    base = np.arange(len(labels))[::-1].astype(np.float64)
    step = 0.8 / max(1, len(comparisons))
    for k, name in enumerate(comparisons):
        y = base + 0.4 - step * (k + 0.5)
        for yi, label in zip(y, labels):
            d = rows[label][name]
            solid = d.get("verdict", "no evidence") != "no evidence"
            colour = VARIANT_COLOURS[(k + 1) % len(VARIANT_COLOURS)]
            if d.get("low") is not None:
                ax.hlines(yi, d["low"], d["high"], color=colour, alpha=1.0 if solid else 0.45, lw=2)
            ax.plot([d["diff"]], [yi], "o", color=colour, alpha=1.0 if solid else 0.6, ms=4,
                    label=name if yi == y[0] else None)
    ax.axvline(0.0, color="black", lw=0.8)
    flags = ["/" in label for label in labels]  # per-class rows are the minority classes
    ax.set_yticks(base, labels=[_label(g, f) for g, f in zip(labels, flags)], fontsize=8)
    _style_minority_ticks(ax.get_yticklabels(), flags)
    ax.set_xlabel("difference (solid: interval excludes 0)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_relabel_changes(changes: Any, path: str | Path) -> Path:
    """Bars of labels changed *from* and *to* each class, one panel per task.

    ``changes`` is the relabel stage's change table (a DataFrame with ``task``, ``old``, ``new``
    and a boolean ``changed`` column); only changed rows are counted. Returns ``path``.
    """
    from medicsynth.labels import CLASSES

    fig = Figure(figsize=(4.2 * len(TASKS), 3.6), layout="constrained")
    axes = fig.subplots(1, len(TASKS))
    for ax, task in zip(axes, TASKS):
        sub = changes[(changes["task"] == task) & changes["changed"].astype(bool)]
        classes = list(CLASSES[task])
        to_ = [int((sub["new"] == c).sum()) for c in classes]
        from_ = [int((sub["old"] == c).sum()) for c in classes]
        x = np.arange(len(classes))
        ax.bar(x - 0.2, from_, 0.4, label="changed from")
        ax.bar(x + 0.2, to_, 0.4, label="changed to")
        ax.set_xticks(x, [c[:14] for c in classes], rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{task} ({len(sub)} changes)", fontsize=9)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_diffusion_losses(logs: Mapping[str, Any], path: str | Path, smooth: int = 20) -> Path:
    """adapt's training curves: one panel per phase (``logs``: name -> an object with ``name``,
    ``steps`` and per-step ``losses``), the raw loss and its moving average over ``smooth``
    steps, log scale; written atomically. No wall-clock figure: the plot is a tracked output."""
    fig = Figure(figsize=(4.2 * max(1, len(logs)), 3.2))
    for k, (_, log) in enumerate(logs.items()):
        ax = fig.add_subplot(1, len(logs), k + 1)
        y = np.asarray(log.losses, dtype=float)
        ax.plot(np.arange(1, len(y) + 1), y, color="#bbbbbb", lw=0.6, label="step")
        if len(y) >= smooth:
            ma = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
            ax.plot(np.arange(smooth, len(y) + 1), ma, color="#3b75af", lw=1.5, label=f"mean of {smooth}")
        ax.set_title(f"{log.name}: {log.steps} steps")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)


def plot_placeholder(path: str | Path, text: str) -> Path:
    """A small PNG that only says ``text``: a declared plot of a stage that had nothing to draw
    (e.g. ``adapt.mode: off``), so DVC still finds the output it was promised."""
    fig = Figure(figsize=(4, 1.2))
    fig.text(0.5, 0.5, text, ha="center", va="center")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)


def plot_zeroshot(rows: Sequence[Mapping[str, Any]], path: str | Path, note: str = "",
                  strategies: Sequence[str] = ()) -> Path:
    """The zero-shot comparison in one picture: mean macro-F1 over tasks per prompting strategy
    (x, in order of appearance) and model (bars), ours solid, the study's published figures
    hatched and labelled as the study's (measured on its relabelled test labels, so not
    comparable with ours). Rows without a score are left out.

    Args:
        rows: :func:`medicsynth.zeroshot.comparison_table` rows (``provider`` — ``None`` on the
            study's rows —, ``model``, ``strategy``, ``images``, ``mean_macro_f1``).
        path: PNG to write (atomically).
        note: a line under the title (e.g. why our rows are missing).
        strategies: the order of the x axis (strategies with no row are dropped; strategies
            not listed follow in order of appearance).
    """
    rows = [r for r in rows if r.get("mean_macro_f1") is not None]
    present = list(dict.fromkeys(r["strategy"] for r in rows))
    strategies = [s for s in strategies if s in present] + [s for s in present if s not in strategies]
    series: dict[tuple[bool, str], dict[str, float]] = {}
    for r in rows:
        ours = r["provider"] is not None  # the study's rows have no provider
        name = f"ours: {r['provider']}/{r['model']}" if ours else f"study: {r['model']} ({r['images']} img)"
        series.setdefault((ours, name), {})[r["strategy"]] = float(r["mean_macro_f1"])
    fig = Figure(figsize=(max(6.0, 1.6 * len(strategies) + 4.5), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(series))
    x = np.arange(len(strategies))
    for i, ((ours, name), values) in enumerate(series.items()):
        ys = [values.get(s, np.nan) for s in strategies]
        ax.bar(x - 0.4 + width * (i + 0.5), ys, width, label=name,
               color=matplotlib.colormaps["tab20"](i % 20), alpha=1.0 if ours else 0.5,
               hatch=None if ours else "//", edgecolor="black" if ours else "grey", linewidth=0.5)
    ax.set_xticks(x, [s.replace("_", "\n") for s in strategies], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean macro-F1 over tasks")
    title = "Zero-shot VLMs by prompting strategy (hatched: the study's figures, relabelled test labels)"
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=9, loc="left")
    if series:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return _save(fig, path)
