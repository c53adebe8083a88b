"""The zero-shot matrix (models × the study's six prompting strategies) with the real OpenAI and
Anthropic SDKs against the loopback API server (tests/api_server.py): each strategy's request
shape and answer parsing, caching per (model, strategy), the matrix-wide cost estimate, budget
and call cap, the comparison table with the study's reference, and the params rules."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from medicsynth import zeroshot
from medicsynth.labels import CLASSES, TASKS
from medicsynth.llm import LLMBudgetError, encode_image, load_prompt
from medicsynth.llm.labels_answer import classify_user_prompt
from tests.api_server import FakeLLMServer, answer
from tests.test_zeroshot import PROMPTS, REPO, api_keys, llm_params, make_manifest, zs_params  # noqa: F401

ALL = list(zeroshot.STRATEGIES)
PRICES = {"date": "2025-01-01", "source": "test", "models": {
    "gpt-test": {"input_per_mtok": 2.0, "output_per_mtok": 10.0},
    "claude-test": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}}}


def wrong(task: str, label: str) -> str:
    return CLASSES[task][(CLASSES[task].index(label) + 1) % len(CLASSES[task])]


def strategy_vlm(df: pd.DataFrame):
    """A scripted VLM that answers each strategy in its shape: right on even rows, wrong on odd
    rows; on row 1 elimination_reasoning picks a label it ruled out (an invalid answer)."""
    by_sha = {encode_image(f).sha256: i for i, f in enumerate(df["file"])}

    def final(i: int) -> dict[str, str]:
        return {t: df.loc[i, t] if i % 2 == 0 else wrong(t, df.loc[i, t]) for t in TASKS}

    def responder(req):
        i = by_sha[req.image_sha256s[0]]
        labels = final(i)
        name = req.schema_name
        if name == "medic_labels":
            return answer(labels)
        strategy = name.removeprefix("medic_")
        if strategy == "two_phase_analysis":
            return answer({"analysis": f"image {i}: a street with debris", "labels": labels})
        if strategy == "elimination_reasoning":
            ruled = {t: [c for c in CLASSES[t] if c != labels[t]][:1] for t in TASKS}
            if i == 1:
                ruled["informative"] = [labels["informative"]]
            return answer({"elimination": {t: {"ruled_out": ruled[t], "reason": "not visible"} for t in TASKS},
                           "labels": labels})
        if strategy == "uncertainty_aware":
            return answer({"ambiguity": "smoke hides the buildings", "labels": labels,
                           "confidence": {t: 0.9 for t in TASKS},
                           "alternative": {t: wrong(t, labels[t]) for t in TASKS}})
        if strategy == "weighted_option_analysis":
            weights = {t: {c: (0.6 if c == labels[t] else 0.4 / (len(CLASSES[t]) - 1)) for c in CLASSES[t]}
                       for t in TASKS}
            if i == 2:  # the final label is not the top weight on this row
                weights["informative"] = {c: (0.3 if c == labels["informative"] else 0.7)
                                          for c in CLASSES["informative"]}
            return answer({"weights": weights, "labels": labels})
        if strategy == "direct_uncertainty":
            return answer({"labels": labels, "confidence": {t: 0.5 + 0.1 * (i % 3) for t in TASKS}})
        raise AssertionError(name)

    return responder, final


def fast(**over) -> dict:
    return zs_params(max_images=None, concurrency=4, timeout_s=5, max_retries=1, backoff_base_s=0.01,
                     backoff_max_s=0.05, **over)


def two_models(server) -> dict:
    """``zeroshot`` keys of a matrix over two models on ``server``: OpenAI ``gpt-test`` first,
    Anthropic ``claude-test`` as the extra model (both priced in :data:`PRICES`)."""
    return dict(provider="openai", model="gpt-test", base_url=server.openai_base_url,
                extra_models=[{"provider": "anthropic", "model": "claude-test", "base_url": server.anthropic_base_url}])


def run(manifest, params, tmp_path, **llm_over):
    return zeroshot.run_zeroshot(manifest, params, llm_params(tmp_path, **llm_over), prompt_dir=PROMPTS,
                                 root=REPO, progress=False)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_each_strategy_sends_its_prompt_and_schema_and_scores_the_final_answer(tmp_path, provider):
    manifest, df = make_manifest(tmp_path, n=6)
    responder, final = strategy_vlm(df)
    with FakeLLMServer(responder) as server:
        params = fast(provider=provider, model="vlm-test", base_url=server.base_url(provider), strategies=ALL)
        metrics, preds, table = run(manifest, params, tmp_path)
        sent = server.requests

    # Request shape: one image, the per-class definitions as system prompt, the strategy's own
    # prompt and a schema whose reasoning fields come before the labels (written first).
    assert len(sent) == 6 * 6
    system = load_prompt("classify_system.txt", PROMPTS)
    by_strategy: dict[str, list] = {}
    for req in sent:
        assert len(req.images) == 1 and req.system == system
        by_strategy.setdefault(req.schema_name, []).append(req)
    assert sorted(by_strategy) == sorted(["medic_labels"] + [f"medic_{s}" for s in ALL[1:]])
    first_fields = {name: list(reqs[0].schema["properties"]) for name, reqs in by_strategy.items()}
    assert first_fields == {
        "medic_labels": list(TASKS),
        "medic_two_phase_analysis": ["analysis", "labels"],
        "medic_elimination_reasoning": ["elimination", "labels"],
        "medic_uncertainty_aware": ["ambiguity", "labels", "confidence", "alternative"],
        "medic_weighted_option_analysis": ["weights", "labels"],
        "medic_direct_uncertainty": ["labels", "confidence"],
    }
    weights = by_strategy["medic_weighted_option_analysis"][0].schema["properties"]["weights"]["properties"]
    assert {t: list(w["properties"]) for t, w in weights.items()} == {t: list(CLASSES[t]) for t in TASKS}
    assert "Phase 1" in by_strategy["medic_two_phase_analysis"][0].prompt
    assert "rule out" in by_strategy["medic_elimination_reasoning"][0].prompt
    # The direct strategy is the classify request of earlier runs, byte for byte (same cache).
    assert by_strategy["medic_labels"][0].prompt == classify_user_prompt(TASKS, PROMPTS)
    # max_tokens: the reasoning strategies get reasoning_max_tokens.
    caps = {r.schema_name: r.body.get("max_completion_tokens", r.body.get("max_tokens")) for r in sent}
    assert caps["medic_labels"] == caps["medic_direct_uncertainty"] == params["max_tokens"]
    assert caps["medic_two_phase_analysis"] == caps["medic_weighted_option_analysis"] == params["reasoning_max_tokens"]

    # Scores: the final labels are what is scored, per cell.
    cells = {c["strategy"]: c for c in metrics["cells"]}
    assert list(cells) == ALL and [c["name"] for c in metrics["cells"]] == [f"{provider}/vlm-test/{s}" for s in ALL]
    for strategy in ALL:
        cell_preds = preds[preds["strategy"] == strategy].reset_index(drop=True)
        ok = cell_preds["status"] == "ok"
        for i in np.flatnonzero(ok):
            assert {t: cell_preds.loc[i, f"pred_{t}"] for t in TASKS} == final(i)
        truth = ok & (np.arange(len(cell_preds)) % 2 == 0)
        # Even rows right, odd rows wrong on every task: accuracy = share of even rows answered.
        acc = truth.sum() / ok.sum()
        assert cells[strategy]["mean_accuracy"] == pytest.approx(acc)
    # Elimination: a final label that was ruled out is an invalid answer, not a score.
    elim = preds[preds["strategy"] == "elimination_reasoning"].reset_index(drop=True)
    assert elim.loc[1, "status"] == "invalid_answer" and "was ruled out" in elim.loc[1, "detail"]
    assert cells["elimination_reasoning"]["failures"] == {"invalid_answer": 1}
    assert "informative: not visible" in elim.loc[0, "reasoning"]
    two = preds[preds["strategy"] == "two_phase_analysis"].reset_index(drop=True)
    assert two.loc[4, "reasoning"] == "image 4: a street with debris"
    # Confidences: stated (uncertainty strategies) or the normalised weight of the final label.
    wt = preds[preds["strategy"] == "weighted_option_analysis"].reset_index(drop=True)
    assert wt.loc[0, "confidence_damage_severity"] == pytest.approx(0.6)
    assert wt.loc[2, "confidence_informative"] == pytest.approx(0.3)
    assert cells["weighted_option_analysis"]["final_label_is_top_weight"] == pytest.approx(5 / 6)
    du = cells["direct_uncertainty"]["confidence"]["damage_severity"]
    conf = [0.5 + 0.1 * (i % 3) for i in range(6)]
    correct = [i % 2 == 0 for i in range(6)]
    assert du["mean"] == pytest.approx(np.mean(conf))
    assert du["ece"] == pytest.approx(zeroshot.top_label_ece(conf, correct))
    assert "confidence" not in cells["direct_classification"]
    assert preds[preds["strategy"] == "direct_classification"]["confidence_informative"].isna().all()
    # The table: our six cells first, then the study's rows, labelled as the study's.
    ours = [r for r in table if r["source"] == zeroshot.OURS]
    assert [r["strategy"] for r in ours] == ALL
    assert all(r["source"] == zeroshot.STUDY and r["provider"] is None for r in table[len(ours):])
    assert ours[0]["macro_f1"] == {t: cells["direct_classification"]["report"]["tasks"][t]["macro_f1"] for t in TASKS}


def test_top_label_ece_by_hand():
    # Bin [0.9, 1.0]: conf 0.9, 0.95, accuracy 1/2 -> |0.5 - 0.925| * 2; bin [0.2, 0.3): conf 0.2, acc 0 -> 0.2.
    assert zeroshot.top_label_ece([0.9, 0.95, 0.2], [True, False, False]) == pytest.approx((0.425 * 2 + 0.2) / 3)
    assert zeroshot.top_label_ece([1.0], [True]) == 0.0


def test_answers_are_cached_per_model_and_strategy(tmp_path):
    manifest, df = make_manifest(tmp_path, n=4)
    responder, _ = strategy_vlm(df)
    with FakeLLMServer(responder) as server:
        both = two_models(server)
        run(manifest, fast(**both, strategies=["direct_classification"]), tmp_path)
        assert server.count() == 2 * 4
        # A strategy added: only its calls go out, for each model; the direct cells come from the cache.
        server.reset()
        metrics, _, _ = run(manifest, fast(**both, strategies=["direct_classification", "two_phase_analysis"]), tmp_path)
        assert server.count() == 2 * 4
        assert {r.schema_name for r in server.requests} == {"medic_two_phase_analysis"}
        assert {r.provider for r in server.requests} == {"openai", "anthropic"}
        calls = {c["name"]: c["usage"]["api_calls"] for c in metrics["cells"]}
        assert calls == {"openai/gpt-test/direct_classification": 0, "openai/gpt-test/two_phase_analysis": 4,
                         "anthropic/claude-test/direct_classification": 0, "anthropic/claude-test/two_phase_analysis": 4}
        # Same strategy, another model id: new calls; the whole matrix again: none.
        server.reset()
        run(manifest, fast(**dict(both, model="gpt-test-2"), strategies=["direct_classification"]), tmp_path)
        assert server.count() == 4 and {r.model for r in server.requests} == {"gpt-test-2"}
        server.reset()
        again, _, _ = run(manifest, fast(**both, strategies=["direct_classification", "two_phase_analysis"]), tmp_path)
        assert server.count() == 0 and all(c["usage"]["cache_hits"] == 4 for c in again["cells"])
    assert again["models"] == [{"provider": "openai", "model": "gpt-test"}, {"provider": "anthropic", "model": "claude-test"}]


def test_cost_estimate_counts_the_matrix_and_the_budget_caps_its_total(tmp_path):
    manifest, df = make_manifest(tmp_path, n=5)
    responder, _ = strategy_vlm(df)
    with FakeLLMServer(responder) as server:
        both = two_models(server)
        metrics, _, _ = run(manifest, fast(**both, strategies=["direct_classification"]), tmp_path, prices=PRICES)
        one_cell = metrics["usage"]["openai/gpt-test/direct_classification"]["estimate"]["usd"]
        assert metrics["estimate"]["requests"] == 2 * 5 and metrics["estimate"]["to_send"] == 2 * 5
        server.reset()
        # The matrix (12 cells, 2 cached) costs far more than one cell: a budget above one cell's
        # estimate but below the matrix's is refused before anything is sent.
        with pytest.raises(LLMBudgetError, match=r"matrix of 2 model\(s\) x 6 strategies.*estimated cost .* above zeroshot.budget_usd.*50 calls to send, 10 cached"):
            run(manifest, fast(**both, strategies=ALL, budget_usd=one_cell * 3), tmp_path, prices=PRICES)
        assert server.count() == 0
        metrics, _, _ = run(manifest, fast(**both, strategies=ALL), tmp_path, prices=PRICES)
        assert server.count() == 10 * 5
    est = metrics["estimate"]
    assert est["requests"] == 12 * 5 and est["cached"] == 2 * 5 and est["to_send"] == 10 * 5
    cells = metrics["cells"]
    assert est["usd"] == pytest.approx(sum(c["usage"]["estimate"]["usd"] for c in cells), rel=1e-5)
    # Output tokens at their caps: per model direct_uncertainty at max_tokens and the four
    # reasoning strategies at reasoning_max_tokens (direct_classification is cached).
    caps = fast()
    assert est["output_tokens_max"] == 5 * 2 * (caps["max_tokens"] + 4 * caps["reasoning_max_tokens"])
    assert all(c["usage"]["cost_usd"] is not None for c in cells)


def test_max_calls_is_the_matrix_total(tmp_path):
    manifest, df = make_manifest(tmp_path, n=4)
    responder, _ = strategy_vlm(df)
    with FakeLLMServer(responder) as server:
        params = fast(provider="openai", model="gpt-test", base_url=server.openai_base_url,
                      strategies=["direct_classification", "direct_uncertainty"], max_calls=5)
        metrics, preds, _ = run(manifest, params, tmp_path)
        assert server.count() == 5
    cells = {c["strategy"]: c for c in metrics["cells"]}
    assert cells["direct_classification"]["n_scored"] == 4
    assert cells["direct_uncertainty"]["n_scored"] == 1 and cells["direct_uncertainty"]["failures"] == {"budget": 3}


def test_every_zeroshot_key_comes_from_params_yaml(tmp_path):
    manifest, _ = make_manifest(tmp_path, n=2)
    for key in (*zeroshot.STAGE_KEYS, *zeroshot.CLIENT_KEYS):
        params = zs_params()
        del params[key]
        with pytest.raises(KeyError, match=f"zeroshot.{key}"):
            run(manifest, params, tmp_path)
    with pytest.raises(KeyError, match="llm.prices"):
        zeroshot.run_zeroshot(manifest, zs_params(provider="openai"), {"cache_dir": str(tmp_path)},
                              prompt_dir=PROMPTS, root=REPO)


@pytest.mark.parametrize(("over", "message"), [
    ({"strategies": ["few_shot"]}, "unknown 'few_shot'; the study's strategies are direct_classification"),
    ({"strategies": []}, "non-empty list"),
    ({"strategies": ["direct_uncertainty", "direct_uncertainty"]}, "twice"),
    ({"extra_models": [{"provider": "openai", "model": "m", "base_url": None, "temp": 0}]}, r"extra_models\[0\]: unknown key\(s\) temp"),
    ({"extra_models": [{"provider": "openai", "model": "m"}]}, r"zeroshot.extra_models\[0\].base_url"),
    ({"extra_models": [{"provider": "mistral", "model": "m", "base_url": None}]}, "provider 'mistral'"),
    ({"provider": "openai", "model": "m", "extra_models": [{"provider": "openai", "model": "m", "base_url": None}]},
     "listed twice: openai/m"),
])
def test_bad_matrix_params_are_errors_naming_the_key(tmp_path, over, message):
    manifest, _ = make_manifest(tmp_path, n=2)
    with FakeLLMServer() as server:
        with pytest.raises((ValueError, KeyError), match=message):
            run(manifest, zs_params(**over), tmp_path)
        assert server.count() == 0


def test_extra_models_run_without_the_first(tmp_path):
    manifest, _ = make_manifest(tmp_path, n=3)
    with FakeLLMServer() as server:
        params = fast(provider="none", extra_models=[{"provider": "anthropic", "model": "claude-test",
                                                       "base_url": server.anthropic_base_url}])
        metrics, preds, _ = run(manifest, params, tmp_path)
        assert server.count() == 3 and server.path_counts() == {"/v1/messages": 3}
    assert metrics["skipped"] is False and metrics["provider"] == "anthropic" and len(preds) == 3


def test_reference_errors_name_file_row_and_value(tmp_path):
    ref = pd.read_csv(REPO / "study" / "zeroshot_reference.tsv", sep="\t")
    assert zeroshot.load_reference(REPO / "study" / "zeroshot_reference.tsv")["mean"].tolist() == ref["mean"].tolist()
    bad = ref.copy()
    bad.loc[2, "prompt_strategy"] = "chain_of_thought"
    path = tmp_path / "ref.tsv"
    bad.to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match=rf"{path} row 4: prompt_strategy 'chain_of_thought'"):
        zeroshot.load_reference(path)
    bad = ref.copy().astype(object)
    bad.loc[0, "humanitarian"] = "73.7"
    bad.to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"row 2: macro-F1 outside \[0, 1\]: \{'humanitarian': 73.7\}"):
        zeroshot.load_reference(path)
    ref.drop(columns="mean").to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match="missing column"):
        zeroshot.load_reference(path)


def test_project_reference_copy_matches_the_studys_file():
    shared = REPO.parent.parent / "shared" / "study" / "zeroshot_reference.tsv"
    ours = (REPO / "study" / "zeroshot_reference.tsv").read_bytes()
    assert ours == (REPO / "tests" / "fixtures" / "study" / "zeroshot_reference.tsv").read_bytes()
    if shared.exists():
        assert ours == shared.read_bytes()


def test_markdown_table_labels_the_studys_rows(tmp_path):
    cells = [{"provider": "openai", "model": "gpt-test", "strategy": "direct_classification", "n_scored": 8,
              "coverage": 0.8, "mean_macro_f1": 0.5, "mean_accuracy": 0.6,
              "report": {"tasks": {t: {"macro_f1": 0.5, "accuracy": 0.6} for t in TASKS}}}]
    rows = zeroshot.comparison_table(cells, zeroshot.load_reference(REPO / "study" / "zeroshot_reference.tsv"), TASKS)
    md = zeroshot.table_markdown(rows, TASKS)
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[1].startswith(f"| {zeroshot.OURS} | openai/gpt-test | direct_classification | 8 | 0.80 | 0.500")
    assert all(line.startswith(f"| {zeroshot.STUDY} |") for line in lines[2:])
    assert "| gpt4v | direct_uncertainty | 500 | – | 0.794 | 0.929 | 0.771 | 0.843 | 0.834 | – |" in md
    assert json.loads(zeroshot.table_json(rows))["rows"][0]["model"] == "gpt-test"
