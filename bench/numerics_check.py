"""Check: do two machines compute the same bits? (CPU numerics across processors and vendors)

Importing ``medicsynth`` pins PyTorch's and NumPy's CPU code paths (``medicsynth/numerics.py``:
ATen and oneDNN at AVX2, MKL's vendor-neutral ``COMPATIBLE`` branch, OpenBLAS's Haswell kernels,
oneDNN and NNPACK convolutions off) so that a stage computes the same bytes on an Intel and an AMD
processor. This script gives a fingerprint to compare between machines: it trains the demo
classifier (``small_cnn`` + 4 heads: convolutions, matrix products, reductions, AdamW) for a few
steps on seeded random data and prints the sha256 of the weights, once per numerics mode, each in
a fresh process (the libraries read their variables once):

- ``pipeline``: what every stage runs (the settings above);
- ``fast``: PyTorch's own choices (MKL's ``AUTO`` branch, oneDNN and NNPACK on, ATen still at
  AVX2), the faster path whose bits depend on the processor's vendor and cache sizes.

Run it on two machines and compare the lines: equal ``pipeline`` hashes mean a ``dvc.lock``
written on one reproduces on the other. Recorded results are in docs/PERFORMANCE.md ("Numerics
across machines").

    .venv/bin/python bench/numerics_check.py [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time

#: Extra environment per mode (a variable the user sets wins over medicsynth's pin).
MODES = {
    "pipeline": {},
    "fast": {"MKL_CBWR": "AUTO"},
}


def cpu_name() -> str:
    """``vendor_id`` and ``model name`` of /proc/cpuinfo, or ``platform.processor()``."""
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return f"{fields.get('vendor_id', '?')} / {fields.get('model name', '?')}"


def fingerprint(steps: int, threads: int, fast: bool) -> dict:
    """Train small_cnn for ``steps`` seeded steps; sha256 of its weights (in this process)."""
    import medicsynth  # noqa: F401 - pins the code paths before torch initialises
    import torch

    from medicsynth.labels import NUM_CLASSES, TASKS
    from medicsynth.models import build_classifier

    if fast:
        torch.backends.mkldnn.enabled = True
        torch.backends.nnpack.set_flags(True)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_classifier("small_cnn", pretrained=False, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        x = torch.rand(16, 3, 40, 40, generator=gen)
        ys = {t: torch.randint(0, NUM_CLASSES[t], (16,), generator=gen) for t in TASKS}
        out = model(x)
        loss = sum(torch.nn.functional.cross_entropy(out[t], ys[t]) for t in TASKS)
        opt.zero_grad()
        loss.backward()
        opt.step()
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    return {"sha256": digest.hexdigest(), "loss": float(loss.detach()), "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)  # one child run
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(fingerprint(args.steps, args.threads, args.mode == "fast")))
        return
    print(f"cpu: {cpu_name()}; torch threads: {args.threads}; steps: {args.steps}")
    for mode, extra in MODES.items():
        env = {**os.environ, **extra}
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--steps", str(args.steps),
                              "--threads", str(args.threads)], env=env, capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode:9s} {result['sha256']}  (final loss {result['loss']:.6f}; {result['seconds']:.2f} s)")


if __name__ == "__main__":
    main()
