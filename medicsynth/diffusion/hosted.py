"""Hosted generation: render the caption plan through the OpenAI Images API (``generate.backend: openai``).

The study generated its synthetic images through hosted APIs; this backend does the same
through the official ``openai`` SDK (``client.images.generate``, base64 answers), with the
guarantees of the local backend and of :mod:`medicsynth.llm`:

- **Cache.** Every paid answer is stored, as soon as it arrives, in
  ``{cache_dir}/images/<key[:2]>/<key>.png`` (temporary file + ``os.replace``; outside DVC's
  outputs, like ``.llm_cache``). The key hashes the format version, provider, model, prompt,
  size, quality, extra request fields and the planned image's ``id`` and ``seed`` (the API takes
  no seed: two planned images with the same caption are two samples, each paid once).
- **Resume.** Images already in ``images_dir`` with a matching provenance stamp are skipped; the
  others come from the cache when present and from the API otherwise. A kill at any instant
  loses at most the calls in flight; a rerun repeats no answered call.
- **Budget.** ``max_calls`` caps paid calls (cache misses) per run; images over budget, refused
  (content policy) or failed after the SDK's retries are left out of the manifest and counted
  per reason in the metrics (never silently replaced).
- **Cost before spending.** The images still to pay for (not on disk, not cached) are priced
  from ``llm.prices.images[<model>][<quality>]`` (USD per image, dated) before any call; above
  ``budget_usd`` the stage refuses, naming the estimate and the key to raise. The metrics hold the
  estimate beside the calls actually paid (``hosted.cost``).
- **Provenance.** Each JPEG carries the same stamp as locally rendered ones (key, model, blank
  flag), so filter and merge treat both alike.

API keys come only from ``OPENAI_API_KEY``. Tests run against a loopback server that speaks the
Images API (``tests/images_api_server.py``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from medicsynth.io import write_bytes_durably
from medicsynth.params import build_config

#: Bump when the meaning of a cached image changes; old entries then stop matching.
CACHE_FORMAT_VERSION = 1
FAILURE_REASONS = ("budget", "refused", "api_error", "bad_answer")


class HostedError(RuntimeError):
    """The hosted backend cannot run: a missing key, a bad setting."""


@dataclass(frozen=True)
class HostedConfig:
    """``generate.hosted`` in params.yaml (backend ``openai``).

    No defaults: params.yaml sets every field (build with :meth:`from_params`).
    """

    model: str  # Images API model id
    base_url: str | None  # None = the SDK's default endpoint
    size: str  # "WxH" as the model accepts it
    quality: str | None  # model-specific (gpt-image-1: low | medium | high | auto); None = omit
    response_format: str | None  # "b64_json" for dall-e models; None = omit (gpt-image-1 always answers base64)
    extra: dict  # further request fields (e.g. {"background": "opaque"}), part of the key
    max_calls: int | None  # paid calls (cache misses) per run; None = unlimited
    concurrency: int  # parallel calls
    timeout_s: float  # per-attempt HTTP timeout
    max_retries: int  # the SDK's retries on 429/5xx/timeouts/connection errors
    cache_dir: str  # cache root (images under {cache_dir}/images)
    budget_usd: float | None  # refuse before any call when the estimated cost is above this; None = no cap

    @classmethod
    def from_params(cls, params: dict | None) -> "HostedConfig":
        """Build from ``generate.hosted`` and validate it.

        Every field is required (``KeyError`` naming ``generate.hosted.<key>``); an unknown key,
        a malformed ``size``, a negative ``max_calls`` or ``concurrency`` < 1 raise
        :class:`HostedError` naming the key.
        """
        try:
            cfg = build_config(cls, params, "generate.hosted", convert={"extra": lambda d: dict(d or {})})
        except ValueError as exc:
            raise HostedError(str(exc)) from None
        try:
            w, h = (int(v) for v in cfg.size.split("x"))
            if w <= 0 or h <= 0:
                raise ValueError
        except ValueError:
            raise HostedError(f"generate.hosted.size {cfg.size!r}: expected 'WxH', e.g. 1024x1024") from None
        if cfg.max_calls is not None and cfg.max_calls < 0:
            raise HostedError(f"generate.hosted.max_calls {cfg.max_calls}: must be >= 0 or null")
        if cfg.concurrency < 1:
            raise HostedError(f"generate.hosted.concurrency {cfg.concurrency}: must be >= 1")
        return cfg

    @property
    def width_height(self) -> tuple[int, int]:
        w, h = (int(v) for v in self.size.split("x"))
        return w, h

    def fingerprint(self) -> str:
        """What identifies the generator in provenance (``openai:<model>``)."""
        return f"openai:{self.model}"


def request_fields(cfg: HostedConfig, prompt: str) -> dict[str, Any]:
    """The keyword arguments of ``client.images.generate`` for ``prompt``."""
    req: dict[str, Any] = {"model": cfg.model, "prompt": prompt, "n": 1, "size": cfg.size}
    if cfg.quality:
        req["quality"] = cfg.quality
    if cfg.response_format:
        req["response_format"] = cfg.response_format
    req.update(cfg.extra)
    return req


def image_cache_key(cfg: HostedConfig, prompt: str, image_id: str, seed: int) -> str:
    """sha256 identifying one paid image: the request as sent plus the planned id and seed."""
    material = {"version": CACHE_FORMAT_VERSION, "provider": "openai", "request": request_fields(cfg, prompt),
                "id": image_id, "seed": int(seed)}
    return hashlib.sha256(json.dumps(material, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ImageCache:
    """``{directory}/<key[:2]>/<key>.png``: one paid image per file, written atomically."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.png"

    def get(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes) -> Path:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_bytes_durably(data, path)  # paid for: survive a power cut, not only a kill

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("??/*.png")) if self.directory.exists() else 0


