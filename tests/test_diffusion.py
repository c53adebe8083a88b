"""Diffusion: tiny pipeline, demo/LoRA training paths, and the generate stage's guarantees.

Everything runs on the CPU with small random-weight pipelines built here (no download). The
pipeline is the demo architecture at reduced width so a render of a few 64 px images with three
sampler steps takes well under a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medicsynth.diffusion import generate as gen
from medicsynth.diffusion.generate import GenerateError, GenerateOptions, generate_plan
from medicsynth.diffusion.lora import FLOW_KEYS
from medicsynth.diffusion.tiny import (
    TinyConfig,
    build_pipeline,
    build_tokenizer,
    label_prompt,
    prompt_vocabulary,
    save_pipeline,
)
from medicsynth.diffusion.train import (
    DemoTrainConfig,
    LoraTrainConfig,
    save_lora,
    train_demo,
    train_lora,
)
from medicsynth.labels import CLASSES, TASKS
from medicsynth.manifest import read_manifest
from tests.sections import section

REPO = Path(__file__).resolve().parents[1]
# Narrower than the demo model: same structure, faster to run in tests.
TEST_TINY = TinyConfig(vae_channels=(8, 16), unet_channels=(16, 16, 32), text_hidden=32,
                       prediction_type="v_prediction", zero_terminal_snr=True)

torch.set_num_threads(1)  # the test machine is shared: one thread is faster than two fighting


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "demo"
    pipe = build_pipeline(TEST_TINY, seed=0)
    save_pipeline(pipe, path, {"prompt_source": "labels"})
    return path


def _labels(i: int) -> dict[str, str]:
    return {t: CLASSES[t][(i * (k + 2) + k) % len(CLASSES[t])] for k, t in enumerate(TASKS)}


def write_plan(path: Path, n: int, start: int = 0, caption: str = "a photo") -> Path:
    rows = [{"id": f"p{i:04d}", "seed": 1000 + i, **_labels(i), "caption": f"{caption} {i}", "negative_prompt": "",
             "backend": "template", "mode": "hypothetical", "grounded_on": "", "provenance": "test"}
            for i in range(start, start + n)]
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def opts(**kw) -> GenerateOptions:
    base = dict(model="demo", steps=3, guidance=5.0, batch_size=2, device="cpu", threads=1, writer_threads=2)
    return GenerateOptions.from_params(section("generate", **{**base, **kw}))


def renderer_for(model_dir: Path, **kw) -> gen.Renderer:
    o = opts(**kw)
    ref = gen.resolve_model("demo", model_dir)
    res = gen.resolve_options(o, torch.device("cpu"))
    return gen.Renderer(gen.load_pipeline(ref, o, res), o, res)


class CountingRenderer:
    """Wraps a Renderer: counts calls and images, optionally 'dies' on call number ``die_on``."""

    def __init__(self, inner, die_on: int | None = None):
        self.inner, self.die_on, self.calls, self.images = inner, die_on, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, prompts, negatives, seeds):
        self.calls += 1
        if self.die_on is not None and self.calls == self.die_on:
            raise KeyboardInterrupt("simulated kill")
        self.images += len(prompts)
        return self.inner(prompts, negatives, seeds)


# ---------------------------------------------------------------------------------------------
# tiny pipeline


def test_tokenizer_keeps_every_label_word_whole():
    tok = build_tokenizer()
    for word in prompt_vocabulary():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    ids = tok(label_prompt(_labels(3)), padding="max_length", max_length=16).input_ids
    assert len(ids) == 16 and ids[0] == tok.bos_token_id
    assert tok.unk_token_id not in tok(label_prompt(_labels(3)), add_special_tokens=False).input_ids


def test_label_words_start_with_distinct_embeddings():
    # Every label word starts as a distinct unit-scale vector (TinyConfig.token_init_std), and
    # swapping the humanitarian word moves the untrained encoder's output about as much as
    # swapping the disaster word: with CLIP's 0.02 init the trained demo encoder had learnt the
    # disaster words only.
    cfg = TinyConfig()
    pipe = build_pipeline(cfg, seed=0)
    weights = pipe.text_encoder.get_input_embeddings().weight
    assert float(weights.std()) == pytest.approx(cfg.token_init_std, rel=0.1)

    def encode(labels):
        ids = pipe.tokenizer([label_prompt(labels)], padding="max_length", max_length=cfg.max_length,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0]

    base = {"disaster_types": "flood", "damage_severity": "severe", "humanitarian": "not_humanitarian",
            "informative": "informative"}
    e0 = encode(base)
    moved = {task: float((encode({**base, task: value}) - e0).pow(2).mean())
             for task, value in (("disaster_types", "fire"), ("humanitarian", "rescue_volunteering_or_donation_effort"))}
    assert moved["humanitarian"] > 0.5 * moved["disaster_types"] > 0  # 0.27 with std 0.02


def test_full_resolution_prompt_only_attention_reads_the_prompt_and_reloads(tmp_path):
    """TinyConfig.unet_only_cross_attention: the full-resolution level attends to the prompt only.

    Its first attention then takes its keys from the text (cross_attention_dim wide), and the
    option survives save -> DiffusionPipeline reload (it is written to the UNet config).
    """
    from diffusers import DiffusionPipeline

    cfg = replace(TEST_TINY, unet_attention=(True, True, True), unet_only_cross_attention=(True, False, False))
    pipe = build_pipeline(cfg, seed=0)
    first = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert first.only_cross_attention and first.attn1.to_k.in_features == cfg.text_hidden
    second = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0]
    assert not second.only_cross_attention and second.attn1.to_k.in_features == cfg.unet_channels[1]
    save_pipeline(pipe, tmp_path / "demo", {"prompt_source": "labels"})
    again = DiffusionPipeline.from_pretrained(tmp_path / "demo")
    assert list(again.unet.config.only_cross_attention) == [True, False, False]
    a = renderer_for(tmp_path / "demo")(["flood severe rescuevolunteeringordonationeffort informative"], [""], [3])
    b = renderer_for(tmp_path / "demo")(["flood severe rescuevolunteeringordonationeffort informative"], [""], [3])
    assert a.images.shape == (1, 64, 64, 3) and np.array_equal(a.images, b.images)


def test_label_prompt_rejects_unknown_label():
    bad = {**_labels(0), "disaster_types": "tsunami"}
    with pytest.raises(ValueError, match="tsunami"):
        label_prompt(bad)


# ---------------------------------------------------------------------------------------------
# rendering


def test_same_seed_same_image_and_different_seed_differs(model_dir):
    r = renderer_for(model_dir)
    p = [label_prompt(_labels(1))]
    a, b = r(p, [""], [7]).images, r(p, [""], [7]).images
    c = r(p, [""], [8]).images
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_batch_equals_single(model_dir):
    # CPU fp32: conv/matmul kernels may sum in another order for another batch shape, so the
    # documented tolerance is 1 grey level; in practice almost every pixel is identical.
    r = renderer_for(model_dir)
    prompts = [label_prompt(_labels(i)) for i in range(4)]
    seeds = [11, 12, 13, 14]
    batched = r(prompts, [""] * 4, seeds).images
    single = np.concatenate([r([p], [""], [s]).images for p, s in zip(prompts, seeds)])
    diff = np.abs(batched.astype(int) - single.astype(int))
    assert diff.max() <= 1
    assert (diff == 0).mean() > 0.99


def test_renderer_matches_diffusers_pipeline_call(model_dir):
    """Our loop is the pipeline's algorithm: same latents, scheduler, CFG, decode."""
    r = renderer_for(model_dir, scheduler="dpmsolver++")
    pipe = r.pipe
    pipe.scheduler = gen.make_scheduler("dpmsolver++", r.scheduler_config)
    prompts, seeds = [label_prompt(_labels(2)), label_prompt(_labels(5))], [3, 4]
    ours = r(prompts, ["", ""], seeds).images.astype(int)
    ref = pipe(prompts, negative_prompt=["", ""], num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
               generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="np").images
    assert np.abs(ours - np.round(ref * 255).astype(int)).max() <= 1


