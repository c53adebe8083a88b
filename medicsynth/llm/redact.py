"""Removing credentials from text before it reaches a file, a log or an exception message.

Provider error bodies are not under our control: a 401 may echo the key it was given, a proxy
may reflect the ``Authorization`` header. Everything the client writes about a failure
(:attr:`medicsynth.llm.LLMResult.detail`, the abort message, log lines) goes through
:func:`redact` first, with the configured API keys as exact secrets.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

REDACTED = "[REDACTED]"

# Shapes of credentials, whatever key is configured: provider keys, bearer tokens and
# "api_key=..."-style assignments (the prefix is kept so the message stays readable).
_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"(?<![A-Za-z0-9])sk-[A-Za-z0-9_\-]{6,}"),  # OpenAI (sk-, sk-proj-) and Anthropic (sk-ant-)
    re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=\-]{6,}"),
    re.compile(r"(?i)((?:x-api-key|api[_-]?key|authorization|access[_-]?token)[\"']?\s*[:=]\s*[\"']?)[^\s\"',;}]{6,}"),
)
# A configured secret shorter than this is not searched for as a plain substring (it would
# blank ordinary words); the patterns above still apply.
MIN_SECRET_LENGTH = 6


def env_secrets(names: Iterable[str] = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")) -> tuple[str, ...]:
    """Values of the API-key environment variables that are set (the keys the SDKs send)."""
    return tuple(v for v in (os.environ.get(n, "") for n in names) if v)


def redact(text: str | None, secrets: Iterable[str] = ()) -> str:
    """``text`` with every credential replaced by ``[REDACTED]``.

    Args:
        text: any message (``None`` gives ``""``).
        secrets: exact values to remove wherever they occur (the configured API keys), longest
            first; values shorter than :data:`MIN_SECRET_LENGTH` are skipped.

    Guarantees: no listed secret of at least :data:`MIN_SECRET_LENGTH` characters, no
    ``sk-...`` key, bearer token or ``api_key=...`` value survives; other text is unchanged.
    """
    if not text:
        return ""
    out = str(text)
    for secret in sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True):
        out = out.replace(secret, REDACTED)
    for pattern in _PATTERNS:
        out = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED, out)
    return out
