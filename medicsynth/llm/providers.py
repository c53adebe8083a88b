"""Provider adapters over the official SDKs (openai 3.x chat.completions, anthropic 2.x messages).

Each adapter turns one prompt (+ optional image, + optional JSON schema) into one API call and
reduces the SDK's answer to a :class:`~medicsynth.llm.cache.RawResponse`, or raises

- :class:`TransientError` for what a retry may fix (429, 408, 409, 5xx, timeouts, connection
  errors, an unparseable response body), carrying the server's ``Retry-After`` when given;
- :class:`PermanentError` for what it will not (other 4xx such as a bad request or a bad key);
  ``fatal`` marks those that concern the account or the model rather than the request (401, 402,
  403, 404, a missing key), so every other request would fail the same way.

A 200 whose body is not a model answer (a proxy's HTML page, a JSON list, an Anthropic
``{"type": "error"}`` object, a message without content and stop reason) is a
:class:`TransientError` (``bad_response``) for both providers: retried, never cached.

Each SDK call is one attempt with a total deadline of ``timeout_s`` (connect, send and the whole
response, :mod:`medicsynth.llm.transport`), not only a per-read timeout.

The SDK clients are built with ``max_retries=0``: retries, backoff and their accounting belong to
:class:`medicsynth.llm.client.LLMClient`, so counts are ours and testable.

API keys come only from the environment (``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``) and are handed
straight to the SDK; this module never logs, stores or formats them into messages.

Notes on the installed SDK versions:

- openai 3.x: ``max_tokens`` is deprecated in favour of ``max_completion_tokens``; structured output
  is ``response_format={"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``;
  a refusal arrives in ``message.refusal``.
- anthropic 2.x sends ``anthropic-version: 2026-10-21``, which rejects ``temperature`` (and
  ``top_p``/``top_k``) with HTTP 400 even at default values, and the SDK removed the argument. So
  by default the Anthropic adapter sends no temperature, and reports ``None`` as the temperature
  sent (which is what the cache key records). With ``anthropic_version: "2023-06-01"`` (the API
  version every request carried until October 2026, still served, and the one the study's runs
  used) the adapter sends that header and the temperature (through the SDK's ``extra_headers`` /
  ``extra_body``, since its signature lacks the argument), in sync and in batch mode. Structured output uses a forced tool call (``tools`` with
  ``input_schema`` and ``tool_choice={"type": "tool", ...}``); a refusal is ``stop_reason ==
  "refusal"``.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from medicsynth.images import to_rgb
from medicsynth.llm.cache import RawResponse
from medicsynth.llm.transport import DeadlineTransport, attempt_deadline, proxy_configured
from medicsynth.shards import read_image_bytes

PROVIDERS: tuple[str, ...] = ("openai", "anthropic")
API_KEY_ENV: dict[str, str] = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}

# Formats both APIs accept as sent; anything else (GIF, TIFF, BMP...) is re-encoded as JPEG.
# GIF is excluded on purpose: OpenAI rejects animated GIFs and MEDIC has GIFs named .jpg.
_PASSTHROUGH = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
_RETRYABLE_STATUS = {408, 409, 429}
# Errors about the key, the account or the model (not the request): every request gets them.
_FATAL_STATUS = {401, 402, 403, 404}
_PLAIN_MODES = {"RGB", "L", "RGBA", "LA", "P"}
_EXIF_ORIENTATION = 0x0112


class ProviderError(Exception):
    """A failed call. ``reason`` is a short token for failure counts."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TransientError(ProviderError):
    """A failure a retry may fix; ``retry_after`` is the server's requested wait in seconds."""

    def __init__(self, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(reason, message)
        self.retry_after = retry_after


class PermanentError(ProviderError):
    """A failure a retry will not fix (bad request, authentication, not found...).

    ``fatal`` is true when it concerns the key, account or model (HTTP 401/402/403/404, no key),
    so that no other request can succeed either.
    """

    def __init__(self, reason: str, message: str, fatal: bool = False) -> None:
        super().__init__(reason, message)
        self.fatal = fatal


class ImageError(ValueError):
    """An image that cannot be sent: missing, not an image, truncated or corrupt."""


# ------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedImage:
    """Image bytes exactly as they will be sent, their media type and sha256."""

    data: bytes
    media_type: str
    sha256: str
    size: tuple[int, int]
    reencoded: bool

    @property
    def base64(self) -> str:
        return base64.b64encode(self.data).decode("ascii")


def encode_image(path: str | Path, max_side: int = 768, jpeg_quality: int = 90) -> EncodedImage:
    """Read ``path`` and prepare it for an API call.

    The format is detected from the bytes, never the file extension. A JPEG, PNG or WebP whose
    longer side is at most ``max_side`` is sent unchanged; anything larger is downscaled (aspect
    kept) and re-encoded as JPEG, and other formats (e.g. a GIF named ``.jpg``; first frame) are
    re-encoded as JPEG, to bound the cost of image tokens. The image is fully decoded first, so a
    truncated or corrupt file raises :class:`ImageError` instead of being paid for.
    """
    if max_side < 16:
        raise ValueError(f"image_max_side must be >= 16, got {max_side}")
    path = Path(path)
    try:
        raw = read_image_bytes(path)  # a file, or a shard member (<shard>.tar#<member>)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            fmt = im.format or ""
            im.seek(0)
            im.load()  # full decode: truncated files raise here
            size = im.size
            media_type = _PASSTHROUGH.get(fmt)
            # EXIF rotation and CMYK/16-bit modes are applied/converted here rather than left to
            # each API's decoder; such files are re-encoded like oversized ones.
            plain = im.mode in _PLAIN_MODES and im.getexif().get(_EXIF_ORIENTATION, 1) == 1
            if media_type is not None and plain and max(size) <= max_side:
                return EncodedImage(raw, media_type, hashlib.sha256(raw).hexdigest(), size, False)
            rgb = to_rgb(ImageOps.exif_transpose(im))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{path}: not a decodable image: {exc}") from None
    if max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        new = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(new, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=int(jpeg_quality))
    data = buf.getvalue()
    return EncodedImage(data, "image/jpeg", hashlib.sha256(data).hexdigest(), rgb.size, True)


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _classify_sdk_error(exc: Exception, sdk: Any) -> ProviderError | None:
    """Map an openai/anthropic SDK exception to our error types; ``None`` if it is not one."""
    if isinstance(exc, sdk.APITimeoutError):
        return TransientError("timeout", "request timed out")
    if isinstance(exc, sdk.APIConnectionError):
        return TransientError("connection", f"connection error: {type(exc.__cause__ or exc).__name__}")
    if isinstance(exc, sdk.APIStatusError):
        status = exc.status_code
        message = f"HTTP {status}: {_error_message(exc)}"
        if status in _RETRYABLE_STATUS or status >= 500:
            reason = "rate_limit" if status == 429 else "server_error"
            return TransientError(reason, message, parse_retry_after(exc.response.headers))
        return PermanentError(f"http_{status}", message, fatal=status in _FATAL_STATUS)
    if isinstance(exc, (json.JSONDecodeError, sdk.APIResponseValidationError)):
        # The SDKs raise JSONDecodeError on a 200 whose body is not JSON (e.g. cut by a proxy).
        return TransientError("bad_response", f"unparseable response body: {exc}")
    return None


def _error_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
    return str(getattr(exc, "message", exc))[:300]


def _api_key(provider: str) -> str:
    env = API_KEY_ENV[provider]
    key = os.environ.get(env, "")
    if not key:
        raise PermanentError("no_api_key", f"{env} is not set in the environment", fatal=True)
    return key


def _http_client(sdk: Any) -> Any | None:
    """The SDK's default HTTP client with a per-attempt deadline transport; ``None`` (the SDK's
    own client, per-read timeouts only) when an environment proxy must be honoured."""
    if proxy_configured():
        return None
    return sdk.DefaultHttpxClient(transport=DeadlineTransport(sdk.DEFAULT_CONNECTION_LIMITS))


def _bad_response(what: str) -> TransientError:
    return TransientError("bad_response", f"HTTP 200 but not a model answer: {what}"[:300])


def _describe_body(resp: Any) -> str:
    """A short description of an unexpected response object (type and start of its text)."""
    if isinstance(resp, (str, bytes)):
        head = resp[:80] if isinstance(resp, str) else resp[:80].decode("utf-8", "replace")
        return f"{type(resp).__name__} body {head!r}"
    return f"{type(resp).__name__} body"


# ------------------------------------------------------------------------------------------
# Adapters
# ------------------------------------------------------------------------------------------


class OpenAIProvider:
    """Chat Completions with an optional image (data URL) and json_schema response format."""

    name = "openai"

    def __init__(
        self, model: str, *, temperature: float, max_tokens: int, sdk_client: Any, timeout_s: float | None = None
    ) -> None:
        import openai

        self._sdk = openai
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.client = sdk_client
        self.timeout_s = timeout_s

    @property
    def api_key(self) -> str:
        """The key the SDK client sends (for redaction only; never logged or stored)."""
        return str(getattr(self.client, "api_key", "") or "")

    @classmethod
    def from_config(cls, config: Any) -> OpenAIProvider:
        import openai

        client = openai.OpenAI(
            api_key=_api_key("openai"),
            base_url=config.base_url,
            timeout=config.timeout_s,
            max_retries=0,
            http_client=_http_client(openai),
        )
        return cls(config.model, temperature=config.temperature, max_tokens=config.max_tokens, sdk_client=client,
                   timeout_s=config.timeout_s)

    @property
    def temperature_sent(self) -> float | None:
        return self.temperature

    def call(
        self,
        *,
        system: str,
        prompt: str,
        image: EncodedImage | None,
        schema: dict[str, Any] | None,
        schema_name: str,
    ) -> RawResponse:
        params = self.request_params(system=system, prompt=prompt, image=image, schema=schema, schema_name=schema_name)
        try:
            with attempt_deadline(self.timeout_s) if self.timeout_s else contextlib.nullcontext():
                resp = self.client.chat.completions.create(**params)
        except Exception as exc:  # noqa: BLE001 - classified, or re-raised untouched
            err = _classify_sdk_error(exc, self._sdk)
            if err is None:
                raise
            raise err from None
        return self.reduce(resp)

    def request_params(
        self, *, system: str, prompt: str, image: EncodedImage | None, schema: dict[str, Any] | None, schema_name: str
    ) -> dict[str, Any]:
        """The Chat Completions request body of one call (the same for sync calls and batch lines)."""
        content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
        if image is not None:
            url = f"data:{image.media_type};base64,{image.base64}"
            content.append({"type": "image_url", "image_url": {"url": url}})
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": content})
        kwargs: dict[str, Any] = {}
        if schema is not None:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": schema_name, "schema": schema, "strict": True},
            }
        return {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_completion_tokens": self.max_tokens,
            **kwargs,
        }

    def reduce_body(self, body: Any) -> RawResponse:
        """:class:`RawResponse` of a chat completion given as JSON (a batch output line's body)."""
        try:
            resp = self._sdk.types.chat.ChatCompletion.model_validate(body)
        except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError and friends
            raise _bad_response(f"not a chat completion ({type(exc).__name__})") from None
        return self.reduce(resp)

    def reduce(self, resp: Any) -> RawResponse:
        """:class:`RawResponse` of an SDK ``ChatCompletion``; :class:`TransientError` if it is none."""
        if not isinstance(resp, self._sdk.types.chat.ChatCompletion) or not getattr(resp, "choices", None):
            raise _bad_response(f"{_describe_body(resp)} has no choices")
        try:
            choice = resp.choices[0]
            msg = choice.message
            refusal = msg.refusal or None
            if refusal is None and choice.finish_reason == "content_filter":
                refusal = "finish_reason=content_filter"
            text = msg.content
            if text is not None and not isinstance(text, str):
                raise TypeError(f"message content is {type(text).__name__}")
            usage = resp.usage
            return RawResponse(
                text=text,
                data=None,
                refusal=refusal,
                finish_reason=choice.finish_reason,
                input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            )
        except (AttributeError, TypeError, ValueError, IndexError) as exc:
            raise _bad_response(f"malformed chat completion ({type(exc).__name__}: {exc})") from None


