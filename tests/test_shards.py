"""Tar shards: layout, determinism, resumption after a real kill, and the torch and DALI readers.

Everything at tiny size on CPU. The kill test SIGKILLs a writer process mid-set and checks that
the resumed set is byte-identical to one written in a single run, with no sample lost or doubled.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medicsynth import loaders, shards

REPO_ROOT = Path(__file__).resolve().parents[1]


def _jpeg(i: int) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _samples(n: int, start: int = 0) -> list[tuple[str, dict[str, bytes]]]:
    return [(f"img_{i:04d}", {"jpg": _jpeg(i), "json": json.dumps({"label": i % 3}).encode()})
            for i in range(start, start + n)]


def _bytes_of(out: Path, prefix: str) -> list[bytes]:
    return [p.read_bytes() for p in shards.shard_paths(out, prefix)]


def test_layout_members_and_roundtrip(tmp_path):
    samples = _samples(7)
    paths = shards.write_shards(samples, tmp_path, "real", per_shard=3)
    assert [p.name for p in paths] == ["real-000000.tar", "real-000001.tar", "real-000002.tar"]
    with tarfile.open(paths[0]) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["img_0000.jpg", "img_0000.json", "img_0001.jpg",
                                         "img_0001.json", "img_0002.jpg", "img_0002.json"]
    assert {(m.mtime, m.uid, m.gid, m.mode) for m in members} == {(0, 0, 0, 0o644)}
    assert list(shards.iter_samples(paths)) == samples
    assert [shards.shard_keys(p) for p in paths] == [["img_0000", "img_0001", "img_0002"],
                                                    ["img_0003", "img_0004", "img_0005"], ["img_0006"]]
    assert not (tmp_path / ".staging-real").exists()


def test_same_samples_give_identical_bytes(tmp_path):
    a = shards.write_shards(_samples(5), tmp_path / "a", "s", per_shard=2)
    b = shards.write_shards(_samples(5), tmp_path / "b", "s", per_shard=2)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_appending_in_later_runs_matches_one_run(tmp_path):
    one = tmp_path / "one"
    shards.write_shards(_samples(11), one, "syn", per_shard=4)
    many = tmp_path / "many"
    shards.write_shards(_samples(5), many, "syn", per_shard=4)   # last shard partial (1 sample)
    shards.write_shards(_samples(3, 5), many, "syn", per_shard=4)  # fills it, exactly 2 shards
    shards.write_shards(_samples(11), many, "syn", per_shard=4)  # 8 known keys skipped, 3 new
    assert _bytes_of(many, "syn") == _bytes_of(one, "syn")


def test_writer_skips_known_keys_and_reports_them(tmp_path):
    with shards.ShardWriter(tmp_path, "r", per_shard=2) as w:
        assert w.add("a", {"jpg": b"1"}) is True
        assert w.add("a", {"jpg": b"2"}) is False
    w2 = shards.ShardWriter(tmp_path, "r", per_shard=2)
    assert "a" in w2 and "b" not in w2 and w2.resumed == 1
    w2.close()
    assert list(shards.iter_samples(shards.shard_paths(tmp_path, "r"))) == [("a", {"jpg": b"1"})]


_KILLED_WRITER = """
import os, signal, sys
from tests.test_shards import _samples
from medicsynth.shards import ShardWriter
w = ShardWriter(sys.argv[2], "real", per_shard=4)
for n, (key, fields) in enumerate(_samples(14)):
    w.add(key, fields)
    if n == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("kill_after", [2, 5, 7])
def test_killed_writer_resumes_byte_identical(tmp_path, kill_after):
    reference = tmp_path / "reference"
    shards.write_shards(_samples(14), reference, "real", per_shard=4)
    out = tmp_path / "killed"
    # Run from the checkout so that `tests` imports (the package itself is installed editable).
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(REPO_ROOT), str(out), str(kill_after)],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == -9, proc.stderr
    finished = shards.shard_paths(out, "real")
    assert len(finished) == (kill_after + 1) // 4  # only full shards exist after the kill
    staged = list((out / ".staging-real").glob("*.tar"))
    assert len(staged) == (kill_after + 1) % 4  # the rest is staged, not lost
    writer = shards.ShardWriter(out, "real", per_shard=4)
    assert writer.resumed == kill_after + 1
    for key, fields in _samples(14):
        writer.add(key, fields)
    writer.close()
    assert _bytes_of(out, "real") == _bytes_of(reference, "real")
    assert not (out / ".staging-real").exists()


