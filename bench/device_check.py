"""Every GPU figure docs/PERFORMANCE.md needs, in one call on the lent GPU machine, in a budget.

The lent machine comes for minutes (docs/PERFORMANCE.md, "Measuring on a lent GPU"), so the
checks run as one prepared script. Steps, in the order the open issues need them:

==========================  =====================================================================
``env``                     ``nvidia-smi``, python, torch/CUDA, diffusers/transformers/DALI versions
``ceilings``                ``bench/gpu_ceilings.py``: bf16 matrix rate, device copy bandwidth
``train``                   ``bench/train_throughput.py``: ResNet50 + 4 heads alone, fed by DALI
                            ``mixed`` decoding, DALI alone, torchvision DataLoader, the train
                            stage's own loop
``generate:<variant>``      ``bench/generate_throughput.py --variants <variant>``, one process per
                            variant (``--variants``), so one long compilation costs its own step only
==========================  =====================================================================

Each step is a subprocess with a time limit: ``min(its cap, what is left of --budget)``; a step
that would start with less than its minimum left is skipped, and the skip is recorded. After
every step ``<out>/device_check.json`` is rewritten and the step's output appended to
``<out>/device_check.log``, so a call cut short still brings back every finished step. A short
table is printed last. ``bench/performance_report.py`` turns the JSON into docs/PERFORMANCE.md.

On the GPU machine (after carrying wheels and DALI, see bench/device_check.sh)::

    bash bench/device_check.sh            # = python3 bench/device_check.py --out "$OUT"

Here, on a CPU, ``--smoke`` runs every step's smoke mode to prove the wiring (numbers mean nothing)::

    .venv/bin/python bench/device_check.py --smoke --out /tmp/device_check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
from medicsynth.io import write_json
# Cheapest and most telling first: this card's baseline, then the speed options without and with
# autotuning (compilation takes minutes), then the anchors' other configurations if time is left.
DEFAULT_VARIANTS = ("defaults_b16,ours_default_compile,ours,ours_reduce_overhead,ours_cudnn_attn,"
                    "defaults_b1,b16_cl_fused_compile")


@dataclass
class Step:
    """One subprocess: ``cmd`` writes its JSON report to ``report`` (or prints it, for ``env``)."""

    name: str
    cmd: list[str]
    cap_s: float  # never runs longer than this
    min_s: float  # not started with less than this left of the budget
    report: Path | None = None


@dataclass
class StepResult:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float
    limit_s: float
    returncode: int | None = None
    cmd: list[str] = field(default_factory=list)
    result: dict | None = None
    note: str = ""


def run_step(step: Step, limit_s: float, log) -> StepResult:
    """Run ``step`` for at most ``limit_s`` seconds, its output appended to ``log``.

    The step gets its own process group, so a timeout also ends whatever it started (compile
    workers, DataLoader workers, DALI threads live in the same group).
    """
    log.write(f"\n===== {step.name}: {' '.join(step.cmd)} (limit {limit_s:.0f} s)\n")
    log.flush()
    offset = log.tell()
    t0 = time.monotonic()
    proc = subprocess.Popen(step.cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        rc = proc.wait(timeout=limit_s)
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        rc, status = None, "timeout"
    seconds = time.monotonic() - t0
    result, note = None, ""
    if step.report is not None and step.report.exists():
        try:
            result = json.loads(step.report.read_text(encoding="utf-8"))
        except ValueError as exc:
            note = f"unreadable report {step.report}: {exc}"
    elif status == "ok" and step.report is not None:
        status, note = "failed", f"exited 0 but wrote no report at {step.report}"
    if status != "ok" and not note:
        note = _last_line(log.name, offset) or f"exit code {rc}"
    log.write(f"===== {step.name}: {status} in {seconds:.1f} s\n")
    log.flush()
    return StepResult(step.name, status, round(seconds, 1), round(limit_s, 1), rc, step.cmd, result, note)


def _last_line(path: str, offset: int) -> str:
    """The last non-empty line a step printed (its error, usually), for the summary table."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        lines = [ln.strip() for ln in fh.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def environment() -> dict:
    """What the figures were measured on (read here, in the orchestrator's own interpreter)."""
    info: dict = {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                  "host": platform.node()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi"] = f"unavailable: {exc}"
    for module in ("torch", "torchvision", "diffusers", "transformers", "accelerate", "nvidia.dali"):
        try:
            mod = __import__(module, fromlist=["__version__"])
            info[module] = getattr(mod, "__version__", "?")
        except Exception as exc:  # a broken install is worth recording, not fatal
            info[module] = f"not importable: {type(exc).__name__}: {exc}"
    try:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(device=props.name, multiprocessors=props.multi_processor_count,
                        memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                        capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    except Exception as exc:
        info["cuda_available"] = f"error: {exc}"
    return info


def plan(args: argparse.Namespace, work: Path) -> list[Step]:
    py = sys.executable
    smoke = ["--smoke"] if args.smoke else []
    steps: list[Step] = []
    wanted = set(args.steps.split(","))
    if "ceilings" in wanted:
        steps.append(Step("ceilings", [py, str(BENCH / "gpu_ceilings.py"), *smoke, "--out", str(work / "ceilings.json")],
                          cap_s=90, min_s=20, report=work / "ceilings.json"))
    if "train" in wanted:
        # A few hundred timed train steps per case (issue 2 asks for that much), fewer loader
        # batches than the script's defaults: the budget is minutes.
        sizes = [] if args.smoke else ["--warmup", "12", "--steps", "200", "--loader-steps", "60"]
        steps.append(Step("train", [py, str(BENCH / "train_throughput.py"), *smoke, *sizes,
                                    "--out", str(work / "train.json")],
                          cap_s=240, min_s=60, report=work / "train.json"))
    if "generate" in wanted:
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            report = work / f"generate_{variant}.json"
            images = [] if args.smoke else ["--images", str(args.images)]
            steps.append(Step(f"generate:{variant}",
                              [py, str(BENCH / "generate_throughput.py"), *smoke, "--variants", variant,
                               *images, "--out", str(report)],
                              cap_s=args.generate_cap, min_s=60 if not args.smoke else 5, report=report))
    return steps


def summary_lines(report: dict) -> list[str]:
    """The short table printed last (the device tool returns only the end of the output)."""
    lines = [f"device: {report['environment'].get('device') or report['environment'].get('nvidia_smi')}",
             f"{'step':<34} {'status':<8} {'seconds':>8}  figure"]
    for s in report["steps"]:
        lines.append(f"{s['name']:<34} {s['status']:<8} {s['seconds']:>8.1f}  {_figure(s)}")
    return lines


def _figure(step: dict) -> str:
    r = step.get("result") or {}
    if step["name"] == "ceilings" and r:
        return f"{r['matmul']['tflops']:.0f} TFLOP/s {r['matmul']['dtype']} matmul, {r['copy']['tb_per_s_read_plus_write']:.2f} TB/s copy"
    if step["name"] == "train" and r:
        parts = []
        for case, v in r.get("results", {}).items():
            parts.append(f"{case} {v['images_per_s']:.0f}" if "images_per_s" in v else f"{case} skipped")
        return "img/s: " + ", ".join(parts)
    if step["name"].startswith("generate:") and r.get("results"):
        g = r["results"][0]
        return f"{g['images_per_second']:.2f} img/s (batch {g['batch_size']}, warm-up {g['warmup_seconds']:.0f} s)"
    return step.get("note", "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=520,
                        help="seconds for all steps together (520: fits one 600 s device call with DALI's install)")
    parser.add_argument("--steps", default="ceilings,train,generate", help="which steps (env always runs)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"generate variants, in order ({DEFAULT_VARIANTS})")
    parser.add_argument("--images", type=int, default=128, help="timed images per generate variant (128)")
    parser.add_argument("--generate-cap", type=float, default=300, help="seconds at most per generate variant (300)")
    parser.add_argument("--smoke", action="store_true", help="every step's CPU smoke mode: proves the wiring only")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results" / "device"))
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Step reports live outside ``out``: the device tool brings back at most 8 files, and
    # device_check.json holds every one of them anyway.
    work = Path(tempfile.mkdtemp(prefix="device_check_"))
    start = time.monotonic()
    report = {"benchmark": "device_check", "smoke": args.smoke,
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "budget_s": args.budget, "environment": environment(), "steps": []}
    json_path = out / "device_check.json"
    write_json(report, json_path)
    with open(out / "device_check.log", "a", encoding="utf-8") as log:
        for step in plan(args, work):
            left = args.budget - (time.monotonic() - start)
            if left < step.min_s:
                result = StepResult(step.name, "skipped", 0.0, 0.0, cmd=step.cmd,
                                    note=f"{left:.0f} s of the budget left, needs at least {step.min_s:.0f} s")
            else:
                result = run_step(step, min(step.cap_s, left), log)
            report["steps"].append(asdict(result))
            report["elapsed_s"] = round(time.monotonic() - start, 1)
            write_json(report, json_path)
            print(f"{result.name}: {result.status} in {result.seconds:.0f} s  {_figure(asdict(result))}", flush=True)
    print("\n".join(["", *summary_lines(report)]))
    print(f"\nwrote {json_path}")
    return 0 if all(s["status"] in ("ok", "skipped") for s in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
