"""Captions: template grammar, length limits, incremental reuse, LLM backends on the fake API."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

import medicsynth.captions as captions
from medicsynth import caption_templates as grammar
from medicsynth.allocation import AllocateConfig, allocate, all_combinations
from medicsynth.captions import (
    FALLBACK_PROVENANCE,
    CaptionConfig,
    CaptionError,
    caption_plan,
    load_length_limit,
    make_clients,
    negative_prompt,
    shorten,
    template_caption,
    word_limit,
)
from medicsynth.labels import CLASSES, TASKS
from medicsynth.manifest import write_manifest
from tests.api_server import FakeLLMServer, answer, refusal
from tests.sections import section

REPO = Path(__file__).resolve().parents[1]

LABELS = {
    "damage_severity": "mild",
    "informative": "informative",
    "humanitarian": "rescue_volunteering_or_donation_effort",
    "disaster_types": "flood",
}


# -- template grammar -----------------------------------------------------------------------


def test_template_is_deterministic_by_seed():
    assert template_caption(LABELS, 7) == template_caption(dict(LABELS), 7)
    assert template_caption(LABELS, 7) != template_caption(LABELS, 8)
    # Independent of dict order and of label spelling variants normalised by the schema.
    shuffled = {k: LABELS[k] for k in reversed(TASKS)}
    assert template_caption(shuffled, 7) == template_caption(LABELS, 7)
    with pytest.raises(Exception, match="mildd"):
        template_caption({**LABELS, "damage_severity": "mildd"}, 1)


def test_template_captions_carry_every_label():
    for seed in range(30):
        for task in TASKS:
            texts = {}
            for cls in CLASSES[task]:
                text = template_caption({**LABELS, task: cls}, seed)
                texts[cls] = text
                if task == "disaster_types":
                    assert any(scene in text for scene in grammar.SCENES[cls]), (cls, text)
                elif task == "damage_severity":
                    assert any(p in text for p in grammar.DAMAGE[cls]), (cls, text)
                elif task == "informative":
                    frames = grammar.PHOTO_FRAMES if cls == "informative" else grammar.CONTENT_FRAMES
                    assert any(text.startswith(f + " ") for f in frames), (cls, text)
                elif cls != "not_humanitarian":
                    assert any(p in text for p in grammar.PEOPLE[cls] if p), (cls, text)
            # Distinct classes give distinct captions for the same seed.
            assert len(set(texts.values())) == len(CLASSES[task]), (task, seed)


def test_template_diversity_over_seeds():
    texts = [template_caption(LABELS, seed) for seed in range(1000)]
    assert len(set(texts)) >= 950
    firsts = {t.split(". ")[0] for t in texts}
    assert len(firsts) >= 100  # label sentences vary too, not only the slots
    for slot in (grammar.TIME_OF_DAY, grammar.REGION, grammar.CAMERA):
        for value in slot:
            assert any(value.lower() in t.lower() for t in texts), value
    not_inf = [template_caption({**LABELS, "informative": "not_informative"}, s) for s in range(300)]
    for frame in ("A meme about", "A screenshot of", "A poster about", "A selfie in front of"):
        assert any(t.startswith(frame) for t in not_inf), frame


def test_template_fits_default_word_limit_for_every_combination():
    limit = word_limit(50)
    for combo in all_combinations():
        for seed in range(25):
            assert limit.fits(template_caption(dict(zip(TASKS, combo)), seed))


# -- length ---------------------------------------------------------------------------------


LONG = (
    "A news photo of a flooded street in a small town, with cracked walls and broken windows, "
    "volunteers handing out food and water to families. Taken at dusk, in Southeast Asia, under "
    "heavy rain, seen from a drone flying low over the rooftops."
)


def test_shorten_drops_whole_trailing_clauses():
    text, cut = shorten(LONG, word_limit(60))
    assert (text, cut) == (LONG, False)
    text, cut = shorten(LONG, word_limit(30))
    assert cut and len(text.split()) <= 30
    assert text == (
        "A news photo of a flooded street in a small town, with cracked walls and broken windows, "
        "volunteers handing out food and water to families. Taken at dusk."
    )
    text, cut = shorten(LONG, word_limit(12))
    assert text == "A news photo of a flooded street in a small town."
    # First clause alone too long: whole words dropped, never part of a word.
    # ("A news photo of a" loses its dangling "of a").
    text, cut = shorten(LONG, word_limit(5))
    assert text == "A news photo."
    assert LONG.startswith(text[:-1])
    with pytest.raises(CaptionError):
        shorten("Supercalifragilistic", _limit_of(0))  # not even one word fits


def _limit_of(n):
    return captions.LengthLimit("words", n, lambda t: len(t.split()), f"words<={n}")


def _char_tokenizer(directory: Path, model_max_length: int) -> Path:
    """A real CLIPTokenizer whose vocabulary is single characters (1 token per character)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(set(string.ascii_lowercase + string.digits + ".,;:!?'-")):
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
    tok.save_pretrained(directory / "tokenizer")
    return directory


