"""Ingest a MEDIC release into project manifests, with every image checked for DALI.

A MEDIC release directory holds ``MEDIC_train.tsv``, ``MEDIC_dev.tsv``, ``MEDIC_test.tsv`` and the
image folders their ``image_path`` column points into. :func:`ingest_medic`

1. reads the three TSVs strictly: the header must be exactly MEDIC's seven columns, every row must
   have seven fields and known labels (case and whitespace are normalised). A violation raises
   :class:`MedicFormatError` naming the file, the line (header = line 1) and the value, before
   any image is touched: a bad release is a bad input, not something to quarantine row by row;
2. keys rows by ``image_path`` (``image_id`` and ``event_name`` are swapped in the release) and
   drops duplicates: within a split the first row wins; across splits the copy in the
   higher-priority split wins, ``test > dev > train``, so that the test set stays exactly as
   released and a train/dev copy of a test image (a leak) is removed from training;
3. decodes every kept image (:func:`medicsynth.images.inspect_image`, in a thread pool); missing
   or undecodable files are quarantined, other formats/modes are re-encoded under
   ``reencode_dir`` at ``image_path``'s relative path (``.jpg`` appended when the name does not
   end in ``.jpg``/``.jpeg``), and plain RGB JPEGs are referenced in place by absolute path.

Every release row ends up either in a split manifest or in the quarantine table, with a reason.
"""

from __future__ import annotations

import csv
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
from tqdm import tqdm

from medicsynth.images import OK, REENCODE, REJECT, ImageCheck, inspect_image, reencode_to_jpeg
from medicsynth.labels import CLASSES, TASKS, LabelError, validate_label
from medicsynth.manifest import COLUMNS, MEDIC_COLUMNS, SPLITS, class_counts, write_manifest, write_tsv

RELEASE_FILES: dict[str, str] = {split: f"MEDIC_{split}.tsv" for split in SPLITS}
# Which copy of an image_path survives when it appears in several splits: the test set must stay
# as released, and dev drives early stopping, so train gives way first.
SPLIT_PRIORITY: tuple[str, ...] = ("test", "dev", "train")
QUARANTINE_COLUMNS: tuple[str, ...] = ("split", "row", "image_path", "reason", "detail")


class MedicFormatError(ValueError):
    """A MEDIC TSV that cannot be ingested; the message names file, line and value."""


@dataclass
class IngestResult:
    """Manifests per split plus everything that was dropped or repaired, and why.

    ``manifests`` maps split to a DataFrame with :data:`medicsynth.manifest.COLUMNS`.
    ``quarantine`` has :data:`QUARANTINE_COLUMNS` (``row`` is the line in the split's TSV).
    """

    manifests: dict[str, pd.DataFrame]
    quarantine: pd.DataFrame
    rows_read: dict[str, int]
    rejected: dict[str, int]
    reencoded: dict[str, int]
    duplicates: dict[str, int]
    class_counts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        """Plain-JSON summary for ``metrics/prepare.json``."""
        return {
            "rows_read": dict(self.rows_read),
            "rows_kept": {split: int(len(df)) for split, df in self.manifests.items()},
            "quarantined": int(len(self.quarantine)),
            "rejected": dict(self.rejected),
            "reencoded": dict(self.reencoded),
            "duplicates": dict(self.duplicates),
            "class_counts": self.class_counts,
        }


@dataclass
class _Row:
    split: str
    line: int
    values: dict[str, str]

    @property
    def image_path(self) -> str:
        return self.values["image_path"]


def read_medic_tsv(path: str | Path, split: str) -> list[_Row]:
    """Rows of one MEDIC TSV with canonical labels.

    Raises :class:`MedicFormatError` naming ``path``, the line and the value on bad input.
    """
    path = Path(path)
    if not path.is_file():
        raise MedicFormatError(f"{path}: MEDIC {split} file not found")
    rows: list[_Row] = []
    # utf-8-sig: a byte-order mark would otherwise glue itself to the first column name.
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise MedicFormatError(f"{path}: empty file, expected header {list(MEDIC_COLUMNS)}")
        header = [name.strip() for name in header]
        _check_header(path, header)
        for fields in reader:
            line = reader.line_num
            if not any(f.strip() for f in fields):
                continue  # blank line, e.g. a trailing newline pair
            if len(fields) != len(header):
                raise MedicFormatError(
                    f"{path}: line {line}: expected {len(header)} tab-separated fields, "
                    f"got {len(fields)}: {fields!r}"
                )
            values = {name: value.strip() for name, value in zip(header, fields)}
            for task in TASKS:
                try:
                    values[task] = validate_label(task, values[task])
                except LabelError as exc:
                    raise MedicFormatError(
                        f"{path}: line {line}: column {task}: unknown label {values[task]!r}; "
                        f"expected one of {', '.join(CLASSES[task])}"
                    ) from exc
            if not values["image_path"]:
                raise MedicFormatError(f"{path}: line {line}: empty image_path")
            rows.append(_Row(split, line, values))
    return rows


