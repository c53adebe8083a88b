"""The zeroshot stage (:mod:`medicsynth.zeroshot`, ``stages/zeroshot.py``) against the scripted
API server, on a tiny manifest made here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score

from medicsynth import zeroshot
from medicsynth.labels import CLASSES, TASKS
from medicsynth.llm import LLMAbortError, LLMFailureShareError, encode_image
from medicsynth.manifest import COLUMNS, write_manifest
from tests.api_server import FakeLLMServer, answer, auto, error, malformed, raw_body, refusal

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "prompts"
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def zs_params(**overrides) -> dict:
    """params.yaml's ``zeroshot`` section with ``overrides`` (the one source of defaults)."""
    return {**PARAMS["zeroshot"], **overrides}


def llm_params(tmp_path: Path, **overrides) -> dict:
    """params.yaml's ``llm`` section with the cache in ``tmp_path`` and ``overrides``."""
    return {**PARAMS["llm"], "cache_dir": str(tmp_path / "cache"), **overrides}
# Planted in the environment as both API keys; hostile servers echo it back.
PLANTED = "sk-test-zeroshot-" + "Pk9" * 8


@pytest.fixture(autouse=True)
def api_keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", PLANTED)
    monkeypatch.setenv("ANTHROPIC_API_KEY", PLANTED)


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
        params = zs_params(provider=provider, model="vlm-test", base_url=server.base_url(provider),
                           max_images=None, concurrency=4, timeout_s=5, max_retries=1, backoff_base_s=0.01)
        llm = llm_params(tmp_path)
        metrics, preds, _ = zeroshot.run_zeroshot(manifest, params, llm, prompt_dir=PROMPTS, root=REPO,
                                                  progress=False)
        first_count = server.count()
        again, preds2, _ = zeroshot.run_zeroshot(manifest, params, llm, prompt_dir=PROMPTS, root=REPO,
                                                 progress=False)
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
    cell = f"{provider}/vlm-test/direct_classification"
    assert metrics["strategy"] == "direct_classification" and [c["name"] for c in metrics["cells"]] == [cell]
    assert metrics["usage"][cell]["api_calls"] == 11 and again["usage"][cell]["cache_hits"] == 11
    assert again["usage"][cell]["api_calls"] == 0 and again["report"] == metrics["report"]
    assert preds2.drop(columns="cached").equals(preds.drop(columns="cached")) and preds2["cached"].all()


def test_max_images_is_a_deterministic_nested_subset(tmp_path):
    _, df = make_manifest(tmp_path, n=10)
    small = zeroshot.select_rows(df, 3, seed=1)
    large = zeroshot.select_rows(df, 6, seed=1)
    shuffled = zeroshot.select_rows(df.sample(frac=1, random_state=4), 3, seed=1)
    assert len(small) == 3 and set(small["image_path"]) <= set(large["image_path"])
    assert set(shuffled["image_path"]) == set(small["image_path"])
    assert len(zeroshot.select_rows(df, None, seed=0)) == 10


def test_max_images_caps_the_calls(tmp_path):
    manifest, _ = make_manifest(tmp_path, n=10)
    with FakeLLMServer() as server:
        params = zs_params(provider="openai", model="m", base_url=server.openai_base_url, max_images=4, seed=0)
        metrics, preds, _ = zeroshot.run_zeroshot(
            manifest, params, llm_params(tmp_path), prompt_dir=PROMPTS, root=REPO, progress=False
        )
        assert server.count() == 4
    assert metrics["n_test"] == 10 and metrics["n_selected"] == 4 and metrics["coverage"] == 1.0
    assert len(preds) == 4


