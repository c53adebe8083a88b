"""Every generator family through the real stages, on tiny random-weight pipelines on the CPU.

Tiny FLUX.1, SD 3 and SD 1.5 pipelines (``tests/tiny_pipelines.py``, diffusers' fast-test sizes)
are saved as pipeline directories and run through ``stages/generate.py`` and the LoRA path of
``stages/adapt.py`` exactly as a user would with a downloaded model: the family is read from
``model_index.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from medicsynth.diffusion import generate as gen
from medicsynth.diffusion.families import FamilyError, detect_family, native_size
from medicsynth.labels import CLASSES, TASKS
from medicsynth.manifest import read_manifest
from tests import tiny_pipelines
from tests.sections import section

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("flux", "sd3", "sd")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: tiny_pipelines.save(build(), root / name) for name, build in tiny_pipelines.BUILDERS.items()}


def _labels(i: int) -> dict[str, str]:
    return {t: CLASSES[t][(i * (k + 2) + k) % len(CLASSES[t])] for k, t in enumerate(TASKS)}


def write_plan(path: Path, n: int) -> Path:
    rows = [{"id": f"p{i:04d}", "seed": 1000 + i, **_labels(i), "caption": f"a photo of flood damage {i}",
             "negative_prompt": "blurry"} for i in range(n)]
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def run_stage(script: str, cwd: Path, *args: str, monkeypatch) -> None:
    """Run ``stages/<script>`` as ``python stages/<script> args`` would, in this process.

    In-process (``runpy``) instead of a subprocess: the stage's code path is the same, and the
    shared test machine does not pay torch/diffusers imports for every run.
    """
    import runpy

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(REPO / script), run_name="__main__")


def generate_params(model: Path, **kw) -> dict:
    base = dict(model=str(model), scheduler="auto", steps=2, guidance="auto", width=32, height=32,
                prompt_source="caption", batch_size=2, device="cpu", threads=1, safety_checker=False)
    return section("generate", **{**base, **kw})


def test_family_read_from_model_index(models, tmp_path):
    assert {name: detect_family(path).name for name, path in models.items()} == {"flux": "flux", "sd3": "sd3", "sd": "sd"}
    flux = detect_family(models["flux"])
    assert not flux.negative_prompt and flux.distilled_guidance and flux.objective == "flow"
    assert detect_family(models["sd3"]).negative_prompt and detect_family(models["sd3"]).denoiser == "transformer"
    assert native_size(models["sd"], detect_family(models["sd"])) == 32  # the tiny SD is a 32 px model
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionUpscalePipeline", "vae": []}))
    with pytest.raises(FamilyError, match="StableDiffusionUpscalePipeline"):
        detect_family(tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_stage_renders_every_family(models, tmp_path, family, monkeypatch):
    plan = write_plan(tmp_path / "captions.tsv", 3)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"storage": section("storage"), "generate": generate_params(models[family])}))
    args = ["--captions", str(plan), "--images", "images", "--manifest", "manifest.tsv", "--metrics", "generate.json"]
    run_stage("stages/generate.py", tmp_path, *args, monkeypatch=monkeypatch)
    metrics = json.loads((tmp_path / "generate.json").read_text())
    run = json.loads((tmp_path / "timing/generate.json").read_text())["run"]  # what this run did
    assert metrics["family"] == family and run["rendered"] == 3 and run["skipped"] == 0
    expected = {"flux": (2, 3.5, "default"), "sd3": (2, 7.0, "default"), "sd": (2, 7.5, "dpmsolver++")}[family]
    assert (metrics["options"]["steps"], metrics["options"]["guidance"], metrics["options"]["scheduler"]) == expected
    manifest = read_manifest(tmp_path / "manifest.tsv")
    assert len(manifest) == 3
    for row in manifest.to_dict("records"):
        with Image.open(tmp_path / row["file"]) as im:
            assert im.size == (32, 32)
        stamp = gen.read_stamp(tmp_path / row["file"])
        assert stamp["key"] == row["provenance_key"]
    # Resume: a rerun renders nothing.
    run_stage("stages/generate.py", tmp_path, *args, monkeypatch=monkeypatch)
    again = json.loads((tmp_path / "timing/generate.json").read_text())["run"]
    assert again["rendered"] == 0 and again["skipped"] == 3
    # ...and the cached metrics are the same bytes as after the first run: they describe the outputs.
    assert json.loads((tmp_path / "generate.json").read_text()) == metrics


def _render(model: Path, seeds, prompts=None, **kw):
    o = gen.GenerateOptions(**generate_params(model, **kw)).with_family_defaults(detect_family(model))
    ref = gen.resolve_model(str(model))
    res = gen.resolve_options(o, torch.device("cpu"))
    family = detect_family(model)
    r = gen.make_renderer(gen.load_pipeline(ref, o, res, family), o, res, family, 32, 32)
    prompts = prompts or ["a photo of flood"] * len(seeds)
    return r(prompts, [""] * len(seeds), seeds)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_transformer_families_are_batch_invariant(models, family):
    batch = _render(models[family], [11, 12, 13], ["a photo of flood", "fire smoke", "storm"])
    single = _render(models[family], [12], ["fire smoke"])
    assert np.abs(batch.images[1].astype(int) - single.images[0].astype(int)).max() <= 1
    assert not np.array_equal(batch.images[0], batch.images[2])


def test_flux_drops_negative_prompts_from_the_key(models, tmp_path):
    family = detect_family(models["flux"])
    o = gen.GenerateOptions(**generate_params(models["flux"])).with_family_defaults(family)
    ref = gen.resolve_model(str(models["flux"]))
    plan = gen.read_plan(write_plan(tmp_path / "c.tsv", 2))
    status = gen.plan_jobs(plan, tmp_path, o, ref, "", "caption", 32, 32, family=family)
    assert {j.negative for j in status.jobs} == {""}
    sd3 = detect_family(models["sd3"])
    status = gen.plan_jobs(plan, tmp_path, o, gen.resolve_model(str(models["sd3"])), "", "caption", 32, 32, family=sd3)
    assert {j.negative for j in status.jobs} == {"blurry"}


def test_flow_family_refuses_a_ddpm_scheduler(models):
    with pytest.raises(ValueError, match="flow-matching"):
        _render(models["flux"], [1], scheduler="dpmsolver++")


# ---------------------------------------------------------------------------------------------
# LoRA per family through stages/adapt.py, loaded back by generate


def write_train_manifest(root: Path, n: int = 4) -> Path:
    from medicsynth.manifest import write_manifest

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        path = f"images/train_{i}.jpg"
        (root / "images").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / path)
        rows.append({"image_id": f"t{i}", "event_name": "test", "image_path": path, **_labels(i), "split": "train",
                     "source": "real", "provenance": "test", "file": path})
    write_manifest(pd.DataFrame(rows), root / "train.tsv")
    return root / "train.tsv"


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_adapt_lora_trains_every_family_and_generate_loads_it(models, tmp_path, family, monkeypatch):
    from safetensors.torch import load_file

    write_train_manifest(tmp_path)
    adapt = {"mode": "lora", "train_manifest": "train.tsv", "balance": "disaster_types", "seed": 0, "threads": 1,
             "lora": {**section("adapt.lora", base_model=str(models[family]), rank=4, alpha=4.0, steps=3, batch=2,
                                lr=0.05, resolution=32, gradient_checkpointing=False, mixed_precision="no",
                                captions="template"), "warmup_steps": 1, "num_workers": 0, "device": "cpu"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"storage": section("storage"), "adapt": adapt, "generate": generate_params(
        models[family], lora="models/diffusion/lora")}))
    run_stage("stages/adapt.py", tmp_path, "--out", "models/diffusion", "--metrics", "adapt.json",
              "--plot", "adapt.png", monkeypatch=monkeypatch)
    metrics = json.loads((tmp_path / "adapt.json").read_text())
    assert metrics["family"] == family and metrics["phases"]["lora"]["steps"] == 3
    weights = load_file(tmp_path / "models/diffusion/lora/pytorch_lora_weights.safetensors")
    denoiser = "unet" if family == "sd" else "transformer"
    assert weights and all(k.startswith(denoiser + ".") for k in weights)
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k or "lora.up" in k)

    # generate fuses it into the denoiser: the attention weights differ from the base model's.
    fam = detect_family(models[family])
    o = gen.GenerateOptions(**generate_params(models[family], lora=str(tmp_path / "models/diffusion/lora")))
    res = gen.resolve_options(o, torch.device("cpu"))
    ref = gen.resolve_model(str(models[family]))
    fused = getattr(gen.load_pipeline(ref, o, res, fam), denoiser).state_dict()
    base = getattr(gen.load_pipeline(ref, gen.GenerateOptions(**generate_params(models[family])), res, fam), denoiser).state_dict()
    changed = [k for k in base if k.endswith("to_q.weight") and not torch.equal(base[k], fused[k])]
    assert changed, "the LoRA did not change any to_q projection"

    # ...and the stage renders with it (the LoRA fingerprint is part of each image's key).
    plan = write_plan(tmp_path / "captions.tsv", 2)
    run_stage("stages/generate.py", tmp_path, "--captions", str(plan), "--images", "images_out", "--manifest",
              "manifest.tsv", "--metrics", "generate.json", monkeypatch=monkeypatch)
    gmetrics = json.loads((tmp_path / "generate.json").read_text())
    grun = json.loads((tmp_path / "timing/generate.json").read_text())["run"]
    assert grun["rendered"] == 2 and gmetrics["lora"] == "models/diffusion/lora"


# ---------------------------------------------------------------------------------------------
# hosted backend (OpenAI Images API) on a loopback server


@pytest.fixture
def images_server():
    from tests.images_api_server import FakeImagesServer

    with FakeImagesServer() as server:
        yield server
        server.release.set()


def hosted_params(server, tmp_path: Path, **hosted) -> dict:
    cfg = section("generate.hosted", **{
        "model": "gpt-image-1", "base_url": server.base_url, "size": "48x32", "quality": "low", "max_calls": 100,
        "concurrency": 2, "max_retries": 0, "timeout_s": 30, "cache_dir": str(tmp_path / "cache"), **hosted})
    return section("generate", backend="openai", hosted=cfg, prompt_source="caption", blank_std=2.0)


def stage_args() -> list[str]:
    return ["--captions", "captions.tsv", "--images", "images", "--manifest", "manifest.tsv", "--metrics", "generate.json"]


def _generate_report(root: Path) -> dict:
    """The stage's cached metrics plus what the run did (rendered/skipped per run live in timing/)."""
    run = json.loads((root / "timing/generate.json").read_text()).get("run", {})
    return {**json.loads((root / "generate.json").read_text()), **run}


