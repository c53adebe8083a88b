"""The two ceilings every GPU figure in docs/PERFORMANCE.md is read against.

- **matrix rate**: a large bf16 matrix product (``torch.matmul``, cuBLAS) on random data,
  TFLOP/s = 2·n³ / time; the median of ``--repeats`` products after ``--warmup`` ones;
- **copy bandwidth**: a device-to-device copy of a large buffer, counting bytes read plus
  bytes written; the median of the same number of copies.

Both are timed with CUDA events around each call. Random inputs, never zeros (zeros run faster
on some chips). Only the GPU needs these; ``--smoke`` runs the same code on the CPU at tiny
sizes to prove the script, and its numbers mean nothing.

    python3 bench/gpu_ceilings.py --out ceilings.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from medicsynth.io import write_json


def _time(fn, warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds per call of ``fn``: CUDA events on a GPU, a synchronised host clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def matmul_rate(n: int, dtype: torch.dtype, device: torch.device, warmup: int, repeats: int) -> dict:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    times = _time(lambda: torch.matmul(a, b, out=c), warmup, repeats, device)
    # Check the product against a float64 reference on a slice: a fast wrong answer is no ceiling.
    ref = a[:64].double() @ b.double()
    rel = ((c[:64].double() - ref).norm() / ref.norm()).item()
    med = statistics.median(times)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "median_s": med,
            "tflops": 2 * n**3 / med / 1e12, "relative_error": rel}


def copy_bandwidth(n_bytes: int, device: torch.device, warmup: int, repeats: int) -> dict:
    src = torch.randint(0, 255, (n_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = _time(lambda: dst.copy_(src), warmup, repeats, device)
    if not torch.equal(dst[:: max(1, n_bytes // 4096)], src[:: max(1, n_bytes // 4096)]):
        raise AssertionError("device copy produced different bytes")
    med = statistics.median(times)
    return {"bytes": n_bytes, "median_s": med, "tb_per_s_read_plus_write": 2 * n_bytes / med / 1e12}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: proves the script only")
    parser.add_argument("--n", type=int, default=None, help="matrix size (8192; smoke 128)")
    parser.add_argument("--copy-gib", type=float, default=None, help="copy buffer in GiB (4; smoke 0.001)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here; run on the GPU machine or use --smoke")
    n = args.n or (128 if args.smoke else 8192)
    gib = args.copy_gib or (0.001 if args.smoke else 4.0)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    report = {
        "benchmark": "gpu_ceilings", "smoke": args.smoke,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "matmul": matmul_rate(n, dtype, device, args.warmup, args.repeats),
        "copy": copy_bandwidth(int(gib * 2**30), device, args.warmup, args.repeats),
    }
    m, c = report["matmul"], report["copy"]
    print(f"{report['device']}: {m['dtype']} matmul {m['n']}³ {m['tflops']:.1f} TFLOP/s "
          f"(rel. error {m['relative_error']:.1e}); copy {c['tb_per_s_read_plus_write']:.2f} TB/s")
    if args.out:
        write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
