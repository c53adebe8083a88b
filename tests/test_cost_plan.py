"""`make estimate` (medicsynth.llm.plan): per-stage and total cost, calling nothing (issue 14 item 1)."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest

from medicsynth.llm.cost import price_table_from_params, request_tokens
from medicsynth.llm.plan import MEDIC_PLAN, main, plan_costs
from medicsynth.params import load_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the estimate opened a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def params():
    return load_params(REPO / "params.yaml")


def test_estimate_prints_demo_and_medic_plans_without_any_connection(no_network, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["--params", "params.yaml"]) == 0
    out = capsys.readouterr().out
    assert "== demo: params.yaml as it is ==" in out and "MEDIC-sized plan: 71,198 images" in out
    for stage in ("relabel", "caption", "filter", "zeroshot", "generate"):
        assert out.count(f"\n{stage} ") >= 2  # a row in both plans
    assert "total: 0 requests" in out  # the demo's paid parts are all off
    assert "Nothing was sent." in out


def test_medic_plan_rows_are_the_per_request_estimate_times_the_counts(params):
    rows = {(r.stage, r.part): r for r in plan_costs(params, "medic", REPO / "prompts")}
    voter = rows[("relabel", "voter openai")]
    assert voter.requests == MEDIC_PLAN["relabel_flagged"] == rows[("relabel", "voter anthropic")].requests
    prices = price_table_from_params(params["llm"]["prices"])
    text = (REPO / "prompts/classify_system.txt").read_text() + (REPO / "prompts/classify_user.txt").read_text()
    from medicsynth.labels import TASKS
    from medicsynth.llm.labels_answer import labels_json_schema

    side = params["relabel"]["openai"]["image_max_side"]
    w, h = MEDIC_PLAN["real_image"]
    sent = (side, round(h * side / w))
    one, img = request_tokens("openai", "", text, labels_json_schema(TASKS), sent, prices.chars_per_token)
    assert voter.input_tokens == one * voter.requests and voter.image_tokens == img * voter.requests
    assert voter.output_tokens_max == voter.requests * params["relabel"]["openai"]["max_tokens"]
    price = prices.price("gpt-4o")
    assert voter.usd_sync == pytest.approx(price.usd(voter.input_tokens, voter.output_tokens_max))
    assert voter.usd_batch == pytest.approx(voter.usd_sync / 2)  # the table's batch prices are half
    cap = rows[("caption", "75% grounded")]
    assert cap.requests == MEDIC_PLAN["captions"] and cap.image_tokens > 0
    assert rows[("filter", "judge")].requests == MEDIC_PLAN["judge"]


def test_budget_over_the_estimate_is_flagged_with_the_key_to_raise(params, capsys, tmp_path, monkeypatch):
    p = copy.deepcopy(params)
    p["relabel"]["voters"] = ["model", "openai"]
    p["relabel"]["openai"]["budget_usd"] = 1.0
    p["relabel"]["openai"]["mode"] = "batch"
    rows = plan_costs(p, "demo", REPO / "prompts")
    voter = next(r for r in rows if r.part == "voter openai")
    assert voter.requests == p["data"]["demo"]["n_train"] + p["data"]["demo"]["n_dev"]
    assert voter.mode == "batch" and voter.usd == voter.usd_batch and voter.over_budget
    from medicsynth.llm.plan import format_table

    assert "raise relabel.openai.budget_usd to" in format_table(rows, "t")
