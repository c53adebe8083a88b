"""Benchmark: training throughput (images/s) with and without the input pipeline, on a GPU.

Generates ``--images`` photo-like 500x375 JPEGs, then measures four cases:

a. ``model``: ResNet50 + 4 heads train step (bf16 autocast, channels_last, AdamW) on one
   device-resident batch: the ceiling set by the GPU's compute.
b. ``dali+model``: the same step fed by ``make_loader(backend="dali", device="cuda")``.
c. ``dali``: the DALI loader alone (GPU decode, resize, crop, flip, normalise, copy to torch).
d. ``torch``: the torchvision ``DataLoader`` backend alone (PIL decode in ``--torch-workers``
   processes, normalisation on the GPU).
e. ``train_loop``: the train stage's own loop, ``medicsynth.training.train_classifier`` (DALI
   when importable, LR schedule, loss accumulation), for ``--loop-epochs`` epochs without a dev
   set; its rate is over the whole run, the first epoch's cuDNN autotuning and pipeline build
   included, so it sits below case b by that start-up cost.

Each case runs ``--warmup`` untimed steps (cuDNN autotuning, pipeline start-up, page cache),
then ``--steps`` timed ones; the timer is read after ``torch.cuda.synchronize()``. Loader cases
cycle through epochs with ``set_epoch``, so epoch restarts are part of the measured cost.
Prints a table (``vs model``: images/s over case a's; for the loader-only cases c and d, above
100% means the loader can feed the model) and writes a JSON report.

On the GPU machine (DALI installed, see ../shared/device/carry-dali.sh):

    python3 bench/train_throughput.py --out $OUT/train_throughput.json

Here, without CUDA, only the smoke mode runs (tiny images, resnet18, a few steps on CPU) to
prove the script end to end; its numbers mean nothing:

    .venv/bin/python bench/train_throughput.py --smoke
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
import numpy as np
import torch
from PIL import Image
from torch import nn

from medicsynth.io import write_json
from medicsynth.labels import NUM_CLASSES, TASKS
from medicsynth.loaders import dali_available, make_loader
from medicsynth.models import build_classifier
from medicsynth.params import load_params
from medicsynth.training import TrainConfig, train_classifier


def _write_jpegs(args: tuple[str, int, int, int, int]) -> list[int]:
    directory, start, stop, width, height = args
    sizes = []
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        # Smooth colour fields plus sensor-like noise: compresses like a photo (tens of kB at
        # 500x375, q90), unlike pure noise (much larger, slower to decode) or flat colour.
        low = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), np.int16)
        noisy = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        path = Path(directory) / f"bench_{i:06d}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        sizes.append(path.stat().st_size)
    return sizes


def make_dataset(directory: Path, n: int, width: int, height: int) -> tuple[list[str], float]:
    """``n`` JPEGs in ``directory`` (kept if already there); returns paths and mean size in kB."""
    directory.mkdir(parents=True, exist_ok=True)
    files = [str(directory / f"bench_{i:06d}.jpg") for i in range(n)]
    if not all(os.path.exists(f) for f in files):
        workers = max(1, min(16, os.cpu_count() or 1))
        chunk = max(1, -(-n // workers))
        jobs = [(str(directory), s, min(n, s + chunk), width, height) for s in range(0, n, chunk)]
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_jpegs, jobs))
    mean_kb = float(np.mean([os.path.getsize(f) for f in files])) / 1024
    return files, mean_kb


def random_labels(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, NUM_CLASSES[t], n) for t in TASKS], axis=1).astype(np.int64)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forever(loader):
    """Batches across epochs, reshuffling with ``set_epoch`` like a training loop does."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _timed(batches, step, warmup: int, steps: int, device: torch.device) -> dict:
    """Run ``step`` on ``warmup`` then ``steps`` batches; images/s over the timed ones."""
    images = 0
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        step(x, y)
        if i >= warmup:
            images += len(x)
        if i + 1 == warmup + steps:
            break
    _sync(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": images / seconds, "images": images, "steps": steps, "seconds": seconds}


class TrainStep:
    """One optimiser step of the multi-task classifier: the training loop's inner work."""

    def __init__(self, arch: str, device: torch.device, channels_last: bool):
        self.device = device
        self.model = build_classifier(arch, pretrained=False, dropout=0.2).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.optimiser = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.loss = nn.CrossEntropyLoss()
        self.bf16 = device.type == "cuda"

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(images)
            loss = sum(self.loss(logits[t].float(), labels[:, j]) for j, t in enumerate(TASKS))
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()


def _consume(images: torch.Tensor, labels: torch.Tensor) -> None:
    # Loader-only cases: the batch is on the device already; synchronising at the end of the
    # timed window accounts for any copy still in flight.
    pass


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    channels_last = device.type == "cuda"
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="bench_jpegs_"))
    t0 = time.perf_counter()
    files, mean_kb = make_dataset(data_dir, args.images, args.width, args.height)
    print(f"{len(files)} JPEGs {args.width}x{args.height} (mean {mean_kb:.1f} kB) in "
          f"{time.perf_counter() - t0:.1f}s at {data_dir}", flush=True)
    labels = random_labels(len(files), args.seed)
    common = dict(batch_size=args.batch_size, resize=args.resize, crop=args.crop, train=True,
                  seed=args.seed, device=device, channels_last=channels_last)
    results: dict[str, dict] = {}
    try:
        # (a) compute ceiling: one device-resident batch, reused.
        step = TrainStep(args.arch, device, channels_last)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(args.batch_size, 3, args.crop, args.crop, device=device)
        x = x.to(memory_format=fmt)
        y = torch.from_numpy(random_labels(args.batch_size, args.seed + 1)).to(device)
        results["model"] = _timed(iter(lambda: (x, y), None), step, args.warmup, args.steps, device)
        print(f"  model: {results['model']['images_per_s']:.0f} img/s", flush=True)

        if dali_available():
            # (b) the same step fed by the DALI loader (a fresh model: same work per step).
            step = TrainStep(args.arch, device, channels_last)
            loader = make_loader(files, labels, backend="dali", num_workers=args.dali_threads,
                                 **common)
            results["dali+model"] = _timed(_forever(loader), step, args.warmup, args.steps,
                                           device)
            print(f"  dali+model: {results['dali+model']['images_per_s']:.0f} img/s", flush=True)
            del loader, step
            # (c) the DALI loader alone.
            loader = make_loader(files, labels, backend="dali", num_workers=args.dali_threads,
                                 **common)
            results["dali"] = _timed(_forever(loader), _consume, args.warmup,
                                     args.loader_steps, device)
            print(f"  dali: {results['dali']['images_per_s']:.0f} img/s", flush=True)
            del loader
        else:
            for case in ("dali+model", "dali"):
                results[case] = {"skipped": "nvidia-dali is not importable"}
            print("  dali cases skipped: nvidia-dali is not importable", flush=True)

        # (d) the torchvision DataLoader backend alone.
        loader = make_loader(files, labels, backend="torch", num_workers=args.torch_workers,
                             **common)
        results["torch"] = _timed(_forever(loader), _consume, args.warmup, args.loader_steps,
                                  device)
        print(f"  torch: {results['torch']['images_per_s']:.0f} img/s", flush=True)
        del loader

        # (e) the training stage's own loop.
        # The recipe of params.yaml's train section, with the benchmark's sizes and loader.
        recipe = {**load_params(REPO / "params.yaml")["train"], "epochs": args.loop_epochs,
                  "batch_size": args.batch_size, "resize": args.resize, "crop": args.crop,
                  "loader": "dali" if dali_available() else "torch",
                  "num_workers": args.dali_threads if dali_available() else args.torch_workers,
                  "device": str(device), "cpu_threads": None, "lr": 1e-4}
        config = TrainConfig.from_params(recipe, "train", ignore=("archs", "seeds", "augment"),
                                         arch=args.arch, seed=args.seed, augment="none")
        loop = train_classifier(files, labels, None, None, config, progress=False)
        results["train_loop"] = {"images_per_s": loop.images_per_second, "epochs": args.loop_epochs,
                                 "steps": args.loop_epochs * -(-len(files) // args.batch_size),
                                 "seconds": loop.seconds, "loader": loop.loader_backend}
        print(f"  train_loop ({loop.loader_backend}): {loop.images_per_second:.0f} img/s", flush=True)
    finally:
        if not args.data_dir:
            shutil.rmtree(data_dir, ignore_errors=True)

    return {
        "benchmark": "train_throughput",
        "smoke": args.smoke,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or "cpu"),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dali": _dali_version(),
        "dataset": {"images": len(files), "width": args.width, "height": args.height,
                    "mean_kB": round(mean_kb, 1)},
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "data_dir")},
        "results": results,
    }