def test_hosted_backend_caches_resumes_and_budgets(images_server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    write_plan(tmp_path / "captions.tsv", 5)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"storage": section("storage"), "generate": hosted_params(images_server, tmp_path, max_calls=3)}))
    run_stage("stages/generate.py", tmp_path, *stage_args(), monkeypatch=monkeypatch)
    m = _generate_report(tmp_path)
    # Budget: 3 paid calls, the other 2 planned images are missing (counted, not faked).
    assert images_server.count() == 3 and m["hosted"]["calls"] == 3
    assert m["hosted"]["failures"]["budget"] == 2 and m["missing"] == 2
    manifest = read_manifest(tmp_path / "manifest.tsv")
    assert len(manifest) == 3 and set(manifest["model"]) == {"openai:gpt-image-1"}
    body = images_server.bodies[0]
    assert body["size"] == "48x32" and body["quality"] == "low" and "negative" not in json.dumps(body)
    with Image.open(tmp_path / manifest["file"].iloc[0]) as im:
        assert im.size == (48, 32)

    # Resume with a larger budget: only the 2 missing images are requested.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"storage": section("storage"), "generate": hosted_params(images_server, tmp_path)}))
    run_stage("stages/generate.py", tmp_path, *stage_args(), monkeypatch=monkeypatch)
    m = _generate_report(tmp_path)
    assert images_server.count() == 5 and m["skipped"] == 3 and m["rendered"] == 2 and m["missing"] == 0
    assert max(images_server.completed.values()) == 1

    # Images lost (DVC removed the outputs): all 5 come back from the cache, no call.
    import shutil

    shutil.rmtree(tmp_path / "images")
    run_stage("stages/generate.py", tmp_path, *stage_args(), monkeypatch=monkeypatch)
    m = _generate_report(tmp_path)
    assert images_server.count() == 5 and m["hosted"]["cache_hits"] == 5 and len(read_manifest(tmp_path / "manifest.tsv")) == 5


