"""Results depend on data, code and params only: never on wall-clock time or machine load.

- adapt (the demo diffusion model) is decided by its steps: run twice, the second time with
  CPU-burning processes competing for the cores, it writes byte-identical outputs;
- generate writes the same images under load and with another number of JPEG writer threads;
- a wall-clock limit fails a phase with an error naming the params key, never trains less;
- wall-clock figures leave the metrics files for ``timing/<stage>.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch

from medicsynth.diffusion import train as train_mod
from medicsynth.diffusion.generate import GenerateOptions, generate_plan
from medicsynth.diffusion.tiny import TinyConfig, build_pipeline, save_pipeline
from medicsynth.diffusion.train import DemoTrainConfig, PhaseTimeout
from medicsynth.labels import CLASSES, TASKS
from medicsynth.timing import is_timing_key, split_timing, write_metrics
from tests.sections import section

REPO = Path(__file__).resolve().parents[1]
# Narrower than the demo model, same structure (as in test_diffusion.py).
TEST_TINY = TinyConfig(vae_channels=(8, 16), unet_channels=(16, 16, 32), text_hidden=32)


@contextmanager
def cpu_burners(n: int = 2):
    """``n`` busy-looping processes competing for the cores while the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path → hash)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _labels(i: int) -> dict[str, str]:
    return {t: CLASSES[t][(i * (k + 2) + k) % len(CLASSES[t])] for k, t in enumerate(TASKS)}


def _images(tmp_path: Path, n: int) -> list[str]:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    (tmp_path / "img").mkdir(exist_ok=True)
    files = []
    for i in range(n):
        arr = (torch.rand((64, 64, 3), generator=gen) * 255).to(torch.uint8).numpy()
        path = tmp_path / "img" / f"{i}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        files.append(str(path))
    return files


# ---------------------------------------------------------------------------------------------
# timing files


def test_split_timing_moves_every_wall_clock_figure_and_keeps_the_rest():
    metrics = {
        "rendered": 8, "seconds_total": 3.2, "images_per_second": 2.5, "max_seconds": 60,
        "per_process": [{"process": 0, "load_seconds": 0.1, "batches": 4}, {"process": 1, "batches": 4}],
        "usage": {"api_calls": 3, "latency_s": {"mean": 0.2}},
        "phases": {"vae": {"steps": 10, "seconds": 1.0}},
    }
    results, timing = split_timing(metrics)
    assert results == {"rendered": 8, "max_seconds": 60,
                       "per_process": [{"process": 0, "batches": 4}, {"process": 1, "batches": 4}],
                       "usage": {"api_calls": 3}, "phases": {"vae": {"steps": 10}}}
    assert timing == {"seconds_total": 3.2, "images_per_second": 2.5,
                      "per_process": [{"load_seconds": 0.1}, {}],
                      "usage": {"latency_s": {"mean": 0.2}}, "phases": {"vae": {"seconds": 1.0}}}
    assert not is_timing_key("max_seconds") and is_timing_key("steps_per_second")


def test_write_metrics_writes_results_and_timing_to_separate_files(tmp_path):
    timing = write_metrics({"kept": 3, "seconds": 1.5}, tmp_path / "m.json", "filter", directory=tmp_path / "timing")
    assert json.loads((tmp_path / "m.json").read_text()) == {"kept": 3}
    assert json.loads((tmp_path / "timing" / "filter.json").read_text()) == {"seconds": 1.5} == timing


# ---------------------------------------------------------------------------------------------
# adapt: steps decide the model


def test_demo_config_refuses_the_removed_time_caps():
    with pytest.raises(KeyError, match="vae_max_seconds.*steps"):
        DemoTrainConfig.from_params({"vae_steps": 10, "vae_max_seconds": 60})


def test_a_wall_clock_limit_fails_the_phase_instead_of_training_less(monkeypatch):
    clock = iter(float(t) for t in range(0, 10_000, 7))  # 7 s per call of perf_counter
    monkeypatch.setattr(train_mod.time, "perf_counter", lambda: next(clock))
    deadline = train_mod._Deadline(20.0, "adapt lora", steps=100, key="adapt.lora.max_seconds")
    deadline.check(0)
    deadline.check(1)
    with pytest.raises(PhaseTimeout, match=r"adapt lora: 2 of 100 steps.*adapt\.lora\.max_seconds = 20 s"):
        deadline.check(2)
    # no limit: never raises, however long it takes
    unlimited = train_mod._Deadline(0, "adapt vae", steps=100, key="")
    for step in range(5):
        unlimited.check(step)


def _adapt_workdir(tmp_path: Path) -> Path:
    files = _images(tmp_path, 6)
    rows = [{"image_id": "demo", "event_name": f"e{i}", "image_path": f, **_labels(i), "split": "train",
             "source": "real", "provenance": "demo", "file": f} for i, f in enumerate(files)]
    pd.DataFrame(rows).to_csv(tmp_path / "train.tsv", sep="\t", index=False)
    tiny = {k: list(v) if isinstance(v, tuple) else v for k, v in TEST_TINY.to_dict().items()}
    params = {"adapt": {"mode": "demo", "train_manifest": "train.tsv", "balance": "disaster_types", "seed": 0,
                        "threads": 1, "demo": {**section("adapt.demo", vae_steps=30, vae_batch=2, unet_steps=30,
                                                                 unet_batch=2, warmup_steps=3), "tiny": tiny}}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    return tmp_path


def _run_adapt(workdir: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "adapt.py")], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hashes = {f"models/diffusion/{k}": v for k, v in tree_hashes(workdir / "models" / "diffusion").items()}
    for out in ("metrics/adapt.json", "plots/adapt_loss.png"):
        hashes[out] = hashlib.sha256((workdir / out).read_bytes()).hexdigest()
    return hashes


