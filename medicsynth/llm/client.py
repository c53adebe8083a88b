"""LLM/VLM client: cached, budgeted, retried, concurrent calls with structured, validated answers.

One :class:`LLMRequest` (prompt, optional system prompt, optional image, optional JSON schema and
validator, optional refusal-fallback prompt) becomes one :class:`LLMResult`. For each request:

1. The image is read, checked (full decode) and downscaled/re-encoded as needed
   (:func:`medicsynth.llm.providers.encode_image`); a bad image fails with ``bad_image``.
2. The call is looked up in the on-disk cache (:mod:`medicsynth.llm.cache`); on a miss it goes
   to the provider, within the ``max_calls`` budget (else ``budget``, nothing sent), retried on
   429/5xx/timeouts/connection errors with exponential backoff and jitter, honouring the server's
   ``Retry-After`` / ``retry-after-ms`` (up to ``backoff_max_s``); each attempt has a total
   deadline of ``timeout_s``. Only a real model answer is cached, atomically the moment it
   arrives. Identical calls are made once per client, whatever the outcome: a duplicate waits for
   the first and shares its answer or its failure.
3. A refusal (provider flag, or refusal text where an answer was expected) is retried once with
   ``fallback_prompt`` (itself cached as its own call); refused again → ``refusal``.
4. The answer is parsed (JSON when a schema was given) and validated by the request's
   ``validate`` callable (or, without one, a minimal check against the schema). Unparseable →
   ``invalid_json``; rejected or partial → ``invalid_answer``. Never a silent default.

Failure reasons: ``bad_image``, ``budget``, ``refusal``, ``invalid_json``, ``invalid_answer``,
``retries_exhausted`` (transient errors outlasted ``max_retries``; ``detail`` names the last),
``api_error`` (a non-retryable HTTP error such as 400; ``detail`` has status and message),
``aborted`` (not sent: the client had stopped, see below). Every ``detail`` is redacted
(:func:`medicsynth.llm.redact.redact`: configured keys, ``sk-`` keys, bearer tokens).

Stopping early: until one call has been answered, calls go out one at a time. After
``abort_after`` consecutive errors that concern the key, account or model (HTTP 401/402/403/404)
the client stops: requests not yet sent fail with ``aborted`` and :meth:`LLMClient.run` raises
:class:`LLMAbortError` naming provider and model. :func:`raise_if_failing` is the stage-level
rule: more than ``max_failure_share`` of the requests failed → :class:`LLMFailureShareError`.

Concurrency is a thread pool of ``concurrency`` workers (calls are I/O bound) with a tqdm bar;
results keep the order of the requests. :attr:`LLMClient.usage` accumulates calls, cache hits,
tokens, retries, failures by reason and latency; ``usage.as_dict()`` goes into metrics JSON.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medicsynth.llm.cache import RawResponse, ResponseCache, cache_key
from medicsynth.llm.cost import PriceTable, check_budget, estimate_requests
from medicsynth.llm.providers import (
    API_KEY_ENV,
    PROVIDERS,
    EncodedImage,
    ImageError,
    PermanentError,
    TransientError,
    check_anthropic_version,
    encode_image,
    make_provider,
)
from medicsynth.llm.redact import env_secrets, redact

log = logging.getLogger(__name__)

#: Where the cache usually lives (params.yaml ``llm.cache_dir``; see medicsynth.llm.cache).
DEFAULT_CACHE_DIR = ".llm_cache"

FAILURE_REASONS: tuple[str, ...] = (
    "bad_image",
    "budget",
    "refusal",
    "invalid_json",
    "invalid_answer",
    "retries_exhausted",
    "api_error",
    "aborted",
)


#: How requests are sent (:attr:`LLMConfig.mode`).
MODES: tuple[str, ...] = ("sync", "batch")


class LLMStageError(RuntimeError):
    """A paid stage that must fail (the message names provider and model, and is redacted)."""


class LLMAbortError(LLMStageError):
    """The client stopped after ``abort_after`` consecutive key/account/model errors."""


class LLMFailureShareError(LLMStageError):
    """More than ``max_failure_share`` of a stage's requests failed."""