def _dali_version() -> str | None:
    if not dali_available():
        return None
    import nvidia.dali

    return nvidia.dali.__version__


def print_table(report: dict) -> None:
    results = report["results"]
    ceiling = results["model"]["images_per_s"]
    print(f"\n{report['device']} | torch {report['torch']} | DALI {report['dali']} | "
          f"{report['config']['arch']} batch {report['config']['batch_size']}")
    print(f"{'case':<12} {'images/s':>10} {'vs model':>9} {'timed steps':>12}")
    for case, r in results.items():
        if "skipped" in r:
            print(f"{case:<12} {'skipped':>10}   ({r['skipped']})")
            continue
        print(f"{case:<12} {r['images_per_s']:>10.0f} {r['images_per_s'] / ceiling:>8.0%} "
              f"{r['steps']:>12d}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny CPU run (64x48 images, resnet18, 3 steps) to test the script")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--images", type=int, default=None, help="JPEGs to generate (10240)")
    parser.add_argument("--width", type=int, default=None, help="JPEG width (500)")
    parser.add_argument("--height", type=int, default=None, help="JPEG height (375)")
    parser.add_argument("--resize", type=int, default=None, help="square resize (256)")
    parser.add_argument("--crop", type=int, default=None, help="crop size (224)")
    parser.add_argument("--batch-size", type=int, default=None, help="(256)")
    parser.add_argument("--arch", default=None, help="medicsynth.models arch (resnet50)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per case (15)")
    parser.add_argument("--steps", type=int, default=None, help="timed train steps (60)")
    parser.add_argument("--loader-steps", type=int, default=None,
                        help="timed batches for loader-only cases (120)")
    parser.add_argument("--dali-threads", type=int, default=None, help="DALI CPU threads (8)")
    parser.add_argument("--torch-workers", type=int, default=None, help="DataLoader workers (16)")
    parser.add_argument("--loop-epochs", type=int, default=None, help="epochs of the train_loop case (3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None,
                        help="keep/reuse the JPEGs here (default: a temporary folder, removed)")
    parser.add_argument("--out", default=None,
                        help="JSON report (bench/results/train_throughput.json; smoke: in /tmp)")
    args = parser.parse_args(argv)
    if args.smoke:
        defaults = dict(device="cpu", images=24, width=64, height=48, resize=40, crop=32,
                        batch_size=8, arch="resnet18", warmup=1, steps=3, loader_steps=3,
                        dali_threads=2, torch_workers=2, loop_epochs=1)
    else:
        defaults = dict(device="cuda", images=10240, width=500, height=375, resize=256, crop=224,
                        batch_size=256, arch="resnet50", warmup=15, steps=60, loader_steps=120,
                        dali_threads=8, torch_workers=16, loop_epochs=3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        # Smoke numbers mean nothing: keep them out of the repository's results.
        args.out = str(Path(tempfile.gettempdir()) / "train_throughput_smoke.json" if args.smoke
                       else REPO / "bench" / "results" / "train_throughput.json")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here; run on the GPU machine or use --smoke")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    print_table(report)
    write_json(report, args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
