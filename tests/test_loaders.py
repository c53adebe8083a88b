"""Loaders: pixels against a PIL reference, label alignment, epoch coverage and determinism.

All on CPU with tiny JPEGs. Tolerances are in 0-255 grey levels after undoing the ImageNet
normalisation:

- torch backend: it runs PIL's own decoder and BILINEAR resize, so it must match the reference
  to float rounding (1e-2 levels).
- DALI backend: a different JPEG decoder build (nvImageCodec / libjpeg-turbo) and DALI's own
  antialiased linear resampling; on these images it differs from PIL by at most 1 level, mean
  about 0.2. We allow max 2, mean 0.5: a wrong crop offset, flip, channel order, interpolation
  mode or normalisation moves pixels by tens of levels and still fails.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from medicsynth import loaders
from medicsynth.labels import NUM_CLASSES, TASKS
from medicsynth.loaders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoaderError,
    epoch_plan,
    make_loader,
)

HAVE_DALI = loaders.dali_available()
BACKENDS = [
    pytest.param("dali", marks=pytest.mark.skipif(not HAVE_DALI, reason="DALI not installed")),
    "torch",
]
# (max, mean) absolute error in grey levels, see the module docstring.
TOLERANCE = {"torch": (1e-2, 1e-3), "dali": (2.0, 0.5)}

RESIZE, CROP = 33, 24  # odd margin: exercises the centre-crop rounding convention
N_IMAGES, BATCH = 7, 3  # 3 + 3 + 1: a partial last batch


def _smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    # Upsampled noise: structure at every crop position but no detail finer than a JPEG block,
    # so decoder differences stay small and a one-pixel crop shift is still visible.
    low = rng.integers(0, 256, (max(2, height // 6), max(2, width // 6), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Seven distinct JPEGs (down- and upscaled, greyscale, EXIF-rotated) and unique labels."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    files = []
    sizes = [(37, 53), (60, 45), (20, 30), (48, 64), (33, 33), (90, 41), (26, 70)]
    for i, (h, w) in enumerate(sizes):
        img = Image.fromarray(_smooth_image(rng, h, w))
        path = root / f"img_{i}.jpg"
        if i == 2:
            img = img.convert("L")  # a greyscale JPEG must come out as 3 equal channels
        if i == 3:
            exif = Image.Exif()
            exif[0x0112] = 6  # EXIF orientation: rotate 90° clockwise to display
            img.save(path, quality=95, exif=exif)
        else:
            img.save(path, quality=95)
        files.append(str(path))
    # disaster_types (7 classes) is the sample number, so label order proves sample order.
    i = np.arange(N_IMAGES)
    labels = np.stack([i % 3, i % 2, i % 4, i], axis=1).astype(np.int64)
    return files, labels


def _reference(path: str, top: int, left: int, flip: bool) -> np.ndarray:
    """PIL decode (EXIF applied) + BILINEAR resize + crop + flip + ImageNet normalisation, CHW."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
    img = img.resize((RESIZE, RESIZE), Image.BILINEAR).crop((left, top, left + CROP, top + CROP))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(img, dtype=np.float32) / 255.0
    array = (array - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return array.transpose(2, 0, 1)


def _references(files, plan) -> np.ndarray:
    return np.stack([
        _reference(files[i], t, left, f)
        for i, t, left, f in zip(plan.order, plan.top, plan.left, plan.flip)
    ])


def _grey_level_error(images: torch.Tensor, reference: np.ndarray) -> np.ndarray:
    std = np.array(IMAGENET_STD, np.float32)[None, :, None, None]
    return np.abs(images.numpy() - reference) * std * 255.0


def _epoch(loader):
    batches = list(loader)
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    return batches, images, labels


def _loader(dataset, backend, *, train, seed=0, **kwargs):
    files, labels = dataset
    kwargs.setdefault("num_workers", 0 if backend == "torch" else 2)
    return make_loader(files, labels, batch_size=BATCH, resize=RESIZE, crop=CROP, train=train,
                       seed=seed, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_matches_pil_reference_in_input_order(dataset, backend):
    files, labels = dataset
    loader = _loader(dataset, backend, train=False)
    assert loader.backend == backend
    assert len(loader) == 3
    batches, images, got_labels = _epoch(loader)

    assert [tuple(b[0].shape) for b in batches] == [(3, 3, CROP, CROP)] * 2 + [(1, 3, CROP, CROP)]
    assert all(b[0].dtype == torch.float32 and b[1].dtype == torch.int64 for b in batches)
    assert all(b[1].shape == (len(b[0]), 4) for b in batches)
    np.testing.assert_array_equal(got_labels.numpy(), labels)  # every sample once, in order

    plan = epoch_plan(N_IMAGES, resize=RESIZE, crop=CROP, train=False, seed=0, epoch=0)
    assert plan.top[0] == plan.left[0] == (RESIZE - CROP) // 2
    error = _grey_level_error(images, _references(files, plan))
    max_err, mean_err = TOLERANCE[backend]
    assert error.max() <= max_err, f"max error {error.max():.3f} grey levels"
    assert error.mean() <= mean_err, f"mean error {error.mean():.3f} grey levels"
    # The greyscale JPEG comes out with three equal channels.
    grey = images[2].numpy() * np.array(IMAGENET_STD, np.float32)[:, None, None]
    grey += np.array(IMAGENET_MEAN, np.float32)[:, None, None]
    assert np.abs(grey[0] - grey[1]).max() * 255 <= max_err + 1e-3

    # A second pass (set_epoch is irrelevant in evaluation) is identical.
    loader.set_epoch(5)
    _, again, again_labels = _epoch(loader)
    assert torch.equal(again, images) and torch.equal(again_labels, got_labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_applies_the_epoch_plan_and_is_deterministic(dataset, backend):
    files, labels = dataset
    seed, epoch = 3, 2
    plan = epoch_plan(N_IMAGES, resize=RESIZE, crop=CROP, train=True, seed=seed, epoch=epoch)
    # The check below is only meaningful if the plan shuffles, flips some and moves the crop.
    assert not np.array_equal(plan.order, np.arange(N_IMAGES))
    assert plan.flip.any() and not plan.flip.all()
    assert len(set(plan.top.tolist())) > 1 and len(set(plan.left.tolist())) > 1

    loader = _loader(dataset, backend, train=True, seed=seed)
    loader.set_epoch(epoch)
    batches, images, got_labels = _epoch(loader)
    assert [len(b[0]) for b in batches] == [3, 3, 1]  # partial last batch kept
    np.testing.assert_array_equal(got_labels.numpy(), labels[plan.order])
    error = _grey_level_error(images, _references(files, plan))
    max_err, mean_err = TOLERANCE[backend]
    assert error.max() <= max_err and error.mean() <= mean_err

    # Same seed and epoch in a fresh loader, after running another epoch first: identical.
    other = _loader(dataset, backend, train=True, seed=seed)
    other.set_epoch(0)
    _, images_0, labels_0 = _epoch(other)
    other.set_epoch(epoch)
    _, images_again, labels_again = _epoch(other)
    assert torch.equal(images_again, images) and torch.equal(labels_again, got_labels)

    # Another epoch reshuffles and re-augments; every sample still appears exactly once.
    assert not torch.equal(labels_0, got_labels)
    assert sorted(map(tuple, labels_0.tolist())) == sorted(map(tuple, labels.tolist()))


@pytest.mark.skipif(not HAVE_DALI, reason="DALI not installed")
def test_dali_and_torch_agree_on_a_training_epoch(dataset):
    dali = _loader(dataset, "dali", train=True, seed=11)
    torch_loader = _loader(dataset, "torch", train=True, seed=11)
    dali.set_epoch(4)
    torch_loader.set_epoch(4)
    _, dali_images, dali_labels = _epoch(dali)
    _, torch_images, torch_labels = _epoch(torch_loader)
    assert torch.equal(dali_labels, torch_labels)
    error = _grey_level_error(dali_images, torch_images.numpy())
    assert error.max() <= TOLERANCE["dali"][0] and error.mean() <= TOLERANCE["dali"][1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_abandoned_pass_does_not_leak_into_the_next(dataset, backend):
    files, labels = dataset
    loader = _loader(dataset, backend, train=True, seed=1)
    for _ in loader:
        break  # abandon epoch 0 with batches in flight
    loader.set_epoch(1)
    _, _, got = _epoch(loader)
    plan = epoch_plan(N_IMAGES, resize=RESIZE, crop=CROP, train=True, seed=1, epoch=1)
    np.testing.assert_array_equal(got.numpy(), labels[plan.order])


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_gives_same_values(dataset, backend):
    _, plain, _ = _epoch(_loader(dataset, backend, train=False))
    _, cl, _ = _epoch(_loader(dataset, backend, train=False, channels_last=True))
    assert cl.shape == plain.shape
    assert torch.equal(cl.contiguous(), plain)
    first = next(iter(_loader(dataset, backend, train=False, channels_last=True)))[0]
    assert first.is_contiguous(memory_format=torch.channels_last)


def test_torch_workers_do_not_change_the_data(dataset):
    # Augmentation comes from the plan, not from worker RNGs, so the worker count is irrelevant;
    # persistent workers must see the new plan after set_epoch.
    single = _loader(dataset, "torch", train=True, seed=2, num_workers=0)
    multi = _loader(dataset, "torch", train=True, seed=2, num_workers=2)
    for epoch in (0, 1):
        single.set_epoch(epoch)
        multi.set_epoch(epoch)
        _, a_images, a_labels = _epoch(single)
        _, b_images, b_labels = _epoch(multi)
        assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)


def test_auto_backend_prefers_dali_when_importable(dataset, monkeypatch):
    files, labels = dataset
    kwargs = dict(batch_size=2, resize=RESIZE, crop=CROP, train=False, seed=0, num_workers=0)
    expected = "dali" if HAVE_DALI else "torch"
    assert make_loader(files, labels, backend="auto", **kwargs).backend == expected

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    assert not loaders.dali_available()
    assert make_loader(files, labels, backend="auto", **kwargs).backend == "torch"
    with pytest.raises(ImportError, match="nvidia-dali"):
        make_loader(files, labels, backend="dali", **kwargs)


def test_bad_arguments_are_named(dataset, tmp_path):
    files, labels = dataset
    kwargs = dict(batch_size=2, resize=RESIZE, crop=CROP, train=False, seed=0, backend="torch")
    bad = labels.copy()
    bad[4, 2] = NUM_CLASSES["humanitarian"]
    with pytest.raises(ValueError, match=r"sample 4 .*img_4\.jpg.*humanitarian label index 4"):
        make_loader(files, bad, **kwargs)
    with pytest.raises(ValueError, match=r"shape \(7, 4\)"):
        make_loader(files, labels[:, :3], **kwargs)
    with pytest.raises(ValueError, match="integer"):
        make_loader(files, labels.astype(float), **kwargs)
    missing = files[:2] + [str(tmp_path / "gone.jpg")]
    with pytest.raises(FileNotFoundError, match=r"sample 2: .*gone\.jpg"):
        make_loader(missing, labels[:3], **kwargs)
    with pytest.raises(ValueError, match="crop <= resize"):
        make_loader(files, labels, **{**kwargs, "crop": RESIZE + 1})
    with pytest.raises(ValueError, match="backend"):
        make_loader(files, labels, **{**kwargs, "backend": "opencv"})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["truncated", "gif"])
def test_undecodable_image_is_named(dataset, backend, kind, tmp_path):
    files, labels = dataset
    bad = tmp_path / f"{kind}.jpg"
    if kind == "truncated":
        data = open(files[0], "rb").read()
        bad.write_bytes(data[: len(data) // 3])
    else:
        Image.open(files[0]).save(bad, format="GIF")  # MEDIC has GIFs named .jpg
    loader = make_loader(files[:4] + [str(bad)], labels[:5], batch_size=2, resize=RESIZE,
                         crop=CROP, train=False, seed=0, backend=backend, num_workers=0)
    if backend == "torch" and kind == "gif":
        assert sum(len(y) for _, y in loader) == 5  # PIL reads GIFs; only DALI cannot
        return
    with pytest.raises(LoaderError, match=rf"{kind}\.jpg"):
        list(loader)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_batch_larger_than_dataset_without_crop_margin(dataset, backend):
    files, labels = dataset
    loader = make_loader(files[:2], labels[:2], batch_size=8, resize=CROP, crop=CROP, train=True,
                         seed=0, backend=backend, num_workers=0)
    assert len(loader) == 1
    (images, got), = list(loader)
    assert images.shape == (2, 3, CROP, CROP)
    plan = epoch_plan(2, resize=CROP, crop=CROP, train=True, seed=0, epoch=0)
    np.testing.assert_array_equal(got.numpy(), labels[:2][plan.order])


# ------------------------------------------------------------------------ classic augmentation


@pytest.mark.parametrize("augment", ["randaugment", "trivialaugment"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_classic_augmentation_is_seeded_and_training_only(dataset, backend, augment):
    files, labels = dataset

    def epoch(seed, epoch_no=1, train=True, policy=augment):
        loader = _loader(dataset, backend, train=train, seed=seed, augment=policy)
        loader.set_epoch(epoch_no)
        _, images, got = _epoch(loader)
        return images, got

    plain, plain_labels = epoch(5, policy="none")
    once, once_labels = epoch(5)
    assert torch.equal(once, epoch(5)[0])  # same seed and epoch: the same augmented pixels
    np.testing.assert_array_equal(once_labels.numpy(), plain_labels.numpy())  # order unchanged
    assert once.shape == plain.shape
    # The policy changes pixels: on at least one image by more than JPEG/resampling noise.
    changed = _grey_level_error(once, plain.numpy()).reshape(N_IMAGES, -1).max(axis=1)
    assert (changed > 10).any(), changed
    # Evaluation is never augmented.
    assert torch.equal(epoch(5, train=False)[0], epoch(5, train=False, policy="none")[0])


def test_torch_augmentation_leaves_the_global_rng_alone(dataset):
    # Under num_workers=0 the policy runs in the training process: it must not consume the
    # global torch RNG that dropout and weight init draw from.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _epoch(_loader(dataset, "torch", train=True, augment="trivialaugment", num_workers=0))
    assert torch.equal(torch.rand(3), expected)


def test_unknown_augmentation_names_the_param(dataset):
    with pytest.raises(ValueError, match="train.augment"):
        _loader(dataset, "torch", train=True, augment="autoaugment")
