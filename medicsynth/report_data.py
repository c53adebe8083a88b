"""Tolerant readers of the pipeline's outputs for the report: one accessor per report section.

Every accessor takes the paths it reads, returns plain dicts/lists (or ``None`` when its input
does not exist yet) and never raises on a *missing* optional key: the pipeline's outputs change
shape while the project grows (seeds, more variants, verdict labels in ``compare.json``), and a
report that dies on a new key helps nobody. A present but unreadable file does raise, naming it.

Shapes returned are documented per function; values are floats in [0, 1] unless noted.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medicsynth.labels import CLASSES, TASKS
from medicsynth.metrics import confusion_counts
from medicsynth.sampling import round_robin

#: Short task names for narrow tables and ``metrics/summary.json`` keys.
SHORT_TASK = {"damage_severity": "damage", "informative": "inform", "humanitarian": "human", "disaster_types": "disaster"}
VERDICTS = ("better", "no evidence", "worse")
#: ``metrics/summary.json`` keys: short enough that ``dvc exp show --only-changed`` over a
#: ``mix_ratio`` experiment (which changes two variants: augmented and the oversampled baseline
#: that copies its composition) prints all twelve headline columns and the ratio within 200
#: columns (with the full names, 17-character headers, DVC folded half of them into "…").
#: Variants not listed keep their names.
HEADLINE_VARIANT = {"original": "orig", "relabelled": "relab", "augmented": "aug", "oversampled": "over",
                    "classic_aug": "classic"}
HEADLINE_TASK = {"damage_severity": "dmg", "informative": "inf", "humanitarian": "hum", "disaster_types": "dis"}


class ReportInputError(ValueError):
    """An input file exists but cannot be read; the message names the file and the fix."""


def read_json_opt(path: str | Path) -> Any | None:
    """The parsed JSON at ``path``, or ``None`` when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportInputError(f"{path}: not valid JSON ({exc}); rerun the stage that writes it") from exc


def read_tsv_opt(path: str | Path) -> pd.DataFrame | None:
    """A TSV as strings (no NA conversion), or ``None`` when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ReportInputError(f"{path}: unreadable TSV ({exc}); rerun the stage that writes it") from exc


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def point(entry: Any) -> dict[str, float | None]:
    """``{"value", "low", "high", "sd"}`` from a compare.json cell.

    Accepts ``{"value"|"mean", "low", "high", "sd"?}`` (seeds add ``sd``), a bare number, or
    ``None``; missing parts are ``None``.
    """
    if isinstance(entry, Mapping):
        value = entry.get("value", entry.get("mean"))
        return {"value": _num(value), "low": _num(entry.get("low")), "high": _num(entry.get("high")),
                "sd": _num(entry.get("sd"))}
    return {"value": _num(entry), "low": None, "high": None, "sd": None}


def verdict_of(diff: Mapping[str, Any]) -> str:
    """``better`` / ``no evidence`` / ``worse`` for one difference entry of compare.json.

    Uses the entry's own ``verdict`` when present; otherwise: an interval that excludes 0
    (``significant`` true, or ``low > 0`` / ``high < 0``) gives the sign's verdict.
    """
    given = diff.get("verdict")
    if isinstance(given, str) and given:
        return given.replace("_", " ")
    d, low, high = _num(diff.get("diff")), _num(diff.get("low")), _num(diff.get("high"))
    significant = diff.get("significant")
    if significant is None and low is not None and high is not None:
        significant = low > 0 or high < 0
    if significant and d is not None:
        return "better" if d > 0 else "worse" if d < 0 else "no evidence"
    return "no evidence"


# ------------------------------------------------------------------------------------------
# Section: verdict


def verdict_data(compare: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Headline comparison from ``metrics/compare.json``.

    Returns ``{"variants": [...], "baseline", "tasks": [...], "scores": [{variant, task, value,
    low, high, sd}], "diffs": [{comparison, variant, task, diff, low, high, p_value, verdict}],
    "meta": {arch, n_test, n_boot, ci, seeds, notes}}`` where ``task`` includes ``"mean"`` (mean
    macro-F1 over tasks). ``None`` without compare.json.
    """
    if not compare:
        return None
    variants = list(compare.get("variants") or list((compare.get("mean_macro_f1") or {}).keys()))
    tasks = [t for t in (compare.get("tasks_compared") or list((compare.get("tasks") or {}).keys()))]
    scores: list[dict[str, Any]] = []
    for v, entry in (compare.get("mean_macro_f1") or {}).items():
        scores.append({"variant": v, "task": "mean", **point(entry)})
    for task in tasks:
        for v, entry in (((compare.get("tasks") or {}).get(task) or {}).get("macro_f1") or {}).items():
            scores.append({"variant": v, "task": task, **point(entry)})
    diffs: list[dict[str, Any]] = []

    def add_diff(key: str, task: str, d: Mapping[str, Any]) -> None:
        variant = key.split("-")[0] if "-" in key else key
        diffs.append({"comparison": key.replace("-", " − ", 1), "variant": variant, "task": task,
                      "diff": _num(d.get("diff")), "low": _num(d.get("low")), "high": _num(d.get("high")),
                      "p_value": _num(d.get("p_value")), "verdict": verdict_of(d)})

    for key, d in (compare.get("mean_macro_f1_diff") or {}).items():
        if isinstance(d, Mapping):
            add_diff(key, "mean", d)
    for task in tasks:
        for key, d in ((((compare.get("tasks") or {}).get(task) or {}).get("diff")) or {}).items():
            m = d.get("macro_f1") if isinstance(d, Mapping) else None
            if isinstance(m, Mapping):
                add_diff(key, task, m)
    meta = {k: compare.get(k) for k in ("arch", "n_test", "n_boot", "ci", "seeds", "notes", "baseline")}
    return {"variants": variants, "baseline": compare.get("baseline", variants[0] if variants else None),
            "tasks": tasks, "scores": scores, "diffs": diffs, "meta": meta,
            "skipped": compare.get("skipped") or {}}


