"""zeroshot stage: VLM zero-shot classification of the test split, models × prompting strategies (:mod:`medicsynth.zeroshot`).

Reads ``data/prepared/test.tsv``, params ``zeroshot`` and ``llm`` (``cache_dir``, ``prices``) and
the study's reference scores (``zeroshot.reference``); writes ``metrics/zeroshot.json`` (every
cell's scores and usage), ``data/zeroshot/predictions.tsv`` (one row per cell and image), the
comparison table ``metrics/zeroshot.md`` / ``metrics/zeroshot_table.json`` (ours beside the
study's, labelled) and its plot ``plots/zeroshot.png``. Offline (``provider: none``, no
``extra_models``) it records that it was skipped, never a score; table and plot then show the
study's figures only. Exits non-zero, writing nothing, when the estimated cost of the matrix is
above ``zeroshot.budget_usd`` (nothing sent), when a client stops on key/account/model errors, or
when more than ``zeroshot.max_failure_share`` of a cell's images fail.
"""

from __future__ import annotations

import medicsynth  # noqa: F401 - first import: pins the CPU code paths before numpy/torch load (numerics.py)

import argparse
import os
import sys

from medicsynth.io import write_text
from medicsynth.llm import LLMBudgetError, LLMStageError
from medicsynth.llm.labels_answer import canonical_tasks
from medicsynth.manifest import write_tsv
from medicsynth.params import load_params, section
from medicsynth.plots import plot_zeroshot
from medicsynth.timing import write_metrics
from medicsynth.zeroshot import STRATEGIES, run_zeroshot, summary_line, table_json, table_markdown


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--manifest", default="data/prepared/test.tsv")
    ap.add_argument("--prompts", default="prompts")
    ap.add_argument("--root", default=".", help="what relative image paths and zeroshot.reference are relative to")
    ap.add_argument("--metrics", default="metrics/zeroshot.json")
    ap.add_argument("--predictions", default="data/zeroshot/predictions.tsv")
    ap.add_argument("--table", default="metrics/zeroshot.md")
    ap.add_argument("--table-json", default="metrics/zeroshot_table.json")
    ap.add_argument("--plot", default="plots/zeroshot.png")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    zs = section(params, "zeroshot")
    try:
        metrics, predictions, table = run_zeroshot(
            args.manifest, zs, section(params, "llm"), prompt_dir=args.prompts, root=args.root
        )
    except (LLMStageError, LLMBudgetError) as exc:
        sys.exit(f"zeroshot failed: {exc}")
    note = f"Ours: skipped ({metrics['reason']})" if metrics["skipped"] else ""
    write_tsv(predictions, args.predictions)
    write_metrics(metrics, args.metrics, "zeroshot")  # API latencies -> timing/zeroshot.json
    write_text(table_markdown(table, canonical_tasks(zs["tasks"]), note), args.table)
    write_text(table_json(table), args.table_json)
    plot_zeroshot(table, args.plot, "ours: skipped (zeroshot.provider none)" if metrics["skipped"] else "",
                  strategies=STRATEGIES)
    print(summary_line(metrics))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