def test_hosted_refusal_is_counted_not_cached(images_server, tmp_path, monkeypatch):
    from medicsynth.diffusion.generate import GenerateOptions
    from medicsynth.diffusion.hosted import generate_hosted

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    write_plan(tmp_path / "captions.tsv", 2)
    images_server.script(400)
    opts = GenerateOptions(**hosted_params(images_server, tmp_path, concurrency=1))
    m = generate_hosted(tmp_path / "captions.tsv", tmp_path / "images", tmp_path / "manifest.tsv", opts, progress=False)
    assert m["hosted"]["failures"]["refused"] == 1 and m["rendered"] == 1 and m["missing"] == 1
    m = generate_hosted(tmp_path / "captions.tsv", tmp_path / "images", tmp_path / "manifest.tsv", opts, progress=False)
    assert m["rendered"] == 1 and m["skipped"] == 1 and images_server.count() == 3


def test_hosted_needs_a_key(images_server, tmp_path, monkeypatch):
    from medicsynth.diffusion.generate import GenerateOptions
    from medicsynth.diffusion.hosted import HostedError, generate_hosted

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    write_plan(tmp_path / "captions.tsv", 1)
    with pytest.raises(HostedError, match="OPENAI_API_KEY"):
        generate_hosted(tmp_path / "captions.tsv", tmp_path / "images", tmp_path / "m.tsv",
                        GenerateOptions(**hosted_params(images_server, tmp_path)), progress=False)