# ------------------------------------------------------------------------------------------
# Section: per-class F1


def per_class_data(compare: Mapping[str, Any] | None) -> list[dict[str, Any]] | None:
    """Per-class test F1 per variant: ``[{task, class, variant, value, low, high, sd, minority,
    support, train_share, diff_verdicts: {comparison: verdict}}]``; ``None`` without compare.json."""
    if not compare:
        return None
    rows = []
    for task, t in (compare.get("tasks") or {}).items():
        diffs = t.get("diff") or {}
        for cls, c in (t.get("classes") or {}).items():
            verdicts = {}
            for key, d in diffs.items():
                pc = (d.get("per_class_f1") or {}).get(cls) if isinstance(d, Mapping) else None
                if isinstance(pc, Mapping):
                    verdicts[key] = verdict_of(pc)
            for v, entry in (c.get("f1") or {}).items():
                rows.append({"task": task, "class": cls, "variant": v, **point(entry),
                             "minority": bool(c.get("minority")), "support": c.get("support"),
                             "train_share": _num(c.get("train_share")), "diff_verdicts": verdicts})
    return rows


# ------------------------------------------------------------------------------------------
# Section: confusion matrices


def model_dirs(predictions_dir: str | Path, variants: Sequence[str], arch: str | None) -> dict[str, Path]:
    """One predictions directory per variant: ``<variant>-<arch>`` if present, else the first
    ``<variant>-<arch>-s<seed>`` (seed runs) in name order. Variants without one are left out."""
    root = Path(predictions_dir)
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    names = sorted(p.name for p in root.iterdir() if (p / "test.tsv").exists())
    for v in variants:
        prefix = f"{v}-{arch}" if arch else f"{v}-"
        exact = [n for n in names if n == prefix]
        seeded = [n for n in names if re.fullmatch(re.escape(prefix) + (r"-s\d+" if arch else r".*"), n)]
        pick = (exact or seeded or [None])[0]
        if pick:
            found[v] = root / pick
    return found