# ------------------------------------------------------------------------------------------
# Configuration, requests, results
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LLMConfig:
    """How to call one model. Stages fill it from params; API keys never go here.

    Every field is required: the defaults live in one place, params.yaml ``llm.client``, which
    :func:`config_from_params` lays under a stage's own settings.

    Args:
        provider: ``"openai"`` or ``"anthropic"``.
        model: model id as the provider names it.
        base_url: API base URL; ``None`` for the SDK default (or ``ANTHROPIC_BASE_URL``).
        temperature: sampling temperature (OpenAI; Anthropic only with ``anthropic_version``
            ``"2023-06-01"``: its current API version takes none).
        anthropic_version: the ``anthropic-version`` header of Anthropic requests; ``None`` = the
            SDK's (2026-10-21, no temperature), ``"2023-06-01"`` = the older version that takes a
            temperature. Ignored for OpenAI.
        max_tokens: cap on output tokens per call.
        concurrency: parallel calls in :meth:`LLMClient.run`.
        timeout_s: total deadline of one HTTP attempt (connect, send, the whole response).
        max_retries: retries after the first attempt for transient errors.
        image_max_side: longer image side sent, in pixels (larger images are downscaled).
        max_calls: budget of API calls (cache misses) for this client; ``None`` = unlimited.
        backoff_base_s: first backoff delay; doubles per retry, jittered in [50%, 100%].
        backoff_max_s: cap on one backoff delay, including a server's ``Retry-After``.
        jpeg_quality: quality of re-encoded images.
        abort_after: consecutive key/account/model errors (HTTP 401/402/403/404) after which the
            client stops sending; ``None`` never stops.
        max_failure_share: share of failed requests (``budget`` excluded) above which
            :func:`raise_if_failing` fails the stage.
        budget_usd: :meth:`LLMClient.run` refuses a batch whose estimated cost
            (:mod:`medicsynth.llm.cost`) is above this, before sending anything; ``None`` = no cap.
        mode: ``"sync"`` (one HTTP call per request) or ``"batch"`` (the provider's batch API at
            the batch price, :mod:`medicsynth.llm.batch`; same requests, same results).
        batch_poll_s: batch mode: seconds between status polls of a submitted batch.
    """

    provider: str
    model: str
    base_url: str | None
    temperature: float
    anthropic_version: str | None
    max_tokens: int
    concurrency: int
    timeout_s: float
    max_retries: int
    image_max_side: int
    max_calls: int | None
    backoff_base_s: float
    backoff_max_s: float
    jpeg_quality: int
    abort_after: int | None
    max_failure_share: float
    budget_usd: float | None
    mode: str
    batch_poll_s: float

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ValueError(f"llm provider {self.provider!r} not in {', '.join(PROVIDERS)}")
        if not self.model:
            raise ValueError("llm model must be a non-empty model id")
        checks = {
            "max_tokens": self.max_tokens >= 1,
            "concurrency": self.concurrency >= 1,
            "timeout_s": self.timeout_s > 0,
            "max_retries": self.max_retries >= 0,
            "image_max_side": self.image_max_side >= 16,
            "max_calls": self.max_calls is None or self.max_calls >= 0,
            "backoff_base_s": self.backoff_base_s >= 0,
            "backoff_max_s": self.backoff_max_s >= 0,
            "jpeg_quality": 1 <= self.jpeg_quality <= 100,
            "abort_after": self.abort_after is None or self.abort_after >= 1,
            "max_failure_share": 0.0 <= self.max_failure_share <= 1.0,
            "budget_usd": self.budget_usd is None or self.budget_usd >= 0,
            "mode": self.mode in MODES,
            "batch_poll_s": self.batch_poll_s >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                "invalid llm setting(s): " + ", ".join(f"{n}={getattr(self, n)!r}" for n in bad)
            )
        if self.provider == "anthropic":
            check_anthropic_version(self.anthropic_version)


@dataclass
class LLMRequest:
    """One call to make.

    ``schema`` (a JSON schema with an object at the top) asks for a structured answer: OpenAI
    ``response_format`` json_schema (strict: the schema must list every property as required
    and set ``additionalProperties: false``), Anthropic a forced tool call named ``schema_name``.
    ``validate`` receives the parsed object (or the text, without a schema) and returns the
    value to keep, raising on a bad answer. ``fallback_prompt`` replaces ``prompt`` for the one
    retry after a refusal. ``key`` is the caller's id (e.g. the image path), for reports only.
    """

    prompt: str
    system: str = ""
    image_path: str | None = None
    schema: dict[str, Any] | None = None
    schema_name: str = "answer"
    validate: Callable[[Any], Any] | None = None
    fallback_prompt: str | None = None
    key: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"LLMRequest {self.key!r}: prompt must be a non-empty string")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.schema_name):
            raise ValueError(
                f"LLMRequest {self.key!r}: schema_name {self.schema_name!r} must match [A-Za-z0-9_-]{{1,64}}"
            )


