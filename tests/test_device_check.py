"""The GPU check's orchestration and report, on the CPU: time limits, skips, partial results, and
the rendering of measured figures into docs/PERFORMANCE.md (bench/device_check.py,
bench/performance_report.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
from bench import device_check, performance_report


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; it only waits for its parent to collect it.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] != "Z"


def test_timeout_ends_the_step_and_everything_it_started(tmp_path):
    child_pid = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time, pathlib\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"pathlib.Path({str(child_pid)!r}).write_text(str(c.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(120)\n"
    )
    step = device_check.Step("slow", [sys.executable, "-c", script], cap_s=60, min_s=0, report=tmp_path / "r.json")
    t0 = time.monotonic()
    with open(tmp_path / "log", "w+") as log:
        result = device_check.run_step(step, limit_s=3, log=log)
    assert result.status == "timeout" and result.returncode is None
    assert time.monotonic() - t0 < 30
    pid = int(child_pid.read_text())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the step's own child outlived the timeout"
    assert "started" in (tmp_path / "log").read_text()


def test_failed_step_keeps_its_last_line_and_a_silent_success_is_a_failure(tmp_path):
    with open(tmp_path / "log", "w+") as log:
        failed = device_check.run_step(
            device_check.Step("bad", [sys.executable, "-c", "raise SystemExit('no CUDA device here')"], 60, 0,
                              report=tmp_path / "none.json"), 30, log)
        silent = device_check.run_step(
            device_check.Step("silent", [sys.executable, "-c", "pass"], 60, 0, report=tmp_path / "none.json"), 30, log)
        report = tmp_path / "ok.json"
        ok = device_check.run_step(
            device_check.Step("ok", [sys.executable, "-c", f"open({str(report)!r}, 'w').write('{{\"x\": 1}}')"],
                              60, 0, report=report), 30, log)
    assert failed.status == "failed" and failed.returncode == 1 and failed.note == "no CUDA device here"
    assert silent.status == "failed" and "wrote no report" in silent.note
    assert ok.status == "ok" and ok.result == {"x": 1}


@pytest.mark.slow
def test_budget_skips_steps_that_cannot_fit_and_records_why(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "device_check.py"), "--smoke", "--steps", "ceilings,train",
         "--budget", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "device_check.json").read_text())
    assert [(s["name"], s["status"]) for s in report["steps"]] == [("ceilings", "skipped"), ("train", "skipped")]
    assert "needs at least 20 s" in report["steps"][0]["note"]
    assert report["environment"]["torch"]
    assert "ceilings" in proc.stdout.splitlines()[-4]


def _gpu_report(**overrides) -> dict:
    """A device_check report shaped like one from a GPU run (the figures are test inputs)."""
    steps = [
        {"name": "ceilings", "status": "ok", "seconds": 9.0, "limit_s": 90, "note": "",
         "result": {"matmul": {"n": 8192, "dtype": "bfloat16", "tflops": 780.0, "relative_error": 3e-3},
                    "copy": {"bytes": 4 * 2**30, "tb_per_s_read_plus_write": 4.3}}},
        {"name": "train", "status": "ok", "seconds": 80.0, "limit_s": 240, "note": "",
         "result": {"dali": "2.4.0", "dataset": {"images": 8192, "width": 500, "height": 375, "mean_kB": 40.1},
                    "config": {"arch": "resnet50", "batch_size": 256, "crop": 224, "steps": 40,
                               "loader_steps": 60, "warmup": 12},
                    "results": {"model": {"images_per_s": 4000.0}, "dali+model": {"images_per_s": 3500.0},
                                "dali": {"images_per_s": 12000.0}, "torch": {"images_per_s": 1300.0}}}},
        {"name": "generate:defaults_b16", "status": "ok", "seconds": 50.0, "limit_s": 300, "note": "",
         "result": {"work": "512x512, 30 steps, CFG 7.5",
                    "results": [{"batch_size": 16, "images_per_second": 5.0, "warmup_seconds": 8.0,
                                 "images": 128, "peak_memory_gib": 20.1}]}},
        {"name": "generate:ours", "status": "timeout", "seconds": 300.0, "limit_s": 300, "note": "autotuning", "result": None},
    ]
    report = {"smoke": False, "started": "2026-12-02T10:00:00+00:00", "budget_s": 450, "elapsed_s": 440,
              "environment": {"device": "NVIDIA H200", "python": "3.12.3", "torch": "2.11.0", "cuda": "13.0",
                              "nvidia.dali": "2.4.0", "cpu_count": 16}, "steps": steps}
    report.update(overrides)
    return report


def test_report_states_verdicts_only_for_measured_figures():
    text = performance_report.render(_gpu_report())
    assert text.startswith("### NVIDIA H200, 2026-12-02")
    assert "| dali+model | 3,500 | 88% | 3,790 |" in text
    assert "**not met**, 87.5%" in text  # 3500 / 4000 < 90%
    assert "| ours | — | — | — | — | — | timeout after 300 s (limit 300 s): autotuning |" in text
    assert "**not met**; best `defaults_b16` at 5.00 img/s" in text
    assert "780 TFLOP/s" in text and "512x512, 30 steps, CFG 7.5" in text

    no_dali = _gpu_report()
    no_dali["steps"][1]["result"]["results"]["dali+model"] = {"skipped": "nvidia-dali is not importable"}
    assert "not measured (DALI not importable" in performance_report.render(no_dali)

    with pytest.raises(ValueError, match="smoke"):
        performance_report.render(_gpu_report(smoke=True))


def test_doc_section_is_replaced_in_place(tmp_path):
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text("# Performance\n\nintro\n")
    performance_report.update_doc(doc, "first\n")
    performance_report.update_doc(doc, "second\n")
    text = doc.read_text()
    assert text.count(performance_report.BEGIN) == 1 and "first" not in text and "second\n" in text
    assert text.startswith("# Performance\n\nintro\n")


def test_unreadable_report_is_refused_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "device_check.json"
    bad.write_text('{"steps": [')  # a call cut off while copying the file back
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text("# Performance\n")
    assert performance_report.main([str(bad), "--doc", str(doc)]) == 2
    assert str(bad) in capsys.readouterr().err
    assert doc.read_text() == "# Performance\n"
