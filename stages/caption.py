"""Stage ``caption``: one label-aware caption per planned synthetic image.

Reads ``caption`` (and, for LLM backends, ``llm``: client defaults and prices) from params.yaml,
``data/allocation/plan.tsv`` and (LLM backends) the real
training manifest to ground on. Writes ``data/captions/captions.tsv`` and ``metrics/caption.json``.

``captions.tsv`` is declared ``persist: true`` in dvc.yaml: DVC leaves it in place, this stage
reads it as the previous result and re-captions only rows whose id, labels, mode or
configuration changed (see :mod:`medicsynth.captions`). LLM answers are also kept in the
client's on-disk cache (``caption.llm.cache_dir``, default ``.llm_cache/``).
"""

from __future__ import annotations

import medicsynth  # noqa: F401 - first import: pins the CPU code paths before numpy/torch load (numerics.py)

import argparse
import sys
from pathlib import Path

import pandas as pd

from medicsynth.captions import CaptionConfig, caption_plan, load_length_limit, make_clients
from medicsynth.llm.cost import LLMBudgetError
from medicsynth.timing import write_metrics, write_timing

# How many captions this run wrote or reused depends on what an earlier (possibly killed) run left
# in data/captions: a run fact for timing/caption.json, not a cached metric of the captions.
RUN_KEYS = ("new", "reused", "shortened_new", "template_calls", "llm_requests")
from medicsynth.manifest import read_manifest, write_tsv
from medicsynth.params import load_params, require, section

PLAN_TSV = "data/allocation/plan.tsv"
CAPTIONS_TSV = "data/captions/captions.tsv"
METRICS_JSON = "metrics/caption.json"


def read_tsv(path: str | Path) -> pd.DataFrame:
    # Strings everywhere: an empty grounded_on must stay "", not become NaN.
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    all_params = load_params(args.params)
    params = section(all_params, "caption")
    config = CaptionConfig.from_params(params)
    plan = read_tsv(PLAN_TSV)
    previous = read_tsv(CAPTIONS_TSV) if Path(CAPTIONS_TSV).exists() else None

    train = clients = None
    if config.backend != "template":
        manifest = read_manifest(require(params, "caption", "train_manifest"))
        train = manifest[(manifest["split"] == "train") & (manifest["source"] == "real")]
        clients = make_clients(config, config.llm.get("cache_dir"), llm=all_params.get("llm"))

    limit = load_length_limit(config.tokenizer, config.max_tokens, config.max_words)
    if limit.note:
        print(f"caption: {limit.note}")
    try:
        result = caption_plan(plan, config, train=train, previous=previous, limit=limit, clients=clients)
    except LLMBudgetError as exc:  # above caption.llm.budget_usd: nothing was sent
        sys.exit(f"caption refused: {exc}")
    write_tsv(result.table, CAPTIONS_TSV)
    m = result.metrics
    run = {k: m.pop(k) for k in RUN_KEYS if k in m}
    timing = write_metrics(m, METRICS_JSON, "caption")  # LLM latencies -> timing/caption.json
    write_timing("caption", {**timing, "run": run})
    print(
        f"caption ({m['backend']}): {m['rows']} rows, {run['new']} new, {run['reused']} reused, "
        f"{m['failed']} failed (template fallback), {m['shortened']} shortened"
    )
    for mode, sent in m.get("llm_settings", {}).items():
        if sent["temperature_sent"] != sent["temperature_requested"]:
            print(f"caption: {mode} temperature {sent['temperature_requested']} not sent: "
                  f"the {config.backend} API version in use takes none (metrics/caption.json llm_settings)")


if __name__ == "__main__":
    main()
