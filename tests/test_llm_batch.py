"""Batch mode (issue 14 item 2) through the real SDKs against loopback batch APIs.

OpenAI Batch API (file upload, batches.create/retrieve, output/error files) and Anthropic Message
Batches (create/retrieve/results) served by :class:`tests.batch_api_server.BatchLLMServer`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from medicsynth.llm import LLMClient, classify_request, config_with_defaults
from medicsynth.llm.cost import LLMBudgetError, price_table_from_params
from medicsynth.labels import TASKS
from tests.api_server import FakeLLMServer, auto, error, refusal
from tests.batch_api_server import BatchLLMServer
from tests.test_llm_client import (  # noqa: F401  (api_keys: the autouse fixture of fake API keys)
    PROMPTS,
    PROVIDERS,
    REPO,
    api_keys,
    make_images,
)


def settings(server: FakeLLMServer, provider: str, **overrides) -> dict:
    out = dict(provider=provider, model="batch-model", base_url=server.base_url(provider), timeout_s=5.0,
               max_retries=1, backoff_base_s=0.01, backoff_max_s=0.05, concurrency=4, mode="batch",
               batch_poll_s=0.01)
    out.update(overrides)
    return out


def client_for(server, provider, cache_dir, prices=None, **overrides) -> LLMClient:
    return LLMClient(config_with_defaults(**settings(server, provider, **overrides)), cache_dir, prices=prices)


def classify(paths):
    return [classify_request(p, TASKS, prompt_dir=PROMPTS) for p in paths]


def summary(results):
    return [(r.key, r.ok, r.failure, json.dumps(r.value, sort_keys=True)) for r in results]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_batch_round_trip_gives_the_sync_results_and_caches_them(tmp_path, provider):
    paths = make_images(tmp_path / "img", 6)
    with FakeLLMServer() as sync_server:
        sync = client_for(sync_server, provider, tmp_path / "sync_cache", mode="sync").run(classify(paths), progress=False)
        sync_bodies = sorted(json.dumps(r.body, sort_keys=True) for r in sync_server.requests)
    with BatchLLMServer() as server:
        client = client_for(server, provider, tmp_path / "cache")
        results = client.run(classify(paths), progress=False)
        assert summary(results) == summary(sync)
        assert all(r.ok and not r.cached and r.calls == 1 for r in results)
        assert server.batch_creates == 1
        assert server.count("/v1/chat/completions") == server.count("/v1/messages") == 0  # nothing sent sync
        # The same request bodies as the sync path, one line each, answered once.
        lines = [body for b in server.batches.values() for _, body in b["lines"]]
        assert sorted(json.dumps(b, sort_keys=True) for b in lines) == sync_bodies
        assert set(server.answered.values()) == {1} and len(server.answered) == 6
        usage = client.usage.as_dict()
        assert usage["mode"] == "batch" and usage["api_calls"] == 6 and usage["cache_hits"] == 0
        assert usage["batch"]["batches_submitted"] == 1 and usage["input_tokens"] > 0
        assert not list((tmp_path / "cache" / "batches").glob("*.json"))  # record removed once collected
        # A rerun pays nothing: every answer is in the same cache the sync path uses.
        again = client_for(server, provider, tmp_path / "cache")
        assert summary(again.run(classify(paths), progress=False)) == summary(sync)
        assert server.batch_creates == 1 and again.usage.cache_hits == 6
    # ...and a sync client reads those cached answers too.
    with FakeLLMServer() as other:
        cross = client_for(other, provider, tmp_path / "cache", mode="sync").run(classify(paths), progress=False)
        assert other.count() == 0 and summary(cross) == summary(sync)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_errored_entries_permanent_reported_transient_resubmitted(tmp_path, provider):
    paths = make_images(tmp_path / "img", 4)
    requests = classify(paths)
    seen: Counter = Counter()

    with BatchLLMServer() as server:
        first_sha: dict = {}

        def responder2(req):
            sha = req.image_sha256s[0]
            first_sha.setdefault("bad", sha)  # the first line of the batch fails permanently
            seen[sha] += 1
            if sha == first_sha["bad"]:
                return error(400, message="invalid image for this request")
            if len(first_sha) == 1:
                first_sha["flaky"] = sha  # the second fails once with a 500, then answers
                return error(500, message="overloaded")
            return auto()

        server.responder = responder2
        client = client_for(server, provider, tmp_path / "cache", max_retries=2)
        results = client.run(requests, progress=False)
        failed = [r for r in results if not r.ok]
        assert len(failed) == 1 and failed[0].failure == "api_error" and "invalid image" in failed[0].detail
        assert server.batch_creates == 2  # the transient one went into a second batch
        assert sum(len(b["lines"]) for b in server.batches.values()) == 5
        assert seen[first_sha["bad"]] == 1  # a permanent error is not resubmitted


@pytest.mark.parametrize("provider", PROVIDERS)
def test_half_expired_batch_reported_then_completed_on_rerun(tmp_path, provider):
    paths = make_images(tmp_path / "img", 6)
    with BatchLLMServer() as server:
        server.expire_after = 3
        first = client_for(server, provider, tmp_path / "cache", max_retries=0).run(classify(paths), progress=False)
        assert sum(r.ok for r in first) == 3
        assert {r.failure for r in first if not r.ok} == {"retries_exhausted"}
        assert all("expired" in r.detail for r in first if not r.ok)
        rerun = client_for(server, provider, tmp_path / "cache", max_retries=0)
        second = rerun.run(classify(paths), progress=False)
        assert all(r.ok for r in second)
        assert server.batch_creates == 2 and len(list(server.batches.values())[-1]["lines"]) == 3
        assert len(server.answered) == 6 and set(server.answered.values()) == {1}
        assert rerun.usage.cache_hits == 3 and rerun.usage.api_calls == 3


@pytest.mark.parametrize("provider", PROVIDERS)
def test_half_expired_batch_is_resubmitted_within_the_run(tmp_path, provider):
    paths = make_images(tmp_path / "img", 6)
    with BatchLLMServer() as server:
        server.expire_after = 2
        client = client_for(server, provider, tmp_path / "cache", max_retries=1)
        assert all(r.ok for r in client.run(classify(paths), progress=False))
        assert server.batch_creates == 2 and set(server.answered.values()) == {1}
        assert client.usage.as_dict()["batch"]["retried"] == 4


WORKER = """
import sys
from medicsynth.llm import LLMClient, classify_request, config_with_defaults
from medicsynth.labels import TASKS
provider, base_url, cache_dir, prompts, *paths = sys.argv[1:]
cfg = config_with_defaults(provider=provider, model="batch-model", base_url=base_url, timeout_s=5.0, max_retries=1,
                backoff_base_s=0.01, backoff_max_s=0.05, mode="batch", batch_poll_s=0.05)
