"""zeroshot stage: VLM zero-shot classification of the test split (:mod:`medicsynth.zeroshot`).

Reads ``data/prepared/test.tsv`` and params ``zeroshot`` and ``llm.cache_dir``; writes
``metrics/zeroshot.json`` and ``data/zeroshot/predictions.tsv``. Offline (``provider: none``) it
records that it was skipped, never a score. Exits non-zero, writing nothing, when the estimated
cost is above ``zeroshot.budget_usd`` (nothing sent), when the client stops on key/account/model
errors, or when more than ``zeroshot.max_failure_share`` of the images fail.
"""

from __future__ import annotations

import argparse
import os
import sys

from medicsynth.timing import write_metrics
from medicsynth.llm import LLMBudgetError, LLMStageError
from medicsynth.manifest import write_tsv
from medicsynth.params import load_params, section
from medicsynth.zeroshot import run_zeroshot, summary_line


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--manifest", default="data/prepared/test.tsv")
    ap.add_argument("--prompts", default="prompts")
    ap.add_argument("--metrics", default="metrics/zeroshot.json")
    ap.add_argument("--predictions", default="data/zeroshot/predictions.tsv")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    try:
        metrics, predictions = run_zeroshot(
            args.manifest, section(params, "zeroshot"), params.get("llm") or {}, prompt_dir=args.prompts
        )
    except (LLMStageError, LLMBudgetError) as exc:
        sys.exit(f"zeroshot failed: {exc}")
    write_tsv(predictions, args.predictions)
    write_metrics(metrics, args.metrics, "zeroshot")  # API latencies -> timing/zeroshot.json
    print(summary_line(metrics))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
