"""One self-contained HTML page with the pipeline's results: the report stage's domain.

The page answers, in this order: which variant is better (verdict), for which classes (per-class
F1, minority classes marked), how the errors look (confusion matrices), how training went
(curves), what relabelling changed and why (counts, examples with each voter's answer), where
the synthetic budget went (allocation), what the synthetic images look like (a grid per class
with caption, intended labels and the filter's decision), how faithful they are (per class and
per caption mode), what was paid (usage and cost per stage) and how it was produced
(provenance).

Nothing leaves the file: CSS inline, charts are Vega-Lite specs drawn by the inline Vega bundle
(:mod:`medicsynth.vega`), images are ``data:`` URIs. Two editions come from the same builder:

- **public** (``with_images=False``): no byte of any real or synthetic image (placeholders
  instead), safe to commit to git like the metrics;
- **private** (``with_images=True``): thumbnails inline; a cached output pushed only to the
  ``private`` remote, since the images derive from real people's photos.

The data come from tolerant accessors in :mod:`medicsynth.report_data` (one per section), so a
missing input shows as a note naming the file and the stage to run, not as a crash.

Build steps (:func:`build_report`): 1. read inputs, 2. render each section (HTML + chart specs),
3. assemble the page (navigation, sections, one inline Vega bundle).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from medicsynth import report_data as rd
from medicsynth.labels import CLASSES, TASKS
from medicsynth.llm.cost import price_table_from_params
from medicsynth.params import require
from medicsynth.vega import chart_div, embed_script, licence_comment

#: Section ids in page order, with the question each answers (README links to them).
SECTIONS: tuple[tuple[str, str, str], ...] = (
    ("verdict", "Verdict", "Which variant is better, on which task, and how sure are we?"),
    ("per-class", "Per-class F1", "Which classes gain or lose? Minority classes are marked ★."),
    ("confusion", "Confusion matrices", "Which classes are confused with which?"),
    ("training", "Training curves", "Did training converge; when did early stopping pick the model?"),
    ("relabelling", "Relabelling", "How many labels changed, in which classes, and on whose vote?"),
    ("allocation", "Allocation", "Where did the synthetic budget go, per class and per label combination?"),
    ("synthetic", "Synthetic images", "What do the generated images look like, and what did the filter decide?"),
    ("fidelity", "Fidelity", "Do synthetic images show their intended labels, per class and per caption mode?"),
    ("usage", "Paid usage and cost", "How many paid calls and tokens, what did they cost, how long did stages take?"),
    ("provenance", "Provenance", "Which code, parameters and data produced this page?"),
)

ImageEncoder = Callable[[str], "str | None"]


class ReportConfigError(ValueError):
    """A ``report`` parameter is invalid; the message names the params.yaml key."""


@dataclass
class ReportConfig:
    """Parameters of the report (params.yaml section ``report``; build with :meth:`from_params`).

    No defaults: params.yaml sets every field. ``prices`` is ``{model: {"input", "output"}}`` in
    USD per million tokens, read from ``llm.prices`` (the project's one price table).
    """

    title: str
    relabel_examples: int
    synthetic_task: str
    synthetic_per_class: int
    thumbnail_px: int
    allocation_rows: int
    prices: dict[str, dict[str, float]]

    @staticmethod
    def prices_from_llm(llm_prices: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
        """``{model: {input, output}}`` (USD per 1M tokens) from params.yaml's ``llm.prices``,
        parsed by :func:`medicsynth.llm.cost.price_table_from_params` (the paid stages' cost
        estimates read the same table); ``None`` or an empty mapping gives ``{}``.

        Raises :class:`ReportConfigError` naming the ``llm.prices`` key that is malformed.
        """
        try:
            table = price_table_from_params(llm_prices)
        except ValueError as exc:
            raise ReportConfigError(f"params.yaml {exc}") from None
        if table is None:
            return {}
        return {m: {"input": p.input_per_mtok, "output": p.output_per_mtok} for m, p in table.models.items()}

    @classmethod
    def from_params(cls, cfg: Mapping[str, Any], llm_prices: Mapping[str, Any] | None) -> ReportConfig:
        """Validate the ``report`` section and ``llm.prices``; errors name the key and the accepted values.

        Every ``report`` key is required (``KeyError`` naming ``report.<key>``); ``llm_prices`` is
        params.yaml's ``llm.prices`` (``None``: no prices, costs show as unpriced).
        """
        def get(key: str) -> Any:
            return require(cfg, "report", key)

        unknown = sorted(set(cfg) - {f.name for f in fields(cls) if f.name != "prices"})
        if unknown:
            raise ReportConfigError(f"params.yaml report: unknown key(s) {', '.join(unknown)} "
                                    "(prices live in llm.prices, the one price table)")
        ints = {}
        for key in ("relabel_examples", "synthetic_per_class", "thumbnail_px", "allocation_rows"):
            value = get(key)
            low = 16 if key == "thumbnail_px" else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ReportConfigError(f"params.yaml report.{key}: expected an integer >= {low}, got {value!r}")
            ints[key] = value
        task = get("synthetic_task")
        if task not in TASKS:
            raise ReportConfigError(
                f"params.yaml report.synthetic_task: {task!r} is not a task; use one of {', '.join(TASKS)}")
        return cls(title=str(get("title")), synthetic_task=task, prices=cls.prices_from_llm(llm_prices), **ints)


@dataclass
class ReportInputs:
    """Where the report reads from, relative to ``root`` (the repository)."""

    root: Path = Path(".")
    metrics_dir: str = "metrics"
    predictions_dir: str = "data/predictions"
    train_logs_dir: str = "metrics/train"
    relabel_changes: str = "data/relabel/changes.tsv"
    clean_labels: str = "data/prepared/clean_labels.tsv"
    allocation: str = "data/allocation/allocation.tsv"
    decisions: str = "data/filtered/decisions.tsv"
    captions: str = "data/captions/captions.tsv"
    timing_dir: str = "timing"

    def path(self, rel: str) -> Path:
        return Path(self.root) / rel


@dataclass
class Provenance:
    """How the page was produced: passed in by the stage (git and params are not read here)."""

    git_revision: str = "unknown"
    params: dict[str, Any] = field(default_factory=dict)
    default_params: dict[str, Any] | None = None
    defaults_label: str = "params.yaml at the git revision"
    versions: dict[str, str] = field(default_factory=dict)


@dataclass
class Section:
    """One rendered section: anchor id, title, question answered, HTML body."""

    id: str
    title: str
    question: str
    body: str


# ------------------------------------------------------------------------------------------
# Small HTML helpers


class Raw(str):
    """A string already HTML: table cells pass it through unescaped."""


def esc(x: Any) -> str:
    return x if isinstance(x, Raw) else html.escape("" if x is None else str(x))


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def interval(p: Mapping[str, Any], digits: int = 3) -> str:
    """``0.788 [0.778, 0.797]`` (``± sd`` added when present)."""
    if p.get("value") is None:
        return "–"
    s = fmt(p["value"], digits)
    if p.get("sd") is not None:
        s += f" ± {p['sd']:.{digits}f}"
    if p.get("low") is not None and p.get("high") is not None:
        s += f" [{p['low']:.{digits}f}, {p['high']:.{digits}f}]"
    return s


def signed(d: Mapping[str, Any], digits: int = 3) -> str:
    if d.get("diff") is None:
        return "–"
    s = f"{d['diff']:+.{digits}f}"
    if d.get("low") is not None and d.get("high") is not None:
        s += f" [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"
    return s


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def missing(what: str, stage: str) -> str:
    return f'<p class="missing">Not available: {esc(what)} does not exist yet (run <code>dvc repro {esc(stage)}</code>).</p>'


def verdict_badge(verdict: str) -> Raw:
    cls = {"better": "better", "worse": "worse"}.get(verdict, "none")
    return Raw(f'<span class="verdict {cls}">{esc(verdict)}</span>')


def class_name(cls: str, minority: bool) -> str:
    return f"★ {cls}" if minority else cls


# ------------------------------------------------------------------------------------------
# Images


def thumbnail_data_uri(path: str | Path, max_px: int, quality: int = 85) -> str | None:
    """A JPEG ``data:`` URI of the image at ``path`` shrunk to at most ``max_px`` on its longer
    side, or ``None`` if the file is missing or does not decode. ``path`` may name a shard member
    (``<shard>.tar#<member>``)."""
    from PIL import UnidentifiedImageError

    from medicsynth.shards import open_image

    try:
        with open_image(path) as im:
            im = im.convert("RGB")
            im.thumbnail((max_px, max_px))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality)
    except (OSError, UnidentifiedImageError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_encoder(root: str | Path, max_px: int) -> ImageEncoder:
    """An encoder for the private edition: path relative to ``root`` → thumbnail data URI."""
    from medicsynth.manifest import resolve_file

    return lambda rel: thumbnail_data_uri(resolve_file(rel, root), max_px)


def image_cell(encode: ImageEncoder | None, path: str, alt: str) -> str:
    if encode is None:
        return '<div class="noimg" title="images appear only in the private edition">private edition</div>'
    uri = encode(path)
    if uri is None:
        return f'<div class="noimg">missing: {esc(path)}</div>'
    return f'<img src="{uri}" alt="{esc(alt)}">'


# ------------------------------------------------------------------------------------------
# Sections


class ChartIds:
    """Unique chart ids within one page."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, stem: str) -> str:
        self.n += 1
        return f"chart-{stem}-{self.n}"


def section_verdict(v: dict[str, Any] | None, ids: ChartIds) -> str:
    if v is None:
        return missing("metrics/compare.json", "compare")
    tasks = ["mean", *v["tasks"]]
    by = {(s["variant"], s["task"]): s for s in v["scores"]}
    rows = [[Raw(f"<b>{esc(var)}</b>"), *[interval(by.get((var, t), {})) for t in tasks]] for var in v["variants"]]
    parts = [table(["variant", "mean macro-F1", *v["tasks"]], rows, "num")]
    if v["diffs"]:
        dby = {(d["comparison"], d["task"]): d for d in v["diffs"]}
        comps = list(dict.fromkeys(d["comparison"] for d in v["diffs"]))
        drows = []
        for c in comps:
            cells = []
            for t in tasks:
                d = dby.get((c, t))
                cells.append(Raw(f"{esc(signed(d))} {verdict_badge(d['verdict'])}") if d else "–")
            drows.append([Raw(f"<b>{esc(c)}</b>"), *cells])
        parts.append(table(["difference", "mean macro-F1", *v["tasks"]], drows, "num"))
    meta = v["meta"]
    seeds = meta.get("seeds")
    ci = meta.get("ci") or 0.95
    parts.append(
        f"<p class='note'>Test macro-F1 on the original test labels ({esc(meta.get('arch'))}, n = {esc(meta.get('n_test'))}), "
        f"{ci:.0%} paired-bootstrap intervals ({esc(meta.get('n_boot'))} resamples)"
        + (f", seeds {esc(seeds)}" if seeds else "")
        + ". <i>better</i>/<i>worse</i>: the interval of the difference excludes 0; <i>no evidence</i>: it does not.</p>")
    for note in meta.get("notes") or []:
        parts.append(f"<p class='note'>{esc(note)}</p>")
    for var, reason in (v.get("skipped") or {}).items():
        parts.append(f"<p class='note'>Skipped {esc(var)}: {esc(reason)}</p>")
    data = [{**s, "task": s["task"]} for s in v["scores"] if s["value"] is not None]
    spec = {
        "data": {"values": data},
        "facet": {"column": {"field": "task", "sort": tasks, "title": None}},
        "spec": {"width": 130, "layer": [
            {"mark": "rule", "encoding": {"y": {"field": "variant", "sort": v["variants"], "title": None},
                                          "x": {"field": "low", "type": "quantitative", "scale": {"zero": False}, "title": "macro-F1"},
                                          "x2": {"field": "high"}}},
            {"mark": {"type": "point", "filled": True, "size": 60},
             "encoding": {"y": {"field": "variant", "sort": v["variants"]}, "x": {"field": "value", "type": "quantitative"},
                          "color": {"field": "variant", "type": "nominal", "sort": v["variants"], "legend": None},
                          "tooltip": [{"field": "variant"}, {"field": "task"}, {"field": "value", "format": ".3f"},
                                      {"field": "low", "format": ".3f"}, {"field": "high", "format": ".3f"}]}}]},
        "resolve": {"scale": {"x": "independent"}},
    }
    parts.append(chart_div(spec, ids("verdict"), "Macro-F1 per variant and task with intervals"))
    ddata = [d for d in v["diffs"] if d["diff"] is not None]
    if ddata:
        dspec = {
            "data": {"values": ddata},
            "facet": {"column": {"field": "task", "sort": tasks, "title": None}},
            "spec": {"width": 130, "layer": [
                {"mark": {"type": "rule", "strokeDash": [3, 3], "color": "#888"}, "encoding": {"x": {"datum": 0}}},
                {"mark": "rule", "encoding": {"y": {"field": "comparison", "title": None}, "x": {"field": "low", "type": "quantitative", "title": "difference"},
                                              "x2": {"field": "high"}}},
                {"mark": {"type": "point", "filled": True, "size": 60},
                 "encoding": {"y": {"field": "comparison"}, "x": {"field": "diff", "type": "quantitative"},
                              "color": {"field": "verdict", "scale": {"domain": list(rd.VERDICTS), "range": ["#2a9d2a", "#888888", "#c0392b"]}},
                              "tooltip": [{"field": "comparison"}, {"field": "task"}, {"field": "diff", "format": "+.3f"},
                                          {"field": "low", "format": "+.3f"}, {"field": "high", "format": "+.3f"},
                                          {"field": "verdict"}]}}]},
            "resolve": {"scale": {"x": "independent"}},
        }
        parts.append(chart_div(dspec, ids("diff"), "Differences against the baseline with intervals"))
    return "\n".join(parts)


def section_per_class(rows: list[dict[str, Any]] | None, variants: Sequence[str], ids: ChartIds) -> str:
    if rows is None:
        return missing("metrics/compare.json", "compare")
    parts = []
    for task in TASKS:
        t = [r for r in rows if r["task"] == task]
        if not t:
            continue
        classes = list(dict.fromkeys(r["class"] for r in t))
        minority = {r["class"]: r["minority"] for r in t}
        by = {(r["class"], r["variant"]): r for r in t}
        comps = list(dict.fromkeys(k for r in t for k in r["diff_verdicts"]))
        trows = []
        for c in classes:
            first = by.get((c, variants[0])) if variants else None
            cells = [Raw(f"<b>{esc(class_name(c, minority[c]))}</b>"), fmt((first or {}).get("support"), 0),
                     fmt((first or {}).get("train_share"), 3)]
            cells += [interval(by.get((c, var), {})) for var in variants]
            verdicts = (first or {}).get("diff_verdicts", {})
            cells += [verdict_badge(verdicts[k]) if k in verdicts else "–" for k in comps]
            trows.append(cells)
        headers = ["class", "test support", "train share", *variants, *[k.replace("-", " − ", 1) for k in comps]]
        parts.append(f"<h3>{esc(task)}</h3>" + table(headers, trows, "num"))
        data = [{"class": class_name(r["class"], r["minority"]), "variant": r["variant"], "f1": r["value"],
                 "low": r["low"], "high": r["high"], "minority": r["minority"]} for r in t if r["value"] is not None]
        order = [class_name(c, minority[c]) for c in classes]
        spec = {
            "data": {"values": data}, "width": {"step": 14}, "height": 160,
            "layer": [
                {"mark": "bar", "encoding": {
                    "x": {"field": "class", "sort": order, "title": None, "axis": {"labelAngle": -30}},
                    "xOffset": {"field": "variant", "sort": list(variants)},
                    "y": {"field": "f1", "type": "quantitative", "title": "test F1", "scale": {"domain": [0, 1]}},
                    "color": {"field": "variant", "type": "nominal", "sort": list(variants)},
                    "tooltip": [{"field": "class"}, {"field": "variant"}, {"field": "f1", "format": ".3f"},
                                {"field": "low", "format": ".3f"}, {"field": "high", "format": ".3f"}]}},
                {"mark": {"type": "rule", "color": "#333"}, "encoding": {
                    "x": {"field": "class", "sort": order}, "xOffset": {"field": "variant", "sort": list(variants)},
                    "y": {"field": "low", "type": "quantitative"}, "y2": {"field": "high"}}},
            ],
        }
        parts.append(chart_div(spec, ids("perclass"), f"{task}: per-class F1 (★ minority class)"))
    parts.append("<p class='note'>★ minority class: share of the original training set below <code>compare.minority_share</code>. "
                 "Verdict columns: per-class difference against the baseline.</p>")
    return "\n".join(parts)


def per_class_bars(data: list[dict[str, Any]], x: dict[str, Any], tooltip: list[dict[str, Any]]) -> dict[str, Any]:
    """Vega-Lite spec of horizontal bars, one per ``data`` row, labelled by its ``label`` field.

    Parameters: ``data`` rows carry ``label`` (``"task: class"``, drawn top to bottom in row
    order) and ``task`` (the bar colour, tasks in :data:`TASKS` order); ``x`` is the x encoding
    (field, type, optional scale, title) and ``tooltip`` the tooltip fields.
    """
    return {"data": {"values": data}, "width": 360, "height": {"step": 13}, "mark": "bar",
            "encoding": {"y": {"field": "label", "sort": None, "title": None}, "x": x,
                         "color": {"field": "task", "type": "nominal", "sort": list(TASKS)},
                         "tooltip": tooltip}}


def section_confusion(conf: dict[str, dict[str, Any]], ids: ChartIds) -> str:
    if not conf:
        return missing("data/predictions/<variant>-<arch>/test.tsv", "evaluate")
    parts = [f"<p class='note'>Rows: true class (original test labels); columns: predicted; colour: share of the row "
             f"(recall); numbers: counts. Models: {esc(', '.join(c['model'] for c in conf.values()))}.</p>"]
    for task in TASKS:
        data = []
        for variant, c in conf.items():
            cm = c["tasks"].get(task)
            if cm is None:
                continue
            rows = cm.sum(axis=1, keepdims=True)
            share = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
            for i, t in enumerate(CLASSES[task]):
                for j, p in enumerate(CLASSES[task]):
                    data.append({"variant": variant, "true": t, "predicted": p, "count": int(cm[i, j]), "share": float(share[i, j])})
        if not data:
            continue
        classes = list(CLASSES[task])
        spec = {
            "data": {"values": data},
            "facet": {"column": {"field": "variant", "sort": list(conf), "title": None}},
            "spec": {"width": {"step": 26}, "height": {"step": 22}, "layer": [
                {"mark": "rect", "encoding": {
                    "x": {"field": "predicted", "sort": classes, "axis": {"labelAngle": -40}},
                    "y": {"field": "true", "sort": classes},
                    "color": {"field": "share", "type": "quantitative", "scale": {"scheme": "blues", "domain": [0, 1]}, "title": "row share"},
                    "tooltip": [{"field": "true"}, {"field": "predicted"}, {"field": "count"}, {"field": "share", "format": ".2f"}]}},
                {"mark": {"type": "text", "fontSize": 9}, "encoding": {
                    "x": {"field": "predicted", "sort": classes}, "y": {"field": "true", "sort": classes},
                    "text": {"field": "count"},
                    "color": {"condition": {"test": "datum.share > 0.5", "value": "white"}, "value": "black"}}}]},
        }
        parts.append(chart_div(spec, ids("confusion"), f"{task}"))
    return "\n".join(parts)


def section_training(curves: list[dict[str, Any]], ids: ChartIds) -> str:
    if not curves:
        return missing("metrics/train/<model>/plots/metrics/*.tsv", "train")
    parts = []
    for metric, title in (("dev_mean_macro_f1", "Dev mean macro-F1 per epoch"), ("train_loss", "Training loss per epoch"),
                          ("lr", "Learning rate")):
        data = [r for r in curves if r["metric"] == metric]
        if not data:
            continue
        spec = {"data": {"values": data}, "width": 420, "height": 200,
                "mark": {"type": "line", "point": True},
                "encoding": {"x": {"field": "step", "type": "quantitative", "title": "epoch"},
                             "y": {"field": "value", "type": "quantitative", "title": metric, "scale": {"zero": False}},
                             "color": {"field": "model"},
                             "tooltip": [{"field": "model"}, {"field": "step"}, {"field": "value", "format": ".4f"}]}}
        parts.append(chart_div(spec, ids("training"), title))
    per_task = [r for r in curves if r["metric"].startswith("dev_macro_f1/")]
    if per_task:
        data = [{**r, "task": r["metric"].split("/", 1)[1]} for r in per_task]
        spec = {"data": {"values": data},
                "facet": {"column": {"field": "task", "sort": list(TASKS), "title": None}},
                "spec": {"width": 160, "height": 140, "mark": "line",
                         "encoding": {"x": {"field": "step", "type": "quantitative", "title": "epoch"},
                                      "y": {"field": "value", "type": "quantitative", "title": "dev macro-F1", "scale": {"zero": False}},
                                      "color": {"field": "model"},
                                      "tooltip": [{"field": "model"}, {"field": "step"}, {"field": "value", "format": ".3f"}]}},
                "resolve": {"scale": {"y": "independent"}}}
        parts.append(chart_div(spec, ids("training"), "Dev macro-F1 per task"))
    parts.append("<p class='note'>The same logs render with <code>dvc plots show</code> (offline template).</p>")
    return "\n".join(parts)


def section_relabelling(r: dict[str, Any] | None, encode: ImageEncoder | None, ids: ChartIds) -> str:
    if r is None:
        return missing("metrics/relabel.json", "relabel")
    s = r["summary"]
    parts = [f"<p>Flagging: <b>{esc(s.get('flag'))}</b>; voters: <b>{esc(', '.join(s.get('voters') or []))}</b>; "
             f"consensus: <b>{esc(s.get('consensus'))}</b>. {esc(s.get('flagged_images'))} of {esc(s.get('images'))} images "
             f"flagged, {esc(s.get('changed_images'))} images changed.</p>"]
    has_pr = any("precision" in t for t in r["per_task"])
    headers = ["task", "flagged labels", "changed labels"] + (["precision vs clean", "recall vs clean"] if has_pr else [])
    rows = [[t["task"], fmt(t["flagged"]), fmt(t["changed"])] + ([fmt(t.get("precision")), fmt(t.get("recall"))] if has_pr else [])
            for t in r["per_task"]]
    parts.append(table(headers, rows, "num"))
    if has_pr:
        parts.append(f"<p class='note'>Demo only: against the clean labels the generator knows, the changes have mean precision "
                     f"{fmt(s.get('mean_precision'))} and recall {fmt(s.get('mean_recall'))}.</p>")
    if r["per_class"]:
        data = [{"label": f"{rd.SHORT_TASK.get(c['task'], c['task'])}: {c['class']}", "task": c["task"],
                 "class": c["class"], "changed": c["changed"]} for c in r["per_class"]]
        spec = per_class_bars(data, {"field": "changed", "type": "quantitative", "title": "labels changed to another class (by old class)"},
                              [{"field": "task"}, {"field": "class"}, {"field": "changed"}])
        parts.append(chart_div(spec, ids("relabel"), "Changed labels per original class"))
    if r["examples"]:
        vote_names = list(dict.fromkeys(k for e in r["examples"] for k in e["votes"]))
        has_clean = any("clean" in e for e in r["examples"])
        headers = ["image", "task", "old → new", *[f"vote: {v}" for v in vote_names]] + (["clean label (demo)"] if has_clean else [])
        rows = []
        for e in r["examples"]:
            row = [Raw(image_cell(encode, e["image_path"], e["image_path"])), e["task"], Raw(f"{esc(e['old'])} → <b>{esc(e['new'])}</b>"),
                   *[e["votes"].get(v, "") for v in vote_names]]
            if has_clean:
                c = e.get("clean")
                row.append(Raw(f"{esc(c)} {'✓' if c == e['new'] else '✗'}") if c else "–")
            rows.append(row)
        parts.append("<h3>Examples</h3>" + table(headers, rows, "examples"))
    return "\n".join(parts)


def section_allocation(a: dict[str, Any] | None, ids: ChartIds) -> str:
    if a is None:
        return missing("metrics/allocate.json", "allocate")
    s = a["summary"]
    parts = [f"<p>Mode <b>{esc(s.get('mode'))}</b>, {esc(s.get('total'))} synthetic images planned over "
             f"{esc(s.get('combinations_planned'))} label combinations ({esc(s.get('combinations_seen'))} seen in "
             f"{esc(s.get('real_train'))} real training images), rounding {esc(s.get('rounding'))}.</p>"]
    if a["per_class"]:
        data = []
        for c in a["per_class"]:
            label = f"{rd.SHORT_TASK.get(c['task'], c['task'])}: {c['class']}"
            data.append({"label": label, "kind": "real", "count": c["real"] or 0, "task": c["task"]})
            data.append({"label": label, "kind": "planned synthetic", "count": c["planned"] or 0, "task": c["task"]})
        spec = {"data": {"values": data}, "width": 380, "height": {"step": 13}, "mark": "bar",
                "encoding": {"y": {"field": "label", "sort": None, "title": None},
                             "x": {"field": "count", "type": "quantitative", "stack": "zero", "title": "training images"},
                             "color": {"field": "kind", "scale": {"domain": ["real", "planned synthetic"], "range": ["#9ab", "#e67e22"]}},
                             "tooltip": [{"field": "label"}, {"field": "kind"}, {"field": "count"}]}}
        parts.append(chart_div(spec, ids("allocation"), "Real and planned synthetic images per class"))
        rows = [[c["task"], c["class"], fmt(c["real"]), fmt(c["planned"]), fmt(c["share_before"]), fmt(c["share_after"])] for c in a["per_class"]]
        parts.append(f"<details><summary>Per-class table</summary>{table(['task', 'class', 'real', 'planned', 'share before', 'share after'], rows, 'num')}</details>")
    if a["combinations"]:
        rows = [[*[c[t] for t in TASKS], c["real_count"], c["count"], c["reason"]] for c in a["combinations"]]
        parts.append(f"<h3>Label combinations (largest {len(a['combinations'])} of {a['combinations_total']})</h3>"
                     + table([*TASKS, "real", "planned", "why"], rows, "small"))
    return "\n".join(parts)


def section_synthetic(grid: dict[str, list[dict[str, Any]]] | None, task: str, encode: ImageEncoder | None) -> str:
    if grid is None:
        return missing("data/filtered/decisions.tsv", "filter")
    parts = [f"<p class='note'>A grid per {esc(task)} class: kept and rejected images alternate. Each cell: the image, its caption, "
             "the four intended labels, and the filter's decision with the first failing rule and the original model's "
             "probability of the intended label.</p>"]
    for cls, cells in grid.items():
        items = []
        for c in cells:
            decision = "kept" if c["kept"] else f"rejected: {c['reason']}"
            p = ", ".join(f"{rd.SHORT_TASK.get(t, t)} {v:.2f}" for t, v in c["p_intended"].items())
            labels = "<br>".join(f"{esc(rd.SHORT_TASK.get(t, t))}: {esc(v)}" for t, v in c["labels"].items())
            mode = f" <span class='mode'>({esc(c['mode'])})</span>" if c["mode"] else ""
            items.append(
                f"<div class='cell {'kept' if c['kept'] else 'rejected'}'>{image_cell(encode, c['file'], c['image_path'])}"
                f"<div class='decision'>{esc(decision)}</div><div class='caption'>{esc(c['caption'])}{mode}</div>"
                f"<div class='labels'>{labels}</div><div class='p'>p(intended): {esc(p) or '–'}</div></div>")
        body = "".join(items) if items else "<p class='note'>no synthetic image of this class</p>"
        parts.append(f"<h3>{esc(cls)}</h3><div class='grid'>{body}</div>")
    return "\n".join(parts)


def section_fidelity(f: dict[str, Any] | None, ids: ChartIds) -> str:
    if f is None:
        return missing("metrics/filter.json", "filter")
    s = f["summary"]
    parts = [f"<p>Filter method <b>{esc(s.get('method'))}</b> checking {esc(', '.join(s.get('tasks_checked') or []))}: "
             f"kept {esc(s.get('kept'))} of {esc(s.get('total'))} ({fmt(s.get('kept_share'))}).</p>"]
    if f["agreement"]:
        parts.append(table(["task", "agreement with the intended label (all decodable images)"],
                           [[t, fmt(v)] for t, v in f["agreement"].items()], "num"))
    if f["rejected"]:
        data = [{"reason": k, "images": v} for k, v in f["rejected"].items()] + [{"reason": "kept", "images": s.get("kept") or 0}]
        spec = {"data": {"values": data}, "width": 300, "height": {"step": 16}, "mark": "bar",
                "encoding": {"y": {"field": "reason", "sort": None, "title": None}, "x": {"field": "images", "type": "quantitative"},
                             "tooltip": [{"field": "reason"}, {"field": "images"}]}}
        parts.append(chart_div(spec, ids("filter"), "Filter decisions (first failing rule)"))
    if f["per_class"]:
        data = [{"label": f"{rd.SHORT_TASK.get(c['task'], c['task'])}: {c['class']}", "task": c["task"],
                 "agreement": c["agreement"], "kept_share": c["kept_share"]} for c in f["per_class"] if c["agreement"] is not None]
        spec = per_class_bars(data, {"field": "agreement", "type": "quantitative", "scale": {"domain": [0, 1]},
                                     "title": "original model's argmax = intended label"},
                              [{"field": "label"}, {"field": "agreement", "format": ".2f"}, {"field": "kept_share", "format": ".2f"}])
        parts.append(chart_div(spec, ids("fidelity"), "Fidelity per intended class"))
    if f["per_mode"]:
        spec = {"data": {"values": f["per_mode"]}, "width": {"step": 16}, "height": 160, "mark": "bar",
                "encoding": {"x": {"field": "task", "sort": list(TASKS), "title": None, "axis": {"labelAngle": -20}},
                             "xOffset": {"field": "mode"}, "color": {"field": "mode", "title": "caption mode"},
                             "y": {"field": "agreement", "type": "quantitative", "scale": {"domain": [0, 1]}},
                             "tooltip": [{"field": "mode"}, {"field": "task"}, {"field": "n"}, {"field": "agreement", "format": ".2f"}]}}
        parts.append(chart_div(spec, ids("fidelity"), "Fidelity per caption mode (template / grounded / hypothetical)"))
        parts.append(table(["caption mode", "task", "images", "agreement"],
                           [[m["mode"], m["task"], m["n"], fmt(m["agreement"])] for m in f["per_mode"]], "num small"))
    if f["judge"]:
        parts.append("<h3>VLM judge agreement</h3>" + table(["task", "agreement"], [[t, fmt(v)] for t, v in f["judge"].items()], "num"))
    return "\n".join(parts)


def section_usage(u: dict[str, Any], prices: Mapping[str, Any]) -> str:
    parts = []
    if u["rows"]:
        rows = [[e["stage"], e["what"], e["model"] or "–", fmt(e.get("requests")), fmt(e.get("api_calls")), fmt(e.get("cache_hits")),
                 fmt(e.get("input_tokens")), fmt(e.get("output_tokens")), fmt(e.get("failed")),
                 "no price" if e["cost_usd"] is None else f"${e['cost_usd']:.2f}"] for e in u["rows"]]
        parts.append(table(["stage", "client", "model", "requests", "API calls", "cache hits", "input tokens", "output tokens",
                            "failed", "cost"], rows, "num"))
        parts.append(f"<p>Total priced cost: <b>${u['total_cost_usd']:.2f}</b>"
                     + (f"; no price in <code>llm.prices</code> for {esc(', '.join(u['unpriced']))}" if u["unpriced"] else "")
                     + ". Cache hits are free (answers stored in <code>.llm_cache/</code>).</p>")
    else:
        parts.append("<p>No paid call: every stage ran offline (model voter, template captions, classifier filter, zero-shot skipped).</p>")
    if prices:
        parts.append("<p class='note'>Prices (USD per 1M tokens, <code>llm.prices</code>): "
                     + esc("; ".join(f"{m} in {p['input']:g} / out {p['output']:g}" for m, p in prices.items())) + "</p>")
    if u["seconds"]:
        rows = [[s["stage"], f"{s['seconds']:.1f}", s["source"]] for s in u["seconds"]]
        parts.append("<h3>Wall-clock time</h3>" + table(["stage", "seconds", "from"], rows, "num"))
    return "\n".join(parts)


def section_provenance(p: Provenance, prepare: Mapping[str, Any] | None) -> str:
    data = p.params.get("data") or {}
    source = data.get("source", "unknown")
    src = f"<b>{esc(source)}</b>" + (f" ({esc(data.get('medic_dir'))})" if source == "medic" else " (embedded demo dataset, synthetic scenes with injected label noise)")
    rows_per_split = ""
    if prepare and isinstance(prepare.get("counts"), Mapping):
        rows_per_split = ", ".join(f"{k} {v.get('rows')}" for k, v in prepare["counts"].items() if isinstance(v, Mapping))
    parts = [table(["what", "value"], [
        ["git revision", p.git_revision],
        ["data source", Raw(src)],
        ["images per split", rows_per_split or "–"],
        ["variants", ", ".join(p.params.get("variants") or [])],
        ["architectures", ", ".join((p.params.get("train") or {}).get("archs") or [])],
        ["mix_ratio", fmt(p.params.get("mix_ratio"))],
        ["libraries", ", ".join(f"{k} {v}" for k, v in p.versions.items()) or "–"],
    ])]
    diff = rd.params_diff(p.params, p.default_params)
    if p.default_params is None:
        parts.append(f"<p class='note'>Defaults unavailable ({esc(p.defaults_label)}): parameters not compared.</p>")
    elif diff:
        parts.append(f"<h3>Parameters that differ from {esc(p.defaults_label)}</h3>"
                     + table(["key", "value", "default"], [[d["key"], json.dumps(d["value"]), json.dumps(d["default"])] for d in diff]))
    else:
        parts.append(f"<p>All parameters equal {esc(p.defaults_label)}.</p>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------
# The page

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1f3a5f;color:#fff;padding:14px 24px}header h1{margin:0;font-size:22px}
header .edition{font-size:13px;opacity:.85}
nav{background:#e8eef5;padding:8px 24px;font-size:14px;position:sticky;top:0;z-index:2}
nav a{margin-right:14px;color:#1f3a5f;text-decoration:none}
main{padding:8px 24px 40px}section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 18px;margin:14px 0}
section h2{margin:6px 0 2px;font-size:19px}p.question{margin:0 0 8px;color:#555;font-style:italic}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f3f7}table.num td{font-variant-numeric:tabular-nums}table.small{font-size:12px}
.verdict{border-radius:3px;padding:0 4px;font-size:11px;white-space:nowrap}.verdict.better{background:#d4f4d4;color:#185c18}
.verdict.worse{background:#f8d7d3;color:#8c1d12}.verdict.none{background:#eee;color:#555}
p.note{font-size:12px;color:#555}p.missing{color:#8c1d12}
figure.chart{display:inline-block;margin:8px 16px 8px 0;vertical-align:top}figcaption{font-size:13px;font-weight:600;margin-bottom:4px}
.grid{display:flex;flex-wrap:wrap;gap:8px}.cell{width:170px;border:1px solid #ccc;border-radius:4px;padding:5px;font-size:11px;background:#fcfcfc;overflow-wrap:anywhere}
.cell.kept{border-color:#5aa55a}.cell.rejected{border-color:#d08a80}.cell img{width:96px;height:96px;image-rendering:pixelated;display:block}
.noimg{width:96px;height:96px;background:repeating-linear-gradient(45deg,#eee,#eee 6px,#e2e2e2 6px,#e2e2e2 12px);font-size:10px;
color:#777;display:flex;align-items:center;justify-content:center;text-align:center}
table.examples img{width:64px;height:64px;image-rendering:pixelated}table.examples .noimg{width:64px;height:64px}
.decision{font-weight:600;margin:3px 0}.caption{color:#333;margin-bottom:3px}.labels{color:#555}.mode{color:#888}.p{color:#555}
"""


@dataclass
class ReportResult:
    """The page and what it contains: ``sections`` (ids in order) and ``charts`` (count)."""

    html: str
    sections: list[str]
    charts: int


def build_report(inputs: ReportInputs, config: ReportConfig, provenance: Provenance, *,
                 with_images: bool) -> ReportResult:
    """Build one edition of the report page.

    Args:
        inputs: where the pipeline's outputs are (relative to ``inputs.root``).
        config: the ``report`` parameters.
        provenance: git revision, parameters and their defaults (the stage reads git/params).
        with_images: ``True`` for the private edition (thumbnails as ``data:`` URIs),
            ``False`` for the public one (no image bytes at all, placeholders instead).

    Returns:
        :class:`ReportResult`; ``html`` is a complete document that makes no network request.
    """
    # 1. Read inputs (tolerant: None where a stage has not run).
    m = inputs.path(inputs.metrics_dir)
    metrics = {name: rd.read_json_opt(m / f"{name}.json")
               for name in ("prepare", "relabel", "zeroshot", "allocate", "caption", "adapt", "generate", "filter", "merge", "compare")}
    compare = metrics["compare"]
    decisions = rd.read_tsv_opt(inputs.path(inputs.decisions))
    captions = rd.read_tsv_opt(inputs.path(inputs.captions))
    timing_dir = inputs.path(inputs.timing_dir)
    timings = {p.stem: rd.read_json_opt(p) for p in sorted(timing_dir.glob("*.json"))} if timing_dir.is_dir() else {}
    verdict = rd.verdict_data(compare)
    variants = verdict["variants"] if verdict else list(provenance.params.get("variants") or [])
    arch = (compare or {}).get("arch") or ((provenance.params.get("train") or {}).get("archs") or [None])[0]
    encode = image_encoder(inputs.root, config.thumbnail_px) if with_images else None

    # 2. Render the sections.
    ids = ChartIds()
    bodies = {
        "verdict": section_verdict(verdict, ids),
        "per-class": section_per_class(rd.per_class_data(compare), variants, ids),
        "confusion": section_confusion(rd.confusion_data(rd.model_dirs(inputs.path(inputs.predictions_dir), variants, arch)), ids),
        "training": section_training(rd.training_curves(inputs.path(inputs.train_logs_dir)), ids),
        "relabelling": section_relabelling(
            rd.relabel_data(metrics["relabel"], rd.read_tsv_opt(inputs.path(inputs.relabel_changes)),
                            rd.read_tsv_opt(inputs.path(inputs.clean_labels)), config.relabel_examples), encode, ids),
        "allocation": section_allocation(rd.allocation_data(metrics["allocate"], rd.read_tsv_opt(inputs.path(inputs.allocation)),
                                                            config.allocation_rows), ids),
        "synthetic": section_synthetic(rd.synthetic_data(decisions, captions, config.synthetic_task, config.synthetic_per_class),
                                       config.synthetic_task, encode),
        "fidelity": section_fidelity(rd.fidelity_data(metrics["filter"], decisions, captions), ids),
        "usage": section_usage(rd.usage_data({k: v for k, v in metrics.items() if k != "compare"}, provenance.params,
                                             config.prices, timings), config.prices),
        "provenance": section_provenance(provenance, metrics["prepare"]),
    }
    sections = [Section(sid, title, question, bodies[sid]) for sid, title, question in SECTIONS]

    # 3. Assemble the page.
    edition = ("Private edition: contains thumbnails of real and synthetic images (derived from real people's photos): "
               "do not publish." if with_images else
               "Public edition: no real or synthetic image included (the private edition on the private remote has them).")
    nav = "".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s in sections)
    body = "\n".join(
        f'<section id="{s.id}" data-section="{s.id}"><h2>{esc(s.title)}</h2><p class="question">{esc(s.question)}</p>{s.body}</section>'
        for s in sections)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; img-src data:">
<title>{esc(config.title)}</title>
{licence_comment()}
<style>{CSS}</style>
</head>
<body data-edition="{'private' if with_images else 'public'}">
<header><h1>{esc(config.title)}</h1><div class="edition">{esc(edition)} Revision {esc(provenance.git_revision)}.</div></header>
<nav>{nav}</nav>
<main>
{body}
</main>
{embed_script()}
</body>
</html>
"""
    return ReportResult(html=page, sections=[s.id for s in sections], charts=ids.n)
