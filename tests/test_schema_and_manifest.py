import pandas as pd
import pytest

from medicsynth.labels import CLASSES, TASKS, LabelError, label_index, normalise_label, validate_label
from medicsynth.manifest import COLUMNS, ManifestError, label_matrix, read_manifest, write_manifest


def test_schema_has_medic_label_strings():
    assert TASKS == ("damage_severity", "informative", "humanitarian", "disaster_types")
    assert CLASSES["damage_severity"] == ("little_or_none", "mild", "severe")
    assert len(CLASSES["humanitarian"]) == 4 and len(CLASSES["disaster_types"]) == 7
    assert "rescue_volunteering_or_donation_effort" in CLASSES["humanitarian"]


@pytest.mark.parametrize("raw,expected", [(" Severe ", "severe"), ("NOT_INFORMATIVE", "not_informative"),
                                          ("not informative", "not_informative"), ("little-or-none", "little_or_none")])
def test_normalise(raw, expected):
    assert normalise_label(raw) == expected


def test_unknown_label_names_task_and_value():
    with pytest.raises(LabelError, match="damage_severity.*'catastrophic'"):
        validate_label("damage_severity", "catastrophic")
    assert label_index("disaster_types", "landslide") == 4


def _row(i, **over):
    row = {"image_id": "CrisisMMD", "event_name": f"9300057_{i}", "image_path": f"data/x/{i}.jpg",
           "damage_severity": "mild", "informative": "informative", "humanitarian": "not_humanitarian",
           "disaster_types": "flood", "split": "train", "source": "real", "provenance": "medic",
           "file": f"/abs/{i}.jpg"}
    row.update(over)
    return row


def test_manifest_roundtrip_normalises_and_orders(tmp_path):
    df = pd.DataFrame([_row(0, damage_severity=" Mild "), _row(1, extra="kept")])
    write_manifest(df, tmp_path / "m.tsv")
    back = read_manifest(tmp_path / "m.tsv")
    assert list(back.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert back["damage_severity"].tolist() == ["mild", "mild"]
    assert label_matrix(back)[0].tolist() == [1, 0, 2, 2]


def test_manifest_errors_name_file_row_and_value(tmp_path):
    path = tmp_path / "bad.tsv"
    pd.DataFrame([_row(0), _row(1, humanitarian="aliens")]).to_csv(path, sep="\t", index=False)
    with pytest.raises(ManifestError, match=r"bad.tsv: row 3: .*humanitarian.*'aliens'"):
        read_manifest(path)
    pd.DataFrame([_row(0), _row(0)]).to_csv(path, sep="\t", index=False)
    with pytest.raises(ManifestError, match="row 3: duplicate image_path"):
        read_manifest(path)
    pd.DataFrame([_row(0)]).drop(columns=["source"]).to_csv(path, sep="\t", index=False)
    with pytest.raises(ManifestError, match="missing column"):
        read_manifest(path)