def test_token_limit_with_local_clip_tokenizer(tmp_path):
    model = _char_tokenizer(tmp_path / "model", 77)
    limit = load_length_limit(str(model), max_tokens=77, max_words=50)
    assert limit.unit == "tokens" and limit.limit == 77 and not limit.note
    # 1 token per non-space character, plus begin/end tokens.
    assert limit.count("a flood.") == len("aflood.") + 2
    text, cut = shorten(LONG, limit)
    assert cut and limit.count(text) <= 77 and text.endswith(".")
    # 72 non-space characters + 2; the next clause would make it 117.
    assert text == "A news photo of a flooded street in a small town, with cracked walls and broken windows."
    assert limit.count(text) == 74
    # A smaller context in the tokenizer wins over max_tokens.
    small = load_length_limit(str(_char_tokenizer(tmp_path / "small", 30)), max_tokens=77)
    assert small.limit == 30


def test_missing_tokenizer_falls_back_to_word_limit(tmp_path):
    limit = load_length_limit(str(tmp_path / "nowhere"), max_tokens=77, max_words=40)
    assert limit.unit == "words" and limit.limit == 40 and "not available" in limit.note
    # transformers 5 builds an empty tokenizer for a missing hub id instead of raising.
    limit = load_length_limit("no-such-org/no-such-model", max_tokens=77, max_words=40)
    assert limit.unit == "words"


def test_negative_prompts_joined_without_duplicates():
    negatives = {
        "damage_severity": {"mild": "collapsed buildings, rubble"},
        "disaster_types": {"flood": "fire, rubble"},
    }
    assert negative_prompt(LABELS, negatives, "text, watermark") == "text, watermark, collapsed buildings, rubble, fire"
    assert negative_prompt({**LABELS, "damage_severity": "severe"}, negatives) == "fire, rubble"
    with pytest.raises(CaptionError, match="negative_prompts.*mildd"):
        CaptionConfig.from_params(section("caption", negative_prompts={"damage_severity": {"mildd": "x"}}))


# -- incremental template captions ----------------------------------------------------------


def _train(n_per_combo=None) -> pd.DataFrame:
    combos = [
        ("little_or_none", "not_informative", "not_humanitarian", "not_disaster"),
        ("mild", "informative", "rescue_volunteering_or_donation_effort", "flood"),
        ("severe", "informative", "affected_injured_or_dead_people", "earthquake"),
        ("mild", "informative", "infrastructure_and_utility_damage", "hurricane"),
    ]
    rows = []
    for j, combo in enumerate(combos):
        for i in range((n_per_combo or [30, 4, 3, 3])[j]):
            rows.append(dict(zip(TASKS, combo), image_path=f"data/demo/train/{j}_{i}.jpg"))
    df = pd.DataFrame(rows)
    df["image_id"], df["event_name"], df["split"], df["source"], df["provenance"] = "demo", "x", "train", "real", "demo"
    df["file"] = df["image_path"]
    return df