def run_stage(tmp_path: Path, manifest: Path, zeroshot_params: dict,
              llm_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``stages/zeroshot.py`` as DVC runs it (a subprocess) on ``tmp_path``/params.yaml: params.yaml's
    ``zeroshot`` section updated with ``zeroshot_params``, its ``llm`` section with the cache in
    ``tmp_path`` and ``llm_extra``. Outputs go to ``tmp_path``: metrics.json, predictions.tsv,
    table.md, table.json, zeroshot.png."""
    params = tmp_path / "params.yaml"
    llm = llm_params(tmp_path, **(llm_extra or {}))
    params.write_text(yaml.safe_dump({"llm": llm, "zeroshot": zs_params(**zeroshot_params)}))
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / "zeroshot.py"), "--params", str(params), "--manifest", str(manifest),
         "--prompts", str(PROMPTS), "--root", str(REPO), "--metrics", str(tmp_path / "metrics.json"),
         "--predictions", str(tmp_path / "predictions.tsv"), "--table", str(tmp_path / "table.md"),
         "--table-json", str(tmp_path / "table.json"), "--plot", str(tmp_path / "zeroshot.png")],
        env=env, capture_output=True, text=True, timeout=180,
    )


@pytest.mark.e2e  # runs stages/zeroshot.py as a subprocess
def test_provider_none_writes_skip_and_no_score(tmp_path):
    manifest, _ = make_manifest(tmp_path, n=3)
    with FakeLLMServer() as server:
        done = run_stage(tmp_path, manifest, {"provider": "none", "model": "gpt-x", "max_images": 5})
        assert done.returncode == 0, done.stderr[-2000:]
        assert server.count() == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["skipped"] is True and "none" in metrics["reason"]
    assert not any(k in metrics for k in ("report", "mean_macro_f1", "mean_accuracy"))
    preds = pd.read_csv(tmp_path / "predictions.tsv", sep="\t")
    assert len(preds) == 0 and "pred_damage_severity" in preds.columns
    # The table and plot still show the study's published figures, labelled as the study's.
    table = json.loads((tmp_path / "table.json").read_text())["rows"]
    reference = pd.read_csv(REPO / "study" / "zeroshot_reference.tsv", sep="\t")
    assert len(table) == len(reference) and {r["source"] for r in table} == {zeroshot.STUDY}
    assert [r["mean_macro_f1"] for r in table] == list(reference["mean"])
    md = (tmp_path / "table.md").read_text()
    assert "Ours: skipped" in md and md.count(zeroshot.STUDY) == len(reference)
    assert Image.open(tmp_path / "zeroshot.png").size[0] > 100


def test_unknown_setting_is_rejected_before_any_call(tmp_path):
    manifest, _ = make_manifest(tmp_path, n=2)
    with pytest.raises(ValueError, match="unknown llm setting.*max_image_count"):
        zeroshot.run_zeroshot(manifest, zs_params(provider="openai", model="m", max_image_count=3),
                              llm_params(tmp_path), prompt_dir=PROMPTS, root=REPO)


# ------------------------------------------------------------------------------------------
# Hostile servers (issue 16) at the stage level
# ------------------------------------------------------------------------------------------


def _fast(provider: str, server: FakeLLMServer, **extra) -> dict:
    return zs_params(provider=provider, model="vlm-test", base_url=server.base_url(provider), max_images=None,
                concurrency=16, timeout_s=5, max_retries=1, backoff_base_s=0.01, backoff_max_s=0.05, **extra)


@pytest.mark.e2e  # runs stages/zeroshot.py as a subprocess
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_one_non_answer_body_fails_one_image_not_the_stage(tmp_path, provider):
    manifest, df = make_manifest(tmp_path, n=20)
    bad_sha = encode_image(df["file"][7]).sha256
    html = raw_body("<html><body>Proxy error</body></html>")
    with FakeLLMServer(lambda req: html if req.image_sha256s == [bad_sha] else auto()) as server:
        done = run_stage(tmp_path, manifest, _fast(provider, server))
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_scored"] == 19 and metrics["coverage"] == 0.95
    assert metrics["failures"] == {"retries_exhausted": 1}
    preds = pd.read_csv(tmp_path / "predictions.tsv", sep="\t")
    assert preds.loc[7, "status"] == "retries_exhausted" and "not a model answer" in preds.loc[7, "detail"]


@pytest.mark.e2e  # runs stages/zeroshot.py as a subprocess
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_planted_key_echoed_by_errors_reaches_no_output(tmp_path, provider):
    manifest, _ = make_manifest(tmp_path, n=20)
    echo = error(400, message=f"Invalid request for key {PLANTED} (Authorization: Bearer {PLANTED})")
    with FakeLLMServer(echo) as server:
        # Every image fails and the stage is told to tolerate it, so that the outputs are written.
        done = run_stage(tmp_path, manifest, _fast(provider, server, max_failure_share=1.0))
        assert all(r.headers["authorization"] == f"Bearer {PLANTED}" for r in server.requests)  # really sent
    assert done.returncode == 0, done.stderr[-2000:]
    preds = pd.read_csv(tmp_path / "predictions.tsv", sep="\t")
    assert len(preds) == 20 and (preds["status"] == "api_error").all()
    assert preds["detail"].str.contains("[REDACTED]", regex=False).all()
    blobs = {"stdout": done.stdout.encode(), "stderr": done.stderr.encode()}
    blobs |= {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "params.yaml"}
    assert any("cache" in name for name in blobs) or not (tmp_path / "cache").exists()
    assert [name for name, blob in blobs.items() if PLANTED.encode() in blob] == []


@pytest.mark.e2e  # runs stages/zeroshot.py as a subprocess
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_stage_against_always_401_exits_nonzero_after_a_handful_of_requests(tmp_path, provider):
    manifest, _ = make_manifest(tmp_path, n=20)
    with FakeLLMServer(error(401, message=f"Incorrect API key provided: {PLANTED}")) as server:
        done = run_stage(tmp_path, manifest, _fast(provider, server))
        sent = server.count()
    assert done.returncode != 0
    assert f"{provider} model 'vlm-test'" in done.stderr and "HTTP 401" in done.stderr
    assert sent <= 3
    # No metrics, no predictions: nothing was scored.
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "predictions.tsv").exists()
    assert PLANTED not in done.stderr + done.stdout


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_failure_share_above_the_param_fails_the_stage(tmp_path, provider):
    manifest, df = make_manifest(tmp_path, n=10)
    failing = {encode_image(f).sha256 for f in df["file"][:6]}
    reply = error(400, message="image rejected")
    with FakeLLMServer(lambda req: reply if req.image_sha256s[0] in failing else auto()) as server:
        params = _fast(provider, server, max_failure_share=0.5)
        llm = llm_params(tmp_path)
        with pytest.raises(LLMFailureShareError, match=f"{provider} model 'vlm-test': 6 of 10 zeroshot images"):
            zeroshot.run_zeroshot(manifest, params, llm, prompt_dir=PROMPTS, root=REPO, progress=False)
        metrics, _, _ = zeroshot.run_zeroshot(manifest, dict(params, max_failure_share=0.6), llm,
                                              prompt_dir=PROMPTS, root=REPO, progress=False)
    assert metrics["coverage"] == 0.4 and metrics["max_failure_share"] == 0.6


def test_run_zeroshot_raises_abort_error(tmp_path):
    manifest, _ = make_manifest(tmp_path, n=6)
    with FakeLLMServer(error(403, message="no access to this model")) as server:
        with pytest.raises(LLMAbortError, match="openai model 'vlm-test'.*HTTP 403"):
            zeroshot.run_zeroshot(manifest, _fast("openai", server), llm_params(tmp_path),
                                  prompt_dir=PROMPTS, root=REPO, progress=False)
        assert server.count() == 3