# ---------------------------------------------------------------------------------------------
# the stage: resume, provenance, blank, manifest


def _run(tmp_path, model_dir, o, hook=None, plan=None):
    return generate_plan(plan or tmp_path / "captions.tsv", tmp_path / "images", tmp_path / "manifest.tsv", o,
                         demo_dir=model_dir, progress=False, renderer_hook=hook)


@pytest.mark.slow
def test_resume_after_kill_renders_only_missing(tmp_path, model_dir):
    write_plan(tmp_path / "captions.tsv", 7)
    dying = {}

    def die_on_third_batch(r):
        dying["r"] = CountingRenderer(r, die_on=3)
        return dying["r"]

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, model_dir, opts(), die_on_third_batch)
    on_disk = sorted(p.name for p in (tmp_path / "images").glob("*.jpg"))
    assert on_disk == [f"p{i:04d}.jpg" for i in range(4)]  # two whole batches survived the kill
    assert not list((tmp_path / "images").glob(".*.tmp"))  # no half-written files

    counting = {}

    def count(r):
        counting["r"] = CountingRenderer(r)
        return counting["r"]

    m = _run(tmp_path, model_dir, opts(), count)
    assert counting["r"].images == 3 and counting["r"].calls == 2
    assert (m["rendered"], m["skipped"], m["stale_rerendered"]) == (3, 4, 0)
    manifest = read_manifest(tmp_path / "manifest.tsv")
    assert manifest["plan_id"].tolist() == [f"p{i:04d}" for i in range(7)]
    assert set(manifest["source"]) == {"synthetic"} and set(manifest["provenance"]) == {"generate:demo"}
    assert manifest["file"].tolist() == manifest["image_path"].tolist()
    for row in manifest.to_dict("records"):
        assert Path(row["file"]).is_file()
        assert row["prompt"] == label_prompt(row)  # the demo is prompted by its labels
    # a third run has nothing to do
    m3 = _run(tmp_path, model_dir, opts(), count)
    assert (m3["rendered"], m3["skipped"]) == (0, 7)