#: Anthropic API versions that take ``temperature``; the SDK's own (2026-10-21) rejects it.
ANTHROPIC_SAMPLING_VERSIONS: tuple[str, ...] = ("2023-06-01",)


def check_anthropic_version(version: str | None) -> None:
    """Raise ``ValueError`` naming the setting unless ``version`` is ``None`` (the SDK's) or known."""
    if version is None:
        return
    import anthropic

    known = (*ANTHROPIC_SAMPLING_VERSIONS, anthropic._constants.ANTHROPIC_API_VERSION)
    if version not in known:
        raise ValueError(
            f"llm setting anthropic_version={version!r} is not an Anthropic API version this adapter knows; "
            f"use null (the SDK's {anthropic._constants.ANTHROPIC_API_VERSION}, no temperature) or "
            f"{', '.join(repr(v) for v in ANTHROPIC_SAMPLING_VERSIONS)} (takes a temperature)"
        )


class AnthropicProvider:
    """Messages API with an optional base64 image and a forced tool call for structured output.

    ``api_version`` ``None`` keeps the SDK's ``anthropic-version`` (no temperature is sent);
    a version in :data:`ANTHROPIC_SAMPLING_VERSIONS` is sent as the header of every request and
    ``temperature`` goes with it (module docstring).
    """

    name = "anthropic"

    def __init__(
        self, model: str, *, max_tokens: int, sdk_client: Any, timeout_s: float | None = None,
        temperature: float | None = None, api_version: str | None = None,
    ) -> None:
        import anthropic

        check_anthropic_version(api_version)
        self._sdk = anthropic
        self.model = model
        self.max_tokens = max_tokens
        self.client = sdk_client
        self.timeout_s = timeout_s
        self.temperature = temperature
        self.api_version = api_version

    @property
    def api_key(self) -> str:
        """The key the SDK client sends (for redaction only; never logged or stored)."""
        return str(getattr(self.client, "api_key", "") or "")

    @classmethod
    def from_config(cls, config: Any) -> AnthropicProvider:
        import anthropic

        client = anthropic.Anthropic(
            api_key=_api_key("anthropic"),
            base_url=config.base_url,
            timeout=config.timeout_s,
            max_retries=0,
            http_client=_http_client(anthropic),
        )
        return cls(config.model, max_tokens=config.max_tokens, sdk_client=client, timeout_s=config.timeout_s,
                   temperature=config.temperature, api_version=config.anthropic_version)

    @property
    def temperature_sent(self) -> float | None:
        # API version 2026-10-21 rejects sampling parameters; only an older version takes one.
        return self.temperature if self.api_version in ANTHROPIC_SAMPLING_VERSIONS else None

    @property
    def extra_headers(self) -> dict[str, str]:
        """Headers every request of this adapter adds (sync calls and batch submissions)."""
        return {"anthropic-version": self.api_version} if self.api_version else {}

    def call(
        self,
        *,
        system: str,
        prompt: str,
        image: EncodedImage | None,
        schema: dict[str, Any] | None,
        schema_name: str,
    ) -> RawResponse:
        params = self.request_params(system=system, prompt=prompt, image=image, schema=schema, schema_name=schema_name)
        # The SDK's signature has no temperature: it travels as an extra body field.
        extra_body = {"temperature": params.pop("temperature")} if "temperature" in params else None
        try:
            with attempt_deadline(self.timeout_s) if self.timeout_s else contextlib.nullcontext():
                resp = self.client.messages.create(**params, extra_headers=self.extra_headers or None,
                                                   extra_body=extra_body)
        except Exception as exc:  # noqa: BLE001 - classified, or re-raised untouched
            err = _classify_sdk_error(exc, self._sdk)
            if err is None:
                raise
            raise err from None
        return self.reduce(resp, schema, schema_name)

    def request_params(
        self, *, system: str, prompt: str, image: EncodedImage | None, schema: dict[str, Any] | None, schema_name: str
    ) -> dict[str, Any]:
        """The Messages request body of one call (the same for sync calls and batch ``params``)."""
        content: list[dict[str, Any]] = []
        if image is not None:
            content.append(
                {"type": "image", "source": {"type": "base64", "media_type": image.media_type, "data": image.base64}}
            )
        content.append({"type": "text", "text": prompt})
        kwargs: dict[str, Any] = {}
        if system:
            kwargs["system"] = system
        if schema is not None:
            kwargs["tools"] = [
                {
                    "name": schema_name,
                    "description": "Record the answer in the required structure.",
                    "input_schema": schema,
                }
            ]
            kwargs["tool_choice"] = {"type": "tool", "name": schema_name}
        if self.temperature_sent is not None:
            kwargs["temperature"] = self.temperature_sent
        return {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "messages": [{"role": "user", "content": content}],
            **kwargs,
        }

    def reduce_body(self, body: Any, schema: dict[str, Any] | None, schema_name: str) -> RawResponse:
        """:class:`RawResponse` of a Message given as JSON (a batch result's ``message``)."""
        try:
            resp = self._sdk.types.Message.model_validate(body)
        except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError and friends
            raise _bad_response(f"not a message ({type(exc).__name__})") from None
        return self.reduce(resp, schema, schema_name)

    def reduce(self, resp: Any, schema: dict[str, Any] | None, schema_name: str) -> RawResponse:
        """:class:`RawResponse` of an SDK ``Message``; :class:`TransientError` if it is none."""
        # The SDK hands back whatever a 200 carried (a str for an HTML page, a list, a Message
        # built without validation from {"type": "error", ...}); only a real Message is an answer.
        if not isinstance(resp, self._sdk.types.Message):
            raise _bad_response(_describe_body(resp))
        if getattr(resp, "type", None) != "message":
            error = getattr(resp, "error", None) or (resp.model_extra or {}).get("error")
            message = error.get("message") if isinstance(error, dict) else getattr(error, "message", None)
            raise _bad_response(f"body of type {getattr(resp, 'type', None)!r}: {message or 'no message'}")
        if not isinstance(resp.content, list) or resp.stop_reason is None:
            raise _bad_response("message without content list or stop_reason")
        try:
            return self._reduce(resp, schema, schema_name)
        except (AttributeError, TypeError, ValueError) as exc:
            raise _bad_response(f"malformed message ({type(exc).__name__}: {exc})") from None

    def _reduce(self, resp: Any, schema: dict[str, Any] | None, schema_name: str) -> RawResponse:
        texts: list[str] = []
        data: dict[str, Any] | None = None
        for block in resp.content:
            kind = getattr(block, "type", None)
            if kind == "text":
                texts.append(block.text)
            elif kind == "tool_use" and data is None and (schema is None or block.name == schema_name):
                data = block.input if isinstance(block.input, dict) else {"_non_object_input": block.input}
        refusal = None
        if resp.stop_reason == "refusal":
            details = getattr(resp, "stop_details", None)
            refusal = getattr(details, "explanation", None) or "stop_reason=refusal"
        usage = resp.usage
        return RawResponse(
            text="".join(texts) if texts else None,
            data=data,
            refusal=refusal,
            finish_reason=resp.stop_reason,
            input_tokens=int(getattr(usage, "input_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "output_tokens", 0) or 0),
        )


def make_provider(config: Any, sdk_client: Any | None = None) -> OpenAIProvider | AnthropicProvider:
    """Adapter for ``config.provider``; ``sdk_client`` replaces the SDK client built from config."""
    if config.provider == "openai":
        if sdk_client is None:
            return OpenAIProvider.from_config(config)
        return OpenAIProvider(
            config.model, temperature=config.temperature, max_tokens=config.max_tokens, sdk_client=sdk_client,
            timeout_s=config.timeout_s,
        )
    if config.provider == "anthropic":
        if sdk_client is None:
            return AnthropicProvider.from_config(config)
        return AnthropicProvider(
            config.model, max_tokens=config.max_tokens, sdk_client=sdk_client, timeout_s=config.timeout_s,
            temperature=config.temperature, api_version=config.anthropic_version,
        )
    raise ValueError(f"unknown provider {config.provider!r}; expected one of {', '.join(PROVIDERS)}")
