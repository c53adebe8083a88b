"""Stage ``compare``: variants over training seeds on the ORIGINAL test labels.

Reads ``compare`` from params.yaml and ``data/predictions/{variant}-{arch}-s{seed}/test.tsv`` per
variant and training seed (written by the evaluate stage); the original training manifest defines
the minority classes. Writes:

- ``metrics/compare.json``: per variant the mean ± sd over seeds of macro-F1 and per-class F1
  with two-way bootstrap intervals (seeds × test images), the differences variant − original
  with intervals, p-values and verdicts (better / no evidence / worse);
- ``metrics/compare.md``: the same as Markdown tables, verdicts and minority classes first;
- ``plots/compare_macro_f1.png``, ``plots/compare_per_class_f1.png``: bars with interval error
  bars; ``plots/compare_diff.png``: the differences to original with their intervals.

A variant without the predictions of every seed is skipped with a note; original is required.
"""

from __future__ import annotations

import medicsynth  # noqa: F401 - first import: pins the CPU code paths before numpy/torch load (numerics.py)

import argparse
from pathlib import Path

from medicsynth.compare import run_compare
from medicsynth.params import load_params, require, section

PREDICTIONS_DIR = "data/predictions"
TRAIN_MANIFEST = "data/variants/original/train.tsv"
METRICS_JSON = "metrics/compare.json"
REPORT_MD = "metrics/compare.md"
MACRO_PNG = "plots/compare_macro_f1.png"
PER_CLASS_PNG = "plots/compare_per_class_f1.png"
DIFF_PNG = "plots/compare_diff.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    params = load_params(args.params)
    cfg = section(params, "compare")
    # Defaults follow the pipeline's own matrix, so compare needs no edit when variants change.
    variants = require(cfg, "compare", "variants") or require(params, "params", "variants")
    arch = require(cfg, "compare", "arch") or require(section(params, "train"), "train", "archs")[0]
    if not arch:
        raise SystemExit("params.yaml: set compare.arch (or train.archs) to choose the models to compare")
    seeds = require(cfg, "compare", "seeds") or require(section(params, "train"), "train", "seeds")
    if not seeds:
        raise SystemExit("params.yaml: set train.seeds (or compare.seeds) to the training seeds to compare")

    result = run_compare(
        predictions_dir=PREDICTIONS_DIR,
        variants=list(variants),
        arch=str(arch),
        seeds=[int(x) for x in seeds],
        train_manifest=TRAIN_MANIFEST,
        out_json=METRICS_JSON,
        out_md=REPORT_MD,
        macro_plot=MACRO_PNG,
        per_class_plot=PER_CLASS_PNG,
        diff_plot=DIFF_PNG,
        minority_share=float(require(cfg, "compare", "minority_share")),
        n_boot=int(require(cfg, "compare", "n_boot")),
        seed=int(require(cfg, "compare", "seed")),
        ci=float(require(cfg, "compare", "ci")),
    )
    for v, reason in result["skipped"].items():
        print(f"compare: skipped {v}: {reason}")
    line = ", ".join(f"{v} {m['mean']:.3f}±{m['sd']:.3f}" for v, m in result["mean_macro_f1"].items())
    print(f"compare ({arch}, seeds {result['seeds']}, n={result['n_test']}): mean macro-F1 {line}")
    for key, d in result["mean_macro_f1_diff"].items():
        print(f"  {key}: {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] {d['verdict']}")


if __name__ == "__main__":
    main()
