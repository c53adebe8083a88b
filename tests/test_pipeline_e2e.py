"""End to end: the real `dvc` CLI on a temporary copy of the repository with a tiny config.

One module-scoped run of the whole default pipeline (every stage, every variant), then checks
that a second `dvc repro` is a no-op and that `dvc exp run -S mix_ratio=...` reruns exactly the
stages downstream of mix_ratio.
"""

import json
import re

import pytest

from tests.e2e_helpers import make_repo_copy, run

TASKS = ("damage_severity", "informative", "humanitarian", "disaster_types")


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory):
    repo = make_repo_copy(tmp_path_factory.mktemp("pipeline"))
    run(["dvc", "repro"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "pipeline run"], repo)
    return repo


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_repro_writes_declared_outputs(pipeline_repo):
    repo = pipeline_repo
    for variant in ("original", "relabelled", "augmented"):
        assert (repo / f"models/{variant}-small_cnn/model.pt").exists()
        report = json.loads((repo / f"metrics/evaluate/{variant}-small_cnn.json").read_text())["test"]
        assert set(report["tasks"]) == set(TASKS)
        assert 0.0 <= report["mean_macro_f1"] <= 1.0
        assert (repo / f"plots/evaluate/{variant}-small_cnn/per_class_f1.png").exists()
    for path in ["metrics/prepare.json", "metrics/relabel.json", "metrics/allocate.json", "metrics/caption.json",
                 "metrics/adapt.json", "metrics/generate.json", "metrics/filter.json", "metrics/merge.json",
                 "metrics/zeroshot.json", "metrics/compare.json", "metrics/compare.md", "plots/allocate.png",
                 "plots/relabel_changes.png", "plots/compare_per_class_f1.png", "data/synthetic/manifest.tsv"]:
        assert (repo / path).exists(), path
    assert json.loads((repo / "metrics/zeroshot.json").read_text())["skipped"] is True
    augmented = (repo / "data/variants/augmented/train.tsv").read_text()
    assert "\tsynthetic\t" in augmented  # the source column carries synthetic rows
    compare = json.loads((repo / "metrics/compare.json").read_text())
    assert "augmented-original" in compare["mean_macro_f1_diff"]
    shown = run(["dvc", "metrics", "show"], repo).stdout
    assert "metrics/summary.json" in shown and "augmented.mean" in shown  # the headline (the report stage)


def test_second_repro_is_a_noop(pipeline_repo):
    out = run(["dvc", "repro"], pipeline_repo).stdout
    assert ran_stages(out) == set()
    assert "up to date" in run(["dvc", "status"], pipeline_repo).stdout.lower()


def test_exp_run_mix_ratio_reruns_only_downstream_stages(pipeline_repo):
    # The tiny pool holds ~24 images: a ratio below the default's share changes the augmented set
    # (a larger one would be capped at the same 24 images, and DVC would rightly stop at merge).
    out = run(["dvc", "exp", "run", "-S", "mix_ratio=0.02"], pipeline_repo).stdout
    assert ran_stages(out) == {"merge", "train@augmented-small_cnn", "evaluate@augmented-small_cnn", "compare", "report"}
    merge = json.loads((pipeline_repo / "metrics/merge.json").read_text())
    assert merge["mix_ratio"] == 0.02 and merge["synthetic_selected"] == merge["synthetic_requested"] == 5
    table = run(["dvc", "exp", "show", "--no-pager", "--md"], pipeline_repo).stdout
    assert "mix_ratio" in table
    diff = run(["dvc", "metrics", "diff", "HEAD"], pipeline_repo).stdout
    assert "metrics/summary.json" in diff and "synthetic_share" in diff
