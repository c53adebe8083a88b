"""The shard layout wired into the pipeline: references, the reader, the writers and the consumers.

A manifest's ``file`` names a JPEG or a member of a tar shard (``<shard>.tar#<member>``). These
tests check the reference format and the random-access reader, ``storage.layout``, the resumable
packing of real images (prepare, MEDIC) and of synthetic ones (``stages/generate.py`` killed and
resumed: byte-identical shards), and that the loaders (torch, DALI CPU), the filter and merge
give the same results on shard references as on the same images as files.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from medicsynth import loaders, shards
from medicsynth.diffusion import generate as gen
from medicsynth.diffusion.tiny import build_pipeline, save_pipeline
from medicsynth.filtering import FilterConfig, filter_synthetic
from medicsynth.manifest import COLUMNS, label_matrix, member_ref, read_manifest, resolve_file, split_ref
from medicsynth.merge import merge_training_set
from medicsynth.prepare import prepare_dataset
from tests.sections import section

REPO = Path(__file__).resolve().parents[1]


def _jpeg(i: int, size=(20, 16)) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _files(root: Path, n: int) -> list[Path]:
    (root / "files").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = root / "files" / f"img_{i:03d}.jpg"
        path.write_bytes(_jpeg(i))
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# The reference and the reader


def test_reference_format_and_resolution():
    ref = member_ref("data/prepared/shards/real-000003.tar", "img_0042.jpg")
    assert ref == "data/prepared/shards/real-000003.tar#img_0042.jpg"
    assert split_ref(ref) == ("data/prepared/shards/real-000003.tar", "img_0042.jpg")
    assert split_ref("data/x/img#1.jpg") == ("data/x/img#1.jpg", None)  # not a .tar: a plain file name
    assert split_ref("/abs/a.jpg") == ("/abs/a.jpg", None)
    assert resolve_file(ref, "/repo") == "/repo/data/prepared/shards/real-000003.tar#img_0042.jpg"
    assert resolve_file("/abs/s-000000.tar#k.jpg", "/repo") == "/abs/s-000000.tar#k.jpg"
    with pytest.raises(ValueError, match="must end in .tar"):
        member_ref("data/x.zip", "k.jpg")
    with pytest.raises(ValueError, match="must not contain"):
        member_ref("data/x.tar", "a/k.jpg")


def test_reader_gives_the_same_bytes_for_a_file_and_its_member(tmp_path):
    files = _files(tmp_path, 5)
    refs = shards.pack_files([(p.stem, p) for p in files], tmp_path / "shards", "real", per_shard=2)
    assert [split_ref(refs[p.stem])[0].rsplit("/", 1)[-1] for p in files] == [
        "real-000000.tar", "real-000000.tar", "real-000001.tar", "real-000001.tar", "real-000002.tar"]
    for p in files:
        assert shards.read_image_bytes(refs[p.stem]) == shards.read_image_bytes(p) == p.read_bytes()
        with shards.open_image(refs[p.stem]) as a, shards.open_image(p) as b:
            assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
        assert shards.image_ref_exists(refs[p.stem]) and shards.image_ref_exists(p)
    # The index holds tar data offsets: the member is exactly those bytes of the shard.
    shard = split_ref(refs["img_000"])[0]
    offset, size = shards.shard_index(shard)["img_000.jpg"]
    assert Path(shard).read_bytes()[offset:offset + size] == files[0].read_bytes()


def test_a_rewritten_shard_is_indexed_again(tmp_path):
    out = tmp_path / "s"
    shards.write_shards([("a", {"jpg": b"first"})], out, "x", per_shard=2)
    ref = member_ref(out / "x-000000.tar", "a.jpg")
    assert shards.read_image_bytes(ref) == b"first"
    shards.write_shards([("b", {"jpg": b"second, longer"})], out, "x", per_shard=2)  # reopens, rewrites
    assert shards.read_image_bytes(ref) == b"first"
    assert shards.read_image_bytes(member_ref(out / "x-000000.tar", "b.jpg")) == b"second, longer"


def test_missing_shard_or_member_is_named(tmp_path):
    shards.write_shards([("a", {"jpg": b"1"})], tmp_path, "x", per_shard=2)
    with pytest.raises(shards.ImageRefError, match=r"t\.tsv row 3: shard .*x-000000\.tar has no member 'zz\.jpg'"):
        shards.read_image_bytes(member_ref(tmp_path / "x-000000.tar", "zz.jpg"), "t.tsv row 3")
    with pytest.raises(shards.ImageRefError, match=r"shard .*x-000007\.tar does not exist"):
        shards.read_image_bytes(member_ref(tmp_path / "x-000007.tar", "a.jpg"))
    with pytest.raises(shards.ImageRefError, match=r"image file .*nothing\.jpg does not exist"):
        shards.open_image(tmp_path / "nothing.jpg")
    assert not shards.image_ref_exists(member_ref(tmp_path / "x-000000.tar", "zz.jpg"))
    # The loaders refuse a missing member before any batch, naming sample, shard and member.
    with pytest.raises(FileNotFoundError, match=r"sample 0: shard member 'zz\.jpg' of .*x-000000\.tar"):
        loaders.make_loader([member_ref(tmp_path / "x-000000.tar", "zz.jpg")], np.zeros((1, 4), np.int64),
                            batch_size=1, resize=8, crop=8, train=False, seed=0, backend="torch", num_workers=0)


def test_layout_param():
    assert shards.resolve_layout("auto", "demo") == "files"
    assert shards.resolve_layout("auto", "medic") == "shards"
    assert shards.resolve_layout("shards", "demo") == "shards"
    with pytest.raises(ValueError, match="storage.layout must be one of"):
        shards.resolve_layout("zip", "demo")
    params = {"storage": {"layout": "auto", "per_shard": 7}, "data": {"source": "medic"}}
    assert shards.per_shard_from_params(params) == 7
    assert shards.per_shard_from_params({**params, "data": {"source": "demo"}}) is None
    assert shards.per_shard_from_params({"storage": {"layout": "files"}}) is None  # nothing else needed
    with pytest.raises(KeyError, match="storage.per_shard"):
        shards.per_shard_from_params({"storage": {"layout": "shards"}})
    with pytest.raises(KeyError, match="data.source"):
        shards.per_shard_from_params({"storage": {"layout": "auto", "per_shard": 7}, "data": {}})
    with pytest.raises(ValueError, match="per_shard must be an integer >= 1"):
        shards.per_shard_from_params({"storage": {"layout": "shards", "per_shard": 0}})
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    assert committed["storage"]["layout"] == "auto" and committed["data"]["source"] == "demo"
    assert shards.per_shard_from_params(committed) is None  # the demo keeps one file per image


def test_pack_files_resumes_a_killed_set_and_replaces_another(tmp_path):
    files = _files(tmp_path, 7)
    items = [(p.stem, p) for p in files]
    shards.pack_files(items, tmp_path / "one", "real", per_shard=3)
    want = [p.read_bytes() for p in shards.shard_paths(tmp_path / "one", "real")]
    # A writer killed after 5 samples: one shard finished, two samples staged.
    killed = shards.ShardWriter(tmp_path / "two", "real", per_shard=3)
    for key, path in items[:5]:
        killed.add(key, {"jpg": path.read_bytes()})
    del killed
    assert len(shards.shard_paths(tmp_path / "two", "real")) == 1
    shards.pack_files(items, tmp_path / "two", "real", per_shard=3)
    assert [p.read_bytes() for p in shards.shard_paths(tmp_path / "two", "real")] == want
    # A set of other images under the same name is replaced, not appended to.
    other = tmp_path / "three"
    shards.pack_files(list(reversed(items)), other, "real", per_shard=3)
    shards.pack_files(items, other, "real", per_shard=3)
    assert [p.read_bytes() for p in shards.shard_paths(other, "real")] == want
    with pytest.raises(ValueError, match="both have sample key 'img_000'"):
        shards.pack_files(items + items[:1], tmp_path / "four", "real", per_shard=3)


# ---------------------------------------------------------------------------------------------
# Loaders: the same batches from files and from shard members


def _labels(n: int) -> np.ndarray:
    return np.stack([np.arange(n) % k for k in (3, 2, 4, 5)], axis=1).astype(np.int64)


def _batches(files, backend: str, train: bool, epochs=(0, 1)):
    loader = loaders.make_loader(files, _labels(len(files)), batch_size=3, resize=12, crop=8, train=train, seed=5,
                                 backend=backend, num_workers=1 if backend == "dali" else 0)
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        out += [(x.clone(), y.clone()) for x, y in loader]
    del loader
    return out


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_loaders_give_the_same_batches_from_shards_as_from_files(tmp_path, backend):
    if backend == "dali" and not loaders.dali_available():
        pytest.skip("nvidia-dali is not installed")
    files = _files(tmp_path, 7)
    refs = shards.pack_files([(p.stem, p) for p in files], tmp_path / "shards", "real", per_shard=3)
    as_refs = [refs[p.stem] for p in files]
    for train in (True, False):
        a = _batches([str(p) for p in files], backend, train)
        b = _batches(as_refs, backend, train)
        assert len(a) == len(b) == 2 * 3
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)


# ---------------------------------------------------------------------------------------------
# Filter and merge on shard references


def test_filter_and_merge_on_shard_references(tmp_path):
    from tests.test_filter import FakePredictor, _labels as filter_labels, _render

    root = tmp_path
    (root / "syn").mkdir()
    rows, intended = [], {}
    for i, disaster in enumerate(("flood", "fire", "earthquake", "hurricane")):
        labels = filter_labels(disaster)
        _render(labels, i).save(root / "syn" / f"s{i}.jpg", quality=92)
        intended[f"s{i}"] = labels
        rows.append({"image_id": "synthetic", "event_name": "synthetic", "image_path": f"syn/s{i}.jpg", **labels,
                     "split": "train", "source": "synthetic", "provenance": "t", "file": f"syn/s{i}.jpg",
                     "plan_id": str(i), "blank_flag": "0"})
    (root / "syn" / "s1b.jpg").write_bytes((root / "syn" / "s1.jpg").read_bytes())  # an exact copy of s1
    intended["s1b"] = intended["s1"]
    rows.append({**rows[1], "image_path": "syn/s1b.jpg", "file": "syn/s1b.jpg", "plan_id": "9"})
    Image.new("RGB", (64, 64), (128, 128, 128)).save(root / "syn" / "blank.jpg")
    intended["blank"] = intended["s0"]
    rows.append({**rows[0], "image_path": "syn/blank.jpg", "file": "syn/blank.jpg", "plan_id": "8"})
    files_df = pd.DataFrame(rows)
    refs = shards.pack_files([(Path(f).stem, root / f) for f in files_df["file"]], root / "shards", "synthetic", 2)
    shard_df = files_df.assign(file=[refs[Path(f).stem] for f in files_df["file"]])
    assert shard_df["file"].str.contains(".tar#").all()
    # Real training images (for the duplicate_real rule): one is the very image s3 shows.
    (root / "real").mkdir()
    _render(filter_labels("fire", "mild"), 100).save(root / "real" / "r0.jpg", quality=92)
    (root / "real" / "r1.jpg").write_bytes((root / "syn" / "s3.jpg").read_bytes())
    real_files = pd.DataFrame([{**rows[0], "image_path": f"real/r{i}.jpg", "file": f"real/r{i}.jpg", "source": "real"}
                               for i in range(2)])[list(COLUMNS)]
    real_refs = shards.pack_files([(f"r{i}", root / "real" / f"r{i}.jpg") for i in range(2)], root / "shards", "real", 5)
    real_shards = real_files.assign(file=[real_refs["r0"], real_refs["r1"]])

    class ByMember(FakePredictor):  # the fake predictor knows images by stem: the member's, for a reference
        def __call__(self, model_dir, files, **kw):
            return super().__call__(model_dir, [split_ref(f)[1] or f for f in files], **kw)

    config = FilterConfig.from_params(section("filter", cache_dir=str(root / "hash_cache")))
    a = filter_synthetic(files_df, config, real=real_files, root=root, predictor=ByMember(intended))
    b = filter_synthetic(shard_df, config, real=real_shards, root=root, predictor=ByMember(intended))
    assert a.decisions["reason"].tolist() == ["kept", "kept", "kept", "duplicate_real", "duplicate_synthetic",
                                              "blank"]
    assert b.decisions.at[3, "dup_real_of"] == "real/r1.jpg"
    c = filter_synthetic(shard_df, config, real=real_shards, root=root, predictor=ByMember(intended))
    pd.testing.assert_frame_equal(b.decisions, c.decisions)  # the real hashes, cached per shard member
    pd.testing.assert_frame_equal(a.decisions.drop(columns=["file"]), b.decisions.drop(columns=["file"]))
    assert b.kept["file"].tolist() == shard_df["file"].tolist()[:3]
    assert a.metrics == b.metrics

    # Merge carries the references through; the merged set loads like any manifest.
    real = shard_df.iloc[:2][list(COLUMNS)].assign(source="real", image_path=["r0", "r1"])
    alloc = pd.DataFrame([{**intended[f"s{i}"], "count": 1} for i in range(3)])
    merged = merge_training_set(real, b.kept.astype(str), alloc, 0.5).train  # as read from the TSV
    assert merged["file"].tolist()[2:] == b.kept["file"].tolist()[:2]
    files = [resolve_file(f, root) for f in merged["file"]]
    batches = list(loaders.make_loader(files, label_matrix(merged), batch_size=4, resize=8, crop=8, train=False,
                                       seed=0, backend="torch", num_workers=0))
    assert sum(len(y) for _x, y in batches) == len(merged)


# ---------------------------------------------------------------------------------------------
# Writers: prepare (MEDIC release) and generate


def test_prepare_medic_into_shards_has_the_images_of_the_files_layout(tmp_path):
    from tests.test_medic_ingest import make_release

    release = make_release(tmp_path / "MEDIC")
    data = {"source": "medic", "medic_dir": str(release), "jpeg_quality": 95, "workers": 1}
    files = prepare_dataset(data, tmp_path / "files")
    sharded = prepare_dataset(data, tmp_path / "sharded", per_shard=2)
    assert (tmp_path / "files" / "reencoded").is_dir() and not (tmp_path / "sharded" / "reencoded").exists()
    assert files.metrics == sharded.metrics
    n = 0
    for split in ("train", "dev", "test"):
        fa, fb = files.splits[split], sharded.splits[split]
        pd.testing.assert_frame_equal(fa.drop(columns=["file"]), fb.drop(columns=["file"]))
        for a, b in zip(fa["file"], fb["file"]):
            assert "/sharded/shards/real-" in b and b.endswith(".jpg")
            assert shards.read_image_bytes(b) == Path(a).read_bytes()
            n += 1
    names = [p.name for p in shards.shard_paths(tmp_path / "sharded" / "shards", "real")]
    assert len(names) == (n + 1) // 2 and not (tmp_path / "sharded" / "shards" / ".staging-real").exists()
    # Run again over the finished set: nothing changes.
    before = {p: p.read_bytes() for p in (tmp_path / "sharded" / "shards").iterdir()}
    prepare_dataset(data, tmp_path / "sharded", per_shard=2)
    assert {p: p.read_bytes() for p in (tmp_path / "sharded" / "shards").iterdir()} == before


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tests.test_diffusion import TEST_TINY

    path = tmp_path_factory.mktemp("model") / "demo"
    save_pipeline(build_pipeline(TEST_TINY, seed=0), path, {"prompt_source": "labels"})
    return path


def _stage(cwd: Path, model_dir: Path, monkeypatch, n: int, guidance: float = 4.0) -> dict:
    """``python stages/generate.py`` in ``cwd`` with layout shards (3 per shard) over an ``n``-image plan."""
    import runpy
    import sys

    from tests.test_diffusion import write_plan

    write_plan(cwd / "captions.tsv", n)
    params = {"storage": {"layout": "shards", "per_shard": 3},
              "generate": section("generate", model="demo", steps=2, guidance=guidance, batch_size=1, device="cpu",
                                  threads=1, writer_threads=1)}
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["stages/generate.py", "--captions", "captions.tsv", "--images", "images",
                                      "--manifest", "manifest.tsv", "--metrics", "generate.json",
                                      "--demo-dir", str(model_dir)])
    runpy.run_path(str(REPO / "stages/generate.py"), run_name="__main__")
    return json.loads((cwd / "timing/generate.json").read_text())["run"]


def _set(cwd: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cwd / "images").iterdir())}


@pytest.mark.slow
def test_generate_stage_writes_shards_and_resumes_byte_identically(tmp_path, model_dir, monkeypatch):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir(), killed.mkdir()
    run = _stage(clean, model_dir, monkeypatch, 7)
    assert run["rendered"] == 7
    assert list(_set(clean)) == ["synthetic-000000.tar", "synthetic-000001.tar", "synthetic-000002.tar"]
    manifest = read_manifest(clean / "manifest.tsv")
    assert manifest["file"].tolist() == [f"images/synthetic-{i // 3:06d}.tar#p{i:04d}.jpg" for i in range(7)]
    for row in manifest.to_dict("records"):
        assert gen.read_stamp(row["file"])["key"] == row["provenance_key"]
    with tarfile.open(clean / "images/synthetic-000000.tar") as tar:
        assert tar.getnames() == ["p0000.jpg", "p0000.json", "p0001.jpg", "p0001.json", "p0002.jpg", "p0002.json"]

    # Killed while rendering (third image): 2 rendered images wait in .render/, no shard yet.
    from tests.test_diffusion import CountingRenderer, opts, write_plan

    write_plan(killed / "captions.tsv", 7)
    with pytest.raises(KeyboardInterrupt):
        gen.generate_plan(killed / "captions.tsv", killed / "images", killed / "manifest.tsv",
                          opts(steps=2, guidance=4.0, batch_size=1, writer_threads=1), demo_dir=model_dir, progress=False,
                          renderer_hook=lambda r: CountingRenderer(r, die_on=3), per_shard=3)
    assert sorted(p.name for p in (killed / "images/.render").glob("*.jpg")) == ["p0000.jpg", "p0001.jpg"]
    assert not list((killed / "images").glob("*.tar"))
    # Killed again while packing, after 4 samples went to the writer: one shard done, one staged.
    real_add, calls = shards.ShardWriter.add, {"n": 0}

    def dying_add(self, key, fields):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated kill while packing")
        return real_add(self, key, fields)

    monkeypatch.setattr(shards.ShardWriter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        _stage(killed, model_dir, monkeypatch, 7)
    monkeypatch.setattr(shards.ShardWriter, "add", real_add)
    assert [p.name for p in shards.shard_paths(killed / "images", "synthetic")] == ["synthetic-000000.tar"]
    run = _stage(killed, model_dir, monkeypatch, 7)
    assert run["rendered"] == 0 and run["skipped"] == 7
    assert _set(killed) == _set(clean)  # byte-identical shards, no staging or rendered file left
    assert (killed / "manifest.tsv").read_bytes() == (clean / "manifest.tsv").read_bytes()
    assert (killed / "generate.json").read_bytes() == (clean / "generate.json").read_bytes()

    # A longer plan renders only the new image and appends it: the same set as one 8-image run
    # (batches of one image here, so no image depends on which run rendered it).
    run = _stage(killed, model_dir, monkeypatch, 8)
    assert (run["rendered"], run["skipped"]) == (1, 7)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    _stage(fresh, model_dir, monkeypatch, 8)
    assert _set(killed) == _set(fresh)
    # A recipe change makes every image stale: all re-rendered, the set rebuilt in plan order.
    before = _set(killed)
    run = _stage(killed, model_dir, monkeypatch, 8, guidance=2.0)
    assert (run["rendered"], run["stale_rerendered"]) == (8, 8)
    after = _set(killed)
    assert list(after) == list(before) and all(after[k] != before[k] for k in before)
    assert not (killed / "images/.render").exists() and sorted(os.listdir(killed / "images")) == list(after)


def test_hosted_backend_writes_shards_and_resumes(tmp_path, monkeypatch):
    """``backend: openai`` with layout shards: a budget-capped run packs what it got, the resume
    appends the rest, and a rerun from the answer cache rebuilds the same bytes."""
    import shutil

    from tests.images_api_server import FakeImagesServer
    from tests.test_generators import _generate_report, hosted_params, run_stage, stage_args, write_plan

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    write_plan(tmp_path / "captions.tsv", 5)
    storage = {"layout": "shards", "per_shard": 2}
    with FakeImagesServer() as server:
        try:
            for max_calls, present in ((3, 3), (100, 5)):
                (tmp_path / "params.yaml").write_text(yaml.safe_dump(
                    {"storage": storage, "generate": hosted_params(server, tmp_path, max_calls=max_calls)}))
                run_stage("stages/generate.py", tmp_path, *stage_args(), monkeypatch=monkeypatch)
                manifest = read_manifest(tmp_path / "manifest.tsv")
                assert len(manifest) == present and _generate_report(tmp_path)["missing"] == 5 - present
                assert len(shards.shard_paths(tmp_path / "images", "synthetic")) == (present + 1) // 2
            assert server.count() == 5
            first = _set(tmp_path)
            assert list(first) == ["synthetic-000000.tar", "synthetic-000001.tar", "synthetic-000002.tar"]
            for row in manifest.to_dict("records"):
                assert split_ref(row["file"])[1] == f"{row['plan_id']}.jpg"
                assert gen.read_stamp(tmp_path / row["file"])["key"] == row["provenance_key"]
            shutil.rmtree(tmp_path / "images")  # DVC removed the output: all 5 come from the cache
            run_stage("stages/generate.py", tmp_path, *stage_args(), monkeypatch=monkeypatch)
            assert server.count() == 5 and _set(tmp_path) == first
        finally:
            server.release.set()


def test_check_images_names_manifest_row_and_member(tmp_path):
    paths = shards.write_shards([("a", {"jpg": b"1"}), ("b", {"jpg": b"2"})], tmp_path / "s", "real", per_shard=5)
    good = member_ref(paths[0], "a.jpg")
    shards.check_images([good, member_ref(paths[0], "b.jpg")], "m.tsv")
    with pytest.raises(shards.ImageRefError, match=r"m\.tsv: row 3: file .*: shard .*real-000000\.tar has no member 'c\.jpg'"):
        shards.check_images([good, member_ref(paths[0], "c.jpg")], "m.tsv")
    with pytest.raises(shards.ImageRefError, match=r"m\.tsv: row 2: file 'x/real-000009\.tar#a\.jpg': shard .* does not exist"):
        shards.check_images(["x/real-000009.tar#a.jpg"], "m.tsv", root=tmp_path)
    with pytest.raises(shards.ImageRefError, match=r"row 2: file 'gone\.jpg': image file .*gone\.jpg does not exist"):
        shards.check_images(["gone.jpg"], "m.tsv", root=tmp_path)


@pytest.mark.e2e
def test_tiny_pipeline_on_shards_gives_the_results_of_files(tiny_pipeline, tmp_path):
    """The whole tiny pipeline under real ``dvc repro`` with ``storage.layout: shards``: the real
    and synthetic images live in shards, every manifest names members, and since every stage reads
    the same bytes, every model and metric equals the files layout's (the session's tiny run)."""
    from tests.e2e_helpers import make_repo_copy, run

    repo = make_repo_copy(tmp_path / "repo", {"storage": {"layout": "shards", "per_shard": 100}})
    run(["dvc", "repro"], repo, timeout=3600)  # the limit only stops a hung run
    assert not (repo / "data/prepared/images").exists()
    assert len(shards.shard_paths(repo / "data/prepared/shards", "real")) == 4  # 400 tiny demo images
    assert shards.shard_paths(repo / "data/synthetic/images", "synthetic")
    assert not list((repo / "data/synthetic/images").glob("*.jpg"))
    manifests = sorted((repo / "data").glob("variants/*/*.tsv")) + [repo / "data/prepared/test.tsv",
                                                                     repo / "data/synthetic/manifest.tsv"]
    for path in manifests:
        df = read_manifest(path)
        assert df["file"].str.contains(r"\.tar#").all(), path
        shards.check_images(df["file"], path, root=repo)
    assert (read_manifest(repo / "data/variants/augmented/train.tsv")["source"] == "synthetic").any()
    for rel in ["metrics/summary.json", "metrics/compare.json", "metrics/filter.json", "metrics/relabel.json",
                *sorted(p.relative_to(tiny_pipeline).as_posix()
                        for p in (tiny_pipeline / "metrics/evaluate").glob("*.json"))]:
        assert json.loads((repo / rel).read_text()) == json.loads((tiny_pipeline / rel).read_text()), rel
    for model in sorted((tiny_pipeline / "models").glob("*/model.pt")):
        assert (repo / model.relative_to(tiny_pipeline)).read_bytes() == model.read_bytes(), model