def confusion_data(dirs: Mapping[str, Path]) -> dict[str, dict[str, Any]]:
    """``{variant: {"model": dir name, "tasks": {task: (C, C) int array, rows = true}}}`` from the
    predictions TSVs (``{task}_true``/``{task}_pred`` columns, schema class order)."""
    out: dict[str, dict[str, Any]] = {}
    for v, d in dirs.items():
        df = read_tsv_opt(d / "test.tsv")
        if df is None:
            continue
        tasks = {}
        for task in TASKS:
            if f"{task}_true" not in df or f"{task}_pred" not in df:
                continue
            index = {c: i for i, c in enumerate(CLASSES[task])}
            try:
                yt = np.array([index[x] for x in df[f"{task}_true"]], dtype=np.int64)
                yp = np.array([index[x] for x in df[f"{task}_pred"]], dtype=np.int64)
            except KeyError as exc:
                raise ReportInputError(f"{d / 'test.tsv'}: unknown {task} label {exc}; rerun evaluate") from None
            tasks[task] = confusion_counts(yt, yp, len(CLASSES[task]))
        out[v] = {"model": d.name, "tasks": tasks}
    return out


# ------------------------------------------------------------------------------------------
# Section: training curves


def training_curves(train_dir: str | Path) -> list[dict[str, Any]]:
    """Per-epoch DVCLive logs: ``[{model, metric, step, value}]`` from
    ``<train_dir>/<model>/plots/metrics/**.tsv`` (metric = path below ``metrics/`` without
    ``.tsv``, e.g. ``dev_macro_f1/informative``). Empty when nothing was trained yet."""
    rows: list[dict[str, Any]] = []
    root = Path(train_dir)
    if not root.is_dir():
        return rows
    for tsv in sorted(root.glob("*/plots/metrics/**/*.tsv")):
        model = tsv.relative_to(root).parts[0]
        metric = tsv.relative_to(root / model / "plots" / "metrics").with_suffix("").as_posix()
        df = read_tsv_opt(tsv)
        if df is None or "step" not in df.columns or len(df.columns) < 2:
            continue
        col = [c for c in df.columns if c not in ("step", "timestamp")][0]
        for step, value in zip(df["step"], df[col]):
            s, val = _num(step), _num(value)
            if s is not None and val is not None:
                rows.append({"model": model, "metric": metric, "step": int(s), "value": val})
    return rows


# ------------------------------------------------------------------------------------------
# Section: relabelling


def relabel_data(relabel: Mapping[str, Any] | None, changes: pd.DataFrame | None, clean: pd.DataFrame | None,
                 examples_per_task: int) -> dict[str, Any] | None:
    """What relabelling changed.

    Returns ``{"summary": {flagged_images, changed_images, voters, consensus, flag},
    "per_task": [{task, flagged, changed, precision?, recall?}], "per_class": [{task, class,
    changed}], "examples": [{task, image_path, old, new, votes: {voter: answer}, clean?}]}``.
    Examples: up to ``examples_per_task`` changed labels per task, spread over the (old → new)
    pairs, most frequent pair first, image_path order within a pair (deterministic).
    """
    if relabel is None and changes is None:
        return None
    relabel = relabel or {}
    against = relabel.get("against_clean_labels") or {}
    per_task = []
    for task in TASKS:
        row = {"task": task, "flagged": (relabel.get("flagged_labels") or {}).get(task),
               "changed": (relabel.get("changed_labels") or {}).get(task)}
        if isinstance(against.get(task), Mapping):
            row["precision"] = _num(against[task].get("precision"))
            row["recall"] = _num(against[task].get("recall"))
        per_task.append(row)
    per_class = [{"task": task, "class": cls, "changed": int(n)}
                 for task, classes in (relabel.get("changes_per_class") or {}).items()
                 for cls, n in classes.items()]
    examples: list[dict[str, Any]] = []
    if changes is not None and len(changes):
        changed = changes[changes.get("changed", pd.Series("", index=changes.index)).str.lower().isin(["true", "1"])]
        vote_cols = [c for c in changes.columns if c.startswith("vote_")]
        clean_map = {}
        if clean is not None and "image_path" in clean.columns:
            clean_map = clean.set_index("image_path").to_dict(orient="index")
        for task in TASKS:
            t = changed[changed["task"] == task].sort_values("image_path", kind="stable")
            if t.empty:
                continue
            # Turns over the (old, new) changes, most frequent first: rare changes get shown too.
            groups = [g for _, g in sorted(t.groupby(["old", "new"]), key=lambda kv: (-len(kv[1]), kv[0]))]
            turns = round_robin([[(g, i) for i in range(len(g))] for g in groups], examples_per_task)
            for r in (g.iloc[i] for g, i in turns):
                ex = {"task": task, "image_path": r["image_path"], "old": r["old"], "new": r["new"],
                      "votes": {c[len("vote_"):]: r[c] for c in vote_cols}}
                if r["image_path"] in clean_map and task in clean_map[r["image_path"]]:
                    ex["clean"] = clean_map[r["image_path"]][task]
                examples.append(ex)
    summary = {k: relabel.get(k) for k in ("flag", "voters", "consensus", "images", "flagged_images", "changed_images")}
    summary["mean_precision"] = _num(against.get("mean_precision"))
    summary["mean_recall"] = _num(against.get("mean_recall"))
    return {"summary": summary, "per_task": per_task, "per_class": per_class, "examples": examples}


