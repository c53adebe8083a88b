"""WebDataset-style tar shards: an append-resumable writer and two readers (torch, DALI).

Layout. A shard set is ``<out_dir>/<prefix>-NNNNNN.tar`` (``NNNNNN`` from 000000, no gaps). Each
shard is a plain POSIX tar whose members are ``<key>.<field>`` (e.g. ``img_0042.jpg``,
``img_0042.json``), the members of one sample consecutive, fields in sorted order: the layout
WebDataset and DALI's ``fn.readers.webdataset`` read. Every shard but the last holds exactly
``per_shard`` samples. Tar headers carry no time, owner or mode information of the machine that
wrote them (mtime 0, uid/gid 0, mode 0644), so the same samples in the same order give
byte-identical shards, hence identical DVC hashes, on any machine.

Resumability. :class:`ShardWriter` stages every added sample at once as a small atomic file in
``<out_dir>/.staging-<prefix>/`` and builds a shard from the staged samples when ``per_shard`` of
them are there; the shard appears by an atomic rename, and only then are its staged samples
removed. A writer killed at any instant therefore loses no added sample: reopened, it skips the
keys already in finished shards, reloads the staged ones, and carries on at the next unfinished
shard. :meth:`ShardWriter.close` writes the last, partial shard; reopening the set later (e.g. a
``generate`` run with more captions) reopens that partial shard: its samples go back to staging
and the shard is rewritten, full, when the next samples arrive, so shard membership depends only
on the order of the samples, never on how many runs wrote them.

References. A manifest's ``file`` column names an image in a shard as ``<shard>#<member>``, e.g.
``data/prepared/shards/real-000003.tar#m0a1b2c3.jpg`` (:func:`member_ref`, parsed by
:func:`split_ref`; the shard part resolves like any ``file``, see
:func:`medicsynth.manifest.resolve_file`). :func:`read_image_bytes` and :func:`open_image` read
either kind of reference: a plain file, or a member by random access (a per-shard index of
member offsets, built once per process from the tar headers and cached, so a read is one
``seek`` and one ``read``, never a scan of the tar).

Readers. :func:`iter_samples` walks shards with :mod:`tarfile` (no extra dependency);
:class:`ShardDataset` wraps it as a torch ``IterableDataset`` that splits shards among
``DataLoader`` workers; :func:`dali_webdataset_pipeline` builds a DALI pipeline around
``fn.readers.webdataset`` (CPU when ``device_id`` is ``None``).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medicsynth.io import atomic_path
from medicsynth.manifest import member_ref, resolve_file, split_ref

#: Storage layouts of ``params.yaml`` ``storage.layout``; ``auto`` = shards for MEDIC, files for the demo.
LAYOUTS: tuple[str, ...] = ("auto", "files", "shards")

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_FIELD_RE = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")


def shard_name(prefix: str, index: int) -> str:
    """File name of shard ``index`` of set ``prefix`` (``"real", 3`` → ``real-000003.tar``)."""
    return f"{prefix}-{index:06d}.tar"


def shard_paths(out_dir: str | Path, prefix: str) -> list[Path]:
    """Finished shards of set ``prefix`` in ``out_dir``, in index order.

    Raises ``ValueError`` naming the missing file when the indices have a gap (a shard deleted
    by hand): a gap would silently drop samples.
    """
    out_dir = Path(out_dir)
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d{{6}})\.tar$")
    found = sorted(
        (int(m.group(1)), out_dir / name)
        for name in (os.listdir(out_dir) if out_dir.is_dir() else [])
        if (m := pattern.match(name))
    )
    for expected, (index, _path) in enumerate(found):
        if index != expected:
            raise ValueError(f"shard set {prefix!r} in {out_dir}: {shard_name(prefix, expected)} is missing")
    return [path for _i, path in found]


def _check_sample(key: str, fields: Mapping[str, bytes]) -> None:
    if not _KEY_RE.match(key):
        raise ValueError(f"sample key {key!r}: use letters, digits, '_' and '-' only "
                         "(WebDataset splits member names at the first '.')")
    if not fields:
        raise ValueError(f"sample {key!r} has no fields")
    for field, data in fields.items():
        if not _FIELD_RE.match(field):
            raise ValueError(f"sample {key!r}: field name {field!r} is not a file extension like 'jpg'")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"sample {key!r} field {field!r}: expected bytes, got {type(data).__name__}")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(bytes(data)))


def _write_tar(path: Path, samples: Sequence[tuple[str, Mapping[str, bytes]]], durable: bool) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, fields in samples:
                    for field in sorted(fields):
                        _add_member(tar, f"{key}.{field}", fields[field])
            if durable:
                fh.flush()
                os.fsync(fh.fileno())


def _split_member(name: str, where: Path) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        raise ValueError(f"{where}: member {name!r} has no '.<field>' extension")
    prefix_dir = name[: len(name) - len(base)]
    key, field = base.split(".", 1)
    return prefix_dir + key, field


def iter_shard(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of one shard, in stored order: ``(key, {field: bytes})``.

    Consecutive members with the same key (the member name up to the first ``.`` of its base
    name) form one sample. Raises ``ValueError`` naming the shard and member on a member that
    is not a regular file, has no extension, or repeats a key after another key (a shard not
    written in WebDataset order); ``tarfile.ReadError`` on a truncated or corrupt tar.
    """
    path = Path(path)
    seen: set[str] = set()
    key: str | None = None
    fields: dict[str, bytes] = {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                raise ValueError(f"{path}: member {member.name!r} is not a regular file")
            member_key, field = _split_member(member.name, path)
            if member_key != key:
                if key is not None:
                    yield key, fields
                if member_key in seen:
                    raise ValueError(f"{path}: key {member_key!r} appears again after other keys")
                seen.add(member_key)
                key, fields = member_key, {}
            if field in fields:
                raise ValueError(f"{path}: member {member.name!r} appears twice")
            fh = tar.extractfile(member)
            assert fh is not None
            fields[field] = fh.read()
    if key is not None:
        yield key, fields


def iter_samples(paths: Iterable[str | Path]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of ``paths`` one shard after another (see :func:`iter_shard`)."""
    for path in paths:
        yield from iter_shard(path)


def shard_keys(path: str | Path) -> list[str]:
    """Keys of the samples in shard ``path``, in order (reads headers only, not the data)."""
    path = Path(path)
    keys: list[str] = []
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            key, _field = _split_member(member.name, path)
            if not keys or keys[-1] != key:
                keys.append(key)
    return keys


@dataclass
class ShardWriter:
    """Append samples to the shard set ``<out_dir>/<prefix>-NNNNNN.tar``; resumable (see module doc).

    Parameters
    ----------
    out_dir : directory of the shard set (created).
    prefix : shard-set name, e.g. ``"real"`` or ``"synthetic"``.
    per_shard : samples per shard (>= 1); every shard but the last holds exactly this many.
    durable : fsync staged samples and shards before their rename (survives a power cut, not
        only a kill; costs one fsync per sample). Use it where a sample was expensive to make.

    Use as a context manager, or call :meth:`close`; a writer left without ``close`` (a kill)
    keeps its staged samples for the next writer of the same set.
    """

    out_dir: str | Path
    prefix: str
    per_shard: int
    durable: bool = False

    def __post_init__(self) -> None:
        if self.per_shard < 1:
            raise ValueError(f"per_shard must be >= 1, got {self.per_shard}")
        if not _KEY_RE.match(self.prefix):
            raise ValueError(f"shard prefix {self.prefix!r}: use letters, digits, '_' and '-' only")
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.staging = self.out_dir / f".staging-{self.prefix}"
        self.staging.mkdir(exist_ok=True)
        finished = shard_paths(self.out_dir, self.prefix)
        self._done: set[str] = set()
        self._next_index = len(finished)
        # (key, fields, staged file or None for a sample of the reopened partial shard)
        self._pending: list[tuple[str, dict[str, bytes], Path | None]] = []
        self._seq = 0
        for path in finished:
            self._done.update(shard_keys(path))
        if finished and len(shard_keys(finished[-1])) < self.per_shard:
            # The last shard is partial: reopen it. It stays on disk until the shard of the same
            # index that replaces it (atomically, by rename) holds its samples and more.
            self._next_index -= 1
            self._pending.extend((key, fields, None) for key, fields in iter_shard(finished[-1]))
        staged = sorted(p for p in self.staging.iterdir() if p.suffix == ".tar" and not p.name.startswith("."))
        for path in staged:
            samples = list(iter_shard(path))
            if len(samples) != 1:
                raise ValueError(f"{path}: a staged sample holds {len(samples)} samples, expected 1")
            key, fields = samples[0]
            self._seq = max(self._seq, int(path.stem.split("-", 1)[0]) + 1)
            if key in self._done:
                path.unlink()  # killed between a shard's rename and its staging clean-up
                continue
            self._pending.append((key, fields, path))
            self._done.add(key)
        self.resumed = len(self._done)

    def __contains__(self, key: str) -> bool:
        """True when ``key`` is already in the set (finished shard or staged): skip making it."""
        return key in self._done

    def _stage(self, key: str, fields: Mapping[str, bytes]) -> None:
        path = self.staging / f"{self._seq:09d}-{key}.tar"
        self._seq += 1
        _write_tar(path, [(key, fields)], self.durable)
        self._pending.append((key, dict(fields), path))
        self._done.add(key)

    def add(self, key: str, fields: Mapping[str, bytes]) -> bool:
        """Add sample ``key`` with ``fields`` (``{"jpg": bytes, "json": bytes}``).

        Returns ``False`` (and writes nothing) when ``key`` is already in the set, ``True``
        otherwise. Writes a shard each time ``per_shard`` samples are pending. Raises
        ``ValueError`` on a key or field name WebDataset cannot represent.
        """
        _check_sample(key, fields)
        if key in self._done:
            return False
        self._stage(key, fields)
        while len(self._pending) >= self.per_shard:
            self._flush(self.per_shard)
        return True

    def _flush(self, count: int) -> None:
        batch, self._pending = self._pending[:count], self._pending[count:]
        path = self.out_dir / shard_name(self.prefix, self._next_index)
        _write_tar(path, [(k, f) for k, f, _p in batch], self.durable)
        self._next_index += 1
        for _k, _f, staged in batch:
            if staged is not None:
                staged.unlink(missing_ok=True)

    def close(self) -> list[Path]:
        """Write the pending samples as the last (partial) shard; return every shard of the set."""
        if any(staged is not None for _k, _f, staged in self._pending):
            self._flush(len(self._pending))
        self._pending = []
        if self.staging.is_dir() and not any(self.staging.iterdir()):
            self.staging.rmdir()
        return shard_paths(self.out_dir, self.prefix)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an exception the staged samples stay for the next writer; no partial shard is made.
        if exc_type is None:
            self.close()


def write_shards(samples: Iterable[tuple[str, Mapping[str, bytes]]], out_dir: str | Path, prefix: str,
                 per_shard: int, durable: bool = False) -> list[Path]:
    """Write ``samples`` (``(key, {field: bytes})``) as shard set ``prefix``; resumable.

    Samples whose key is already in the set are skipped, so rerunning after a kill with the
    same iterable finishes the set. Returns the shard paths in order.
    """
    with ShardWriter(out_dir, prefix, per_shard, durable=durable) as writer:
        for key, fields in samples:
            writer.add(key, fields)
    return shard_paths(out_dir, prefix)


def resolve_layout(layout: str, source: str) -> str:
    """``storage.layout`` made concrete: ``files`` or ``shards``.

    ``auto`` is ``shards`` for ``data.source: medic`` (81k images: one DVC object and one S3
    request per shard rather than per image, see docs/PERFORMANCE.md) and ``files`` for the demo
    (3,200 small images, whose committed outputs stay as they are). Raises ``ValueError`` naming
    the parameter on an unknown value.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"params.yaml storage.layout must be one of {LAYOUTS}, not {layout!r}")
    if layout == "auto":
        return "shards" if source == "medic" else "files"
    return layout


def per_shard_from_params(params: Mapping[str, Any]) -> int | None:
    """Images per shard when ``params.yaml`` asks for shards, ``None`` for one file per image.

    Reads ``storage.layout`` (:func:`resolve_layout`; ``data.source`` only for ``auto``) and
    ``storage.per_shard`` (only for shards); a missing key raises ``KeyError`` naming it.
    """
    from medicsynth.params import require, section

    storage = section(params, "storage")
    layout = require(storage, "storage", "layout")
    source = require(section(params, "data"), "data", "source") if layout == "auto" else ""
    if resolve_layout(layout, source) == "files":
        return None
    per_shard = require(storage, "storage", "per_shard")
    if not isinstance(per_shard, int) or isinstance(per_shard, bool) or per_shard < 1:
        raise ValueError(f"params.yaml storage.per_shard must be an integer >= 1, not {per_shard!r}")
    return per_shard


class ImageRefError(FileNotFoundError):
    """A ``file`` reference that cannot be read: names the shard or file and the member."""


# Per-process cache of shard indexes: path -> ((mtime_ns, size), {member: (offset, size)}). Keyed
# by the file's identity too, so a shard rewritten in place (generate appending) is re-indexed.
_INDEX: dict[str, tuple[tuple[int, int], dict[str, tuple[int, int]]]] = {}
_INDEX_LOCK = threading.Lock()


def shard_index(path: str | Path) -> dict[str, tuple[int, int]]:
    """``{member name: (data offset, size)}`` of shard ``path``, read from the tar headers once.

    Cached per process while the file's mtime and size stay the same. Raises
    :class:`ImageRefError` when the shard does not exist, ``tarfile.ReadError`` on a corrupt one.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageRefError(f"shard {path} does not exist") from None
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _INDEX.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    index: dict[str, tuple[int, int]] = {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:  # headers only: tarfile seeks over the data of a file it is not asked for
            if member.isfile():
                index[member.name] = (member.offset_data, member.size)
    with _INDEX_LOCK:
        _INDEX[path] = (stamp, index)
    return index


def read_image_bytes(file: str | Path, where: str = "") -> bytes:
    """The encoded bytes of ``file``: a path, or a shard reference ``<shard>.tar#<member>``.

    ``file`` is already resolved (:func:`medicsynth.manifest.resolve_file`). A member is read by
    random access (:func:`shard_index`): one seek and one read. ``where`` (e.g. ``"x.tsv row 5"``)
    prefixes error messages. Raises :class:`ImageRefError` naming the file, or the shard and the
    member, when it is missing.
    """
    prefix = f"{where}: " if where else ""
    shard, member = split_ref(os.fspath(file))
    if member is None:
        try:
            with open(shard, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise ImageRefError(f"{prefix}image file {shard} does not exist") from None
    try:
        index = shard_index(shard)
    except ImageRefError as exc:
        raise ImageRefError(f"{prefix}{exc} (referenced as {file})") from None
    if member not in index:
        raise ImageRefError(f"{prefix}shard {shard} has no member {member!r} (referenced as {file}); "
                            "rerun the stage that wrote the shard")
    offset, size = index[member]
    fd = os.open(shard, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise ImageRefError(f"{prefix}shard {shard} is truncated at member {member!r}")
    return data


def missing_image(file: str | Path) -> str | None:
    """Why :func:`read_image_bytes` would not find ``file``, or ``None`` when it would.

    The reason names the missing file, the missing shard, or the shard and the missing member.
    """
    shard, member = split_ref(os.fspath(file))
    if member is None:
        return None if os.path.isfile(shard) else f"image file {shard} does not exist"
    try:
        index = shard_index(shard)
    except ImageRefError:
        return f"shard {shard} does not exist"
    return None if member in index else f"shard {shard} has no member {member!r}"


def image_ref_exists(file: str | Path) -> bool:
    """True when :func:`read_image_bytes` would find ``file`` (the file, or the shard and member)."""
    return missing_image(file) is None


def check_images(files: Sequence[str], manifest: str | Path, root: str | Path = ".") -> None:
    """Raise :class:`ImageRefError` at the first of ``files`` (a manifest's ``file`` column, in
    row order) that cannot be read: the message names ``manifest``, the row (header = line 1),
    the reference, and the missing file, shard or member. Reads tar headers, not images."""
    for i, file in enumerate(files):
        what = missing_image(resolve_file(file, root))
        if what is not None:
            raise ImageRefError(f"{manifest}: row {i + 2}: file {file!r}: {what}; rerun the stage that wrote it "
                                "(dvc repro) or pull it (make pull-private)")


def open_image(file: str | Path, where: str = ""):
    """``file`` (a path or a shard reference, resolved) opened with PIL, lazily like ``Image.open``.

    A plain path is opened directly (PIL reads only what it needs); a member is read into memory
    first. Use as a context manager. Errors as :func:`read_image_bytes`.
    """
    from PIL import Image

    path, member = split_ref(os.fspath(file))
    if member is None:
        if not os.path.isfile(path):
            prefix = f"{where}: " if where else ""
            raise ImageRefError(f"{prefix}image file {path} does not exist")
        return Image.open(path)
    return Image.open(io.BytesIO(read_image_bytes(file, where)))


def sample_key(name: str) -> str:
    """A WebDataset sample key for an image named ``name`` (e.g. MEDIC's ``image_path``).

    The file stem with every character outside ``[A-Za-z0-9_-]`` replaced by ``_`` (at most 60),
    then ``-`` and 12 hex digits of the SHA-256 of the whole name: readable, and unique for
    distinct names (two MEDIC paths may share a stem), a pure function of ``name``.
    """
    stem = re.sub(r"[^A-Za-z0-9_\-]", "_", Path(name).stem)[:60] or "img"
    return f"{stem}-{hashlib.sha256(name.encode('utf-8')).hexdigest()[:12]}"


def pack_files(items: Sequence[tuple[str, str | Path]], out_dir: str | Path, prefix: str, per_shard: int,
               field: str = "jpg") -> dict[str, str]:
    """Copy files into shard set ``prefix`` of ``out_dir``, in the order of ``items``; resumable.

    ``items``: ``(key, path)``; each file becomes the ``field`` member of sample ``key``. A set
    left by a killed run that holds a prefix of ``items`` is appended to; any other set of that
    name (another run's images) is removed first, so the result depends only on ``items``.
    Returns ``{key: file reference}`` (:func:`medicsynth.manifest.member_ref`, shard paths as
    ``out_dir`` is given). Raises ``ValueError`` naming both items of a repeated key.
    """
    out_dir = Path(out_dir)
    keys = [k for k, _p in items]
    if len(set(keys)) != len(keys):
        seen: dict[str, str | Path] = {}
        for key, path in items:
            if key in seen:
                raise ValueError(f"shard set {prefix!r}: {path} and {seen[key]} both have sample key {key!r}")
            seen[key] = path
    finished = shard_paths(out_dir, prefix)
    held = [k for p in finished for k in shard_keys(p)]
    staging = out_dir / f".staging-{prefix}"
    # Staged samples (named <seq>-<key>.tar) must continue the prefix in order, as shards do.
    staged = [p.stem.split("-", 1)[-1] for p in sorted(staging.iterdir())
              if p.suffix == ".tar" and not p.name.startswith(".")] if staging.is_dir() else []
    if held + staged != keys[: len(held) + len(staged)]:
        for path in reversed(finished):  # last to first: a kill never leaves a gap
            path.unlink()
        if staging.is_dir():
            for path in staging.iterdir():
                path.unlink()
    with ShardWriter(out_dir, prefix, per_shard) as writer:
        for key, path in items:
            if key not in writer:
                writer.add(key, {field: Path(path).read_bytes()})
    return shard_refs(out_dir, prefix, field)


def shard_refs(out_dir: str | Path, prefix: str, field: str = "jpg") -> dict[str, str]:
    """``{key: file reference of its field member}`` for every sample of shard set ``prefix``."""
    return {k: member_ref(p, f"{k}.{field}") for p in shard_paths(out_dir, prefix) for k in shard_keys(p)}


def decode_rgb(fields: Mapping[str, bytes], field: str = "jpg"):
    """The ``field`` image of a sample as a PIL RGB image."""
    from PIL import Image

    with Image.open(io.BytesIO(fields[field])) as img:
        return img.convert("RGB")


def _make_shard_dataset():
    # Built on first use (module __getattr__), so that the stages that only read references
    # (filter, report, zeroshot...) do not import torch for it.
    from torch.utils.data import IterableDataset

    class ShardDataset(IterableDataset):
        """torch ``IterableDataset`` over shards: yields ``transform(key, fields)`` per sample.

        Parameters
        ----------
        paths : shard files, read in this order.
        transform : ``(key, {field: bytes}) -> item``; default returns ``(key, PIL RGB image)`` from
            the ``jpg`` field.

        With ``DataLoader(num_workers=w)`` worker ``i`` reads shards ``i, i+w, ...``, so each sample
        is yielded once per epoch; the order is shard order within a worker (interleaved across
        workers by the ``DataLoader``). Shuffle by shuffling ``paths`` (seeded) per epoch.
        """

        def __init__(self, paths: Sequence[str | Path],
                     transform: Callable[[str, dict[str, bytes]], Any] | None = None) -> None:
            super().__init__()
            self.paths = [Path(p) for p in paths]
            self.transform = transform or (lambda key, fields: (key, decode_rgb(fields)))

        def __iter__(self) -> Iterator[Any]:
            from torch.utils.data import get_worker_info

            info = get_worker_info()
            mine = self.paths if info is None else self.paths[info.id :: info.num_workers]
            for key, fields in iter_samples(mine):
                yield self.transform(key, fields)

    ShardDataset.__qualname__ = "ShardDataset"  # pickled by name (spawned DataLoader workers)
    ShardDataset.__module__ = __name__
    return ShardDataset


_LAZY: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    if name == "ShardDataset":
        if name not in _LAZY:
            _LAZY[name] = _make_shard_dataset()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dali_webdataset_pipeline(paths: Sequence[str | Path], ext: Sequence[str] = ("jpg",), *,
                             batch_size: int, num_threads: int = 1, device_id: int | None = None,
                             decode: bool = True, index_paths: Sequence[str | Path] | None = None,
                             seed: int = 0):
    """A built DALI pipeline reading shards with ``fn.readers.webdataset``.

    Parameters
    ----------
    paths : shard files.
    ext : fields to read; one output per entry, in this order (samples missing one raise in DALI).
    batch_size, num_threads : DALI's.
    device_id : ``None`` for a CPU-only pipeline (decoding on the CPU); a GPU id decodes with
        ``mixed``.
    decode : decode the first field as an RGB image (HWC uint8); other fields stay raw bytes.
    index_paths : DALI index files, one per shard; without them DALI scans each tar once.
    seed : the pipeline seed.

    Outputs per ``run()``: a tuple with one ``TensorList`` per field of ``ext``. The reader
    returns samples in shard order (no shuffling); ``pipe.epoch_size("reader")`` is the sample count.
    """
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    def _pipe():
        kwargs = {"index_paths": [str(p) for p in index_paths]} if index_paths else {}
        outputs = fn.readers.webdataset(
            paths=[str(p) for p in paths],
            ext=list(ext),
            missing_component_behavior="error",
            name="reader",
            **kwargs,
        )
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        if decode:
            outputs[0] = fn.decoders.image(outputs[0], device="cpu" if device_id is None else "mixed",
                                           output_type=types.RGB)
        return tuple(outputs)

    pipe = _pipe()
    pipe.build()
    return pipe
