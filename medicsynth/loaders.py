"""Image loaders for training and evaluation: NVIDIA DALI or a torchvision ``DataLoader``.

Both backends implement the same transform, so a model trained with one can be evaluated with the
other:

- resize to ``(resize, resize)`` with bilinear interpolation, antialiased when downscaling
  (PIL's ``BILINEAR``; DALI's ``INTERP_LINEAR`` with ``antialias=True``);
- crop ``crop x crop``: a random window in training, the centre window
  (offset ``(resize - crop) // 2``) in evaluation;
- horizontal flip with probability 1/2 in training;
- ImageNet mean/std normalisation, float32 NCHW output.

Classic augmentation (``augment="randaugment"`` or ``"trivialaugment"``, training only) adds one
automatic-augmentation policy between the resize and the crop: DALI's ``nvidia.dali.auto_aug``
(``rand_augment`` / ``trivial_augment_wide``; conditionals on, CPU or GPU) on the DALI path and
``torchvision.transforms.v2`` (``RandAugment`` / ``TrivialAugmentWide``) on the torch path. The
two libraries implement the same published policies (RandAugment: Cubuk et al. 2020, N=2, M=9;
TrivialAugment: Müller & Hutter 2021) but not bit-identical operations or random streams, so a
model trained with classic augmentation reproduces per backend, not across backends. On the
torch path each sample's policy draw is seeded from the epoch plan (``aug_seed``), so it does
not depend on workers or on epochs run before; DALI draws from the pipeline seed.

Images are decoded to RGB after applying the EXIF orientation, in both backends.

Randomness does not come from the backends' generators. :func:`epoch_plan` draws the sample
order, the crop offsets and the flips of a whole epoch from ``(seed, epoch)`` with NumPy, and both
backends apply that plan. So an epoch is reproducible whatever the backend, the number of
workers, or the epochs run before it (a resumed run sees the same augmentations), and the two
backends agree up to decoder and resampling differences.

Data-parallel training (one process per GPU) shards every epoch with :func:`shard_plan`: all ranks
compute the same plan from ``(seed, epoch)`` and rank ``r`` of ``w`` reads plan positions
``r, r + w, r + 2w, ...``. Each sample keeps the crop and flip of its plan position, so the
union of the shards is the single-process epoch, and global step ``s`` (``w`` local batches of
``b``) covers exactly the positions a single process with batch ``w * b`` would read at step
``s``.

DALI design. The pipeline is ``external_source`` (per batch: encoded file paths, the four labels,
crop positions, flips) -> ``fn.io.file.read`` -> ``fn.decoders.image`` (``mixed`` on CUDA,
``cpu`` otherwise) -> ``fn.resize`` -> ``fn.crop_mirror_normalize``. The Python callback only
slices precomputed arrays (no file I/O, no decoding), so it costs microseconds per batch; file
reads run on DALI's C++ thread pool, as in ``fn.readers.file``, and decoding on the GPU. That
keeps the loader on DALI's reader path while giving what the reader cannot: an exact
permutation per ``(seed, epoch)``, a partial last batch without padding or wrap-around, and four
labels per sample carried next to the image (no packed integers). ``fn.readers.file`` shuffles
with a buffer seeded once per pipeline, so jumping to epoch *k* would need a rebuild per epoch,
and its partial-batch handling pads or reads into the next epoch.

Shards. A ``file`` may name a member of a WebDataset tar shard (``<shard>.tar#<member>``,
``storage.layout: shards``). The torch path reads it by offset (:func:`medicsynth.shards.open_image`).
The DALI path keeps the same ``external_source`` with its exact per-epoch plan, but for a
member it hands the pipeline the member's encoded bytes, read in the callback by offset (one
``pread`` of a few tens of KB from an index cached per shard), instead of a path for
``fn.io.file.read``. ``fn.readers.webdataset`` is not used for training: like
``fn.readers.file`` it streams each shard in stored order through a seeded shuffle buffer, so it
cannot give the exact permutation of :func:`epoch_plan` (a random order over all samples, the
same on every backend and after a resume) nor the four labels carried from the manifest. A
batch mixing files and members is read uniformly as bytes.
"""

from __future__ import annotations

import gc
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import ImageOps

from medicsynth.labels import NUM_CLASSES, TASKS
from medicsynth.manifest import split_ref
from medicsynth.shards import image_ref_exists, open_image, read_image_bytes

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

