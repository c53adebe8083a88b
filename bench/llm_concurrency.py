"""Benchmark: LLM client throughput at concurrency 1 vs 16 against a 200 ms fake API.

Classifies ``--images`` distinct images (generated here) through :class:`medicsynth.llm.LLMClient`
and the real SDK, pointed at ``tests/api_server.FakeLLMServer`` answering every request after
``--latency`` seconds. Each concurrency level gets a fresh cache, so every image is a real HTTP
call. Prints images/s and the speed-up and writes a JSON report. Target: >= 10x at 16.

    .venv/bin/python bench/llm_concurrency.py [--provider openai] [--images 200] [--latency 0.2]

Not run by pytest (it takes ~a minute).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from PIL import Image

from medicsynth.io import write_json
from medicsynth.llm import LLMClient, classify_request, config_with_defaults
from tests.api_server import FakeLLMServer, auto


def make_images(directory: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        path = directory / f"bench_{i:04d}.jpg"
        Image.new("RGB", (64, 48), (i % 256, (i * 7) % 256, (i * 13) % 256)).save(path, quality=90)
        paths.append(str(path))
    return paths


def sdk_client(provider: str, base_url: str, timeout_s: float):
    # A local-only key handed to the SDK directly: the benchmark never reads or needs a real one.
    if provider == "openai":
        import openai

        return openai.OpenAI(api_key="local-bench", base_url=base_url, timeout=timeout_s, max_retries=0)
    import anthropic

    return anthropic.Anthropic(api_key="local-bench", base_url=base_url, timeout=timeout_s, max_retries=0)


def run_level(server: FakeLLMServer, provider: str, images: list[str], concurrency: int, work: Path) -> dict:
    config = config_with_defaults(provider=provider, model="bench-model", base_url=server.base_url(provider),
                       concurrency=concurrency, timeout_s=30.0, max_retries=2)
    client = LLMClient(config, work / f"cache-c{concurrency}",
                       sdk_client=sdk_client(provider, server.base_url(provider), config.timeout_s))
    requests = [classify_request(p, prompt_dir=REPO / "prompts") for p in images]
    before = server.count()
    start = time.perf_counter()
    results = client.run(requests, desc=f"{provider} c={concurrency}")
    elapsed = time.perf_counter() - start
    usage = client.usage.as_dict()
    failed = sum(not r.ok for r in results)
    if failed:
        raise RuntimeError(f"concurrency {concurrency}: {failed} requests failed: {usage['failures']}")
    return {
        "concurrency": concurrency,
        "images": len(images),
        "seconds": round(elapsed, 3),
        "images_per_s": round(len(images) / elapsed, 3),
        "http_requests": server.count() - before,
        "cache_hits": usage["cache_hits"],
        "latency_s": usage["latency_s"],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", choices=["openai", "anthropic"], default="openai")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--latency", type=float, default=0.2, help="server response time in seconds")
    ap.add_argument("--levels", default="1,16", help="comma-separated concurrency levels; first is the baseline")
    ap.add_argument("--out", default=None, help="JSON report (default bench/results/llm_concurrency_<provider>.json)")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    out = args.out or f"bench/results/llm_concurrency_{args.provider}.json"

    with tempfile.TemporaryDirectory(prefix="llm-bench-") as tmp, FakeLLMServer(auto(delay_s=args.latency)) as server:
        work = Path(tmp)
        images = make_images(work, args.images)
        runs = [run_level(server, args.provider, images, c, work) for c in levels]

    base = runs[0]["images_per_s"]
    for run in runs:
        run["speedup"] = round(run["images_per_s"] / base, 2)
    report = {
        "provider": args.provider,
        "images": args.images,
        "server_latency_s": args.latency,
        "runs": runs,
        "target_speedup_at_16": 10.0,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    write_json(report, out)
    for run in runs:
        print(f"concurrency {run['concurrency']:>3}: {run['images_per_s']:8.2f} images/s "
              f"({run['seconds']:.2f} s, speed-up {run['speedup']:.2f}x)")
    print(f"report: {out}")
    return report


if __name__ == "__main__":
    main()
