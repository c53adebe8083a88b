"""Relabelling: the pure functions of medicsynth.relabel, then stages/relabel.py end to end.

The stage tests run the real stage script in a subprocess (cwd = a temporary working directory
made by stages/prepare.py on a tiny demo) with OpenAI and Anthropic voters that go through the
real SDKs to the loopback ``FakeLLMServer`` (tests/api_server.py). The server is scripted by
image content, so every voter answer — agreement, disagreement, refusal, off-schema label — is
known and each output row can be checked against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import medicsynth.relabel as relabel
from medicsynth.demo_data import DemoConfig, generate_demo
from medicsynth.labels import CLASSES, TASKS
from medicsynth.manifest import label_matrix, read_manifest
from medicsynth.relabel import (
    consensus,
    flag_confident_learning,
    flag_disagreement,
    fold_model_config,
    model_votes,
    out_of_fold_probs,
    score_corrections,
)
from medicsynth.llm import ResponseCache
from medicsynth.params import load_params
from tests.api_server import FakeLLMServer, answer, hang, refusal

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-test-RELABEL-SECRET"
# relabel.model of params.yaml (the one source of its defaults), sized for tests.
FOLD_PARAMS = load_params(REPO / "params.yaml")["relabel"]["model"]
TINY_TRAIN = fold_model_config({**FOLD_PARAMS, "epochs": 1, "resize": 32, "crop": 28, "batch_size": 32,
                                "num_workers": 1, "device": "cpu"})

# ------------------------------------------------------------------------------------------
# consensus
# ------------------------------------------------------------------------------------------

N_TASKS = len(TASKS)


def _labels(*rows):
    return np.array(rows, dtype=np.int64)


def test_consensus_unanimous_needs_every_voter_on_the_same_new_label():
    labels = _labels([0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1])
    flags = np.ones_like(labels, dtype=bool)
    a = _labels([2, 1, 2, 3], [1, 1, 3, 3], [1, 0, 0, 0])
    b = _labels([2, 1, 1, 3], [2, 1, 3, 3], [1, 0, 2, 0])
    new = consensus(labels, flags, [a, b], "unanimous")
    # Row 0: both say 2 / 1 / (2 vs 1) / 3 -> tasks 0, 1, 3 change, task 2 (disagreement) stays.
    assert new[0].tolist() == [2, 1, 0, 3]
    # Row 1: task 0 disagrees (1 vs 2), the others agree on a new label.
    assert new[1].tolist() == [0, 1, 3, 3]
    # Row 2: agreeing on the original label (task 0) changes nothing; tasks 1 and 3 agree on 0.
    assert new[2].tolist() == [1, 0, 1, 0]
    assert labels.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]  # input not modified


def test_consensus_majority_counts_abstentions_against_a_change():
    labels = _labels([0, 0, 0, 0])
    flags = np.ones_like(labels, dtype=bool)
    a = _labels([1, 1, 2, -1])
    b = _labels([1, -1, 2, -1])
    c = _labels([2, -1, -1, 3])
    new = consensus(labels, flags, [a, b, c], "majority")
    # task 0: 2 of 3 say 1 -> change; task 1: 1 of 3 (two failed) -> keep;
    # task 2: 2 of 3 say 2 (one failed) -> change; task 3: 1 of 3 -> keep.
    assert new[0].tolist() == [1, 0, 2, 0]
    # The same votes under the unanimous rule change nothing: no task has all three voters.
    assert consensus(labels, flags, [a, b, c], "unanimous").tolist() == labels.tolist()
    # Two voters: a 1-1 split is not a majority.
    split = consensus(labels, flags, [_labels([1, 1, 1, 1]), _labels([2, 1, -1, 0])], "majority")
    assert split[0].tolist() == [0, 1, 0, 0]


def test_consensus_failures_keep_the_original_label():
    labels = _labels([0, 1, 2, 3], [2, 0, 1, 5])
    flags = np.ones_like(labels, dtype=bool)
    failed = np.full_like(labels, -1)
    answered = _labels([1, 0, 0, 0], [0, 1, 0, 0])
    assert consensus(labels, flags, [answered, failed], "unanimous").tolist() == labels.tolist()
    assert consensus(labels, flags, [failed, failed], "unanimous").tolist() == labels.tolist()
    assert consensus(labels, flags, [failed, failed], "majority").tolist() == labels.tolist()
    # One voter alone that answers is unanimous with itself; -1 there still keeps the original.
    single = _labels([1, -1, 0, -1], [-1, -1, -1, 4])
    assert consensus(labels, flags, [single]).tolist() == [[1, 1, 0, 3], [2, 0, 1, 4]]


def test_consensus_never_changes_unflagged_labels():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=(50, N_TASKS))
    flags = rng.random((50, N_TASKS)) < 0.3
    vote = 1 - labels  # every voter agrees on a different label everywhere
    for rule in ("unanimous", "majority"):
        new = consensus(labels, flags, [vote, vote.copy()], rule)
        assert (new[~flags] == labels[~flags]).all()
        assert (new[flags] == vote[flags]).all()


def test_consensus_edge_cases():
    labels = _labels([0, 1, 0, 1])
    flags = np.ones_like(labels, dtype=bool)
    assert consensus(labels, flags, []).tolist() == labels.tolist()
    # Everyone names the original label: nothing changes.
    assert consensus(labels, flags, [labels.copy(), labels.copy()]).tolist() == labels.tolist()
    with pytest.raises(ValueError, match="unanimous or majority"):
        consensus(labels, flags, [labels], "plurality")


# ------------------------------------------------------------------------------------------
# model votes, disagreement flags, confident learning
# ------------------------------------------------------------------------------------------


def _probs_for(rows: dict[str, list[list[float]]]) -> dict[str, np.ndarray]:
    return {t: np.asarray(rows[t], dtype=np.float32) for t in TASKS}


def test_model_votes_abstain_below_threshold():
    probs = _probs_for({
        "damage_severity": [[0.8, 0.1, 0.1], [0.4, 0.35, 0.25], [0.0, 0.5, 0.5]],
        "informative": [[0.5, 0.5], [0.1, 0.9], [0.49, 0.51]],
        "humanitarian": [[0.25] * 4, [0.0, 0.0, 0.0, 1.0], [0.1, 0.6, 0.2, 0.1]],
        "disaster_types": [[1 / 7] * 7, [0, 0, 0, 0, 0.7, 0.3, 0], [0, 0, 0, 0, 0, 0, 1]],
    })
    votes = model_votes(probs, 0.5)
    assert votes.dtype == np.int64 and votes.shape == (3, N_TASKS)
    # probability == threshold counts (>=); below abstains with -1.
    assert votes.tolist() == [[0, 0, -1, -1], [-1, 1, 3, 4], [1, 1, 1, 6]]
    assert (model_votes(probs, 0.95) == _labels([-1, -1, -1, -1], [-1, -1, 3, -1], [-1, -1, -1, 6])).all()
    assert (model_votes(probs, 0.0) >= 0).all()  # a zero threshold never abstains


def test_flag_disagreement_is_the_studys_rule():
    labels = _labels([0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1])
    m1 = {"damage_severity": np.array([0, 1, 1, 1]), "informative": np.array([0, 0, 1, 1]),
          "humanitarian": np.array([0, 0, 0, 1]), "disaster_types": np.array([0, 0, 0, 1])}
    m2 = {"damage_severity": np.array([0, 0, 0, 1]), "informative": np.array([0, 0, 0, 1]),
          "humanitarian": np.array([0, 0, 0, 1]), "disaster_types": np.array([0, 0, 0, 0])}
    # Disagreement counts (model × task): row0 0, row1 1, row2 2, row3 1 (m2 disaster_types).
    flags = flag_disagreement(labels, [m1, m2], min_disagreements=2)
    assert flags.shape == (4, N_TASKS) and flags.dtype == bool
    assert flags.tolist() == [[False] * 4, [False] * 4, [True] * 4, [False] * 4]  # every task of row 2
    assert flag_disagreement(labels, [m1, m2], 1).any(1).tolist() == [False, True, True, True]
    assert not flag_disagreement(labels, [m1, m2], 3).any()
    # One model alone: row 2's two disagreements are both its own.
    assert flag_disagreement(labels, [m1], 2).any(1).tolist() == [False, False, True, False]


def test_flag_confident_learning_finds_clearly_wrong_labels():
    rng = np.random.default_rng(0)
    n = 300
    true = np.stack([rng.integers(0, len(CLASSES[t]), n) for t in TASKS], axis=1)
    probs = {}
    for j, t in enumerate(TASKS):
        k = len(CLASSES[t])
        # A well-calibrated, confident model: 0.85–0.95 on the true class, the rest spread.
        top = rng.uniform(0.85, 0.95, n)
        p = np.tile(((1 - top) / (k - 1))[:, None], (1, k))
        p[np.arange(n), true[:, j]] = top
        probs[t] = p.astype(np.float32)
    given = true.copy()
    wrong = {}
    for j, t in enumerate(TASKS):
        k = len(CLASSES[t])
        idx = rng.choice(n, 12, replace=False)
        wrong[t] = idx
        given[idx, j] = (true[idx, j] + 1) % k
        # Clearly wrong: the model is very sure of another class (0.98, above every class's
        # mean self-confidence, which is confident learning's per-class threshold).
        probs[t][idx] = 0.02 / (k - 1)
        probs[t][idx, true[idx, j]] = 0.98
    flags, scores = flag_confident_learning(given, probs)
    assert flags.shape == scores.shape == (n, N_TASKS) and flags.dtype == bool
    for j, t in enumerate(TASKS):
        assert flags[wrong[t], j].all(), t  # every planted error is found
        clean = np.setdiff1d(np.arange(n), wrong[t])
        assert flags[clean, j].sum() <= 2, t  # and (almost) nothing else
        # score = the model's probability of the *given* label (self-confidence).
        assert np.allclose(scores[:, j], probs[t][np.arange(n), given[:, j]])
        assert scores[wrong[t], j].max() < scores[clean, j].min()


# ------------------------------------------------------------------------------------------
# score_corrections
# ------------------------------------------------------------------------------------------


def _frame(paths, **labels):
    base = {t: [CLASSES[t][0]] * len(paths) for t in TASKS}
    base.update(labels)
    return pd.DataFrame({"image_path": paths, **base})


def test_score_corrections_against_hand_computed_values():
    paths = ["a", "b", "c", "d", "e"]
    ds = CLASSES["damage_severity"]  # little_or_none, mild, severe
    dt = CLASSES["disaster_types"]
    clean = _frame(paths, damage_severity=[ds[0], ds[1], ds[2], ds[0], ds[1]],
                   disaster_types=[dt[0], dt[1], dt[2], dt[3], dt[4]])
    old = _frame(paths, damage_severity=[ds[2], ds[2], ds[2], ds[1], ds[1]],
                 disaster_types=[dt[0], dt[1], dt[2], dt[3], dt[4]])
    # damage: noisy = a, b, d (3). Changed: a -> clean (fixed), b -> little_or_none (wrong),
    # c -> mild (it was right: now wrong), e unchanged. fixed 1, changed 3 -> precision 1/3, recall 1/3.
    new = old.copy()
    new["damage_severity"] = [ds[0], ds[0], ds[1], ds[1], ds[1]]
    # disaster_types: nothing noisy; one change (e) away from clean -> precision 0, recall None.
    new["disaster_types"] = [dt[0], dt[1], dt[2], dt[3], dt[5]]
    # Clean rows in a different order: rows must match on image_path.
    out = score_corrections(old, new, clean.iloc[::-1].reset_index(drop=True))
    assert out["damage_severity"] == {"changed": 3, "noisy": 3, "fixed": 1, "precision": pytest.approx(1 / 3),
                                      "recall": pytest.approx(1 / 3)}
    assert out["disaster_types"] == {"changed": 1, "noisy": 0, "fixed": 0, "precision": 0.0, "recall": None}
    for t in ("informative", "humanitarian"):
        assert out[t] == {"changed": 0, "noisy": 0, "fixed": 0, "precision": None, "recall": None}
    assert out["mean_precision"] == pytest.approx((1 / 3 + 0.0) / 2)
    assert out["mean_recall"] == pytest.approx(1 / 3)
    # Per clean class: little_or_none noisy in a (fixed) and d (left as mild); mild noisy in b
    # (changed, but to little_or_none); severe never noisy.
    assert out["recall_per_class"]["damage_severity"] == {
        ds[0]: {"noisy": 2, "fixed": 1, "recall": 0.5},
        ds[1]: {"noisy": 1, "fixed": 0, "recall": 0.0},
        ds[2]: {"noisy": 0, "fixed": 0, "recall": None},
    }
    assert all(v["noisy"] == 0 for v in out["recall_per_class"]["disaster_types"].values())


def test_score_corrections_perfect_fix():
    paths = ["x", "y"]
    clean = _frame(paths, informative=["informative", "not_informative"])
    old = _frame(paths, informative=["not_informative", "not_informative"])
    out = score_corrections(old, clean.copy(), clean)
    assert out["informative"] == {"changed": 1, "noisy": 1, "fixed": 1, "precision": 1.0, "recall": 1.0}
    assert out["mean_precision"] == 1.0 and out["mean_recall"] == 1.0


# ------------------------------------------------------------------------------------------
# out_of_fold_probs
# ------------------------------------------------------------------------------------------


def test_out_of_fold_probs_predicts_each_image_with_a_model_that_never_saw_it(tmp_path, monkeypatch):
    demo = generate_demo(DemoConfig(n_train=60, n_dev=20, n_test=10, image_size=32), tmp_path / "img", progress=False)
    pool = pd.concat([demo["train"], demo["dev"]], ignore_index=True)
    files, labels = pool["file"].tolist(), label_matrix(pool)

    trained: dict[int, set[str]] = {}  # id(model) -> files it was trained on
    predicted: list[tuple[int, list[str]]] = []
    real_train, real_predict = relabel.train_classifier, relabel.predict_files

    def recording_train(train_files, *args, **kwargs):
        result = real_train(train_files, *args, **kwargs)
        trained[id(result.model)] = set(train_files)
        return result

    def recording_predict(model, meta, pred_files, **kwargs):
        predicted.append((id(model), list(pred_files)))
        return real_predict(model, meta, pred_files, **kwargs)

    monkeypatch.setattr(relabel, "train_classifier", recording_train)
    monkeypatch.setattr(relabel, "predict_files", recording_predict)
    probs = out_of_fold_probs(files, labels, TINY_TRAIN, k=3, epochs=1, seed=0, progress=False)

    assert set(probs) == set(TASKS)
    for t in TASKS:
        p = probs[t]
        assert p.shape == (len(files), len(CLASSES[t]))
        assert np.isfinite(p).all() and (p >= 0).all()
        assert np.allclose(p.sum(1), 1.0, atol=1e-4)  # every row filled (a zero row would sum to 0)
    assert len(trained) == len(predicted) == 3
    seen_once: list[str] = []
    for model_id, held_out in predicted:
        fit = trained[model_id]
        assert not fit & set(held_out)  # the predicting model never trained on what it predicts
        assert fit | set(held_out) == set(files)  # and trained on everything else
        seen_once += held_out
    assert sorted(seen_once) == sorted(files)  # each image predicted exactly once


# ------------------------------------------------------------------------------------------
# Stage: stages/relabel.py with OpenAI and Anthropic voters through the SDKs
# ------------------------------------------------------------------------------------------

DEMO = {"n_train": 60, "n_dev": 20, "n_test": 10, "image_size": 32, "noise_rate": 0.1, "seed": 0, "jpeg_quality": 92}
# relabel.model: the fold models' own settings (the stage never reads the train section).
FOLD_MODEL = {**FOLD_PARAMS, "arch": "small_cnn", "epochs": 1, "batch_size": 32, "resize": 32, "crop": 28, "num_workers": 1,
              "device": "cpu", "cpu_threads": 1, "seed": 0}
# Per image, in the order the stage first asks about it (most suspicious first); cycled.
CATEGORIES = ("agree", "refuse", "disagree", "agree", "invalid", "same")


def stage_env() -> dict[str, str]:
    env = dict(os.environ, OPENAI_API_KEY=SECRET, ANTHROPIC_API_KEY=SECRET, HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def run_stage(name: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(REPO / "stages" / f"{name}.py")], cwd=cwd, env=stage_env(),
                          capture_output=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout.decode()[-3000:]}\n{proc.stderr.decode()[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A working directory after stages/prepare.py on a tiny demo (copied by each stage test)."""
    root = tmp_path_factory.mktemp("prepared")
    shutil.copytree(REPO / "prompts", root / "prompts")  # the classification prompts are read from cwd
    (root / "params.yaml").write_text(yaml.safe_dump({"data": {"source": "demo", "demo": DEMO},
                                                     "storage": {"layout": "auto", "per_shard": 1000}}))
    run_stage("prepare", root)
    return root