@dataclass
class LLMResult:
    """Outcome of one request. ``ok`` ⇔ ``failure is None``; ``value`` is set only when ok.

    ``cached`` is true when no API call was made for it (all answers came from the cache);
    ``calls`` counts the API calls made now; tokens are summed over the request's calls (cached
    or not), i.e. what the answer cost.
    """

    key: str
    ok: bool
    value: Any = None
    text: str | None = None
    failure: str | None = None
    detail: str = ""
    cached: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    calls: int = 0
    used_fallback: bool = False


# ------------------------------------------------------------------------------------------
# Usage accounting
# ------------------------------------------------------------------------------------------


BATCH_COUNTERS = ("batches_submitted", "batches_resumed", "requests_submitted", "retried")


@dataclass
class Usage:
    """Counters of one client (one stage). Thread-safe; :meth:`as_dict` for metrics JSON.

    ``api_calls`` are calls actually sent (cache misses; a call's retries are one call),
    ``http_attempts`` include the retries; ``input_tokens``/``output_tokens`` are billed now,
    ``cached_*_tokens`` those of answers reused from the cache.
    """

    requests: int = 0
    ok: int = 0
    api_calls: int = 0
    http_attempts: int = 0
    cache_hits: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cached_output_tokens: int = 0
    fallback_retries: int = 0
    failures: Counter = field(default_factory=Counter)
    retries: Counter = field(default_factory=Counter)
    latencies_s: list = field(default_factory=list)
    estimate: dict | None = None  # the last batch's cost estimate (medicsynth.llm.cost), before sending
    price: Any = None  # medicsynth.llm.cost.ModelPrice of the model, when the price table has it
    price_date: str | None = None
    mode: str = "sync"  # batch mode: cost at the batch price, and the "batch" counters in as_dict
    batch: Counter = field(default_factory=Counter)  # batches_submitted, batches_resumed, requests_submitted, retried
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def add_retry(self, reason: str) -> None:
        with self._lock:
            self.retries[reason] += 1

    def add_latency(self, seconds: float) -> None:
        with self._lock:
            self.latencies_s.append(seconds)

    def add_result(self, result: LLMResult) -> None:
        with self._lock:
            self.requests += 1
            if result.ok:
                self.ok += 1
            else:
                self.failures[result.failure] += 1
            if result.used_fallback:
                self.fallback_retries += 1

    def _cost(self) -> float | None:
        if self.price is None:
            return None
        usd = self.price.usd(self.input_tokens, self.output_tokens, batch=self.mode == "batch")
        return None if usd is None else round(usd, 6)

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            lat = sorted(self.latencies_s)

            def pct(q: float) -> float | None:
                return round(lat[min(len(lat) - 1, int(q * len(lat)))], 4) if lat else None

            return {
                "requests": self.requests,
                "ok": self.ok,
                "failed": sum(self.failures.values()),
                "failures": dict(sorted(self.failures.items())),
                "api_calls": self.api_calls,
                "http_attempts": self.http_attempts,
                "retries": dict(sorted(self.retries.items())),
                "cache_hits": self.cache_hits,
                "fallback_retries": self.fallback_retries,
                "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens,
                "cached_input_tokens": self.cached_input_tokens,
                "cached_output_tokens": self.cached_output_tokens,
                "estimate": self.estimate,
                "cost_usd": self._cost(),
                "price_date": self.price_date,
                **({"mode": "batch", "batch": {k: self.batch[k] for k in BATCH_COUNTERS}}
                   if self.mode == "batch" else {}),
                "latency_s": {
                    "count": len(lat),
                    "mean": round(sum(lat) / len(lat), 4) if lat else None,
                    "p50": pct(0.5),
                    "p95": pct(0.95),
                    "max": round(lat[-1], 4) if lat else None,
                },
            }


# ------------------------------------------------------------------------------------------
# Answer interpretation
# ------------------------------------------------------------------------------------------

_REFUSAL_PHRASES = re.compile(
    r"\b(?:i\s+(?:can(?:not|'t|\s+not)|won't|will\s+not|must\s+decline|am\s+(?:unable|not\s+able)|"
    r"'m\s+(?:unable|not\s+able)|(?:do\s+not|don't)\s+feel\s+comfortable)|i'm\s+(?:unable|not\s+able)|"
    r"i(?:'m|\s+am)\s+(?:really\s+|very\s+)?sorry|i\s+apologi[sz]e|unable\s+to\s+(?:help|assist|comply))"
)
# Refusals open the answer; a caption that mentions "can't" further in is not one.
_REFUSAL_WINDOW = 160


def looks_like_refusal(text: str | None) -> bool:
    """True if ``text`` opens like a refusal ("I can't help with that", "I'm sorry, but...")."""
    if not text:
        return False
    head = text.strip().lower().replace("\u2019", "'")[:_REFUSAL_WINDOW]
    return bool(_REFUSAL_PHRASES.search(head))


