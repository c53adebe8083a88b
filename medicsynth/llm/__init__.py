"""LLM/VLM calls for relabelling, captions, the quality gate and zero-shot scoring.

- :mod:`medicsynth.llm.client`: :class:`LLMConfig`, :class:`LLMRequest`, :class:`LLMResult`,
  :class:`LLMClient` (cache, budget, retries, refusal fallback, validation, concurrency, usage).
- :mod:`medicsynth.llm.cache`: the persistent on-disk cache of paid calls (outside DVC outputs).
- :mod:`medicsynth.llm.providers`: OpenAI / Anthropic SDK adapters and image encoding.
- :mod:`medicsynth.llm.transport`: the total deadline of one HTTP attempt.
- :mod:`medicsynth.llm.redact`: credentials removed from anything written or logged.
- :mod:`medicsynth.llm.cost`: token/dollar estimates before sending, the dated price table and
  the ``budget_usd`` cap; :mod:`medicsynth.llm.plan`: the whole pipeline's estimate (``make estimate``).
- :mod:`medicsynth.llm.batch`: ``mode: batch`` (OpenAI Batch API, Anthropic Message Batches).
- :mod:`medicsynth.llm.labels_answer`: MEDIC label schema/validation, :func:`classify_request`
  and :func:`load_prompt` (the project's one prompt-file reader).

The zero-shot baseline built on them lives in :mod:`medicsynth.zeroshot`.

Importing this package does not import the SDKs; they load when a client is built.
"""

from medicsynth.llm.cache import CACHE_FORMAT_VERSION, RawResponse, ResponseCache, cache_key
from medicsynth.llm.client import (
    DEFAULT_CACHE_DIR,
    FAILURE_REASONS,
    LLMAbortError,
    LLMClient,
    LLMConfig,
    LLMRequest,
    LLMFailureShareError,
    LLMResult,
    LLMStageError,
    Usage,
    client_from_params,
    config_from_params,
    config_with_defaults,
    looks_like_refusal,
    repository_llm_params,
    raise_if_failing,
)
from medicsynth.llm.labels_answer import (
    LabelsAnswerError,
    classify_request,
    labels_json_schema,
    load_prompt,
    validate_labels_answer,
    with_refusal_preface,
)
from medicsynth.llm.cost import (
    CostEstimate,
    LLMBudgetError,
    PriceTable,
    estimate_requests,
    price_table_from_params,
)
from medicsynth.llm.providers import PROVIDERS, EncodedImage, ImageError, encode_image
from medicsynth.llm.redact import redact

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CostEstimate",
    "LLMBudgetError",
    "PriceTable",
    "estimate_requests",
    "price_table_from_params",
    "DEFAULT_CACHE_DIR",
    "FAILURE_REASONS",
    "PROVIDERS",
    "EncodedImage",
    "ImageError",
    "LLMAbortError",
    "LLMClient",
    "LLMConfig",
    "LLMRequest",
    "LLMFailureShareError",
    "LLMResult",
    "LLMStageError",
    "LabelsAnswerError",
    "RawResponse",
    "ResponseCache",
    "Usage",
    "cache_key",
    "classify_request",
    "client_from_params",
    "config_from_params",
    "config_with_defaults",
    "repository_llm_params",
    "encode_image",
    "labels_json_schema",
    "load_prompt",
    "looks_like_refusal",
    "raise_if_failing",
    "redact",
    "validate_labels_answer",
    "with_refusal_preface",
]
