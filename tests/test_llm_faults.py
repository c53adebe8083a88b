"""The paid-call layer under hostile servers (issue 16), through the real SDKs.

Every scenario runs ``LLMClient`` -> openai/anthropic SDK -> HTTP -> ``FakeLLMServer`` for both
providers where the case applies: non-answer 200 bodies, error objects sent with status 200,
provider messages that echo the key, trickled bodies, account/model errors that hit every
request, duplicates of a failing call, and answers cut at max_tokens.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from medicsynth.llm import (
    config_with_defaults,
    LLMAbortError,
    LLMClient,
    LLMConfig,
    LLMFailureShareError,
    LLMRequest,
    LLMResult,
    ResponseCache,
    classify_request,
    raise_if_failing,
    redact,
)
from medicsynth.labels import TASKS
from tests.api_server import (
    FakeLLMServer,
    answer,
    auto,
    error,
    raw_body,
    trickle,
    truncated,
)
from tests.test_llm_client import GOOD, make_images

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "prompts"
PROVIDERS = ("openai", "anthropic")
# A planted key: the environment's key for both SDKs, echoed back by hostile servers below.
PLANTED = "sk-planted-" + "Zq7" * 10


@pytest.fixture(autouse=True)
def api_keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", PLANTED)
    monkeypatch.setenv("ANTHROPIC_API_KEY", PLANTED)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)


def client_for(server: FakeLLMServer, provider: str, cache_dir: Path, **overrides) -> LLMClient:
    settings = dict(provider=provider, model="fault-model", base_url=server.base_url(provider), timeout_s=2.0,
                    max_retries=1, backoff_base_s=0.01, backoff_max_s=0.05, concurrency=4)
    settings.update(overrides)
    return LLMClient(config_with_defaults(**settings), cache_dir)


def classify(paths: list[str]) -> list[LLMRequest]:
    return [classify_request(p, TASKS, prompt_dir=PROMPTS) for p in paths]


# ------------------------------------------------------------------------------------------
# 1. A 200 whose body is not a model answer: retried, never a crash
# ------------------------------------------------------------------------------------------

NON_ANSWERS = {
    "html_page": lambda: raw_body("<html><body><h1>502 Bad Gateway</h1>nginx</body></html>"),
    "json_list": lambda: raw_body([{"content": "not a message"}]),
    "json_string": lambda: raw_body('"just a string"', content_type="application/json"),
}


@pytest.mark.parametrize("case", sorted(NON_ANSWERS))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_non_answer_200_body_is_retried_not_raised(tmp_path, provider, case):
    with FakeLLMServer() as server:
        server.script(NON_ANSWERS[case](), answer(GOOD))
        client = client_for(server, provider, tmp_path / "cache")
        [res] = client.run(classify(make_images(tmp_path / "img", 1)), progress=False)
        assert server.count() == 2
    assert res.ok and res.value == GOOD
    assert client.usage.as_dict()["retries"] == {"bad_response": 1}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_non_answer_200_for_one_image_fails_that_image_only(tmp_path, provider):
    images = make_images(tmp_path / "img", 8)
    bad = images[5]
    from medicsynth.llm import encode_image

    bad_sha = encode_image(bad).sha256
    html = raw_body("<html>proxy error</html>")
    with FakeLLMServer(lambda req: html if req.image_sha256s == [bad_sha] else auto()) as server:
        client = client_for(server, provider, tmp_path / "cache")
        results = client.run(classify(images), progress=False)
    assert [r.ok for r in results] == [True] * 5 + [False] + [True] * 2
    assert results[5].failure == "retries_exhausted" and "not a model answer" in results[5].detail


# ------------------------------------------------------------------------------------------
# 2. An error object sent with status 200 is never cached
# ------------------------------------------------------------------------------------------

ERROR_IN_200 = {
    "anthropic": {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    "openai": {"error": {"message": "The server is overloaded", "type": "server_error", "code": None}},
}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_error_object_with_status_200_is_not_cached(tmp_path, provider):
    images = make_images(tmp_path / "img", 1)
    with FakeLLMServer(raw_body(ERROR_IN_200[provider])) as server:
        [res] = client_for(server, provider, tmp_path / "cache").run(classify(images), progress=False)
        assert not res.ok and res.failure == "retries_exhausted" and "bad_response" in res.detail
        assert len(ResponseCache(tmp_path / "cache")) == 0 and server.count() == 2
        server.responder = None  # the server recovers: the rerun asks again and gets an answer
        [again] = client_for(server, provider, tmp_path / "cache").run(classify(images), progress=False)
        assert again.ok and not again.cached and server.count() == 3
    assert len(ResponseCache(tmp_path / "cache")) == 1


# ------------------------------------------------------------------------------------------
# 3. Provider error text is redacted before it reaches results, files or logs
# ------------------------------------------------------------------------------------------

ECHOES = {
    "key": lambda: f"Incorrect API key provided: {PLANTED}.",
    "bearer": lambda: f"header was 'Authorization: Bearer {PLANTED}'",
    "other_key": lambda: "key sk-proj-" + "Ab1" * 12 + " is not valid for this org",
}


@pytest.mark.parametrize("case", sorted(ECHOES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_error_text_echoing_a_key_is_redacted(tmp_path, provider, case, caplog):
    caplog.set_level(logging.DEBUG)
    message = ECHOES[case]()
    with FakeLLMServer(error(400, message=message)) as server:
        client = client_for(server, provider, tmp_path / "cache")
        results = client.run(classify(make_images(tmp_path / "img", 2)), progress=False)
    for res in results:
        assert res.failure == "api_error" and "HTTP 400" in res.detail and "[REDACTED]" in res.detail
        assert PLANTED not in res.detail and "sk-proj-" not in res.detail
    assert PLANTED not in caplog.text and PLANTED not in repr(results)


def test_redact_covers_configured_keys_and_key_shapes():
    assert redact(f"x {PLANTED} y", ()) == "x [REDACTED] y"
    assert redact("token=abcdefghijkl", ()) == "token=abcdefghijkl"  # not a credential name
    assert redact("api_key=abcdefghijkl; next", ()) == "api_key=[REDACTED]; next"
    assert redact("Bearer abc.def-ghi_jkl", ()) == "Bearer [REDACTED]"
    assert redact("my-own-secret-value in text", ["my-own-secret-value"]) == "[REDACTED] in text"
    assert redact("short key abc", ["abc"]) == "short key abc"  # too short to search for
    assert redact(None) == ""


# ------------------------------------------------------------------------------------------
# 4. Each attempt has a total deadline, not only a per-read timeout
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_trickled_body_is_cut_at_the_attempt_deadline(tmp_path, provider):
    # 12 pieces 0.25 s apart: every read is quick (< timeout), the whole takes ~2.75 s.
    with FakeLLMServer(trickle(12, 0.25, answer(GOOD))) as server:
        client = client_for(server, provider, tmp_path / "cache", timeout_s=1.0, max_retries=0)
        start = time.monotonic()
        [res] = client.run(classify(make_images(tmp_path / "img", 1)), progress=False)
        elapsed = time.monotonic() - start
    assert not res.ok and res.failure == "retries_exhausted" and "timeout" in res.detail
    assert elapsed < 2.0, f"the attempt ran {elapsed:.2f} s with timeout_s=1.0"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_trickled_body_within_the_deadline_is_answered(tmp_path, provider):
    with FakeLLMServer(trickle(4, 0.05, answer(GOOD))) as server:
        client = client_for(server, provider, tmp_path / "cache", timeout_s=2.0, max_retries=0)
        results = client.run(classify(make_images(tmp_path / "img", 3)), progress=False)
    assert all(r.ok and r.value == GOOD for r in results)


# ------------------------------------------------------------------------------------------
# 5. Errors about the key, account or model stop the client; too many failures fail the stage
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403, 404])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_account_or_model_errors_stop_after_a_handful_of_requests(tmp_path, provider, status):
    with FakeLLMServer(error(status, message=f"denied for key {PLANTED}")) as server:
        client = client_for(server, provider, tmp_path / "cache", concurrency=16, abort_after=3)
        with pytest.raises(LLMAbortError) as info:
            client.run(classify(make_images(tmp_path / "img", 20)), progress=False)
        assert server.count() == 3
    message = str(info.value)
    assert f"{provider} model 'fault-model'" in message and f"HTTP {status}" in message
    assert PLANTED not in message
    usage = client.usage.as_dict()
    assert usage["failures"] == {"aborted": 17, "api_error": 3} and usage["api_calls"] == 3


@pytest.mark.parametrize("provider", PROVIDERS)
def test_request_level_errors_do_not_stop_the_client(tmp_path, provider):
    # 400 is about one request (e.g. an image too large): the other requests still go out.
    with FakeLLMServer(error(400, message="image too large")) as server:
        client = client_for(server, provider, tmp_path / "cache", concurrency=4, abort_after=2)
        results = client.run(classify(make_images(tmp_path / "img", 6)), progress=False)
        assert server.count() == 6
    assert {r.failure for r in results} == {"api_error"} and client.aborted is None


def _result(ok: bool, failure: str | None = None) -> LLMResult:
    return LLMResult(key="k", ok=ok, failure=failure, detail=f"detail with {PLANTED}" if failure else "")


def test_raise_if_failing_uses_the_share_and_ignores_budget():
    results = [_result(True)] * 2 + [_result(False, "refusal")] * 2 + [_result(False, "budget")] * 6
    assert raise_if_failing(results, 0.5, "openai", "m") == 0.5  # 2 of 4 counted: not above 0.5
    with pytest.raises(LLMFailureShareError, match=r"anthropic model 'm': 2 of 4 votes failed .*refusal") as info:
        raise_if_failing(results, 0.4, "anthropic", "m", what="votes")
    assert PLANTED not in str(info.value)
    assert raise_if_failing([_result(False, "budget")], 0.0, "openai", "m") == 0.0


# ------------------------------------------------------------------------------------------
# 6. Duplicates of a call are coalesced whatever its outcome
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 11])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_identical_failing_calls_are_sent_once(tmp_path, provider, concurrency):
    [image] = make_images(tmp_path / "img", 1)
    copies = []
    for i in range(11):  # same bytes under 11 paths, as MEDIC has
        copy = tmp_path / "img" / f"copy_{i}.jpg"
        copy.write_bytes(Path(image).read_bytes())
        copies.append(str(copy))
    with FakeLLMServer(error(503, delay_s=0.05)) as server:
        client = client_for(server, provider, tmp_path / "cache", concurrency=concurrency, max_retries=1)
        results = client.run(classify(copies), progress=False)
        assert server.count() == 2  # one call and its one retry, not 11 × 2
    assert [r.failure for r in results] == ["retries_exhausted"] * 11
    assert sum(r.calls for r in results) == 1 and len({r.detail for r in results}) == 1


# ------------------------------------------------------------------------------------------
# 7. An answer cut at max_tokens says so, for both providers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_truncated_answer_reports_max_tokens(tmp_path, provider):
    partial = {k: v for k, v in GOOD.items() if k in ("damage_severity", "informative")}
    with FakeLLMServer(truncated(partial)) as server:
        client = client_for(server, provider, tmp_path / "cache", max_tokens=20)
        [res] = client.run(classify(make_images(tmp_path / "img", 1)), progress=False)
    assert not res.ok and res.failure in ("invalid_json", "invalid_answer")
    assert "output cut at max_tokens" in res.detail