def _plan(total: int) -> pd.DataFrame:
    f1 = {t: {c: 0.9 for c in CLASSES[t]} for t in TASKS}
    f1["damage_severity"]["mild"] = 0.3
    return allocate(_train(), AllocateConfig.from_params(section("allocate", total=total)), f1).plan


def _roundtrip(df: pd.DataFrame, tmp_path: Path) -> pd.DataFrame:
    path = tmp_path / "captions.tsv"
    df.to_csv(path, sep="\t", index=False)
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)


def test_raising_total_by_10_percent_captions_only_new_rows(tmp_path, monkeypatch):
    calls = []
    real = captions.template_caption
    monkeypatch.setattr(captions, "template_caption", lambda labels, seed: calls.append(seed) or real(labels, seed))
    config = CaptionConfig.from_params(section("caption"))
    first = caption_plan(_plan(200), config, progress=False)
    assert len(calls) == 200 and first.metrics["new"] == 200
    calls.clear()
    second = caption_plan(_plan(220), config, previous=_roundtrip(first.table, tmp_path), progress=False)
    assert len(calls) == 20
    assert second.metrics["new"] == 20 and second.metrics["reused"] == 200 and second.metrics["template_calls"] == 20
    old = first.table.set_index("id")
    new = second.table.set_index("id")
    assert (new.loc[old.index, "caption"] == old["caption"]).all()
    # Same inputs again: nothing new; a grammar or limit change re-captions everything.
    calls.clear()
    third = caption_plan(_plan(220), config, previous=_roundtrip(second.table, tmp_path), progress=False)
    assert len(calls) == 0 and third.metrics["reused"] == 220
    shorter = CaptionConfig.from_params(section("caption", max_words=45))
    fourth = caption_plan(_plan(220), shorter, previous=_roundtrip(third.table, tmp_path), progress=False)
    assert fourth.metrics["new"] == 220


def test_bad_plan_row_is_named():
    plan = _plan(20)
    plan.loc[3, "humanitarian"] = "rescuers"
    with pytest.raises(CaptionError, match=r"row 5: .*humanitarian.*rescuers"):
        caption_plan(plan, CaptionConfig.from_params(section("caption")), progress=False)


# -- LLM backends through the fake API ------------------------------------------------------


def _grounding_images(tmp_path: Path) -> pd.DataFrame:
    train = _train()
    for i, path in enumerate(train["image_path"]):
        file = tmp_path / path
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 24), (i * 7 % 256, 90, 160)).save(file, quality=90)
        train.loc[i, "file"] = str(file)
    return train