# ------------------------------------------------------------------------------------------
# Section: allocation


def allocation_data(allocate: Mapping[str, Any] | None, allocation: pd.DataFrame | None,
                    top: int) -> dict[str, Any] | None:
    """Synthetic budget. ``{"summary": {...}, "per_class": [{task, class, real, planned,
    share_before, share_after}], "combinations": [{labels..., real_count, count, reason}],
    "combinations_total": int}``; combinations sorted by planned count (desc), first ``top``."""
    if allocate is None and allocation is None:
        return None
    allocate = allocate or {}
    per_class = [{"task": task, "class": cls, "real": c.get("real"), "planned": c.get("planned"),
                  "share_before": _num(c.get("share_before")), "share_after": _num(c.get("share_after"))}
                 for task, classes in (allocate.get("per_class") or {}).items() for cls, c in classes.items()]
    combos: list[dict[str, Any]] = []
    total = 0
    if allocation is not None and len(allocation):
        df = allocation.copy()
        df["_count"] = pd.to_numeric(df.get("count", 0), errors="coerce").fillna(0).astype(int)
        df = df.sort_values(["_count", *[t for t in TASKS if t in df.columns]], ascending=[False] + [True] * sum(t in df.columns for t in TASKS), kind="stable")
        total = len(df)
        for _, r in df.head(top).iterrows():
            combos.append({**{t: r.get(t, "") for t in TASKS}, "real_count": r.get("real_count", ""),
                           "count": int(r["_count"]), "reason": r.get("reason", "")})
    summary = {k: allocate.get(k) for k in ("mode", "rounding", "total", "real_train", "combinations_seen", "combinations_planned")}
    return {"summary": summary, "per_class": per_class, "combinations": combos, "combinations_total": total}


# ------------------------------------------------------------------------------------------
# Section: synthetic images


def synthetic_data(decisions: pd.DataFrame | None, captions: pd.DataFrame | None, task: str,
                   per_class: int) -> dict[str, list[dict[str, Any]]] | None:
    """A grid per class of ``task``: ``{class: [{image_path, file, labels: {task: label},
    caption, mode, kept, reason, p_intended: {task: p}}]}``. Per class up to ``per_class``
    images: kept and rejected alternate (kept first) so both decisions are seen, plan-id order."""
    if decisions is None:
        return None
    if task not in CLASSES:
        raise ReportInputError(f"params.yaml report.synthetic_task: unknown task {task!r}; use one of {', '.join(TASKS)}")
    modes = {}
    if captions is not None and {"id", "mode"} <= set(captions.columns):
        modes = dict(zip(captions["id"], captions["mode"]))
    df = decisions.copy()
    key = "plan_id" if "plan_id" in df.columns else "image_path"
    df = df.sort_values(key, kind="stable")
    grid: dict[str, list[dict[str, Any]]] = {}
    for cls in CLASSES[task]:
        rows = df[df[task] == cls] if task in df.columns else df.iloc[0:0]
        kept = rows[rows.get("reason", pd.Series("", index=rows.index)) == "kept"]
        rejected = rows[rows.get("reason", pd.Series("", index=rows.index)) != "kept"]
        order: list[pd.Series] = []
        ki = ri = 0
        while len(order) < per_class and (ki < len(kept) or ri < len(rejected)):
            if ki < len(kept):
                order.append(kept.iloc[ki])
                ki += 1
            if ri < len(rejected) and len(order) < per_class:
                order.append(rejected.iloc[ri])
                ri += 1
        cells = []
        for r in order:
            p = {t: _num(r.get(f"p_intended_{t}")) for t in TASKS if f"p_intended_{t}" in r.index}
            cells.append({"image_path": r.get("image_path", ""), "file": r.get("file", r.get("image_path", "")),
                          "labels": {t: r.get(t, "") for t in TASKS}, "caption": r.get("caption", ""),
                          "mode": modes.get(r.get("plan_id", ""), ""), "kept": r.get("reason") == "kept",
                          "reason": r.get("reason", ""), "p_intended": {t: v for t, v in p.items() if v is not None}})
        grid[cls] = cells
    return grid


