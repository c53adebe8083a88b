"""VLM zero-shot classification of the test split, scored on its untouched labels.

:func:`run_zeroshot` is the whole zeroshot stage except reading params and writing files
(``stages/zeroshot.py``). It takes the ``zeroshot`` params section (provider ``none`` |
``openai`` | ``anthropic``, model, ``max_images``, ``seed``, ``tasks`` and the call settings of
:class:`medicsynth.llm.LLMConfig`) and the ``llm`` section (``cache_dir``).

- ``provider: none`` (the default, offline) gives ``{"skipped": true, "reason": ...}`` and an
  empty predictions table: never a score.
- At most ``max_images`` test images are asked (cost cap), chosen by a seeded hash of
  ``image_path`` so the choice does not depend on row order and a larger cap extends it.
- One classification request per image (:func:`medicsynth.llm.classify_request`), through the
  cached, budgeted client. Failed images (refusal, invalid answer, ...) are excluded from the
  scores, counted by reason and reported as ``coverage``; scores on the answered subset are
  biased if failures correlate with classes (graphic images are refused more), so read them
  with the coverage.
- Failures that fail: the client stops after ``abort_after`` consecutive key/account/model
  errors (:class:`medicsynth.llm.LLMAbortError`), and more than ``max_failure_share`` failed
  images raise :class:`medicsynth.llm.LLMFailureShareError`; either way no score is produced.
  Failure details in the predictions are redacted (no key reaches a DVC output).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from medicsynth.labels import TASKS
from medicsynth.manifest import read_manifest

#: Keys of the ``zeroshot`` section that are the stage's own; all others configure the client.
STAGE_KEYS = ("provider", "max_images", "seed", "tasks")
SKIP_REASON = (
    "zeroshot.provider is 'none' (the offline default): no VLM was called. Set it to openai or "
    "anthropic, set zeroshot.model, and export OPENAI_API_KEY / ANTHROPIC_API_KEY to score a VLM."
)


def select_rows(df: pd.DataFrame, max_images: int | None, seed: int = 0) -> pd.DataFrame:
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


def resolve_file(file: str, root: str | Path) -> str:
    """A manifest ``file``: absolute as it is, relative to the repository root otherwise."""
    path = Path(file)
    return str(path if path.is_absolute() else Path(root) / path)


def empty_predictions(tasks: Sequence[str] = TASKS) -> pd.DataFrame:
    """The predictions table with its columns and no row (``true_<task>``/``pred_<task>`` per task)."""
    columns = ["image_path", "file", "status", "detail", "cached"]
    columns += [f"true_{t}" for t in tasks] + [f"pred_{t}" for t in tasks]
    return pd.DataFrame(columns=columns)


def predictions_table(chosen: pd.DataFrame, files: Sequence[str], results: Sequence[Any],
                      tasks: Sequence[str]) -> pd.DataFrame:
    """One row per asked image: status (``ok`` or the failure reason), redacted detail, labels."""
    rows = []
    for (_, row), file, res in zip(chosen.iterrows(), files, results):
        out = {
            "image_path": row["image_path"],
            "file": file,
            "status": "ok" if res.ok else res.failure,
            "detail": res.detail,
            "cached": res.cached,
        }
        for t in tasks:
            out[f"true_{t}"] = row[t]
            out[f"pred_{t}"] = res.value[t] if res.ok else ""
        rows.append(out)
    return pd.DataFrame(rows, columns=empty_predictions(tasks).columns)


def score(predictions: pd.DataFrame, tasks: Sequence[str]) -> dict[str, Any]:
    """Coverage, failures by reason and the classification report of the answered rows."""
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
    return metrics


def run_zeroshot(
    manifest_path: str | Path,
    zeroshot_params: Mapping[str, Any],
    llm_params: Mapping[str, Any] | None = None,
    *,
    prompt_dir: str | Path = "prompts",
    root: str | Path = ".",
    progress: bool = True,
    sdk_client: Any | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Classify (a capped subset of) the test manifest with a VLM.

    Args:
        manifest_path: the test manifest (``data/prepared/test.tsv``).
        zeroshot_params: the ``zeroshot`` params section (see the module docstring); keys other
            than :data:`STAGE_KEYS` go to :func:`medicsynth.llm.config_from_params` (an unknown
            one is an error before any call).
        llm_params: the ``llm`` section; ``cache_dir`` is the paid-call cache, ``prices`` the dated
            price table of the cost estimate (``usage.estimate`` beside the actual ``usage``).
        prompt_dir: directory of ``classify_system.txt``, ``classify_user.txt``, ``refusal_fallback.txt``.
        root: what relative manifest ``file`` paths are relative to.
        progress: show a tqdm bar.
        sdk_client: an SDK client to use instead of one built from the environment (tests).

    Returns ``(metrics, predictions)``: metrics as written to ``metrics/zeroshot.json``
    (``usage`` included), predictions one row per asked image (:func:`empty_predictions` columns).

    Raises :class:`medicsynth.llm.LLMBudgetError` (estimate above ``budget_usd``, nothing sent),
    :class:`medicsynth.llm.LLMAbortError` (key/account/model errors) or
    :class:`medicsynth.llm.LLMFailureShareError` (failed share above ``max_failure_share``).
    """
    from medicsynth.llm.labels_answer import canonical_tasks

    params = dict(zeroshot_params)
    provider = str(params.get("provider", "none")).lower()
    tasks = canonical_tasks(params.get("tasks") or TASKS)
    if provider == "none":
        return {"skipped": True, "reason": SKIP_REASON, "provider": "none"}, empty_predictions(tasks)

    from medicsynth.llm import classify_request, client_from_params, price_table_from_params

    # Step 1: the client (settings checked before anything is read or sent).
    settings = {k: v for k, v in params.items() if k not in STAGE_KEYS}
    settings["provider"] = provider
    llm_params = llm_params or {}
    cache_dir = llm_params.get("cache_dir") or ".llm_cache"
    prices = price_table_from_params(llm_params.get("prices"))
    client = client_from_params(settings, cache_dir, sdk_client=sdk_client, prices=prices, llm=llm_params,
                                where="zeroshot")

    # Step 2: the capped, seeded subset of the test split and one request per image.
    test = read_manifest(manifest_path)
    chosen = select_rows(test, params.get("max_images"), int(params.get("seed", 0)))
    files = [resolve_file(f, root) for f in chosen["file"]]
    requests = [classify_request(f, tasks, prompt_dir, key=key) for f, key in zip(files, chosen["image_path"])]

    # Step 3: the calls: estimated first (LLMBudgetError above zeroshot.budget_usd, nothing sent),
    # cached, budgeted; LLMAbortError when the key or model is wrong.
    # A stage whose answers mostly failed fails instead of scoring a small remainder.
    results = client.raise_if_failing(client.run(requests, desc="zeroshot", progress=progress), "zeroshot images")

    # Step 4: predictions and scores on the answered images.
    predictions = predictions_table(chosen, files, results, tasks)
    metrics: dict[str, Any] = {
        "skipped": False,
        "provider": provider,
        "model": client.config.model,
        "tasks": list(tasks),
        "n_test": len(test),
        **score(predictions, tasks),
        "max_failure_share": client.config.max_failure_share,
        "usage": client.usage.as_dict(),
    }
    return metrics, predictions


def summary_line(metrics: Mapping[str, Any]) -> str:
    """One line for the stage's stdout."""
    if metrics["skipped"]:
        return f"zeroshot skipped: {metrics['reason']}"
    u = metrics["usage"]
    return (
        f"zeroshot {metrics['provider']}/{metrics['model']}: scored {metrics['n_scored']}/"
        f"{metrics['n_selected']} (coverage {metrics['coverage']}), mean macro-F1 "
        f"{metrics['mean_macro_f1']}, failures {metrics['failures'] or 'none'}; "
        f"API calls {u['api_calls']}, cache hits {u['cache_hits']}"
    )