def _responder(refuse_always: set[str]):
    """Caption answers built from the prompt; refuse images whose humanitarian label is
    "affected" once (the fallback prompt succeeds), and always when the disaster type is in
    ``refuse_always``."""

    def respond(req):
        prompt = req.prompt
        disaster = prompt.split("- disaster type: ")[1].split("\n")[0]
        if disaster in refuse_always:
            return refusal()
        if "affected injured or dead people" in prompt.split("Label meanings")[0] and "academic" not in prompt:
            return refusal()
        kind = "grounded" if req.images else "hypothetical"
        keywords = prompt.split("keywords")[1].split(":", 1)[1].split(".")[0].strip()
        return answer({"caption": f"A {kind} scene of a {disaster} event, {keywords}, described for the model."})

    return respond


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_llm_backend_refusal_fallback_cache_and_reuse(tmp_path, monkeypatch, provider):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    train = _grounding_images(tmp_path)
    plan = _plan(60)
    with FakeLLMServer(_responder(refuse_always={"hurricane"})) as server:
        config = CaptionConfig.from_params(
            section("caption", backend=provider, proportion_real=0.5,
                    llm={"model": "fake-model", "base_url": server.base_url(provider), "concurrency": 4,
                         "max_retries": 0})
        )
        cache = tmp_path / "cache"
        result = caption_plan(plan, config, train=train, clients=make_clients(config, cache), progress=False)
        table = result.table
        assert (table["caption"].str.split().str.len() >= 5).all()
        assert set(table["mode"]) == {"grounded", "hypothetical"}
        grounded = table[table["mode"] == "grounded"]
        assert 0.25 < len(grounded) / len(table) < 0.75
        assert (grounded["grounded_on"] != "").all() and (table.loc[table["mode"] == "hypothetical", "grounded_on"] == "").all()
        # A grounded row's image has exactly its labels.
        by_path = train.set_index("image_path")
        for row in grounded.itertuples():
            assert all(by_path.loc[row.grounded_on, t] == getattr(row, t) for t in TASKS)
        # Grounded requests carried their image, hypothetical ones none; every request differs
        # (keywords vary per seed), so no two rows share one cached answer.
        import hashlib

        sent = {h for r in server.requests for h in r.image_sha256s}
        used = {hashlib.sha256(Path(by_path.loc[p, "file"]).read_bytes()).hexdigest() for p in grounded["grounded_on"]}
        assert sent == used
        assert sum(1 for r in server.requests if not r.images and "academic" not in r.prompt) == (table["mode"] == "hypothetical").sum()
        assert table.loc[~table["provenance"].str.startswith(FALLBACK_PROVENANCE), "caption"].is_unique
        # Refused once, then answered with the research preface.
        affected = table[table["humanitarian"] == "affected_injured_or_dead_people"]
        assert len(affected) and affected["provenance"].str.contains("after refusal fallback").all()
        # Refused twice: recorded and replaced by the template caption.
        hurricane = table[table["disaster_types"] == "hurricane"]
        assert len(hurricane) and hurricane["provenance"].str.startswith(FALLBACK_PROVENANCE).all()
        assert hurricane["provenance"].str.contains("refusal").all()
        for row in hurricane.itertuples():
            assert row.caption == template_caption({t: getattr(row, t) for t in TASKS}, row.seed)
        assert result.metrics["failed"] == len(hurricane) == result.metrics["failures"]["refusal"]
        ok = table[~table["provenance"].str.startswith(FALLBACK_PROVENANCE)]
        assert ok["caption"].str.contains("scene of a").all()
        n_requests = server.count()

        # Rerun with fresh clients and no previous table: every answer comes from the cache.
        again = caption_plan(plan, config, train=train, clients=make_clients(config, cache), progress=False)
        assert server.count() == n_requests
        assert again.table["caption"].tolist() == table["caption"].tolist()
        assert sum(u["cache_hits"] for u in again.metrics["llm_usage"].values()) > 0
        assert sum(u["api_calls"] for u in again.metrics["llm_usage"].values()) == 0

        # Raise the total by 10% with the previous table: only new rows (and failed ones) are asked.
        bigger = _plan(66)
        third = caption_plan(
            bigger, config, train=train, previous=_roundtrip(table, tmp_path),
            clients=make_clients(config, cache), progress=False,
        )
        assert third.metrics["reused"] == 60 - len(hurricane)
        assert third.metrics["llm_requests"] == 6 + len(hurricane)
        assert third.metrics["new"] == 6 + len(hurricane)


