"""Stage ``report``: one self-contained HTML page with every result, in two editions, and the
headline ``metrics/summary.json``.

Reads the ``report`` section of params.yaml (and the whole file for provenance), the stage
outputs under ``metrics/`` and ``data/`` (see :class:`medicsynth.report.ReportInputs`). Writes:

- ``report/public.html``: no real or synthetic image (git-tracked, like the metrics);
- ``report/private.html``: the same page with thumbnails (a cached output, ``remote: private``);
- ``metrics/summary.json``: mean and per-task macro-F1 per variant, minority-class F1 and the
  synthetic share: what ``dvc metrics show`` and ``dvc exp show`` print.

Provenance: the git revision the run started from and the parameters that differ from
params.yaml as committed at that revision (what ``dvc exp run -S`` changed).
"""

from __future__ import annotations

import medicsynth  # noqa: F401 - first import: pins the CPU code paths before numpy/torch load (numerics.py)

import argparse
import subprocess
from pathlib import Path

import yaml

from medicsynth.io import write_json, write_text
from medicsynth.params import load_params, require, section
from medicsynth.report import Provenance, ReportConfig, ReportInputs, build_report
from medicsynth.report_data import headline_summary, read_json_opt
from medicsynth.vega import versions

PUBLIC_HTML = "report/public.html"
PRIVATE_HTML = "report/private.html"
SUMMARY_JSON = "metrics/summary.json"


def git(*args: str) -> str | None:
    """Output of a git command in the working directory, or None outside a repository."""
    try:
        return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    params = load_params(args.params)
    config = ReportConfig.from_params(section(params, "report"), require(section(params, "llm"), "llm", "prices"))
    rev = (git("rev-parse", "--short=12", "HEAD") or "").strip() or "unknown (not a git checkout)"
    committed = git("show", f"HEAD:{Path(args.params).as_posix()}")
    provenance = Provenance(
        git_revision=rev,
        params=params,
        default_params=yaml.safe_load(committed) if committed else None,
        defaults_label=f"params.yaml at {rev}" if committed else "params.yaml as committed (no git history)",
        versions=versions(),
    )
    inputs = ReportInputs()
    for path, with_images in ((PUBLIC_HTML, False), (PRIVATE_HTML, True)):
        result = build_report(inputs, config, provenance, with_images=with_images)
        write_text(result.html, path)
        print(f"report: {path} ({len(result.html) / 1e6:.1f} MB, {len(result.sections)} sections, {result.charts} charts)")
    summary = headline_summary(read_json_opt("metrics/compare.json"), read_json_opt("metrics/merge.json"))
    write_json(summary, SUMMARY_JSON)
    print(f"report: {SUMMARY_JSON}")


if __name__ == "__main__":
    main()
