"""Persistent on-disk cache of paid LLM/VLM calls: one JSON file per call, written atomically.

Why it lives outside DVC outputs
--------------------------------
DVC deletes a stage's declared outputs before it reruns the stage, and restores them from its own
cache only when nothing changed. A cache of paid API answers must survive exactly the reruns that
DVC triggers (new prompt, more images, a crash halfway), so it cannot be a stage output. It lives
in its own directory, by default ``.llm_cache/`` at the repository root (git-ignored, param
``llm.cache_dir``), and stages read and extend it as a side store. Deleting it costs money, never
correctness: every entry is keyed by everything that determines the answer.

Key
---
:func:`cache_key` is the sha256 of a canonical JSON of: the cache format version, provider,
model, system prompt, user prompt, sha256 of the image bytes *as sent* (after downscaling and
re-encoding), temperature as sent (``None`` where the provider takes none), max_tokens and the
JSON schema. The caller's validator is *not* part of the key: entries hold the provider's raw
outcome (text, structured object, refusal signal, tokens) and validation reruns on every read,
so a fixed validator re-judges old answers without paying again.

Layout and safety
-----------------
``<cache_dir>/<key[:2]>/<key>.json``. Each entry is written with a temporary file in the same
directory and ``os.replace`` as soon as its answer arrives, so a kill at any instant leaves
either the complete entry or none, and a rerun repeats no answered call. Only deterministic,
paid outcomes are stored (answers, refusals, malformed answers); transient errors never are.
Nothing secret is stored: entries hold no headers and no API key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medicsynth.io import write_bytes_durably

log = logging.getLogger(__name__)

#: Bump when the meaning of an entry changes; old entries then simply stop matching.
CACHE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class RawResponse:
    """A provider's answer to one call, reduced to what the client interprets.

    ``text`` is the assistant text (OpenAI message content, Anthropic text blocks joined);
    ``data`` the structured object when the provider returned one natively (Anthropic tool
    input), else ``None``; ``refusal`` the provider's explicit refusal message or marker
    (OpenAI ``message.refusal``, ``finish_reason == "content_filter"``, Anthropic
    ``stop_reason == "refusal"``), else ``None``; ``finish_reason`` the provider's stop reason.
    """

    text: str | None
    data: dict[str, Any] | None
    refusal: str | None
    finish_reason: str | None
    input_tokens: int
    output_tokens: int


def cache_key(
    *,
    provider: str,
    model: str,
    system: str,
    prompt: str,
    image_sha256: str | None,
    temperature: float | None,
    max_tokens: int,
    schema: dict[str, Any] | None,
) -> str:
    """sha256 hex digest identifying one call; see the module docstring for what it covers."""
    material = {
        "version": CACHE_FORMAT_VERSION,
        "provider": provider,
        "model": model,
        "system": system,
        "prompt": prompt,
        "image_sha256": image_sha256,
        "temperature": None if temperature is None else float(temperature),
        "max_tokens": int(max_tokens),
        "schema": schema,
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Directory of cached :class:`RawResponse` entries, safe for concurrent threads.

    Distinct keys are distinct files and writes are atomic renames, so threads (and processes)
    need no lock; two writers of the same key write the same content.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> RawResponse | None:
        """The cached response for ``key``, or ``None`` (also for an unreadable entry, logged)."""
        path = self.path(key)
        try:
            with open(path, encoding="utf-8") as fh:
                entry = json.load(fh)
            if entry.get("version") != CACHE_FORMAT_VERSION or entry.get("key") != key:
                raise ValueError("version or key mismatch")
            return RawResponse(**entry["response"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Atomic writes make this rare (a hand edit, a full disk); the call is simply redone.
            log.warning("ignoring unreadable LLM cache entry %s: %s", path, exc)
            return None

    def put(self, key: str, response: RawResponse, meta: dict[str, Any] | None = None) -> Path:
        """Store ``response`` under ``key`` atomically; ``meta`` is informational (model, image hash)."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {
            "version": CACHE_FORMAT_VERSION,
            "key": key,
            "meta": meta or {},
            "response": asdict(response),
        }
        # The answer was paid for: make it survive a power cut, not only a kill.
        return write_bytes_durably(json.dumps(entry, ensure_ascii=False, sort_keys=True).encode("utf-8"), path)

    def __len__(self) -> int:
        if not self.directory.exists():
            return 0
        return sum(1 for _ in self.directory.glob("??/*.json"))