class AnswerError(ValueError):
    """An answer that cannot be used; ``reason`` is ``invalid_json`` or ``invalid_answer``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_json_object(text: str | None) -> dict[str, Any]:
    """The JSON object in ``text`` (tolerating a Markdown code fence), or :class:`AnswerError`."""
    if text is None or not text.strip():
        raise AnswerError("invalid_json", "empty answer")
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.S | re.I)
    if fence:
        body = fence.group(1)
    try:
        obj = json.loads(body)
    except ValueError as exc:
        raise AnswerError("invalid_json", f"not JSON ({exc}): {text[:200]!r}") from None
    if not isinstance(obj, dict):
        raise AnswerError("invalid_json", f"expected a JSON object, got {type(obj).__name__}: {text[:200]!r}")
    return obj


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


def _is_json_type(value: Any, kind: str) -> bool:
    if kind == "null":
        return value is None
    if kind in ("integer", "number") and isinstance(value, bool):
        return False  # JSON booleans are not numbers, though Python's bool is an int
    return kind in _JSON_TYPES and isinstance(value, _JSON_TYPES[kind])


def check_schema(value: Any, schema: Mapping[str, Any], where: str = "answer") -> None:
    """Minimal JSON-schema check (type, enum, required, additionalProperties, properties, items).

    Used only when a request has a schema but no validator, so a partial or off-schema answer
    still fails. Raises :class:`AnswerError` (``invalid_answer``) naming the path and value.
    """
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind else []
    if kinds and not any(_is_json_type(value, k) for k in kinds):
        raise AnswerError("invalid_answer", f"{where}: expected {kind}, got {value!r}"[:300])
    if "enum" in schema and value not in schema["enum"]:
        raise AnswerError("invalid_answer", f"{where}: {value!r} not one of {schema['enum']}"[:300])
    if isinstance(value, dict):
        props = schema.get("properties", {})
        missing = [k for k in schema.get("required", []) if k not in value]
        if missing:
            raise AnswerError("invalid_answer", f"{where}: missing key(s) {', '.join(missing)}")
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(props))
            if extra:
                raise AnswerError("invalid_answer", f"{where}: unexpected key(s) {', '.join(extra)}")
        for k, sub in props.items():
            if k in value:
                check_schema(value[k], sub, f"{where}.{k}")
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            check_schema(item, schema["items"], f"{where}[{i}]")


class _Failure(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.outcome = "none"  # for the gate: "fatal" (key/account/model) | "answer" | "none"


def _is_model_answer(raw: RawResponse) -> bool:
    """Whether ``raw`` is something a model produced (content, a refusal or at least a stop
    reason), as opposed to an empty shell that must be neither used nor cached."""
    return raw.finish_reason is not None or raw.text is not None or raw.data is not None or raw.refusal is not None


def raise_if_failing(
    results: Iterable[LLMResult],
    max_failure_share: float,
    provider: str,
    model: str,
    *,
    what: str = "requests",
    ignore: Iterable[str] = ("budget",),
) -> float:
    """The stage-level failure rule: raise if too many of a stage's requests failed.

    Args:
        results: the stage's :class:`LLMResult` list (from :meth:`LLMClient.run`).
        max_failure_share: in [0, 1]; the stage fails when the failed share is above it.
        provider, model: named in the message.
        what: what the requests are, for the message ("zeroshot images", "relabel votes").
        ignore: failure reasons left out of numerator and denominator (``budget``: a cap the
            user set on purpose, reported in the metrics).

    Returns the failed share (0.0 for no counted request). Raises :class:`LLMFailureShareError`
    with counts by reason and the first (redacted) detail.
    """
    ignored = set(ignore)
    counted = [r for r in results if r.ok or r.failure not in ignored]
    failed = [r for r in counted if not r.ok]
    share = len(failed) / len(counted) if counted else 0.0
    if share > max_failure_share:
        reasons = dict(sorted(Counter(r.failure for r in failed).items()))
        raise LLMFailureShareError(redact(
            f"{provider} model {model!r}: {len(failed)} of {len(counted)} {what} failed "
            f"({share:.0%} > max_failure_share {max_failure_share:.0%}): {reasons}; first: "
            f"{failed[0].failure}: {failed[0].detail[:200]}. Fix the cause (see docs/FAILURE_MODES.md) "
            f"or raise max_failure_share.", env_secrets()))
    return share


# ------------------------------------------------------------------------------------------
# Client
# ------------------------------------------------------------------------------------------


class LLMClient:
    """Runs :class:`LLMRequest` batches against one provider/model; see the module docstring.

    Args:
        config: the model and call settings.
        cache_dir: directory of the persistent response cache (outside DVC outputs).
        sdk_client: an ``openai.OpenAI`` / ``anthropic.Anthropic`` instance to use instead of
            one built from ``config`` and the environment's API key (it should have
            ``max_retries=0``: retries are counted here).
        sleep: the function used to wait between retries (tests may pass a recorder).
        prices: the dated price table (``llm.prices``); with it, :meth:`run` records a cost
            estimate before sending and the actual cost in :attr:`usage`.
    """

    def __init__(
        self,
        config: LLMConfig,
        cache_dir: str | Path = DEFAULT_CACHE_DIR,
        *,
        sdk_client: Any | None = None,
        sleep: Callable[[float], None] = time.sleep,
        prices: PriceTable | None = None,
    ) -> None:
        self.config = config
        self.prices = prices
        self.cache = ResponseCache(cache_dir)
        self.provider = make_provider(config, sdk_client)
        self.usage = Usage(mode=config.mode)
        if prices is not None:
            self.usage.price, self.usage.price_date = prices.price(config.model), prices.date
        self._sleep = sleep
        self._rng = random.Random()
        self._budget_lock = threading.Lock()
        self._calls_reserved = 0
        self._inflight_lock = threading.Lock()
        self._inflight: dict[str, threading.Event] = {}
        # Failures of this client's calls, by cache key: a duplicate shares them (never re-sent).
        self._failed: dict[str, _Failure] = {}
        # Batch mode: keys answered by a batch in this run (counted as calls, not cache hits).
        self._fresh: set[str] = set()
        # Probe gate and early stop (module docstring, "Stopping early").
        self._gate = threading.Condition()
        self._verified = False
        self._probing = False
        self._fatal_streak = 0
        self._abort: str | None = None
        self._secrets = tuple(s for s in (getattr(self.provider, "api_key", ""), *env_secrets()) if s)

    # -- public ---------------------------------------------------------------------------

    def run(self, requests: Iterable[LLMRequest], desc: str = "llm", progress: bool = True) -> list[LLMResult]:
        """Process ``requests`` concurrently; results in request order.

        Raises :class:`LLMAbortError` (after the workers finish; answers received are cached)
        when the client stopped early on key/account/model errors, and
        :class:`medicsynth.llm.cost.LLMBudgetError` before sending anything when the estimated
        cost is above ``budget_usd``.
        """
        requests = list(requests)
        if not requests:
            return []
        if self.prices is not None or self.config.budget_usd is not None:
            estimate = estimate_requests(self, requests, self.prices)
            self.usage.estimate = estimate.as_dict()
            check_budget(estimate, self.config.budget_usd, self.budget_key)
        if self.config.mode == "batch":
            from medicsynth.llm.batch import run_batch

            return run_batch(self, requests, desc, progress)
        return self._run_sync(requests, desc, progress)

    def _run_sync(self, requests: list[LLMRequest], desc: str, progress: bool) -> list[LLMResult]:
        # The sync path (batch mode ends with it too, every answer then being cached).
        results: list[LLMResult | None] = [None] * len(requests)
        workers = min(self.config.concurrency, len(requests))
        failed = 0
        with (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llm") as pool,
            tqdm(total=len(requests), desc=desc, unit="req", disable=not progress) as bar,
        ):
            futures = {pool.submit(self.process, req): i for i, req in enumerate(requests)}
            try:
                for fut in as_completed(futures):
                    result = fut.result()
                    results[futures[fut]] = result
                    failed += not result.ok
                    bar.update(1)
                    bar.set_postfix(failed=failed, cache_hits=self.usage.cache_hits, refresh=False)
            except BaseException:
                # Finish what is in flight (its answers get cached), start nothing new.
                for fut in futures:
                    fut.cancel()
                raise
        if failed:
            log.warning("%s: %d of %d requests failed: %s", desc, failed, len(requests),
                        dict(Counter(r.failure for r in results if r is not None and not r.ok)))
        if self._abort is not None:
            raise LLMAbortError(self._abort)
        return results  # type: ignore[return-value]

    #: How messages name the cap (a stage may set e.g. ``"zeroshot.budget_usd"``).
    budget_key = "budget_usd"

    def cache_key_for(self, req: LLMRequest, prompt: str, image: EncodedImage | None) -> str:
        """The cache key of sending ``prompt`` (the request's prompt or its fallback) with ``image``."""
        cfg = self.config
        return cache_key(
            provider=cfg.provider,
            model=cfg.model,
            system=req.system,
            prompt=prompt,
            image_sha256=image.sha256 if image else None,
            temperature=self.provider.temperature_sent,
            max_tokens=cfg.max_tokens,
            schema=req.schema,
        )

    @property
    def aborted(self) -> str | None:
        """Why the client stopped sending (redacted), or ``None``."""
        return self._abort

    def raise_if_failing(self, results: list[LLMResult], what: str = "requests") -> list[LLMResult]:
        """:func:`raise_if_failing` with this client's provider, model and ``max_failure_share``;
        returns ``results`` unchanged, so a stage wraps its call in one line:
        ``results = client.raise_if_failing(client.run(requests), "relabel votes")``."""
        cfg = self.config
        raise_if_failing(results, cfg.max_failure_share, cfg.provider, cfg.model, what=what)
        return results

    def process(self, req: LLMRequest) -> LLMResult:
        """Process one request (thread-safe); :meth:`run` calls this from its workers."""
        result = LLMResult(key=req.key, ok=False)
        try:
            self._process(req, result)
        except _Failure as failure:
            result.ok, result.value = False, None
            result.failure, result.detail = failure.reason, failure.detail
        # Provider error bodies may echo the key; nothing unredacted leaves the client.
        result.detail = redact(result.detail, self._secrets)
        if result.text is not None:
            result.text = redact(result.text, self._secrets)
        self.usage.add_result(result)
        return result

    # -- internals ------------------------------------------------------------------------

    def _process(self, req: LLMRequest, result: LLMResult) -> None:
        image = None
        if req.image_path is not None:
            try:
                image = encode_image(req.image_path, self.config.image_max_side, self.config.jpeg_quality)
            except ImageError as exc:
                raise _Failure("bad_image", str(exc)) from None
        raw = self._call(req, req.prompt, image, result)
        if self._is_refusal(raw, req) and req.fallback_prompt:
            result.used_fallback = True
            raw = self._call(req, req.fallback_prompt, image, result)
        # A tool-call answer has no text; keep its JSON so every result can be audited.
        result.text = raw.text if raw.data is None else json.dumps(raw.data, ensure_ascii=False)
        if self._is_refusal(raw, req):
            raise _Failure("refusal", (raw.refusal or raw.text or "")[:300])
        # OpenAI says "length", Anthropic "max_tokens": either way the answer may be cut short.
        hint = " (output cut at max_tokens)" if raw.finish_reason in ("length", "max_tokens") else ""
        try:
            result.value = self._interpret(raw, req)
        except AnswerError as exc:
            raise _Failure(exc.reason, f"{str(exc)[:300]}{hint}") from None
        except Exception as exc:  # noqa: BLE001 - the caller's validator decides what is invalid
            raise _Failure("invalid_answer", f"{type(exc).__name__}: {exc}"[:300] + hint) from None
        result.ok = True

    def _is_refusal(self, raw: RawResponse, req: LLMRequest) -> bool:
        if raw.refusal:
            return True
        if req.schema is not None:
            # Refusal text counts only where no structured answer came back.
            if raw.data is not None:
                return False
            try:
                parse_json_object(raw.text)
                return False
            except AnswerError:
                return looks_like_refusal(raw.text)
        return looks_like_refusal(raw.text)

    def _interpret(self, raw: RawResponse, req: LLMRequest) -> Any:
        if req.schema is None:
            if raw.text is None or not raw.text.strip():
                raise AnswerError("invalid_answer", f"empty answer (finish_reason={raw.finish_reason})")
            return req.validate(raw.text) if req.validate else raw.text
        obj = raw.data if raw.data is not None else parse_json_object(raw.text)
        if req.validate is not None:
            return req.validate(obj)
        check_schema(obj, req.schema)
        return obj

    def _call(self, req: LLMRequest, prompt: str, image: EncodedImage | None, result: LLMResult) -> RawResponse:
        """One logical call: from the cache, else from the provider (then cached).

        Identical calls (MEDIC has byte-identical images under different paths) are made once
        per client: later ones wait for the first and read its cached answer, or share its
        failure (a call that failed is not sent again by this client; a rerun tries again).
        """
        key = self.cache_key_for(req, prompt, image)
        while True:
            hit = self.cache.get(key)
            if hit is not None:
                return self._cache_hit(hit, result, key)
            with self._inflight_lock:
                failed = self._failed.get(key)
                done = self._inflight.get(key)
                owner = done is None and failed is None
                if owner:
                    done = self._inflight[key] = threading.Event()
            if failed is not None:
                raise _Failure(failed.reason, failed.detail)
            if not owner:
                done.wait()  # then: its answer is cached, or its failure recorded
                continue
            try:
                # The previous owner may have cached the answer just before this one registered.
                hit = self.cache.get(key)
                if hit is not None:
                    return self._cache_hit(hit, result, key)
                return self._call_api(key, req, prompt, image, result)
            except _Failure as failure:
                with self._inflight_lock:
                    self._failed[key] = failure
                raise
            finally:
                with self._inflight_lock:
                    del self._inflight[key]
                done.set()

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def _cache_hit(self, hit: RawResponse, result: LLMResult, key: str = "") -> RawResponse:
        if key in self._fresh:
            # Answered by a batch in this run: paid now (usage counted when it arrived), not a hit.
            result.cached = False
            result.calls += 1
            result.input_tokens += hit.input_tokens
            result.output_tokens += hit.output_tokens
            return hit
        self.usage.add(cache_hits=1, cached_input_tokens=hit.input_tokens, cached_output_tokens=hit.output_tokens)
        result.cached = result.calls == 0
        result.input_tokens += hit.input_tokens
        result.output_tokens += hit.output_tokens
        return hit

    def _call_api(
        self, key: str, req: LLMRequest, prompt: str, image: EncodedImage | None, result: LLMResult
    ) -> RawResponse:
        """Gate, budget, then the provider with retries; the answer is cached before returning."""
        probe = self._enter_gate()
        outcome, detail = "none", ""
        try:
            raw = self._attempts(key, req, prompt, image, result)
            outcome = "answer"
            return raw
        except _Failure as failure:
            outcome, detail = getattr(failure, "outcome", "none"), failure.detail
            raise
        finally:
            self._leave_gate(probe, outcome, detail)

    def _enter_gate(self) -> bool:
        """Wait until this call may be sent; ``True`` when it is the probe. Raises when stopped."""
        with self._gate:
            while True:
                if self._abort is not None:
                    raise _Failure("aborted", f"not sent: {self._abort}")
                if self._verified:
                    return False
                if not self._probing:
                    self._probing = True
                    return True
                self._gate.wait()

    def _leave_gate(self, probe: bool, outcome: str, detail: str) -> None:
        """Record a call's outcome: ``answer`` opens the gate, ``fatal`` counts toward the stop."""
        cfg = self.config
        with self._gate:
            if outcome == "fatal":
                self._fatal_streak += 1
                if cfg.abort_after is not None and self._fatal_streak >= cfg.abort_after and self._abort is None:
                    self._abort = redact(
                        f"{cfg.provider} model {cfg.model!r}: stopped after {self._fatal_streak} consecutive "
                        f"errors about the API key, account or model, which every other request would get "
                        f"too (last: {detail}). Check {API_KEY_ENV[cfg.provider]}, the model id and "
                        f"base_url ({cfg.base_url or 'SDK default'}).",
                        self._secrets,
                    )
            elif outcome == "answer":
                self._fatal_streak = 0
                self._verified = True
            if probe:
                self._probing = False
            self._gate.notify_all()

    def _attempts(
        self, key: str, req: LLMRequest, prompt: str, image: EncodedImage | None, result: LLMResult
    ) -> RawResponse:
        cfg = self.config
        self._reserve_budget()
        result.cached = False
        result.calls += 1
        self.usage.add(api_calls=1)
        start = time.monotonic()
        for attempt in range(cfg.max_retries + 1):
            self.usage.add(http_attempts=1)
            try:
                raw = self.provider.call(
                    system=req.system, prompt=prompt, image=image, schema=req.schema, schema_name=req.schema_name
                )
                if not _is_model_answer(raw):
                    raise TransientError("bad_response", "HTTP 200 but no content and no stop reason")
            except TransientError as exc:
                if attempt == cfg.max_retries:
                    raise _Failure(
                        "retries_exhausted", f"{exc.reason} after {attempt + 1} attempt(s): {exc}"[:300]
                    ) from None
                self._sleep(self._backoff(attempt, exc.retry_after))
                self.usage.add_retry(exc.reason)
                continue
            except PermanentError as exc:
                failure = _Failure("api_error", f"{exc.reason}: {exc}"[:300])
                # A request-level error (e.g. 400) still shows that key and model work.
                failure.outcome = "fatal" if exc.fatal else "answer"
                raise failure from None
            # Cache first: from here on a kill loses nothing that was paid for.
            self.cache.put(
                key,
                raw,
                meta={"provider": cfg.provider, "model": cfg.model, "key": req.key,
                      "image_sha256": image.sha256 if image else None},
            )
            self.usage.add(input_tokens=raw.input_tokens, output_tokens=raw.output_tokens)
            self.usage.add_latency(time.monotonic() - start)
            result.input_tokens += raw.input_tokens
            result.output_tokens += raw.output_tokens
            return raw
        raise AssertionError("unreachable")  # pragma: no cover

    def _reserve_budget(self) -> None:
        limit = self.config.max_calls
        with self._budget_lock:
            if limit is not None and self._calls_reserved >= limit:
                raise _Failure("budget", f"max_calls={limit} API calls already made by this client")
            self._calls_reserved += 1

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cfg = self.config
        delay = min(cfg.backoff_max_s, cfg.backoff_base_s * (2.0**attempt))
        # Jitter spreads retries of concurrent workers so they do not hit the limit together.
        delay *= self._rng.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, cfg.backoff_max_s))
        return delay