def _check_header(path: Path, header: list[str]) -> None:
    expected = list(MEDIC_COLUMNS)
    missing = [c for c in expected if c not in header]
    extra = [c for c in header if c not in expected]
    repeated = sorted({c for c in header if header.count(c) > 1})
    problems = []
    if missing:
        problems.append(f"missing column(s) {', '.join(map(repr, missing))}")
    if extra:
        problems.append(f"unexpected column(s) {', '.join(map(repr, extra))}")
    if repeated:
        problems.append(f"repeated column(s) {', '.join(map(repr, repeated))}")
    if problems:
        raise MedicFormatError(
            f"{path}: bad header: {'; '.join(problems)}; expected exactly {expected}"
        )


def _is_safe_relative(image_path: str) -> bool:
    # The path is joined onto the release and the re-encode directory; it must stay inside both.
    p = PurePosixPath(image_path.replace("\\", "/"))
    return not p.is_absolute() and ".." not in p.parts and image_path[1:3] != ":/"


def reencoded_name(image_path: str) -> str:
    """Relative path of the re-encoded copy: ``image_path``, with ``.jpg`` appended if needed.

    Appending (not replacing) the suffix keeps ``a.png`` and ``a.jpg`` from colliding.
    """
    rel = image_path.replace("\\", "/")
    return rel if rel.lower().endswith((".jpg", ".jpeg")) else rel + ".jpg"


def _deduplicate(
    rows_by_split: dict[str, list[_Row]],
) -> tuple[dict[str, list[_Row]], list[dict[str, Any]], Counter]:
    kept: dict[str, list[_Row]] = {split: [] for split in SPLITS}
    dropped: list[dict[str, Any]] = []
    counts: Counter = Counter()
    owner: dict[str, _Row] = {}
    for split in SPLIT_PRIORITY:
        for row in rows_by_split[split]:
            first = owner.get(row.image_path)
            if first is None:
                owner[row.image_path] = row
                kept[split].append(row)
                continue
            same_labels = all(first.values[t] == row.values[t] for t in TASKS)
            if not same_labels:
                counts["label_conflicts"] += 1
            where = f"{first.split} line {first.line}"
            if first.split == split:
                counts["within_split"] += 1
                reason, detail = "duplicate", f"same image_path as {where}"
            else:
                counts["cross_split"] += 1
                reason, detail = f"duplicate_of_{first.split}", f"leak: also in {where}"
            if not same_labels:
                detail += " with different labels"
            dropped.append(_quarantine_row(row, reason, detail))
    for key in ("within_split", "cross_split", "label_conflicts"):
        counts.setdefault(key, 0)
    return kept, dropped, counts


def _quarantine_row(row: _Row, reason: str, detail: str) -> dict[str, Any]:
    return {
        "split": row.split,
        "row": row.line,
        "image_path": row.image_path,
        "reason": reason,
        "detail": detail,
    }


def _check_one(image_path: str, release: Path, reencode_dir: Path, quality: int):
    """Inspect one image and re-encode it if needed; returns ``(check, file)``."""
    src = release / image_path
    check = inspect_image(src)
    if check.status == OK:
        return check, str(src)
    if check.status == REJECT:
        return check, None
    rel = reencoded_name(image_path)
    dst = reencode_dir / rel
    try:
        reencode_to_jpeg(src, dst, quality=quality)
    except MemoryError:
        raise
    except Exception as exc:  # inspect decoded it, so this is rare (disk full, odd plugin path)
        return ImageCheck(REJECT, "reencode_failed", detail=f"{src}: {exc}"), None
    # Trust, but verify: the copy is what DALI will read.
    after = inspect_image(dst)
    if after.status != OK:
        return ImageCheck(REJECT, "reencode_failed", detail=f"{dst}: {after.detail}"), None
    return check, str(reencode_dir / rel)


