"""Cost before spending: token and dollar estimates of a batch of requests, and a USD cap.

:func:`estimate_requests` walks a batch the way :class:`medicsynth.llm.LLMClient` will send it:
each image is encoded as it will be sent (after downscaling), requests whose answer is already
in the cache cost nothing, and the others are counted as

- input tokens: the system and user prompt and the JSON schema at ``chars_per_token`` characters
  per token (no tokenizer is available offline: an estimate, typically within ±20% for English),
  plus each image by its provider's documented rule (:func:`openai_image_tokens`,
  :func:`anthropic_image_tokens`);
- output tokens: ``max_tokens`` per call (an upper bound: an answer never costs more).

Prices come from a dated table (``llm.prices`` in params.yaml, :class:`PriceTable`); the date says
how old they are. A refusal's fallback call is not included (it is rare and paid only on a
refusal); the estimate is therefore an upper bound on output and close on input.

:func:`check_budget` refuses a batch whose estimate is above ``budget_usd`` before anything is
sent, with the estimate and how to raise the cap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


class LLMBudgetError(RuntimeError):
    """The estimated cost of a batch is above the stage's ``budget_usd`` (nothing was sent)."""


# ------------------------------------------------------------------------------------------
# Image tokens (each provider's documented rule)
# ------------------------------------------------------------------------------------------


def openai_image_tokens(
    width: int, height: int, *, base: int = 85, per_tile: int = 170, tile: int = 512, fit: int = 2048,
    short_side: int = 768,
) -> int:
    """Tokens of one image at ``detail: high``/``auto`` in OpenAI Chat Completions (GPT-4o family).

    The documented rule: scale to fit a ``fit``×``fit`` square, then so the shortest side is
    ``short_side`` (only ever down), count ``tile``-px tiles; ``base + per_tile × tiles``.
    E.g. 1024×1024 → 768×768 → 4 tiles → 765 tokens; 2048×4096 → 768×1536 → 6 tiles → 1105.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    w, h = float(width), float(height)
    if max(w, h) > fit:
        scale = fit / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > short_side:
        scale = short_side / min(w, h)
        w, h = w * scale, h * scale
    tiles = math.ceil(math.floor(w) / tile) * math.ceil(math.floor(h) / tile)
    return base + per_tile * tiles


def anthropic_image_tokens(
    width: int, height: int, *, pixels_per_token: float = 750.0, max_long_edge: int = 1568,
    max_pixels: int = 1_230_000,
) -> int:
    """Tokens of one image in the Anthropic Messages API: ``width × height / pixels_per_token``,
    after the API's own downscaling of images whose long edge exceeds ``max_long_edge`` or whose
    area exceeds ``max_pixels`` (aspect kept). E.g. 1000×1000 → 1334 tokens; 200×200 → 54;
    1092×1092 → 1590. The documented largest unresized sizes (1092×1092 … 784×1568) are 1.19-1.23
    megapixels; ``max_pixels`` takes the largest, so larger images are estimated slightly high."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    w, h = float(width), float(height)
    scale = min(1.0, max_long_edge / max(w, h), math.sqrt(max_pixels / (w * h)))
    w, h = math.floor(w * scale), math.floor(h * scale)
    return math.ceil(w * h / pixels_per_token)


IMAGE_RULES = {"openai": openai_image_tokens, "anthropic": anthropic_image_tokens}


# ------------------------------------------------------------------------------------------
# Price table
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens of one model, and optional image-rule settings for it."""

    input_per_mtok: float
    output_per_mtok: float
    image: dict[str, float] = field(default_factory=dict)  # overrides of the provider's image rule
    batch_input_per_mtok: float | None = None  # batch API prices (None: not in the table)
    batch_output_per_mtok: float | None = None

    def usd(self, input_tokens: int, output_tokens: int, batch: bool = False) -> float | None:
        """USD of the tokens at the sync price, or (``batch``) the batch price (``None`` if unlisted)."""
        if batch:
            if self.batch_input_per_mtok is None or self.batch_output_per_mtok is None:
                return None
            return (input_tokens * self.batch_input_per_mtok + output_tokens * self.batch_output_per_mtok) / 1e6
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6


@dataclass(frozen=True)
class PriceTable:
    """Prices as read on ``date`` from ``source``; ``models`` by model id as the API names it."""

    date: str
    source: str
    models: dict[str, ModelPrice]
    chars_per_token: float = 4.0

    def price(self, model: str) -> ModelPrice | None:
        """The model's price: exact id, else the longest listed id that prefixes it
        (``gpt-4o-2024-08-06`` → ``gpt-4o``), else ``None``."""
        if model in self.models:
            return self.models[model]
        prefixes = [m for m in self.models if model.startswith(m + "-")]
        return self.models[max(prefixes, key=len)] if prefixes else None


def price_table_from_params(prices: Mapping[str, Any] | None) -> PriceTable | None:
    """:class:`PriceTable` from the ``llm.prices`` params mapping (``None`` → ``None``).

    Expected keys: ``date``, ``source``, ``chars_per_token`` (optional) and ``models``:
    ``{model: {input_per_mtok, output_per_mtok, image: {...}}}``. Errors name the key.
    """
    if not prices:
        return None
    missing = [k for k in ("date", "source", "models") if k not in prices]
    if missing:
        raise ValueError(f"llm.prices: missing key(s) {', '.join(missing)}")
    models = {}
    for model, entry in dict(prices["models"]).items():
        try:
            batch = [entry.get(k) for k in ("batch_input_per_mtok", "batch_output_per_mtok")]
            models[str(model)] = ModelPrice(
                float(entry["input_per_mtok"]), float(entry["output_per_mtok"]), dict(entry.get("image") or {}),
                *(None if b is None else float(b) for b in batch),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"llm.prices.models.{model}: needs numeric input_per_mtok and output_per_mtok ({exc})"
            ) from None
    return PriceTable(str(prices["date"]), str(prices["source"]), models,
                      float(prices.get("chars_per_token", 4.0)))


# ------------------------------------------------------------------------------------------
# Estimates
# ------------------------------------------------------------------------------------------


@dataclass
class CostEstimate:
    """What a batch will cost at most. ``usd`` is ``None`` without a price for the model."""

    provider: str
    model: str
    requests: int
    cached: int
    to_send: int
    input_tokens: int
    image_tokens: int
    output_tokens_max: int
    usd: float | None
    price_date: str | None
    mode: str = "sync"  # "batch": priced at the model's batch prices

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.mode == "sync":
            del out["mode"]  # sync estimates keep their earlier shape
        if self.usd is not None:
            out["usd"] = round(self.usd, 6)
        return out


def text_tokens(text: str, chars_per_token: float = 4.0) -> int:
    """Estimated tokens of ``text`` (characters / ``chars_per_token``, rounded up)."""
    return math.ceil(len(text) / chars_per_token) if text else 0


def request_tokens(
    provider: str, system: str, prompt: str, schema: Mapping[str, Any] | None, image_size: tuple[int, int] | None,
    chars_per_token: float = 4.0, image_rule: Mapping[str, float] | None = None,
) -> tuple[int, int]:
    """``(input_tokens, image_tokens)`` of one call; ``input_tokens`` includes the image's."""
    text = system + prompt + (json.dumps(schema, separators=(",", ":")) if schema else "")
    image = IMAGE_RULES[provider](*image_size, **dict(image_rule or {})) if image_size else 0
    return text_tokens(text, chars_per_token) + image, image


