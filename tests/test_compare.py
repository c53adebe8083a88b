"""Variant comparison over training seeds on small synthetic prediction TSVs: JSON, Markdown, PNGs, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medicsynth.compare import (
    PredictionsError,
    minority_classes,
    read_predictions,
    run_compare,
    train_shares,
)
from medicsynth.io import read_json
from medicsynth.labels import CLASSES, TASKS
from medicsynth.manifest import COLUMNS, write_manifest
from medicsynth.metrics import task_report

REPO = Path(__file__).resolve().parents[1]
ARCH = "tiny"
N_TEST = 600

# Training shares per class (schema order). Minority (< 0.10): mild, affected, rescue, fire,
# landslide, other_disaster. hurricane sits exactly on 0.10 and is NOT minority (strict <).
TRAIN_SHARES = {
    "damage_severity": [0.60, 0.08, 0.32],
    "informative": [0.56, 0.44],
    "humanitarian": [0.04, 0.40, 0.48, 0.08],
    "disaster_types": [0.17, 0.05, 0.11, 0.10, 0.03, 0.50, 0.04],
}
MINORITY = {
    "damage_severity": ["mild"],
    "informative": [],
    "humanitarian": ["affected_injured_or_dead_people", "rescue_volunteering_or_donation_effort"],
    "disaster_types": ["fire", "landslide", "other_disaster"],
}


def write_train_manifest(path: Path, n: int = 1000) -> None:
    rng = np.random.default_rng(0)
    data = {
        "image_id": ["demo"] * n,
        "event_name": [f"e{i}" for i in range(n)],
        "image_path": [f"data/train/{i}.jpg" for i in range(n)],
        "split": ["train"] * n,
        "source": ["real"] * n,
        "provenance": ["demo"] * n,
        "file": [f"data/train/{i}.jpg" for i in range(n)],
    }
    for task in TASKS:
        counts = np.round(np.array(TRAIN_SHARES[task]) * n).astype(int)
        labels = np.repeat(np.array(CLASSES[task]), counts)
        data[task] = rng.permutation(labels).tolist()
    write_manifest(pd.DataFrame(data)[list(COLUMNS)], path)


def make_system(y: dict, accuracy: float, seed: int, fix: dict | None = None) -> dict:
    """Noisy predictions; classes in ``fix[task]`` are predicted perfectly (and never wrongly)."""
    rng = np.random.default_rng(seed)
    out = {}
    for task in TASKS:
        c = len(CLASSES[task])
        p = np.where(rng.random(N_TEST) < accuracy, y[task], rng.integers(0, c, N_TEST))
        for name in (fix or {}).get(task, []):
            k = CLASSES[task].index(name)
            p[y[task] == k] = k
            wrong = (p == k) & (y[task] != k)
            p[wrong] = y[task][wrong]
        out[task] = p
    return out


def write_predictions(path: Path, y: dict, pred: dict, with_probs: bool = False, order=None) -> None:
    order = np.arange(N_TEST) if order is None else order
    df = pd.DataFrame({"image_path": [f"data/test/{i}.jpg" for i in order]})
    for task in TASKS:
        df[f"{task}_true"] = [CLASSES[task][k] for k in y[task][order]]
        df[f"{task}_pred"] = [CLASSES[task][k] for k in pred[task][order]]
        if with_probs:
            c = len(CLASSES[task])
            probs = np.full((N_TEST, c), 0.3 / (c - 1))
            probs[np.arange(N_TEST), pred[task]] = 0.7
            for k, name in enumerate(CLASSES[task]):
                df[f"{task}_prob_{name}"] = probs[order, k].round(5)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, sep="\t", index=False)


SEEDS = (0, 1, 2)


def pred_path(root: Path, variant: str, seed: int) -> Path:
    return root / f"data/predictions/{variant}-{ARCH}-s{seed}/test.tsv"


@pytest.fixture
def project(tmp_path):
    """A tmp project dir with a train manifest and predictions of 3 variants × 3 seeds."""
    rng = np.random.default_rng(42)
    y = {t: rng.choice(len(CLASSES[t]), N_TEST, p=TRAIN_SHARES[t]) for t in TASKS}
    systems = {
        "original": [make_system(y, 0.6, seed=1 + s) for s in SEEDS],
        "augmented": [make_system(y, 0.6, seed=1 + s, fix=MINORITY) for s in SEEDS],
    }
    systems["relabelled"] = systems["original"]  # identical: its differences must be exactly 0
    write_train_manifest(tmp_path / "data/variants/original/train.tsv")
    for v, preds in systems.items():
        for s, pred in zip(SEEDS, preds):
            write_predictions(pred_path(tmp_path, v, s), y, pred, with_probs=v == "original")
    return {"root": tmp_path, "y": y, "systems": systems}


def compare(root: Path, variants=("original", "relabelled", "augmented"), seeds=SEEDS, **kw):
    return run_compare(
        predictions_dir=root / "data/predictions",
        variants=list(variants),
        arch=ARCH,
        seeds=list(seeds),
        train_manifest=root / "data/variants/original/train.tsv",
        out_json=root / "metrics/compare.json",
        out_md=root / "metrics/compare.md",
        macro_plot=root / "plots/compare_macro_f1.png",
        per_class_plot=root / "plots/compare_per_class_f1.png",
        diff_plot=root / "plots/compare_diff.png",
        n_boot=kw.pop("n_boot", 300),
        **kw,
    )


def test_minority_classes_from_train_shares(project):
    shares = train_shares(project["root"] / "data/variants/original/train.tsv")
    assert shares["disaster_types"]["hurricane"] == pytest.approx(0.10)
    assert minority_classes(shares, 0.10) == MINORITY
    assert minority_classes(shares, 0.05) == {
        "damage_severity": [], "informative": [],
        "humanitarian": ["affected_injured_or_dead_people"],
        "disaster_types": ["landslide", "other_disaster"],
    }


@pytest.mark.slow
def test_compare_end_to_end(project):
    root, y, systems = project["root"], project["y"], project["systems"]
    result = compare(root)

    saved = read_json(root / "metrics/compare.json")
    assert saved == json.loads(json.dumps(result))  # plain JSON, nothing lost
    assert saved["variants"] == ["original", "relabelled", "augmented"] and saved["seeds"] == list(SEEDS)
    assert saved["skipped"] == {} and saved["n_test"] == N_TEST and saved["arch"] == ARCH
    assert saved["tasks_compared"] == list(TASKS)
    assert "two-way bootstrap" in saved["method"]

    for task in TASKS:
        entry = saved["tasks"][task]
        for v in saved["variants"]:
            refs = [task_report(y[task], systems[v][s][task], CLASSES[task]) for s in SEEDS]
            per_seed = np.array([r["macro_f1"] for r in refs])
            m = entry["macro_f1"][v]
            assert [m["per_seed"][str(s)] for s in SEEDS] == pytest.approx(per_seed)
            assert m["mean"] == pytest.approx(per_seed.mean())
            assert m["sd"] == pytest.approx(per_seed.std(ddof=1))
            assert m["low"] <= m["mean"] <= m["high"]
            for c in CLASSES[task]:
                f1 = np.mean([r["per_class"][c]["f1"] for r in refs])
                assert entry["classes"][c]["f1"][v]["mean"] == pytest.approx(f1)
                assert entry["classes"][c]["support"] == refs[0]["per_class"][c]["support"]
        assert {c for c, i in entry["classes"].items() if i["minority"]} == set(MINORITY[task])
        # Identical predictions: zero difference with a degenerate interval, no evidence either way.
        same = entry["diff"]["relabelled-original"]
        assert (same["macro_f1"]["diff"], same["macro_f1"]["low"], same["macro_f1"]["high"]) == (0, 0, 0)
        assert {d["verdict"] for d in same["per_class_f1"].values()} == {"no evidence"}
        assert set(entry["ece"]) == {"original"}  # ECE only where every seed gave probabilities

    # Augmented fixes the minority classes on every seed: "better" exactly there.
    for task, fixed in MINORITY.items():
        diff = saved["tasks"][task]["diff"]["augmented-original"]
        for c in fixed:
            d = diff["per_class_f1"][c]
            assert d["verdict"] == "better" and d["low"] > 0, (task, c, d)
            assert d["diff"] == pytest.approx(1.0 - saved["tasks"][task]["classes"][c]["f1"]["original"]["mean"])
            assert saved["verdicts"]["augmented-original"]["minority_classes"][f"{task}/{c}"] == "better"
        if fixed:
            assert diff["macro_f1"]["verdict"] == "better"
    assert saved["verdicts"]["relabelled-original"] == {
        "mean_macro_f1": "no evidence", "tasks": dict.fromkeys(TASKS, "no evidence"),
        "minority_classes": {f"{t}/{c}": "no evidence" for t in TASKS for c in MINORITY[t]}}
    assert saved["mean_macro_f1_diff"]["augmented-original"]["verdict"] == "better"
    mean = np.mean([saved["tasks"][t]["macro_f1"]["augmented"]["mean"] for t in TASKS])
    assert saved["mean_macro_f1"]["augmented"]["mean"] == pytest.approx(mean)

    md = (root / "metrics/compare.md").read_text()
    assert "two-way bootstrap" in md and "seeds 0, 1, 2" in md
    assert "| difference | mean over tasks | damage_severity | informative | humanitarian | disaster_types |" in md
    assert "## Verdicts" in md and "## Minority classes (F1)" in md
    verdicts = md.split("## Verdicts")[1].split("##")[0]
    assert "| ★ disaster_types/landslide F1 | no evidence | better |" in verdicts
    for task in TASKS:
        assert f"## {task}" in md
        for c in CLASSES[task]:
            marked = f"| **★ {c}** |" in md
            assert marked == (c in MINORITY[task]), c
            assert f"| {c} |" in md or marked
    landslide = next(line for line in md.splitlines() if line.startswith("| **★ landslide**"))
    assert "3.0%" in landslide and "better" in landslide  # train share, verdict
    assert "ECE (mean over seeds): original" in md

    for name in ("compare_macro_f1.png", "compare_per_class_f1.png", "compare_diff.png"):
        with Image.open(root / "plots" / name) as im:
            assert im.format == "PNG" and im.width > 400 and im.height > 300


def test_intervals_include_seed_variance(project):
    # A variant equal to original on seeds 0 and 1 and perfect on seed 2: its mean gain is
    # large, but a third of the seed draws miss seed 2, so the interval reaches 0 and the verdict
    # stays "no evidence". An interval over test images only would exclude 0.
    root, y, systems = project["root"], project["y"], project["systems"]
    for s, pred in zip(SEEDS, [*systems["original"][:2], dict(y)]):
        write_predictions(pred_path(root, "lucky", s), y, pred)
    result = compare(root, variants=("original", "lucky"), n_boot=400)
    d = result["mean_macro_f1_diff"]["lucky-original"]
    assert d["diff"] > 0.1
    assert d["low"] == pytest.approx(0.0, abs=1e-12) and d["verdict"] == "no evidence"
    single = compare(root, variants=("original", "lucky"), seeds=(2,), n_boot=400)
    assert single["mean_macro_f1_diff"]["lucky-original"]["verdict"] == "better"


def test_adding_a_variant_leaves_the_others_unchanged(project):
    root = project["root"]
    two = compare(root, variants=("original", "augmented"), n_boot=100)
    three = compare(root, variants=("original", "relabelled", "augmented"), n_boot=100)
    assert three["mean_macro_f1"]["augmented"] == two["mean_macro_f1"]["augmented"]
    assert three["mean_macro_f1_diff"]["augmented-original"] == two["mean_macro_f1_diff"]["augmented-original"]
    for t in TASKS:
        assert three["tasks"][t]["diff"]["augmented-original"] == two["tasks"][t]["diff"]["augmented-original"]


def test_variant_missing_a_seed_is_skipped_with_a_note(project):
    root = project["root"]
    pred_path(root, "augmented", 1).unlink()
    result = compare(root)
    assert result["variants"] == ["original", "relabelled"]
    assert set(result["skipped"]) == {"augmented"} and "augmented-small" not in result["skipped"]["augmented"]
    assert str(pred_path(root, "augmented", 1)) in result["skipped"]["augmented"]
    assert "augmented-original" not in result["tasks"]["humanitarian"]["diff"]
    md = (root / "metrics/compare.md").read_text()
    assert "Variant **augmented** skipped: no predictions at" in md
    assert "augmented" not in md.split("## Macro-F1 per task")[1]


def test_original_is_required(project):
    root = project["root"]
    pred_path(root, "original", 2).unlink()
    with pytest.raises(FileNotFoundError, match="baseline variant 'original' are required"):
        compare(root)


@pytest.mark.slow
def test_rows_are_matched_by_image_path(project):
    root, y, systems = project["root"], project["y"], project["systems"]
    first = compare(root, n_boot=100)
    shuffled = np.random.default_rng(0).permutation(N_TEST)
    write_predictions(pred_path(root, "augmented", 1), y, systems["augmented"][1], order=shuffled)
    assert compare(root, n_boot=100)["tasks"] == first["tasks"]


@pytest.mark.slow
def test_bootstrap_is_deterministic_by_seed(project):
    root = project["root"]
    a = compare(root, n_boot=100, seed=3)
    assert compare(root, n_boot=100, seed=3) == a
    assert compare(root, n_boot=100, seed=4)["tasks"] != a["tasks"]


def test_variant_with_other_test_labels_is_rejected(project):
    root = project["root"]
    path = pred_path(root, "relabelled", 2)
    df = pd.read_csv(path, sep="\t", dtype=str)
    df.loc[5, "humanitarian_true"] = next(
        c for c in CLASSES["humanitarian"] if c != df.loc[5, "humanitarian_true"]
    )
    df.to_csv(path, sep="\t", index=False)
    with pytest.raises(PredictionsError, match=r"humanitarian_true differs .* on 1 image\(s\), e.g. 'data/test/5.jpg'"):
        compare(root)


def test_variant_on_other_images_is_rejected(project):
    root = project["root"]
    path = pred_path(root, "augmented", 0)
    df = pd.read_csv(path, sep="\t", dtype=str)
    df.iloc[:-1].to_csv(path, sep="\t", index=False)
    with pytest.raises(PredictionsError, match="1 missing, 0 extra"):
        compare(root)


def test_bad_prediction_files_name_file_row_and_value(tmp_path, project):
    src = pred_path(project["root"], "original", 0)
    df = pd.read_csv(src, sep="\t", dtype=str)
    bad = df.copy()
    bad.loc[4, "damage_severity_pred"] = "moderate"
    bad.to_csv(tmp_path / "a.tsv", sep="\t", index=False)
    with pytest.raises(PredictionsError, match=r"a.tsv: row 6: column damage_severity_pred: .*'moderate'"):
        read_predictions(tmp_path / "a.tsv", "original")
    bad = df.copy()
    bad.loc[2, "image_path"] = bad.loc[1, "image_path"]
    bad.to_csv(tmp_path / "b.tsv", sep="\t", index=False)
    with pytest.raises(PredictionsError, match="b.tsv: row 4: duplicate image_path"):
        read_predictions(tmp_path / "b.tsv", "original")
    df.drop(columns=["informative_pred"]).to_csv(tmp_path / "c.tsv", sep="\t", index=False)
    with pytest.raises(PredictionsError, match="c.tsv: has informative labels but no column informative_pred"):
        read_predictions(tmp_path / "c.tsv", "original")
    df.drop(columns=["informative_prob_informative"]).to_csv(tmp_path / "d.tsv", sep="\t", index=False)
    with pytest.raises(PredictionsError, match="incomplete probabilities for informative"):
        read_predictions(tmp_path / "d.tsv", "original")
    bad = df.copy()
    bad.loc[0, "disaster_types_prob_fire"] = "abc"
    bad.to_csv(tmp_path / "e.tsv", sep="\t", index=False)
    with pytest.raises(PredictionsError, match="e.tsv: row 2: column disaster_types_prob_fire: 'abc'"):
        read_predictions(tmp_path / "e.tsv", "original")
    # Case and whitespace are normalised like everywhere else in the project.
    ok = df.copy()
    ok.loc[0, "damage_severity_true"] = " Severe "
    ok.to_csv(tmp_path / "f.tsv", sep="\t", index=False)
    assert read_predictions(tmp_path / "f.tsv", "original").y_true["damage_severity"][0] == 2


@pytest.mark.e2e
def test_stage_script_runs_from_params(project):
    root = project["root"]
    (root / "params.yaml").write_text(
        "variants: [original, relabelled, augmented, ghost]\n"
        f"train:\n  archs: [{ARCH}]\n  seeds: [0, 1, 2]\n"
        "compare:\n  variants: null\n  arch: null\n  seeds: null\n  n_boot: 200\n  seed: 0\n"
        "  minority_share: 0.05\n  ci: 0.9\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "stages/compare.py")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipped ghost" in proc.stdout and "augmented-original" in proc.stdout
    result = read_json(root / "metrics/compare.json")
    assert result["ci"] == 0.9 and result["n_boot"] == 200 and result["minority_share"] == 0.05
    assert result["skipped"] == {"ghost": "no predictions at " + ", ".join(
        f"data/predictions/ghost-{ARCH}-s{s}/test.tsv" for s in SEEDS)}
    assert result["seeds"] == list(SEEDS)
    assert not result["tasks"]["damage_severity"]["classes"]["mild"]["minority"]  # 8% >= 5%
    assert result["tasks"]["disaster_types"]["classes"]["landslide"]["minority"]
    for name in ("metrics/compare.md", "plots/compare_macro_f1.png", "plots/compare_per_class_f1.png",
                 "plots/compare_diff.png"):
        assert (root / name).stat().st_size > 0
