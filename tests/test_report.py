"""The report page and metrics/summary.json, built from a fixture project (no browser here;
tests/test_report_browser.py opens the pages in headless Chromium)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from medicsynth.report import SECTIONS, Provenance, ReportConfig, ReportConfigError, ReportInputs, build_report
from medicsynth.report_data import HEADLINE_VARIANT, headline_summary, params_diff, verdict_of
from medicsynth.vega import plots_template
from tests.report_fixture import VARIANTS, build_project
from tests.sections import section

REPO = Path(__file__).resolve().parents[1]
# An llm.prices table in params.yaml's format (USD per million tokens).
LLM_PRICES = {"date": "2025-10-15", "source": "test",
              "models": {"gpt-4o": {"input_per_mtok": 2.5, "output_per_mtok": 10.0}}}
DATA_URI = re.compile(r"data:image/[a-z+]+;base64,([A-Za-z0-9+/=]+)")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return build_project(tmp_path_factory.mktemp("report"))


def make(project, with_images, **config):
    params = {"variants": list(VARIANTS), "mix_ratio": 0.1, "data": {"source": "demo"}, "train": {"archs": ["small_cnn"]},
              "caption": {"llm": {"model": "gpt-4o"}}}
    defaults = {**params, "mix_ratio": 0.3}
    cfg = ReportConfig.from_params(section("report", **config), LLM_PRICES)
    return build_report(ReportInputs(root=project), cfg, Provenance("abc123", params, defaults, "params.yaml at abc123"),
                        with_images=with_images)


def image_magic(html: str) -> list[bytes]:
    """First bytes of every base64 data: URI of an image in the page."""
    return [base64.b64decode(m.group(1))[:4] for m in DATA_URI.finditer(html)]


def test_public_edition_has_every_section_and_no_image_bytes(project):
    result = make(project, with_images=False)
    page = result.html
    assert result.sections == [s[0] for s in SECTIONS]
    for sid, title, _ in SECTIONS:
        assert f'<section id="{sid}"' in page and title in page
    assert image_magic(page) == []
    markup = re.sub(r"<script\b.*?</script>", "", page, flags=re.S)  # the Vega bundle's code mentions <img
    assert "<img" not in markup
    # No raw or base64 JPEG/PNG signature anywhere (base64 of FF D8 FF is "/9j/", of 89 50 4E 47 "iVBORw0KGgo").
    assert "/9j/" not in page and "iVBORw0KGgo" not in page
    assert page.count("private edition</div>") > 0  # placeholders where images would be
    assert 'data-edition="public"' in page


def test_private_edition_inlines_thumbnails_of_the_right_images(project):
    page = make(project, with_images=True).html
    magic = image_magic(page)
    assert magic and all(m[:3] == b"\xff\xd8\xff" for m in magic)  # JPEG thumbnails
    # Relabel examples (only changed labels: 8 of 12 rows) and a synthetic grid cell per image shown.
    markup = re.sub(r"<script\b.*?</script>", "", page, flags=re.S)
    assert markup.count("<img") == len(magic) >= 8


def test_no_reference_leaves_the_file(project):
    page = make(project, with_images=True).html
    markup = re.sub(r"<script\b.*?</script>", "", page, flags=re.S)  # markup outside the inline code
    # Attributes that would load something: only data: URIs and in-page anchors.
    for attr in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', markup):
        assert attr.startswith(("data:", "#")), attr
    assert "<link" not in markup and "@import" not in markup and "url(" not in markup
    assert "<script src" not in page
    assert "default-src 'none'" in page  # the browser itself refuses any fetch


def test_verdict_and_per_class_follow_compare(project):
    compare = json.loads((project / "metrics/compare.json").read_text())
    page = make(project, with_images=False).html
    for v in VARIANTS:
        assert f"{compare['mean_macro_f1'][v]['mean']:.3f}" in page  # mean over training seeds
    d = compare["mean_macro_f1_diff"]["augmented-original"]
    assert f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" in page
    minority = [c for t in compare["tasks"].values() for c, x in t["classes"].items() if x["minority"]]
    assert minority and all(f"★ {c}" in page for c in minority)


def test_charts_are_inline_vega_lite_with_inline_data(project):
    result = make(project, with_images=False)
    specs = re.findall(r'<script type="application/json" data-spec-for="([^"]+)">(.*?)</script>', result.html, flags=re.S)
    assert len(specs) == result.charts >= 15
    for chart_id, payload in specs:
        spec = json.loads(payload)
        assert spec["data"]["values"], chart_id
        assert "url" not in spec["data"]
        assert f'id="{chart_id}"' in result.html


def test_captions_are_escaped_and_modes_scored(project):
    page = make(project, with_images=False).html
    assert "&lt;b&gt;not bold&lt;/b&gt;" in page and "<b>not bold</b>" not in page
    assert "grounded" in page and "hypothetical" in page


def test_usage_prices_tokens_and_provenance_lists_changed_params(project):
    page = make(project, with_images=False).html
    assert "$3.50" in page  # 1M input × $2.5 + 0.1M output × $10
    assert "mix_ratio" in page and "0.3" in page  # differs from the defaults


def test_missing_inputs_give_a_note_naming_the_stage(tmp_path):
    result = build_report(ReportInputs(root=tmp_path), ReportConfig.from_params(section("report"), None), Provenance(),
                          with_images=True)
    assert "dvc repro compare" in result.html and "dvc repro filter" in result.html
    assert result.sections == [s[0] for s in SECTIONS]


def test_headline_summary_is_small_and_follows_compare(project):
    compare = json.loads((project / "metrics/compare.json").read_text())
    summary = headline_summary(compare, {"achieved_share": 0.10009})
    assert list(summary) == ["synth", *(HEADLINE_VARIANT.get(v, v) for v in VARIANTS)]
    assert set(summary["orig"]) == {"mean", "dmg", "inf", "hum", "dis", "min"}
    assert summary["aug"]["mean"] == round(compare["mean_macro_f1"]["augmented"]["mean"], 4)
    minority = [x["f1"]["relabelled"]["mean"] for t in compare["tasks"].values() for x in t["classes"].values() if x["minority"]]
    assert summary["relab"]["min"] == round(sum(minority) / len(minority), 4)
    assert summary["synth"] == 0.1001
    assert sum(len(v) if isinstance(v, dict) else 1 for v in summary.values()) <= 20


def test_seeded_compare_shape_is_read_with_sd_and_verdict():
    compare = {"variants": ["original", "augmented"], "tasks_compared": ["informative"], "seeds": [0, 1, 2],
               "mean_macro_f1": {"original": {"mean": 0.7, "sd": 0.01, "low": 0.69, "high": 0.71},
                                 "augmented": {"mean": 0.72, "sd": 0.02, "low": 0.70, "high": 0.74}},
               "mean_macro_f1_diff": {"augmented-original": {"diff": 0.02, "low": -0.01, "high": 0.05, "verdict": "no_evidence"}},
               "tasks": {"informative": {"macro_f1": {"original": {"mean": 0.9}, "augmented": {"mean": 0.91}}, "classes": {}}}}
    summary = headline_summary(compare, None)
    assert summary == {"orig": {"mean": 0.7, "inf": 0.9}, "aug": {"mean": 0.72, "inf": 0.91}}
    assert verdict_of(compare["mean_macro_f1_diff"]["augmented-original"]) == "no evidence"


@pytest.mark.parametrize(("diff", "expected"), [
    ({"diff": 0.02, "low": 0.01, "high": 0.03, "significant": True}, "better"),
    ({"diff": -0.02, "low": -0.03, "high": -0.01}, "worse"),
    ({"diff": 0.02, "low": -0.01, "high": 0.05, "significant": False}, "no evidence"),
])
def test_verdict_of(diff, expected):
    assert verdict_of(diff) == expected


def test_params_diff_flattens_and_marks_absent_keys():
    got = params_diff({"a": {"b": 1, "c": [1, 2]}, "x": 1}, {"a": {"b": 2, "c": [1, 2]}, "y": 0})
    assert got == [{"key": "a.b", "value": 1, "default": 2}, {"key": "x", "value": 1, "default": "(absent)"},
                   {"key": "y", "value": "(absent)", "default": 0}]


@pytest.mark.parametrize(("cfg", "llm_prices", "key"), [
    ({"thumbnail_px": 4}, None, "report.thumbnail_px"),
    ({"synthetic_task": "colour"}, None, "report.synthetic_task"),
    ({}, {**LLM_PRICES, "models": {"gpt-4o": {"input_per_mtok": 1}}}, "llm.prices.models.gpt-4o"),
    ({}, {"models": LLM_PRICES["models"]}, "llm.prices: missing key(s) date, source"),
    ({"relabel_examples": -1}, None, "report.relabel_examples"),
])
def test_config_errors_name_the_key(cfg, llm_prices, key):
    with pytest.raises(ReportConfigError, match=re.escape(key)):
        ReportConfig.from_params(section("report", **cfg), llm_prices)


def test_a_missing_or_unknown_report_key_is_an_error_naming_it():
    values = section("report")
    del values["thumbnail_px"]
    with pytest.raises(KeyError, match=re.escape("missing key report.thumbnail_px")):
        ReportConfig.from_params(values, None)
    with pytest.raises(ReportConfigError, match="unknown key.*prices.*llm.prices"):
        ReportConfig.from_params({**section("report"), "prices": {}}, None)


def test_params_yaml_report_section_is_valid():
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    cfg = ReportConfig.from_params(params["report"], params["llm"]["prices"])
    assert cfg.thumbnail_px == params["report"]["thumbnail_px"]  # the value in params.yaml, no copy in code


def test_committed_dvc_plots_template_is_current_and_offline():
    template = (REPO / ".dvc/plots_offline.html").read_text(encoding="utf-8")
    assert template == plots_template(), "regenerate: python -m medicsynth.vega template .dvc/plots_offline.html"
    assert "{plot_divs}" in template and "{scripts}" not in template  # DVC's CDN tags never get in
    assert "<script src" not in template
    config = (REPO / ".dvc/config").read_text()
    assert re.search(r"html_template\s*=\s*plots_offline\.html", config)


def test_dvc_yaml_routes_only_the_private_edition_to_the_private_remote_and_declares_only_the_summary():
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs = {next(iter(o)): next(iter(o.values())) for o in stages["report"]["outs"]}
    assert outs == {"report/public.html": {"cache": False}, "report/private.html": {"remote": "private"}}
    declared = [next(iter(m)) for s in stages.values() for m in s.get("metrics", [])]
    assert declared == ["metrics/summary.json"]  # the headline; the detail is plain outputs


def test_prices_come_from_the_one_table_in_llm_prices():
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    cfg = ReportConfig.from_params(section("report"), LLM_PRICES)
    assert cfg.prices == {"gpt-4o": {"input": 2.5, "output": 10.0}}
    assert "prices" not in params["report"]  # no second price table to drift
    assert ReportConfig.from_params(params["report"], params["llm"]["prices"]).prices
