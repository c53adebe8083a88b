"""The ``prepare`` stage's logic: the canonical split manifests from the demo or a MEDIC release.

:func:`prepare_dataset` renders the demo (``data.source: demo``) or ingests a MEDIC release
(``medic``) and returns everything the stage writes; the stage script only writes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from medicsynth.demo_data import DemoConfig, generate_demo
from medicsynth.manifest import class_counts
from medicsynth.medic import QUARANTINE_COLUMNS, ingest_medic
from medicsynth.params import require

SOURCES: tuple[str, ...] = ("demo", "medic")


@dataclass
class Prepared:
    """What ``prepare`` writes: ``splits`` (train/dev/test manifests), ``quarantine`` (rows
    dropped, :data:`medicsynth.medic.QUARANTINE_COLUMNS`), ``clean`` (demo only: the clean labels,
    else None) and ``metrics`` for ``metrics/prepare.json``."""

    splits: dict[str, pd.DataFrame]
    quarantine: pd.DataFrame
    clean: pd.DataFrame | None
    metrics: dict[str, Any]


def split_counts(splits: Mapping[str, pd.DataFrame]) -> dict[str, dict[str, Any]]:
    """``{split: {task: {class: n}, "rows": n}}`` for ``metrics/prepare.json``."""
    return {split: class_counts(df) | {"rows": len(df)} for split, df in splits.items()}


def prepare_dataset(data: Mapping[str, Any], prepared_dir: str | Path) -> Prepared:
    """Build the split manifests from params section ``data``; images go under ``prepared_dir``.

    ``demo``: renders ``data.demo`` (a :class:`medicsynth.demo_data.DemoConfig`) into
    ``prepared_dir/images``; ``medic``: ingests ``data.medic_dir``, re-encoding problem images
    into ``prepared_dir/reencoded`` at ``data.jpeg_quality`` with ``data.workers`` threads.
    Guarantees: a missing key raises naming ``data.<key>``; an unknown source raises naming the
    value; the result depends only on the params and the release's files.
    """
    source = require(data, "data", "source")
    prepared_dir = Path(prepared_dir)
    if source == "demo":
        demo = require(data, "data", "demo")
        out = generate_demo(DemoConfig(**demo), prepared_dir / "images")
        splits = {s: out[s] for s in ("train", "dev", "test")}
        metrics = {"source": "demo", "noise_rate": require(demo, "data.demo", "noise_rate"), "rejected": {},
                   "reencoded": {}}
        prepared = Prepared(splits, pd.DataFrame(columns=list(QUARANTINE_COLUMNS)), out["clean"], metrics)
    elif source == "medic":
        result = ingest_medic(require(data, "data", "medic_dir"), None, reencode_dir=prepared_dir / "reencoded",
                              quality=require(data, "data", "jpeg_quality"), workers=require(data, "data", "workers"))
        metrics = {"source": "medic"} | {k: v for k, v in result.metrics().items() if k != "class_counts"}
        prepared = Prepared(result.manifests, result.quarantine, None, metrics)
    else:
        raise ValueError(f"params.yaml data.source must be one of {SOURCES}, not {source!r}")
    prepared.metrics["counts"] = split_counts(prepared.splits)
    return prepared