def test_kill_between_shard_rename_and_staging_cleanup(tmp_path):
    shards.write_shards(_samples(4), tmp_path, "real", per_shard=4)
    # A staged copy of a sample that already sits in a finished shard, as a kill leaves it.
    staging = tmp_path / ".staging-real"
    staging.mkdir()
    key, fields = _samples(1, 2)[0]
    shards._write_tar(staging / f"{2:09d}-{key}.tar", [(key, fields)], durable=False)
    paths = shards.write_shards(_samples(6), tmp_path, "real", per_shard=4)
    keys = [k for k, _f in shards.iter_samples(paths)]
    assert keys == [f"img_{i:04d}" for i in range(6)]


def test_an_exception_leaves_no_partial_shard_but_keeps_the_samples(tmp_path):
    with pytest.raises(RuntimeError):
        with shards.ShardWriter(tmp_path, "r", per_shard=4) as w:
            for key, fields in _samples(6):
                w.add(key, fields)
            raise RuntimeError("generator crashed")
    assert [p.name for p in shards.shard_paths(tmp_path, "r")] == ["r-000000.tar"]
    assert len(list((tmp_path / ".staging-r").glob("*.tar"))) == 2


@pytest.mark.parametrize("key", ["a.b", "a/b", "", "ü"])
def test_bad_keys_are_refused_by_name(tmp_path, key):
    with shards.ShardWriter(tmp_path, "r", per_shard=2) as w:
        with pytest.raises(ValueError, match="sample key"):
            w.add(key, {"jpg": b"x"})


def test_a_missing_shard_is_named(tmp_path):
    shards.write_shards(_samples(6), tmp_path, "r", per_shard=2)
    (tmp_path / "r-000001.tar").unlink()
    with pytest.raises(ValueError, match="r-000001.tar is missing"):
        shards.shard_paths(tmp_path, "r")


def test_a_shard_out_of_webdataset_order_is_named(tmp_path):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        for name in ["a.jpg", "b.jpg", "a.json"]:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match=r"bad.tar: key 'a' appears again"):
        list(shards.iter_shard(path))


def test_torch_loader_reads_every_sample_once_across_workers(tmp_path):
    samples = _samples(10)
    paths = shards.write_shards(samples, tmp_path, "real", per_shard=3)
    dataset = shards.ShardDataset(paths)
    key, image = next(iter(dataset))
    assert key == "img_0000" and image.mode == "RGB" and image.size == (12, 16)
    reference = np.asarray(Image.open(io.BytesIO(samples[0][1]["jpg"])).convert("RGB"))
    assert np.array_equal(np.asarray(image), reference)

    def to_tensor(key, fields):
        return key, torch.from_numpy(np.asarray(shards.decode_rgb(fields))), json.loads(fields["json"])["label"]

    loader = torch.utils.data.DataLoader(shards.ShardDataset(paths, to_tensor), batch_size=None, num_workers=2)
    got = sorted((k, int(label), int(t.sum())) for k, t, label in loader)
    want = sorted((k, json.loads(f["json"])["label"],
                   int(np.asarray(Image.open(io.BytesIO(f["jpg"])).convert("RGB"), dtype=np.int64).sum()))
                  for k, f in samples)
    assert got == want


@pytest.mark.skipif(not loaders.dali_available(), reason="DALI not installed")
def test_dali_webdataset_reader_on_cpu(tmp_path):
    samples = _samples(7)
    paths = shards.write_shards(samples, tmp_path, "real", per_shard=3)
    pipe = shards.dali_webdataset_pipeline(paths, ext=("jpg", "json"), batch_size=7, device_id=None)
    assert pipe.epoch_size("reader") == 7
    images, metas = pipe.run()
    for i, (_key, fields) in enumerate(samples):
        reference = np.asarray(Image.open(io.BytesIO(fields["jpg"])).convert("RGB"), dtype=np.int16)
        got = np.asarray(images.at(i), dtype=np.int16)
        assert got.shape == reference.shape == (16, 12, 3)
        # A different libjpeg build: at most a few grey levels apart, never a different image.
        assert np.abs(got - reference).max() <= 8 and np.abs(got - reference).mean() < 1.0
        assert bytes(np.asarray(metas.at(i))) == fields["json"]


@pytest.mark.slow
def test_storage_bench_runs_at_tiny_size(tmp_path):
    from bench import storage_bench

    out = tmp_path / "storage.json"
    report = storage_bench.main(["--count", "12", "--synthetic", "4", "--per-shard", "5", "--size", "16",
                                 "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    files, sharded = report["layouts"]["files"], report["layouts"]["shards"]
    assert files["data"]["files"] == 16 and sharded["data"]["files"] == 3 + 1
    # DVC stores one object per file plus the directory's .dir manifest.
    assert files["remote_objects"] == 17 and sharded["remote_objects"] == 5
    assert set(report["ratio_shards_over_files"]) == {"add", "status", "push", "pull"}
    assert all(s > 0 for lay in (files, sharded) for s in lay["seconds"].values())
    assert not (tmp_path / "work").exists()
