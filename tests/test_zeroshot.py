"""The zeroshot stage against the scripted API server, on a tiny manifest made here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score

from medicsynth.labels import CLASSES, TASKS
from medicsynth.llm import encode_image
from medicsynth.manifest import COLUMNS, write_manifest
from tests.api_server import FakeLLMServer, answer, malformed, refusal

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "prompts"


def _load_stage():
    spec = importlib.util.spec_from_file_location("zeroshot_stage", REPO / "stages" / "zeroshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


zeroshot = _load_stage()


@pytest.fixture(autouse=True)
def api_keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-zeroshot")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-zeroshot")


def make_manifest(tmp_path: Path, n: int = 10) -> tuple[Path, pd.DataFrame]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        file = tmp_path / "img" / f"{i}.jpg"
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 24), (i * 20 % 256, 100, 200 - i * 10)).save(file)
        labels = {t: CLASSES[t][rng.integers(len(CLASSES[t]))] for t in TASKS}
        rows.append(
            dict(image_id="demo", event_name=f"ev{i}", image_path=f"data/test/{i}.jpg", **labels,
                 split="test", source="real", provenance="demo", file=str(file))
        )
    df = pd.DataFrame(rows, columns=COLUMNS)
    path = tmp_path / "test.tsv"
    write_manifest(df, path)
    return path, df


def scripted_vlm(df: pd.DataFrame):
    """Right on even rows, a fixed wrong label on odd rows; row 3 refuses, row 6 is malformed."""
    by_sha = {encode_image(f).sha256: i for i, f in enumerate(df["file"])}
    expected = {}
    for i, row in df.iterrows():
        labels = {t: row[t] for t in TASKS}
        if i % 2:
            labels = {t: CLASSES[t][(CLASSES[t].index(row[t]) + 1) % len(CLASSES[t])] for t in TASKS}
        expected[i] = labels

    def responder(req):
        i = by_sha[req.image_sha256s[0]]
        if i == 3:
            return refusal()
        if i == 6:
            return malformed()
        return answer(expected[i])

    return responder, expected


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_zeroshot_scores_answered_images_and_reports_failures(tmp_path, provider):
    manifest, df = make_manifest(tmp_path)
    responder, expected = scripted_vlm(df)
    with FakeLLMServer(responder) as server:
        params = dict(provider=provider, model="vlm-test", base_url=server.base_url(provider),
                      max_images=None, concurrency=4, timeout_s=5, max_retries=1, backoff_base_s=0.01)
        llm = {"cache_dir": str(tmp_path / "cache")}
        metrics, preds = zeroshot.run_zeroshot(manifest, params, llm, prompt_dir=PROMPTS, progress=False)
        first_count = server.count()
        again, preds2 = zeroshot.run_zeroshot(manifest, params, llm, prompt_dir=PROMPTS, progress=False)
        assert server.count() == first_count  # the rerun is served from the cache

    # 10 images + a fallback retry for the refusal.
    assert first_count == 11
    assert metrics["skipped"] is False and metrics["n_selected"] == 10 and metrics["n_scored"] == 8
    assert metrics["coverage"] == 0.8
    assert metrics["failures"] == {"invalid_json": 1, "refusal": 1}
    assert list(preds["status"]) == ["ok"] * 3 + ["refusal"] + ["ok"] * 2 + ["invalid_json"] + ["ok"] * 3
    assert (preds.loc[[3, 6], [f"pred_{t}" for t in TASKS]] == "").all().all()

    ok = [i for i in range(10) if i not in (3, 6)]
    for task in TASKS:
        y_true = [df.loc[i, task] for i in ok]
        y_pred = [expected[i][task] for i in ok]
        assert list(preds.loc[ok, f"pred_{task}"]) == y_pred
        rep = metrics["report"]["tasks"][task]
        assert rep["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
        assert rep["macro_f1"] == pytest.approx(
            f1_score(y_true, y_pred, average="macro", labels=sorted(set(y_true)), zero_division=0)
        )
    task_f1 = [metrics["report"]["tasks"][t]["macro_f1"] for t in TASKS]
    assert metrics["mean_macro_f1"] == pytest.approx(np.mean(task_f1))
    assert metrics["usage"]["api_calls"] == 11 and again["usage"]["cache_hits"] == 11
    assert again["usage"]["api_calls"] == 0 and again["report"] == metrics["report"]
    assert preds2.drop(columns="cached").equals(preds.drop(columns="cached")) and preds2["cached"].all()


def test_max_images_is_a_deterministic_nested_subset(tmp_path):
    _, df = make_manifest(tmp_path, n=10)
    small = zeroshot.select_rows(df, 3, seed=1)
    large = zeroshot.select_rows(df, 6, seed=1)
    shuffled = zeroshot.select_rows(df.sample(frac=1, random_state=4), 3, seed=1)
    assert len(small) == 3 and set(small["image_path"]) <= set(large["image_path"])
    assert set(shuffled["image_path"]) == set(small["image_path"])
    assert len(zeroshot.select_rows(df, None)) == 10


def test_max_images_caps_the_calls(tmp_path):
    manifest, _ = make_manifest(tmp_path, n=10)
    with FakeLLMServer() as server:
        params = dict(provider="openai", model="m", base_url=server.openai_base_url, max_images=4, seed=0)
        metrics, preds = zeroshot.run_zeroshot(
            manifest, params, {"cache_dir": str(tmp_path / "cache")}, prompt_dir=PROMPTS, progress=False
        )
        assert server.count() == 4
    assert metrics["n_test"] == 10 and metrics["n_selected"] == 4 and metrics["coverage"] == 1.0
    assert len(preds) == 4


def test_provider_none_writes_skip_and_no_score(tmp_path):
    manifest, _ = make_manifest(tmp_path, n=3)
    params = tmp_path / "params.yaml"
    params.write_text("llm:\n  cache_dir: .llm_cache\nzeroshot:\n  provider: none\n  model: gpt-x\n  max_images: 5\n")
    out_metrics, out_preds = tmp_path / "metrics" / "zeroshot.json", tmp_path / "zs" / "predictions.tsv"
    with FakeLLMServer() as server:
        zeroshot.main(["--params", str(params), "--manifest", str(manifest), "--prompts", str(PROMPTS),
                       "--metrics", str(out_metrics), "--predictions", str(out_preds)])
        assert server.count() == 0
    metrics = json.loads(out_metrics.read_text())
    assert metrics["skipped"] is True and "none" in metrics["reason"]
    assert not any(k in metrics for k in ("report", "mean_macro_f1", "mean_accuracy"))
    preds = pd.read_csv(out_preds, sep="\t")
    assert len(preds) == 0 and "pred_damage_severity" in preds.columns


def test_unknown_setting_is_rejected_before_any_call(tmp_path):
    manifest, _ = make_manifest(tmp_path, n=2)
    with pytest.raises(ValueError, match="unknown llm setting.*max_image_count"):
        zeroshot.run_zeroshot(manifest, {"provider": "openai", "model": "m", "max_image_count": 3},
                              {"cache_dir": str(tmp_path / "c")}, prompt_dir=PROMPTS)
