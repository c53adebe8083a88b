"""End to end: a fresh copy of the repository runs the (tiny) demo pipeline with the real `dvc`
CLI; then the report's two editions and the `dvc plots show` page open in headless Chromium
with zero network requests and every chart drawn, and `dvc exp show --only-changed` over two
experiments fits in 200 columns.

Screenshots: ``test-screenshots/report_demo_{public,private}.png``, ``dvc_plots_demo.png``.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from medicsynth.report import SECTIONS
from tests.browser import assert_offline_and_drawn, find_chromium, open_page
from tests.e2e_helpers import copy_repo, env, run

SHOTS = Path(__file__).resolve().parents[1] / "test-screenshots"
DATA_IMAGE = re.compile(r"data:image/[a-z+]+;base64,")
NEEDS_CHROMIUM = pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed: apt-get install -y chromium")

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo_repo(tiny_pipeline, tmp_path_factory):
    return copy_repo(tiny_pipeline, tmp_path_factory.mktemp("report-e2e") / "repo")


def test_report_outputs_and_editions(demo_repo):
    public = (demo_repo / "report/public.html").read_text()
    private = (demo_repo / "report/private.html").read_text()
    assert not DATA_IMAGE.search(public)
    assert len(DATA_IMAGE.findall(private)) > 10
    # The public edition is committed with git; the private one is a cached output for the private remote.
    tracked = run(["git", "ls-files", "report"], demo_repo).stdout.split()
    assert "report/public.html" in tracked and "report/private.html" not in tracked
    outs = yaml.safe_load((demo_repo / "dvc.yaml").read_text())["stages"]["report"]["outs"]
    flags = {next(iter(o)): next(iter(o.values())) for o in outs}
    assert flags["report/private.html"] == {"remote": "private"} and flags["report/public.html"] == {"cache": False}
    summary = json.loads((demo_repo / "metrics/summary.json").read_text())
    assert {"orig", "relab", "aug", "over", "classic", "synth"} <= set(summary)


@NEEDS_CHROMIUM
@pytest.mark.parametrize("edition", ["public", "private"])
def test_demo_report_renders_offline(demo_repo, edition):
    result = open_page(demo_repo / f"report/{edition}.html", SHOTS / f"report_demo_{edition}.png")
    assert_offline_and_drawn(result)
    assert result.section_ids == [s[0] for s in SECTIONS]
    assert "Not available" not in result.text  # every section found its inputs after a demo run


@NEEDS_CHROMIUM
def test_demo_dvc_plots_show_renders_offline(demo_repo):
    run(["dvc", "plots", "show", "-o", "dvc_plots"], demo_repo)
    result = open_page(demo_repo / "dvc_plots/index.html", SHOTS / "dvc_plots_demo.png")
    assert_offline_and_drawn(result)
    assert len(result.charts) >= 3  # the training curves of the three variants at least


def test_headline_tables_fit_one_screen(demo_repo):
    for ratio in ("0.02", "0.05"):
        run(["dvc", "exp", "run", "-S", f"mix_ratio={ratio}"], demo_repo, timeout=3600)
    e = {**env(), "COLUMNS": "200", "LINES": "50"}
    shown = subprocess.run(["dvc", "exp", "show", "--only-changed", "--no-pager"], cwd=demo_repo, env=e,
                           capture_output=True, text=True, check=True).stdout
    assert max(len(line) for line in shown.splitlines()) <= 200, shown
    header = next(line for line in shown.splitlines() if "Experiment" in line)
    # Both variants that mix_ratio changes (augmented, and the oversampled baseline that copies its
    # composition) show every headline column, with the share and the parameter; only the changed
    # dependencies' hashes may fold into DVC's trailing "…" column.
    headline = ["synth", *(f"{v}.{k}" for v in ("aug", "over") for k in ("mean", "dmg", "inf", "hum", "dis", "min")),
                "mix_ratio"]
    assert all(name in header.split() for name in headline), shown
    assert header.split().index("mix_ratio") < (header.split() + ["…"]).index("…"), shown
    clean = subprocess.run(["dvc", "exp", "show", "--only-changed", "--no-pager", "--drop", "data/|models/|metrics/"],
                           cwd=demo_repo, env=e, capture_output=True, text=True, check=True).stdout
    assert max(len(line) for line in clean.splitlines()) <= 200, clean
    metrics = subprocess.run(["dvc", "metrics", "show"], cwd=demo_repo, env=e, capture_output=True, text=True,
                             check=True).stdout
    assert len(metrics.splitlines()) <= 40, metrics
    # The per-class detail stays one file away (a cached output, not a DVC metric).
    detail = json.loads((demo_repo / "metrics/evaluate/augmented-small_cnn-s0.json").read_text())
    assert "per_class" in json.dumps(detail)
