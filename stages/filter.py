"""filter stage: the quality gate between generated images and training.

Reads ``data/synthetic/manifest.tsv`` (generate), the real training manifest (near-copy check)
and params ``filter``; writes the kept rows (``data/filtered/manifest.tsv``), every image's rule
outcomes (``data/filtered/decisions.tsv``), ``metrics/filter.json`` and ``plots/filter_grid.png``.
The rules are documented in :mod:`medicsynth.filtering`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from medicsynth.filtering import (
    FilterConfig,
    filter_synthetic,
    kept_manifest,
    llm_judge,
    load_prompt,
    plot_filter_grid,
)
from medicsynth.timing import write_metrics
from medicsynth.manifest import read_manifest, write_manifest, write_tsv
from medicsynth.params import load_params, section


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--synthetic", default="data/synthetic/manifest.tsv")
    ap.add_argument("--real", default="data/variants/relabelled/train.tsv")
    ap.add_argument("--out-dir", default="data/filtered")
    ap.add_argument("--metrics", default="metrics/filter.json")
    ap.add_argument("--plot", default="plots/filter_grid.png")
    ap.add_argument("--judge-system", default="prompts/judge_system.txt")
    ap.add_argument("--judge-user", default="prompts/judge_user.txt")
    ap.add_argument("--prompt-dir", default="prompts", help="holds refusal_fallback.txt")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    config = FilterConfig.from_params(section(params, "filter"))
    synthetic = read_manifest(args.synthetic)
    real = read_manifest(args.real, validate=False) if config.check_real_duplicates else None

    judge = None
    if config.method == "vlm":
        from medicsynth.llm import client_from_params, with_refusal_preface

        client = client_from_params(config.vlm)
        user = load_prompt(args.judge_user)
        # One retry after a refusal, with the project's academic-research preface (as caption
        # and relabel do); graphic disaster images are refused often.
        judge = llm_judge(client, load_prompt(args.judge_system), user,
                          fallback_prompt=with_refusal_preface(user, args.prompt_dir), desc="filter judge")

    result = filter_synthetic(synthetic, config, real=real, judge=judge)
    if config.method == "vlm":
        # Calls actually paid now vs answered from the cache, retries, latency.
        result.metrics["judge"]["usage"] = client.usage.as_dict()

    out_dir = Path(args.out_dir)
    write_tsv(result.decisions, out_dir / "decisions.tsv")
    write_manifest(kept_manifest(result.kept), out_dir / "manifest.tsv")
    write_metrics(result.metrics, args.metrics, "filter")  # judge latencies -> timing/filter.json
    plot_filter_grid(result.decisions, args.plot, per_class=config.grid_per_class)

    m = result.metrics
    rejected = ", ".join(f"{k} {v}" for k, v in m["rejected"].items() if v)
    print(f"filter ({config.method}): kept {m['kept']}/{m['total']} ({m['kept_share']}); "
          f"rejected: {rejected or 'none'}")
    if "classifier" in m:
        print("agreement with intended labels (original model, all decodable):", m["classifier"]["agreement"])


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
