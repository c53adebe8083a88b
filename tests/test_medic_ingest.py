"""ingest_medic on a tiny MEDIC-format release built in tmp_path, broken files included."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medicsynth.images import jpeg_sof
from medicsynth.io import read_json, write_json
from medicsynth.labels import CLASSES, TASKS
from medicsynth.manifest import COLUMNS, read_manifest
from medicsynth.medic import MedicFormatError, ingest_medic, reencoded_name, write_ingest_outputs

HEADER = "\t".join(
    ["image_id", "event_name", "image_path",
     "damage_severity", "informative", "humanitarian", "disaster_types"]
)
CRISIS = "data/crisismmd/data_image/iraq_iran_earthquake/13_11_2017"
ASONAM = "data/ASONAM17_Damage_Image_Dataset/nepal_eq"
AIDR = "data/aidr_disaster_types/flood"


def _rgb(seed: int, size=(32, 24)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _jpeg(seed: int, **kwargs) -> bytes:
    buf = io.BytesIO()
    _rgb(seed).save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


def _encode(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


# Each image: relative path -> bytes (None: referenced but absent from the release).
IMAGES: dict[str, bytes | None] = {
    f"{CRISIS}/930005740236034049_0.jpg": _jpeg(1),
    f"{ASONAM}/nepal_eq_severe_im_9032.jpg": _jpeg(2, progressive=True),
    f"{CRISIS}/930005740236034050_0.jpg": b"",
    f"{CRISIS}/930005740236034051_0.jpg": _jpeg(3)[:400],
    f"{AIDR}/gif_named_jpg.jpg": _encode(_rgb(4), "GIF"),
    f"{AIDR}/cmyk.jpg": _encode(_rgb(5).convert("CMYK"), "JPEG"),
    f"{AIDR}/gray.jpg": _encode(_rgb(6).convert("L"), "JPEG"),
    f"{AIDR}/rgba.png": _encode(_rgb(7).convert("RGBA"), "PNG"),
    f"{AIDR}/png_named_jpg.jpg": _encode(_rgb(8), "PNG"),
    f"{AIDR}/missing.jpg": None,
    f"{CRISIS}/dev_0.jpg": _jpeg(9),
    f"{CRISIS}/test_0.jpg": _jpeg(10),
    f"{CRISIS}/test_1.jpg": _jpeg(11),
}

# (image_id, event_name, image_path, damage, informative, humanitarian, disaster) per split;
# labels deliberately in odd case / spacing, as hand-edited TSVs have them.
TRAIN = [
    ("CrisisMMD", "930005740236034049_0", f"{CRISIS}/930005740236034049_0.jpg",
     " Severe ", "Informative", "infrastructure_and_utility_damage", "Earthquake"),
    ("ASONAM2017", "nepal_eq_severe_im_9032.jpg", f"{ASONAM}/nepal_eq_severe_im_9032.jpg",
     "severe", "informative", "Infrastructure_And_Utility_Damage", "earthquake "),
    ("CrisisMMD", "930005740236034050_0", f"{CRISIS}/930005740236034050_0.jpg",
     "mild", "informative", "rescue_volunteering_or_donation_effort", "flood"),
    ("CrisisMMD", "930005740236034051_0", f"{CRISIS}/930005740236034051_0.jpg",
     "little_or_none", "not_informative", "not_humanitarian", "not_disaster"),
    ("AIDR", "gif_named_jpg.jpg", f"{AIDR}/gif_named_jpg.jpg",
     "MILD", "informative", "affected_injured_or_dead_people", "flood"),
    ("AIDR", "cmyk.jpg", f"{AIDR}/cmyk.jpg",
     "little_or_none", "Not_Informative", "not humanitarian", "not_disaster"),
    ("damage_multimodal", "gray.jpg", f"{AIDR}/gray.jpg",
     "mild", "informative", "rescue_volunteering_or_donation_effort", "hurricane"),
    ("aidr_old_data", "rgba.png", f"{AIDR}/rgba.png",
     "little_or_none", "informative", "not_humanitarian", "fire"),
    ("AIDR", "png_named_jpg.jpg", f"{AIDR}/png_named_jpg.jpg",
     "severe", "informative", "affected_injured_or_dead_people", "landslide"),
    ("AIDR", "missing.jpg", f"{AIDR}/missing.jpg",
     "severe", "informative", "not_humanitarian", "other_disaster"),
    # A train copy of a test image: a leak, must leave train.
    ("CrisisMMD", "test_0", f"{CRISIS}/test_0.jpg",
     "mild", "informative", "not_humanitarian", "flood"),
]
DEV = [
    ("CrisisMMD", "dev_0", f"{CRISIS}/dev_0.jpg",
     "little_or_none", "not_informative", "not_humanitarian", "not_disaster"),
    # Same image_path again, different labels: the first row wins.
    ("CrisisMMD", "dev_0", f"{CRISIS}/dev_0.jpg",
     "severe", "informative", "not_humanitarian", "fire"),
]
TEST = [
    ("CrisisMMD", "test_0", f"{CRISIS}/test_0.jpg",
     "severe", "informative", "infrastructure_and_utility_damage", "flood"),
    ("CrisisMMD", "test_1", f"{CRISIS}/test_1.jpg",
     "little_or_none", "informative", "not_humanitarian", "Not_Disaster"),
]


def _tsv(rows, newline="\n", header=HEADER) -> str:
    return newline.join([header, *("\t".join(r) for r in rows)]) + newline


def make_release(root: Path, train=TRAIN, dev=DEV, test=TEST) -> Path:
    for rel, data in IMAGES.items():
        if data is None:
            continue
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "MEDIC_train.tsv").write_text(_tsv(train) + "\n")  # trailing blank line
    (root / "MEDIC_dev.tsv").write_bytes(_tsv(dev, newline="\r\n").encode())  # CRLF
    (root / "MEDIC_test.tsv").write_bytes(b"\xef\xbb\xbf" + _tsv(test).encode())  # BOM
    return root


def _assert_rgb_jpeg(path: Path) -> None:
    assert path.read_bytes()[:3] == b"\xff\xd8\xff", path
    with Image.open(path) as im:
        im.load()
        assert (im.format, im.mode) == ("JPEG", "RGB"), path
    assert jpeg_sof(path)[0] in (0xC0, 0xC2)


@pytest.fixture()
def ingested(tmp_path):
    release = make_release(tmp_path / "MEDIC")
    out = tmp_path / "prepared"
    result = ingest_medic(
        release, out, reencode_dir=tmp_path / "reencoded", workers=2, progress=False
    )
    return release, out, tmp_path / "reencoded", result


def test_quarantines_exactly_the_broken_and_duplicate_rows(ingested):
    _, _, _, result = ingested
    q = result.quarantine
    got = {(r.split, r.row, r.image_path.rsplit("/", 1)[1], r.reason) for r in q.itertuples()}
    assert got == {
        ("train", 4, "930005740236034050_0.jpg", "empty_file"),
        ("train", 5, "930005740236034051_0.jpg", "truncated"),
        ("train", 11, "missing.jpg", "missing"),
        ("train", 12, "test_0.jpg", "duplicate_of_test"),
        ("dev", 3, "dev_0.jpg", "duplicate"),
    }
    assert result.rejected == {"empty_file": 1, "missing": 1, "truncated": 1}
    assert result.duplicates == {"within_split": 1, "cross_split": 1, "label_conflicts": 2}
    leak = q[q.reason == "duplicate_of_test"].iloc[0]
    assert "test line 2" in leak.detail


def test_reencodes_the_odd_ones_under_reencode_dir(ingested):
    release, _, reenc, result = ingested
    assert result.reencoded == {"format_gif": 1, "format_png": 2, "mode_cmyk": 1, "mode_l": 1}
    train = result.manifests["train"].set_index("image_path")
    for name in ("gif_named_jpg.jpg", "cmyk.jpg", "gray.jpg", "png_named_jpg.jpg"):
        assert train.loc[f"{AIDR}/{name}", "file"] == str(reenc / AIDR / name)
    # A non-.jpg name gets .jpg appended, so a.png and a.jpg could never collide.
    assert train.loc[f"{AIDR}/rgba.png", "file"] == str(reenc / AIDR / "rgba.png.jpg")
    assert reencoded_name("x/y.PNG") == "x/y.PNG.jpg" and reencoded_name("x/y.JPEG") == "x/y.JPEG"
    # Plain RGB JPEGs (baseline and progressive) are used in place, by absolute path.
    for rel in (f"{CRISIS}/930005740236034049_0.jpg", f"{ASONAM}/nepal_eq_severe_im_9032.jpg"):
        assert train.loc[rel, "file"] == str(release.resolve() / rel)
    # The release itself is never modified.
    for rel, data in IMAGES.items():
        if data is not None:
            assert (release / rel).read_bytes() == data


def test_every_manifest_file_is_an_rgb_jpeg(ingested):
    _, _, _, result = ingested
    files = [Path(f) for df in result.manifests.values() for f in df["file"]]
    assert len(files) == 10
    for path in files:
        assert path.is_absolute()
        _assert_rgb_jpeg(path)


def _expected_counts(rows) -> dict[str, dict[str, int]]:
    from medicsynth.labels import validate_label

    counts = {task: {name: 0 for name in CLASSES[task]} for task in TASKS}
    for row in rows:
        for task, value in zip(TASKS, row[3:]):
            counts[task][validate_label(task, value)] += 1
    return counts


def test_rows_labels_and_counts(ingested):
    _, _, _, result = ingested
    assert result.rows_read == {"train": 11, "dev": 2, "test": 2}
    kept = {"train": [TRAIN[i] for i in (0, 1, 4, 5, 6, 7, 8)], "dev": DEV[:1], "test": TEST}
    sizes = {split: len(df) for split, df in result.manifests.items()}
    assert sizes == {split: len(rows) for split, rows in kept.items()}
    # Every release row is either in a manifest or in quarantine, never lost.
    assert sum(result.rows_read.values()) == sum(sizes.values()) + len(result.quarantine)

    for split, df in result.manifests.items():
        assert list(df.columns) == list(COLUMNS)
        assert list(df.image_path) == [r[2] for r in kept[split]]  # release order kept
        assert set(df.split) == {split}
        assert set(df.source) == {"real"} and set(df.provenance) == {"medic"}
        assert result.class_counts[split] == _expected_counts(kept[split])

    first = result.manifests["train"].iloc[0]
    # The release quirk is carried through untouched: image_id is the source, event_name an id.
    assert (first.image_id, first.event_name) == ("CrisisMMD", "930005740236034049_0")
    assert tuple(first[list(TASKS)]) == (
        "severe", "informative", "infrastructure_and_utility_damage", "earthquake")
    assert result.class_counts["train"]["damage_severity"] == {
        "little_or_none": 2, "mild": 2, "severe": 3}
    # The duplicate dev row had other labels; the first row's labels are the ones kept.
    assert result.manifests["dev"].iloc[0].damage_severity == "little_or_none"
    # The test copy of the leaked image keeps its own (test) labels.
    test = result.manifests["test"].set_index("image_path")
    assert test.loc[f"{CRISIS}/test_0.jpg", "damage_severity"] == "severe"


def test_outputs_written_and_metrics_json(ingested, tmp_path):
    _, out, _, result = ingested
    for split in ("train", "dev", "test"):
        df = read_manifest(out / f"{split}.tsv")  # validates columns, labels, uniqueness
        pd.testing.assert_frame_equal(
            df.reset_index(drop=True), result.manifests[split].reset_index(drop=True)
        )
    q = pd.read_csv(out / "quarantine.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(q.columns) == ["split", "row", "image_path", "reason", "detail"]
    assert len(q) == 5
    metrics = write_ingest_outputs(result, tmp_path / "again")
    write_json(metrics, tmp_path / "prepare.json")
    back = read_json(tmp_path / "prepare.json")
    assert back["rows_kept"] == {"train": 7, "dev": 1, "test": 2}
    assert back["quarantined"] == 5
    assert back["reencoded"] == result.reencoded and back["rejected"] == result.rejected
    assert back["class_counts"] == result.class_counts
    assert not list(out.glob(".*tmp"))  # atomic writers left no temp files


def test_rerun_gives_identical_outputs(ingested, tmp_path):
    release, out, reenc, _ = ingested
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    ingest_medic(release, out, reencode_dir=reenc, workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_unsafe_image_path_is_quarantined(tmp_path):
    (tmp_path / "secret.jpg").write_bytes(_jpeg(12))
    bad = ("AIDR", "x", "../secret.jpg", "mild", "informative", "not_humanitarian", "flood")
    release = make_release(tmp_path / "MEDIC", train=[TRAIN[0], bad])
    result = ingest_medic(
        release, None, reencode_dir=tmp_path / "re", workers=1, progress=False
    )
    assert result.rejected.get("unsafe_path") == 1
    assert "../secret.jpg" not in set(result.manifests["train"].image_path)
    assert not (tmp_path / "prepared").exists()  # out_dir=None writes nothing


def test_unknown_label_names_file_row_and_value(tmp_path):
    bad = list(TRAIN[1])
    bad[5] = "Rescue Dogs"
    release = make_release(tmp_path / "MEDIC", train=[TRAIN[0], tuple(bad)])
    with pytest.raises(MedicFormatError) as err:
        ingest_medic(release, tmp_path / "out", reencode_dir=tmp_path / "re", progress=False)
    msg = str(err.value)
    assert "MEDIC_train.tsv" in msg and "line 3" in msg and "'Rescue Dogs'" in msg
    assert "humanitarian" in msg
    assert not (tmp_path / "out").exists()  # nothing written for a bad release


@pytest.mark.parametrize(
    "header,column",
    [
        (HEADER + "\textra_col", "extra_col"),
        (HEADER.replace("\tinformative", ""), "informative"),
        (HEADER.replace("image_path", "image_paths"), "image_path"),
        (HEADER + "\tdisaster_types", "disaster_types"),
    ],
    ids=["extra", "missing", "renamed", "repeated"],
)
def test_bad_header_names_file_and_column(tmp_path, header, column):
    release = make_release(tmp_path / "MEDIC")
    (release / "MEDIC_dev.tsv").write_text(_tsv(DEV, header=header))
    with pytest.raises(MedicFormatError) as err:
        ingest_medic(release, None, reencode_dir=tmp_path / "re", progress=False)
    msg = str(err.value)
    assert "MEDIC_dev.tsv" in msg and repr(column) in msg


def test_wrong_field_count_names_file_and_line(tmp_path):
    release = make_release(tmp_path / "MEDIC")
    rows = _tsv(TEST) + "CrisisMMD\tonly_two_fields\n"
    (release / "MEDIC_test.tsv").write_text(rows)
    with pytest.raises(MedicFormatError, match=r"MEDIC_test\.tsv: line 4: expected 7"):
        ingest_medic(release, None, reencode_dir=tmp_path / "re", progress=False)


def test_missing_split_file(tmp_path):
    release = make_release(tmp_path / "MEDIC")
    (release / "MEDIC_dev.tsv").unlink()
    with pytest.raises(MedicFormatError, match="MEDIC_dev.tsv"):
        ingest_medic(release, None, reencode_dir=tmp_path / "re", progress=False)
