"""End to end: the real `dvc` CLI on a temporary copy of the repository with a tiny config."""

import json

import pytest

from tests.e2e_helpers import make_repo_copy, run


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory):
    repo = make_repo_copy(tmp_path_factory.mktemp("pipeline"))
    run(["dvc", "repro"], repo)
    return repo


def test_repro_writes_declared_outputs(pipeline_repo):
    repo = pipeline_repo
    for path in ["data/prepared/test.tsv", "data/variants/original/train.tsv", "models/original-small_cnn/model.pt",
                 "metrics/prepare.json", "metrics/evaluate/original-small_cnn.json", "metrics/dev/original-small_cnn.json",
                 "plots/evaluate/original-small_cnn/per_class_f1.png", "metrics/compare.json", "metrics/compare.md"]:
        assert (repo / path).exists(), path
    report = json.loads((repo / "metrics/evaluate/original-small_cnn.json").read_text())["test"]
    assert set(report["tasks"]) == {"damage_severity", "informative", "humanitarian", "disaster_types"}
    assert 0.0 <= report["mean_macro_f1"] <= 1.0
    shown = run(["dvc", "metrics", "show"], repo).stdout
    assert "mean_macro_f1" in shown


def test_second_repro_is_a_noop(pipeline_repo):
    out = run(["dvc", "repro"], pipeline_repo).stdout
    assert "Running stage" not in out
    status = run(["dvc", "status"], pipeline_repo).stdout
    assert "up to date" in status.lower()