BACKENDS: tuple[str, ...] = ("auto", "dali", "torch")
#: Classic (automatic) augmentation policies applied by training loaders (``none`` = off).
AUGMENTS: tuple[str, ...] = ("none", "randaugment", "trivialaugment")


class LoaderError(RuntimeError):
    """Loading a batch failed; the message names the file(s) involved."""


def dali_available() -> bool:
    """True when NVIDIA DALI and its PyTorch plugin import."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch reads, position by position.

    ``order[p]`` is the index (into the loader's ``files``) of the ``p``-th sample of the epoch;
    ``top[p]``/``left[p]`` the crop offset in the resized image; ``flip[p]`` whether it is
    mirrored horizontally.
    """

    order: np.ndarray  # (n,) int64
    top: np.ndarray  # (n,) int64
    left: np.ndarray  # (n,) int64
    flip: np.ndarray  # (n,) bool
    aug_seed: np.ndarray | None = None  # (n,) int64 seeds of per-sample augmentation draws


def epoch_plan(n: int, *, resize: int, crop: int, train: bool, seed: int, epoch: int) -> EpochPlan:
    """The sample order and augmentation of one epoch, a pure function of its arguments.

    Evaluation (``train=False``): input order, centre crop at ``(resize - crop) // 2``, no flip.
    Training: a permutation, uniform integer crop offsets in ``[0, resize - crop]`` and fair
    coin flips, all drawn from ``numpy.random.default_rng([seed, epoch])``, then one
    augmentation seed per position (``aug_seed``, drawn last so the other fields do not depend
    on whether classic augmentation is used).
    """
    if not train:
        centre = (resize - crop) // 2
        return EpochPlan(
            order=np.arange(n, dtype=np.int64),
            top=np.full(n, centre, dtype=np.int64),
            left=np.full(n, centre, dtype=np.int64),
            flip=np.zeros(n, dtype=bool),
        )
    rng = np.random.default_rng([seed, epoch])
    return EpochPlan(
        order=rng.permutation(n).astype(np.int64),
        top=rng.integers(0, resize - crop + 1, size=n, dtype=np.int64),
        left=rng.integers(0, resize - crop + 1, size=n, dtype=np.int64),
        flip=rng.integers(0, 2, size=n).astype(bool),
        aug_seed=rng.integers(0, 2**31 - 1, size=n, dtype=np.int64),
    )


def shard_size(n: int, rank: int, world: int, *, train: bool) -> int:
    """Number of samples :func:`shard_plan` gives ``rank`` of ``world`` from an ``n``-sample plan."""
    if train:
        return n // world
    return len(range(rank, n, world))


