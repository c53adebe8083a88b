"""prepare: build the canonical manifests from the demo generator or a MEDIC release.

Outputs: data/prepared/ (images for the demo, or shards/ with storage.layout shards, test.tsv, clean_labels.tsv for the demo,
quarantine.tsv), data/variants/original/{train,dev}.tsv, metrics/prepare.json.
"""

from __future__ import annotations

import medicsynth  # noqa: F401 - first import: pins the CPU code paths before numpy/torch load (numerics.py)

from pathlib import Path

from medicsynth.io import write_json
from medicsynth.manifest import write_manifest, write_tsv
from medicsynth.params import load_params, section
from medicsynth.prepare import prepare_dataset
from medicsynth.shards import per_shard_from_params

PREPARED = Path("data/prepared")
ORIGINAL = Path("data/variants/original")


def main() -> None:
    params = load_params()
    prepared = prepare_dataset(section(params, "data"), PREPARED, per_shard_from_params(params))
    if prepared.clean is not None:
        write_tsv(prepared.clean, PREPARED / "clean_labels.tsv")
    write_tsv(prepared.quarantine, PREPARED / "quarantine.tsv")
    write_manifest(prepared.splits["test"], PREPARED / "test.tsv")
    for split in ("train", "dev"):
        write_manifest(prepared.splits[split], ORIGINAL / f"{split}.tsv")
    write_json(prepared.metrics, "metrics/prepare.json")
    print({s: len(df) for s, df in prepared.splits.items()})


if __name__ == "__main__":
    main()
