"""The ``prepare`` stage's logic: the canonical split manifests from the demo or a MEDIC release.

:func:`prepare_dataset` renders the demo (``data.source: demo``) or ingests a MEDIC release
(``medic``) and returns everything the stage writes; the stage script only writes it.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from medicsynth.demo_data import DemoConfig, generate_demo
from medicsynth.manifest import class_counts
from medicsynth.medic import QUARANTINE_COLUMNS, ingest_medic
from medicsynth.params import require
from medicsynth.shards import pack_files, sample_key

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


SHARD_PREFIX = "real"


def shard_splits(splits: Mapping[str, pd.DataFrame], shard_dir: Path, per_shard: int) -> dict[str, pd.DataFrame]:
    """The real images of ``splits`` copied into shards ``shard_dir/real-NNNNNN.tar``; manifests
    whose ``file`` points into them.

    Samples in split order (train, dev, test), then manifest order; each sample's key is
    :func:`medicsynth.shards.sample_key` of its ``image_path`` and holds the (checked or
    re-encoded) JPEG as ``jpg``. Resumable after a kill (:func:`medicsynth.shards.pack_files`).
    """
    order = [s for s in ("train", "dev", "test") if s in splits]
    items = [(sample_key(ip), f) for s in order for ip, f in zip(splits[s]["image_path"], splits[s]["file"])]
    refs = pack_files(items, shard_dir, SHARD_PREFIX, per_shard)
    out = {}
    for split in order:
        df = splits[split].copy()
        df["file"] = [refs[sample_key(ip)] for ip in df["image_path"]]
        out[split] = df
    return out


def prepare_dataset(data: Mapping[str, Any], prepared_dir: str | Path, per_shard: int | None = None) -> Prepared:
    """Build the split manifests from params section ``data``; images go under ``prepared_dir``.

    ``per_shard``: ``None`` keeps one file per image (the demo's JPEGs under
    ``prepared_dir/images``, MEDIC's release files referenced in place); an integer
    (``storage.layout: shards``) copies every kept image into ``prepared_dir/shards`` (see
    :func:`shard_splits`) and removes the per-image copies made under ``prepared_dir``.

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
        images = prepared_dir / "images"
        out = generate_demo(DemoConfig(**demo), images)
        splits = {s: out[s] for s in ("train", "dev", "test")}
        metrics = {"source": "demo", "noise_rate": require(demo, "data.demo", "noise_rate"), "rejected": {},
                   "reencoded": {}}
        prepared = Prepared(splits, pd.DataFrame(columns=list(QUARANTINE_COLUMNS)), out["clean"], metrics)
    elif source == "medic":
        reencoded = prepared_dir / "reencoded"
        result = ingest_medic(require(data, "data", "medic_dir"), None, reencode_dir=reencoded,
                              quality=require(data, "data", "jpeg_quality"), workers=require(data, "data", "workers"))
        metrics = {"source": "medic"} | {k: v for k, v in result.metrics().items() if k != "class_counts"}
        prepared = Prepared(result.manifests, result.quarantine, None, metrics)
    else:
        raise ValueError(f"params.yaml data.source must be one of {SOURCES}, not {source!r}")
    if per_shard is not None:
        prepared.splits = shard_splits(prepared.splits, prepared_dir / "shards", per_shard)
        # The per-image copies now live in the shards (the release's own files are never touched).
        shutil.rmtree(images if source == "demo" else reencoded, ignore_errors=True)
    prepared.metrics["counts"] = split_counts(prepared.splits)
    return prepared
