"""Batch mode: the calls of :meth:`medicsynth.llm.LLMClient.run` sent through the providers' batch
APIs (OpenAI Batch API, Anthropic Message Batches), at the batch price, with the same results.

:func:`run_batch` takes the requests the synchronous path would send and returns the same
:class:`~medicsynth.llm.client.LLMResult` list; a stage switches with ``mode: batch`` alone.

How (for one client, i.e. one provider/model):

1. The calls the sync path would make are listed: each request's prompt (encoded image, same
   request body, :meth:`OpenAIProvider.request_params` / :meth:`AnthropicProvider.request_params`),
   keyed by its cache key. Cached calls are not sent. The custom id of a call *is* its cache key
   (64 hex characters: both APIs accept it), so results are matched back by id, never by order.
2. Batch records of earlier, killed runs (``<cache_dir>/batches/*.json``, same provider, model and
   base URL) that hold some of these ids are resumed: polled, never resubmitted.
3. The remaining calls are submitted in batches of at most :data:`MAX_BATCH_REQUESTS` requests /
   :data:`MAX_BATCH_BYTES` bytes (OpenAI: upload a JSONL file, ``batches.create``; Anthropic:
   ``messages.batches.create``). Each batch id is written atomically to its record right after
   the API returns it (the one window that can lose a batch is between the API's answer and that
   write, a few milliseconds). Each submitted call counts against ``max_calls``.
4. Records are polled every ``batch_poll_s`` seconds until the batch ended. Each answer is reduced
   exactly as a sync answer and cached at once (a kill after that repeats nothing); only real
   model answers are cached. A permanent per-request error (e.g. HTTP 400) fails that request
   (``api_error``, redacted) and is not sent again by this run; expired, cancelled, missing or
   transient per-request errors are resubmitted in a new batch, at most ``max_retries`` times,
   then fail with ``retries_exhausted`` (a rerun sends them again). The record is deleted once
   its batch's results are all handled.
5. A second round does the same for the refusal-fallback prompts of requests whose answer was a
   refusal. Then the sync path of :meth:`LLMClient.run` interprets every request from the cache
   (no call is made: what failed in the batch is recorded as that request's failure), so
   validation, refusal handling and results are those of sync mode.

Results are deterministic in the sense of the sync path: answers are keyed by content, not by
arrival order or timing. Polling sleeps between status calls only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medicsynth.io import read_json, write_json
from medicsynth.llm.cache import RawResponse
from medicsynth.llm.providers import (
    PermanentError,
    ProviderError,
    TransientError,
    _classify_sdk_error,
    encode_image,
    ImageError,
)

log = logging.getLogger(__name__)

#: Requests per submitted batch (OpenAI allows 50,000, Anthropic 100,000; smaller batches end sooner).
MAX_BATCH_REQUESTS = 10_000
#: Bytes of request bodies per batch (OpenAI's input file limit is 200 MB, Anthropic's 256 MB).
MAX_BATCH_BYTES = 150_000_000
#: OpenAI's endpoint of the batched requests.
OPENAI_ENDPOINT = "/v1/chat/completions"


@dataclass
class BatchCall:
    """One call to send: ``key`` (cache key = custom id), the request body, and what reduces its answer."""

    key: str
    params: dict[str, Any]
    schema: dict[str, Any] | None
    schema_name: str
    meta: dict[str, Any]


# ------------------------------------------------------------------------------------------
# Persisted batch records
# ------------------------------------------------------------------------------------------


class BatchStore:
    """Batch records in ``<cache_dir>/batches/``: one JSON per submitted batch, written atomically."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _path(self, provider: str, batch_id: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in batch_id)
        return self.directory / f"{provider}-{safe}.json"

    def save(self, record: dict[str, Any]) -> Path:
        path = self._path(record["provider"], record["batch_id"])
        write_json(record, path)
        return path

    def remove(self, record: dict[str, Any]) -> None:
        self._path(record["provider"], record["batch_id"]).unlink(missing_ok=True)

    def load(self, provider: str, model: str, base_url: str | None) -> list[dict[str, Any]]:
        """Records of ``provider``/``model``/``base_url``, oldest first (by file name order of submission)."""
        if not self.directory.is_dir():
            return []
        out = []
        for path in sorted(self.directory.glob(f"{provider}-*.json")):
            try:
                rec = read_json(path)
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable batch record %s: %s", path, exc)
                continue
            if rec.get("model") == model and rec.get("base_url") == base_url:
                out.append(rec)
        return sorted(out, key=lambda r: r.get("submitted", 0))


