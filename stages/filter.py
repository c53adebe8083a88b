"""filter stage: the quality gate between generated images and training.

Reads ``data/synthetic/manifest.tsv`` (generate), the real training manifest (near-copy check)
and params ``filter`` (method vlm: also ``llm``, client defaults and prices); writes the kept rows (``data/filtered/manifest.tsv``), every image's rule
outcomes (``data/filtered/decisions.tsv``), ``metrics/filter.json`` and ``plots/filter_grid.png``.
The rules are documented in :mod:`medicsynth.filtering`.
"""

from __future__ import annotations

import medicsynth  # noqa: F401 - first import: pins the CPU code paths before numpy/torch load (numerics.py)

import argparse
import os
import sys

from medicsynth.filtering import FilterConfig, FilterPaths, run_filter, write_filter_outputs
from medicsynth.llm.cost import LLMBudgetError
from medicsynth.numerics import apply_params as apply_numerics
from medicsynth.params import load_params, section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()

    params = load_params(args.params)
    apply_numerics(params)
    config = FilterConfig.from_params(section(params, "filter"))
    try:
        result = run_filter(config, FilterPaths(), llm=params.get("llm"))
    except LLMBudgetError as exc:  # above filter.vlm.budget_usd: nothing was sent
        sys.exit(f"filter refused: {exc}")
    write_filter_outputs(result, config, FilterPaths())

    m = result.metrics
    rejected = ", ".join(f"{k} {v}" for k, v in m["rejected"].items() if v)
    print(f"filter ({config.method}): kept {m['kept']}/{m['total']} ({m['kept_share']}); "
          f"rejected: {rejected or 'none'}")
    if "classifier" in m:
        print("agreement with intended labels (original model, all decodable):", m["classifier"]["agreement"])


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