@pytest.mark.slow
def test_provenance_change_rerenders_and_execution_change_does_not(tmp_path, model_dir):
    write_plan(tmp_path / "captions.tsv", 4)
    _run(tmp_path, model_dir, opts())
    before = {p.name: p.read_bytes() for p in (tmp_path / "images").glob("*.jpg")}
    m = _run(tmp_path, model_dir, opts(batch_size=3, writer_threads=1))  # execution detail only
    assert (m["rendered"], m["skipped"]) == (0, 4)
    m = _run(tmp_path, model_dir, opts(guidance=2.0))  # recipe change: every image is stale
    assert (m["rendered"], m["stale_rerendered"], m["skipped"]) == (4, 4, 0)
    after = {p.name: p.read_bytes() for p in (tmp_path / "images").glob("*.jpg")}
    assert all(before[k] != after[k] for k in before)
    # raising the plan size renders only the new ids
    write_plan(tmp_path / "captions.tsv", 6)
    m = _run(tmp_path, model_dir, opts(guidance=2.0))
    assert (m["rendered"], m["skipped"]) == (2, 4)
    # a smaller plan keeps its images and removes the others: the output is exactly the plan
    write_plan(tmp_path / "captions.tsv", 3)
    m = _run(tmp_path, model_dir, opts(guidance=2.0))
    assert (m["rendered"], m["skipped"], m["removed_files_not_in_plan"]) == (0, 3, 3)
    assert sorted(p.name for p in (tmp_path / "images").glob("*.jpg")) == [f"p{i:04d}.jpg" for i in range(3)]


@pytest.mark.slow
def test_blank_outputs_are_flagged(tmp_path, model_dir):
    write_plan(tmp_path / "captions.tsv", 3)

    def constant_decoder(r):
        r.decode = lambda latents: torch.full((latents.shape[0], 3, r.height, r.width), 0.2)
        return r

    m = _run(tmp_path, model_dir, opts(), constant_decoder)
    assert m["blank_flagged"] == 3
    manifest = read_manifest(tmp_path / "manifest.tsv")
    assert manifest["blank_flag"].astype(int).tolist() == [1, 1, 1]
    # a NaN decode (e.g. fp16 overflow) is flagged too, never kept as a fine image
    def nan_decoder(r):
        r.decode = lambda latents: torch.full((latents.shape[0], 3, r.height, r.width), float("nan"))
        return r

    m = _run(tmp_path, model_dir, opts(steps=2), nan_decoder)
    assert m["blank_flagged"] == 3
    # a normal model's outputs are not flagged
    m = _run(tmp_path, model_dir, opts(guidance=3.0))
    assert m["blank_flagged"] == 0