def shard_plan(plan: EpochPlan, rank: int, world: int, *, train: bool) -> EpochPlan:
    """The positions of ``plan`` that process ``rank`` of ``world`` reads: ``r, r + w, ...``.

    Training drops the last ``n mod world`` positions of the epoch, so every rank gets exactly
    ``n // world`` samples: the same number of steps (DistributedDataParallel hangs when one rank
    runs a step more than the others) and the same local batch sizes, so DDP's average of the
    per-rank mean losses is exactly the mean over the global batch. Padding with repeated samples
    (``DistributedSampler``'s default) would instead count some images twice. The dropped
    positions are the tail of a fresh permutation, so at most ``world - 1`` images sit out an
    epoch and which ones changes every epoch. Evaluation drops nothing: the shards' sizes differ
    by at most one and together hold every sample exactly once.
    """
    if not 0 <= rank < world:
        raise ValueError(f"shard rank must be in [0, {world}), got rank={rank}, world={world}")
    n = len(plan.order)
    keep = (n // world) * world if train else n
    pos = slice(rank, keep, world)
    return EpochPlan(order=plan.order[pos], top=plan.top[pos], left=plan.left[pos],
                     flip=plan.flip[pos],
                     aug_seed=None if plan.aug_seed is None else plan.aug_seed[pos])


def _check_inputs(
    files: Sequence[str], labels: np.ndarray, batch_size: int, resize: int, crop: int
) -> tuple[list[str], np.ndarray]:
    if len(files) == 0:
        raise ValueError("no image files to load")
    labels = np.asarray(labels)
    if labels.shape != (len(files), len(TASKS)):
        raise ValueError(
            f"labels must have shape ({len(files)}, {len(TASKS)}) (one column per task in "
            f"{TASKS}), got {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    for j, task in enumerate(TASKS):
        bad = (labels[:, j] < 0) | (labels[:, j] >= NUM_CLASSES[task])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"sample {i} ({files[i]}): {task} label index {int(labels[i, j])} outside "
                f"[0, {NUM_CLASSES[task]})"
            )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 1 <= crop <= resize:
        raise ValueError(f"need 1 <= crop <= resize, got crop={crop}, resize={resize}")
    paths = [os.fspath(f) for f in files]
    for i, path in enumerate(paths):
        if not image_ref_exists(path):
            shard, member = split_ref(path)
            what = f"image file {path!r}" if member is None else f"shard member {member!r} of {shard!r}"
            raise FileNotFoundError(f"sample {i}: {what} does not exist")
    return paths, labels.astype(np.int64, copy=False)


class ImageLoader:
    """Batches of ``(images, labels)`` for one pass over ``files`` per ``for`` loop.

    ``images``: float32 ``(b, 3, crop, crop)`` normalised with ImageNet mean/std on ``device``
    (channels-last memory format when asked). ``labels``: int64 ``(b, 4)`` class indices in
    ``TASKS`` order on ``device``. The last batch of an epoch may be smaller than
    ``batch_size``. One iteration at a time: starting a new ``for`` loop abandons the previous
    one. With ``shard=(rank, world)`` a pass covers only that process's share of the epoch
    (:func:`shard_plan`). Build instances with :func:`make_loader`.
    """

    backend: str = ""

    def __init__(
        self,
        files: list[str],
        labels: np.ndarray,
        *,
        batch_size: int,
        resize: int,
        crop: int,
        train: bool,
        seed: int,
        device: torch.device,
        num_workers: int,
        channels_last: bool,
        shard: tuple[int, int] | None = None,
        augment: str = "none",
    ) -> None:
        self.files = files
        self.labels = labels
        self.batch_size = batch_size
        self.resize = resize
        self.crop = crop
        self.train = train
        self.seed = seed
        self.device = device
        self.num_workers = num_workers
        self.channels_last = channels_last
        self.shard = shard
        self.augment = augment if train else "none"
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        """Samples in one pass: all files, or this process's shard of them."""
        if self.shard is None:
            return len(self.files)
        rank, world = self.shard
        return shard_size(len(self.files), rank, world, train=self.train)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Use the order and augmentation of ``epoch`` for the next pass (training only)."""
        self.epoch = int(epoch)

    def plan(self) -> EpochPlan:
        """The plan of the current epoch (see :func:`epoch_plan`), restricted to the shard."""
        plan = epoch_plan(
            len(self.files),
            resize=self.resize,
            crop=self.crop,
            train=self.train,
            seed=self.seed,
            epoch=self.epoch,
        )
        if self.shard is not None:
            plan = shard_plan(plan, *self.shard, train=self.train)
        return plan

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


# --------------------------------------------------------------------------------------- DALI


class _DaliSource:
    """Per-batch callback of the DALI ``external_source``: slices the current epoch's plan.

    Runs in the main process (``parallel=False``): it does no I/O, so worker processes would only
    add pickling and shared-memory copies. It holds no reference to the loader, so dropping the
    loader frees the pipeline at once rather than at some later garbage collection (which could
    run inside a forked ``DataLoader`` worker and hang joining DALI threads that are not there).
    """

    def __init__(self, files: list[str], labels: np.ndarray, batch_size: int, span: int) -> None:
        # Shard members are read here, by offset, as encoded bytes (see the module doc); files
        # stay paths for io.file.read, encoded once as the 1-D uint8 arrays it wants.
        self.bytes_mode = any(split_ref(f)[1] is not None for f in files)
        self.files = list(files)
        self.paths = None if self.bytes_mode else [
            np.frombuffer(os.path.abspath(f).encode("utf-8"), dtype=np.uint8) for f in files]
        self.labels = labels
        self.batch_size = batch_size
        self.span = float(max(span, 1))
        self.plan: EpochPlan | None = None

    def __call__(self, info) -> tuple:
        start = info.iteration * self.batch_size
        if self.plan is None or start >= len(self.plan.order):
            raise StopIteration
        pos = slice(start, start + self.batch_size)
        idx = self.plan.order[pos]
        # crop_mirror_normalize puts the window at round(pos * (resize - crop)); passing
        # offset / (resize - crop) reproduces the plan's integer offset exactly.
        if self.bytes_mode:
            first = [np.frombuffer(read_image_bytes(self.files[i], f"sample {i}"), dtype=np.uint8) for i in idx]
        else:
            first = [self.paths[i] for i in idx]
        return (
            first,
            self.labels[idx],
            (self.plan.left[pos] / self.span).astype(np.float32),
            (self.plan.top[pos] / self.span).astype(np.float32),
            self.plan.flip[pos].astype(np.int32),
        )


# Formats DALI's image decoder reads, as PIL names them.
_DALI_FORMATS = frozenset({"JPEG", "JPEG2000", "TIFF", "PNG", "BMP", "PPM", "WEBP"})


def _undecodable(paths: Sequence[str]) -> list[tuple[str, str]]:
    """``(path, reason)`` for each file that PIL cannot decode or DALI does not read."""
    bad = []
    for path in paths:
        try:
            with open_image(path) as img:
                if img.format not in _DALI_FORMATS:
                    bad.append((path, f"{img.format} data, which DALI does not decode"))
                    continue
                img.load()
        except Exception as exc:  # PIL raises several types for bad files
            bad.append((path, f"{type(exc).__name__}: {exc}"))
    return bad


def _dali_auto_augment(images, augment: str):
    """Apply DALI's automatic-augmentation policy ``augment`` to a batch of uint8 HWC images."""
    from nvidia.dali.auto_aug import rand_augment, trivial_augment

    if augment == "randaugment":
        return rand_augment.rand_augment(images, n=2, m=9)
    return trivial_augment.trivial_augment_wide(images)


class DaliImageLoader(ImageLoader):
    """DALI backend: GPU (``mixed``) decoding when ``device`` is CUDA, a CPU pipeline otherwise."""

    backend = "dali"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._source = _DaliSource(self.files, self.labels, self.batch_size,
                                   self.resize - self.crop)
        self._pipe = None
        self._clean = True  # the pipeline sits at an epoch boundary

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None
                     else torch.cuda.current_device()) if gpu else None
        augment = self.augment

        # pipeline_def rather than a bare Pipeline: DALI's auto_aug policies branch per sample,
        # which needs conditionals, and only the decorator can enable them.
        @pipeline_def(enable_conditionals=augment != "none")
        def graph():
            paths, labels, pos_x, pos_y, mirror = fn.external_source(
                source=self._source,
                num_outputs=5,
                batch=True,
                batch_info=True,
                parallel=False,
                dtype=[types.UINT8, types.INT64, types.FLOAT, types.FLOAT, types.INT32],
                ndim=[1, 1, 0, 0, 0],
            )
            encoded = paths if self._source.bytes_mode else fn.io.file.read(paths)
            images = fn.decoders.image(
                encoded, device="mixed" if gpu else "cpu", output_type=types.RGB
            )
            images = fn.resize(
                images,
                resize_x=self.resize,
                resize_y=self.resize,
                interp_type=types.INTERP_LINEAR,
                antialias=True,
            )
            if augment != "none":
                images = _dali_auto_augment(images, augment)
            images = fn.crop_mirror_normalize(
                images,
                crop=(self.crop, self.crop),
                crop_pos_x=pos_x,
                crop_pos_y=pos_y,
                mirror=mirror,
                mean=[255.0 * m for m in IMAGENET_MEAN],
                std=[255.0 * s for s in IMAGENET_STD],
                dtype=types.FLOAT,
                # HWC batches are NHWC, i.e. channels-last NCHW after a free permute.
                output_layout="HWC" if self.channels_last else "CHW",
            )
            return images, (labels.gpu() if gpu else labels)

        pipe = graph(
            batch_size=self.batch_size,
            num_threads=max(1, self.num_workers),
            device_id=device_id,
            seed=self.seed,
            prefetch_queue_depth=2,
        )
        pipe.build()
        return pipe

    def _run(self, batch: int):
        try:
            return self._pipe.run()
        except StopIteration:
            raise
        except RuntimeError as exc:
            # DALI's message does not name the file. The pipeline runs ahead, so the bad image
            # is in this batch or a prefetched one: find it with PIL.
            lo = batch * self.batch_size
            hi = min(len(self._source.plan.order), lo + 3 * self.batch_size)
            suspects = [self.files[i] for i in self._source.plan.order[lo:hi]]
            bad = [f"{path!r} ({why})" for path, why in _undecodable(suspects)]
            self._pipe = None  # DALI marks the pipeline invalid after an error
            where = ("bad image(s): " + "; ".join(bad)) if bad else (
                f"no image among {len(suspects)} files from {suspects[0]!r} looks bad to PIL")
            raise LoaderError(f"DALI failed in epoch {self.epoch}, batch {batch}; {where}. "
                              f"DALI said: {exc}") from exc

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if self._pipe is not None and not self._clean:
            # The previous pass was abandoned with batches in flight; a fresh pipeline is
            # cheaper and safer than draining them.
            self._pipe = None
        if self._pipe is None:
            self._pipe = self._build()
        else:
            self._pipe.reset()
        self._source.plan = self.plan()
        self._clean = False
        gpu = self.device.type == "cuda"
        stream = torch.cuda.current_stream(self.device) if gpu else None
        expected = len(self)
        batch = 0
        while True:
            try:
                images_tl, labels_tl = self._run(batch)
            except StopIteration:
                break
            images_dali = images_tl.as_tensor()
            labels_dali = labels_tl.as_tensor()
            out_device = self.device if gpu else torch.device("cpu")
            images = torch.empty(images_dali.shape(), dtype=torch.float32, device=out_device)
            labels = torch.empty(labels_dali.shape(), dtype=torch.int64, device=out_device)
            feed_ndarray(images_dali, images, cuda_stream=stream)
            feed_ndarray(labels_dali, labels, cuda_stream=stream)
            if self.channels_last:
                images = images.permute(0, 3, 1, 2)
            if not gpu:
                images = images.to(self.device)
                labels = labels.to(self.device)
            batch += 1
            yield images, labels
        self._clean = True
        if batch != expected:
            raise LoaderError(f"DALI produced {batch} batches, expected {expected}")


