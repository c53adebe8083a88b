"""VLM zero-shot classification of the test split (the study's Experiment 1), scored on its untouched labels.

:func:`run_zeroshot` is the whole zeroshot stage except reading params and writing files
(``stages/zeroshot.py``). It runs a **matrix**: models (rows) × prompting strategies (columns),
each cell one VLM asked about the same seeded subset of test images with one strategy's prompt,
scored per task (macro-F1, accuracy) like the study reports. Parameters: the ``zeroshot`` section
of params.yaml (every key required, no default here; see :data:`STAGE_KEYS` and params.yaml's
comments) and the ``llm`` section (``cache_dir``, ``prices``).

- Models: ``provider``/``model``/``base_url`` (the first row) plus ``extra_models`` (a list of
  ``{provider, model, base_url}``). ``provider: none`` with no extra model is the offline default:
  nothing is sent, ``{"skipped": true, "reason": ...}`` and an empty predictions table, never a
  score (no VLM runs offline; there is no offline zero-shot method to fake one with).
- Strategies (:data:`STRATEGIES`, the study's names; prompts written in our own words in
  ``prompts/zeroshot_<strategy>.txt``, all with the per-class definitions of
  ``prompts/classify_system.txt`` as system prompt):

  ``direct_classification``
      the labels directly: exactly the single prompt of :func:`medicsynth.llm.classify_request`
      (so its cached answers are reused).
  ``two_phase_analysis``
      a label-free description of the visible evidence first (``analysis``), then the labels.
  ``elimination_reasoning``
      per task the labels ruled out with a reason, then the labels; a final label that was
      ruled out is an invalid answer.
  ``uncertainty_aware``
      what makes the image ambiguous, then per task the label, a confidence in [0, 1] and the
      runner-up label.
  ``weighted_option_analysis``
      per task a weight in [0, 1] for every allowed label, then the final labels; the
      confidence of a label is its weight normalised over the task's weights.
  ``direct_uncertainty``
      the labels directly, with a confidence in [0, 1] per task.

  Every strategy answers through a JSON schema whose reasoning fields come *before*
  ``labels``, so a model writes its reasoning first; only ``labels`` is scored (the final
  answer), the reasoning is kept in the predictions. Strategies in
  :data:`REASONING_STRATEGIES` get ``reasoning_max_tokens`` output tokens, the others
  ``max_tokens``.
- At most ``max_images`` test images, chosen by a seeded hash of ``image_path`` (independent of
  row order, nested: a larger cap extends a smaller one); the same images in every cell.
- Calls go through the cached, budgeted client (:mod:`medicsynth.llm`): one client per cell, so
  answers are cached per (provider, model, strategy prompt and schema, image); ``max_calls`` is
  the stage's total over the matrix; the cost estimate (``llm.prices``) counts every cell's
  requests that are not cached, and ``budget_usd`` caps the matrix's total before anything is sent.
- Failures: failed images (refusal, invalid answer, ...) are excluded from a cell's scores,
  counted by reason and reported as ``coverage``; more than ``max_failure_share`` failed in a cell
  raises :class:`medicsynth.llm.LLMFailureShareError`, ``abort_after`` consecutive key/account/model
  errors :class:`medicsynth.llm.LLMAbortError`; either way no score is produced. Details in the
  predictions are redacted.
- The study's published scores (``reference``, ``study/zeroshot_reference.tsv``) are shown beside
  ours in the table and plot, labelled as the study's: they were measured on test labels the
  study had itself relabelled with GPT-4o and Claude, so they are not comparable with ours.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from medicsynth.labels import CLASSES, TASKS
from medicsynth.manifest import read_manifest, resolve_file
from medicsynth.params import require

SECTION = "zeroshot"
#: The study's six prompting strategies, in the study's names and order.
STRATEGIES = (
    "direct_classification",
    "two_phase_analysis",
    "elimination_reasoning",
    "uncertainty_aware",
    "weighted_option_analysis",
    "direct_uncertainty",
)
#: Strategies whose answer carries free-text reasoning or one number per label (``reasoning_max_tokens``).
REASONING_STRATEGIES = ("two_phase_analysis", "elimination_reasoning", "uncertainty_aware", "weighted_option_analysis")
#: Keys of the ``zeroshot`` section that the stage reads itself; all others configure every cell's client.
STAGE_KEYS = (
    "provider", "model", "base_url", "extra_models", "strategies", "max_images", "seed", "tasks",
    "reference", "reasoning_max_tokens", "max_calls", "budget_usd",
)
#: Client settings params.yaml's section must hold (passed on to every cell's
#: :class:`medicsynth.llm.LLMConfig`; ``max_tokens`` is the direct strategies' cap).
CLIENT_KEYS = ("temperature", "max_tokens", "concurrency", "timeout_s", "max_retries", "image_max_side",
               "abort_after", "max_failure_share")
#: Keys of one ``extra_models`` entry.
MODEL_KEYS = ("provider", "model", "base_url")
SKIP_REASON = (
    "zeroshot.provider is 'none' (the offline default): no VLM was called. Set it to openai or "
    "anthropic, set zeroshot.model, and export OPENAI_API_KEY / ANTHROPIC_API_KEY to score a VLM."
)
#: Columns of the study's reference file (``study/zeroshot_reference.tsv``).
REFERENCE_COLUMNS = ("model", "prompt_strategy", "images", *TASKS, "mean")
ECE_BINS = 10


# ------------------------------------------------------------------------------------------
# Subset of the test split
# ------------------------------------------------------------------------------------------


def select_rows(df: pd.DataFrame, max_images: int | None, seed: int) -> pd.DataFrame:
    """Up to ``max_images`` rows, those with the smallest ``sha256(f"{seed}:{image_path}")``.

    Args:
        df: a manifest (needs ``image_path``).
        max_images: the cap; ``None`` (or at least ``len(df)``) keeps every row.
        seed: salt of the hash.

    Independent of row order, and nested: a larger cap keeps every row of a smaller one, so its
    answers come from the cache. Returned in manifest order with a fresh index.
    """
    if max_images is None or max_images >= len(df):
        return df.reset_index(drop=True)
    if max_images < 0:
        raise ValueError(f"zeroshot.max_images must be >= 0 or null, got {max_images}")
    rank = df["image_path"].map(lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    keep = rank.sort_values(kind="stable").index[:max_images]
    return df.loc[sorted(keep)].reset_index(drop=True)


# ------------------------------------------------------------------------------------------
# The matrix from params
# ------------------------------------------------------------------------------------------


def matrix_models(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The matrix's rows: ``[{provider, model, base_url}]``, the first model then ``extra_models``.

    ``provider: none`` contributes no row (the offline default). Errors name the key: an
    ``extra_models`` entry with an unknown key, a provider other than openai/anthropic, a missing
    model, or the same (provider, model, base_url) twice.
    """
    from medicsynth.llm import PROVIDERS

    rows: list[dict[str, Any]] = []
    provider = str(require(params, SECTION, "provider")).lower()
    if provider != "none":
        rows.append({"provider": provider, "model": require(params, SECTION, "model"),
                     "base_url": require(params, SECTION, "base_url")})
    extra = require(params, SECTION, "extra_models")
    if not isinstance(extra, list):
        raise ValueError(f"zeroshot.extra_models must be a list of {{provider, model, base_url}}, got {extra!r}")
    for i, entry in enumerate(extra):
        where = f"zeroshot.extra_models[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a mapping with keys {', '.join(MODEL_KEYS)}, got {entry!r}")
        unknown = sorted(set(entry) - set(MODEL_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; expected {', '.join(MODEL_KEYS)}")
        rows.append({k: require(entry, where, k) for k in MODEL_KEYS})
    for i, row in enumerate(rows):
        row["provider"] = str(row["provider"]).lower()
        if row["provider"] not in PROVIDERS:
            raise ValueError(f"zeroshot model {i}: provider {row['provider']!r} not in {', '.join(PROVIDERS)}")
        if not row["model"]:
            raise ValueError(f"zeroshot model {i} ({row['provider']}): model must be a non-empty model id")
    seen = Counter((r["provider"], r["model"], r["base_url"]) for r in rows)
    twice = [f"{p}/{m}" for (p, m, _), n in seen.items() if n > 1]
    if twice:
        raise ValueError(f"zeroshot: model(s) listed twice: {', '.join(twice)}")
    return rows


def matrix_strategies(params: Mapping[str, Any]) -> tuple[str, ...]:
    """``zeroshot.strategies`` checked against :data:`STRATEGIES` (unknown or repeated: an error)."""
    strategies = require(params, SECTION, "strategies")
    if not isinstance(strategies, list) or not strategies:
        raise ValueError(f"zeroshot.strategies must be a non-empty list of {', '.join(STRATEGIES)}; got {strategies!r}")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"zeroshot.strategies: unknown {', '.join(map(repr, unknown))}; "
                         f"the study's strategies are {', '.join(STRATEGIES)}")
    if len(set(strategies)) != len(strategies):
        raise ValueError(f"zeroshot.strategies lists a strategy twice: {strategies}")
    return tuple(strategies)


def cell_name(provider: str, model: str, strategy: str) -> str:
    """``provider/model/strategy``: a cell's name in metrics and usage."""
    return f"{provider}/{model}/{strategy}"


# ------------------------------------------------------------------------------------------
# Strategies: prompts, schemas, answers
# ------------------------------------------------------------------------------------------


@dataclass
class Answer:
    """What one image's answer says, whatever the strategy.

    ``labels``: ``{task: canonical label}`` (the final answer, scored); ``confidence``:
    ``{task: float in [0, 1]}`` or ``None`` (strategies without one); ``reasoning``: the
    answer's free text (analysis, ambiguity, elimination reasons), ``""`` if none;
    ``top_weight_agrees``: weighted_option_analysis only, whether every final label is a label
    of largest weight.
    """

    labels: dict[str, str]
    confidence: dict[str, float] | None = None
    reasoning: str = ""
    top_weight_agrees: bool | None = None


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    # OpenAI strict structured outputs: every property required, no additional ones; order kept.
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def strategy_schema(strategy: str, tasks: Sequence[str]) -> dict[str, Any]:
    """JSON schema of a strategy's answer for ``tasks`` (reasoning fields before ``labels``)."""
    from medicsynth.llm import labels_json_schema

    labels = labels_json_schema(tasks)
    numbers = _object({t: {"type": "number"} for t in tasks})
    if strategy == "two_phase_analysis":
        return _object({"analysis": {"type": "string"}, "labels": labels})
    if strategy == "elimination_reasoning":
        per_task = {t: _object({"ruled_out": {"type": "array", "items": {"type": "string", "enum": list(CLASSES[t])}},
                                "reason": {"type": "string"}}) for t in tasks}
        return _object({"elimination": _object(per_task), "labels": labels})
    if strategy == "uncertainty_aware":
        return _object({"ambiguity": {"type": "string"}, "labels": labels, "confidence": numbers,
                        "alternative": labels_json_schema(tasks)})
    if strategy == "weighted_option_analysis":
        weights = _object({t: _object({c: {"type": "number"} for c in CLASSES[t]}) for t in tasks})
        return _object({"weights": weights, "labels": labels})
    if strategy == "direct_uncertainty":
        return _object({"labels": labels, "confidence": numbers})
    raise ValueError(f"no schema for strategy {strategy!r} (direct_classification uses the classify request's)")


def _unit_interval(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{where}: expected a number in [0, 1], got {value!r}")
    return float(value)


def _field(obj: Any, key: str) -> Any:
    if not isinstance(obj, Mapping) or key not in obj:
        raise ValueError(f"answer has no field {key!r}")
    return obj[key]


def parse_answer(strategy: str, obj: Any, tasks: Sequence[str]) -> Answer:
    """The :class:`Answer` in a strategy's parsed JSON answer ``obj``; raises ``ValueError``
    (an ``invalid_answer`` failure in the client) on a partial or inconsistent answer."""
    from medicsynth.llm import validate_labels_answer

    if strategy == "direct_classification":
        return Answer(validate_labels_answer(obj, tasks))
    labels = validate_labels_answer(_field(obj, "labels"), tasks)
    if strategy == "two_phase_analysis":
        return Answer(labels, reasoning=str(_field(obj, "analysis")))
    if strategy == "elimination_reasoning":
        elim = _field(obj, "elimination")
        reasons = []
        for t in tasks:
            entry = _field(elim, t)
            ruled_out = _field(entry, "ruled_out")
            if not isinstance(ruled_out, list):
                raise ValueError(f"elimination.{t}.ruled_out: expected a list, got {ruled_out!r}")
            out = {validate_labels_answer({t: r}, [t])[t] for r in ruled_out}
            if labels[t] in out:
                raise ValueError(f"{t}: final label {labels[t]!r} was ruled out ({sorted(out)})")
            reasons.append(f"{t}: {_field(entry, 'reason')}")
        return Answer(labels, reasoning=" | ".join(reasons))
    if strategy in ("uncertainty_aware", "direct_uncertainty"):
        conf_obj = _field(obj, "confidence")
        conf = {t: _unit_interval(_field(conf_obj, t), f"confidence.{t}") for t in tasks}
        reasoning = ""
        if strategy == "uncertainty_aware":
            alternative = validate_labels_answer(_field(obj, "alternative"), tasks)
            reasoning = f"{_field(obj, 'ambiguity')} | alternative: " + ", ".join(f"{t}={alternative[t]}" for t in tasks)
        return Answer(labels, confidence=conf, reasoning=reasoning)
    if strategy == "weighted_option_analysis":
        weights_obj = _field(obj, "weights")
        conf, agrees = {}, True
        for t in tasks:
            w = {c: _unit_interval(_field(_field(weights_obj, t), c), f"weights.{t}.{c}") for c in CLASSES[t]}
            total = sum(w.values())
            # All-zero weights say nothing about confidence: the final label still counts.
            conf[t] = w[labels[t]] / total if total > 0 else 0.0
            agrees &= total > 0 and w[labels[t]] == max(w.values())
        return Answer(labels, confidence=conf, top_weight_agrees=agrees)
    raise ValueError(f"unknown strategy {strategy!r}")


def strategy_request(strategy: str, image_path: str | Path, tasks: Sequence[str], prompt_dir: str | Path,
                     *, key: str) -> Any:
    """The :class:`medicsynth.llm.LLMRequest` of one image under ``strategy``; its validated
    value is an :class:`Answer`. ``direct_classification`` is
    :func:`medicsynth.llm.classify_request` unchanged (same prompt, schema and cache key)."""
    from medicsynth.llm import LLMRequest, classify_request, load_prompt, with_refusal_preface
    from medicsynth.llm.labels_answer import CLASSIFY_SYSTEM, fill_labels_prompt

    if strategy == "direct_classification":
        req = classify_request(image_path, tasks, prompt_dir, key=key)
    else:
        user = fill_labels_prompt(f"zeroshot_{strategy}.txt", tasks, prompt_dir)
        req = LLMRequest(
            prompt=user,
            system=load_prompt(CLASSIFY_SYSTEM, prompt_dir),
            image_path=str(image_path),
            schema=strategy_schema(strategy, tasks),
            schema_name=f"medic_{strategy}",
            fallback_prompt=with_refusal_preface(user, prompt_dir),
            key=key,
        )
    req.validate = lambda obj: parse_answer(strategy, obj, tasks)
    return req


# ------------------------------------------------------------------------------------------
# Predictions and scores
# ------------------------------------------------------------------------------------------


def empty_predictions(tasks: Sequence[str] = TASKS) -> pd.DataFrame:
    """The offline default's predictions table: its columns (``true_<task>``/``pred_<task>``
    per task) and no row."""
    columns = ["image_path", "file", "status", "detail", "cached"]
    columns += [f"true_{t}" for t in tasks] + [f"pred_{t}" for t in tasks]
    return pd.DataFrame(columns=columns)


def prediction_columns(tasks: Sequence[str]) -> list[str]:
    """Columns of the matrix's predictions: one row per (cell, asked image)."""
    return (["provider", "model", "strategy"] + list(empty_predictions(tasks).columns)
            + [f"confidence_{t}" for t in tasks] + ["reasoning"])


def predictions_table(cell: Mapping[str, str], chosen: pd.DataFrame, files: Sequence[str], results: Sequence[Any],
                      tasks: Sequence[str]) -> pd.DataFrame:
    """One row per asked image of one cell: status (``ok`` or the failure reason), redacted
    detail, true and predicted labels, confidences (empty where the strategy gives none) and
    the answer's reasoning."""
    rows = []
    for (_, row), file, res in zip(chosen.iterrows(), files, results):
        ans: Answer | None = res.value if res.ok else None
        out = {"provider": cell["provider"], "model": cell["model"], "strategy": cell["strategy"],
               "image_path": row["image_path"], "file": file, "status": "ok" if res.ok else res.failure,
               "detail": res.detail, "cached": res.cached, "reasoning": ans.reasoning if ans else ""}
        for t in tasks:
            out[f"true_{t}"] = row[t]
            out[f"pred_{t}"] = ans.labels[t] if ans else ""
            out[f"confidence_{t}"] = ans.confidence[t] if ans and ans.confidence else None
        rows.append(out)
    return pd.DataFrame(rows, columns=prediction_columns(tasks))


def top_label_ece(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of stated confidences: ``sum_b |acc_b - conf_b| n_b / n`` over
    ``n_bins`` equal-width bins of [0, 1] (confidence 1.0 in the last bin). ``nan`` when empty."""
    n = len(confidence)
    if n == 0:
        return float("nan")
    bins: dict[int, list[tuple[float, bool]]] = {}
    for c, ok in zip(confidence, correct):
        bins.setdefault(min(int(c * n_bins), n_bins - 1), []).append((c, ok))
    return float(sum(abs(sum(ok for _, ok in b) / len(b) - sum(c for c, _ in b) / len(b)) * len(b)
                     for b in bins.values()) / n)


def score(predictions: pd.DataFrame, tasks: Sequence[str]) -> dict[str, Any]:
    """Coverage, failures by reason and the classification report of the answered rows of one
    cell; with confidences, per task their mean and calibration error (:func:`top_label_ece`)."""
    from medicsynth.metrics import classification_report

    answered = predictions[predictions["status"] == "ok"]
    n_selected, n_scored = len(predictions), len(answered)
    metrics: dict[str, Any] = {
        "n_selected": n_selected,
        "n_scored": n_scored,
        "coverage": round(n_scored / n_selected, 6) if n_selected else None,
        "failures": dict(sorted(Counter(s for s in predictions["status"] if s != "ok").items())),
        "scored_on": "answered images only; failed images are excluded from the scores",
        "mean_macro_f1": None,
        "mean_accuracy": None,
        "report": None,
    }
    if n_scored:
        report = classification_report(
            {t: answered[f"true_{t}"].to_numpy() for t in tasks},
            {t: answered[f"pred_{t}"].to_numpy() for t in tasks},
        )
        metrics.update(mean_macro_f1=report["mean_macro_f1"], mean_accuracy=report["mean_accuracy"], report=report)
        conf_cols = [f"confidence_{t}" for t in tasks]
        if conf_cols[0] in answered and answered[conf_cols].notna().all().all():
            metrics["confidence"] = {
                t: {"mean": round(float(answered[f"confidence_{t}"].mean()), 6),
                    "ece": round(top_label_ece(answered[f"confidence_{t}"].astype(float).tolist(),
                                               (answered[f"pred_{t}"] == answered[f"true_{t}"]).tolist()), 6),
                    "ece_bins": ECE_BINS}
                for t in tasks
            }
    return metrics


# ------------------------------------------------------------------------------------------
# The study's reference scores
# ------------------------------------------------------------------------------------------


def load_reference(path: str | Path | None) -> pd.DataFrame:
    """The study's published zero-shot scores (``REFERENCE_COLUMNS``); ``None`` → no row.

    Errors name the file, row and value: a missing column, an unknown strategy, a score outside
    [0, 1] or a non-positive image count.
    """
    if path is None:
        return pd.DataFrame(columns=REFERENCE_COLUMNS)
    if not Path(path).is_file():
        raise FileNotFoundError(f"zeroshot.reference: {path} not found (the study's scores; null for none)")
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = [c for c in REFERENCE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(REFERENCE_COLUMNS)}")
    out = df[list(REFERENCE_COLUMNS)].copy()
    for i, row in out.iterrows():
        where = f"{path} row {i + 2}"
        if row["prompt_strategy"] not in STRATEGIES:
            raise ValueError(f"{where}: prompt_strategy {row['prompt_strategy']!r} is not one of {', '.join(STRATEGIES)}")
        try:
            images = int(row["images"])
            scores = {c: float(row[c]) for c in (*TASKS, "mean")}
        except ValueError as exc:
            raise ValueError(f"{where}: not a number ({exc})") from None
        if images <= 0:
            raise ValueError(f"{where}: images must be positive, got {row['images']!r}")
        bad = {c: v for c, v in scores.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"{where}: macro-F1 outside [0, 1]: {bad}")
    out["images"] = out["images"].astype(int)
    for c in (*TASKS, "mean"):
        out[c] = out[c].astype(float)
    return out


# ------------------------------------------------------------------------------------------
# The comparison table
# ------------------------------------------------------------------------------------------

OURS = "ours (original test labels)"
STUDY = "study (its relabelled test labels; not comparable)"


def comparison_table(cells: Sequence[Mapping[str, Any]], reference: pd.DataFrame,
                     tasks: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of the comparison: one per matrix cell (``source`` :data:`OURS`), then one per row
    of the study's reference (``source`` :data:`STUDY`), each with per-task macro-F1 (and, for
    ours, accuracy), the mean over tasks and the number of images scored. A study row has the
    tasks it published (all four) and no accuracy (not published)."""
    rows: list[dict[str, Any]] = []
    for c in cells:
        rep = (c.get("report") or {}).get("tasks") or {}
        rows.append({
            "source": OURS, "provider": c["provider"], "model": c["model"], "strategy": c["strategy"],
            "images": c["n_scored"], "coverage": c["coverage"],
            "macro_f1": {t: rep[t]["macro_f1"] for t in tasks if t in rep},
            "accuracy": {t: rep[t]["accuracy"] for t in tasks if t in rep},
            "mean_macro_f1": c["mean_macro_f1"], "mean_accuracy": c["mean_accuracy"],
        })
    for _, r in reference.iterrows():
        rows.append({
            "source": STUDY, "provider": None, "model": r["model"], "strategy": r["prompt_strategy"],
            "images": int(r["images"]), "coverage": None,
            "macro_f1": {t: float(r[t]) for t in TASKS}, "accuracy": None,
            "mean_macro_f1": float(r["mean"]), "mean_accuracy": None,
        })
    return rows


def _fmt(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def table_markdown(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str], note: str = "") -> str:
    """The comparison table in Markdown (macro-F1 per task, means, images), ours first."""
    lines = [
        "# Zero-shot VLM classification: models × prompting strategies",
        "",
        "Macro-F1 per task on the test split. **Ours** are scored on the original (untouched) test "
        "labels, on the answered images of a seeded subset (coverage = answered / asked). **The "
        "study's** rows are its published figures (`study/zeroshot_reference.tsv`), measured on "
        "test labels it had relabelled with GPT-4o and Claude: shown for reference, not comparable.",
        "",
    ]
    if note:
        lines += [note, ""]
    cols = ["source", "model", "strategy", "images", "coverage", *tasks, "mean macro-F1", "mean accuracy"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        model = r["model"] if r["provider"] is None else f"{r['provider']}/{r['model']}"
        cells = [r["source"], model, r["strategy"], str(r["images"]),
                 "–" if r["coverage"] is None else f"{r['coverage']:.2f}",
                 *[_fmt(r["macro_f1"].get(t)) for t in tasks], _fmt(r["mean_macro_f1"]), _fmt(r["mean_accuracy"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------


def _llm_settings(params: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of the section that configure the clients (all but :data:`STAGE_KEYS`)."""
    return {k: v for k, v in params.items() if k not in STAGE_KEYS}


def run_zeroshot(
    manifest_path: str | Path,
    zeroshot_params: Mapping[str, Any],
    llm_params: Mapping[str, Any],
    *,
    prompt_dir: str | Path = "prompts",
    root: str | Path = ".",
    progress: bool = True,
    sdk_clients: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], pd.DataFrame, list[dict[str, Any]]]:
    """Run the models × strategies matrix on (a capped subset of) the test manifest.

    Args:
        manifest_path: the test manifest (``data/prepared/test.tsv``).
        zeroshot_params: the ``zeroshot`` params section, every key of :data:`STAGE_KEYS` and
            :data:`CLIENT_KEYS` present (a missing one is a ``KeyError`` naming it); keys other
            than :data:`STAGE_KEYS` go to
            :func:`medicsynth.llm.config_from_params` (an unknown one is an error before any call).
        llm_params: the ``llm`` section: ``cache_dir`` (the paid-call cache) and ``prices`` (the
            dated price table of the cost estimate; ``null`` for none).
        prompt_dir: directory of ``classify_system.txt``, ``classify_user.txt``,
            ``refusal_fallback.txt`` and ``zeroshot_<strategy>.txt``.
        root: what relative manifest ``file`` paths and ``reference`` are relative to.
        progress: show a tqdm bar per cell.
        sdk_clients: ``{provider: SDK client}`` to use instead of clients built from the environment (tests).

    Returns ``(metrics, predictions, table)``: metrics as written to ``metrics/zeroshot.json``
    (``cells`` in matrix order, models outer and strategies inner, each with its report and
    ``usage``; top-level ``usage`` by cell name; ``estimate`` of the whole matrix), predictions
    one row per (cell, asked image) (:func:`prediction_columns`), and the comparison ``table``
    rows (:func:`comparison_table`; the study's rows only when skipped).

    Raises :class:`medicsynth.llm.LLMBudgetError` (the matrix's estimate above ``budget_usd``,
    nothing sent), :class:`medicsynth.llm.LLMAbortError` (key/account/model errors) or
    :class:`medicsynth.llm.LLMFailureShareError` (a cell's failed share above ``max_failure_share``).
    """
    from medicsynth.llm.labels_answer import canonical_tasks

    params = dict(zeroshot_params)
    for key in (*STAGE_KEYS, *CLIENT_KEYS):
        require(params, SECTION, key)
    tasks = canonical_tasks(params["tasks"])
    strategies = matrix_strategies(params)
    models = matrix_models(params)
    reference_path = params["reference"]
    reference = load_reference(None if reference_path is None else Path(root) / reference_path)
    if not models:
        skipped = {"skipped": True, "reason": SKIP_REASON, "provider": "none"}
        return skipped, empty_predictions(tasks), comparison_table([], reference, tasks)

    from medicsynth.llm import client_from_params, estimate_requests, price_table_from_params
    from medicsynth.llm.cost import CostEstimate, check_budget

    # Step 1: the cells' settings, checked (a client built) before anything is read or sent.
    cache_dir = require(llm_params, "llm", "cache_dir")
    prices = price_table_from_params(require(llm_params, "llm", "prices"))
    max_calls, budget_usd = params["max_calls"], params["budget_usd"]
    shared = _llm_settings(params)

    def make_client(cell: Mapping[str, Any], calls_left: int | None) -> Any:
        settings = dict(shared, provider=cell["provider"], model=cell["model"], base_url=cell["base_url"],
                        max_calls=calls_left, budget_usd=None)
        if cell["strategy"] in REASONING_STRATEGIES:
            settings["max_tokens"] = params["reasoning_max_tokens"]
        return client_from_params(settings, cache_dir, llm=llm_params, where="zeroshot", prices=prices,
                                  sdk_client=(sdk_clients or {}).get(cell["provider"]))

    cells = [dict(row, strategy=s) for row in models for s in strategies]
    for cell in cells:
        cell["client"] = make_client(cell, max_calls)

    # Step 2: the capped, seeded subset of the test split: the same images in every cell.
    test = read_manifest(manifest_path)
    chosen = select_rows(test, params["max_images"], int(params["seed"]))
    files = [resolve_file(f, root) for f in chosen["file"]]
    requests = {s: [strategy_request(s, f, tasks, prompt_dir, key=key) for f, key in zip(files, chosen["image_path"])]
                for s in strategies}

    # Step 3: the matrix's cost, estimated before anything is sent: every cell's uncached
    # requests; above zeroshot.budget_usd it stops here (LLMBudgetError).
    estimates = []
    if prices is not None or budget_usd is not None:
        for cell in cells:
            est = estimate_requests(cell["client"], requests[cell["strategy"]], prices)
            cell["estimate"] = est
            estimates.append(est)
            if budget_usd is not None and est.usd is None:
                check_budget(est, budget_usd, "zeroshot.budget_usd")  # names the unpriced model
        usd = [e.usd for e in estimates]
        total = CostEstimate(
            provider="+".join(sorted({c["provider"] for c in cells})),
            model=f"matrix of {len(models)} model(s) x {len(strategies)} strateg{'y' if len(strategies) == 1 else 'ies'}",
            requests=sum(e.requests for e in estimates), cached=sum(e.cached for e in estimates),
            to_send=sum(e.to_send for e in estimates), input_tokens=sum(e.input_tokens for e in estimates),
            image_tokens=sum(e.image_tokens for e in estimates),
            output_tokens_max=sum(e.output_tokens_max for e in estimates),
            usd=None if any(u is None for u in usd) else sum(usd), price_date=prices.date if prices else None,
        )
        check_budget(total if len(cells) > 1 else estimates[0], budget_usd, "zeroshot.budget_usd")
    else:
        total = None

    # Step 4: the cells, one after another; max_calls is the matrix's total. A cell whose
    # answers mostly failed fails the stage instead of scoring a small remainder.
    out_cells, tables, usage = [], [], {}
    calls = 0
    for cell in cells:
        cell.pop("client")
        # A fresh client per cell: its max_calls is what the matrix's cap leaves.
        client = make_client(cell, None if max_calls is None else max(0, max_calls - calls))
        name = cell_name(cell["provider"], cell["model"], cell["strategy"])
        if prices is not None:
            client.usage.price, client.usage.price_date = prices.price(cell["model"]), prices.date
        if "estimate" in cell:
            client.usage.estimate = cell.pop("estimate").as_dict()
        results = client.raise_if_failing(
            client.run(requests[cell["strategy"]], desc=f"zeroshot {name}", progress=progress),
            f"zeroshot images ({cell['strategy']})",
        )
        calls += client.usage.api_calls
        preds = predictions_table(cell, chosen, files, results, tasks)
        tables.append(preds)
        scored = score(preds, tasks)
        if cell["strategy"] == "weighted_option_analysis":
            agree = [r.value.top_weight_agrees for r in results if r.ok]
            scored["final_label_is_top_weight"] = round(sum(agree) / len(agree), 6) if agree else None
        usage[name] = client.usage.as_dict()
        out_cells.append({"name": name, **{k: cell[k] for k in ("provider", "model", "strategy")},
                          "max_tokens": client.config.max_tokens, **scored, "usage": usage[name]})
        max_failure_share = client.config.max_failure_share

    first = out_cells[0]
    metrics: dict[str, Any] = {
        "skipped": False,
        # The first cell (first model, first strategy) at the top level, as before the matrix.
        "provider": first["provider"],
        "model": first["model"],
        "strategy": first["strategy"],
        "tasks": list(tasks),
        "n_test": len(test),
        **{k: first[k] for k in ("n_selected", "n_scored", "coverage", "failures", "scored_on",
                                 "mean_macro_f1", "mean_accuracy", "report")},
        "max_failure_share": max_failure_share,
        "models": [{k: m[k] for k in ("provider", "model")} for m in models],
        "strategies": list(strategies),
        "cells": out_cells,
        "estimate": total.as_dict() if total is not None else None,
        "usage": usage,
    }
    predictions = pd.concat(tables, ignore_index=True)
    return metrics, predictions, comparison_table(out_cells, reference, tasks)


def summary_line(metrics: Mapping[str, Any]) -> str:
    """One line for the stage's stdout."""
    if metrics["skipped"]:
        return f"zeroshot skipped: {metrics['reason']}"
    parts = []
    for c in metrics["cells"]:
        u = c["usage"]
        parts.append(f"{c['name']}: scored {c['n_scored']}/{c['n_selected']}, mean macro-F1 "
                     f"{c['mean_macro_f1'] if c['mean_macro_f1'] is None else round(c['mean_macro_f1'], 4)}, "
                     f"failures {c['failures'] or 'none'}, API calls {u['api_calls']}, cache hits {u['cache_hits']}")
    return "zeroshot " + "; ".join(parts)


def table_json(rows: Sequence[Mapping[str, Any]]) -> str:
    """The comparison rows as JSON text (sorted keys, stable bytes)."""
    return json.dumps({"rows": list(rows), "sources": {"ours": OURS, "study": STUDY}}, indent=2, sort_keys=True) + "\n"