def openai_client(cfg: HostedConfig):
    """The SDK client (key from ``OPENAI_API_KEY``; SDK retries and timeout from ``cfg``)."""
    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        raise HostedError("generate.backend is openai but OPENAI_API_KEY is not set in the environment")
    import openai

    return openai.OpenAI(api_key=key, base_url=cfg.base_url, timeout=cfg.timeout_s, max_retries=cfg.max_retries)


@dataclass
class HostedStats:
    """Counts of one hosted run (``metrics['hosted']``)."""

    calls: int = 0  # paid calls answered (cache misses)
    cache_hits: int = 0
    written: int = 0
    blank: int = 0
    failures: dict = field(default_factory=lambda: {r: 0 for r in FAILURE_REASONS})
    failed_ids: dict = field(default_factory=dict)  # id -> reason (first 50 kept)
    seconds: float = 0.0
    latencies: list = field(default_factory=list)

    def fail(self, image_id: str, reason: str) -> None:
        self.failures[reason] += 1
        if len(self.failed_ids) < 50:
            self.failed_ids[image_id] = reason

    def as_dict(self) -> dict:
        d = asdict(self)
        lat = d.pop("latencies")
        d["latency_p50_s"] = round(float(np.median(lat)), 3) if lat else None
        return d


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def render_hosted(jobs, cfg: HostedConfig, client, cache: ImageCache, blank_std: float, jpeg_quality: int,
                  progress: bool = True, on_answer: Callable[[str], None] | None = None) -> HostedStats:
    """Fetch (or take from the cache) and write each job's image; returns the run's counts.

    Parameters
    ----------
    jobs
        :class:`medicsynth.diffusion.generate.Job` objects still to render (prompt, seed, key,
        target path).
    client
        An ``openai.OpenAI`` (or anything with ``images.generate(**request_fields)``).
    cache
        The :class:`ImageCache`; an answer is stored before its JPEG is written.

    Guarantees: at most ``cfg.max_calls`` paid calls; each answered call is cached at once (a kill
    loses only calls in flight); a job that fails is counted under one of
    :data:`FAILURE_REASONS` and has no file written.
    """
    from medicsynth.diffusion.generate import write_jpeg

    stats = HostedStats()
    lock = threading.Lock()
    start = time.perf_counter()

    def reserve() -> bool:
        with lock:
            if cfg.max_calls is not None and stats.calls >= cfg.max_calls:
                return False
            stats.calls += 1
            return True

    def one(job) -> None:
        key = image_cache_key(cfg, job.prompt, job.id, job.seed)
        data = cache.get(key)
        if data is not None:
            with lock:
                stats.cache_hits += 1
        else:
            if not reserve():
                with lock:
                    stats.fail(job.id, "budget")
                return
            t0 = time.perf_counter()
            try:
                response = client.images.generate(**request_fields(cfg, job.prompt))
            except Exception as exc:  # the SDK's own errors after its retries
                status = getattr(exc, "status_code", None)
                code = (getattr(exc, "code", None) or "")
                with lock:
                    stats.calls -= 1  # not answered: does not count against the budget
                    stats.fail(job.id, "refused" if status == 400 and "content_policy" in str(code) else "api_error")
                return
            try:
                data = base64.b64decode(response.data[0].b64_json)
                _decode(data)  # a broken answer is never cached
            except Exception:
                with lock:
                    stats.fail(job.id, "bad_answer")
                return
            cache.put(key, data)
            with lock:
                stats.latencies.append(time.perf_counter() - t0)
            if on_answer is not None:
                on_answer(job.id)
        pixels = _decode(data)
        std = float(pixels.reshape(-1, 3).std(axis=0).max())
        blank = not std >= blank_std
        stamp = {"key": job.key, "model": cfg.fingerprint(), "blank": blank, "nsfw": False, "std": round(std, 3),
                 "dtype": "hosted", "cache_key": key}
        write_jpeg(pixels, job.path, stamp, jpeg_quality)
        with lock:
            stats.written += 1
            stats.blank += blank

    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool, \
            tqdm(total=len(jobs), desc="generate (openai)", unit="img", disable=not progress) as bar:
        for f in as_completed([pool.submit(one, j) for j in jobs]):
            f.result()
            bar.update(1)
    stats.seconds = time.perf_counter() - start
    return stats