# ------------------------------------------------------------------------------------------
# Section: fidelity


def fidelity_data(filter_metrics: Mapping[str, Any] | None, decisions: pd.DataFrame | None,
                  captions: pd.DataFrame | None) -> dict[str, Any] | None:
    """Generator fidelity: agreement of the original model with the intended labels.

    ``{"summary": {method, tasks_checked, total, kept, kept_share}, "rejected": {reason: n},
    "per_class": [{task, class, agreement, kept_share}], "per_mode": [{mode, task, agreement, n}],
    "judge": {task: agreement} | None}``. ``per_mode`` joins the decisions with the captions'
    ``mode`` (template / grounded / hypothetical) on the plan id.
    """
    if filter_metrics is None and decisions is None:
        return None
    fm = filter_metrics or {}
    clf = fm.get("classifier") or {}
    per_class = []
    for task, classes in (clf.get("agreement_per_class") or {}).items():
        for cls, a in classes.items():
            kept = (((fm.get("per_class") or {}).get(task) or {}).get(cls) or {}).get("kept_share")
            per_class.append({"task": task, "class": cls, "agreement": _num(a), "kept_share": _num(kept)})
    per_mode = []
    if decisions is not None and captions is not None and "plan_id" in decisions.columns and {"id", "mode"} <= set(captions.columns):
        df = decisions.merge(captions[["id", "mode"]], left_on="plan_id", right_on="id", how="left")
        for mode, g in df.groupby(df["mode"].replace("", "unknown").fillna("unknown"), sort=True):
            for task in TASKS:
                col = f"agree_{task}"
                if col not in g.columns:
                    continue
                vals = g[col].str.lower()
                scored = vals.isin(["true", "false"])
                if scored.any():
                    per_mode.append({"mode": mode, "task": task, "n": int(scored.sum()),
                                     "agreement": float((vals[scored] == "true").mean())})
    summary = {k: fm.get(k) for k in ("method", "tasks_checked", "total", "kept", "kept_share")}
    return {"summary": summary, "rejected": fm.get("rejected") or {}, "agreement": clf.get("agreement") or {},
            "per_class": per_class, "per_mode": per_mode, "judge": (fm.get("judge") or {}).get("agreement")}


# ------------------------------------------------------------------------------------------
# Section: paid usage and cost


def _usage_entries(stage: str, usage: Any, model: str | None) -> list[dict[str, Any]]:
    if not isinstance(usage, Mapping) or not usage:
        return []
    if any(k in usage for k in ("requests", "api_calls", "input_tokens")):
        return [{"stage": stage, "what": "", "model": model, **{k: usage.get(k) for k in
                 ("requests", "api_calls", "cache_hits", "input_tokens", "output_tokens", "failed")}}]
    out = []
    for what, u in usage.items():  # {voter|mode: usage}
        for e in _usage_entries(stage, u, model if not isinstance(model, Mapping) else model.get(what)):
            e["what"] = what
            out.append(e)
    return out


