"""Allocation: apportionment arithmetic, the study's weakness rule, balance mode, stable plans."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from medicsynth.allocation import (
    AllocateConfig,
    AllocationError,
    all_combinations,
    allocate,
    apportion,
    combination_slug,
    f1_source_paths,
    image_seed,
    label_bonus,
    load_dev_f1,
    lowest_f1,
)
from medicsynth.labels import CLASSES, TASKS
from medicsynth.manifest import write_manifest
from tests.sections import section

REPO = Path(__file__).resolve().parents[1]

STUDY_BONUSES = [
    {"match": {"damage_severity": "mild", "disaster_types": ["hurricane", "flood", "landslide", "other_disaster"]}, "bonus": 32},
    {"match": {"humanitarian": "affected_injured_or_dead_people"}, "bonus": 28},
    {"match": {"humanitarian": "rescue_volunteering_or_donation_effort"}, "bonus": 20},
]


def rows(*combos_counts):
    """Train frame with ``n`` rows of each ``(combination, n)``."""
    out = []
    for combo, n in combos_counts:
        out += [dict(zip(TASKS, combo))] * n
    return pd.DataFrame(out, columns=list(TASKS))


def f1_all(value=0.9, **overrides):
    f1 = {t: {c: value for c in CLASSES[t]} for t in TASKS}
    for cls, v in overrides.items():
        for t in TASKS:
            if cls in f1[t]:
                f1[t][cls] = v
    return f1


A = ("little_or_none", "not_informative", "not_humanitarian", "not_disaster")
B = ("mild", "informative", "infrastructure_and_utility_damage", "flood")
C = ("severe", "informative", "affected_injured_or_dead_people", "earthquake")


# -- apportionment --------------------------------------------------------------------------


def test_apportion_hand_computed():
    # Quotas 10 * (1, 2, 7) / 10 are integers: both methods must return them.
    assert apportion([1, 2, 7], 10) == [1, 2, 7]
    assert apportion([1, 2, 7], 10, "largest_remainder") == [1, 2, 7]
    # Quotas 7 * (1, 1, 1) / 3 = 2.33 each: one leftover to the earliest (tie rule).
    assert apportion([1, 1, 1], 7, "largest_remainder") == [3, 2, 2]
    assert apportion([1, 1, 1], 7) == [3, 2, 2]
    # Quotas 5 * (10, 90) / 100 = (0.5, 4.5): Hamilton ties -> earliest gets the leftover;
    # Webster: priorities 10/0.5=20 vs 90/4.5=20 at the last seat, tie -> earliest too.
    assert apportion([10, 90], 5, "largest_remainder") == [1, 4]
    assert apportion([10, 90], 5) == [1, 4]
    # Quotas 4 * (30, 70) / 100 = (1.2, 2.8) -> (1, 3) by both.
    assert apportion([30, 70], 4) == [1, 3]
    assert apportion([30, 70], 4, "largest_remainder") == [1, 3]
    assert apportion([0, 5], 3) == [0, 3]
    assert apportion([3, 5], 0) == [0, 0]
    with pytest.raises(AllocationError):
        apportion([0, 0], 3)


def test_largest_remainder_shows_alabama_paradox_webster_does_not():
    # Classic example: weights (6, 6, 2). Hamilton gives (4, 4, 2) for 10 and (5, 5, 1) for 11,
    # so the third combination *loses* an image when the total grows.
    assert apportion([6, 6, 2], 10, "largest_remainder") == [4, 4, 2]
    assert apportion([6, 6, 2], 11, "largest_remainder") == [5, 5, 1]
    previous = apportion([6, 6, 2], 0)
    for total in range(1, 60):
        counts = apportion([6, 6, 2], total)
        assert sum(counts) == total
        assert all(c >= p for c, p in zip(counts, previous)), total
        previous = counts


def test_apportion_sum_exact_and_near_quota():
    weights = [10, 90, 130, 50, 170, 10, 58]
    for total in (1, 7, 100, 281, 9988):
        for method in ("webster", "largest_remainder"):
            counts = apportion(weights, total, method)
            assert sum(counts) == total
            quotas = [w * total / sum(weights) for w in weights]
            assert all(abs(c - q) < 1.0 + 1e-9 for c, q in zip(counts, quotas)), (method, total)


# -- weakness rule --------------------------------------------------------------------------


def test_label_bonus_takes_smallest_threshold_not_the_sum():
    pairs = ((0.40, 80), (0.60, 40), (0.75, 20))
    assert label_bonus(0.16, pairs) == 80
    assert label_bonus(0.399, pairs) == 80
    assert label_bonus(0.40, pairs) == 40  # strict "<"
    assert label_bonus(0.53, pairs) == 40
    assert label_bonus(0.69, pairs) == 20
    assert label_bonus(0.75, pairs) == 0
    assert label_bonus(0.90, pairs) == 0


def test_weakness_weights_and_rescale_hand_computed(tmp_path):
    # F1: mild 0.28 (+80), flood 0.55 (+40), affected 0.70 (+20), everything else 0.9 (+0).
    f1 = f1_all(mild=0.28, flood=0.55, affected_injured_or_dead_people=0.70)
    train = rows((A, 50), (B, 3), (C, 7))
    config = AllocateConfig.from_params(section("allocate", total=60, combination_bonuses=STUDY_BONUSES))
    result = allocate(train, config, f1)
    table = result.table.set_index("slug")
    # A: base 10. B: 10 + 80 (mild) + 40 (flood) + 32 (mild & flood) = 162.
    # C: 10 + 20 (affected F1) + 28 (affected rule) = 58.
    assert table.loc[combination_slug(A), "weight"] == 10
    assert table.loc[combination_slug(B), "weight"] == 162
    assert table.loc[combination_slug(C), "weight"] == 58
    # Quotas 60 * (10, 162, 58) / 230 = (2.61, 42.26, 15.13) -> (3, 42, 15).
    assert table.loc[combination_slug(A), "count"] == 3
    assert table.loc[combination_slug(B), "count"] == 42
    assert table.loc[combination_slug(C), "count"] == 15
    assert len(result.plan) == 60
    reason = table.loc[combination_slug(B), "reason"]
    assert "mild F1 0.28 +80" in reason and "flood F1 0.55 +40" in reason and "+32" in reason
    assert result.metrics["per_class"]["damage_severity"]["mild"] == {
        "real": 3,
        "planned": 42,
        "share_before": round(3 / 60, 4),
        "share_after": round(45 / 120, 4),
    }


def test_weakness_reproduces_study_structure_on_medic_like_data():
    # MEDIC-like marginals, the study's weakest-class F1s and hand bonuses, 9,988 images.
    import numpy as np

    rng = np.random.default_rng(0)
    shares = {
        "damage_severity": [0.57, 0.11, 0.32],
        "informative": [0.56, 0.44],
        "humanitarian": [0.037, 0.40, 0.48, 0.085],
        "disaster_types": [0.17, 0.047, 0.105, 0.10, 0.031, 0.51, 0.044],
    }
    train = pd.DataFrame(
        {t: rng.choice(CLASSES[t], size=3000, p=np.array(s) / sum(s)) for t, s in shares.items()}
    )
    f1 = f1_all(
        other_disaster=0.16, mild=0.28, affected_injured_or_dead_people=0.48,
        rescue_volunteering_or_donation_effort=0.53, hurricane=0.68, landslide=0.69,
    )
    config = AllocateConfig.from_params(section("allocate", total=9988, combination_bonuses=STUDY_BONUSES))
    result = allocate(train, config, f1)
    planned = {t: {c: v["planned"] for c, v in result.metrics["per_class"][t].items()} for t in TASKS}
    assert result.metrics["total"] == 9988
    # Only seen combinations are candidates.
    seen = set(map(tuple, train[list(TASKS)].drop_duplicates().to_numpy()))
    assert set(map(tuple, result.plan[list(TASKS)].drop_duplicates().to_numpy())) <= seen
    assert result.metrics["combinations_candidate"] == len(seen) < 168
    # The study's outcome: the weak classes dominate the plan (mild about half of it; rescue,
    # affected and other_disaster the next largest shares of their tasks).
    assert 0.40 < planned["damage_severity"]["mild"] / 9988 < 0.65
    hum = planned["humanitarian"]
    assert min(hum["rescue_volunteering_or_donation_effort"], hum["affected_injured_or_dead_people"]) > max(
        hum["not_humanitarian"], hum["infrastructure_and_utility_damage"]
    )
    assert max(planned["disaster_types"], key=planned["disaster_types"].get) == "other_disaster"


def test_unseen_combinations_dropped_unless_included():
    f1 = f1_all(landslide=0.2)
    train = rows((A, 5), (B, 5))
    seen_only = allocate(train, AllocateConfig.from_params(section("allocate", total=100)), f1)
    assert len(seen_only.table) == 2
    assert set(seen_only.plan["disaster_types"]) <= {"not_disaster", "flood"}
    everything = allocate(train, AllocateConfig.from_params(section("allocate", total=1000, include_unseen=True)), f1)
    assert len(everything.table) == 168 == len(all_combinations())
    assert (everything.plan["disaster_types"] == "landslide").sum() > 0
    assert everything.metrics["combinations_seen"] == 2


def test_dev_report_validation(tmp_path):
    report = {"tasks": {t: {"per_class": {c: {"f1": 0.5, "support": 3} for c in CLASSES[t]}} for t in TASKS}}
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(report))
    assert load_dev_f1(path)["humanitarian"]["not_humanitarian"] == 0.5
    report["tasks"]["damage_severity"]["per_class"]["mild"]["f1"] = 28.0  # percent by mistake
    path.write_text(json.dumps(report))
    with pytest.raises(AllocationError, match=r"dev\.json.*damage_severity.*mild.*percentage"):
        load_dev_f1(path)
    del report["tasks"]["damage_severity"]["per_class"]["mild"]
    path.write_text(json.dumps(report))
    with pytest.raises(AllocationError, match=r"mild\.f1 = None"):
        load_dev_f1(path)


def test_bad_params_named():
    with pytest.raises(AllocationError, match="f1_thresholds"):
        AllocateConfig.from_params(section("allocate", f1_thresholds=[40, 60, 75]))
    with pytest.raises(AllocationError, match=r"combination_bonuses\[0\].*mildd"):
        AllocateConfig.from_params(section("allocate", combination_bonuses=[{"match": {"damage_severity": "mildd"}, "bonus": 3}]))
    with pytest.raises(AllocationError, match="allocate.mode"):
        AllocateConfig.from_params(section("allocate", mode="uniform"))


# -- balance mode ---------------------------------------------------------------------------


def test_balance_tops_up_minority_classes():
    D = ("little_or_none", "informative", "rescue_volunteering_or_donation_effort", "fire")
    train = rows((A, 80), (B, 10), (C, 6), (D, 4))
    config = AllocateConfig.from_params(section("allocate", mode="balance", total=60, balance_target_share=0.2))
    result = allocate(train, config)
    stats = result.metrics["per_class"]
    # Every class present in train and below 20% before is raised toward 20% (capped at 1/K).
    for task in TASKS:
        for cls, s in stats[task].items():
            if s["real"] and s["share_before"] < 0.2:
                assert s["share_after"] > s["share_before"], (task, cls)
    # The majority combination A (80% of train) gets nothing: it adds no minority class.
    assert result.table.set_index("slug").loc[combination_slug(A), "count"] == 0
    assert result.metrics["total"] == 60
    # 60 images cannot lift all of them to 0.2 * 160 = 32. B carries mild/infra/flood (10 real),
    # C severe/affected/earthquake (6), D rescue/fire (4): equal relative gaps need
    # 10 + b = 6 + c = 4 + d with b + c + d = 60, i.e. 26.7 images per class after.
    after = {cls: s["real"] + s["planned"] for t in TASKS for cls, s in stats[t].items()}
    for cls in ("mild", "infrastructure_and_utility_damage", "flood", "severe", "affected_injured_or_dead_people",
                "earthquake", "rescue_volunteering_or_donation_effort", "fire"):
        assert after[cls] in (26, 27), (cls, after[cls])
    # With enough budget every class that has combinations reaches its target share (capped
    # at 1/K per task).
    ample = allocate(train, AllocateConfig.from_params(section("allocate", mode="balance", total=200, balance_target_share=0.2)))
    for task in TASKS:
        for cls, s in ample.metrics["per_class"][task].items():
            if s["real"]:
                assert s["share_after"] >= min(0.2, 1 / len(CLASSES[task])) - 1 / 300, (task, cls)


def test_balance_spreads_a_class_over_its_combinations_by_real_frequency():
    # Two combinations carry "rescue", frequencies 30 and 10: images for rescue split ~3:1.
    R1 = ("little_or_none", "informative", "rescue_volunteering_or_donation_effort", "not_disaster")
    R2 = ("little_or_none", "not_informative", "rescue_volunteering_or_donation_effort", "not_disaster")
    train = rows((A, 960), (R1, 30), (R2, 10))
    target = {"humanitarian": 0.25, "damage_severity": 0.0, "informative": 0.0, "disaster_types": 0.0}
    config = AllocateConfig.from_params(section("allocate", mode="balance", total=200, balance_target_share=target))
    table = allocate(train, config).table.set_index("slug")
    n1, n2 = table.loc[combination_slug(R1), "count"], table.loc[combination_slug(R2), "count"]
    assert n1 + n2 == 200
    assert n1 == 150 and n2 == 50


# -- stable plan ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["weakness", "balance"])
def test_raising_total_only_adds_plan_rows(mode):
    f1 = f1_all(mild=0.3, flood=0.5, affected_injured_or_dead_people=0.7)
    train = rows((A, 40), (B, 7), (C, 3))
    small = allocate(train, AllocateConfig.from_params(section("allocate", mode=mode, total=100, combination_bonuses=STUDY_BONUSES)), f1).plan
    big = allocate(train, AllocateConfig.from_params(section("allocate", mode=mode, total=110, combination_bonuses=STUDY_BONUSES)), f1).plan
    assert len(big) == 110
    merged = small.merge(big, on="id", how="left", suffixes=("", "_big"), indicator=True)
    assert (merged["_merge"] == "both").all()
    for column in ("seed", *TASKS):
        assert (merged[column] == merged[f"{column}_big"]).all()
    assert big["id"].is_unique and big["seed"].between(0, 2**31 - 1).all()
    # ids are "<slug>-<k>" with k = 0..n-1 per combination.
    assert set(big["id"]) >= {f"{combination_slug(B)}-{k:05d}" for k in range(10)}


def test_seed_depends_on_id_and_salt_only():
    assert image_seed("mild-inf-rescue-flood-00003") == image_seed("mild-inf-rescue-flood-00003")
    assert image_seed("mild-inf-rescue-flood-00003") != image_seed("mild-inf-rescue-flood-00004")
    assert image_seed("mild-inf-rescue-flood-00003", 1) != image_seed("mild-inf-rescue-flood-00003", 0)


# -- stage ----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_stage_writes_declared_outputs(tmp_path):
    train = rows((A, 30), (B, 5), (C, 5))
    train.insert(0, "image_path", [f"data/demo/train/{i}.jpg" for i in range(len(train))])
    train["image_id"], train["event_name"] = "demo", "x"
    train["split"], train["source"], train["provenance"] = "train", "real", "demo"
    train["file"] = train["image_path"]
    write_manifest(train, tmp_path / "data/variants/relabelled/train.tsv")
    report = {"tasks": {t: {"per_class": {c: {"f1": 0.8} for c in CLASSES[t]}} for t in TASKS}}
    report["tasks"]["damage_severity"]["per_class"]["mild"]["f1"] = 0.3
    (tmp_path / "metrics/dev").mkdir(parents=True)
    (tmp_path / "metrics/dev/original-resnet50.json").write_text(json.dumps(report))
    # A second model's report: its lower F1 for 'earthquake' (combination C) counts.
    _report(tmp_path / "metrics/dev", "original-mobilenet_v2.json", {("disaster_types", "earthquake"): 0.1})
    allocate_params = section("allocate", total=50) | {
        "train_manifest": "data/variants/relabelled/train.tsv",
        "dev_report": "metrics/dev/original-resnet50.json",
        "f1_reports": ["metrics/dev/original-mobilenet_v2.json"],
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"allocate": allocate_params}))
    subprocess.run(
        [sys.executable, str(REPO / "stages/allocate.py")], cwd=tmp_path, check=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True,
    )
    plan = pd.read_csv(tmp_path / "data/allocation/plan.tsv", sep="\t")
    table = pd.read_csv(tmp_path / "data/allocation/allocation.tsv", sep="\t")
    metrics = json.loads((tmp_path / "metrics/allocate.json").read_text())
    assert len(plan) == 50 == table["count"].sum() == metrics["total"]
    assert list(plan.columns) == ["id", "seed", *TASKS]
    assert (tmp_path / "plots/allocate.png").stat().st_size > 10_000
    assert metrics["per_class"]["damage_severity"]["mild"]["planned"] > 20  # mild is a weak class (earthquake too)
    assert table.loc[table["disaster_types"] == "earthquake", "bonus_disaster_types"].tolist() == [80]
    assert metrics["f1_sources"] == ["metrics/dev/original-resnet50.json", "metrics/dev/original-mobilenet_v2.json"]


# -- the study's published allocation -------------------------------------------------------

STUDY = REPO / "tests/fixtures/study"


def study_allocate_params():
    """params.yaml's allocate section with presets/study.yaml's allocate keys applied."""
    import yaml

    base = yaml.safe_load((REPO / "params.yaml").read_text())["allocate"]
    preset = yaml.safe_load((REPO / "presets/study.yaml").read_text())["allocate"]
    assert set(preset) <= set(base), f"preset keys not in params.yaml: {set(preset) - set(base)}"
    return {**base, **preset}


def test_study_preset_reproduces_published_allocation_exactly():
    published = pd.read_csv(STUDY / "published_allocation.tsv", sep="\t")
    params = study_allocate_params()
    config = AllocateConfig.from_params(params)
    assert config.total == 9988 and config.rounding == "webster" and len(config.combination_bonuses) == 6
    # The published table lists the combinations seen in the study's training split.
    train = published[list(TASKS)].copy()
    f1 = lowest_f1([STUDY / "study_class_f1.tsv"])
    table = allocate(train, config, f1).table
    merged = published.merge(table, on=list(TASKS), how="outer", suffixes=("_study", ""), indicator=True)
    assert (merged["_merge"] == "both").all() and len(merged) == 101
    wrong_weight = merged[merged["weight_study"] != merged["weight"]]
    wrong_count = merged[merged["count_study"] != merged["count"]]
    assert wrong_weight.empty, wrong_weight[[*TASKS, "weight_study", "weight", "reason"]].to_string()
    assert wrong_count.empty, wrong_count[[*TASKS, "count_study", "count"]].to_string()
    assert table["count"].sum() == published["count"].sum() == 9988


def test_default_bonuses_do_not_reproduce_the_study():
    # The three default bonuses miss half the study's: many combinations land elsewhere.
    published = pd.read_csv(STUDY / "published_allocation.tsv", sep="\t")
    import yaml

    params = {**yaml.safe_load((REPO / "params.yaml").read_text())["allocate"], "total": 9988}
    table = allocate(published[list(TASKS)].copy(), AllocateConfig.from_params(params),
                     lowest_f1([STUDY / "study_class_f1.tsv"])).table
    merged = published.merge(table, on=list(TASKS), suffixes=("_study", ""))
    assert (merged["count_study"] != merged["count"]).sum() > 30


def _report(tmp_path, name, overrides, split=None):
    report = {"tasks": {t: {"per_class": {c: {"f1": 0.9} for c in CLASSES[t]}} for t in TASKS}}
    for (task, cls), v in overrides.items():
        report["tasks"][task]["per_class"][cls]["f1"] = v
    if split:
        report = {split: report}
    path = tmp_path / name
    path.write_text(json.dumps(report))
    return path


def test_lowest_f1_over_reports_and_tables(tmp_path):
    a = _report(tmp_path, "a.json", {("damage_severity", "mild"): 0.3, ("humanitarian", "not_humanitarian"): 0.8})
    b = _report(tmp_path, "b.json", {("damage_severity", "mild"): 0.5, ("humanitarian", "not_humanitarian"): 0.7},
                split="test")  # a test report nests its tasks under the split
    tsv = tmp_path / "f1.tsv"
    tsv.write_text("task\tclass\tf1\n" + "".join(
        f"{t}\t{c}\t{0.2 if c == 'fire' else 0.95}\n" for t in TASKS for c in CLASSES[t]))
    f1 = lowest_f1([a, b, tsv])
    assert f1["damage_severity"]["mild"] == 0.3
    assert f1["humanitarian"]["not_humanitarian"] == 0.7
    assert f1["disaster_types"]["fire"] == 0.2
    assert f1["informative"]["informative"] == 0.9
    assert lowest_f1([b])["damage_severity"]["mild"] == 0.5


def test_f1_sources_errors_name_file_and_key(tmp_path):
    tsv = tmp_path / "f1.tsv"
    tsv.write_text("task\tclass\tf1\ndamage_severity\tmild\t28.4\n")
    with pytest.raises(AllocationError, match=r"f1\.tsv: line 2: f1 = 28\.4 not in \[0, 1\]"):
        lowest_f1([tsv])
    tsv.write_text("task\tclass\tf1\ndamage_severity\tmild\t0.3\n")
    with pytest.raises(AllocationError, match="no F1 row for damage_severity class"):
        lowest_f1([tsv])
    with pytest.raises(AllocationError, match="missing.json: F1 source not found"):
        lowest_f1([tmp_path / "missing.json"])
    with pytest.raises(AllocationError, match="allocate.f1_reports"):
        f1_source_paths({"dev_report": "a.json", "f1_reports": "b.json"})
    with pytest.raises(AllocationError, match="allocate.dev_report"):
        f1_source_paths({"dev_report": ["a.json", "b.json"]})
    assert f1_source_paths({"dev_report": "a.json", "f1_reports": ["b.json", "a.json"]}) == ["a.json", "b.json"]


def test_dev_report_directory_counts_every_report_in_it(tmp_path):
    from medicsynth.allocation import AllocationError, f1_source_paths

    d = tmp_path / "metrics/dev/original-s0"
    d.mkdir(parents=True)
    with pytest.raises(AllocationError, match="without \\*.json reports"):
        f1_source_paths({"dev_report": str(d), "f1_reports": []})
    for arch in ("resnet50", "mobilenet_v2"):
        (d / f"{arch}.json").write_text("{}")
    extra = str(tmp_path / "study_class_f1.tsv")
    assert f1_source_paths({"dev_report": str(d), "f1_reports": [extra]}) == [
        str(d / "mobilenet_v2.json"), str(d / "resnet50.json"), extra]  # sorted by name, then the extras
