"""Captions: template grammar, length limits, incremental reuse, LLM backends on the fake API."""

from __future__ import annotations

import json
import os
import re
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
    ``refuse_always``. A grounded answer names the photo and the description number it was
    asked for, a hypothetical one its keywords; an analysis is added when the schema asks."""

    def respond(req):
        prompt = req.prompt
        disaster = prompt.split("- disaster type: ")[1].split("\n")[0]
        if disaster in refuse_always:
            return refusal()
        if "affected injured or dead people" in prompt.split("Label meanings")[0] and "academic" not in prompt:
            return refusal()
        if req.images:
            number = re.search(r"description number (\d+)", prompt)
            detail = f"photo {req.image_sha256s[0][:8]} description {number.group(1) if number else 1}"
            kind = "grounded"
        else:
            detail = prompt.split("setting keywords: ")[1].split(".\n")[0]
            kind = "hypothetical"
        out = {"caption": f"A {kind} scene of a {disaster} event, {detail}, described for the model."}
        if '"analysis"' in prompt:
            out = {"analysis": f"The {kind} picture must show a {disaster} event.", **out}
        return answer(out)

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
                    llm={provider: {"model": "fake-model", "base_url": server.base_url(provider)}, "concurrency": 4,
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
        # (keywords vary per seed; the 2nd, 3rd... row grounded on one photo asks for description
        # number 2, 3...), so no two rows share one cached answer.
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
                    llm={"openai": {"model": "m", "base_url": server.openai_base_url}, "max_calls": 3, "concurrency": 1})
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
        # counts of what the run did live in timing/ (stages/caption.py RUN_KEYS)
        return {**json.loads((tmp_path / "metrics/caption.json").read_text()),
                **json.loads((tmp_path / "timing/caption.json").read_text())["run"]}

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
            llm = {"openai": {"model": "fake", "base_url": server.openai_base_url}, "cache_dir": "llm_cache"}
            _write_params(tmp_path, total, section("caption", backend="openai", proportion_real=0.5, llm=llm))
            for stage in ("allocate", "caption"):
                subprocess.run([sys.executable, str(REPO / f"stages/{stage}.py")], cwd=tmp_path, env=env,
                               check=True, capture_output=True)
            # counts of what the run did live in timing/ (stages/caption.py RUN_KEYS)
            return {**json.loads((tmp_path / "metrics/caption.json").read_text()),
                    **json.loads((tmp_path / "timing/caption.json").read_text())["run"]}

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


# -- the study's caption settings: modes, keyword seeds, analysis, per-provider model --------


def test_keyword_seeds_are_reproducible_per_slot_and_follow_the_labels():
    slots = ("time_of_day", "region", "season", "camera_angle", "weather")
    first = [captions.keyword_seeds(LABELS, seed, slots) for seed in range(40)]
    assert first == [captions.keyword_seeds(LABELS, seed, slots) for seed in range(40)]
    assert len({tuple(k) for k in first}) > 30  # varied over seeds
    # One stream per slot: dropping a slot leaves the others' draws unchanged.
    assert [k[:2] + k[3:] for k in first] == [captions.keyword_seeds(LABELS, s, slots[:2] + slots[3:]) for s in range(40)]
    # Weather follows the disaster type; not_informative content gets a content type and style
    # instead of the photographic slots.
    assert {k[4] for k in first} <= set(grammar.WEATHER["flood"])
    meme = {**LABELS, "informative": "not_informative"}
    drawn = captions.keyword_seeds(meme, 3, slots)
    assert drawn[0] in grammar.CONTENT_TYPES and drawn[1] in grammar.CONTENT_STYLE
    assert drawn[2:] == captions.keyword_seeds(LABELS, 3, ("region",))  # season is photographic


def test_caption_config_names_the_key_to_fix():
    with pytest.raises(CaptionError, match=r"caption\.llm\.openai\.model"):
        CaptionConfig.from_params(section("caption", backend="openai", llm={"model": "gpt-4o"}))
    with pytest.raises(CaptionError, match=r"set caption\.llm\.anthropic\.model"):
        CaptionConfig.from_params(section("caption", backend="anthropic", llm={"openai": {"model": "gpt-4o"}}))
    with pytest.raises(CaptionError, match=r"caption\.keywords: unknown slot\(s\) moon_phase"):
        CaptionConfig.from_params(section("caption", keywords=["region", "moon_phase"]))
    with pytest.raises(CaptionError, match=r"region and hemisphere.*keep one"):
        CaptionConfig.from_params(section("caption", keywords=["region", "hemisphere"]))
    with pytest.raises(CaptionError, match=r"caption\.analysis = 'yes'"):
        CaptionConfig.from_params(section("caption", analysis="yes"))


STUDY_SETTINGS = {
    "proportion_real": 0.75, "min_words": 40, "max_words": 60, "analysis": True,
    "temperature_grounded": 0.4, "temperature_hypothetical": 0.8,
    "keywords": ["time_of_day", "hemisphere", "camera_angle", "weather", "setting"],
}


@pytest.mark.slow
@pytest.mark.parametrize("provider,version", [("openai", None), ("anthropic", None), ("anthropic", "2023-06-01")])
def test_study_modes_reach_the_server_with_model_temperature_and_keywords(tmp_path, monkeypatch, provider, version):
    """Both modes through the real SDK: grounded requests describe their photo, hypothetical ones
    carry the row's keyword seeds; the provider's own model id is sent, and each mode's
    temperature wherever the provider's API takes one; analysis-then-caption keeps only the
    caption as the caption."""
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    train = _grounding_images(tmp_path)
    plan = _plan(40)
    with FakeLLMServer(_responder(refuse_always=set())) as server:
        llm = {"openai": {"model": "gpt-test-2024-08-06", "base_url": server.openai_base_url},
               "anthropic": {"model": "claude-test-20250219", "base_url": server.anthropic_base_url},
               "concurrency": 2, "max_retries": 0, "anthropic_version": version}
        config = CaptionConfig.from_params(section("caption", backend=provider, llm=llm, **STUDY_SETTINGS))
        result = caption_plan(plan, config, train=train, clients=make_clients(config, tmp_path / "c"), progress=False)
        requests = list(server.requests)
    table = result.table
    assert list(table.columns) == [*captions.CAPTION_COLUMNS, *captions.LLM_COLUMNS]
    assert set(table["mode"]) == {"grounded", "hypothetical"} and result.metrics["failed"] == 0
    grounded, hypothetical = table[table["mode"] == "grounded"], table[table["mode"] == "hypothetical"]
    # 75% grounded where a real image with the same labels exists (every combination here).
    assert 0.6 < len(grounded) / len(table) < 0.9

    model = llm[provider]["model"]
    assert {r.model for r in requests} == {model}
    assert {r.provider for r in requests} == {provider}
    for r in requests:
        asked = r.body.get("temperature")
        if provider == "openai" or version == "2023-06-01":
            assert asked == (0.4 if r.images else 0.8)
        else:
            # anthropic 2.x sends API version 2026-10-21, which rejects any temperature: none is
            # sent (medicsynth.llm.providers), and the metrics say so.
            assert asked is None and r.headers.get("anthropic-version") == "2026-10-21"
        assert "40 to 60 words" in r.prompt and '"analysis"' in r.prompt
    settings = result.metrics["llm_settings"]
    sent = (None, None) if provider == "anthropic" and version is None else (0.4, 0.8)
    assert (settings["grounded"]["temperature_sent"], settings["hypothetical"]["temperature_sent"]) == sent
    assert settings["grounded"]["temperature_requested"] == 0.4 and settings["hypothetical"]["temperature_requested"] == 0.8
    assert settings["grounded"]["model"] == settings["hypothetical"]["model"] == model

    # Grounded: describe this photograph, no keyword seeds; hypothetical: the row's seeds.
    with_image = [r for r in requests if r.images]
    assert with_image and all("Describe this photograph" in r.prompt and "setting keywords" not in r.prompt for r in with_image)
    assert (grounded["keywords"] == "").all()
    for row in hypothetical.itertuples():
        seeds = captions.keyword_seeds({t: getattr(row, t) for t in TASKS}, row.seed, tuple(STUDY_SETTINGS["keywords"]))
        assert row.keywords == "; ".join(seeds)
        assert ", ".join(seeds) in row.caption  # the fake model echoes the keywords it was sent
    # Analysis-then-caption: the analysis is recorded, and is not part of the caption.
    assert (table["analysis"].str.startswith("The ")).all()
    assert not table["caption"].str.contains("must show").any()
    assert (table["caption"].str.startswith("A grounded scene") == (table["mode"] == "grounded")).all()

    # Reruns draw the same keyword seeds (fresh clients, empty cache): identical table.
    with FakeLLMServer(_responder(refuse_always=set())) as again_server:
        llm2 = {**llm, provider: {**llm[provider], "base_url": again_server.base_url(provider)}}
        config2 = CaptionConfig.from_params(section("caption", backend=provider, llm=llm2, **STUDY_SETTINGS))
        again = caption_plan(plan, config2, train=train, clients=make_clients(config2, tmp_path / "c2"), progress=False)
    assert again.table[["id", "mode", "grounded_on", "keywords", "caption"]].equals(
        table[["id", "mode", "grounded_on", "keywords", "caption"]])


def test_template_backend_table_has_no_llm_columns():
    result = caption_plan(_plan(20), CaptionConfig.from_params(section("caption")), progress=False)
    assert list(result.table.columns) == list(captions.CAPTION_COLUMNS)
    assert "llm_settings" not in result.metrics