@pytest.mark.slow  # two stage subprocesses (torch imports)
def test_hosted_kill_mid_run_repeats_no_answered_call(images_server, tmp_path):
    import signal
    import time

    write_plan(tmp_path / "captions.tsv", 6)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"storage": section("storage"), "generate": hosted_params(images_server, tmp_path, concurrency=1)}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENAI_API_KEY": "test-key", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(REPO / "stages/generate.py"), *stage_args()]
    # The 4th request is held by the server: the stage has 3 answers cached and one call in flight.
    images_server.hold_from = 4
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300  # a safety net against a hung test, not a result
        while images_server.count() < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert images_server.count() == 4, proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "timeout"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    images_server.hold_from = None
    images_server.release.set()  # the held answer now meets a dead client: not delivered
    assert sum(images_server.completed.values()) == 3
    assert len(list((tmp_path / "cache" / "images").glob("??/*.png"))) == 3

    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # 6 planned images, 6 answers delivered in all: none answered twice; only the in-flight one re-sent.
    assert sum(images_server.completed.values()) == 6 and max(images_server.completed.values()) == 1
    assert images_server.count() == 7
    assert len(read_manifest(tmp_path / "manifest.tsv")) == 6


def test_study_preset_generate_section_is_valid():
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    preset = yaml.safe_load((REPO / "presets/study.yaml").read_text())
    assert set(preset["generate"]) <= set(base["generate"]) and set(preset["adapt"]) <= set(base["adapt"])
    opts = gen.GenerateOptions.from_params({**base["generate"], **preset["generate"]})
    from medicsynth.diffusion.families import FAMILIES

    resolved = opts.with_family_defaults(FAMILIES["flux"])
    assert (resolved.steps, resolved.guidance, resolved.width, resolved.height) == (30, 2.5, 512, 512)
    assert preset["adapt"]["mode"] == "off"


def test_memory_options(models):
    fam = detect_family(models["flux"])
    ref = gen.resolve_model(str(models["flux"]))
    o = gen.GenerateOptions(**generate_params(models["flux"], vae_tiling=True, vae_slicing=True))
    res = gen.resolve_options(o, torch.device("cpu"))
    pipe = gen.load_pipeline(ref, o, res, fam)
    assert pipe.vae.use_tiling and pipe.vae.use_slicing
    with pytest.raises(gen.GenerateError, match="cpu_offload .* needs device cuda"):
        gen.load_pipeline(ref, gen.GenerateOptions(**generate_params(models["flux"], cpu_offload="model")), res, fam)
    with pytest.raises(ValueError, match="dtype bf16 on CPU"):
        gen.resolve_options(gen.GenerateOptions(**generate_params(models["flux"], dtype="bf16")), torch.device("cpu"))


@pytest.mark.slow  # two torchrun processes
def test_generate_sharded_over_two_processes_matches_one(models, tmp_path, monkeypatch):
    """torchrun (Gloo on CPU) with 2 processes renders a FLUX plan: same images as one process."""
    plan = write_plan(tmp_path / "captions.tsv", 4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"storage": section("storage"), "generate": generate_params(models["flux"], batch_size=1)}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "stages/generate.py"), "--captions", str(plan), "--images", "sharded", "--manifest",
           "sharded.tsv", "--metrics", "sharded.json"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((tmp_path / "timing/generate.json").read_text())["run"]  # what the run did
    assert m["processes"] == 2 and sorted(s["rendered"] for s in m["per_process"]) == [2, 2]
    run_stage("stages/generate.py", tmp_path, "--captions", str(plan), "--images", "single", "--manifest",
              "single.tsv", "--metrics", "single.json", monkeypatch=monkeypatch)
    for name in sorted(p.name for p in (tmp_path / "single").glob("*.jpg")):
        a = np.asarray(Image.open(tmp_path / "single" / name)).astype(int)
        b = np.asarray(Image.open(tmp_path / "sharded" / name)).astype(int)
        assert np.abs(a - b).max() <= 1, name
    assert len(read_manifest(tmp_path / "sharded.tsv")) == 4
