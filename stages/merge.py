"""merge: the augmented training set = relabelled real rows + filtered synthetic rows at mix_ratio.

Outputs: data/variants/augmented/{train,dev}.tsv (train has a `source` column real|synthetic;
dev is the relabelled dev set, unchanged), metrics/merge.json (requested/selected/achieved
share, per-class synthetic share, a pool_too_small flag).
"""

from __future__ import annotations

import medicsynth  # noqa: F401 - first import: pins the CPU code paths before numpy/torch load (numerics.py)

import warnings
from pathlib import Path

import pandas as pd

from medicsynth.io import write_json
from medicsynth.manifest import read_manifest, write_manifest
from medicsynth.merge import merge_training_set
from medicsynth.params import load_params

OUT = Path("data/variants/augmented")


def main() -> None:
    params = load_params()
    mix_ratio = float(params["mix_ratio"])
    real = read_manifest("data/variants/relabelled/train.tsv")
    pool = read_manifest("data/filtered/manifest.tsv")
    allocation = pd.read_csv("data/allocation/allocation.tsv", sep="\t", dtype={"count": int}, keep_default_na=False)
    result = merge_training_set(real, pool, allocation, mix_ratio)
    if result.metrics["pool_too_small"]:
        warnings.warn(
            f"mix_ratio={mix_ratio} asks for {result.requested} synthetic images but the filtered pool has "
            f"{result.pool}; using all of them (achieved share {result.metrics['achieved_share']:.3f}). "
            "Raise allocate.total or relax the filter to reach the ratio.",
            stacklevel=1,
        )
    write_manifest(result.train, OUT / "train.tsv")
    write_manifest(read_manifest("data/variants/relabelled/dev.tsv"), OUT / "dev.tsv")
    write_json(result.metrics, "metrics/merge.json")
    print({k: result.metrics[k] for k in ("real_rows", "synthetic_selected", "achieved_share", "pool_too_small")})


if __name__ == "__main__":
    main()