def workdir(prepared: Path, dest: Path, server: FakeLLMServer, **relabel_params) -> Path:
    shutil.copytree(prepared, dest)
    relabel_section = {
        "splits": ["train", "dev"], "flag": "confident_learning", "k_folds": 2, "model": FOLD_MODEL,
        "max_flagged": 12, "voters": ["openai", "anthropic"], "consensus": "unanimous",
        # every key the stage reads (params.yaml is the one source of values: no code defaults)
        "min_disagreements": 2, "model_threshold": 0.8, "cache_dir": None,
        "openai": {"model": "gpt-test", "base_url": server.openai_base_url, "concurrency": 1, "max_retries": 0,
                   "timeout_s": 30, "max_tokens": 300},
        "anthropic": {"model": "claude-test", "base_url": server.anthropic_base_url, "concurrency": 1,
                      "max_retries": 0, "timeout_s": 30, "max_tokens": 300},
    }
    relabel_section.update(relabel_params)
    params = {"data": {"source": "demo", "demo": DEMO}, "llm": {"cache_dir": "llm_cache"},
              "relabel": relabel_section}
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    return dest


def shifted(labels: dict[str, str], by: int) -> dict[str, str]:
    return {t: CLASSES[t][(CLASSES[t].index(v) + by) % len(CLASSES[t])] for t, v in labels.items()}