# ------------------------------------------------------------------------------------------
# From params
# ------------------------------------------------------------------------------------------

_CONFIG_FIELDS = tuple(f.name for f in fields(LLMConfig))


def config_from_params(llm_params: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> LLMConfig:
    """:class:`LLMConfig` from a stage's settings laid over ``defaults`` (params.yaml ``llm.client``).

    An unknown key (in either) is an error naming it; so is a field that neither gives (e.g. a
    ``defaults`` without ``max_tokens``). ``cache_dir`` may appear (it is the client's, not the
    config's) and is ignored.
    """
    for where, mapping in (("llm settings", llm_params), ("llm.client", defaults or {})):
        unknown = sorted(set(mapping) - set(_CONFIG_FIELDS) - {"cache_dir"})
        if unknown:
            raise ValueError(
                f"unknown {where} key(s) {', '.join(unknown)}; expected some of {', '.join(_CONFIG_FIELDS)}, cache_dir"
            )
    merged = {**dict(defaults or {}), **dict(llm_params)}
    missing = [k for k in _CONFIG_FIELDS if k not in merged]
    if missing:
        raise ValueError(
            f"llm setting(s) {', '.join(missing)} missing: set them in params.yaml llm.client (the defaults "
            f"of every client) or in the stage's own llm settings"
        )
    return LLMConfig(**{k: merged[k] for k in _CONFIG_FIELDS})


def repository_llm_params() -> dict[str, Any]:
    """The ``llm`` section of the repository's own params.yaml (next to this package).

    For callers that are handed no ``llm`` section (library use, tests): the defaults still come
    from params.yaml, never from a copy in code. Stages pass the section of the params file they
    were given instead.
    """
    import yaml

    with open(Path(__file__).resolve().parents[2] / "params.yaml", encoding="utf-8") as fh:
        return dict((yaml.safe_load(fh) or {}).get("llm") or {})


def config_with_defaults(**settings: Any) -> LLMConfig:
    """:class:`LLMConfig` of ``settings`` over the repository's params.yaml ``llm.client`` (tests, benches)."""
    return config_from_params(settings, repository_llm_params().get("client"))


def client_from_params(
    llm_params: Mapping[str, Any],
    cache_dir: str | Path | None = None,
    *,
    llm: Mapping[str, Any] | None = None,
    where: str | None = None,
    sdk_client: Any | None = None,
    prices: PriceTable | None = None,
) -> LLMClient:
    """An :class:`LLMClient` from a stage's settings (``provider``, ``model``, ...).

    Args:
        llm_params: the stage's client settings (``relabel.openai``, ``filter.vlm``, ...).
        cache_dir: the paid-call cache; default ``llm_params["cache_dir"]``, then ``llm.cache_dir``.
        llm: the params ``llm`` section: ``client`` (defaults of every setting), ``prices`` (the
            dated price table, :func:`medicsynth.llm.cost.price_table_from_params`) and
            ``cache_dir``; ``None`` reads the repository's params.yaml (:func:`repository_llm_params`),
            and so does a section without ``client`` (for its ``client`` only).
        where: the params path of the settings (``"relabel.openai"``), so that budget messages
            name the key to raise (``relabel.openai.budget_usd``).
        prices: a price table that replaces ``llm.prices``.
    """
    from medicsynth.llm.cost import price_table_from_params

    llm = dict(llm) if llm is not None else repository_llm_params()
    if "client" not in llm:
        llm["client"] = repository_llm_params().get("client")
    if cache_dir is None:
        cache_dir = llm_params.get("cache_dir") or llm.get("cache_dir")
    if not cache_dir:
        raise ValueError("no cache_dir for the LLM client: set llm.cache_dir in params.yaml")
    if prices is None:
        prices = price_table_from_params(llm.get("prices"))
    client = LLMClient(config_from_params(llm_params, llm.get("client")), cache_dir, sdk_client=sdk_client,
                       prices=prices)
    if where:
        client.budget_key = f"{where}.budget_usd"
    return client
