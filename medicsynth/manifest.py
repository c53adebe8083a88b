"""Manifests: TSV files with MEDIC's seven columns plus explicit extras.

MEDIC columns (in release order): ``image_id, event_name, image_path`` and the four task labels.
In the release ``image_id`` holds the *source* (e.g. ``CrisisMMD``) and ``event_name`` a file or
tweet id, so rows are keyed by ``image_path``.

Extras that every manifest written by this project carries:

- ``split``: ``train``, ``dev`` or ``test``.
- ``source``: ``real`` or ``synthetic``.
- ``provenance``: where the row comes from (``medic``, ``demo``, ``relabel``, a generator id...).
- ``file``: the image to read, relative to the repository root or absolute: a file, or a member
  of a WebDataset tar shard written ``<shard>.tar#<member>`` (``storage.layout: shards``, see
  :mod:`medicsynth.shards`, which reads both kinds). For real MEDIC rows this is the release file,
  its re-encoded copy or its shard member; ``image_path`` stays MEDIC's key.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from medicsynth.io import atomic_path
from medicsynth.labels import CLASSES, TASKS, LabelError, validate_label

MEDIC_COLUMNS: tuple[str, ...] = ("image_id", "event_name", "image_path", *TASKS)
EXTRA_COLUMNS: tuple[str, ...] = ("split", "source", "provenance", "file")
COLUMNS: tuple[str, ...] = MEDIC_COLUMNS + EXTRA_COLUMNS
SPLITS: tuple[str, ...] = ("train", "dev", "test")
SOURCES: tuple[str, ...] = ("real", "synthetic")
#: Separates a shard from a member name in a ``file`` reference (``x/real-000003.tar#k.jpg``).
REF_SEP = "#"
# A shard reference: a path ending in ".tar", then "#", then a member name without "/" or "#".
_REF_RE = re.compile(r"^(.+\.tar)#([^/#]+)$")


class ManifestError(ValueError):
    """A manifest that cannot be used: names the file, the row and the offending value."""


def _row_number(index: int) -> int:
    # Line number in the TSV as a person sees it: header is line 1.
    return index + 2


def canonical_labels(df: pd.DataFrame, where: str | Path = "<memory>", key: str | None = None) -> pd.DataFrame:
    """A copy of ``df`` with the four task labels in canonical form.

    Raises :class:`ManifestError` naming ``where``, the TSV line (header = line 1), the row's
    ``key`` column value when given, and the offending value.
    """
    out = df.copy()
    for task in TASKS:
        canon = []
        for i, value in enumerate(out[task].tolist()):
            try:
                canon.append(validate_label(task, value))
            except LabelError as exc:
                row = f"row {_row_number(i)}" + (f" ({out[key].iat[i]})" if key else "")
                raise ManifestError(f"{where}: {row}: {exc}") from None
        out[task] = canon
    return out


def validate_manifest(df: pd.DataFrame, path: str | Path = "<memory>") -> pd.DataFrame:
    """Check columns, labels, splits, sources and key uniqueness; return labels in canonical form.

    Raises :class:`ManifestError` naming ``path``, the TSV line and the value at the first problem.
    """
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}")
    out = canonical_labels(df, path)
    for column, allowed in (("split", SPLITS), ("source", SOURCES)):
        bad = ~out[column].isin(allowed)
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raise ManifestError(
                f"{path}: row {_row_number(i)}: {column} {out[column].iloc[i]!r} not in {allowed}"
            )
    dup = out["image_path"].duplicated()
    if dup.any():
        i = int(dup.to_numpy().nonzero()[0][0])
        raise ManifestError(
            f"{path}: row {_row_number(i)}: duplicate image_path {out['image_path'].iloc[i]!r}"
        )
    return out


def read_manifest(path: str | Path, validate: bool = True) -> pd.DataFrame:
    """Read a project manifest (all columns as strings), validated unless ``validate=False``."""
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    return validate_manifest(df, path) if validate else df


def write_tsv(df: pd.DataFrame, path: str | Path) -> None:
    """Write ``df`` as TSV atomically (temp file + rename), so a kill never leaves half a file."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False)


def write_manifest(df: pd.DataFrame, path: str | Path) -> None:
    """Validate and write a manifest with the canonical column order first, extras kept after."""
    df = validate_manifest(df, path)
    ordered = list(COLUMNS) + [c for c in df.columns if c not in COLUMNS]
    write_tsv(df[ordered], path)


def label_matrix(df: pd.DataFrame):
    """``(n, 4)`` int64 array of class indices in ``TASKS`` order."""
    import numpy as np

    from medicsynth.labels import CLASSES

    out = np.empty((len(df), len(TASKS)), dtype=np.int64)
    for j, task in enumerate(TASKS):
        lookup = {name: k for k, name in enumerate(CLASSES[task])}
        out[:, j] = df[task].map(lookup).to_numpy()
    return out


def class_counts(df: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Rows per class ``{task: {class: n}}`` of a manifest-like frame (one label column per task).

    Every class of every task is listed, in schema order, zeros included; an empty frame (even one
    without label columns) gives all zeros. The one class counter of the package: prepare,
    ingestion and allocation all use it.
    """
    return {
        task: {cls: int((df[task] == cls).sum()) if len(df) else 0 for cls in CLASSES[task]}
        for task in TASKS
    }


def split_ref(file: str) -> tuple[str, str | None]:
    """``(shard, member)`` of a shard reference ``<shard>.tar#<member>``; ``(file, None)`` otherwise."""
    m = _REF_RE.match(str(file))
    return (m.group(1), m.group(2)) if m else (str(file), None)


def member_ref(shard: str | Path, member: str) -> str:
    """The ``file`` reference of ``member`` of ``shard`` (``"d/real-000003.tar", "k.jpg"`` →
    ``"d/real-000003.tar#k.jpg"``); ``shard`` in POSIX form so manifests read the same anywhere."""
    ref = f"{Path(shard).as_posix()}{REF_SEP}{member}"
    if split_ref(ref) != (Path(shard).as_posix(), member):
        raise ValueError(f"cannot reference member {member!r} of {shard}: the shard must end in .tar and the "
                         "member name must not contain '/' or '#'")
    return ref


def resolve_file(file: str, root: str | Path) -> str:
    """A manifest ``file`` as a path to open: absolute paths as they are, others under ``root``.

    A shard reference ``<shard>#<member>`` keeps its member: only the shard part is resolved.
    """
    path, member = split_ref(file)
    p = Path(path)
    resolved = str(p if p.is_absolute() else Path(root) / p)
    return resolved if member is None else f"{resolved}{REF_SEP}{member}"
