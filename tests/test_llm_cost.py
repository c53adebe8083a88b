"""Cost before spending (issue 14, item 1): token rules, the dated price table, the USD cap."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from PIL import Image

from medicsynth.llm import (
    config_with_defaults,
    LLMBudgetError,
    LLMClient,
    LLMConfig,
    classify_request,
    estimate_requests,
    price_table_from_params,
)
from medicsynth.llm.cost import anthropic_image_tokens, openai_image_tokens, request_tokens, text_tokens
from medicsynth.labels import TASKS
from tests.api_server import FakeLLMServer

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "prompts"
PRICES = {
    "date": "2025-10-15",
    "source": "test",
    "models": {
        "gpt-4o": {"input_per_mtok": 2.5, "output_per_mtok": 10.0},
        "claude-sonnet-4-5": {"input_per_mtok": 3.0, "output_per_mtok": 15.0},
    },
}


@pytest.fixture(autouse=True)
def api_keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-cost")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-cost")


def images(tmp_path: Path, sizes: list[tuple[int, int]]) -> list[str]:
    out = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"img_{i}.png"
        Image.new("RGB", size, (i * 40 % 256, 90, 160)).save(path)
        out.append(str(path))
    return out


def test_image_token_rules_match_the_documented_examples():
    # OpenAI (GPT-4o, detail high/auto): 85 + 170 per 512 px tile after fitting 2048 and 768.
    assert openai_image_tokens(1024, 1024) == 765
    assert openai_image_tokens(2048, 4096) == 1105
    assert openai_image_tokens(512, 512) == 255
    assert openai_image_tokens(1024, 1024, base=2833, per_tile=5667) == 2833 + 4 * 5667  # gpt-4o-mini
    # Anthropic: width x height / 750 after its own downscaling.
    assert anthropic_image_tokens(1000, 1000) == 1334
    assert anthropic_image_tokens(200, 200) == 54
    assert anthropic_image_tokens(1092, 1092) == 1590
    assert anthropic_image_tokens(4000, 4000) == anthropic_image_tokens(1109, 1109)  # resized first
    with pytest.raises(ValueError, match="positive"):
        openai_image_tokens(0, 10)


def test_price_table_lookup_and_errors():
    table = price_table_from_params(PRICES)
    assert table.date == "2025-10-15" and table.price("gpt-4o-2024-08-06") is table.price("gpt-4o")
    assert table.price("gpt-4o").usd(1_000_000, 100_000) == pytest.approx(2.5 + 1.0)
    assert table.price("gpt-5") is None and price_table_from_params(None) is None
    with pytest.raises(ValueError, match="missing key.*date"):
        price_table_from_params({"source": "x", "models": {}})
    with pytest.raises(ValueError, match="llm.prices.models.m: needs numeric"):
        price_table_from_params({"date": "d", "source": "s", "models": {"m": {"input_per_mtok": 1}}})


def test_project_price_table_parses_and_covers_the_default_models():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    table = price_table_from_params(params["llm"]["prices"])
    for model in (params["zeroshot"]["model"], params["relabel"]["openai"]["model"],
                  params["relabel"]["anthropic"]["model"]):
        assert table.price(model) is not None, model


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_estimate_counts_text_images_and_skips_cached_and_duplicate_calls(tmp_path, provider):
    model = {"openai": "gpt-4o", "anthropic": "claude-sonnet-4-5"}[provider]
    paths = images(tmp_path, [(300, 200), (1000, 1000)])
    copy = tmp_path / "same_bytes.png"  # the first image's bytes under another path: one call
    copy.write_bytes(Path(paths[0]).read_bytes())
    paths.append(str(copy))
    prices = price_table_from_params(PRICES)
    with FakeLLMServer() as server:
        config = config_with_defaults(provider=provider, model=model, base_url=server.base_url(provider), max_tokens=100)
        client = LLMClient(config, tmp_path / "cache", prices=prices)
        requests = [classify_request(p, TASKS, prompt_dir=PROMPTS) for p in paths]
        est = estimate_requests(client, requests, prices)
        rule = openai_image_tokens if provider == "openai" else anthropic_image_tokens
        req = requests[0]
        text = text_tokens(req.system + req.prompt + json.dumps(req.schema, separators=(",", ":")))
        assert (est.requests, est.to_send, est.cached) == (3, 2, 0)
        # Images are counted as sent: 1000x1000 goes out downscaled to image_max_side (768).
        assert est.image_tokens == rule(300, 200) + rule(768, 768)
        assert est.input_tokens == 2 * text + est.image_tokens
        assert est.output_tokens_max == 200
        price = prices.price(model)
        assert est.usd == pytest.approx(price.usd(est.input_tokens, 200))
        # One answer cached: the next estimate leaves it out.
        client.run(requests[:1], progress=False)
        again = estimate_requests(client, requests, prices)
        assert (again.to_send, again.cached) == (1, 1)
        assert again.image_tokens == rule(768, 768)
        # The estimate sits beside the actual usage in the metrics.
        usage = client.usage.as_dict()
        assert usage["estimate"]["to_send"] == 1 and usage["price_date"] == "2025-10-15"
        assert usage["cost_usd"] == pytest.approx(price.usd(usage["input_tokens"], usage["output_tokens"]), abs=1e-6)


def test_request_tokens_without_image():
    assert request_tokens("openai", "", "abcd" * 10, None, None) == (10, 0)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_budget_refuses_before_sending_and_names_how_to_raise_it(tmp_path, provider):
    model = {"openai": "gpt-4o", "anthropic": "claude-sonnet-4-5"}[provider]
    paths = images(tmp_path, [(800, 600)] * 1 + [(640, 480)] * 1 + [(500, 500)])
    prices = price_table_from_params(PRICES)
    requests = [classify_request(p, TASKS, prompt_dir=PROMPTS) for p in paths]
    with FakeLLMServer() as server:
        base = dict(provider=provider, model=model, base_url=server.base_url(provider), max_tokens=300)
        probe = estimate_requests(LLMClient(config_with_defaults(**base), tmp_path / "c"), requests, prices)
        tight = LLMClient(config_with_defaults(**base, budget_usd=probe.usd * 0.9), tmp_path / "c", prices=prices)
        with pytest.raises(LLMBudgetError) as info:
            tight.run(requests, progress=False)
        assert server.count() == 0
        message = str(info.value)
        assert f"${probe.usd:.2f}" in message and "Nothing was sent" in message
        assert f"Raise budget_usd to at least {math.ceil(probe.usd * 100) / 100:.2f}" in message
        roomy = LLMClient(config_with_defaults(**base, budget_usd=probe.usd * 1.1), tmp_path / "c", prices=prices)
        assert all(r.ok for r in roomy.run(requests, progress=False)) and server.count() == 3
        # Everything cached now: nothing to pay, so even a zero cap lets the run through.
        cached = LLMClient(config_with_defaults(**base, budget_usd=0.0), tmp_path / "c", prices=prices)
        assert all(r.cached for r in cached.run(requests, progress=False)) and server.count() == 3


def test_budget_without_a_price_is_an_error_naming_the_model(tmp_path):
    paths = images(tmp_path, [(64, 64)])
    with FakeLLMServer() as server:
        config = config_with_defaults(provider="openai", model="gpt-unpriced", base_url=server.openai_base_url, budget_usd=5.0)
        client = LLMClient(config, tmp_path / "c", prices=price_table_from_params(PRICES))
        with pytest.raises(LLMBudgetError, match="no price for openai model 'gpt-unpriced' in llm.prices"):
            client.run([classify_request(paths[0], TASKS, prompt_dir=PROMPTS)], progress=False)
        assert server.count() == 0


@pytest.mark.e2e  # runs stages/zeroshot.py as a subprocess
def test_zeroshot_stage_refuses_above_its_budget(tmp_path):
    from tests.test_zeroshot import make_manifest, run_stage

    manifest, _ = make_manifest(tmp_path, n=6)
    with FakeLLMServer() as server:
        params = dict(provider="openai", model="gpt-4o", base_url=server.openai_base_url, max_images=None,
                      budget_usd=0.0001)
        done = run_stage(tmp_path, manifest, params, llm_extra={"prices": PRICES})
        assert server.count() == 0
    assert done.returncode != 0
    assert "zeroshot.budget_usd" in done.stderr and "estimated cost" in done.stderr
    assert not (tmp_path / "metrics.json").exists()
