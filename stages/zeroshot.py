"""zeroshot stage: VLM zero-shot classification of the test split, scored on its untouched labels.

Reads ``data/prepared/test.tsv`` and params ``zeroshot`` (provider ``none`` | ``openai`` |
``anthropic``, model, ``max_images``, ``seed``, ``tasks`` and the LLM call settings of
:class:`medicsynth.llm.LLMConfig`) plus ``llm.cache_dir``; writes ``metrics/zeroshot.json`` and
``data/zeroshot/predictions.tsv``.

- ``provider: none`` (the default, offline) writes ``{"skipped": true, "reason": ...}`` and an
  empty predictions table: never a score.
- At most ``max_images`` test images are asked (cost cap), chosen by a seeded hash of
  ``image_path`` so the choice does not depend on row order and a larger cap extends it.
- One classification request per image (:func:`medicsynth.llm.classify_request`), through the
  cached, budgeted client. Failed images (refusal, invalid answer, ...) are excluded from the
  scores, counted by reason and reported as ``coverage``; scores on the answered subset are
  biased if failures correlate with classes (graphic images are refused more), so read them
  with the coverage.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from medicsynth.timing import write_metrics
from medicsynth.labels import TASKS
from medicsynth.manifest import read_manifest, write_tsv
from medicsynth.params import load_params, section

#: Keys of the ``zeroshot`` section that are the stage's own; all others configure the client.
STAGE_KEYS = ("provider", "max_images", "seed", "tasks")
SKIP_REASON = (
    "zeroshot.provider is 'none' (the offline default): no VLM was called. Set it to openai or "
    "anthropic, set zeroshot.model, and export OPENAI_API_KEY / ANTHROPIC_API_KEY to score a VLM."
)


def select_rows(df: pd.DataFrame, max_images: int | None, seed: int = 0) -> pd.DataFrame:
    """Up to ``max_images`` rows, those with the smallest ``sha256(f"{seed}:{image_path}")``.

    Independent of row order, and nested: a larger cap keeps every row of a smaller one, so its
    answers come from the cache. Returned in manifest order.
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


def empty_predictions(tasks: tuple[str, ...] = TASKS) -> pd.DataFrame:
    columns = ["image_path", "file", "status", "detail", "cached"]
    columns += [f"true_{t}" for t in tasks] + [f"pred_{t}" for t in tasks]
    return pd.DataFrame(columns=columns)


def run_zeroshot(
    manifest_path: str | Path,
    zeroshot_params: Mapping[str, Any],
    llm_params: Mapping[str, Any] | None = None,
    *,
    prompt_dir: str | Path = "prompts",
    root: str | Path = ".",
    progress: bool = True,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Classify (a capped subset of) the test manifest with a VLM; ``(metrics, predictions)``."""
    from medicsynth.llm.labels_answer import canonical_tasks

    params = dict(zeroshot_params)
    provider = str(params.get("provider", "none")).lower()
    tasks = canonical_tasks(params.get("tasks") or TASKS)
    if provider == "none":
        return {"skipped": True, "reason": SKIP_REASON, "provider": "none"}, empty_predictions(tasks)

    from medicsynth.llm import classify_request, client_from_params
    from medicsynth.metrics import classification_report

    settings = {k: v for k, v in params.items() if k not in STAGE_KEYS}
    settings["provider"] = provider
    cache_dir = (llm_params or {}).get("cache_dir") or ".llm_cache"
    client = client_from_params(settings, cache_dir)

    test = read_manifest(manifest_path)
    chosen = select_rows(test, params.get("max_images"), int(params.get("seed", 0)))
    files = [resolve_file(f, root) for f in chosen["file"]]
    requests = [
        classify_request(f, tasks, prompt_dir, key=key) for f, key in zip(files, chosen["image_path"])
    ]
    results = client.run(requests, desc="zeroshot", progress=progress)

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
    predictions = pd.DataFrame(rows, columns=empty_predictions(tasks).columns)

    answered = predictions[predictions["status"] == "ok"]
    n_selected, n_scored = len(predictions), len(answered)
    metrics: dict[str, Any] = {
        "skipped": False,
        "provider": provider,
        "model": client.config.model,
        "tasks": list(tasks),
        "n_test": len(test),
        "n_selected": n_selected,
        "n_scored": n_scored,
        "coverage": round(n_scored / n_selected, 6) if n_selected else None,
        "failures": dict(sorted(Counter(s for s in predictions["status"] if s != "ok").items())),
        "scored_on": "answered images only; failed images are excluded from the scores",
    }
    if n_scored:
        report = classification_report(
            {t: answered[f"true_{t}"].to_numpy() for t in tasks},
            {t: answered[f"pred_{t}"].to_numpy() for t in tasks},
        )
        metrics["mean_macro_f1"] = report["mean_macro_f1"]
        metrics["mean_accuracy"] = report["mean_accuracy"]
        metrics["report"] = report
    else:
        metrics["mean_macro_f1"] = None
        metrics["mean_accuracy"] = None
        metrics["report"] = None
    metrics["usage"] = client.usage.as_dict()
    return metrics, predictions


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--manifest", default="data/prepared/test.tsv")
    ap.add_argument("--prompts", default="prompts")
    ap.add_argument("--metrics", default="metrics/zeroshot.json")
    ap.add_argument("--predictions", default="data/zeroshot/predictions.tsv")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    zs = section(params, "zeroshot")
    llm = params.get("llm") or {}
    metrics, predictions = run_zeroshot(args.manifest, zs, llm, prompt_dir=args.prompts)
    write_tsv(predictions, args.predictions)
    write_metrics(metrics, args.metrics, "zeroshot")  # API latencies -> timing/zeroshot.json
    if metrics["skipped"]:
        print(f"zeroshot skipped: {metrics['reason']}")
    else:
        u = metrics["usage"]
        print(
            f"zeroshot {metrics['provider']}/{metrics['model']}: scored {metrics['n_scored']}/"
            f"{metrics['n_selected']} (coverage {metrics['coverage']}), mean macro-F1 "
            f"{metrics['mean_macro_f1']}, failures {metrics['failures'] or 'none'}; "
            f"API calls {u['api_calls']}, cache hits {u['cache_hits']}"
        )


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