def image_price(prices: dict | None, cfg: HostedConfig) -> float | None:
    """USD per image of ``cfg`` from ``llm.prices.images[<model>][<quality or auto>]``, or ``None``."""
    table = ((prices or {}).get("images") or {}).get(cfg.model) or {}
    per = table.get(cfg.quality or "auto")
    return None if per is None else float(per)


def estimate_hosted(jobs, cfg: HostedConfig, cache: ImageCache, prices: dict | None) -> dict:
    """The cost of ``jobs`` before sending: images to pay for (cached ones are free), USD per
    image and in total (``None`` without a price), and the price date."""
    to_send = sum(1 for j in jobs if not cache.path(image_cache_key(cfg, j.prompt, j.id, j.seed)).exists())
    per = image_price(prices, cfg)
    return {"requests": len(jobs), "cached": len(jobs) - to_send, "to_send": to_send, "usd_per_image": per,
            "usd": None if per is None else round(to_send * per, 6),
            "price_date": (prices or {}).get("date")}


def check_hosted_budget(estimate: dict, cfg: HostedConfig) -> None:
    """Raise :class:`HostedError` when ``estimate`` is above ``cfg.budget_usd`` (nothing sent)."""
    import math

    if cfg.budget_usd is None or estimate["to_send"] == 0:
        return
    if estimate["usd"] is None:
        raise HostedError(
            f"generate.hosted.budget_usd={cfg.budget_usd}: no price for {cfg.model!r} quality "
            f"{cfg.quality or 'auto'!r} in llm.prices.images; add it (USD per image, dated) or set budget_usd: null"
        )
    if estimate["usd"] > cfg.budget_usd:
        raise HostedError(
            f"openai model {cfg.model!r}: estimated cost ${estimate['usd']:.2f} for {estimate['to_send']} images "
            f"(${estimate['usd_per_image']} each, {estimate['cached']} cached; prices of {estimate['price_date']}) "
            f"is above generate.hosted.budget_usd=${cfg.budget_usd:.2f}. Nothing was sent. Raise "
            f"generate.hosted.budget_usd to at least {math.ceil(estimate['usd'] * 100) / 100:.2f}, or plan fewer images."
        )