# ------------------------------------------------------------------------------------------
# Provider batch backends (real SDK calls)
# ------------------------------------------------------------------------------------------


class OpenAIBatches:
    """OpenAI Batch API: JSONL file upload, ``batches.create/retrieve``, output and error files."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self.client = provider.client

    def submit(self, calls: list[BatchCall]) -> str:
        lines = [
            json.dumps({"custom_id": c.key, "method": "POST", "url": OPENAI_ENDPOINT, "body": c.params},
                       separators=(",", ":"), ensure_ascii=False)
            for c in calls
        ]
        data = ("\n".join(lines) + "\n").encode("utf-8")
        upload = self.client.files.create(file=("medicsynth-batch.jsonl", data, "application/jsonl"), purpose="batch")
        batch = self.client.batches.create(
            input_file_id=upload.id, endpoint=OPENAI_ENDPOINT, completion_window="24h",
            metadata={"source": "medicsynth"},
        )
        return batch.id

    def ended(self, batch_id: str) -> tuple[bool, str]:
        batch = self.client.batches.retrieve(batch_id)
        return batch.status in ("completed", "failed", "expired", "cancelled"), batch.status

    def results(self, batch_id: str, calls: dict[str, BatchCall]) -> dict[str, RawResponse | ProviderError]:
        batch = self.client.batches.retrieve(batch_id)
        out: dict[str, RawResponse | ProviderError] = {}
        if batch.status == "failed":
            errors = "; ".join(f"{e.code}: {e.message}" for e in ((batch.errors and batch.errors.data) or []))
            err = PermanentError("batch_failed", f"batch {batch_id} failed validation: {errors or 'no detail'}")
            return {cid: err for cid in calls}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            for line in self.client.files.content(file_id).text.splitlines():
                if not line.strip():
                    continue
                entry = json.loads(line)
                cid = entry.get("custom_id")
                if cid not in calls:
                    continue
                out[cid] = self._outcome(entry)
        return out

    def _outcome(self, entry: dict[str, Any]) -> RawResponse | ProviderError:
        error = entry.get("error")
        response = entry.get("response") or {}
        status = response.get("status_code")
        if status == 200:
            try:
                return self.provider.reduce_body(response.get("body"))
            except ProviderError as exc:
                return exc
        if error and not status:
            code = str(error.get("code") or "error")
            return TransientError(code, f"{code}: {str(error.get('message') or '')[:200]}")
        body = response.get("body") or {}
        err = body.get("error", body) if isinstance(body, dict) else {}
        message = f"HTTP {status}: {str(err.get('message') if isinstance(err, dict) else err)[:200]}"
        if status in (408, 409, 429) or (status or 0) >= 500:
            return TransientError("server_error", message)
        return PermanentError(f"http_{status}", message)


class AnthropicBatches:
    """Anthropic Message Batches: ``messages.batches.create/retrieve/results``."""

    _TRANSIENT_ERRORS = {"api_error", "overloaded_error", "rate_limit_error", "timeout_error"}

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self.client = provider.client

    def submit(self, calls: list[BatchCall]) -> str:
        batch = self.client.messages.batches.create(
            requests=[{"custom_id": c.key, "params": c.params} for c in calls],
            extra_headers=self.provider.extra_headers or None,
        )
        return batch.id

    def ended(self, batch_id: str) -> tuple[bool, str]:
        batch = self.client.messages.batches.retrieve(batch_id)
        return batch.processing_status == "ended", batch.processing_status

    def results(self, batch_id: str, calls: dict[str, BatchCall]) -> dict[str, RawResponse | ProviderError]:
        out: dict[str, RawResponse | ProviderError] = {}
        for entry in self.client.messages.batches.results(batch_id):
            call = calls.get(entry.custom_id)
            if call is None:
                continue
            result = entry.result
            kind = getattr(result, "type", None)
            if kind == "succeeded":
                try:
                    out[call.key] = self.provider.reduce(result.message, call.schema, call.schema_name)
                except ProviderError as exc:
                    out[call.key] = exc
            elif kind == "errored":
                inner = getattr(getattr(result, "error", None), "error", None)
                etype = str(getattr(inner, "type", "error"))
                message = f"{etype}: {str(getattr(inner, 'message', ''))[:200]}"
                out[call.key] = (TransientError(etype, message) if etype in self._TRANSIENT_ERRORS
                                 else PermanentError(etype, message))
            else:  # expired, canceled
                out[call.key] = TransientError(f"batch_{kind}", f"request {kind} in batch {batch_id}")
        return out


def _recorded_call(rec: dict[str, Any], cid: str) -> BatchCall:
    """A :class:`BatchCall` of a recorded batch's entry (no body: it is only reduced, never sent)."""
    info = (rec.get("calls") or {}).get(cid) or {}
    return BatchCall(cid, {}, {} if info.get("schema", True) else None, str(info.get("schema_name", "answer")),
                     dict(info.get("meta") or {}))


