"""adapt: fit the text-to-image model that generate renders with.

``adapt.mode`` (params.yaml):

- ``demo`` (default): train a tiny latent-diffusion pipeline from scratch on the training images
  with label prompts, offline on a CPU in about five minutes → ``models/diffusion/demo`` (a
  standard diffusers ``StableDiffusionPipeline`` directory, ``generate.model: demo``).
- ``lora``: LoRA (peft) on a local base model's denoiser, any family read from its
  ``model_index.json``: SD 1.x/2.x and SDXL (UNet), SD 3/3.5 and FLUX.1 (transformer, flow matching, as
  diffusers' DreamBooth-LoRA scripts), GPU, bf16, gradient checkpointing, template captions →
  ``models/diffusion/lora`` (set ``generate.model`` to the base model and
  ``generate.lora: models/diffusion/lora``). See :mod:`medicsynth.diffusion.lora`.
- ``off``: nothing is trained; ``models/diffusion/ADAPT_OFF`` records that.

Outputs: ``models/diffusion/``, ``metrics/adapt.json``, ``plots/adapt_loss.png``; wall-clock
figures (seconds, steps/s) go to ``timing/adapt.json`` (not tracked: steps decide the model).
"""

from __future__ import annotations

import medicsynth  # noqa: F401 - first import: pins the CPU code paths before numpy/torch load (numerics.py)

import argparse
import os
import time
from pathlib import Path

# Never reach the network for models: a hub id must already be in the local cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

from medicsynth.diffusion.tiny import label_prompt
from medicsynth.diffusion.lora import adapt_lora
from medicsynth.diffusion.train import (
    DemoTrainConfig,
    atomic_dir,
    demo_metrics,
    load_images,
    save_demo_pipeline,
    train_demo,
)
from medicsynth.io import write_json
from medicsynth.manifest import read_manifest
from medicsynth.numerics import apply_params as apply_numerics
from medicsynth.params import load_params, require, section
from medicsynth.plots import plot_diffusion_losses, plot_placeholder
from medicsynth.timing import write_timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="models/diffusion")
    parser.add_argument("--metrics", default="metrics/adapt.json")
    parser.add_argument("--plot", default="plots/adapt_loss.png")
    args = parser.parse_args()

    params = load_params(args.params)
    apply_numerics(params)
    p = section(params, "adapt")
    mode = require(p, "adapt", "mode")
    if mode is False:  # YAML 1.1 reads a bare `off` as false
        mode = "off"
    out, plot = Path(args.out), Path(args.plot)
    if require(p, "adapt", "threads"):
        # On a shared 2-core machine one thread trained 20× faster than two (OpenMP spin-waits).
        torch.set_num_threads(int(p["threads"]))

    if mode == "off":
        atomic_dir(out, lambda tmp: (tmp / "ADAPT_OFF").write_text(
            "adapt.mode is off: no model was trained\n", encoding="utf-8"))
        write_json({"mode": "off"}, args.metrics)
        write_timing("adapt", {})
        plot_placeholder(plot, "adapt.mode: off — nothing trained")
        return

    manifest_path = require(p, "adapt", "train_manifest")
    df = read_manifest(manifest_path)
    df = df[df["split"] == "train"].reset_index(drop=True)
    balance = require(p, "adapt", "balance") or None
    t0 = time.perf_counter()

    if mode == "demo":
        cfg = DemoTrainConfig.from_params({**require(p, "adapt", "demo"), "balance": balance or "", "seed": require(p, "adapt", "seed")})
        images = load_images(df["file"].tolist(), cfg.tiny.image_size)
        prompts = [label_prompt(r) for r in df.to_dict("records")]
        pipe, logs = train_demo(images, prompts, df[balance].tolist() if balance else None, cfg)
        meta = {
            "prompt_source": "labels",
            "trained_by": "medicsynth adapt (demo)",
            "train_manifest": str(manifest_path),
            "train_images": len(df),
            "tiny_config": cfg.tiny.to_dict(),
        }
        atomic_dir(out, lambda tmp: save_demo_pipeline(pipe, tmp / "demo", meta))
        metrics = demo_metrics(cfg, pipe, logs, len(df))
    elif mode == "lora":
        # Any family (SD 1.x/2.x, SD 3/3.5, FLUX.1), read from the base model's model_index.json.
        logs, metrics = adapt_lora(p, df, out)
    else:
        raise ValueError(f"adapt.mode must be demo, lora or off, got {mode!r}")

    write_json(metrics, args.metrics)
    # cpu_seconds (user+sys of this process) ≈ the wall time on an idle machine with threads: 1.
    write_timing("adapt", {"seconds_wall": round(time.perf_counter() - t0, 2),
                           "cpu_seconds": round(time.process_time(), 2),
                           "phases": {n: log.timing() for n, log in logs.items()}})
    plot_diffusion_losses(logs, plot)
    print(f"adapt {mode}: " + ", ".join(f"{n} {log.steps} steps in {log.seconds:.0f}s" for n, log in logs.items()))


if __name__ == "__main__":
    main()
