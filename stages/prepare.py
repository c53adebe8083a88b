"""prepare: build the canonical manifests from the demo generator or a MEDIC release.

Outputs: data/prepared/ (images for the demo, test.tsv, clean_labels.tsv for the demo,
quarantine.tsv), data/variants/original/{train,dev}.tsv, metrics/prepare.json.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from medicsynth.demo_data import DemoConfig, generate_demo
from medicsynth.io import write_json
from medicsynth.labels import CLASSES, TASKS
from medicsynth.manifest import write_manifest, write_tsv
from medicsynth.medic import QUARANTINE_COLUMNS, ingest_medic
from medicsynth.params import load_params, section

PREPARED = Path("data/prepared")
ORIGINAL = Path("data/variants/original")


def class_counts(frames: dict[str, pd.DataFrame]) -> dict:
    return {
        split: {task: {c: int((df[task] == c).sum()) for c in CLASSES[task]} for task in TASKS} | {"rows": len(df)}
        for split, df in frames.items()
    }


def main() -> None:
    data = section(load_params(), "data")
    source = data.get("source", "demo")
    if source == "demo":
        out = generate_demo(DemoConfig(**data["demo"]), PREPARED / "images")
        splits = {s: out[s] for s in ("train", "dev", "test")}
        write_tsv(out["clean"], PREPARED / "clean_labels.tsv")
        write_tsv(pd.DataFrame(columns=list(QUARANTINE_COLUMNS)), PREPARED / "quarantine.tsv")
        metrics = {"source": "demo", "noise_rate": data["demo"]["noise_rate"], "rejected": {}, "reencoded": {}}
    elif source == "medic":
        result = ingest_medic(data["medic_dir"], None, reencode_dir=PREPARED / "reencoded",
                              quality=data.get("jpeg_quality", 95), workers=data.get("workers", 4))
        write_tsv(result.quarantine, PREPARED / "quarantine.tsv")
        metrics = {"source": "medic"} | {k: v for k, v in result.metrics().items() if k != "class_counts"}
        splits = result.manifests
    else:
        raise ValueError(f"params.yaml data.source must be 'demo' or 'medic', not {source!r}")
    write_manifest(splits["test"], PREPARED / "test.tsv")
    for split in ("train", "dev"):
        write_manifest(splits[split], ORIGINAL / f"{split}.tsv")
    metrics["counts"] = class_counts(splits)
    write_json(metrics, "metrics/prepare.json")
    print({s: len(df) for s, df in splits.items()})


if __name__ == "__main__":
    main()