def test_plan_errors_name_file_line_and_value(tmp_path, model_dir):
    plan = write_plan(tmp_path / "captions.tsv", 3)
    df = pd.read_csv(plan, sep="\t", dtype=str)
    df.loc[1, "humanitarian"] = "looting"
    df.to_csv(plan, sep="\t", index=False)
    with pytest.raises(GenerateError, match=r"captions.tsv: line 3: .*looting"):
        gen.read_plan(plan)
    df.loc[1, "humanitarian"] = CLASSES["humanitarian"][0]
    df.loc[2, "id"] = "../evil"
    df.to_csv(plan, sep="\t", index=False)
    with pytest.raises(GenerateError, match=r"line 4: id '../evil'"):
        gen.read_plan(plan)


def test_empty_caption_is_quarantined_when_prompting_by_caption(tmp_path, model_dir):
    plan = write_plan(tmp_path / "captions.tsv", 3)
    df = pd.read_csv(plan, sep="\t", dtype=str, keep_default_na=False)
    df.loc[1, "caption"] = ""
    df.to_csv(plan, sep="\t", index=False)
    m = _run(tmp_path, model_dir, opts(prompt_source="caption"))
    assert m["quarantined"] == 1 and m["quarantined_rows"][0]["id"] == "p0001"
    assert read_manifest(tmp_path / "manifest.tsv")["plan_id"].tolist() == ["p0000", "p0002"]


def test_hub_id_not_in_local_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(GenerateError, match="not in the local Hugging Face cache"):
        gen.resolve_model("stable-diffusion-v1-5/stable-diffusion-v1-5")
    with pytest.raises(GenerateError, match="adapt"):
        gen.resolve_model("demo", tmp_path / "no-model")


