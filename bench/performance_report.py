"""Turn ``device_check.json`` (bench/device_check.py on a GPU) into docs/PERFORMANCE.md's GPU section.

Only what the report holds is written: a step that failed, timed out or was skipped is listed
as such, and a target is called met only when the figure it needs was measured. The section
sits between two marker comments in the document and is replaced whole, so rerunning with a
newer report updates it in place.

    .venv/bin/python bench/performance_report.py /work/.device/.../device_check.json
    .venv/bin/python bench/performance_report.py report.json --print   # show, write nothing
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from medicsynth.io import write_text

DOC = REPO / "docs" / "PERFORMANCE.md"
BEGIN, END = "<!-- device-results:begin -->", "<!-- device-results:end -->"

# Anchors measured on one H100 by the project's maintainers (2026-11-25, DEVELOPERS.md), on
# reference code, not this repository's.
TRAIN_ANCHORS = {"model": 3961, "dali+model": 3790, "dali": 12571, "torch": 1223}
GENERATE_ANCHORS = {"defaults_b1": 0.70, "defaults_b16": 4.91, "b16_cl_fused_compile": 6.45}
GENERATE_TARGET = 9.0  # img/s, SD 1.5 architecture, 512², 30 steps, CFG (issue 5)
FED_TARGET = 0.90  # loader-fed training ≥ 90% of the device-resident step rate (issue 2)


def _steps(report: dict) -> dict[str, dict]:
    return {s["name"]: s for s in report["steps"]}


def _status_note(step: dict) -> str:
    note = f": {step['note']}" if step.get("note") else ""
    return f"{step['status']} after {step['seconds']:.0f} s (limit {step['limit_s']:.0f} s){note}"


def train_section(step: dict | None) -> list[str]:
    if step is None:
        return ["Training throughput: not run in this report."]
    r = step.get("result")
    if step["status"] != "ok" or not r:
        return [f"Training throughput: {_status_note(step)}."]
    cfg, results = r["config"], r["results"]
    lines = [
        f"Training throughput (`bench/train_throughput.py`): {cfg['arch']} + 4 heads, bf16 autocast, "
        f"channels_last, AdamW, batch {cfg['batch_size']}, {cfg['crop']}² crops of "
        f"{r['dataset']['images']} generated {r['dataset']['width']}×{r['dataset']['height']} JPEGs "
        f"({r['dataset']['mean_kB']} kB mean); {cfg['steps']} timed train steps, "
        f"{cfg['loader_steps']} timed loader batches, after {cfg['warmup']} warm-up ones. DALI {r.get('dali')}.",
        "",
        "| case | images/s | vs device-resident | H100 anchor |",
        "|---|---|---|---|",
    ]
    ceiling = results["model"]["images_per_s"]
    for case, v in results.items():
        anchor = f"{TRAIN_ANCHORS[case]:,}" if case in TRAIN_ANCHORS else "—"
        if "images_per_s" not in v:
            lines.append(f"| {case} | not measured ({v.get('skipped', 'skipped')}) | — | {anchor} |")
            continue
        lines.append(f"| {case} | {v['images_per_s']:,.0f} | {v['images_per_s'] / ceiling:.0%} | {anchor} |")
    fed = results.get("dali+model", {})
    if "images_per_s" in fed:
        share = fed["images_per_s"] / ceiling
        verdict = "met" if share >= FED_TARGET else "not met"
        lines += ["", f"Target (DALI-fed training ≥ {FED_TARGET:.0%} of the device-resident rate): "
                      f"**{verdict}**, {share:.1%}."]
    else:
        lines += ["", f"Target (DALI-fed training ≥ {FED_TARGET:.0%} of the device-resident rate): "
                      "not measured (DALI not importable on the machine)."]
    return lines


def generate_section(steps: dict[str, dict]) -> list[str]:
    gen = {name.split(":", 1)[1]: s for name, s in steps.items() if name.startswith("generate:")}
    if not gen:
        return ["Generation throughput: not run in this report."]
    works = sorted({(s.get("result") or {}).get("work", "") for s in gen.values()} - {""})
    lines = [
        "Generation throughput (`bench/generate_throughput.py`, the generate stage's own `Renderer` and "
        "`render_jobs`): SD 1.5 architecture with random weights (UNet 859.5M, VAE 83.7M, CLIP ViT-L/14 text "
        f"123.1M parameters), {' / '.join(works) or 'work not recorded'}, DPM-Solver++, VAE decode and JPEG "
        "write included; warm-up batches (compilation, autotuning) excluded from the rate and shown separately.",
        "",
        "| variant | batch | images/s | warm-up s | peak GiB | H100 anchor | status |",
        "|---|---|---|---|---|---|---|",
    ]
    best = None
    for variant, s in gen.items():
        anchor = f"{GENERATE_ANCHORS[variant]:.2f}" if variant in GENERATE_ANCHORS else "—"
        res = (s.get("result") or {}).get("results") or []
        if s["status"] != "ok" or not res:
            lines.append(f"| {variant} | — | — | — | — | {anchor} | {_status_note(s)} |")
            continue
        g = res[0]
        lines.append(f"| {variant} | {g['batch_size']} | {g['images_per_second']:.2f} | {g['warmup_seconds']:.0f} | "
                     f"{g.get('peak_memory_gib', '—')} | {anchor} | ok, {g['images']} timed images |")
        if best is None or g["images_per_second"] > best[1]:
            best = (variant, g["images_per_second"])
    if best is None:
        lines += ["", f"Target (≥ {GENERATE_TARGET} img/s): not measured."]
    else:
        verdict = "met" if best[1] >= GENERATE_TARGET else "not met"
        lines += ["", f"Target (≥ {GENERATE_TARGET} img/s at equal work): **{verdict}**; best `{best[0]}` at "
                      f"{best[1]:.2f} img/s."]
    return lines


def render(report: dict, source: str = "") -> str:
    if report.get("smoke"):
        raise ValueError("this is a --smoke report: its numbers mean nothing and do not belong in PERFORMANCE.md")
    env, steps = report["environment"], _steps(report)
    device = env.get("device") or env.get("nvidia_smi", "unknown device")
    lines = [
        f"### {device}, {report['started'][:10]}",
        "",
        f"Measured by `bash bench/device_check.sh` (`bench/device_check.py`, budget {report['budget_s']:.0f} s, "
        f"{report.get('elapsed_s', 0):.0f} s used) on one {device} "
        f"({env.get('memory_gib', '?')} GiB, {env.get('multiprocessors', '?')} SMs, `nvidia-smi`: {env.get('nvidia_smi', '?')}), "
        f"{env.get('cpu_count', '?')} CPU cores; Python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda', '?')}), "
        f"torchvision {env.get('torchvision')}, diffusers {env.get('diffusers')}, transformers {env.get('transformers')}, "
        f"DALI {env.get('nvidia.dali')}." + (f" Report: `{source}`." if source else ""),
        "",
    ]
    ceil = steps.get("ceilings")
    if ceil and ceil["status"] == "ok" and ceil.get("result"):
        m, c = ceil["result"]["matmul"], ceil["result"]["copy"]
        lines += [f"Ceilings (`bench/gpu_ceilings.py`): {m['dtype']} matmul {m['n']}³ **{m['tflops']:.0f} TFLOP/s** "
                  f"(random data, median of repeats, relative error {m['relative_error']:.1e}); device copy "
                  f"**{c['tb_per_s_read_plus_write']:.2f} TB/s** (read + write, {c['bytes'] / 2**30:.0f} GiB).", ""]
    elif ceil:
        lines += [f"Ceilings: {_status_note(ceil)}.", ""]
    lines += train_section(steps.get("train")) + [""] + generate_section(steps)
    return "\n".join(lines) + "\n"


def update_doc(doc: Path, section: str) -> None:
    """Replace the text between the markers (or append markers and section at the end)."""
    text = doc.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{section}{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## GPU figures (measured)\n\n" + block + "\n"
    write_text(text, doc)  # atomic: an interrupted update never leaves half a document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="device_check.json from a GPU run")
    parser.add_argument("--doc", default=str(DOC))
    parser.add_argument("--print", action="store_true", help="print the section, write nothing")
    args = parser.parse_args(argv)
    try:
        report = json.loads(Path(args.report).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"refused: cannot read {args.report} as a device_check JSON report: {exc}", file=sys.stderr)
        return 2
    try:
        section = render(report, source=Path(args.report).name)
    except ValueError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    if args.print:
        print(section)
    else:
        update_doc(Path(args.doc), section)
        print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
