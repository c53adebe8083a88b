"""Data-parallel training: loader shards, and the train stage run as 2 Gloo processes on CPU.

The loader tests use tiny JPEGs whose four labels identify the image, so the labels a pass
returns tell which samples it read and in which order. The end-to-end test launches this file
under ``torch.distributed.run`` (see :func:`_worker`): each rank runs the real
``stages/train.py`` with the data loaders, DVCLive and ``train_classifier`` wrapped to record
what they did, and the test checks those records and the files the stage wrote.

The launcher is ``python -m torch.distributed.run --standalone`` (torchrun): on CPU,
``accelerate launch --cpu --num_processes 2`` starts a single process (accelerate's multi-CPU
mode wants MPI), so it would not test anything distributed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medicsynth import loaders
from medicsynth.loaders import epoch_plan, make_loader, shard_plan
from medicsynth.params import load_params

REPO = Path(__file__).resolve().parents[1]
HAVE_DALI = loaders.dali_available()
BACKENDS = [
    pytest.param("dali", marks=pytest.mark.skipif(not HAVE_DALI, reason="DALI not installed")),
    "torch",
]
RESIZE, CROP, BATCH = 20, 16, 2
N_IMAGES = 11  # not a multiple of 2 or 3: training shards must drop a remainder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard_images")
    rng = np.random.default_rng(0)
    files = []
    for i in range(N_IMAGES):
        low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        path = root / f"img_{i}.jpg"
        Image.fromarray(low).resize((24, 24), Image.BICUBIC).save(path, quality=95)
        files.append(str(path))
    # (i % 3, i % 2, i % 4, i % 7) is unique for i < 84: a label row names its image.
    i = np.arange(N_IMAGES)
    labels = np.stack([i % 3, i % 2, i % 4, i % 7], axis=1).astype(np.int64)
    return files, labels


def _indices(label_rows: torch.Tensor, labels: np.ndarray) -> list[int]:
    lookup = {tuple(row): k for k, row in enumerate(labels.tolist())}
    return [lookup[tuple(row)] for row in label_rows.tolist()]


def _pass(loader) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    batches = list(loader)
    assert len(batches) == len(loader)
    return ([len(b[1]) for b in batches], torch.cat([b[0] for b in batches]),
            torch.cat([b[1] for b in batches]))


def _loader(dataset, backend, **kwargs):
    files, labels = dataset
    kwargs.setdefault("num_workers", 0 if backend == "torch" else 1)
    return make_loader(files, labels, batch_size=BATCH, resize=RESIZE, crop=CROP, seed=5,
                       backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_shard_is_the_single_process_epoch(dataset, backend):
    files, labels = dataset
    plain = _loader(dataset, backend, train=True)
    one = _loader(dataset, backend, train=True, shard=(0, 1))
    plain.set_epoch(3)
    one.set_epoch(3)
    sizes, images, got = _pass(plain)
    # Unchanged single-process contract: the whole plan in order, partial last batch kept.
    assert sizes == [2, 2, 2, 2, 2, 1]
    plan = epoch_plan(N_IMAGES, resize=RESIZE, crop=CROP, train=True, seed=5, epoch=3)
    np.testing.assert_array_equal(got.numpy(), labels[plan.order])
    one_sizes, one_images, one_got = _pass(one)
    assert one_sizes == sizes and torch.equal(one_images, images) and torch.equal(one_got, got)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 3])
def test_train_shards_are_disjoint_equal_and_cover_the_epoch(dataset, backend, world):
    files, labels = dataset
    epoch = 2
    full = _loader(dataset, backend, train=True)
    full.set_epoch(epoch)
    _, full_images, _ = _pass(full)
    plan = epoch_plan(N_IMAGES, resize=RESIZE, crop=CROP, train=True, seed=5, epoch=epoch)
    keep = N_IMAGES - N_IMAGES % world

    shards = []
    for rank in range(world):
        loader = _loader(dataset, backend, train=True, shard=(rank, world))
        loader.set_epoch(epoch)
        sizes, images, got = _pass(loader)
        index = _indices(got, labels)
        # Rank r reads plan positions r, r + w, ... with the crop and flip of those positions.
        assert index == plan.order[rank:keep:world].tolist()
        assert torch.equal(images, full_images[rank:keep:world])
        shards.append((sizes, index))

    # Same steps and batch sizes on every rank (DDP needs equal step counts).
    assert all(sizes == shards[0][0] for sizes, _ in shards)
    assert sum(shards[0][0]) == N_IMAGES // world
    # Disjoint, and together the epoch minus the last n mod w positions of the permutation.
    union = [i for _, index in shards for i in index]
    assert len(union) == len(set(union)) == keep
    assert set(union) == set(plan.order[:keep].tolist())
    assert set(range(N_IMAGES)) - set(union) == set(plan.order[keep:].tolist())
    # Global step s covers the positions a single process with batch w * BATCH reads at step s.
    for step in range(len(shards[0][0])):
        step_items = {i for _, index in shards for i in index[step * BATCH:(step + 1) * BATCH]}
        wide = world * BATCH
        assert step_items == set(plan.order[step * wide:min((step + 1) * wide, keep)].tolist())


def test_dropped_samples_change_every_epoch(dataset):
    kept_out = set()
    for epoch in range(6):
        plan = epoch_plan(N_IMAGES, resize=RESIZE, crop=CROP, train=True, seed=5, epoch=epoch)
        shards = [shard_plan(plan, r, 3, train=True) for r in range(3)]
        used = {i for s in shards for i in s.order.tolist()}
        kept_out |= set(range(N_IMAGES)) - used
    assert len(kept_out) > 2  # not always the same two images


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_shards_hold_every_sample_once(dataset, backend):
    files, labels = dataset
    _, full_images, _ = _pass(_loader(dataset, backend, train=False))
    seen = []
    for rank in range(3):
        loader = _loader(dataset, backend, train=False, shard=(rank, 3))
        sizes, images, got = _pass(loader)
        assert _indices(got, labels) == list(range(rank, N_IMAGES, 3))
        assert torch.equal(images, full_images[rank::3])
        seen += _indices(got, labels)
    assert sorted(seen) == list(range(N_IMAGES))  # sizes 4, 4, 3: nothing dropped


def test_bad_shards_are_refused(dataset):
    with pytest.raises(ValueError, match="rank < world"):
        _loader(dataset, "torch", train=True, shard=(2, 2))
    with pytest.raises(ValueError, match="rank < world"):
        _loader(dataset, "torch", train=True, shard=(0, 0))
    with pytest.raises(ValueError, match=r"11 training images over 12 processes"):
        _loader(dataset, "torch", train=True, shard=(0, 12))


# ------------------------------------------------------------------------ two-process stage run

TINY_TRAIN = {"archs": ["small_cnn"], "epochs": 2, "batch_size": 16, "resize": 32, "crop": 28,
              "patience": 2, "loader": "torch", "num_workers": 0, "device": "cpu", "seeds": [0],
              "lr": 0.003}


def _worker(record_dir: str) -> None:
    """One rank: run ``stages/train.py`` in the current directory, recording what happened."""
    import runpy

    import dvclive

    from medicsynth import training

    rank = int(os.environ["RANK"])
    record: dict = {"rank": rank, "train_plans": {}, "shards": [], "live_dirs": []}

    real_make_loader = training.make_loader

    def recording_make_loader(files, labels, **kwargs):
        loader = real_make_loader(files, labels, **kwargs)
        record["shards"].append([kwargs["train"], kwargs.get("shard")])
        if kwargs["train"]:
            real_plan = loader.plan

            def plan():
                p = real_plan()
                record["train_plans"][loader.epoch] = [files[i] for i in p.order.tolist()]
                return p

            loader.plan = plan
        return loader

    class RecordingLive(dvclive.Live):
        def __init__(self, *args, **kwargs):
            record["live_dirs"].append(kwargs.get("dir"))
            super().__init__(*args, **kwargs)

    real_train = training.train_classifier

    def recording_train(*args, **kwargs):
        result = real_train(*args, **kwargs)
        state = result.model.state_dict()
        record["history"] = result.history
        record["world_size"] = result.world_size
        record["state_sha"] = hashlib.sha256(
            b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()
        record["group_left_initialised"] = torch.distributed.is_initialized()
        return result

    training.make_loader = recording_make_loader
    training.train_classifier = recording_train
    dvclive.Live = RecordingLive  # the stage imports Live when runpy executes it
    sys.argv = ["stages/train.py", "--variant", "tiny", "--arch", "small_cnn", "--seed", "0"]
    runpy.run_path(str(REPO / "stages" / "train.py"), run_name="__main__")
    Path(record_dir, f"rank{rank}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    from medicsynth.demo_data import DemoConfig, generate_demo
    from medicsynth.manifest import write_manifest

    work = tmp_path_factory.mktemp("ddp_repo")
    demo = generate_demo(DemoConfig(n_train=75, n_dev=23, n_test=4, image_size=32, seed=0),
                         work / "images", progress=False)
    for split in ("train", "dev"):
        write_manifest(demo[split], work / "data/variants/tiny" / f"{split}.tsv")
    # The repository's train section (every key; params.yaml is the one source of defaults), sized down.
    train = {**load_params(REPO / "params.yaml")["train"], **TINY_TRAIN}
    (work / "params.yaml").write_text(json.dumps({"train": train}))  # JSON is YAML
    records = work / "records"
    records.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               DVC_NO_ANALYTICS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), "--worker", str(records)]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    ranks = [json.loads((records / f"rank{r}.json").read_text()) for r in range(2)]
    return work, demo, ranks, proc


@pytest.mark.e2e
def test_two_processes_write_one_model_and_one_summary(two_process_run):
    work, demo, ranks, _ = two_process_run
    assert sorted(p.name for p in (work / "models").iterdir()) == ["tiny-small_cnn-s0"]
    assert sorted(p.name for p in (work / "models/tiny-small_cnn-s0").iterdir()) == ["model.pt"]
    assert sorted(p.name for p in (work / "metrics/train").iterdir()) == [
        "tiny-small_cnn-s0", "tiny-small_cnn-s0.json"]
    # Only rank 0 opened DVCLive; its log has one row per epoch, not one per rank.
    assert ranks[0]["live_dirs"] == ["metrics/train/tiny-small_cnn-s0"]
    assert ranks[1]["live_dirs"] == []
    summary = json.loads((work / "metrics/train/tiny-small_cnn-s0.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 32
    assert summary["lr"] == TINY_TRAIN["lr"]  # scale_lr_with_world_size is off by default
    assert summary["epochs_run"] == len(ranks[0]["history"])
    logged = (work / "metrics/train/tiny-small_cnn-s0/plots/metrics/train_loss.tsv").read_text()
    assert len(logged.strip().splitlines()) == 1 + summary["epochs_run"]  # header + epochs
    assert all(not r["group_left_initialised"] for r in ranks)  # process group destroyed


@pytest.mark.e2e
def test_ranks_train_disjoint_shards_of_every_epoch(two_process_run):
    work, demo, ranks, _ = two_process_run
    train_files = demo["train"]["file"].tolist()
    assert ranks[0]["shards"] == [[True, [0, 2]], [False, [0, 2]]]
    assert ranks[1]["shards"] == [[True, [1, 2]], [False, [1, 2]]]
    epochs = ranks[0]["train_plans"].keys()
    assert list(epochs) == [str(e) for e in range(len(ranks[0]["history"]))]
    for epoch in epochs:
        a, b = ranks[0]["train_plans"][epoch], ranks[1]["train_plans"][epoch]
        assert len(a) == len(b) == 37  # 75 // 2: one image sits this epoch out
        assert not set(a) & set(b)
        plan = epoch_plan(75, resize=32, crop=28, train=True, seed=0, epoch=int(epoch))
        assert set(a) | set(b) == {train_files[i] for i in plan.order[:74]}


@pytest.mark.e2e
def test_ranks_stay_in_sync_and_saved_model_loads(two_process_run):
    from medicsynth.manifest import label_matrix
    from medicsynth.models import load_classifier
    from medicsynth.training import mean_macro_f1, predict_files

    work, demo, ranks, _ = two_process_run
    # DDP kept the weights (and, after the buffer sync, BatchNorm statistics) identical, and every
    # rank took the same early-stopping path from the same gathered dev predictions.
    assert ranks[0]["state_sha"] == ranks[1]["state_sha"]
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2

    model, meta = load_classifier(work / "models/tiny-small_cnn-s0")
    assert meta["config"]["scale_lr_with_world_size"] is False
    dev_files = demo["dev"]["file"].tolist()
    probs = predict_files(model, meta, dev_files, device="cpu", loader="torch", num_workers=0)
    for p in probs.values():
        assert p.shape[0] == len(dev_files)
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    # The dev score logged for the best epoch came from the sharded, all-gathered predictions;
    # a single process scoring the saved model on the whole dev set must find the same value.
    summary = json.loads((work / "metrics/train/tiny-small_cnn-s0.json").read_text())
    assert mean_macro_f1(label_matrix(demo["dev"]), probs) == pytest.approx(
        summary["best_dev_mean_macro_f1"], abs=1e-9)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit("usage: torchrun ... tests/test_distributed_train.py --worker RECORD_DIR")
