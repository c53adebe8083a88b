"""Stage ``allocate``: plan the synthetic images per label combination.

Reads ``allocate`` from params.yaml, the (relabelled) training manifest and, in ``weakness``
mode, the ``original`` model's per-class F1 on the dev split (``dev_report``; with
``f1_reports`` the lowest per class over several reports or F1 tables). Writes:

- ``data/allocation/allocation.tsv``: one row per candidate combination with its count and why;
- ``data/allocation/plan.tsv``: one row per planned image (stable ``id``, ``seed``, 4 labels);
- ``metrics/allocate.json``: per-class real / planned totals and shares;
- ``plots/allocate.png``: class shares before / after, per task.
"""

from __future__ import annotations

import medicsynth  # noqa: F401 - first import: pins the CPU code paths before numpy/torch load (numerics.py)

import argparse
from medicsynth.allocation import AllocateConfig, allocate, f1_source_paths, lowest_f1
from medicsynth.io import write_json
from medicsynth.manifest import read_manifest, write_tsv
from medicsynth.params import load_params, require, section
from medicsynth.plots import plot_allocation

ALLOCATION_TSV = "data/allocation/allocation.tsv"
PLAN_TSV = "data/allocation/plan.tsv"
METRICS_JSON = "metrics/allocate.json"
PLOT_PNG = "plots/allocate.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    params = section(load_params(args.params), "allocate")
    config = AllocateConfig.from_params(params)
    manifest_path = require(params, "allocate", "train_manifest")
    manifest = read_manifest(manifest_path)
    # Only real training rows define what is "seen" and the "before" distribution.
    train = manifest[(manifest["split"] == "train") & (manifest["source"] == "real")]
    if len(train) < len(manifest):
        print(f"allocate: ignoring {len(manifest) - len(train)} non-train or synthetic rows of {manifest_path}")

    f1, sources = None, []
    if config.mode == "weakness":
        sources = f1_source_paths(params)
        f1 = lowest_f1(sources)
        if len(sources) > 1:
            print(f"allocate: per-class F1 = lowest over {', '.join(sources)}")

    result = allocate(train, config, f1)
    result.metrics["f1_sources"] = sources
    write_tsv(result.table, ALLOCATION_TSV)
    write_tsv(result.plan, PLAN_TSV)
    write_json(result.metrics, METRICS_JSON)
    plot_allocation(result.metrics, PLOT_PNG)
    m = result.metrics
    print(
        f"allocate ({m['mode']}): {m['total']} images over {m['combinations_planned']} of "
        f"{m['combinations_candidate']} combinations ({m['combinations_seen']} seen in {len(train)} real train rows)"
    )


if __name__ == "__main__":
    main()
