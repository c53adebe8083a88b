"""generate: render the caption plan into synthetic training images.

Reads ``data/captions/captions.tsv`` and the ``generate`` section of params.yaml; writes
``data/synthetic/images/{id}.jpg`` (kept between runs: only missing or stale images are
rendered), or with ``storage.layout`` resolving to shards ``data/synthetic/images/synthetic-NNNNNN.tar``
(same resume guarantees), ``data/synthetic/manifest.tsv`` and ``metrics/generate.json``.

One process: ``python stages/generate.py``. Several GPUs (or CPU processes), same outputs:
``accelerate launch --num_processes 8 stages/generate.py`` (add ``--cpu`` without GPUs); each
process renders its share and the main process writes the manifest and metrics.
"""

from __future__ import annotations

import medicsynth  # noqa: F401 - first import: pins the CPU code paths before numpy/torch load (numerics.py)

import argparse
import os
from pathlib import Path

# Never reach the network for models: a hub id must already be in the local cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from accelerate import PartialState

from medicsynth.diffusion.generate import GenerateOptions, generate_plan
from medicsynth.timing import write_metrics, write_timing

# What this run did (how many images it rendered or found already rendered, per process) depends
# on what an earlier, possibly killed run left behind, not only on data, code and params: it goes
# to timing/generate.json with the wall-clock figures, never into the cached metrics. So does the
# count of leftover images of an earlier plan it deleted (a fresh clone deletes none).
RUN_KEYS = ("skipped", "stale_rerendered", "rendered", "removed_files_not_in_plan", "processes", "per_process")
from medicsynth.numerics import apply_params as apply_numerics
from medicsynth.params import load_params, section
from medicsynth.shards import per_shard_from_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--captions", default="data/captions/captions.tsv")
    parser.add_argument("--images", default="data/synthetic/images")
    parser.add_argument("--manifest", default="data/synthetic/manifest.tsv")
    parser.add_argument("--metrics", default="metrics/generate.json")
    parser.add_argument("--demo-dir", default="models/diffusion/demo")
    args = parser.parse_args()

    params = load_params(args.params)
    apply_numerics(params)
    opts = GenerateOptions.from_params(section(params, "generate"))
    prices = (params.get("llm") or {}).get("prices") if opts.backend == "openai" else None
    metrics = generate_plan(args.captions, args.images, args.manifest, opts, demo_dir=args.demo_dir, prices=prices,
                            per_shard=per_shard_from_params(params))
    state = PartialState()
    if state.is_main_process:  # only the main process has the complete picture
        run = {k: metrics.pop(k) for k in RUN_KEYS if k in metrics}
        timing = write_metrics(metrics, args.metrics, "generate")  # seconds, img/s -> timing/generate.json
        write_timing("generate", {**timing, "run": run})
        print(f"generate: {run['rendered']} rendered, {run['skipped']} skipped, "
              f"{metrics['blank_flagged']} blank-flagged, {metrics['quarantined']} quarantined, "
              f"{timing.get('images_per_second')} img/s")
    # Under a distributed launcher, leave the process group cleanly (gloo aborts otherwise).
    state.destroy_process_group()


if __name__ == "__main__":
    main()