# -------------------------------------------------------------------------------------- torch


class _PlanSampler(torch.utils.data.Sampler):
    """Yields ``(index, top, left, flip)`` keys of the plan the loader set for this epoch.

    Iterated in the main process, so a new epoch's plan reaches persistent workers too. Holds no
    reference to the loader: without a cycle, dropping the loader shuts its workers down at once.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.plan: EpochPlan | None = None

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int, int, bool, int]]:
        plan = self.plan
        seeds = plan.aug_seed.tolist() if plan.aug_seed is not None else [0] * len(plan.order)
        return zip(plan.order.tolist(), plan.top.tolist(), plan.left.tolist(),
                   plan.flip.tolist(), seeds)


class ImageDataset(torch.utils.data.Dataset):
    """Decodes with PIL and applies the plan's resize/crop/flip; returns uint8 CHW and labels.

    Normalisation happens on the target device after transfer (4x fewer bytes to pin and copy).
    ``augment`` adds a ``torchvision.transforms.v2`` policy after the resize, drawn from the
    key's augmentation seed under a forked RNG (the caller's torch RNG is left untouched).
    """

    def __init__(self, files: list[str], labels: np.ndarray, resize: int, crop: int,
                 augment: str = "none") -> None:
        self.files = files
        self.labels = torch.from_numpy(labels)
        self.resize = resize
        self.crop = crop
        self.augment = augment
        self._policy = _torch_policy(augment)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        index, top, left, flip = key[:4]
        aug_seed = key[4] if len(key) > 4 else 0
        path = self.files[index]
        try:
            with open_image(path) as img:
                img = ImageOps.exif_transpose(img).convert("RGB")
        except Exception as exc:  # PIL raises several types for bad files
            raise LoaderError(f"sample {index}: cannot decode image {path!r}: {exc}") from exc
        # Imported here, not at module level: torchvision pulls in torch._dynamo (~1.5 s per
        # process), which the DALI path and every evaluation process would pay for nothing.
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        img = F.resize(img, [self.resize, self.resize], interpolation=InterpolationMode.BILINEAR,
                       antialias=True)
        if self._policy is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(aug_seed))
                img = self._policy(img)
        img = F.crop(img, top, left, self.crop, self.crop)
        if flip:
            img = F.horizontal_flip(img)
        return F.pil_to_tensor(img), self.labels[index]


def _torch_policy(augment: str):
    """The ``torchvision.transforms.v2`` policy for ``augment`` (``None`` for ``none``)."""
    from torchvision.transforms import v2

    if augment == "none":
        return None
    if augment == "randaugment":
        return v2.RandAugment(num_ops=2, magnitude=9)
    return v2.TrivialAugmentWide()


def _seed_worker(worker_id: int) -> None:
    # No transform draws random numbers (the plan carries them); seeding keeps any library
    # that does reproducible, and one thread per worker avoids oversubscribing the cores.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    torch.set_num_threads(1)


class TorchImageLoader(ImageLoader):
    """torchvision backend: PIL decoding in ``DataLoader`` workers, normalisation on device."""

    backend = "torch"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cuda = self.device.type == "cuda"
        self._sampler = _PlanSampler(self.num_samples)
        self.dataloader = torch.utils.data.DataLoader(
            ImageDataset(self.files, self.labels, self.resize, self.crop, self.augment),
            batch_size=self.batch_size,
            sampler=self._sampler,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=cuda,
            persistent_workers=self.num_workers > 0,
            prefetch_factor=4 if self.num_workers > 0 else None,
            worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(self.seed),
        )
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255.0
        self._inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
                               * 255.0)
        self._workers_started = False  # persistent workers are forked on the first pass

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        non_blocking = self.device.type == "cuda"
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if self.num_workers > 0 and not self._workers_started:
            # Workers are forked now: collect garbage first, so that no dead DALI pipeline
            # (or other object whose finaliser joins threads) is finalised inside a worker,
            # where those threads do not exist and the join hangs.
            gc.collect()
            self._workers_started = True
        self._sampler.plan = self.plan()
        for images, labels in self.dataloader:
            images = images.to(self.device, non_blocking=non_blocking)
            images = images.to(memory_format=fmt).float().sub_(self._mean).mul_(self._inv_std)
            yield images, labels.to(self.device, non_blocking=non_blocking)


def make_loader(
    files: Sequence[str],
    labels: np.ndarray,
    *,
    batch_size: int,
    resize: int,
    crop: int,
    train: bool,
    seed: int,
    backend: str = "auto",
    device: torch.device | str = "cpu",
    num_workers: int = 2,
    channels_last: bool = False,
    shard: tuple[int, int] | None = None,
    augment: str = "none",
) -> ImageLoader:
    """A loader over ``files`` with ``labels`` (``(n, 4)`` int class indices in ``TASKS`` order).

    ``train=True``: resize, random crop, random flip, a new permutation per epoch
    (:meth:`ImageLoader.set_epoch`), the last partial batch kept. ``train=False``: resize,
    centre crop, every sample exactly once in input order. ``backend``: ``"dali"``,
    ``"torch"`` or ``"auto"`` (DALI when importable). ``num_workers``: DALI CPU threads or
    ``DataLoader`` worker processes. ``shard=(rank, world)``: data-parallel share of process
    ``rank`` (:func:`shard_plan`; training drops the last ``len(files) mod world`` samples of each
    epoch so all ranks run the same steps); ``None`` (or ``(0, 1)``) reads everything. Raises
    ``ValueError``/``FileNotFoundError`` naming the sample for bad labels or missing files.
    ``augment``: one of :data:`AUGMENTS`; a classic augmentation policy after the resize, in
    training only (``train=False`` ignores it, so evaluation is never augmented).
    """
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r} "
                         "(params.yaml: train.augment)")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "dali" if dali_available() else "torch"
    elif backend == "dali" and not dali_available():
        raise ImportError("backend='dali' needs nvidia-dali (pip install nvidia-dali-cuda130)")
    paths, labels = _check_inputs(files, labels, batch_size, resize, crop)
    if shard is not None:
        rank, world = (int(v) for v in shard)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
        if train and len(paths) < world:
            raise ValueError(f"cannot shard {len(paths)} training images over {world} processes: "
                             f"every process needs at least one per epoch")
        shard = (rank, world)
    cls = DaliImageLoader if backend == "dali" else TorchImageLoader
    return cls(
        paths,
        labels,
        batch_size=batch_size,
        resize=resize,
        crop=crop,
        train=train,
        seed=seed,
        device=torch.device(device),
        num_workers=num_workers,
        channels_last=channels_last,
        shard=shard,
        augment=augment,
    )