def usage_data(metrics: Mapping[str, Any], params: Mapping[str, Any], prices: Mapping[str, Mapping[str, float]],
               timings: Mapping[str, Any]) -> dict[str, Any]:
    """Paid LLM/VLM calls and wall-clock time per stage.

    ``metrics`` maps stage name → its metrics JSON (or None); ``prices`` maps a model id →
    ``{"input": USD per 1M input tokens, "output": ...}``; ``timings`` maps stage → the JSON of
    ``timing/<stage>.json`` when present. Returns ``{"rows": [{stage, what, model, requests,
    api_calls, cache_hits, input_tokens, output_tokens, failed, cost_usd | None}],
    "total_cost_usd", "unpriced": [model...], "seconds": [{stage, seconds, source}]}``. Only
    API calls are priced: cache hits cost nothing (the answers are stored locally).
    """
    relabel_p = params.get("relabel") or {}
    entries: list[dict[str, Any]] = []
    entries += _usage_entries("relabel", (metrics.get("relabel") or {}).get("usage"),
                              {v: (relabel_p.get(v) or {}).get("model") for v in ("openai", "anthropic")})
    entries += _usage_entries("caption", (metrics.get("caption") or {}).get("llm_usage"),
                              ((params.get("caption") or {}).get("llm") or {}).get("model"))
    entries += _usage_entries("filter", (metrics.get("filter") or {}).get("judge"),
                              ((params.get("filter") or {}).get("vlm") or {}).get("model"))
    entries += _usage_entries("zeroshot", (metrics.get("zeroshot") or {}).get("usage"),
                              (params.get("zeroshot") or {}).get("model"))
    total, unpriced = 0.0, set()
    for e in entries:
        price = prices.get(e["model"] or "")
        tin, tout = _num(e.get("input_tokens")) or 0.0, _num(e.get("output_tokens")) or 0.0
        if price is None:
            e["cost_usd"] = None
            if tin or tout:
                unpriced.add(e["model"] or "?")
        else:
            e["cost_usd"] = (tin * float(price.get("input", 0)) + tout * float(price.get("output", 0))) / 1e6
            total += e["cost_usd"]
    seconds = []
    for stage, t in sorted(timings.items()):
        s = _seconds(t)
        if s is not None:
            seconds.append({"stage": stage, "seconds": s, "source": f"timing/{stage}.json"})
    timed = {s["stage"] for s in seconds}
    for stage, m in metrics.items():
        if stage in timed or not isinstance(m, Mapping):
            continue
        s = _seconds(m)
        if s is not None:
            seconds.append({"stage": stage, "seconds": s, "source": f"metrics/{stage}.json"})
    return {"rows": entries, "total_cost_usd": total, "unpriced": sorted(unpriced), "seconds": seconds}


def _seconds(obj: Any) -> float | None:
    if not isinstance(obj, Mapping):
        return None
    for key in ("wall_s", "seconds_wall", "seconds_total", "seconds"):
        if key in obj and _num(obj[key]) is not None:
            return _num(obj[key])
    return None


# ------------------------------------------------------------------------------------------
# Section: provenance


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": leaf}`` for nested mappings (lists are leaves)."""
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, Mapping) and v else {key: v})
    return out


def params_diff(params: Mapping[str, Any], defaults: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """``[{key, value, default}]`` for every flattened key whose value differs (or exists on one
    side only; the missing side is the string ``"(absent)"``), key order."""
    if defaults is None:
        return []
    a, b = flatten(params), flatten(defaults)
    rows = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "(absent)"), b.get(key, "(absent)")
        if va != vb:
            rows.append({"key": key, "value": va, "default": vb})
    return rows


# ------------------------------------------------------------------------------------------
# metrics/summary.json


def headline_summary(compare: Mapping[str, Any] | None, merge: Mapping[str, Any] | None,
                     digits: int = 4) -> dict[str, Any]:
    """The small headline ``dvc metrics show`` / ``dvc exp show`` print first.

    ``{"synth": share of synthetic rows in the augmented training set, <variant>: {"mean": mean
    macro-F1, "dmg"|"inf"|"hum"|"dis": task macro-F1, "min": mean F1 over the minority
    classes}}`` with variants named by :data:`HEADLINE_VARIANT` (``aug.mean``, ``over.min``...:
    the README has the legend), values rounded to ``digits`` (full precision stays in
    ``metrics/compare.json``). With seed runs the values are the means over seeds.
    """
    out: dict[str, Any] = {}
    share = _num((merge or {}).get("achieved_share"))
    if share is not None:
        out["synth"] = round(share, digits)  # first: the leftmost headline column
    v = verdict_data(compare)
    per_class = per_class_data(compare) or []
    if v:
        for variant in v["variants"]:
            row: dict[str, Any] = {}
            for s in v["scores"]:
                if s["variant"] == variant and s["value"] is not None:
                    row["mean" if s["task"] == "mean" else HEADLINE_TASK.get(s["task"], s["task"])] = round(s["value"], digits)
            minority = [r["value"] for r in per_class if r["variant"] == variant and r["minority"] and r["value"] is not None]
            if minority:
                row["min"] = round(float(np.mean(minority)), digits)
            out[HEADLINE_VARIANT.get(variant, variant)] = row
    return out
