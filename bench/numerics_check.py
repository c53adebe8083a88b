"""Check: do two machines compute the same bits? (CPU numerics across processors and vendors)

``medicsynth/numerics.py`` has two modes (params.yaml ``numerics``): ``fast`` pins the CPU code
paths per instruction set (the same bits on machines of one vendor), ``vendor_neutral`` also runs
MKL's COMPATIBLE branch with oneDNN and NNPACK off (the same bits on Intel and AMD by design).
This script gives a fingerprint to compare between machines: it trains the demo classifier
(``small_cnn`` + 4 heads: convolutions, matrix products, reductions, AdamW) for a few steps on
seeded random data and prints the sha256 of the weights, once per mode, each in a fresh process
(the libraries read their variables once).

Run it on two machines and compare the lines: equal ``vendor_neutral`` hashes on an Intel and an
AMD machine are the measurement the mode still lacks. Recorded results are in
docs/PERFORMANCE.md ("Numerics across machines").

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

from medicsynth.numerics import MODE_ENV, MODES as NUMERICS_MODES

#: Extra environment per mode: the variable through which a stage hands its mode to workers.
MODES = {mode: {MODE_ENV: mode} for mode in NUMERICS_MODES}


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


def fingerprint(steps: int, threads: int) -> dict:
    """Train small_cnn for ``steps`` seeded steps; sha256 of its weights (in this process)."""
    import medicsynth  # noqa: F401 - pins the code paths (and the mode's) before torch initialises
    import torch

    from medicsynth.labels import NUM_CLASSES, TASKS
    from medicsynth.models import build_classifier
    from medicsynth.numerics import mkl_cbwr_branch

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
    return {"sha256": digest.hexdigest(), "loss": float(loss.detach()), "seconds": time.perf_counter() - start,
            "mkl_branch": mkl_cbwr_branch(), "onednn": torch.backends.mkldnn.enabled}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", choices=sorted(MODES), help=argparse.SUPPRESS)  # one child run
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(fingerprint(args.steps, args.threads)))
        return
    print(f"cpu: {cpu_name()}; torch threads: {args.threads}; steps: {args.steps}")
    for mode, extra in MODES.items():
        env = {**os.environ, **extra}
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--steps", str(args.steps),
                              "--threads", str(args.threads)], env=env, capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode:14s} {result['sha256']}  (final loss {result['loss']:.6f}; {result['seconds']:.2f} s; "
              f"MKL branch {result['mkl_branch']}, oneDNN {'on' if result['onednn'] else 'off'})")


if __name__ == "__main__":
    main()