def ingest_medic(
    release_dir: str | Path,
    out_dir: str | Path | None,
    *,
    reencode_dir: str | Path,
    quality: int = 95,
    workers: int = 2,
    progress: bool = True,
) -> IngestResult:
    """Read, de-duplicate and image-check a MEDIC release; see the module docstring.

    ``out_dir``: where :func:`write_ingest_outputs` writes the manifests and ``quarantine.tsv``;
    ``None`` to only return the result. ``reencode_dir`` is used in the manifests as given, so a
    path relative to the repository root stays relative. ``workers`` threads decode images
    (Pillow releases the GIL while decoding). Raises :class:`MedicFormatError` for a malformed
    TSV; never raises for a bad image.
    """
    release = Path(release_dir).resolve()
    reencode_dir = Path(reencode_dir)
    if not release.is_dir():
        raise MedicFormatError(f"{release_dir}: MEDIC release directory not found")

    rows_by_split = {
        split: read_medic_tsv(release / name, split) for split, name in RELEASE_FILES.items()
    }
    rows_read = {split: len(rows) for split, rows in rows_by_split.items()}
    kept, quarantine, dup_counts = _deduplicate(rows_by_split)

    rejected: Counter = Counter()
    reencoded: Counter = Counter()
    todo: list[_Row] = []
    for row in (r for split in SPLITS for r in kept[split]):
        if _is_safe_relative(row.image_path):
            todo.append(row)
        else:
            rejected["unsafe_path"] += 1
            quarantine.append(
                _quarantine_row(row, "unsafe_path", "image_path is absolute or leaves the release")
            )

    def check(row: _Row):
        return _check_one(row.image_path, release, reencode_dir, quality)

    pool = ThreadPoolExecutor(max_workers=max(1, int(workers)))
    try:
        results = list(
            tqdm(
                pool.map(check, todo),
                total=len(todo),
                desc="check MEDIC images",
                unit="img",
                disable=not progress,
            )
        )
    finally:
        # On Ctrl-C / kill, drop the queued images instead of decoding the rest of the release.
        pool.shutdown(wait=True, cancel_futures=True)

    records: dict[str, list[dict[str, str]]] = {split: [] for split in SPLITS}
    for row, (check, file) in zip(todo, results):
        if check.status == REJECT:
            rejected[check.reason] += 1
            quarantine.append(_quarantine_row(row, check.reason, check.detail))
            continue
        if check.status == REENCODE:
            reencoded[check.reason] += 1
        records[row.split].append(
            {
                **{c: row.values[c] for c in MEDIC_COLUMNS},
                "split": row.split,
                "source": "real",
                "provenance": "medic",
                "file": file,
            }
        )

    manifests = {split: pd.DataFrame(records[split], columns=list(COLUMNS)) for split in SPLITS}
    split_order = {s: i for i, s in enumerate(SPLITS)}
    quarantine.sort(key=lambda q: (split_order[q["split"]], q["row"]))
    quarantine_df = pd.DataFrame(quarantine, columns=list(QUARANTINE_COLUMNS))

    result = IngestResult(
        manifests=manifests,
        quarantine=quarantine_df,
        rows_read=rows_read,
        rejected=dict(sorted(rejected.items())),
        reencoded=dict(sorted(reencoded.items())),
        duplicates=dict(dup_counts),
        class_counts={split: class_counts(df) for split, df in manifests.items()},
    )
    if out_dir is not None:
        write_ingest_outputs(result, out_dir)
    return result


def write_ingest_outputs(result: IngestResult, out_dir: str | Path) -> dict[str, Any]:
    """Write ``{train,dev,test}.tsv`` and ``quarantine.tsv`` into ``out_dir``; return the metrics.

    Each file is written atomically; the manifests are validated on the way out.
    """
    out_dir = Path(out_dir)
    for split in SPLITS:
        write_manifest(result.manifests[split], out_dir / f"{split}.tsv")
    write_tsv(result.quarantine, out_dir / "quarantine.tsv")
    return result.metrics()
