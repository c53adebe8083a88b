"""Relabelling as the study did (issue 11 item 2): the ensemble flag rule, the VLM voters'
request settings, and scoring on relabelled test labels.

- The ensemble rule on a hand-built prediction matrix (exact counts, flags and scores), and the
  per-architecture training it asks for (which images each model trains on and predicts).
- The voters through the real openai and anthropic SDKs against the loopback ``FakeLLMServer``:
  what each request body carries (temperature, image size) and what the metrics record as sent.
- evaluate/compare on relabelled test labels: the extra report and columns, and the outputs left
  exactly as before when test was not relabelled.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

import medicsynth.relabel as relabel
from medicsynth.compare import read_predictions, render_markdown, run_compare
from medicsynth.evaluation import EvaluateConfig, predictions_table, relabelled_labels, score_probs
from medicsynth.labels import CLASSES, TASKS
from medicsynth.manifest import label_matrix, read_manifest
from medicsynth.metrics import classification_report, task_report
from medicsynth.models import build_classifier, save_classifier
from medicsynth.relabel import (
    disagreement_counts,
    ensemble_probs,
    flag_ensemble,
    fold_model_config,
    mean_probs,
    out_of_fold_probs,
    vlm_votes,
    voter_settings,
)
from tests.api_server import FakeLLMServer, answer
from tests.test_relabel import Voters, prepared, read_outputs, run_stage, stage_env, workdir  # noqa: F401 - prepared is a fixture

REPO = Path(__file__).resolve().parents[1]
N_TASKS = len(TASKS)

# ------------------------------------------------------------------------------------------
# The ensemble flag rule
# ------------------------------------------------------------------------------------------


def _onehot_probs(pred: np.ndarray, n_classes: int, top: float = 0.7) -> np.ndarray:
    """(n, C) probabilities with ``top`` on the predicted class, the rest shared equally."""
    p = np.full((len(pred), n_classes), (1 - top) / (n_classes - 1), dtype=np.float32)
    p[np.arange(len(pred)), pred] = top
    return p


def _arch_probs(disagree: dict[int, list[int]], n: int) -> dict[str, np.ndarray]:
    """One architecture's probabilities: the label is class 0 everywhere; on ``disagree[i]``'s
    task indices image ``i`` is predicted class 1."""
    preds = {t: np.zeros(n, dtype=int) for t in TASKS}
    for i, tasks in disagree.items():
        for j in tasks:
            preds[TASKS[j]][i] = 1
    return {t: _onehot_probs(preds[t], len(CLASSES[t])) for t in TASKS}


# 6 images, all labels class 0; disagreements per architecture as {image: [task indices]}.
LABELS = np.zeros((6, N_TASKS), dtype=np.int64)
ENSEMBLE = {
    "resnet50": _arch_probs({1: [0], 2: [0], 3: [0, 1, 2, 3], 4: [0]}, 6),
    "efficientnet_b1": _arch_probs({2: [0], 4: [1]}, 6),
    "mobilenet_v2": _arch_probs({4: [3], 5: [2]}, 6),
}
# image: 0 none; 1 one model one task; 2 two models same task; 3 one model all four tasks;
# 4 three models one task each; 5 another model once.
EXPECTED_COUNTS = [0, 1, 2, 4, 3, 1]


def test_disagreements_are_counted_over_archs_times_tasks():
    preds = [{t: p[t].argmax(1) for t in TASKS} for p in ENSEMBLE.values()]
    assert disagreement_counts(LABELS, preds).tolist() == EXPECTED_COUNTS


@pytest.mark.parametrize("threshold, flagged", [
    (1, [False, True, True, True, True, True]),
    (2, [False, False, True, True, True, False]),  # the study's threshold
    (3, [False, False, False, True, True, False]),
    (5, [False] * 6),
])
def test_flag_ensemble_flags_exactly_the_images_at_the_threshold(threshold, flagged):
    flags, scores, counts = flag_ensemble(LABELS, ENSEMBLE, threshold)
    assert counts.tolist() == EXPECTED_COUNTS
    assert flags.shape == (6, N_TASKS)
    # every task of a flagged image goes to the voters (the study asked for all four labels)
    assert flags.tolist() == [[f] * N_TASKS for f in flagged]


def test_flag_ensemble_scores_are_the_mean_probability_of_the_given_label():
    _, scores, _ = flag_ensemble(LABELS, ENSEMBLE, 2)
    # per (image, task): 0.7 from each arch predicting the label, (1-0.7)/(C-1) from each that does not
    for j, t in enumerate(TASKS):
        other = 0.3 / (len(CLASSES[t]) - 1)
        for i in range(6):
            n_dis = sum(int(p[t][i].argmax() != 0) for p in ENSEMBLE.values())
            assert scores[i, j] == pytest.approx(((3 - n_dis) * 0.7 + n_dis * other) / 3, abs=1e-6)
    assert np.allclose(mean_probs(ENSEMBLE)["damage_severity"].sum(1), 1.0)


def test_one_arch_ensemble_is_the_single_model_disagreement_rule():
    one = {"small_cnn": ENSEMBLE["resnet50"]}
    flags, _, _ = flag_ensemble(LABELS, one, 2)
    single, _ = relabel.flag_labels(LABELS, one["small_cnn"], "disagreement", 2)
    assert (flags == single).all()


def test_flag_ensemble_and_flag_labels_refuse_bad_input():
    with pytest.raises(ValueError, match="at least one architecture"):
        flag_ensemble(LABELS, {}, 2)
    with pytest.raises(ValueError, match="ensemble_probs"):
        relabel.flag_labels(LABELS, ENSEMBLE["resnet50"], "ensemble", 2)
    with pytest.raises(ValueError, match="confident_learning, disagreement or ensemble"):
        relabel.flag_labels(LABELS, ENSEMBLE["resnet50"], "vote", 2)


# ------------------------------------------------------------------------------------------
# Per-architecture predictions
# ------------------------------------------------------------------------------------------

TINY = fold_model_config({**yaml.safe_load((REPO / "params.yaml").read_text())["relabel"]["model"],
                          "arch": "small_cnn", "epochs": 1, "resize": 32, "crop": 28, "batch_size": 8,
                          "num_workers": 0, "device": "cpu", "cpu_threads": 1, "seed": 0})


@pytest.fixture
def pool_files(tmp_path):
    """12 small JPEGs (the fold key hashes their bytes) and their labels (two strata of 6)."""
    files = []
    for i in range(12):
        path = tmp_path / f"img{i}.jpg"
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(path)
        files.append(str(path))
    labels = np.zeros((12, N_TASKS), dtype=np.int64)
    labels[6:, TASKS.index("disaster_types")] = 1
    return files, labels


@pytest.fixture
def recorded(monkeypatch):
    """Replace the (expensive) training with a recorder: which arch trained on which files."""
    calls: list[dict] = []

    class Result:
        def __init__(self, model):
            self.model = model

    def fake_train(train_files, labels, dev_files, dev_labels, config, progress=True):
        calls.append({"arch": config.arch, "seed": config.seed, "fit": list(train_files)})
        return Result(len(calls) - 1)

    def fake_predict(model, meta, files, **kwargs):
        calls[model]["predicted"] = list(files)
        # class 1 on disaster_types for every image: deterministic, per-arch distinguishable
        return {t: _onehot_probs(np.full(len(files), 1 if calls[model]["arch"] == "mobilenet_v2" else 0),
                                 len(CLASSES[t])) for t in TASKS}

    monkeypatch.setattr(relabel, "train_classifier", fake_train)
    monkeypatch.setattr(relabel, "predict_files", fake_predict)
    return calls


def test_ensemble_out_of_fold_trains_k_models_per_arch_and_predicts_each_image_unseen(pool_files, recorded):
    files, labels = pool_files
    out = ensemble_probs(files, labels, TINY, ["small_cnn", "mobilenet_v2"], predictions="out_of_fold", k=2,
                         cache_dir=None, progress=False)
    assert list(out) == ["small_cnn", "mobilenet_v2"]
    assert [c["arch"] for c in recorded] == ["small_cnn", "small_cnn", "mobilenet_v2", "mobilenet_v2"]
    for arch in ("small_cnn", "mobilenet_v2"):
        mine = [c for c in recorded if c["arch"] == arch]
        assert sorted(sum((c["predicted"] for c in mine), [])) == sorted(files)  # each image once
        assert all(not set(c["fit"]) & set(c["predicted"]) for c in mine)       # by a model that never saw it
    assert (out["mobilenet_v2"]["damage_severity"].argmax(1) == 1).all()
    assert (out["small_cnn"]["damage_severity"].argmax(1) == 0).all()


def test_ensemble_in_sample_trains_one_model_per_arch_on_every_image(pool_files, recorded):
    files, labels = pool_files
    ensemble_probs(files, labels, TINY, ["resnet18", "small_cnn"], predictions="in_sample", k=2, cache_dir=None,
                   progress=False)
    assert [(c["arch"], sorted(c["fit"]), sorted(c["predicted"])) for c in recorded] == [
        ("resnet18", sorted(files), sorted(files)), ("small_cnn", sorted(files), sorted(files))]


def test_ensemble_reuses_the_single_model_folds_of_the_same_arch(pool_files, recorded, tmp_path):
    files, labels = pool_files
    out_of_fold_probs(files, labels, TINY, k=2, seed=TINY.seed, cache_dir=tmp_path / "cache", progress=False)
    assert len(recorded) == 2
    ensemble_probs(files, labels, TINY, ["small_cnn", "mobilenet_v2"], predictions="out_of_fold", k=2,
                   cache_dir=tmp_path / "cache", progress=False)
    assert [c["arch"] for c in recorded[2:]] == ["mobilenet_v2", "mobilenet_v2"]  # small_cnn from the cache


@pytest.mark.parametrize("archs, predictions, match", [
    ([], "out_of_fold", "at least one architecture"),
    (["small_cnn", "vgg16"], "out_of_fold", "ensemble_archs"),
    (["small_cnn", "small_cnn"], "out_of_fold", "distinct"),
    (["small_cnn"], "in_fold", "ensemble_predictions"),
])
def test_ensemble_probs_refuses_bad_params(pool_files, archs, predictions, match):
    files, labels = pool_files
    with pytest.raises(ValueError, match=match):
        ensemble_probs(files, labels, TINY, archs, predictions=predictions, k=2, cache_dir=None)


# ------------------------------------------------------------------------------------------
# Voters: what the requests carry, through the real SDKs
# ------------------------------------------------------------------------------------------


def test_the_installed_anthropic_sdk_takes_no_temperature():
    """Why the anthropic voter sends none: the SDK (2.x, API version 2026-10-21) removed sampling
    parameters. If this fails, the SDK takes a temperature again: send it (medicsynth/llm/providers.py)."""
    import anthropic
    from anthropic.resources.messages import Messages

    assert "temperature" not in inspect.signature(Messages.create).parameters
    assert anthropic._constants.ANTHROPIC_API_VERSION == "2026-10-21"


@pytest.fixture
def images(tmp_path):
    big, small = tmp_path / "big.jpg", tmp_path / "small.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (600, 1000, 3), dtype=np.uint8)).save(big, quality=90)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(small, quality=90)
    return [str(big), str(small)]


def _voter_cfg(server: FakeLLMServer, provider: str, **over) -> dict:
    base = server.openai_base_url if provider == "openai" else server.anthropic_base_url
    return {"model": "gpt-4o-2024-08-06" if provider == "openai" else "claude-3-7-sonnet-20250219",
            "base_url": base, "temperature": 0.0, "max_tokens": 300, "concurrency": 1, "max_retries": 0,
            "timeout_s": 30, **over}


def _labels_answer(req):
    return answer({t: CLASSES[t][1] for t in TASKS})


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_voter_requests_carry_the_pinned_model_the_temperature_and_full_size_images(
        provider, images, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the classification prompts are read from the working directory
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-voter")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-voter")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with FakeLLMServer(_labels_answer) as server:
        cfg = _voter_cfg(server, provider, image_max_side=None)  # null: full-size images
        votes, answers, usage = vlm_votes(provider, cfg, str(tmp_path / "cache"), images, np.array([0, 1]), 2)
        requests = list(server.requests)
    assert answers == {0: "ok", 1: "ok"}
    assert (votes == 1).all()
    assert len(requests) == 2 and {r.provider for r in requests} == {provider}
    assert {r.model for r in requests} == {cfg["model"]}
    sent = voter_settings(provider, cfg)
    if provider == "openai":
        assert [r.body["temperature"] for r in requests] == [0.0, 0.0]
        assert sent["temperature_sent"] == 0.0
    else:
        # anthropic 2.x: API version 2026-10-21 answers 400 to any temperature, and the SDK has no
        # such argument: nothing is sent, and the metrics say so.
        assert all("temperature" not in r.body for r in requests)
        assert {r.headers.get("anthropic-version") for r in requests} == {"2026-10-21"}
        assert sent["temperature_sent"] is None and sent["temperature_requested"] == 0.0
    assert sent["model"] == cfg["model"] and sent["image_max_side"] == "full"
    # full size: the file's own bytes were sent, the 1000x600 one too
    file_sha = {hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in images}
    assert {r.image_sha256s[0] for r in requests} == file_sha


def test_voter_downscales_larger_images_when_a_side_is_set(images, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-voter")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with FakeLLMServer(_labels_answer) as server:
        cfg = _voter_cfg(server, "openai", image_max_side=256)
        vlm_votes("openai", cfg, str(tmp_path / "cache"), images, np.array([0, 1]), 2)
        requests = list(server.requests)
    sent = {r.image_sha256s[0] for r in requests}
    big_sha, small_sha = (hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in images)
    assert small_sha in sent and big_sha not in sent  # the 1000 px image went downscaled
    assert voter_settings("openai", cfg)["image_max_side"] == 256


# ------------------------------------------------------------------------------------------
# Relabelled test labels in evaluate and compare
# ------------------------------------------------------------------------------------------

CONFIG = EvaluateConfig(batch_size=8, loader="torch", ece_bins=5)


def _test_frame(n: int = 8) -> pd.DataFrame:
    rows = []
    for i in range(n):
        rows.append({"image_path": f"img{i}.jpg", "file": f"img{i}.jpg",
                     **{t: CLASSES[t][i % 2] for t in TASKS}})
    return pd.DataFrame(rows)


def _perfect_probs(df: pd.DataFrame) -> dict[str, np.ndarray]:
    labels = label_matrix(df)
    return {t: _onehot_probs(labels[:, j], len(CLASSES[t]), top=0.9) for j, t in enumerate(TASKS)}


def _relabelled(df: pd.DataFrame, changes: dict[int, str]) -> pd.DataFrame:
    """``df`` (shuffled, as another file would be) with damage_severity changed on rows ``changes``."""
    rel = df.copy()
    for i, label in changes.items():
        rel.loc[i, "damage_severity"] = label
    return rel.iloc[::-1].reset_index(drop=True)


def test_relabelled_labels_replace_only_the_labels_matched_by_image():
    test_df = _test_frame()
    rel = relabelled_labels(test_df, _relabelled(test_df, {0: "severe", 3: "severe"}))
    assert rel["image_path"].tolist() == test_df["image_path"].tolist()
    assert rel["damage_severity"].tolist() == ["severe", "mild", "little_or_none", "severe",
                                               "little_or_none", "mild", "little_or_none", "mild"]
    assert (rel[["informative", "humanitarian", "disaster_types"]] == test_df[
        ["informative", "humanitarian", "disaster_types"]]).all().all()
    assert test_df["damage_severity"].iloc[0] == "little_or_none"  # the original frame untouched
    with pytest.raises(ValueError, match=r"relabelled/test.tsv: .*1 missing.*'img7.jpg'"):
        relabelled_labels(test_df, test_df.iloc[:7], "relabelled/test.tsv")


def test_relabelled_scores_are_the_same_predictions_on_the_new_labels():
    test_df = _test_frame()
    probs = _perfect_probs(test_df)
    rel = relabelled_labels(test_df, _relabelled(test_df, {0: "severe", 3: "severe"}))
    original, relabelled = score_probs(probs, test_df, CONFIG), score_probs(probs, rel, CONFIG)
    assert original["tasks"]["damage_severity"]["accuracy"] == 1.0
    assert relabelled["tasks"]["damage_severity"]["accuracy"] == pytest.approx(6 / 8)
    assert relabelled["tasks"]["informative"] == original["tasks"]["informative"]
    labels = label_matrix(rel)
    expected = classification_report({t: labels[:, j] for j, t in enumerate(TASKS)},
                                     {t: probs[t].argmax(1) for t in TASKS}, probs, n_bins=5)
    assert relabelled["mean_macro_f1"] == expected["mean_macro_f1"]


def test_predictions_table_gains_relabelled_columns_only_when_test_was_relabelled():
    test_df = _test_frame()
    probs = _perfect_probs(test_df)
    plain = predictions_table(test_df, probs)
    assert not any(c.endswith("_true_relabelled") for c in plain.columns)
    rel = relabelled_labels(test_df, _relabelled(test_df, {0: "severe"}))
    table = predictions_table(test_df, probs, rel)
    assert table.drop(columns=[f"{t}_true_relabelled" for t in TASKS]).equals(plain)  # nothing else moves
    assert list(table.columns[1:4]) == ["damage_severity_true", "damage_severity_true_relabelled",
                                        "damage_severity_pred"]
    assert table["damage_severity_true"].iloc[0] == "little_or_none"
    assert table["damage_severity_true_relabelled"].iloc[0] == "severe"


def _write_runs(root: Path, relabelled: bool) -> None:
    test_df = _test_frame(12)
    rel = relabelled_labels(test_df, _relabelled(test_df, {0: "severe", 5: "severe"})) if relabelled else None
    rng = np.random.default_rng(1)
    for variant in ("original", "augmented"):
        for seed in (0, 1):
            probs = {t: rng.dirichlet(np.ones(len(CLASSES[t])), size=len(test_df)).astype(np.float32) for t in TASKS}
            out = root / f"{variant}-small_cnn-s{seed}"
            out.mkdir(parents=True)
            predictions_table(test_df, probs, rel).to_csv(out / "test.tsv", sep="\t", index=False)


def _compare(root: Path) -> dict:
    return run_compare(predictions_dir=root, variants=["original", "augmented"], arch="small_cnn", seeds=[0, 1],
                       train_manifest=None, out_json=root / "c.json", out_md=root / "c.md",
                       macro_plot=root / "m.png", per_class_plot=root / "p.png", diff_plot=root / "d.png",
                       n_boot=50, seed=0)


def test_compare_reports_original_and_relabelled_test_scores_apart(tmp_path):
    _write_runs(tmp_path / "plain", relabelled=False)
    _write_runs(tmp_path / "rel", relabelled=True)
    plain, rel = _compare(tmp_path / "plain"), _compare(tmp_path / "rel")
    assert "test_relabelled" not in plain
    assert "relabelled" not in (tmp_path / "plain/c.md").read_text()
    # the headline (original labels) is the same whether or not test was relabelled
    assert {k: v for k, v in rel.items() if k != "test_relabelled"} == plain
    section = rel["test_relabelled"]
    assert section["n_test_changed"] == 2 and section["skipped"] == {}
    assert section["variants"] == ["original", "augmented"]
    # its scores are those of the predictions on the relabelled columns
    preds = read_predictions(tmp_path / "rel/original-small_cnn-s0/test.tsv", "original", truth="true_relabelled")
    f1 = task_report(preds.y_true["damage_severity"], preds.y_pred["damage_severity"],
                     CLASSES["damage_severity"])["macro_f1"]
    assert section["tasks"]["damage_severity"]["macro_f1"]["original"]["per_seed"]["0"] == pytest.approx(f1)
    assert section["tasks"]["damage_severity"]["macro_f1"]["original"]["per_seed"]["0"] != pytest.approx(
        rel["tasks"]["damage_severity"]["macro_f1"]["original"]["per_seed"]["0"])
    md = (tmp_path / "rel/c.md").read_text()
    assert md.startswith((tmp_path / "plain/c.md").read_text())  # original first, unchanged
    assert "# On the relabelled test labels (not the headline)" in md
    assert "2 of 12 test images have a changed label" in md
    assert json.loads((tmp_path / "rel/c.json").read_text())["test_relabelled"]["n_test_changed"] == 2
    assert render_markdown(rel).count("\n## Verdicts") == 1 and render_markdown(rel).count("\n### Verdicts") == 1


def test_compare_skips_variants_evaluated_before_test_was_relabelled(tmp_path):
    _write_runs(tmp_path / "rel", relabelled=True)
    for seed in (0, 1):  # augmented's predictions from before: no relabelled columns
        path = tmp_path / f"rel/augmented-small_cnn-s{seed}/test.tsv"
        df = pd.read_csv(path, sep="\t", dtype=str)
        df.drop(columns=[f"{t}_true_relabelled" for t in TASKS]).to_csv(path, sep="\t", index=False)
    result = _compare(tmp_path / "rel")
    assert result["variants"] == ["original", "augmented"]
    assert result["test_relabelled"]["variants"] == ["original"]
    assert "augmented" in result["test_relabelled"]["skipped"]


# ------------------------------------------------------------------------------------------
# Stage: flag ensemble over every split, both VLM voters on the loopback server
# ------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_stage_ensemble_flags_all_splits_and_leaves_the_original_test_labels(prepared, tmp_path):
    root = tmp_path / "work"
    test_before = (prepared / "data/prepared/test.tsv").read_bytes()
    with FakeLLMServer(Voters(prepared)) as server:
        workdir(prepared, root, server, splits=["train", "dev", "test"], flag="ensemble",
                ensemble_archs=["small_cnn", "mobilenet_v2"], ensemble_predictions="out_of_fold",
                max_flagged=None)
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["relabel"]["openai"].update(temperature=0.0, image_max_side=None)
        params["relabel"]["anthropic"].update(temperature=0.0)
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        run_stage("relabel", root)
        requests = list(server.requests)
    out = read_outputs(root)
    m = out["metrics"]
    assert m["flag"] == "ensemble" and m["ensemble_archs"] == ["small_cnn", "mobilenet_v2"]
    hist = {int(k): v for k, v in m["disagreements_histogram"].items()}
    assert sum(hist.values()) == m["images"] == 60 + 20 + 10
    assert m["flagged_images"] == m["flagged_before_budget"] == sum(v for c, v in hist.items() if c >= 2)
    # every flagged image was asked about, all four labels, by both voters
    assert len(requests) >= 2 * m["flagged_images"]
    assert {r.provider for r in requests} == {"openai", "anthropic"}
    assert all(r.body["temperature"] == 0.0 for r in requests if r.provider == "openai")
    assert not any("temperature" in r.body for r in requests if r.provider == "anthropic")
    assert m["voter_settings"] == {
        "openai": {"model": "gpt-test", "temperature_requested": 0.0, "temperature_sent": 0.0,
                   "image_max_side": "full"},
        "anthropic": {"model": "claude-test", "temperature_requested": 0.0, "temperature_sent": None,
                      "image_max_side": 768}}
    # test relabelled into its own file, with provenance; the original test manifest untouched
    assert (root / "data/prepared/test.tsv").read_bytes() == test_before
    assert not (root / "data/variants/relabelled/test.tsv").exists()
    rel_test = read_manifest(root / "data/relabelled_test.tsv")
    orig_test = read_manifest(root / "data/prepared/test.tsv")
    assert rel_test["image_path"].tolist() == orig_test["image_path"].tolist()
    changed = (rel_test[list(TASKS)].to_numpy() != orig_test[list(TASKS)].to_numpy()).any(1)
    assert (rel_test["provenance"].str.endswith("+relabel") == changed).all()
    assert (out["changes"]["split"] == "test").any()  # test images were flagged and voted on
    test_changes = out["changes"][(out["changes"]["split"] == "test") & (out["changes"]["changed"] == "True")]
    assert len(test_changes) == int((rel_test[list(TASKS)].to_numpy() != orig_test[list(TASKS)].to_numpy()).sum())


@pytest.mark.e2e
def test_evaluate_stage_adds_relabelled_test_scores_and_keeps_the_original_ones(prepared, tmp_path):
    root = tmp_path / "work"
    shutil.copytree(prepared, root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"] = {"batch_size": 16, "loader": "torch", "ece_bins": 5}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    torch.manual_seed(0)
    save_classifier(build_classifier("small_cnn", pretrained=False, dropout=0.2), root / "models/original-small_cnn-s0/model.pt",
                    {"arch": "small_cnn", "resize": 32, "crop": 28, "dropout": 0.2})

    def evaluate() -> tuple[dict, pd.DataFrame]:
        proc = subprocess.run([sys.executable, str(REPO / "stages/evaluate.py"), "--variant", "original", "--arch",
                               "small_cnn", "--seed", "0"], cwd=root, env=stage_env(), capture_output=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        return (json.loads((root / "metrics/evaluate/original-small_cnn-s0.json").read_text()),
                pd.read_csv(root / "data/predictions/original-small_cnn-s0/test.tsv", sep="\t", dtype=str))

    plain_metrics, plain_preds = evaluate()
    assert set(plain_metrics) == {"test"}
    # relabel's header-only file (test not relabelled) changes nothing
    read_manifest(root / "data/prepared/test.tsv").iloc[:0].to_csv(root / "data/relabelled_test.tsv", sep="\t",
                                                                   index=False)
    assert evaluate()[0] == plain_metrics
    test_df = read_manifest(root / "data/prepared/test.tsv")
    rel = test_df.copy()
    preds0 = plain_preds["damage_severity_pred"].tolist()
    # relabel test so that the model is right on damage_severity everywhere: accuracy 1 on the new labels
    rel["damage_severity"] = preds0
    rel.loc[rel["damage_severity"] != test_df["damage_severity"], "provenance"] += "+relabel"
    rel.iloc[::-1].to_csv(root / "data/relabelled_test.tsv", sep="\t", index=False)
    test_bytes = (root / "data/prepared/test.tsv").read_bytes()

    metrics, preds = evaluate()
    assert metrics["test"] == plain_metrics["test"]  # the headline, on the original labels, unchanged
    assert metrics["test_relabelled"]["tasks"]["damage_severity"]["accuracy"] == 1.0
    assert metrics["test_relabelled"]["tasks"]["informative"] == plain_metrics["test"]["tasks"]["informative"]
    assert preds.drop(columns=[f"{t}_true_relabelled" for t in TASKS]).equals(plain_preds)
    assert preds["damage_severity_true_relabelled"].tolist() == preds0
    assert (root / "data/prepared/test.tsv").read_bytes() == test_bytes