results = LLMClient(cfg, cache_dir).run([classify_request(p, TASKS, prompt_dir=prompts) for p in paths], progress=False)
print("OK", sum(r.ok for r in results))
"""


def kill_worker_after_submit(server: BatchLLMServer, provider: str, cache: Path, paths: list[str],
                             tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """Run :data:`WORKER` (a batch-mode classify run of ``paths``) in a subprocess against
    ``server`` while its batches stay in progress, and SIGKILL it once its batch record is in
    ``cache/batches``: submitted, nothing collected. The server's hold is released before
    returning. Returns the worker's ``(argv, env)``, to run it again."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, str(script), provider, server.base_url(provider), str(cache), str(PROMPTS), *paths]
    server.hold.set()  # batches stay in progress
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list((cache / "batches").glob("*.json")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    assert list((cache / "batches").glob("*.json")), f"no batch record in {cache / 'batches'} after 60 s"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    server.hold.clear()
    return args, env


@pytest.mark.parametrize("provider", PROVIDERS)
def test_kill_between_submit_and_collect_resumes_polling_never_resubmits(tmp_path, provider):
    paths = make_images(tmp_path / "img", 5)
    with BatchLLMServer() as server:
        args, env = kill_worker_after_submit(server, provider, tmp_path / "cache", paths, tmp_path)
        assert server.batch_creates == 1
        assert not server.answered  # killed before anything was collected
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "OK 5" in done.stdout
        assert server.batch_creates == 1  # resumed polling, no second submission
        assert len(server.answered) == 5 and set(server.answered.values()) == {1}
        assert set(server.batch_lines.values()) == {1}
        assert server.count("/v1/chat/completions") == server.count("/v1/messages") == 0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_refusal_fallback_goes_in_a_second_batch(tmp_path, provider):
    paths = make_images(tmp_path / "img", 3)
    requests = classify(paths)
    assert requests[0].fallback_prompt

    def responder(req):
        if req.prompt.strip() == requests[0].prompt.strip() and req.image_sha256s and \
                req.image_sha256s[0] == first_image[0]:
            return refusal()
        return auto()

    first_image: list = []
    with BatchLLMServer(responder) as server:
        import hashlib
        from medicsynth.llm import encode_image
        first_image.append(hashlib.sha256(encode_image(paths[0]).data).hexdigest())
        client = client_for(server, provider, tmp_path / "cache")
        results = client.run(requests, progress=False)
        assert all(r.ok for r in results) and results[0].used_fallback
        assert server.batch_creates == 2
        assert [len(b["lines"]) for b in server.batches.values()] == [3, 1]


def test_batch_estimate_uses_batch_prices_and_budget_names_the_key(tmp_path):
    paths = make_images(tmp_path / "img", 4)
    table = {"date": "2025-10-15", "source": "test", "models": {"batch-model": {
        "input_per_mtok": 2.0, "output_per_mtok": 8.0, "batch_input_per_mtok": 1.0, "batch_output_per_mtok": 4.0}}}
    prices = price_table_from_params(table)
    with BatchLLMServer() as server:
        sync = client_for(server, "openai", tmp_path / "c1", prices=prices, mode="sync", budget_usd=100.0)
        batch = client_for(server, "openai", tmp_path / "c2", prices=prices, budget_usd=100.0)
        from medicsynth.llm import estimate_requests
        e_sync = estimate_requests(sync, classify(paths), prices)
        e_batch = estimate_requests(batch, classify(paths), prices)
        assert e_batch.mode == "batch" and e_batch.usd == pytest.approx(e_sync.usd / 2)
        batch.run(classify(paths), progress=False)
        usage = batch.usage.as_dict()
        assert usage["estimate"]["mode"] == "batch"
        assert usage["cost_usd"] == pytest.approx((usage["input_tokens"] * 1.0 + usage["output_tokens"] * 4.0) / 1e6)
        table["models"]["batch-model"] = {"input_per_mtok": 2.0, "output_per_mtok": 8.0}
        capped = client_for(server, "openai", tmp_path / "c3", prices=price_table_from_params(table), budget_usd=1.0)
        with pytest.raises(LLMBudgetError, match="batch price"):
            capped.run(classify(paths), progress=False)
        assert server.batch_creates == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_resumed_batch_caches_answers_a_later_run_did_not_ask_for(tmp_path, provider):
    """A killed run's batch is resumed by a run with fewer requests: every answer of that paid
    batch is still cached, so the full request set later sends nothing."""
    paths = make_images(tmp_path / "img", 4)
    cache = tmp_path / "cache"
    with BatchLLMServer() as server:
        kill_worker_after_submit(server, provider, cache, paths, tmp_path)
        some = client_for(server, provider, cache).run(classify(paths[:2]), progress=False)
        assert all(r.ok for r in some) and server.batch_creates == 1
        everything = client_for(server, provider, cache)
        assert all(r.ok for r in everything.run(classify(paths), progress=False))
        assert server.batch_creates == 1 and everything.usage.cache_hits == 4
        assert len(server.answered) == 4 and set(server.answered.values()) == {1}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_recorded_batch_unknown_to_the_api_is_resubmitted(tmp_path, provider):
    from medicsynth.llm.batch import BatchStore, _wanted_calls

    paths = make_images(tmp_path / "img", 3)
    with BatchLLMServer() as server:
        client = client_for(server, provider, tmp_path / "cache")
        keys = list(_wanted_calls(client, classify(paths), False, {}))
        BatchStore(tmp_path / "cache" / "batches").save({
            "batch_id": "batch_gone", "provider": provider, "model": "batch-model",
            "base_url": server.base_url(provider), "custom_ids": keys, "submitted": 0.0})
        assert all(r.ok for r in client.run(classify(paths), progress=False))
        assert server.batch_creates == 1 and set(server.answered.values()) == {1}
        assert not list((tmp_path / "cache" / "batches").glob("*.json"))
