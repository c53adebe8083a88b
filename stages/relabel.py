"""relabel: flag suspect labels, ask the configured voters, change labels only by consensus.

Reads params.yaml's ``relabel`` section (its fold models are configured in ``relabel.model``),
and ``llm`` (``cache_dir``, the client defaults ``llm.client`` and the price table ``llm.prices``).
Exits non-zero, sending nothing, when a VLM voter's estimated cost is above
``relabel.<provider>.budget_usd``. The procedure is :func:`medicsynth.relabel.run_relabel`.
Outputs: data/variants/relabelled/{train,dev}.tsv, data/relabelled_test.tsv (the relabelled test
labels, "+relabel" in the provenance of changed rows, when relabel.splits lists test; a header
only otherwise, so that evaluate can depend on it and reruns only when test labels change;
data/prepared/test.tsv keeps the original labels, and evaluate/compare score both),
data/relabel/changes.tsv (one row per changed or voted-on label with each voter's answer),
metrics/relabel.json (flags, changes per class, voter usage and failures, what the VLM voters'
requests carried, and — on the demo — precision/recall of the changes against the clean labels),
plots/relabel_changes.png. With test listed, test images join the pool the flagging models
train on (as in the study): opt in knowingly.
"""

from __future__ import annotations

import medicsynth  # noqa: F401 - first import: pins the CPU code paths before numpy/torch load (numerics.py)

import sys
from pathlib import Path

import pandas as pd

from medicsynth.llm.cost import LLMBudgetError
from medicsynth.timing import write_metrics
from medicsynth.manifest import read_manifest, write_manifest, write_tsv
from medicsynth.numerics import apply_params as apply_numerics
from medicsynth.params import load_params, require, section
from medicsynth.plots import plot_relabel_changes
from medicsynth.relabel import run_relabel

SPLIT_FILES = {"train": "data/variants/original/train.tsv", "dev": "data/variants/original/dev.tsv",
               "test": "data/prepared/test.tsv"}
OUT = Path("data/variants/relabelled")
RELABELLED_TEST = Path("data/relabelled_test.tsv")  # its own file: every evaluation depends on it
CLEAN_LABELS = Path("data/prepared/clean_labels.tsv")  # the demo's known clean labels


def main() -> None:
    params = load_params()
    apply_numerics(params)
    p = section(params, "relabel")
    splits = list(require(p, "relabel", "splits"))
    pool = pd.concat([read_manifest(SPLIT_FILES[s]) for s in splits], ignore_index=True)
    clean = pd.read_csv(CLEAN_LABELS, sep="\t", dtype=str) if CLEAN_LABELS.exists() else None
    llm = section(params, "llm")
    try:
        result = run_relabel(pool, p, llm_cache_dir=require(llm, "llm", "cache_dir"), clean=clean, llm=llm)
    except LLMBudgetError as exc:  # above relabel.<provider>.budget_usd: nothing was sent
        sys.exit(f"relabel refused: {exc}")

    for split in splits:
        rows = result.relabelled[result.relabelled["split"] == split]
        write_manifest(rows, RELABELLED_TEST if split == "test" else OUT / f"{split}.tsv")
    if "test" not in splits:  # header only: the test labels were not relabelled
        write_manifest(read_manifest(SPLIT_FILES["test"]).iloc[:0], RELABELLED_TEST)
    for split in ("train", "dev"):  # the variant always has train and dev
        if split not in splits:
            write_manifest(read_manifest(SPLIT_FILES[split]), OUT / f"{split}.tsv")
    write_tsv(result.changes, "data/relabel/changes.tsv")
    plot_relabel_changes(result.changes, "plots/relabel_changes.png")
    write_metrics(result.metrics, "metrics/relabel.json", "relabel")  # voter latencies -> timing/relabel.json
    m = result.metrics
    print({k: m[k] for k in ("flagged_images", "changed_labels")}, m.get("against_clean_labels", {}).get("mean_precision"))


if __name__ == "__main__":
    main()