@pytest.mark.e2e
def test_two_processes_render_every_id_exactly_once(tmp_path, model_dir):
    write_plan(tmp_path / "captions.tsv", 9)
    (tmp_path / "params.yaml").write_text(json.dumps({"storage": section("storage"), "generate": section(
        "generate", model="demo", steps=2, guidance=4.0, batch_size=2, device="cpu", threads=1)}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "stages" / "generate.py"), "--params", "params.yaml", "--captions", "captions.tsv",
           "--images", "images", "--manifest", "manifest.tsv", "--metrics", "generate.json",
           "--demo-dir", str(model_dir)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # What this run did is a run fact (timing/), not a cached metric: see stages/generate.py RUN_KEYS.
    run = json.loads((tmp_path / "timing/generate.json").read_text())["run"]
    per = sorted(run["per_process"], key=lambda d: d["process"])
    assert run["processes"] == 2 and [p["rendered"] for p in per] == [5, 4]
    assert run["rendered"] == 9  # a duplicate would make the sum exceed the plan
    cached = json.loads((tmp_path / "generate.json").read_text())
    # ...and so is the count of an earlier plan's images it deleted (a fresh clone deletes none)
    assert "rendered" not in cached and "removed_files_not_in_plan" not in cached
    assert run["removed_files_not_in_plan"] == 0
    manifest = read_manifest(tmp_path / "manifest.tsv")
    assert sorted(manifest["plan_id"]) == [f"p{i:04d}" for i in range(9)]
    assert sorted(p.name for p in (tmp_path / "images").glob("*.jpg")) == [f"p{i:04d}.jpg" for i in range(9)]


# ---------------------------------------------------------------------------------------------
# adapt


def _tiny_images(tmp_path: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        arr = np.zeros((64, 64, 3), np.uint8)
        arr[:] = rng.integers(0, 255, 3)
        arr[32:] = rng.integers(0, 255, 3)
        path = tmp_path / f"img{i}.jpg"
        Image.fromarray(arr).save(path)
        files.append(str(path))
    return files


def test_demo_training_path_saves_a_loadable_pipeline(tmp_path):
    from medicsynth.diffusion.train import load_images, save_demo_pipeline

    files = _tiny_images(tmp_path, 6)
    labels = [_labels(i) for i in range(6)]
    demo = section("adapt.demo", vae_steps=3, vae_batch=4, unet_steps=3, unet_batch=4)
    cfg = replace(DemoTrainConfig.from_params({**demo, "balance": "disaster_types", "seed": 0}), tiny=TEST_TINY)
    pipe, logs = train_demo(load_images(files, 64), [label_prompt(x) for x in labels],
                            [x["disaster_types"] for x in labels], cfg, progress=False)
    assert logs["vae"].steps == 3 and logs["unet"].steps == 3
    assert all(np.isfinite(logs["unet"].losses))
    # per-channel standardisation folded into the VAE: training latents come out ~N(0, 1)
    from medicsynth.diffusion.train import encode_images

    means, _ = encode_images(pipe.vae, load_images(files, 64))
    assert pipe.vae.config.scaling_factor == 1.0
    assert torch.allclose(means.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(means.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4)
    save_demo_pipeline(pipe, tmp_path / "demo", {"prompt_source": "labels"})
    r = renderer_for(tmp_path / "demo")
    assert r([label_prompt(labels[0])], [""], [1]).images.shape == (1, 64, 64, 3)


@pytest.mark.slow
def test_lora_trains_two_steps_and_changes_outputs(tmp_path, model_dir):
    files = _tiny_images(tmp_path, 4)
    prompts = [label_prompt(_labels(i)) for i in range(4)]
    o = opts()
    ref = gen.resolve_model("demo", model_dir)
    res = gen.resolve_options(o, torch.device("cpu"))
    pipe = gen.load_pipeline(ref, o, res)
    lora = section("adapt.lora", rank=4, alpha=4, steps=2, batch=2, lr=5e-2, resolution=64, mixed_precision="no",
                   gradient_checkpointing=True)
    trainer = {k: v for k, v in lora.items() if k not in ("captions", *FLOW_KEYS)}
    cfg = LoraTrainConfig.from_params({**trainer, "balance": "disaster_types", "seed": 0, "warmup_steps": 0,
                                       "num_workers": 0})
    log = train_lora(pipe, files, prompts, None, cfg, torch.device("cpu"), progress=False)
    assert log.steps == 2 and all(np.isfinite(log.losses))
    lora_dir = save_lora(pipe, tmp_path / "lora")
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()

    base = renderer_for(model_dir)([prompts[0]], [""], [5]).images
    adapted = renderer_for(model_dir, lora=str(lora_dir))([prompts[0]], [""], [5]).images
    assert np.abs(base.astype(int) - adapted.astype(int)).max() > 0
    # the LoRA is part of the provenance: switching it re-renders
    write_plan(tmp_path / "captions.tsv", 2)
    generate_plan(tmp_path / "captions.tsv", tmp_path / "images", tmp_path / "m.tsv", o, demo_dir=model_dir, progress=False)
    m = generate_plan(tmp_path / "captions.tsv", tmp_path / "images", tmp_path / "m.tsv", replace(o, lora=str(lora_dir)),
                      demo_dir=model_dir, progress=False)
    assert m["stale_rerendered"] == 2


@pytest.mark.e2e
def test_adapt_stage_demo_writes_model_metrics_and_plot(tmp_path):
    files = _tiny_images(tmp_path, 6)
    rows = [{"image_id": "demo", "event_name": f"e{i}", "image_path": f, **_labels(i), "split": "train",
             "source": "real", "provenance": "demo", "file": f} for i, f in enumerate(files)]
    pd.DataFrame(rows).to_csv(tmp_path / "train.tsv", sep="\t", index=False)
    tiny = {k: list(v) if isinstance(v, tuple) else v for k, v in TEST_TINY.to_dict().items()}
    params = {"adapt": {"mode": "demo", "train_manifest": "train.tsv", "balance": "disaster_types", "seed": 0,
                        "threads": 1, "demo": {**section("adapt.demo", vae_steps=2, vae_batch=2, unet_steps=2,
                                                                 unet_batch=2), "tiny": tiny}}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "adapt.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "models/diffusion/demo/model_index.json").is_file()
    assert json.loads((tmp_path / "models/diffusion/demo/medicsynth.json").read_text())["prompt_source"] == "labels"
    metrics = json.loads((tmp_path / "metrics/adapt.json").read_text())
    assert metrics["phases"]["vae"]["steps"] == 2 and metrics["phases"]["unet"]["steps"] == 2
    assert (tmp_path / "plots/adapt_loss.png").stat().st_size > 1000
    # mode off still produces the declared outputs, saying so
    params["adapt"]["mode"] = "off"
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "adapt.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "metrics/adapt.json").read_text()) == {"mode": "off"}
