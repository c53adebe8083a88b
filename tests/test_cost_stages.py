"""Cost before spending and batch mode inside the paid stages (issue 14 items 1-2), through the
real SDKs against the loopback servers: a stage over its ``budget_usd`` refuses before any call
naming the estimate and the key; after a run the metrics hold the estimate beside the actual usage;
``mode: batch`` gives the sync results."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from medicsynth import zeroshot
from medicsynth.llm import repository_llm_params
from medicsynth.llm.cost import LLMBudgetError
from medicsynth.relabel import vlm_votes
from tests.api_server import FakeLLMServer
from tests.batch_api_server import BatchLLMServer
from tests.test_llm_client import make_images
from tests.test_zeroshot import llm_params, make_manifest, scripted_vlm, zs_params

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "prompts"
PROVIDERS = ("openai", "anthropic")
MODELS = {"openai": "gpt-4o", "anthropic": "claude-sonnet-4-5"}  # priced in llm.prices


@pytest.fixture(autouse=True)
def api_keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-cost")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-cost")
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)


def llm_section(tmp_path: Path) -> dict:
    llm = copy.deepcopy(repository_llm_params())
    llm["cache_dir"] = str(tmp_path / "cache")
    return llm


def voter_settings(server, provider: str, **extra) -> dict:
    return {"model": MODELS[provider], "base_url": server.base_url(provider), "timeout_s": 5.0, "max_retries": 1,
            "backoff_base_s": 0.01, "concurrency": 4, "batch_poll_s": 0.01, **extra}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_relabel_voter_over_budget_refuses_before_any_call_naming_estimate_and_key(tmp_path, provider):
    files = make_images(tmp_path / "img", 4)
    with FakeLLMServer() as server:
        cfg = voter_settings(server, provider, budget_usd=0.0001)
        with pytest.raises(LLMBudgetError) as info:
            vlm_votes(provider, cfg, str(tmp_path / "cache"), files, np.arange(4), 4, llm_section(tmp_path))
        assert server.count() == 0
    msg = str(info.value)
    assert f"relabel.{provider}.budget_usd" in msg and "estimated cost $" in msg and "Nothing was sent" in msg


@pytest.mark.parametrize("provider", PROVIDERS)
def test_relabel_voter_metrics_hold_estimate_beside_actual_usage_sync_and_batch(tmp_path, provider):
    files = make_images(tmp_path / "img", 4)
    llm = llm_section(tmp_path)
    with FakeLLMServer() as server:
        votes, answers, usage = vlm_votes(provider, voter_settings(server, provider), llm["cache_dir"], files,
                                          np.arange(4), 4, llm)
    assert set(answers.values()) == {"ok"}
    est = usage["estimate"]
    assert est["to_send"] == 4 and est["usd"] > 0 and est["price_date"] == llm["prices"]["date"]
    assert usage["api_calls"] == 4 and usage["input_tokens"] > 0 and usage["cost_usd"] > 0
    assert est["output_tokens_max"] >= usage["output_tokens"]  # the estimate's output is an upper bound
    # The same votes in batch mode, at the batch price, into a fresh cache.
    llm["cache_dir"] = str(tmp_path / "cache_batch")
    with BatchLLMServer() as server:
        bvotes, banswers, busage = vlm_votes(provider, voter_settings(server, provider, mode="batch"),
                                             llm["cache_dir"], files, np.arange(4), 4, llm)
        assert server.batch_creates == 1 and server.count("/v1/chat/completions") + server.count("/v1/messages") == 0
    assert (bvotes == votes).all() and banswers == answers
    assert busage["mode"] == "batch" and busage["estimate"]["mode"] == "batch"
    assert busage["estimate"]["usd"] == pytest.approx(est["usd"] / 2)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_zeroshot_in_batch_mode_scores_like_sync(tmp_path, provider):
    manifest, df = make_manifest(tmp_path)
    responder, _ = scripted_vlm(df)
    base = zs_params(provider=provider, model="vlm-test", max_images=None, concurrency=4, timeout_s=5, max_retries=1,
                     backoff_base_s=0.01, batch_poll_s=0.01)
    with FakeLLMServer(responder) as server:
        sync, sync_preds, _ = zeroshot.run_zeroshot(manifest, {**base, "base_url": server.base_url(provider)},
                                                    llm_params(tmp_path / "c1"), prompt_dir=PROMPTS, root=REPO,
                                                    progress=False)
    with BatchLLMServer(responder) as server:
        batch, batch_preds, _ = zeroshot.run_zeroshot(
            manifest, {**base, "base_url": server.base_url(provider), "mode": "batch"},
            llm_params(tmp_path / "c2"), prompt_dir=PROMPTS, root=REPO, progress=False)
        # 10 images, then the one refusal's fallback prompt in a second batch.
        assert server.batch_creates == 2 and sum(server.answered.values()) == 11
    assert batch_preds.equals(sync_preds)
    drop = ("usage", "cells")  # usage differs by mode; each cell carries its usage
    assert {k: v for k, v in batch.items() if k not in drop} == {k: v for k, v in sync.items() if k not in drop}
    for cell_b, cell_s in zip(batch["cells"], sync["cells"]):  # the same answers, so the same failures and scores
        assert cell_b["usage"]["failures"] == cell_s["usage"]["failures"]
        assert {k: v for k, v in cell_b.items() if k != "usage"} == {k: v for k, v in cell_s.items() if k != "usage"}


def test_caption_clients_name_their_budget_key_and_carry_prices(tmp_path):
    from dataclasses import replace

    from medicsynth.captions import CaptionConfig, make_clients
    from medicsynth.params import load_params

    config = replace(CaptionConfig.from_params(load_params(REPO / "params.yaml")["caption"]), backend="openai")
    clients = make_clients(config, tmp_path / "c", llm=llm_section(tmp_path))
    assert {c.budget_key for c in clients.values()} == {"caption.llm.budget_usd"}
    assert all(c.prices is not None and c.usage.price is not None for c in clients.values())


def test_hosted_generation_refuses_over_budget_then_records_estimate_beside_paid_calls(tmp_path, monkeypatch):
    from medicsynth.diffusion.generate import GenerateOptions
    from medicsynth.diffusion.hosted import HostedError, generate_hosted
    from tests.images_api_server import FakeImagesServer
    from tests.test_generators import hosted_params, write_plan

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    prices = repository_llm_params()["prices"]
    per = prices["images"]["gpt-image-1"]["low"]
    write_plan(tmp_path / "captions.tsv", 4)
    args = (tmp_path / "captions.tsv", tmp_path / "images", tmp_path / "manifest.tsv")
    with FakeImagesServer() as server:
        try:
            tight = GenerateOptions(**hosted_params(server, tmp_path, budget_usd=per * 3.5))
            with pytest.raises(HostedError) as info:
                generate_hosted(*args, tight, progress=False, prices=prices)
            assert server.count() == 0
            msg = str(info.value)
            assert f"${4 * per:.2f} for 4 images" in msg and "generate.hosted.budget_usd" in msg
            assert "Nothing was sent" in msg
            roomy = GenerateOptions(**hosted_params(server, tmp_path, budget_usd=per * 4))
            m = generate_hosted(*args, roomy, progress=False, prices=prices)
        finally:
            server.release.set()
    cost = m["hosted"]["cost"]
    assert cost["estimate"]["to_send"] == 4 and cost["estimate"]["usd"] == pytest.approx(4 * per)
    assert cost["paid_calls"] == server.count() == 4 and cost["usd"] == pytest.approx(4 * per)
