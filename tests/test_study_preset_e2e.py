"""The study preset end to end (issue 11): ``presets/study.yaml`` applied with the project's own
command to a tiny demo copy of the repository, then ``dvc repro`` with the real dvc CLI.

Everything the preset sets runs as the preset says, except what cannot run offline on a 2-core
CPU in minutes; each such override is listed in :data:`OFFLINE` (or taken from the e2e sizes,
``TINY_PARAMS``) with the reason. The paid stages talk to loopback API servers started here
(tests/api_server.py), one per stage, through the real openai and anthropic SDKs, with fake
keys from the environment: relabel (both voters, the study's pinned snapshots), caption (OpenAI,
grounded and hypothetical, analysis first) and zeroshot (two models × the six strategies).
FLUX.1-dev is replaced by a tiny random-weight FLUX.1 pipeline built and saved by the test
(tests/tiny_pipelines.py), so generate runs the preset's family, scheduler, guidance and dtype.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pandas as pd
import pytest
import yaml

from medicsynth.labels import TASKS
from tests import tiny_pipelines
from tests.api_server import FakeLLMServer, answer
from tests.e2e_helpers import TINY_PARAMS, deep_update, env, make_repo_copy, run

# Real dvc on the whole pipeline: minutes on 2 cores (`make test-fast` skips it).
pytestmark = [pytest.mark.e2e, pytest.mark.study]

# A fake key (the SDKs need one, the loopback servers accept any), drawn per run so that no
# file, this one included, holds it before the run: afterwards no file may.
FAKE_KEY = f"sk-e2e-{secrets.token_hex(16)}"
ZEROSHOT_IMAGES = 4  # test images per zero-shot cell (the preset: 500)
STUDY_ARCHS = ["resnet50", "efficientnet_b1", "mobilenet_v2"]
STRATEGIES = ["direct_classification", "two_phase_analysis", "elimination_reasoning", "uncertainty_aware",
              "weighted_option_analysis", "direct_uncertainty"]
REPRO_TIMEOUT = 3600  # only stops a hung run


def offline_overrides(flux: Path, relabel: FakeLLMServer, caption: FakeLLMServer, zeroshot: FakeLLMServer) -> dict:
    """What the preset asks for that cannot run here, each with why (on top of ``TINY_PARAMS``,
    which re-sizes data, epochs, image sides, batch sizes, allocate.total and generate.steps)."""
    return {
        # The study compared original, relabelled and augmented training sets; this project's
        # baselines (oversampled, classic_aug) run in test_pipeline_e2e, and here they would add six
        # trainings of the three CNNs (about twice this test's runtime on 2 cores).
        "variants": ["original", "relabelled", "augmented"],
        "train": {
            # ImageNet weights are not in this machine's torch hub cache (and never downloaded):
            # the study's three CNNs train from scratch.
            "pretrained": False,
        },
        "relabel": {
            # The ensemble models: the study's three CNNs, from scratch for the same reason, at
            # TINY_PARAMS' 32 px (the preset's 256 → 224 is hours of CPU).
            "model": {"pretrained": False},
            # The voters ask the loopback server instead of the providers (same SDKs, same models).
            "openai": {"base_url": relabel.openai_base_url},
            "anthropic": {"base_url": relabel.anthropic_base_url},
        },
        "caption": {
            # The caption backend (openai, the study's pinned GPT-4o) asks the loopback server.
            "llm": {"openai": {"base_url": caption.openai_base_url}},
        },
        "generate": {
            # FLUX.1-dev's weights are not in the local HF cache: a tiny random-weight FLUX.1
            # pipeline of the same family, saved by the test; the scheduler (the model's own) and
            # guidance 2.5 stay the preset's...
            "model": str(flux),
            # ...but not the size: the tiny pipeline is a 32 px model (512² would only cost CPU)...
            "width": 32,
            "height": 32,
            # ...nor bf16, which generate refuses on a CPU (slow and inexact there; a GPU setting).
            "dtype": "fp32",
        },
        "zeroshot": {
            # Both matrix rows (GPT-4o and Claude 3.7 Sonnet) ask the loopback server...
            "base_url": zeroshot.openai_base_url,
            "extra_models": [{"provider": "anthropic", "model": "claude-3-7-sonnet-20250219",
                              "base_url": zeroshot.anthropic_base_url}],
            # ...about a few test images per cell (the preset's 500 exceeds the tiny test split).
            "max_images": ZEROSHOT_IMAGES,
        },
    }


def caption_answer(req):
    """A caption in the request's own terms: the disaster type it names, the keyword seeds of a
    hypothetical request; an analysis first when the prompt asks for one (the preset does)."""
    prompt = req.prompt
    disaster = prompt.split("- disaster type: ")[1].split("\n")[0]
    if req.images:
        detail = f"the photographed scene {req.image_sha256s[0][:8]}"
    else:
        detail = prompt.split("setting keywords: ")[1].split(".\n")[0]
    out = {"caption": f"A photo of a {disaster} event, {detail}, with damaged houses along a flooded street "
                      "and people walking past the debris under a grey sky."}
    if '"analysis"' in prompt:
        out = {"analysis": f"The labels call for a {disaster} scene.", **out}
    return answer(out)


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The repository copy after one ``dvc repro`` of the study preset, the repro's output and the
    requests each loopback server received."""
    root = tmp_path_factory.mktemp("study")
    flux = tiny_pipelines.save(tiny_pipelines.tiny_flux(), root / "tiny-flux")
    repo = make_repo_copy(root / "repo")  # TINY_PARAMS applied (then overridden by the preset)
    applied = run([sys.executable, "-m", "medicsynth.presets", "apply", "presets/study.yaml"], repo).stdout
    with ExitStack() as stack:
        servers = {"relabel": stack.enter_context(FakeLLMServer()),  # auto: a valid answer to each schema
                   "caption": stack.enter_context(FakeLLMServer(caption_answer)),
                   "zeroshot": stack.enter_context(FakeLLMServer())}
        params_path = repo / "params.yaml"
        params = yaml.safe_load(params_path.read_text())
        deep_update(params, TINY_PARAMS)
        deep_update(params, offline_overrides(flux, **servers))
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        keys = {**env(), "OPENAI_API_KEY": FAKE_KEY, "ANTHROPIC_API_KEY": FAKE_KEY,
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        procs = []
        # One `dvc repro`: allocate depends on metrics/dev/original-s0, where every architecture's
        # seed-0 evaluation writes its dev report, so DVC orders all three before it.
        assert params["allocate"]["dev_report"] == "metrics/dev/original-s0" and params["allocate"]["f1_reports"] == []
        procs.append(subprocess.run(["dvc", "repro"], cwd=repo, capture_output=True, text=True,
                                    timeout=REPRO_TIMEOUT, env=keys))
        requests = {name: list(server.requests) for name, server in servers.items()}
    return {"repo": repo, "procs": procs, "requests": requests, "applied": applied, "params": params}


def read_json(repo: Path, rel: str) -> dict:
    return json.loads((repo / rel).read_text())


def test_every_stage_ran_and_nothing_failed(study):
    repo, procs = study["repo"], study["procs"]
    for proc in procs:
        assert proc.returncode == 0, f"{proc.args} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert len(procs) == 1
    listed = run(["dvc", "stage", "list", "--name-only"], repo).stdout.split()
    ran = ran_stages(procs[0].stdout)
    # allocate after every architecture's seed-0 evaluation of the original variant
    assert all(ran.index(f"evaluate@original-{a}-0") < ran.index("allocate") for a in STUDY_ARCHS)
    assert sorted(ran) == sorted(listed) and len(ran) == len(set(ran))  # each stage once
    # the study's three CNNs, every variant, the one tiny seed
    variants = study["params"]["variants"]
    assert {s for s in ran if s.startswith("train@")} == {
        f"train@{v}-{a}-0" for v in variants for a in STUDY_ARCHS}
    # every declared output exists and matches dvc.lock
    assert "up to date" in run(["dvc", "status"], repo).stdout.lower()


def test_preset_was_applied_by_the_project_command(study):
    applied, params = study["applied"], study["params"]
    assert "set generate.model" in applied and "set relabel.voters" in applied
    assert params["relabel"]["voters"] == ["openai", "anthropic"] and params["relabel"]["flag"] == "ensemble"
    assert params["relabel"]["splits"] == ["train", "dev", "test"]
    assert params["train"]["archs"] == STUDY_ARCHS and params["adapt"]["mode"] == "off"


def test_relabel_asked_both_pinned_voters_and_relabelled_test(study):
    repo, requests = study["repo"], study["requests"]["relabel"]
    m = read_json(repo, "metrics/relabel.json")
    assert m["flag"] == "ensemble" and m["ensemble_archs"] == STUDY_ARCHS
    assert m["ensemble_predictions"] == "in_sample" and m["flagged_images"] > 0
    by_provider = {p: [r for r in requests if r.provider == p] for p in ("openai", "anthropic")}
    assert {p: {r.model for r in rs} for p, rs in by_provider.items()} == {
        "openai": {"gpt-4o-2024-08-06"}, "anthropic": {"claude-3-7-sonnet-20250219"}}
    # every flagged image asked once of each voter (auto answers: no refusal, no retry)
    assert len(by_provider["openai"]) == len(by_provider["anthropic"]) == m["flagged_images"]
    # temperature 0 reaches both voters (Anthropic through API version 2023-06-01, as the preset sets)
    assert all(r.body["temperature"] == 0.0 for rs in by_provider.values() for r in rs)
    assert {r.headers.get("anthropic-version") for r in by_provider["anthropic"]} == {"2023-06-01"}
    assert m["voter_settings"]["anthropic"]["temperature_sent"] == 0.0
    assert m["voter_settings"]["openai"]["image_max_side"] == "full"
    assert m["voter_settings"]["anthropic"]["image_max_side"] == "full"
    changes = pd.read_csv(repo / "data/relabel/changes.tsv", sep="\t", dtype=str)
    assert set(changes["split"]) == {"train", "dev", "test"}


def test_captions_came_from_the_caption_backend(study):
    repo, requests = study["repo"], study["requests"]["caption"]
    m = read_json(repo, "metrics/caption.json")
    table = pd.read_csv(repo / "data/captions/captions.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert len(table) == TINY_PARAMS["allocate"]["total"] == len(requests)
    assert {r.model for r in requests} == {"gpt-4o-2024-08-06"} and {r.provider for r in requests} == {"openai"}
    assert set(table["mode"]) <= {"grounded", "hypothetical"} and "grounded" in set(table["mode"])
    assert all("40 to 60 words" in r.prompt and '"analysis"' in r.prompt for r in requests)
    assert (table["analysis"] != "").all()
    assert m["failed"] == 0


def test_zeroshot_matrix_asked_every_cell(study):
    repo, requests = study["repo"], study["requests"]["zeroshot"]
    m = read_json(repo, "metrics/zeroshot.json")
    assert m["skipped"] is False
    cells = [(c["provider"], c["model"], c["strategy"]) for c in m["cells"]]
    assert cells == [(p, model, s) for p, model in (("openai", "gpt-4o-2024-08-06"),
                                                    ("anthropic", "claude-3-7-sonnet-20250219"))
                     for s in STRATEGIES]
    seen: dict[tuple[str, str], int] = {}
    for r in requests:
        seen[(r.provider, r.schema_name)] = seen.get((r.provider, r.schema_name), 0) + 1
    names = ["medic_labels"] + [f"medic_{s}" for s in STRATEGIES[1:]]
    assert seen == {(p, n): ZEROSHOT_IMAGES for p in ("openai", "anthropic") for n in names}
    assert all(not c["failures"] for c in m["cells"])
    assert "ours" in (repo / "metrics/zeroshot.md").read_text().lower()


def test_generate_rendered_the_plan_with_the_flux_family(study):
    repo = study["repo"]
    m = read_json(repo, "metrics/generate.json")
    assert m["family"] == "flux"
    opts = m["options"]
    assert (opts["guidance"], opts["scheduler"], opts["steps"]) == (2.5, "default", TINY_PARAMS["generate"]["steps"])
    assert len(pd.read_csv(repo / "data/synthetic/manifest.tsv", sep="\t")) == TINY_PARAMS["allocate"]["total"]
    assert read_json(repo, "metrics/adapt.json") == {"mode": "off"}
    alloc = read_json(repo, "metrics/allocate.json")
    assert alloc["f1_sources"] == [f"metrics/dev/original-s0/{a}.json" for a in sorted(STUDY_ARCHS)]


def test_compare_reports_the_relabelled_test_apart(study):
    repo = study["repo"]
    md = (repo / "metrics/compare.md").read_text()
    assert "# On the relabelled test labels (not the headline)" in md
    compare = read_json(repo, "metrics/compare.json")
    assert compare["arch"] == "resnet50" and compare["test_relabelled"]["n_test_changed"] > 0
    for a in STUDY_ARCHS:
        assert "test_relabelled" in read_json(repo, f"metrics/evaluate/original-{a}-s0.json")


def test_no_key_reached_a_file(study):
    repo = study["repo"]
    key = FAKE_KEY.encode()
    leaked = [str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file() and key in p.read_bytes()]
    assert leaked == []