def generate_hosted(plan_path: str | Path, images_dir: str | Path, manifest_path: str | Path, opts,
                    *, client=None, progress: bool = True, prices: dict | None = None,
                    per_shard: int | None = None) -> dict:
    """The generate stage with ``backend: openai``: render the plan, write manifest, return metrics.

    ``opts`` is the stage's :class:`~medicsynth.diffusion.generate.GenerateOptions` (``hosted``
    holds :class:`HostedConfig` fields; ``blank_std``, ``jpeg_quality``, ``negative_prompt``
    apply; the Images API takes no negative prompt, so a plan's negative prompts are ignored and
    recorded as such). ``client`` replaces the SDK client (tests). The manifest lists the images
    present with a matching stamp; the metrics count what is missing and why. ``prices`` is
    ``llm.prices`` (its ``images`` table prices the estimate; ``budget_usd`` caps it).
    ``per_shard``: as in :func:`~medicsynth.diffusion.generate.generate_plan` (``None`` = files).
    """
    from medicsynth.diffusion.generate import (GenerateError, ModelRef, PlanStatus, build_manifest, pack_shards,
                                               plan_jobs, read_plan)
    from medicsynth.manifest import write_manifest

    t0 = time.perf_counter()
    cfg = HostedConfig.from_params(opts.hosted)
    images_dir, manifest_path = Path(images_dir), Path(manifest_path)
    plan = read_plan(plan_path)
    width, height = cfg.width_height
    # Provenance covers the request fields too (size, quality, extra): they change the pixels.
    ref = ModelRef(cfg.fingerprint(), Path("."), "hosted",
                   f"{cfg.fingerprint()}|" + json.dumps(request_fields(cfg, ""), sort_keys=True))
    source = opts.prompt_source if opts.prompt_source in ("caption", "labels") else "caption"
    from medicsynth.diffusion.families import FAMILIES, Family

    no_negative = Family(**{**FAMILIES["generic"].__dict__, "name": "hosted", "negative_prompt": False})
    status = plan_jobs(plan, images_dir, opts, ref, "", source, width, height, str(plan_path), no_negative,
                       shards=per_shard is not None)
    images_dir.mkdir(parents=True, exist_ok=True)
    stats = HostedStats()
    cost = None
    if status.todo:
        cache = ImageCache(Path(cfg.cache_dir) / "images")
        if prices is not None or cfg.budget_usd is not None:
            cost = {"estimate": estimate_hosted(status.todo, cfg, cache, prices)}
            check_hosted_budget(cost["estimate"], cfg)
        client = client if client is not None else openai_client(cfg)
        stats = render_hosted(status.todo, cfg, client, cache, opts.blank_std, opts.jpeg_quality, progress)
        if cost is not None:
            per = cost["estimate"]["usd_per_image"]
            cost["paid_calls"] = stats.calls
            cost["usd"] = None if per is None else round(stats.calls * per, 6)
    failed = set(stats.failed_ids)
    in_shards = status.in_shards  # empty in the files layout
    present = [j for j in status.jobs if j.path.exists() or (in_shards.get(j.id) or {}).get("key") == j.key]
    kept = PlanStatus(jobs=[j for j in present if j.id not in failed], todo=[], skipped=status.skipped, stale=status.stale)
    try:
        refs = pack_shards(kept.jobs, images_dir, per_shard, in_shards) if per_shard is not None else None
        manifest = build_manifest(kept, images_dir, opts, width, height, refs)
    except GenerateError as exc:  # a stale file left by an earlier run whose call failed now
        raise GenerateError(f"{exc} (hosted backend: rerun to fetch them, or raise generate.hosted.max_calls)") from None
    manifest["model"], manifest["provenance"] = cfg.fingerprint(), f"generate:{cfg.fingerprint()}"
    manifest["scheduler"], manifest["steps"], manifest["guidance"] = "hosted", 0, 0.0
    write_manifest(manifest, manifest_path)
    missing = len(status.jobs) - len(manifest)
    return {
        "backend": "openai", "model": cfg.fingerprint(), "family": "hosted", "planned": len(plan),
        "renderable": len(status.jobs), "quarantined": len(status.quarantined),
        "quarantined_rows": status.quarantined[:50], "skipped": status.skipped, "stale_rerendered": status.stale,
        "rendered": stats.written, "missing": missing, "blank_flagged": int(manifest["blank_flag"].sum()),
        "nsfw_flagged": 0, "hosted": {**stats.as_dict(), **({"cost": cost} if cost is not None else {})},
        "images_per_second": round(stats.written / stats.seconds, 4) if stats.seconds else 0.0,
        "options": {**{k: v for k, v in asdict(cfg).items()}, "width": width, "height": height},
        "seconds_total": round(time.perf_counter() - t0, 2),
    }
