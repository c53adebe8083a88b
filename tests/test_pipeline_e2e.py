"""End to end: the real `dvc` CLI on a temporary copy of the repository with a tiny config.

One module-scoped run of the whole default pipeline (every stage, every variant and training
seed), then checks that a second `dvc repro` is a no-op, that `dvc exp run -S mix_ratio=...`
reruns exactly the stages downstream of mix_ratio, and that adding a training seed reruns only
that seed's train/evaluate entries and compare.
"""

import json
import re

import pytest

from tests.e2e_helpers import copy_repo, run

# Runs the real `dvc` CLI over the whole pipeline: minutes on 2 cores (`make test-fast` skips it).
pytestmark = pytest.mark.e2e

TASKS = ("damage_severity", "informative", "humanitarian", "disaster_types")
VARIANTS = ("original", "relabelled", "augmented", "oversampled", "classic_aug")
SEEDS = (0,)  # tests/e2e_helpers.py TINY_PARAMS
# The whole tiny pipeline takes minutes on a quiet 2-core machine; the limit only stops a hung run.
REPRO_TIMEOUT = 3600


@pytest.fixture(scope="module")
def pipeline_repo(tiny_pipeline, tmp_path_factory):
    return copy_repo(tiny_pipeline, tmp_path_factory.mktemp("pipeline") / "repo")


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_repro_writes_declared_outputs(pipeline_repo):
    repo = pipeline_repo
    for variant in VARIANTS:
        for seed in SEEDS:
            name = f"{variant}-small_cnn-s{seed}"
            assert (repo / f"models/{name}/model.pt").exists()
            report = json.loads((repo / f"metrics/evaluate/{name}.json").read_text())["test"]
            assert set(report["tasks"]) == set(TASKS)
            assert 0.0 <= report["mean_macro_f1"] <= 1.0
            assert (repo / f"plots/evaluate/{name}/per_class_f1.png").exists()
            summary = json.loads((repo / f"metrics/train/{name}.json").read_text())
            assert summary["seed"] == seed
            assert summary["augment"] == ("trivialaugment" if variant == "classic_aug" else "none")
    for path in ["metrics/prepare.json", "metrics/relabel.json", "metrics/allocate.json", "metrics/caption.json",
                 "metrics/adapt.json", "metrics/generate.json", "metrics/filter.json", "metrics/merge.json",
                 "metrics/zeroshot.json", "metrics/compare.json", "metrics/compare.md", "plots/allocate.png",
                 "plots/relabel_changes.png", "plots/compare_per_class_f1.png", "plots/compare_diff.png",
                 "data/synthetic/manifest.tsv", "metrics/baselines.json"]:
        assert (repo / path).exists(), path
    assert json.loads((repo / "metrics/zeroshot.json").read_text())["skipped"] is True
    augmented = (repo / "data/variants/augmented/train.tsv").read_text()
    assert "\tsynthetic\t" in augmented  # the source column carries synthetic rows
    # The oversampled baseline: the augmented set's size and labels, real images only.
    oversampled = (repo / "data/variants/oversampled/train.tsv").read_text().splitlines()
    assert len(oversampled) == len(augmented.splitlines()) and "\tsynthetic\t" not in "\n".join(oversampled)
    compare = json.loads((repo / "metrics/compare.json").read_text())
    assert compare["variants"] == list(VARIANTS) and compare["seeds"] == list(SEEDS)
    for v in VARIANTS[1:]:
        assert compare["mean_macro_f1_diff"][f"{v}-original"]["verdict"] in ("better", "no evidence", "worse")
    md = (repo / "metrics/compare.md").read_text()
    assert "two-way bootstrap" in md and "## Verdicts" in md and "oversampled" in md and "classic_aug" in md
    shown = run(["dvc", "metrics", "show"], repo).stdout
    assert "metrics/summary.json" in shown and "aug.mean" in shown  # the headline (the report stage)


def test_second_repro_is_a_noop(pipeline_repo):
    out = run(["dvc", "repro"], pipeline_repo).stdout
    assert ran_stages(out) == set()
    assert "up to date" in run(["dvc", "status"], pipeline_repo).stdout.lower()


def test_exp_run_mix_ratio_reruns_only_downstream_stages(pipeline_repo):
    # The tiny pool holds ~24 images: a ratio below the default's share changes the augmented set
    # (a larger one would be capped at the same 24 images, and DVC would rightly stop at merge).
    out = run(["dvc", "exp", "run", "-S", "mix_ratio=0.02"], pipeline_repo, timeout=REPRO_TIMEOUT).stdout
    # The oversampled baseline follows the augmented set; classic_aug's rows do not change.
    assert ran_stages(out) == {"merge", "baselines", "compare"} | {"report"} | {
        f"{stage}@{v}-small_cnn-{s}" for stage in ("train", "evaluate") for v in ("augmented", "oversampled")
        for s in SEEDS}
    merge = json.loads((pipeline_repo / "metrics/merge.json").read_text())
    assert merge["mix_ratio"] == 0.02 and merge["synthetic_selected"] == merge["synthetic_requested"] == 5
    table = run(["dvc", "exp", "show", "--no-pager", "--md"], pipeline_repo).stdout
    assert "mix_ratio" in table
    diff = run(["dvc", "metrics", "diff", "HEAD"], pipeline_repo).stdout
    assert "metrics/summary.json" in diff and "synth" in diff


def test_exp_run_new_seed_reruns_only_its_trainings_and_compare(pipeline_repo):
    # Back to the committed pipeline run (an earlier test may have left an experiment in the workspace).
    run(["git", "checkout", "--", "."], pipeline_repo)
    run(["dvc", "checkout", "--force"], pipeline_repo)
    assert ran_stages(run(["dvc", "repro", "--dry"], pipeline_repo).stdout) == set()
    out = run(["dvc", "exp", "run", "-S", "train.seeds=[0,1]"], pipeline_repo, timeout=REPRO_TIMEOUT).stdout
    new = {f"{stage}@{v}-small_cnn-1" for stage in ("train", "evaluate") for v in VARIANTS}
    assert ran_stages(out) == new | {"compare", "report"}  # nothing upstream: relabel reads relabel.model only
    compare = json.loads((pipeline_repo / "metrics/compare.json").read_text())
    assert compare["seeds"] == [0, 1]
    assert set(compare["mean_macro_f1"]["augmented"]["per_seed"]) == {"0", "1"}