@pytest.mark.slow
def test_adapt_stage_writes_identical_outputs_on_an_idle_and_a_loaded_machine(tmp_path):
    workdir = _adapt_workdir(tmp_path)
    quiet = _run_adapt(workdir)
    timing_quiet = json.loads((workdir / "timing" / "adapt.json").read_text())
    with cpu_burners(2):
        loaded = _run_adapt(workdir)
    assert any(k.endswith(".safetensors") for k in quiet)
    assert loaded == quiet
    metrics = json.loads((workdir / "metrics" / "adapt.json").read_text())
    assert metrics["phases"]["vae"]["steps"] == 30 and metrics["phases"]["unet"]["steps"] == 30
    assert not split_timing(metrics)[1], "wall-clock figures must not be in metrics/adapt.json"
    assert timing_quiet["phases"]["unet"]["seconds"] > 0 and "seconds_wall" in timing_quiet


# ---------------------------------------------------------------------------------------------
# generate: per-image seeds, the same images under load and with other writer threads


@pytest.mark.slow
def test_generate_writes_identical_images_under_load_and_other_writer_threads(tmp_path):
    model_dir = tmp_path / "model" / "demo"
    save_pipeline(build_pipeline(TEST_TINY, seed=0), model_dir, {"prompt_source": "labels"})
    rows = [{"id": f"p{i:04d}", "seed": 1000 + i, **_labels(i), "caption": f"a photo {i}", "negative_prompt": "",
             "backend": "template", "mode": "hypothetical", "grounded_on": "", "provenance": "test"}
            for i in range(6)]
    pd.DataFrame(rows).to_csv(tmp_path / "captions.tsv", sep="\t", index=False)
    # batch_size and threads are tracked params: they change CPU float summation order and so
    # may move a pixel by one grey level (see test_diffusion.test_batch_equals_single); load and
    # the JPEG writer pool must change nothing.
    base = dict(model="demo", steps=3, guidance=5.0, batch_size=2, device="cpu", threads=1)

    def run(name: str, writer_threads: int) -> tuple[dict, dict]:
        opts = GenerateOptions.from_params(section("generate", **base, writer_threads=writer_threads))
        metrics = generate_plan(tmp_path / "captions.tsv", tmp_path / name, tmp_path / f"{name}.tsv", opts,
                                demo_dir=model_dir, progress=False)
        manifest = (tmp_path / f"{name}.tsv").read_text().replace(name, "IMAGES")
        return {**tree_hashes(tmp_path / name), "manifest": hashlib.sha256(manifest.encode()).hexdigest()}, metrics

    quiet, m_quiet = run("quiet", writer_threads=1)
    with cpu_burners(2):
        loaded, m_loaded = run("loaded", writer_threads=4)
    assert len(quiet) == 7 and loaded == quiet
    # the metrics file (wall-clock figures moved out) differs only in the option we changed
    (r_quiet, t_quiet), (r_loaded, _) = split_timing(m_quiet), split_timing(m_loaded)
    assert r_quiet["options"].pop("writer_threads") == 1 and r_loaded["options"].pop("writer_threads") == 4
    assert r_loaded == r_quiet and r_quiet["rendered"] == 6
    assert t_quiet["seconds_total"] > 0


# ---------------------------------------------------------------------------------------------
# the pipeline: two runs, the second on a loaded machine, give the same dvc.lock hashes


def _lock_hashes(repo: Path) -> dict[str, str]:
    import yaml

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {f"{stage}:{out['path']}": out["md5"] for stage, spec in lock["stages"].items()
            for out in spec.get("outs", []) if out["path"].startswith(("data/", "models/"))}


@pytest.mark.e2e
def test_pipeline_outputs_have_the_same_hashes_on_an_idle_and_a_loaded_machine(tiny_pipeline, tmp_path):
    from tests.e2e_helpers import make_repo_copy, run

    # Every stage up to filter (prepare, relabel, train/evaluate original, allocate, caption,
    # adapt, generate, filter) on the tiny config, in a fresh copy (no run-cache) under two CPU
    # burners, against the session's pipeline run (the suite runs one test at a time: idle).
    second = make_repo_copy(tmp_path / "b")
    with cpu_burners(2):
        out = run(["dvc", "repro", "filter"], second).stdout
    # Only the stages this run executed: the copy's dvc.lock still holds the committed full-size
    # hashes of every other stage.
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert {"adapt", "generate", "filter"} <= ran
    b = {k: v for k, v in _lock_hashes(second).items() if k.split(":")[0] in ran}
    a = {k: v for k, v in _lock_hashes(tiny_pipeline).items() if k.split(":")[0] in ran}
    assert any(k.startswith("adapt:") for k in a) and any(k.startswith("generate:") for k in a)
    assert a == b, {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}


def test_relabel_fold_cache_misses_when_an_image_is_re_rendered_under_the_same_path(tmp_path):
    # The fold cache used to key on paths and labels only: after a change of the demo renderer,
    # relabel silently reused out-of-fold probabilities of the old images.
    import numpy as np

    from medicsynth.params import load_params
    from medicsynth.relabel import _fold_key, fold_model_config

    files = np.asarray(_images(tmp_path, 3))
    config = fold_model_config(load_params(Path(__file__).resolve().parents[1] / "params.yaml")["relabel"]["model"])
    labels, hold = np.zeros((3, 4), dtype=np.int64), np.array([0])
    before = _fold_key(files, labels, hold, config)
    assert _fold_key(files, labels, hold, config) == before
    Path(files[1]).write_bytes(Path(files[2]).read_bytes())
    assert _fold_key(files, labels, hold, config) != before
