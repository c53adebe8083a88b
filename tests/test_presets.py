"""Presets: only keys params.yaml has, applied with params.yaml's comments kept."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from medicsynth.presets import PresetError, apply_preset, check, leaf_keys, load_yaml

REPO = Path(__file__).resolve().parents[1]


def test_study_preset_keys_all_exist_in_params_yaml():
    check(load_yaml(REPO / "params.yaml"), load_yaml(REPO / "presets/study.yaml"))


def test_every_study_preset_key_is_commented():
    # The preset says, for each key, what the study did: a comment on the key's line, or on the
    # line(s) just above it.
    lines = (REPO / "presets/study.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- ") or ":" not in stripped:
            continue
        if stripped.endswith(":"):  # a section header
            continue
        assert "#" in line or lines[i - 1].strip().startswith("#"), f"presets/study.yaml:{i + 1} has no comment: {line}"


def test_apply_keeps_comments_and_sets_leaves(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    changed = apply_preset(REPO / "presets/study.yaml", params)
    assert "allocate.total" in changed and "generate.model" in changed
    text = params.read_text()
    assert "# Parameters of the medicsynth pipeline." in text  # comments survive the round trip
    after = yaml.safe_load(text)
    preset = yaml.safe_load((REPO / "presets/study.yaml").read_text())
    assert after["allocate"]["total"] == preset["allocate"]["total"]
    assert after["allocate"]["combination_bonuses"] == preset["allocate"]["combination_bonuses"]
    assert after["adapt"]["mode"] == "off"  # quoted in the preset: YAML would read a bare off as false
    # keys the preset does not name keep params.yaml's values
    before = yaml.safe_load((REPO / "params.yaml").read_text())
    assert after["allocate"]["seed"] == before["allocate"]["seed"]
    assert set(leaf_keys(preset)) <= set(changed)


def test_unknown_key_is_an_error_naming_it(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    preset = tmp_path / "p.yaml"
    preset.write_text("allocate:\n  totl: 5\n")
    before = params.read_text()
    with pytest.raises(PresetError, match="allocate.totl"):
        apply_preset(preset, params)
    assert params.read_text() == before  # nothing written
