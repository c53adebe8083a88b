"""Benchmark: DVC at MEDIC scale, one file per image vs WebDataset-style tar shards.

Generates ``--count`` "real" and ``--synthetic`` "synthetic" small JPEGs (default 71,198 +
10,000, MEDIC's size; ``--size`` pixels square, smooth random colour fields plus noise so each
file is a few KB and none is a duplicate), then for each layout, in its own throw-away git+DVC
repository with an S3 remote on moto's server (started here, on loopback), times:

- ``dvc add``     hash the data and copy it into the cache;
- ``dvc status``  the workspace checked against the cache (what every ``dvc repro`` does);
- ``dvc push``    to the empty S3 remote;
- ``dvc pull``    after deleting the cache, the data and DVC's site cache (a fresh clone).

Layouts: ``files`` = ``data/images/{real,synthetic}/<id>.jpg`` (today's layout);
``shards`` = ``data/shards/{real,synthetic}-NNNNNN.tar`` with ``--per-shard`` images per shard,
written by :mod:`medicsynth.shards` (its resumable writer; the time it takes is reported as
``build_s``, not a DVC operation). The pull is checked: same file count and bytes as pushed.

Writes a JSON report (``--out``) and prints a table with shards/files ratios. Wall-clock
figures depend on the machine and its load: compare ratios. AWS and DVC user config point at
empty files in the work directory, so nothing on the machine is read or touched.

    nice -n 10 .venv/bin/python bench/storage_bench.py [--count 71198] [--synthetic 10000]
        [--per-shard 1000] [--work /tmp/storage_bench] [--out bench/results/storage_bench.json]

Not run by pytest at full size (tests/test_shards.py runs it with ``--count 12``).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from medicsynth import shards
from medicsynth.io import write_json
from medicsynth.loopback_s3 import MOTO_KEY, isolated_dvc_env, moto_client, moto_s3_server

REPO = Path(__file__).resolve().parents[1]
_VENV_DVC = Path(sys.executable).parent / "dvc"
DVC = [str(_VENV_DVC)] if _VENV_DVC.exists() else [sys.executable, "-m", "dvc"]
OPS = ("add", "status", "push", "pull")
LAYOUTS = ("files", "shards")


def jpeg_bytes(rng: np.random.Generator, size: int) -> bytes:
    """A ``size``-square RGB JPEG (quality 90): an upscaled 8x8 random colour field plus noise."""
    field = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_images(root: Path, counts: dict[str, int], size: int, seed: int) -> dict[str, int]:
    """Write ``root/<set>/<set>_NNNNNN.jpg`` for each set; return ``{"files": n, "bytes": b}``."""
    rng = np.random.default_rng(seed)
    n = total = 0
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(count), desc=f"generate {name}", unit="img", mininterval=2):
            data = jpeg_bytes(rng, size)
            (root / name / f"{name}_{i:06d}.jpg").write_bytes(data)
            n += 1
            total += len(data)
    return {"files": n, "bytes": total}


def make_shards(images: Path, out: Path, per_shard: int) -> dict[str, int]:
    """Shard every set under ``images`` into ``out/<set>-NNNNNN.tar``; return counts."""
    n_shards = 0
    for set_dir in sorted(p for p in images.iterdir() if p.is_dir()):
        files = sorted(set_dir.glob("*.jpg"))
        samples = ((f.stem, {"jpg": f.read_bytes()}) for f in
                   tqdm(files, desc=f"shard {set_dir.name}", unit="img", mininterval=2))
        n_shards += len(shards.write_shards(samples, out, set_dir.name, per_shard))
    return {"files": n_shards, "bytes": sum(p.stat().st_size for p in out.glob("*.tar"))}


def tree_stats(root: Path) -> dict[str, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def run(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    """Run ``cmd`` with output appended to ``log``; return wall seconds; raise on failure."""
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}) in {cwd}; see {log}")
    return elapsed


def bench_layout(layout: str, source: Path, work: Path, endpoint: str, bucket: str,
                 per_shard: int, s3) -> dict:
    """Build the ``layout`` repository from ``source`` images and time the four DVC operations."""
    repo = work / layout
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    env = isolated_dvc_env(work / f"{layout}-home", AWS_ACCESS_KEY_ID=MOTO_KEY, AWS_SECRET_ACCESS_KEY=MOTO_KEY)
    log = work / f"{layout}.log"
    log.unlink(missing_ok=True)
    run(["git", "init", "-q"], repo, env, log)
    run([*DVC, "init", "-q"], repo, env, log)
    run([*DVC, "remote", "add", "-d", "bench", f"s3://{bucket}/{layout}"], repo, env, log)
    run([*DVC, "remote", "modify", "bench", "endpointurl", endpoint], repo, env, log)
    result: dict = {"layout": layout}
    start = time.perf_counter()
    if layout == "files":
        data = repo / "data" / "images"
        shutil.copytree(source, data)
        result["data"] = tree_stats(data)
    else:
        data = repo / "data" / "shards"
        result["data"] = make_shards(source, data, per_shard)
    result["build_s"] = round(time.perf_counter() - start, 3)
    target = str(data.relative_to(repo))
    seconds = {}
    seconds["add"] = run([*DVC, "add", "-q", target], repo, env, log)
    seconds["status"] = run([*DVC, "status", "-q"], repo, env, log)
    seconds["push"] = run([*DVC, "push", "-q"], repo, env, log)
    keys = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{layout}/"):
        keys += len(page.get("Contents", []))
    result["remote_objects"] = keys
    # A fresh clone: no cache, no data, no site cache (DVC's remote index lives there).
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(data)
    shutil.rmtree(work / f"{layout}-home" / "dvc_site")
    (work / f"{layout}-home" / "dvc_site").mkdir()
    seconds["pull"] = run([*DVC, "pull", "-q"], repo, env, log)
    pulled = tree_stats(data)
    if pulled != result["data"]:
        raise RuntimeError(f"{layout}: pulled {pulled}, pushed {result['data']}")
    result["seconds"] = {op: round(s, 3) for op, s in seconds.items()}
    shutil.rmtree(repo)
    return result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def dvc_version() -> str:
    out = subprocess.run([*DVC, "--version"], capture_output=True, text=True)
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=71198, help="real images (MEDIC: 71,198)")
    ap.add_argument("--synthetic", type=int, default=10000, help="synthetic images")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--per-shard", type=int, default=1000, help="images per tar shard")
    ap.add_argument("--layouts", default="files,shards", help="comma-separated subset of files,shards")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/storage_bench", help="scratch directory (deleted at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--out", default="bench/results/storage_bench.json", help="JSON report")
    args = ap.parse_args(argv)
    layouts = [x for x in args.layouts.split(",") if x]
    unknown = sorted(set(layouts) - set(LAYOUTS))
    if unknown:
        ap.error(f"--layouts: unknown {unknown}; choose from {list(LAYOUTS)}")

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        with moto_s3_server() as endpoint:
            s3 = moto_client(endpoint)
            bucket = f"storage-bench-{uuid.uuid4().hex[:8]}"
            s3.create_bucket(Bucket=bucket)
            source = work / "source"
            shutil.rmtree(source, ignore_errors=True)
            start = time.perf_counter()
            images = make_images(source, {"real": args.count, "synthetic": args.synthetic}, args.size, args.seed)
            generate_s = time.perf_counter() - start
            results = {}
            for layout in layouts:
                print(f"--- {layout}", flush=True)
                results[layout] = bench_layout(layout, source, work, endpoint, bucket, args.per_shard, s3)
                print(f"{layout}: {results[layout]['seconds']}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    ratios = {}
    if set(LAYOUTS) <= set(results):
        f, s = results["files"]["seconds"], results["shards"]["seconds"]
        ratios = {op: round(s[op] / f[op], 4) if f[op] else None for op in OPS}
    report = {
        "images": {"real": args.count, "synthetic": args.synthetic, "size_px": args.size,
                   "files": images["files"], "bytes": images["bytes"], "generate_s": round(generate_s, 3)},
        "per_shard": args.per_shard,
        "layouts": results,
        "ratio_shards_over_files": ratios,
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "dvc": dvc_version(),
                    "load_avg_at_end": list(os.getloadavg())},
        "remote": "moto ThreadedMotoServer on 127.0.0.1 (in-memory S3)",
    }
    write_json(report, args.out)
    print(f"\n{images['files']} images, {images['bytes'] / 1e6:.1f} MB; machine: {report['machine']['cpu']}, "
          f"{report['machine']['cpus']} CPUs, load {report['machine']['load_avg_at_end'][0]:.1f}")
    header = f"{'operation':<10}" + "".join(f"{lay + ' (s)':>14}" for lay in results)
    if ratios:
        header += f"{'shards/files':>14}"
    print(header)
    for op in OPS:
        row = f"{op:<10}" + "".join(f"{results[lay]['seconds'][op]:>14.2f}" for lay in results)
        if ratios:
            row += f"{ratios[op]:>14.4f}"
        print(row)
    for lay in results:
        print(f"{lay}: {results[lay]['data']['files']} files in the DVC output, "
              f"{results[lay]['remote_objects']} remote objects, built in {results[lay]['build_s']:.1f} s")
    print(f"report: {args.out}")
    return report


if __name__ == "__main__":
    main()
