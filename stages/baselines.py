"""baselines: the training sets of the two baselines that synthetic images must beat.

- ``data/variants/oversampled/{train,dev}.tsv``: the relabelled real rows plus, for every
  synthetic row of the augmented set, a repeat of a real row with the same labels (seeded by
  ``baselines.seed``), so row count and class composition match ``augmented``
  (:func:`medicsynth.merge.oversample_like`).
- ``data/variants/classic_aug/{train,dev}.tsv``: the relabelled rows unchanged; what makes the
  variant is the classic augmentation policy that ``train.augment`` names for it.
- ``metrics/baselines.json``: row counts and per-class composition against the augmented set.

Dev sets are the relabelled dev set for both, as for augmented.
"""

from __future__ import annotations

import medicsynth  # noqa: F401 - first import: pins the CPU code paths before numpy/torch load (numerics.py)

from pathlib import Path

from medicsynth.io import write_json
from medicsynth.manifest import read_manifest, write_manifest
from medicsynth.merge import oversample_like
from medicsynth.params import load_params, require, section

RELABELLED = Path("data/variants/relabelled")
AUGMENTED_TRAIN = Path("data/variants/augmented/train.tsv")
OVERSAMPLED = Path("data/variants/oversampled")
CLASSIC_AUG = Path("data/variants/classic_aug")


def main() -> None:
    p = section(load_params(), "baselines")
    real = read_manifest(RELABELLED / "train.tsv")
    dev = read_manifest(RELABELLED / "dev.tsv")
    result = oversample_like(real, read_manifest(AUGMENTED_TRAIN), seed=int(require(p, "baselines", "seed")))
    write_manifest(result.train, OVERSAMPLED / "train.tsv")
    write_manifest(dev, OVERSAMPLED / "dev.tsv")
    write_manifest(real, CLASSIC_AUG / "train.tsv")
    write_manifest(dev, CLASSIC_AUG / "dev.tsv")
    write_json({"oversampled": result.metrics, "classic_aug": {"rows": int(len(real))}}, "metrics/baselines.json")
    print(f"baselines: oversampled {result.metrics['rows']} rows ({result.metrics['repeated_rows']} repeats, "
          f"{result.metrics['inexact']} inexact), classic_aug {len(real)} rows")


if __name__ == "__main__":
    main()
