"""The LLM/VLM client layer against a real local HTTP server, through the real SDKs.

Every provider call goes ``LLMClient`` -> openai/anthropic SDK -> HTTP -> ``FakeLLMServer``; the
server is scripted per request (see ``tests/api_server.py``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from medicsynth.labels import CLASSES, TASKS
from medicsynth.llm import (
    config_with_defaults,
    repository_llm_params,
    LabelsAnswerError,
    LLMClient,
    LLMConfig,
    LLMRequest,
    ResponseCache,
    classify_request,
    client_from_params,
    config_from_params,
    encode_image,
    labels_json_schema,
    looks_like_refusal,
    validate_labels_answer,
)
from medicsynth.llm.providers import ImageError, PermanentError, parse_retry_after
from tests.api_server import (
    FakeLLMServer,
    answer,
    auto,
    broken_body,
    error,
    hang,
    malformed,
    refusal,
    slow,
    text_refusal,
)
from tests.api_server import text as text_reply

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "prompts"
SECRET = "sk-test-SECRET123"
PROVIDERS = ("openai", "anthropic")
GOOD = {
    "damage_severity": "severe",
    "informative": "informative",
    "humanitarian": "infrastructure_and_utility_damage",
    "disaster_types": "earthquake",
}


@pytest.fixture(autouse=True)
def api_keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)


def make_images(directory: Path, n: int, size: tuple[int, int] = (40, 30)) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = directory / f"img_{i:03d}.jpg"
        Image.new("RGB", size, (i * 37 % 256, i * 91 % 256, i * 13 % 256)).save(path, quality=90)
        paths.append(str(path))
    return paths


def make_client(server: FakeLLMServer, provider: str, cache_dir: Path, **overrides) -> LLMClient:
    settings = dict(
        provider=provider,
        model="test-model",
        base_url=server.base_url(provider),
        timeout_s=0.5,
        max_retries=3,
        backoff_base_s=0.01,
        backoff_max_s=2.0,
        concurrency=4,
    )
    settings.update(overrides)
    return LLMClient(config_with_defaults(**settings), cache_dir)


def classify(paths: list[str]) -> list[LLMRequest]:
    return [classify_request(p, TASKS, prompt_dir=PROMPTS) for p in paths]


# ------------------------------------------------------------------------------------------
# Labels answer and prompts (no server)
# ------------------------------------------------------------------------------------------


def test_labels_schema_lists_every_class_and_forbids_extras():
    schema = labels_json_schema(["disaster_types", "damage_severity"])
    assert schema["required"] == ["damage_severity", "disaster_types"]  # TASKS order
    assert schema["additionalProperties"] is False
    assert schema["properties"]["disaster_types"]["enum"] == list(CLASSES["disaster_types"])


def test_validate_labels_answer_normalises_and_rejects():
    raw = dict(GOOD, damage_severity="  Little Or None ", disaster_types="EARTHQUAKE")
    assert validate_labels_answer(raw) == dict(GOOD, damage_severity="little_or_none")
    with pytest.raises(LabelsAnswerError, match="missing informative"):
        validate_labels_answer({k: v for k, v in GOOD.items() if k != "informative"})
    with pytest.raises(LabelsAnswerError, match="unexpected reasoning"):
        validate_labels_answer(dict(GOOD, reasoning="because"))
    with pytest.raises(LabelsAnswerError, match="catastrophic"):
        validate_labels_answer(dict(GOOD, damage_severity="catastrophic"))
    with pytest.raises(LabelsAnswerError, match="expected a label string"):
        validate_labels_answer(dict(GOOD, informative=1))
    with pytest.raises(LabelsAnswerError, match="expected a JSON object"):
        validate_labels_answer(["severe"])
    with pytest.raises(ValueError, match="unknown task"):
        validate_labels_answer(GOOD, ["damage"])


def test_classify_request_prompt_has_definitions_labels_and_fallback(tmp_path):
    req = classify_request(tmp_path / "x.jpg", ["informative", "humanitarian"], prompt_dir=PROMPTS)
    for task in TASKS:  # the system prompt defines every class
        for label in CLASSES[task]:
            assert f"- {label}:" in req.system
    assert "informative | not_informative" in req.prompt
    assert '"informative", "humanitarian"' in req.prompt
    assert "damage_severity" not in req.prompt and "$" not in req.prompt
    preface = (PROMPTS / "refusal_fallback.txt").read_text().strip()
    assert req.fallback_prompt == f"{preface}\n\n{req.prompt}"
    assert req.key == str(tmp_path / "x.jpg")
    assert req.validate(dict(informative="Informative", humanitarian="not_humanitarian")) == {
        "informative": "informative",
        "humanitarian": "not_humanitarian",
    }


def test_looks_like_refusal():
    assert looks_like_refusal("I can't help with that request.")
    assert looks_like_refusal("I\u2019m sorry, but I cannot assist with this image.")
    assert looks_like_refusal("Sorry, I'm unable to help with this.")
    assert not looks_like_refusal('{"damage_severity": "mild"}')
    assert not looks_like_refusal(
        "A flooded street at dusk with a red car half under water; volunteers wade towards houses "
        "whose residents can't leave, seen from a rooftop in South Asia during the monsoon season."
    )


def test_parse_retry_after():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0


def test_config_from_params_rejects_unknown_keys_and_bad_values():
    defaults = repository_llm_params()["client"]
    cfg = config_from_params({"provider": "openai", "model": "m", "cache_dir": "x", "max_calls": 5}, defaults)
    assert cfg.max_calls == 5 and cfg.temperature == defaults["temperature"]
    # No defaults in code: without llm.client a missing setting is an error naming it.
    with pytest.raises(ValueError, match="max_tokens.*missing.*llm.client"):
        config_from_params({"provider": "openai", "model": "m"})
    with pytest.raises(ValueError, match="unknown llm.client key.*colour"):
        config_from_params({"provider": "openai", "model": "m"}, {**defaults, "colour": 1})
    with pytest.raises(ValueError, match="unknown llm setting.*max_image"):
        config_from_params({"provider": "openai", "model": "m", "max_image": 3})
    with pytest.raises(ValueError, match="concurrency=0"):
        config_with_defaults(provider="openai", model="m", concurrency=0)
    with pytest.raises(ValueError, match="provider 'none'"):
        config_with_defaults(provider="none", model="m")


def test_missing_api_key_is_a_clear_error_without_calls(monkeypatch, tmp_path):
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(PermanentError, match="ANTHROPIC_API_KEY is not set"):
        client_from_params({"provider": "anthropic", "model": "m"}, tmp_path)


# ------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------


def test_encode_image_detects_format_from_bytes_and_bounds_size(tmp_path):
    png = tmp_path / "really_png.jpg"
    Image.new("RGBA", (20, 10), (1, 2, 3, 128)).save(png, format="PNG")
    enc = encode_image(png, max_side=64)
    assert enc.media_type == "image/png" and enc.data == png.read_bytes() and not enc.reencoded

    gif = tmp_path / "really_gif.jpg"
    Image.new("P", (30, 30)).save(gif, format="GIF")
    enc = encode_image(gif, max_side=64)
    assert enc.media_type == "image/jpeg" and enc.reencoded
    assert Image.open(io.BytesIO(enc.data)).format == "JPEG"

    big = tmp_path / "big.png"
    Image.new("RGB", (1000, 400), (9, 9, 9)).save(big)
    enc = encode_image(big, max_side=256)
    assert enc.media_type == "image/jpeg" and enc.size == (256, 102)
    assert Image.open(io.BytesIO(enc.data)).size == (256, 102)
    # Re-encoding is deterministic, so the cache key of a downscaled image is stable.
    assert encode_image(big, max_side=256).sha256 == enc.sha256

    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 20), (0, 50, 100, 0)).save(cmyk, format="JPEG")
    enc = encode_image(cmyk, max_side=64)
    assert enc.reencoded and Image.open(io.BytesIO(enc.data)).mode == "RGB"

    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.new("RGB", (40, 20), (5, 5, 5)).save(rotated, format="JPEG", exif=exif)
    enc = encode_image(rotated, max_side=64)
    assert enc.reencoded and enc.size == (20, 40)  # sent upright

    truncated = tmp_path / "cut.jpg"
    full = io.BytesIO()
    Image.effect_noise((200, 200), 50).convert("RGB").save(full, format="JPEG")
    truncated.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    with pytest.raises(ImageError, match="cut.jpg"):
        encode_image(truncated)
    with pytest.raises(ImageError, match="cannot read"):
        encode_image(tmp_path / "missing.jpg")


# ------------------------------------------------------------------------------------------
# Happy path and request shape
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_valid_answer_and_request_shape(llm_server, tmp_path, provider):
    png = tmp_path / "photo.jpg"  # a PNG named .jpg: media type must come from the bytes
    Image.new("RGB", (50, 40), (10, 200, 30)).save(png, format="PNG")
    llm_server.script(answer(dict(GOOD, damage_severity="Severe ")))
    client = make_client(llm_server, provider, tmp_path / "cache", temperature=0.3, max_tokens=123)
    [res] = client.run([classify_request(png, prompt_dir=PROMPTS)], progress=False)
    assert res.ok and res.failure is None and res.value == GOOD
    assert json.loads(res.text)["damage_severity"] == "Severe "
    assert res.calls == 1 and not res.cached and res.input_tokens > 0 and res.output_tokens > 0

    [req] = llm_server.requests
    assert req.headers["authorization"] == f"Bearer {SECRET}"  # the key came from the environment
    assert req.images == [("image/png", png.read_bytes())]
    assert "Allowed labels" in req.prompt and "MEDIC annotation guidelines" in req.system
    body = req.body
    if provider == "openai":
        assert req.path == "/v1/chat/completions"
        fmt = body["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
        assert fmt["json_schema"]["schema"] == labels_json_schema()
        assert body["temperature"] == 0.3 and body["max_completion_tokens"] == 123
    else:
        assert req.path == "/v1/messages"
        assert body["tools"][0]["input_schema"] == labels_json_schema()
        assert body["tool_choice"] == {"type": "tool", "name": "medic_labels"}
        assert body["max_tokens"] == 123
        assert "temperature" not in body  # API 2026-10-21 rejects sampling parameters
    assert req.headers["x-stainless-retry-count"] == "0"


# ------------------------------------------------------------------------------------------
# Retries
# ------------------------------------------------------------------------------------------

TRANSIENT = {
    "429": (lambda: error(429, retry_after_ms=30), "rate_limit"),
    "500": (lambda: error(500), "server_error"),
    "503": (lambda: error(503), "server_error"),
    "timeout": (lambda: slow(1.0), "timeout"),
    "broken_body": (lambda: broken_body(), "bad_response"),
}


@pytest.mark.parametrize("case", sorted(TRANSIENT))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_transient_error_is_retried_then_answered(llm_server, tmp_path, provider, case):
    make_reply, reason = TRANSIENT[case]
    llm_server.script(make_reply(), make_reply(), answer(GOOD))
    client = make_client(llm_server, provider, tmp_path / "cache")
    [res] = client.run(classify(make_images(tmp_path / "img", 1)), progress=False)
    assert res.ok and res.value == GOOD
    assert llm_server.count() == 3
    # Our retries, not the SDK's: each attempt is a fresh first try for the SDK.
    assert [r.headers["x-stainless-retry-count"] for r in llm_server.requests] == ["0", "0", "0"]
    usage = client.usage.as_dict()
    assert usage["api_calls"] == 1 and usage["http_attempts"] == 3
    assert usage["retries"] == {reason: 2} and usage["failures"] == {}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_retries_exhausted_is_a_failure_and_never_cached(llm_server, tmp_path, provider):
    llm_server.script(*[error(500)] * 3)
    images = make_images(tmp_path / "img", 1)
    client = make_client(llm_server, provider, tmp_path / "cache", max_retries=2)
    [res] = client.run(classify(images), progress=False)
    assert not res.ok and res.failure == "retries_exhausted" and "server_error" in res.detail
    assert res.value is None
    assert llm_server.count() == 3 and len(ResponseCache(tmp_path / "cache")) == 0
    assert client.usage.as_dict()["failures"] == {"retries_exhausted": 1}
    # Transient failures are not cached: the next run asks again and gets the answer.
    [res] = make_client(llm_server, provider, tmp_path / "cache").run(classify(images), progress=False)
    assert res.ok and llm_server.count() == 4


@pytest.mark.parametrize("provider", PROVIDERS)
def test_non_retryable_http_error(llm_server, tmp_path, provider):
    llm_server.script(error(400, message="image too large"))
    client = make_client(llm_server, provider, tmp_path / "cache")
    [res] = client.run(classify(make_images(tmp_path / "img", 1)), progress=False)
    assert res.failure == "api_error" and "HTTP 400" in res.detail and "image too large" in res.detail
    assert llm_server.count() == 1 and len(ResponseCache(tmp_path / "cache")) == 0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_retry_after_header_is_honoured(llm_server, tmp_path, provider):
    waits: list[float] = []
    llm_server.script(error(429, retry_after=1), error(503, retry_after=0.4), answer(GOOD))
    client = LLMClient(
        config_with_defaults(provider=provider, model="m", base_url=llm_server.base_url(provider), backoff_base_s=0.001),
        tmp_path / "cache",
        sleep=waits.append,
    )
    [res] = client.run(classify(make_images(tmp_path / "img", 1)), progress=False)
    assert res.ok
    # Exponential backoff alone would wait ~1 ms; the server asked for 1 s and 0.4 s.
    assert waits == [1.0, 0.4]


def test_retry_after_real_wait_and_backoff_cap(llm_server, tmp_path):
    images = make_images(tmp_path / "img", 2)
    llm_server.script(error(429, retry_after=1), answer(GOOD))
    assert make_client(llm_server, "openai", tmp_path / "cache", backoff_max_s=5.0).process(classify(images[:1])[0]).ok
    r = llm_server.requests
    assert r[1].time - r[0].time >= 1.0 - 0.02  # Retry-After: 1 honoured (backoff alone: ~10 ms)

    llm_server.reset()
    llm_server.script(error(429, retry_after=30), answer(GOOD))
    start = time.monotonic()
    assert make_client(llm_server, "openai", tmp_path / "cache", backoff_max_s=0.2).process(classify(images[1:])[0]).ok
    r = llm_server.requests
    assert r[1].time - r[0].time >= 0.2 - 0.02 and time.monotonic() - start < 5  # capped at 0.2 s


def test_backoff_grows_exponentially_with_jitter(tmp_path, llm_server):
    waits: list[float] = []
    llm_server.script(*[error(502)] * 5, answer(GOOD))
    client = LLMClient(
        config_with_defaults(provider="openai", model="m", base_url=llm_server.openai_base_url, max_retries=5,
                  backoff_base_s=0.1, backoff_max_s=0.5),
        tmp_path / "cache",
        sleep=waits.append,
    )
    assert client.process(classify(make_images(tmp_path / "img", 1))[0]).ok
    caps = [0.1, 0.2, 0.4, 0.5, 0.5]
    assert len(waits) == 5
    assert all(cap / 2 <= w <= cap for w, cap in zip(waits, caps)), waits


# ------------------------------------------------------------------------------------------
# Refusals and invalid answers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flag", "text"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_refusal_is_retried_once_with_fallback_prompt(llm_server, tmp_path, provider, kind):
    refuse = refusal if kind == "flag" else text_refusal
    images = make_images(tmp_path / "img", 2)
    llm_server.script(refuse(), answer(GOOD), refuse(), refuse())
    client = make_client(llm_server, provider, tmp_path / "cache", concurrency=1)
    ok, refused = client.run(classify(images), progress=False)
    assert ok.ok and ok.used_fallback and ok.calls == 2 and ok.value == GOOD
    assert not refused.ok and refused.failure == "refusal" and refused.used_fallback
    prompts = [r.prompt for r in llm_server.requests]
    preface = (PROMPTS / "refusal_fallback.txt").read_text().strip()
    assert [p.startswith(preface) for p in prompts] == [False, True, False, True]
    assert llm_server.requests[1].images == llm_server.requests[0].images
    usage = client.usage.as_dict()
    assert usage["failures"] == {"refusal": 1} and usage["fallback_retries"] == 2
    # Refusals were paid for: cached, so a rerun repeats no call and gives the same outcome.
    again = make_client(llm_server, provider, tmp_path / "cache").run(classify(images), progress=False)
    assert llm_server.count() == 4
    assert [(r.ok, r.failure, r.cached) for r in again] == [(True, None, True), (False, "refusal", True)]


def test_refusal_without_fallback_prompt_fails_after_one_call(llm_server, tmp_path):
    llm_server.script(refusal())
    req = classify_request(make_images(tmp_path / "img", 1)[0], prompt_dir=PROMPTS, fallback=False)
    res = make_client(llm_server, "openai", tmp_path / "cache").process(req)
    assert res.failure == "refusal" and not res.used_fallback and llm_server.count() == 1


BAD_ANSWERS = {
    "malformed_json": (lambda: malformed(), "invalid_json"),
    "label_outside_schema": (lambda: answer(dict(GOOD, damage_severity="catastrophic")), "invalid_answer"),
    "partial": (lambda: answer({k: v for k, v in GOOD.items() if k != "humanitarian"}), "invalid_answer"),
    "extra_key": (lambda: answer(dict(GOOD, confidence="high")), "invalid_answer"),
    "not_an_object": (lambda: answer(["severe"]), None),
}


@pytest.mark.parametrize("case", sorted(BAD_ANSWERS))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_invalid_answers_are_recorded_failures_and_cached(llm_server, tmp_path, provider, case):
    make_reply, reason = BAD_ANSWERS[case]
    if reason is None:  # a list is not JSON-object content (OpenAI) / not a tool input (Anthropic)
        reason = "invalid_json" if provider == "openai" else "invalid_answer"
    llm_server.script(make_reply())
    images = make_images(tmp_path / "img", 1)
    client = make_client(llm_server, provider, tmp_path / "cache")
    [res] = client.run(classify(images), progress=False)
    assert not res.ok and res.failure == reason and res.value is None and res.detail
    assert client.usage.as_dict()["failures"] == {reason: 1}
    [again] = make_client(llm_server, provider, tmp_path / "cache").run(classify(images), progress=False)
    assert (again.failure, again.cached, llm_server.count()) == (reason, True, 1)


def test_schema_without_validator_still_rejects_partial_answers(llm_server, tmp_path):
    schema = {"type": "object", "properties": {"caption": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["caption", "n"], "additionalProperties": False}
    llm_server.script(answer({"caption": "ok"}), answer({"caption": "ok", "n": 2}))
    client = make_client(llm_server, "anthropic", tmp_path / "cache", concurrency=1)
    bad, good = client.run(
        [
            LLMRequest(prompt="describe", schema=schema, key="a"),
            LLMRequest(prompt="describe again", schema=schema, key="b"),
        ],
        progress=False,
    )
    assert bad.failure == "invalid_answer" and "missing key(s) n" in bad.detail
    assert good.ok and good.value == {"caption": "ok", "n": 2} and good.key == "b"


def test_text_request_without_schema(llm_server, tmp_path):
    llm_server.script(
        text_reply("A flooded street at dusk."),
        text_refusal("I'm sorry, but I can't write that."),
        text_refusal("I won't describe this."),
    )
    client = make_client(llm_server, "openai", tmp_path / "cache", concurrency=1)
    ok, refused = client.run(
        [
            LLMRequest(prompt="Write a caption.", key="a"),
            LLMRequest(prompt="Write another.", fallback_prompt="Research context. Write another.", key="b"),
        ],
        progress=False,
    )
    assert ok.ok and ok.value == "A flooded street at dusk."
    assert "response_format" not in llm_server.requests[0].body
    assert refused.failure == "refusal" and refused.used_fallback and llm_server.count() == 3


def test_bad_image_fails_without_a_call(llm_server, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"<html>not an image</html>")
    client = make_client(llm_server, "openai", tmp_path / "cache")
    [res] = client.run(classify([str(bad)]), progress=False)
    assert res.failure == "bad_image" and "bad.jpg" in res.detail and llm_server.count() == 0


# ------------------------------------------------------------------------------------------
# Cache, budget, usage, concurrency
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_rerun_is_served_from_cache_with_zero_requests(llm_server, tmp_path, provider):
    images = make_images(tmp_path / "img", 6)
    first = make_client(llm_server, provider, tmp_path / "cache").run(classify(images), progress=False)
    assert llm_server.count() == 6 and all(r.ok for r in first)
    cache = ResponseCache(tmp_path / "cache")
    assert len(cache) == 6
    client = make_client(llm_server, provider, tmp_path / "cache")
    second = client.run(classify(images), progress=False)
    assert llm_server.count() == 6
    assert [r.value for r in second] == [r.value for r in first] and all(r.cached for r in second)
    usage = client.usage.as_dict()
    assert usage["cache_hits"] == 6 and usage["api_calls"] == 0 and usage["input_tokens"] == 0
    assert usage["cached_input_tokens"] == sum(r.input_tokens for r in first) > 0
    # Anything that changes the call is a different key: another model asks again.
    make_client(llm_server, provider, tmp_path / "cache", model="other").run(classify(images[:1]), progress=False)
    assert llm_server.count() == 7


@pytest.mark.parametrize("provider", PROVIDERS)
def test_identical_calls_in_flight_are_made_once(tmp_path, provider):
    images = make_images(tmp_path / "img", 3)
    copy = tmp_path / "img" / "same_bytes_other_path.jpg"
    copy.write_bytes(Path(images[0]).read_bytes())
    paths = [images[0], str(copy), images[1], images[0], images[2]]
    with FakeLLMServer(auto(delay_s=0.2)) as server:
        client = make_client(server, provider, tmp_path / "cache", concurrency=5)
        results = client.run(classify(paths), progress=False)
        assert server.count() == 3
    assert all(r.ok for r in results) and [r.key for r in results] == paths
    assert sum(r.calls for r in results) == 3 and sum(r.cached for r in results) == 2
    assert client.usage.as_dict()["cache_hits"] == 2


def test_cache_key_ignores_anthropic_temperature_but_not_openai(llm_server, tmp_path):
    images = make_images(tmp_path / "img", 1)
    for provider, expected in (("anthropic", 1), ("openai", 2)):
        llm_server.reset()
        for temperature in (0.0, 0.7):
            make_client(llm_server, provider, tmp_path / f"c-{provider}", temperature=temperature).run(
                classify(images), progress=False
            )
        assert llm_server.count() == expected


def test_max_calls_budget_counts_cache_misses_only(llm_server, tmp_path):
    images = make_images(tmp_path / "img", 4)
    client = make_client(llm_server, "openai", tmp_path / "cache", max_calls=2, concurrency=1)
    results = client.run(classify(images), progress=False)
    assert [r.failure for r in results] == [None, None, "budget", "budget"]
    assert llm_server.count() == 2 and "max_calls=2" in results[2].detail
    assert client.usage.as_dict()["failures"] == {"budget": 2}
    # Cached answers cost nothing: a zero budget still serves them.
    client = make_client(llm_server, "openai", tmp_path / "cache", max_calls=0)
    assert [r.failure for r in client.run(classify(images), progress=False)] == [None, None, "budget", "budget"]
    assert llm_server.count() == 2


def test_usage_accounting_and_order_under_concurrency(tmp_path):
    images = make_images(tmp_path / "img", 24)
    by_sha = {encode_image(p).sha256: i for i, p in enumerate(images)}

    def responder(req):
        i = by_sha[req.image_sha256s[0]]
        if i == 5:
            return refusal()
        if i == 7:
            return malformed()
        label = CLASSES["disaster_types"][i % 7]
        return answer(dict(GOOD, disaster_types=label), delay_s=0.05)

    with FakeLLMServer(responder) as server:
        client = make_client(server, "openai", tmp_path / "cache", concurrency=8)
        start = time.monotonic()
        results = client.run(classify(images), progress=False)
        elapsed = time.monotonic() - start
    for i, res in enumerate(results):
        assert res.key == images[i]
        if i not in (5, 7):
            assert res.value["disaster_types"] == CLASSES["disaster_types"][i % 7]
    usage = client.usage.as_dict()
    assert usage["requests"] == 24 and usage["ok"] == 22
    assert usage["failures"] == {"invalid_json": 1, "refusal": 1}
    assert usage["api_calls"] == 25  # + the refusal's fallback
    # every HTTP attempt is a call or a counted retry: on a loaded machine a 0.5 s timeout may fire
    # (seen once in a full `make test` on 2 cores: 26 attempts), and the books must still balance
    assert usage["http_attempts"] == 25 + sum(usage["retries"].values())
    assert usage["input_tokens"] == sum(r.input_tokens for r in results)
    assert usage["output_tokens"] == sum(r.output_tokens for r in results)
    assert usage["latency_s"]["count"] == 25 and usage["latency_s"]["p95"] >= 0.05
    assert elapsed < 24 * 0.05  # faster than any sequential client could be


# ------------------------------------------------------------------------------------------
# Crash safety and secrets
# ------------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, logging, sys
    logging.basicConfig(level=logging.DEBUG)  # SDK debug logs too: they must not leak the key
    from medicsynth.llm import LLMClient, classify_request, config_with_defaults
    repo, provider, base_url, cache_dir, *images = sys.argv[1:]
    config = config_with_defaults(provider=provider, model="m", base_url=base_url, concurrency=1, timeout_s=30,
                       max_retries=0)
    client = LLMClient(config, cache_dir)
    requests = [classify_request(p, prompt_dir=repo + "/prompts") for p in images]
    results = client.run(requests, desc="child")
    print(json.dumps({"usage": client.usage.as_dict(), "ok": [r.ok for r in results], "repr": repr(results)}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("provider", PROVIDERS)
def test_resume_after_sigkill_repeats_no_answered_call(tmp_path, provider):
    n, k = 6, 3
    images = make_images(tmp_path / "img", n)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    cache_dir = tmp_path / "cache"
    release = threading.Event()
    env = dict(os.environ, OPENAI_API_KEY=SECRET, ANTHROPIC_API_KEY=SECRET, HF_HUB_OFFLINE="1")
    argv = [sys.executable, str(script), str(REPO), provider]

    # Answer k requests, then hold the next one open so the kill lands mid-call.
    with FakeLLMServer(lambda req: hang(release) if req.index >= k else auto()) as server:
        cmd = argv + [server.base_url(provider), str(cache_dir), *images]
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while server.count() < k + 1 and time.monotonic() < deadline and child.poll() is None:
                time.sleep(0.02)
            assert server.count() == k + 1, child.stderr.read().decode() if child.poll() is not None else ""
            assert len(ResponseCache(cache_dir)) == k  # each answer was cached as it arrived
            child.send_signal(signal.SIGKILL)
            out1, err1 = child.communicate(timeout=30)
        finally:
            release.set()
            if child.poll() is None:
                child.kill()
        assert child.returncode == -signal.SIGKILL

        server.responder = None  # auto answers from now on
        done = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        report = json.loads(done.stdout.decode().strip().splitlines()[-1])
        received = server.hash_counts()
        completed = server.completed_hash_counts()

    assert report["ok"] == [True] * n
    assert report["usage"]["cache_hits"] == k and report["usage"]["api_calls"] == n - k
    # Every distinct call was answered exactly once over both runs ...
    assert len(completed) == n and set(completed.values()) == {1}
    # ... and only the call in flight at the kill was sent twice (it was never answered).
    assert sum(received.values()) == n + 1 and sorted(received.values()) == [1] * (n - 1) + [2]
    assert len(ResponseCache(cache_dir)) == n

    # The key reached the server (from the environment) and nowhere else.
    outputs = [out1, err1, done.stdout, done.stderr]
    assert b"DEBUG" in done.stderr  # SDK debug logging was on
    for blob in outputs + [p.read_bytes() for p in cache_dir.rglob("*") if p.is_file()]:
        assert SECRET.encode() not in blob


def test_api_key_never_in_logs_results_or_cache(llm_server, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    llm_server.script(error(429, retry_after_ms=1), refusal(), answer(GOOD), error(401), malformed())
    images = make_images(tmp_path / "img", 3)
    results = []
    for provider in PROVIDERS:
        client = make_client(llm_server, provider, tmp_path / "cache", concurrency=1)
        results += client.run(classify(images), progress=True)
        results.append(client.usage.as_dict())
        results.append(client.config)
    captured = capsys.readouterr()
    assert llm_server.count() >= 6
    assert all(r.headers.get("authorization") == f"Bearer {SECRET}" for r in llm_server.requests)
    texts = [caplog.text, captured.out, captured.err, repr(results)]
    texts += [p.read_text() for p in (tmp_path / "cache").rglob("*.json")]
    assert caplog.text  # something was logged
    for text in texts:
        assert SECRET not in text


def test_load_prompt_by_name_or_path_and_never_stale(tmp_path):
    from medicsynth.llm import load_prompt

    prompt = tmp_path / "judge_user.txt"
    prompt.write_text("  first version \n")
    assert load_prompt("judge_user.txt", tmp_path) == "first version"
    assert load_prompt(prompt, None) == load_prompt(str(prompt), prompt_dir=None) == "first version"
    prompt.write_text("second, longer version\n")  # edited in place: read again, not cached
    assert load_prompt("judge_user.txt", tmp_path) == "second, longer version"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompt("missing.txt", tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_prompt(tmp_path, None)  # a directory is not a prompt file