class Voters:
    """Server responder scripted by image content (sha256 of the image bytes sent).

    Each image gets a category by the order in which it is first asked about; per category:
    ``agree``: both voters name a new label on every task (+1); ``disagree``: OpenAI +1,
    Anthropic +2 (never equal); ``refuse``: OpenAI +1, Anthropic refuses (also the fallback);
    ``invalid``: OpenAI answers a damage label outside the schema, Anthropic +1; ``same``: both
    repeat the original labels.
    """

    def __init__(self, root: Path, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.by_sha: dict[str, dict] = {}
        for split in ("train", "dev", "test"):
            path = root / ("data/prepared/test.tsv" if split == "test" else f"data/variants/original/{split}.tsv")
            for row in read_manifest(path).to_dict("records"):
                sha = hashlib.sha256((root / row["file"]).read_bytes()).hexdigest()
                self.by_sha[sha] = row
        self.category: dict[str, str] = {}  # image_path -> category
        self._lock = threading.Lock()

    def answers(self, image_path: str) -> dict[str, dict[str, str] | str]:
        """Per provider: the labels it answers, or the failure it produces."""
        row = next(r for r in self.by_sha.values() if r["image_path"] == image_path)
        orig = {t: row[t] for t in TASKS}
        cat = self.category[image_path]
        if cat == "agree":
            return {"openai": shifted(orig, 1), "anthropic": shifted(orig, 1)}
        if cat == "disagree":
            return {"openai": shifted(orig, 1), "anthropic": shifted(orig, 2)}
        if cat == "refuse":
            return {"openai": shifted(orig, 1), "anthropic": "failed:refusal"}
        if cat == "invalid":
            return {"openai": "failed:invalid_answer", "anthropic": shifted(orig, 1)}
        return {"openai": orig, "anthropic": orig}

    def __call__(self, req):
        row = self.by_sha[req.image_sha256s[0]]
        with self._lock:
            if row["image_path"] not in self.category:
                self.category[row["image_path"]] = CATEGORIES[len(self.category) % len(CATEGORIES)]
        planned = self.answers(row["image_path"])[req.provider]
        if planned == "failed:refusal":
            return refusal(delay_s=self.delay_s)
        if planned == "failed:invalid_answer":
            bad = dict(shifted({t: row[t] for t in TASKS}, 1), damage_severity="catastrophic")
            return answer(bad, delay_s=self.delay_s)
        return answer(planned, delay_s=self.delay_s)


def read_outputs(root: Path) -> dict:
    return {
        "changes": pd.read_csv(root / "data/relabel/changes.tsv", sep="\t", dtype=str, keep_default_na=False),
        "train": read_manifest(root / "data/variants/relabelled/train.tsv"),
        "dev": read_manifest(root / "data/variants/relabelled/dev.tsv"),
        "metrics": json.loads((root / "metrics/relabel.json").read_text()),
    }


def assert_no_secret(root: Path, *streams: bytes) -> None:
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any("llm_cache" in p.parts for p in files)  # the cache was written (and is checked)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
    for blob in streams:
        assert SECRET.encode() not in blob


@pytest.fixture(scope="module")
def voted(prepared, tmp_path_factory):
    """One uninterrupted stage run with both VLM voters; shared by the assertions below."""
    root = tmp_path_factory.mktemp("voted") / "work"
    voters = Voters(prepared)
    test_sha_before = hashlib.sha256((prepared / "data/prepared/test.tsv").read_bytes()).hexdigest()
    with FakeLLMServer(voters) as server:
        workdir(prepared, root, server)
        proc = run_stage("relabel", root)
        requests = server.requests
    return {"root": root, "voters": voters, "proc": proc, "requests": requests, "test_sha": test_sha_before}


@pytest.mark.e2e
def test_stage_changes_labels_only_where_both_vlms_agree(voted):
    root, voters = voted["root"], voted["voters"]
    out = read_outputs(root)
    changes, metrics = out["changes"], out["metrics"]
    asked = set(voters.category)
    # Every scripted behaviour occurred (the budget of 12 images covers two full cycles).
    assert sorted(set(voters.category.values())) == sorted(set(CATEGORIES))
    assert metrics["flagged_images"] == len(asked) == 12  # max_flagged respected
    assert set(changes["image_path"]) == asked
    assert list(changes.columns[-2:]) == ["vote_openai", "vote_anthropic"]

    for row in changes.to_dict("records"):
        planned = voters.answers(row["image_path"])
        task, cat = row["task"], voters.category[row["image_path"]]
        for provider in ("openai", "anthropic"):
            want = planned[provider] if isinstance(planned[provider], str) else planned[provider][task]
            assert row[f"vote_{provider}"] == want, (row, cat)  # each voter's answer is listed
        expect_new = planned["openai"][task] if cat == "agree" else row["old"]
        assert row["new"] == expect_new, (row, cat)
        assert row["changed"] == str(cat == "agree")

    # Relabelled manifests: exactly the "agree" flagged labels changed; everything else as before.
    original = pd.concat([read_manifest(root / f"data/variants/original/{s}.tsv") for s in ("train", "dev")])
    relabelled = pd.concat([out["train"], out["dev"]])
    assert relabelled["image_path"].tolist() == original["image_path"].tolist()
    changed_rows = changes[changes["changed"] == "True"]
    assert len(changed_rows) > 0
    expected = original.set_index("image_path")
    for row in changed_rows.to_dict("records"):
        expected.loc[row["image_path"], row["task"]] = row["new"]
    got = relabelled.set_index("image_path")
    for t in TASKS:
        assert got[t].equals(expected[t]), t
    changed_images = set(changed_rows["image_path"])
    assert (got["provenance"].str.endswith("+relabel") == got.index.isin(changed_images)).all()
    assert metrics["changed_labels"] == {t: int((changed_rows["task"] == t).sum()) for t in TASKS}
    assert metrics["changed_images"] == len(changed_images)


@pytest.mark.e2e
def test_stage_counts_failures_and_usage(voted):
    voters, metrics = voted["voters"], read_outputs(voted["root"])["metrics"]
    cats = list(voters.category.values())
    n = len(cats)
    usage = metrics["usage"]
    assert set(usage) == {"openai", "anthropic"}
    assert usage["openai"]["requests"] == n and usage["anthropic"]["requests"] == n
    assert usage["openai"]["failures"] == {"invalid_answer": cats.count("invalid")}
    assert usage["anthropic"]["failures"] == {"refusal": cats.count("refuse")}
    assert usage["anthropic"]["fallback_retries"] == cats.count("refuse")  # refusal retried once, then kept
    assert usage["openai"]["api_calls"] == n and usage["anthropic"]["api_calls"] == n + cats.count("refuse")
    by_path = {}
    for r in voted["requests"]:
        by_path[r.provider] = by_path.get(r.provider, 0) + 1
        assert r.headers.get("authorization") == f"Bearer {SECRET}" or r.headers.get("x-api-key") == SECRET
    assert by_path == {"openai": n, "anthropic": n + cats.count("refuse")}


@pytest.mark.e2e
def test_stage_leaves_test_labels_untouched_and_scores_against_clean(voted):
    root, voters = voted["root"], voted["voters"]
    assert hashlib.sha256((root / "data/prepared/test.tsv").read_bytes()).hexdigest() == voted["test_sha"]
    assert not (root / "data/variants/relabelled/test.tsv").exists()
    out = read_outputs(root)
    assert set(out["changes"]["split"]) <= {"train", "dev"}
    test_paths = {r["image_path"] for r in voters.by_sha.values() if r["split"] == "test"}
    assert not test_paths & set(voters.category)  # no test image was even sent to a voter
    assert (root / "plots/relabel_changes.png").stat().st_size > 0

    # The demo scoring is present and is exactly score_corrections on the written files.
    metrics = out["metrics"]
    assert "against_clean_labels" in metrics
    original = pd.concat([read_manifest(root / f"data/variants/original/{s}.tsv") for s in ("train", "dev")],
                         ignore_index=True)
    clean = pd.read_csv(root / "data/prepared/clean_labels.tsv", sep="\t", dtype=str)
    recomputed = score_corrections(original, pd.concat([out["train"], out["dev"]], ignore_index=True), clean)
    assert metrics["against_clean_labels"] == json.loads(json.dumps(recomputed))
    assert {t: metrics["against_clean_labels"][t]["changed"] for t in TASKS} == metrics["changed_labels"]


@pytest.mark.e2e
def test_stage_never_writes_or_prints_the_api_key(voted):
    proc = voted["proc"]
    assert proc.stderr  # progress bars and warnings were printed (and are checked)
    assert_no_secret(voted["root"], proc.stdout, proc.stderr)


@pytest.mark.e2e
def test_stage_kill_and_resume_repeats_no_answered_call(prepared, tmp_path):
    """SIGKILL mid-vote, rerun: no distinct call answered twice; outputs equal an uninterrupted run."""
    params = {"flag": "disagreement", "min_disagreements": 2}
    delay = 0.15
    logs = tmp_path / "logs"
    logs.mkdir()

    # Reference: an uninterrupted run in its own directory, with its own server and cache.
    ref_voters = Voters(prepared, delay_s=delay)
    with FakeLLMServer(ref_voters) as server:
        ref = workdir(prepared, tmp_path / "reference", server, **params)
        run_stage("relabel", ref)
        ref_completed = server.completed_hash_counts()
    total = sum(ref_completed.values())
    n_openai = len(ref_voters.category)
    assert set(ref_completed.values()) == {1} and total > n_openai + 4

    # Answer `target` calls (every OpenAI vote and a few Anthropic ones, so both voters' work
    # must survive), then hold the next one open so the kill lands mid-call.
    target = n_openai + 4
    voters, release = Voters(prepared, delay_s=delay), threading.Event()

    def responder(req):
        reply = voters(req)
        return hang(release, then=reply) if req.index == target else reply

    with FakeLLMServer(responder) as server:
        root = workdir(prepared, tmp_path / "killed", server, **params)
        with open(logs / "run1.out", "wb") as out1, open(logs / "run1.err", "wb") as err1:
            child = subprocess.Popen([sys.executable, str(REPO / "stages/relabel.py")], cwd=root, env=stage_env(),
                                     stdout=out1, stderr=err1, start_new_session=True)
            try:
                deadline = time.monotonic() + 120
                while server.count() <= target and child.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert child.poll() is None, (logs / "run1.err").read_text()[-3000:]
                assert server.count() == target + 1 and server.requests[target].provider == "anthropic"
                assert sum(server.completed_hash_counts().values()) == target
                assert len(ResponseCache(root / "llm_cache")) == target  # each answer cached as it arrived
                os.killpg(child.pid, signal.SIGKILL)
                child.wait(timeout=30)
            finally:
                release.set()
                if child.poll() is None:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
        assert not (root / "metrics/relabel.json").exists()  # killed before writing outputs

        resumed = run_stage("relabel", root)
        received, completed = server.hash_counts(), server.completed_hash_counts()

    # No distinct call was answered twice across both runs, and together they made exactly the
    # uninterrupted run's calls; only the call in flight at the kill may have been sent twice.
    assert set(completed.values()) == {1}
    assert set(completed) == set(ref_completed)
    assert sum(received.values()) == total + 1 and sorted(received.values()) == [1] * (total - 1) + [2]

    usage = read_outputs(root)["metrics"]["usage"]
    assert usage["openai"]["api_calls"] == 0  # every OpenAI vote came from the cache
    assert usage["openai"]["cache_hits"] == n_openai
    assert usage["anthropic"]["api_calls"] == total - target
    assert usage["anthropic"]["cache_hits"] == target - n_openai

    # The resumed outputs equal the uninterrupted run's (usage counters aside).
    got, want = read_outputs(root), read_outputs(ref)
    assert got["changes"].equals(want["changes"])
    assert (got["changes"]["changed"] == "True").any()
    assert got["train"].equals(want["train"]) and got["dev"].equals(want["dev"])
    assert voters.category == ref_voters.category  # same images asked, in the same order
    assert {k: v for k, v in got["metrics"].items() if k != "usage"} == {
        k: v for k, v in want["metrics"].items() if k != "usage"}
    for provider in ("openai", "anthropic"):
        for key in ("requests", "ok", "failures"):
            assert got["metrics"]["usage"][provider][key] == want["metrics"]["usage"][provider][key]

    streams = [resumed.stdout, resumed.stderr] + [p.read_bytes() for p in logs.iterdir()]
    assert_no_secret(root, *streams)
    assert_no_secret(ref)


def test_fold_model_config_reads_relabel_model_only():
    from medicsynth.relabel import fold_model_config

    config = fold_model_config({**FOLD_PARAMS, "arch": "small_cnn", "epochs": 7, "lr": 0.01, "seed": 3})
    assert (config.arch, config.epochs, config.lr, config.seed) == ("small_cnn", 7, 0.01, 3)
    assert config.augment == "none"  # fold models are never trained with classic augmentation by default
    # No dev set for fold models: no early stopping, the last epoch is kept.
    assert (config.early_stop_metric, config.patience) == (None, None)
    with pytest.raises(ValueError, match="relabel.model: unknown key"):
        fold_model_config({**FOLD_PARAMS, "epoch": 7})
    with pytest.raises(ValueError, match="relabel.model: patience cannot be set here"):
        fold_model_config({**FOLD_PARAMS, "patience": 3})
    # params.yaml is the one source of defaults: a missing key names itself.
    with pytest.raises(KeyError, match="missing key relabel.model.lr"):
        fold_model_config({k: v for k, v in FOLD_PARAMS.items() if k != "lr"})
    with pytest.raises(ValueError, match="relabel.model must be a mapping"):
        fold_model_config(None)


def test_budget_keeps_the_most_suspicious_images():
    from medicsynth.relabel import apply_budget

    flags = np.array([[True, False], [True, True], [False, False], [False, True]])
    flags = np.pad(flags, ((0, 0), (0, len(TASKS) - 2)))
    scores = np.ones_like(flags, dtype=np.float32)
    scores[0, 0], scores[1, 1], scores[3, 1] = 0.5, 0.1, 0.3
    kept, order = apply_budget(flags, scores, 2)
    assert order.tolist() == [1, 3] and kept.any(1).tolist() == [False, True, False, True]
    kept, order = apply_budget(flags, scores, None)
    assert order.tolist() == [1, 3, 0] and (kept == flags).all()