def _backend(provider: Any) -> OpenAIBatches | AnthropicBatches:
    return OpenAIBatches(provider) if provider.name == "openai" else AnthropicBatches(provider)


# ------------------------------------------------------------------------------------------
# The batch run
# ------------------------------------------------------------------------------------------


def _chunks(calls: list[BatchCall]) -> Iterable[list[BatchCall]]:
    chunk: list[BatchCall] = []
    size = 0
    for call in calls:
        n = len(json.dumps(call.params, separators=(",", ":")))
        if chunk and (len(chunk) >= MAX_BATCH_REQUESTS or size + n > MAX_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(call)
        size += n
    if chunk:
        yield chunk


def _sdk_call(client: Any, what: str, fn: Callable[[], Any], missing_ok: bool = False) -> Any:
    """``fn()`` (one batch-API call) with the client's retries; a permanent error stops the stage,
    except HTTP 404 with ``missing_ok`` (a recorded batch the API no longer knows): ``None``."""
    from medicsynth.llm.client import LLMAbortError, LLMStageError

    cfg = client.config
    sdk = client.provider._sdk
    for attempt in range(cfg.max_retries + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified, or re-raised untouched
            err = exc if isinstance(exc, ProviderError) else _classify_sdk_error(exc, sdk)
            if err is None:
                raise
            if isinstance(err, PermanentError):
                if missing_ok and err.reason == "http_404":
                    return None
                cls = LLMAbortError if err.fatal else LLMStageError
                raise cls(client._redact(f"{cfg.provider} model {cfg.model!r}: batch {what} failed: {err}")) from None
            if attempt == cfg.max_retries:
                raise LLMStageError(client._redact(
                    f"{cfg.provider} model {cfg.model!r}: batch {what} failed after {attempt + 1} attempt(s): {err}. "
                    f"Submitted batch ids are kept in {client.cache.directory / 'batches'}; a rerun resumes them."
                )) from None
            client._sleep(client._backoff(attempt, getattr(err, "retry_after", None)))
    raise AssertionError("unreachable")  # pragma: no cover


class _Sha:
    """Stands for an encoded image where only its hash is needed (the cache key)."""

    def __init__(self, sha256: str) -> None:
        self.sha256 = sha256


def _wanted_calls(client: Any, requests: list[Any], fallback: bool, shas: dict[int, str | None]) -> dict[str, BatchCall]:
    """The calls the sync path would send now for ``requests``: primary prompts, or (``fallback``)
    the refusal-fallback prompts of requests whose cached answer is a refusal. ``shas`` keeps each
    request's image hash between the two passes, so the fallback pass re-encodes only the images
    it sends (``None``: no image; absent: a bad image, which the sync pass reports)."""
    cfg = client.config
    calls: dict[str, BatchCall] = {}
    for i, req in enumerate(requests):
        image = None
        if fallback:
            if i not in shas or not req.fallback_prompt:
                continue
            stub = _Sha(shas[i]) if shas[i] else None
            primary = client.cache.get(client.cache_key_for(req, req.prompt, stub))
            if primary is None or not client._is_refusal(primary, req):
                continue
            if client.cache.get(client.cache_key_for(req, req.fallback_prompt, stub)) is not None:
                continue
        if req.image_path is not None:
            try:
                image = encode_image(req.image_path, cfg.image_max_side, cfg.jpeg_quality)
            except ImageError:
                continue  # the sync path reports bad_image without a call
        shas[i] = image.sha256 if image else None
        prompt = req.fallback_prompt if fallback else req.prompt
        key = client.cache_key_for(req, prompt, image)
        if key in calls or key in client._failed or client.cache.get(key) is not None:
            continue
        params = client.provider.request_params(
            system=req.system, prompt=prompt, image=image, schema=req.schema, schema_name=req.schema_name
        )
        meta = {"provider": cfg.provider, "model": cfg.model, "key": req.key,
                "image_sha256": image.sha256 if image else None, "mode": "batch"}
        calls[key] = BatchCall(key, params, req.schema, req.schema_name, meta)
    return calls


def collect(client: Any, calls: dict[str, BatchCall]) -> None:
    """Send ``calls`` (by cache key) through the batch API and cache every answer; see the module
    docstring (steps 2-4). Failures are recorded in the client so the sync pass reports them."""
    from medicsynth.llm.client import _Failure, _is_model_answer

    cfg = client.config
    backend = _backend(client.provider)
    store = BatchStore(client.cache.directory / "batches")
    stats = client.usage.batch
    pending = dict(calls)
    active: list[dict[str, Any]] = []
    for rec in store.load(cfg.provider, cfg.model, cfg.base_url):
        ids = [cid for cid in rec["custom_ids"] if cid in pending]
        if ids:
            active.append(rec)
            stats["batches_resumed"] += 1
            log.info("resuming %s batch %s (%d of our calls)", cfg.provider, rec["batch_id"], len(ids))
        elif all(client.cache.get(cid) is not None for cid in rec["custom_ids"]):
            store.remove(rec)  # everything it asked is answered already
    covered = {cid for rec in active for cid in rec["custom_ids"]}
    to_send = []
    for key, call in pending.items():
        if key in covered:
            continue
        try:
            client._reserve_budget()
        except _Failure as failure:
            client._failed[key] = failure
            continue
        to_send.append(call)
    rounds: dict[str, int] = {}
    while True:
        for chunk in _chunks(to_send):
            batch_id = _sdk_call(client, "submission", lambda chunk=chunk: backend.submit(chunk))
            rec = {"batch_id": batch_id, "provider": cfg.provider, "model": cfg.model, "base_url": cfg.base_url,
                   "custom_ids": [c.key for c in chunk], "submitted": time.time(),
                   # What reduces and labels each answer, so that a later run with other requests
                   # still caches every answer of this (paid) batch.
                   "calls": {c.key: {"schema": c.schema is not None, "schema_name": c.schema_name, "meta": c.meta}
                             for c in chunk}}
            store.save(rec)  # from here on a killed stage resumes this batch instead of resubmitting
            active.append(rec)
            client.usage.add(api_calls=len(chunk), http_attempts=len(chunk))
            stats["batches_submitted"] += 1
            stats["requests_submitted"] += len(chunk)
            for c in chunk:
                rounds[c.key] = rounds.get(c.key, 0) + 1
        to_send = []
        if not active:
            break
        while active:
            still = []
            for rec in active:
                state = _sdk_call(client, "status", lambda rec=rec: backend.ended(rec["batch_id"]), missing_ok=True)
                if state is None:  # unknown to the API (deleted, another account): send ours again
                    log.warning("%s batch %s not found; resubmitting its requests", cfg.provider, rec["batch_id"])
                    store.remove(rec)
                    to_send.extend(pending[cid] for cid in rec["custom_ids"] if cid in pending and cid not in
                                   {c.key for c in to_send})
                    continue
                done, status = state
                if not done:
                    still.append(rec)
                    continue
                every = {cid: pending.get(cid) or _recorded_call(rec, cid) for cid in rec["custom_ids"]}
                outcomes = _sdk_call(client, "results", lambda rec=rec, every=every: backend.results(rec["batch_id"], every))
                for key, call in every.items():
                    if key not in pending:  # asked by an earlier run for other requests: cache its answer
                        out = outcomes.get(key)
                        if isinstance(out, RawResponse) and _is_model_answer(out) and client.cache.get(key) is None:
                            client.cache.put(key, out, meta=call.meta)
                            client.usage.add(input_tokens=out.input_tokens, output_tokens=out.output_tokens)
                        continue
                    out = outcomes.get(key) or TransientError("batch_missing", f"no result in batch {rec['batch_id']} ({status})")
                    if isinstance(out, RawResponse) and _is_model_answer(out):
                        client.cache.put(key, out, meta=call.meta)  # paid: cached before anything else
                        client.usage.add(input_tokens=out.input_tokens, output_tokens=out.output_tokens)
                        client._fresh.add(key)
                        pending.pop(key)
                    elif isinstance(out, PermanentError):
                        client._failed[key] = _Failure("api_error", client._redact(f"{out.reason}: {out}"[:300]))
                        pending.pop(key)
                    else:
                        err = out if isinstance(out, ProviderError) else TransientError("bad_response", "not a model answer")
                        if rounds.get(key, 1) > cfg.max_retries:
                            client._failed[key] = _Failure("retries_exhausted", client._redact(
                                f"{err.reason} after {rounds.get(key, 1)} batch(es): {err}"[:300]))
                            pending.pop(key)
                        else:
                            to_send.append(call)
                            stats["retried"] += 1
                        client.usage.add_retry(err.reason)
                store.remove(rec)  # every answer of ours is cached or its failure recorded
            active = still
            if active:
                client._sleep(cfg.batch_poll_s)
        if not to_send:
            break
    for key in list(pending):
        if key not in client._failed and client.cache.get(key) is None:
            client._failed[key] = _Failure("retries_exhausted", "no answer from the batch API")


def run_batch(client: Any, requests: list[Any], desc: str = "llm", progress: bool = True) -> list[Any]:
    """:meth:`LLMClient.run` in batch mode: the same requests, the same results, sent as batches.

    Args:
        client: an :class:`~medicsynth.llm.client.LLMClient` whose ``config.mode`` is ``batch``.
        requests: the :class:`~medicsynth.llm.client.LLMRequest` list the sync path would run.
        desc, progress: for the final (cache-only) pass's progress bar.

    Returns one :class:`~medicsynth.llm.client.LLMResult` per request, in order. Raises what
    :meth:`LLMClient.run` raises, and :class:`~medicsynth.llm.client.LLMStageError` when the batch
    API itself keeps failing (batch ids stay recorded: a rerun resumes them).
    """
    shas: dict[int, str | None] = {}
    for fallback in (False, True):
        calls = _wanted_calls(client, requests, fallback, shas)
        if calls:
            collect(client, calls)
    return client._run_sync(requests, desc, progress)
