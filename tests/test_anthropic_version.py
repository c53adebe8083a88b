"""Temperature for Anthropic (issue 11 item 2): ``anthropic_version`` "2023-06-01" sends it.

The installed SDK (anthropic 2.x) sends ``anthropic-version: 2026-10-21``, which answers 400 to
any sampling parameter; the older version 2023-06-01 takes one. The loopback servers answer as the
real API does (tests/api_server.py ``anthropic_version_rejects``), so these tests show that what
the adapter sends is what each version accepts, in sync and in batch mode.
"""

from __future__ import annotations

import json

import pytest

from medicsynth.llm import LLMClient, classify_request, config_with_defaults
from medicsynth.labels import TASKS
from tests.api_server import FakeLLMServer
from tests.batch_api_server import BatchLLMServer
from tests.test_llm_batch import PROMPTS, settings
from tests.test_llm_client import make_images


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-version")
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def run(server, tmp_path, n=2, **overrides):
    paths = make_images(tmp_path / "img", n)
    config = config_with_defaults(**settings(server, "anthropic", **overrides))
    client = LLMClient(config, tmp_path / "cache")
    return client, client.run([classify_request(p, TASKS, prompt_dir=PROMPTS) for p in paths], progress=False)


def versions(requests):
    return {next(v for k, v in r.headers.items() if k.lower() == "anthropic-version") for r in requests}


def test_the_loopback_api_rejects_a_temperature_under_the_sdks_version():
    """The peer behaves as the API: 400 for temperature under 2026-10-21, 200 under 2023-06-01."""
    import anthropic

    with FakeLLMServer() as server:
        sdk = anthropic.Anthropic(api_key="sk-test-version", base_url=server.anthropic_base_url, max_retries=0)
        body = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
        with pytest.raises(anthropic.BadRequestError, match="temperature: Extra inputs are not permitted"):
            sdk.messages.create(**body, extra_body={"temperature": 1.0})
        ok = sdk.messages.create(**body, extra_body={"temperature": 1.0},
                                 extra_headers={"anthropic-version": "2023-06-01"})
        assert ok.type == "message"


def test_default_sends_no_temperature_and_the_sdks_version(tmp_path):
    with FakeLLMServer() as server:
        client, results = run(server, tmp_path, mode="sync", temperature=0.4)
        requests = server.requests
    assert all(r.ok for r in results)
    assert client.provider.temperature_sent is None
    assert versions(requests) == {"2026-10-21"} and all("temperature" not in r.body for r in requests)


@pytest.mark.parametrize("mode", ["sync", "batch"])
def test_api_version_2023_06_01_sends_the_temperature(tmp_path, mode):
    server_cls = FakeLLMServer if mode == "sync" else BatchLLMServer
    with server_cls() as server:
        client, results = run(server, tmp_path, n=3, mode=mode, temperature=0.4, anthropic_version="2023-06-01")
        if mode == "sync":
            bodies, sent_versions = [r.body for r in server.requests], versions(server.requests)
        else:
            bodies = [body for b in server.batches.values() for _, body in b["lines"]]
            sent_versions = {b["headers"]["anthropic-version"] for b in server.batches.values()}
    assert all(r.ok for r in results), [r.failure for r in results]
    assert client.provider.temperature_sent == 0.4
    assert sent_versions == {"2023-06-01"}
    assert [b["temperature"] for b in bodies] == [0.4] * 3


def test_batch_params_with_a_temperature_fail_under_the_sdks_version(tmp_path):
    """What the version check protects against: the batch API errors every such entry."""
    with BatchLLMServer() as server:
        client = LLMClient(config_with_defaults(**settings(server, "anthropic", max_retries=0)), tmp_path / "c")
        request = client.provider.request_params(system="", prompt="hi", image=None, schema=None, schema_name="a")
        request["temperature"] = 0.4  # as a naive caller would send it
        batch = client.provider.client.messages.batches.create(requests=[{"custom_id": "x", "params": request}])
        server.poll(batch.id)
        entries = list(client.provider.client.messages.batches.results(batch.id))
    assert entries[0].result.type == "errored"
    assert "temperature" in json.dumps(entries[0].result.model_dump())


def test_an_unknown_version_is_refused_naming_the_setting():
    with FakeLLMServer() as server, pytest.raises(ValueError, match="anthropic_version='2024-01-01'"):
        config_with_defaults(**settings(server, "anthropic", anthropic_version="2024-01-01"))