def test_llm_budget_exhausted_falls_back_without_empty_captions(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    train = _grounding_images(tmp_path)
    with FakeLLMServer(_responder(refuse_always=set())) as server:
        config = CaptionConfig.from_params(
            section("caption", backend="openai", proportion_real=0.0,
                    llm={"model": "m", "base_url": server.openai_base_url, "max_calls": 3, "concurrency": 1})
        )
        result = caption_plan(_plan(20), config, train=train, clients=make_clients(config, tmp_path / "c"), progress=False)
    assert (result.table["caption"].str.strip() != "").all()
    assert result.metrics["failures"].get("budget", 0) >= 20 - 3 - 3  # affected rows may use 2 calls
    assert server.count() <= 3


# -- stage ----------------------------------------------------------------------------------


def _write_params(root: Path, total: int, caption: dict) -> None:
    paths = {"train_manifest": "data/variants/relabelled/train.tsv"}
    params = {
        "allocate": section("allocate", total=total) | paths | {"dev_report": "metrics/dev/original.json"},
        "caption": caption | paths,
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.mark.e2e
def test_stages_allocate_then_caption_incrementally(tmp_path):
    write_manifest(_train(), tmp_path / "data/variants/relabelled/train.tsv")
    report = {"tasks": {t: {"per_class": {c: {"f1": 0.8} for c in CLASSES[t]}} for t in TASKS}}
    (tmp_path / "metrics/dev").mkdir(parents=True)
    (tmp_path / "metrics/dev/original.json").write_text(json.dumps(report))
    env = {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1"}

    def run(total):
        _write_params(tmp_path, total, section("caption", negative_prompts={"damage_severity": {"mild": "rubble"}}))
        for stage in ("allocate", "caption"):
            subprocess.run([sys.executable, str(REPO / f"stages/{stage}.py")], cwd=tmp_path, env=env,
                           check=True, capture_output=True)
        return json.loads((tmp_path / "metrics/caption.json").read_text())

    assert run(100)["new"] == 100
    metrics = run(110)
    assert (metrics["new"], metrics["reused"], metrics["template_calls"]) == (10, 100, 10)
    table = pd.read_csv(tmp_path / "data/captions/captions.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(table.columns) == list(captions.CAPTION_COLUMNS) and len(table) == 110
    assert (table.loc[table["damage_severity"] == "mild", "negative_prompt"] == "rubble").all()
    assert (table["mode"] == "template").all() and (table["grounded_on"] == "").all()


@pytest.mark.e2e
def test_caption_stage_llm_backend_asks_only_for_new_rows(tmp_path):
    train = _grounding_images(tmp_path)
    write_manifest(train, tmp_path / "data/variants/relabelled/train.tsv")
    report = {"tasks": {t: {"per_class": {c: {"f1": 0.8} for c in CLASSES[t]}} for t in TASKS}}
    (tmp_path / "metrics/dev").mkdir(parents=True)
    (tmp_path / "metrics/dev/original.json").write_text(json.dumps(report))
    env = {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1",
           "OPENAI_API_KEY": "test-key"}
    (tmp_path / "prompts").mkdir()
    for name in ("caption_grounded.txt", "caption_hypothetical.txt"):
        (tmp_path / "prompts" / name).write_text((REPO / "prompts" / name).read_text())

    with FakeLLMServer(_responder(refuse_always=set())) as server:

        def run(total):
            llm = {"model": "fake", "base_url": server.openai_base_url, "cache_dir": "llm_cache"}
            _write_params(tmp_path, total, section("caption", backend="openai", proportion_real=0.5, llm=llm))
            for stage in ("allocate", "caption"):
                subprocess.run([sys.executable, str(REPO / f"stages/{stage}.py")], cwd=tmp_path, env=env,
                               check=True, capture_output=True)
            return json.loads((tmp_path / "metrics/caption.json").read_text())

        first = run(40)
        assert first["new"] == 40 and first["failed"] == 0
        old_ids = set(pd.read_csv(tmp_path / "data/captions/captions.tsv", sep="\t", dtype=str)["id"])
        before = server.count()
        second = run(44)
        assert (second["new"], second["reused"], second["llm_requests"]) == (4, 40, 4)
        assert second["llm_usage"]["grounded"]["requests"] + second["llm_usage"]["hypothetical"]["requests"] == 4
        table = pd.read_csv(tmp_path / "data/captions/captions.tsv", sep="\t", dtype=str, keep_default_na=False)
        added = table[~table["id"].isin(old_ids)]
        # Only the 4 new rows reached the API; "affected" rows take 2 calls (refusal + fallback).
        expected_calls = len(added) + int((added["humanitarian"] == "affected_injured_or_dead_people").sum())
        assert len(added) == 4 and server.count() - before == expected_calls
    assert len(table) == 44 and set(table["mode"]) <= {"grounded", "hypothetical"}
    assert (table["provenance"].str.startswith("openai:fake")).all()