def estimate_requests(client: Any, requests: Iterable[Any], prices: PriceTable | None) -> CostEstimate:
    """Upper-bound cost of sending ``requests`` through ``client`` (an :class:`LLMClient`) now.

    Args:
        client: supplies the config (provider, model, max_tokens, image settings), the cache
            and :meth:`LLMClient.cache_key_for`.
        requests: :class:`medicsynth.llm.LLMRequest` objects; bad images are skipped (they fail
            without a call).
        prices: the price table; without one (or without the model in it) ``usd`` is ``None``.

    Identical calls are counted once, cached ones not at all (they cost nothing).
    """
    from medicsynth.llm.providers import ImageError, encode_image

    cfg = client.config
    price = prices.price(cfg.model) if prices else None
    cpt = prices.chars_per_token if prices else 4.0
    seen: set[str] = set()
    n = cached = 0
    input_tokens = image_tokens = 0
    for req in requests:
        n += 1
        image = None
        if req.image_path is not None:
            try:
                image = encode_image(req.image_path, cfg.image_max_side, cfg.jpeg_quality)
            except ImageError:
                continue
        key = client.cache_key_for(req, req.prompt, image)
        if key in seen:
            continue
        seen.add(key)
        if client.cache.get(key) is not None:
            cached += 1
            continue
        tokens, img = request_tokens(cfg.provider, req.system, req.prompt, req.schema,
                                     image.size if image else None, cpt, price.image if price else None)
        input_tokens += tokens
        image_tokens += img
    to_send = len(seen) - cached
    output_max = to_send * cfg.max_tokens
    mode = getattr(cfg, "mode", "sync")
    usd = price.usd(input_tokens, output_max, batch=mode == "batch") if price else None
    return CostEstimate(cfg.provider, cfg.model, n, cached, to_send, input_tokens, image_tokens, output_max, usd,
                        prices.date if prices else None, mode)


def check_budget(estimate: CostEstimate, budget_usd: float | None, where: str = "budget_usd") -> None:
    """Raise :class:`LLMBudgetError` when ``estimate`` is above ``budget_usd`` (``None``: no cap).

    ``where`` names the params key in the message (``zeroshot.budget_usd``). An estimate without
    a price cannot be checked against a cap: that is an error too, naming the model.
    """
    if budget_usd is None or estimate.to_send == 0:
        return
    if estimate.usd is None:
        kind = "batch price (batch_input_per_mtok, batch_output_per_mtok)" if estimate.mode == "batch" else "price"
        raise LLMBudgetError(
            f"{where}={budget_usd}: no {kind} for {estimate.provider} model {estimate.model!r} in llm.prices; "
            f"add it (USD per million input/output tokens, with the date you read them) or set {where}: null"
        )
    if estimate.usd > budget_usd:
        raise LLMBudgetError(
            f"{estimate.provider} model {estimate.model!r}: estimated cost ${estimate.usd:.2f} is above "
            f"{where}=${budget_usd:.2f} ({estimate.to_send} calls to send, {estimate.cached} cached; "
            f"~{estimate.input_tokens} input tokens incl. {estimate.image_tokens} for images, at most "
            f"{estimate.output_tokens_max} output tokens; prices of {estimate.price_date}). Nothing was sent. "
            f"Raise {where} to at least {math.ceil(estimate.usd * 100) / 100:.2f}, or send fewer requests."
        )
