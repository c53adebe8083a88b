"""Small, atomic writers for JSON metrics and other outputs."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    The rename is atomic on one filesystem, so a kill at any instant leaves either the old file
    or the new one, never half a file. ``suffix`` matters for writers that append their own
    extension (``np.savez`` adds ``.npz`` unless the name already ends with it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_durably(data: bytes, path: str | Path) -> Path:
    """Write ``data`` atomically *and* fsync it before the rename.

    For answers that were paid for (LLM and image-API caches): the file must survive a power cut,
    not only a kill, so a rerun never pays for the same answer twice. Returns ``path``.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def write_text(text: str, path: str | Path) -> None:
    """Write ``text`` (UTF-8) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as indented JSON atomically."""
    write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n", path)


def read_json(path: str | Path) -> Any:
    """The JSON document at ``path`` (UTF-8)."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _jsonable(value: Any) -> Any:
    # numpy scalars and arrays appear in metrics; JSON wants plain Python numbers.
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
