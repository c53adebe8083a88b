"""The report page and the `dvc plots show`/`dvc plots diff` pages in headless Chromium, offline.

Each page is opened with the network disabled; a test fails on any request that is not
``file:`` or ``data:``, on any uncaught script exception, on a missing section and on a chart
that did not draw (an SVG without marks, a blank canvas). Screenshots go to
``test-screenshots/`` (git-ignored) for a person to look at.

Skips only when no chromium is installed: ``.ci/run`` and ``make test`` install Debian's
``chromium`` (``apt-get install -y chromium``) when it is missing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medicsynth.report import SECTIONS, Provenance, ReportConfig, ReportInputs, build_report
from tests.browser import assert_offline_and_drawn, find_chromium, open_page
from tests.report_fixture import VARIANTS, build_project
from tests.sections import section

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "test-screenshots"
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    find_chromium() is None,
    reason="chromium is not installed: run `apt-get install -y chromium` (as root; .ci/run and make test do it)")]


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    root = build_project(tmp_path_factory.mktemp("report-browser"))
    params = {"variants": list(VARIANTS), "mix_ratio": 0.1, "data": {"source": "demo"}, "train": {"archs": ["small_cnn"]}}
    out = {}
    for edition, images in (("public", False), ("private", True)):
        r = build_report(ReportInputs(root=root), ReportConfig.from_params(section("report"), None),
                         Provenance("test", params, params), with_images=images)
        path = root / f"{edition}.html"
        path.write_text(r.html, encoding="utf-8")
        out[edition] = (path, r)
    return out


@pytest.mark.parametrize("edition", ["public", "private"])
def test_report_renders_offline(pages, edition):
    path, built = pages[edition]
    result = open_page(path, SHOTS / f"report_fixture_{edition}.png")
    assert_offline_and_drawn(result, expected_charts=built.charts)
    assert result.section_ids == [s[0] for s in SECTIONS]
    for _, title, _ in SECTIONS:
        assert title in result.text
    assert (SHOTS / f"report_fixture_{edition}.png").stat().st_size > 10_000


def test_a_request_to_the_network_is_caught(tmp_path):
    # The check itself must see a request that leaves the file (here: a CDN script and an image).
    page = tmp_path / "leaky.html"
    page.write_text('<html><body><img src="https://example.org/x.png">'
                    '<script src="https://cdn.jsdelivr.net/npm/vega@5"></script></body></html>')
    result = open_page(page)
    assert set(result.foreign_requests()) >= {"https://example.org/x.png", "https://cdn.jsdelivr.net/npm/vega@5"}


def dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(cwd), "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"dvc {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
    return proc


def git(args: list[str], cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def plots_repo(tmp_path_factory):
    """A git + DVC repository with this repository's plots config, a DVCLive-like TSV and an image."""
    repo = tmp_path_factory.mktemp("plots-repo")
    git(["init", "-q"], repo)
    dvc(["init", "-q"], repo)
    shutil.copy(REPO / ".dvc/plots_offline.html", repo / ".dvc/plots_offline.html")
    dvc(["config", "plots.html_template", "plots_offline.html"], repo)
    (repo / "logs").mkdir()
    (repo / "logs/dev_mean_macro_f1.tsv").write_text("step\tdev_mean_macro_f1\n0\t0.5\n1\t0.6\n2\t0.65\n")
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 60, 60)).save(repo / "logs/per_class_f1.png")
    (repo / "dvc.yaml").write_text("plots:\n  - logs/dev_mean_macro_f1.tsv:\n      x: step\n  - logs/per_class_f1.png\n")
    git(["add", "-A"], repo)
    git(["commit", "-qm", "plots"], repo)
    (repo / "logs/dev_mean_macro_f1.tsv").write_text("step\tdev_mean_macro_f1\n0\t0.55\n1\t0.62\n2\t0.7\n")
    return repo


@pytest.mark.parametrize("command", [["plots", "show"], ["plots", "diff", "HEAD"]])
def test_dvc_plots_pages_render_offline_with_the_repository_template(plots_repo, command):
    out = plots_repo / f"out-{command[1]}"
    dvc([*command, "-o", str(out)], plots_repo)  # plain command: the template comes from .dvc/config
    page = out / "index.html"
    html = page.read_text()
    assert "cdn.jsdelivr.net" not in html and "DVC Plot (offline)" in html
    result = open_page(page, SHOTS / f"dvc_plots_{command[1]}.png")
    assert_offline_and_drawn(result, expected_charts=1)
    assert any(u.startswith("file:") and u.endswith(".png") for u in result.requests)  # the image plot, a local file
