"""Training and prediction loops for the multi-task classifier.

One loop serves the CPU demo and GPU runs: bf16 autocast and channels_last switch on with CUDA,
the loader backend (DALI or torchvision) comes from :func:`medicsynth.loaders.make_loader`.
Loss is the sum of per-task cross-entropies (optionally class-weighted). The recipe is params
(:class:`TrainConfig`, params.yaml's ``train`` section; defaults are the demo's): optimiser Adam or
AdamW; learning-rate schedule ``cosine`` (linear warm-up then cosine decay), ``constant`` or
``plateau`` (cut by a factor after epochs without improvement, as ``ReduceLROnPlateau``); early
stopping on dev mean macro-F1 (the headline metric, unlike the loss, tracks minority classes) or
dev loss, keeping the best epoch's weights; head dropout; precision ``auto`` (bf16 autocast on
CUDA, fp32 on CPU), ``fp32`` or ``bf16`` (autocast on CPU too). Every decision counts epochs, never
time, so a recipe gives the same weights however busy the machine is.

Data-parallel training. Launched by ``torchrun --nproc_per_node N`` or ``accelerate launch
--multi_gpu --num_processes N`` (``WORLD_SIZE`` > 1 in the environment), :func:`train_classifier`
joins a ``torch.distributed`` process group (NCCL with ``cuda:LOCAL_RANK`` per process on CUDA,
Gloo on CPU), wraps the model in ``DistributedDataParallel`` and gives each rank its share of
every epoch (:func:`medicsynth.loaders.shard_plan`). ``batch_size`` stays per process, so the
global batch is ``N * batch_size``; the learning rate is multiplied by ``N`` only when
``scale_lr_with_world_size`` is set.

Early stopping stays in sync by construction: after each epoch rank 0's BatchNorm statistics are
broadcast (parameters already agree), each rank predicts its shard of the dev set, and the
predictions are all-gathered, so every rank computes the metrics from identical arrays and takes
the same decision with no further message. The alternatives were worse: every rank scoring the
whole dev set does N times the work, and with ``cudnn.benchmark`` GPUs may pick different
kernels, so a near-tie could flip one rank's decision and leave the others blocked in a
collective; rank 0 scoring alone and broadcasting leaves N - 1 GPUs idle during the dev pass.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import distributed as dist
from torch import nn
from tqdm import tqdm

from medicsynth.labels import CLASSES, NUM_CLASSES, TASKS
from medicsynth.loaders import make_loader
from medicsynth.metrics import confusion_counts
from medicsynth.models import MultiTaskClassifier, build_classifier
from medicsynth.params import require


OPTIMIZERS: tuple[str, ...] = ("adam", "adamw")
SCHEDULES: tuple[str, ...] = ("cosine", "constant", "plateau")
STOP_METRICS: tuple[str, ...] = ("dev_mean_macro_f1", "dev_loss")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
#: Direction of each monitored metric: +1 higher is better, -1 lower is better.
_DIRECTION = {"dev_mean_macro_f1": 1, "dev_loss": -1, "train_loss": -1}


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run; every field comes from params.yaml (no defaults here).

    Build it with :meth:`from_params` from the ``train`` section (``stages/train.py``) or from
    ``relabel.model`` (the relabel fold models); params.yaml documents each key. Fields:

    - ``arch``, ``pretrained``, ``dropout``: the model (:func:`medicsynth.models.build_classifier`);
      ``dropout`` is applied to the pooled features before the four linear heads.
    - ``epochs``, ``batch_size``, ``seed``, ``class_weighting``: the loop (``batch_size`` per process).
    - ``optimizer`` (``adam`` | ``adamw``), ``lr`` (peak), ``weight_decay`` (coupled L2 for Adam,
      decoupled for AdamW).
    - ``schedule``: ``cosine`` (linear warm-up over ``warmup_epochs``, then cosine decay to 0 at the
      last epoch), ``constant`` (warm-up, then ``lr``) or ``plateau`` (warm-up, then ``lr`` times
      ``plateau_factor`` after every ``plateau_patience`` consecutive epochs without improvement of
      the monitored metric, at most ``plateau_max_cuts`` times; ``None`` = no limit). The monitored
      metric is ``early_stop_metric`` on dev, or the training loss when there is no dev set or no
      early-stopping metric.
    - ``early_stop_metric`` (``dev_mean_macro_f1`` | ``dev_loss`` | ``None``) and ``patience``:
      with a dev set, the epoch with the best metric is kept and training stops after ``patience``
      epochs without improvement (``None``: never stop early, still keep the best epoch).
      ``early_stop_metric`` ``None``: train every epoch and keep the last (as without a dev set).
      Improvement is strict (a tie is not an improvement).
    - ``precision``: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32`` or ``bf16`` (autocast
      on any device; parameters, optimiser state and the loss stay fp32).
    - ``resize``, ``crop``, ``loader``, ``num_workers``, ``augment``: input pipeline.
    - ``device``, ``cpu_threads``, ``scale_lr_with_world_size``: where and how it runs.

    Raises ``ValueError`` naming the field for a value outside its choices.
    """

    arch: str
    pretrained: bool
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    schedule: str
    warmup_epochs: float
    plateau_factor: float
    plateau_patience: int
    plateau_max_cuts: int | None
    early_stop_metric: str | None
    patience: int | None
    dropout: float
    precision: str
    class_weighting: str  # none | inverse | sqrt_inverse
    resize: int
    crop: int
    loader: str
    num_workers: int
    seed: int
    device: str
    cpu_threads: int | None
    augment: str  # classic augmentation of training images: none | randaugment | trivialaugment
    # Data-parallel runs: multiply lr by the number of processes (the global batch grows with it).
    scale_lr_with_world_size: bool

    def __post_init__(self) -> None:
        choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "precision": PRECISIONS,
                   "early_stop_metric": (*STOP_METRICS, None)}
        for key, allowed in choices.items():
            value = getattr(self, key)
            if value not in allowed:
                names = ", ".join("null" if a is None else a for a in allowed)
                raise ValueError(f"{key} must be one of {names}, not {value!r}")
        if not 0.0 < self.plateau_factor < 1.0:
            raise ValueError(f"plateau_factor must be in (0, 1), not {self.plateau_factor!r}")
        for key in ("plateau_patience", "patience", "plateau_max_cuts"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0
                                      or (key == "plateau_patience" and value < 1)):
                raise ValueError(f"{key} must be a {'positive' if key == 'plateau_patience' else 'non-negative'} "
                                 f"integer{'' if key == 'plateau_patience' else ' or null'}, not {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout!r}")

    @classmethod
    def from_params(cls, values: Mapping[str, Any], name: str, *, ignore: Iterable[str] = (),
                    **fixed: Any) -> "TrainConfig":
        """A config whose fields come from ``values`` (the params section called ``name``).

        Parameters: ``values`` is the section (``params["train"]`` or ``params["relabel"]["model"]``),
        ``name`` its dotted name for messages; ``ignore`` lists keys of the section that are not
        fields (matrix axes); ``fixed`` sets fields the caller decides (the train matrix's ``arch``,
        ``seed``, ``augment``; relabel's ``early_stop_metric=None``).

        Guarantees: every other field is ``medicsynth.params.require(values, name, field)`` (a
        missing key raises ``KeyError`` naming ``name.field``); a key that is not a field, or a key
        of ``values`` that ``fixed`` also sets, raises ``ValueError`` naming it; a value outside its
        choices raises ``ValueError`` naming ``name.field``.
        """
        known = [f.name for f in fields(cls)]
        ignored = set(ignore)
        unknown = sorted(set(values) - set(known) - ignored)
        if unknown:
            raise ValueError(f"params.yaml: {name}: unknown key(s) {', '.join(unknown)}; "
                             f"expected: {', '.join(sorted(set(known) - set(fixed)))}")
        clash = sorted((set(values) - ignored) & set(fixed))
        if clash:
            raise ValueError(f"params.yaml: {name}: {', '.join(clash)} cannot be set here "
                             f"(the stage sets {'it' if len(clash) == 1 else 'them'})")
        kwargs = {k: fixed[k] if k in fixed else require(values, name, k) for k in known}
        try:
            return cls(**kwargs)
        except ValueError as exc:
            raise ValueError(f"params.yaml: {name}.{exc}") from None


@dataclass
class TrainResult:
    model: MultiTaskClassifier
    best_epoch: int
    best_dev_macro_f1: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    loader_backend: str = ""
    world_size: int = 1
    lr: float = 0.0  # peak learning rate actually used (after world-size scaling)
    best_dev_loss: float = float("nan")  # dev loss of the kept epoch (computed when it is monitored)
    lr_cuts: int = 0  # plateau schedule: learning-rate cuts made


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a data-parallel launch (``torchrun`` / ``accelerate launch``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes outputs."""
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank, world size and local rank from the launcher's environment variables.

    ``torchrun`` and ``accelerate launch`` both set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
    a plain ``python`` run has none of them and is rank 0 of 1.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    missing = [k for k in ("RANK", "LOCAL_RANK") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: launch with "
                           f"torchrun or accelerate launch, which set all three")
    return DistInfo(rank=int(os.environ["RANK"]), world_size=world,
                    local_rank=int(os.environ["LOCAL_RANK"]))


def _init_distributed(info: DistInfo, device: torch.device) -> tuple[torch.device, bool]:
    """Join the process group (unless the caller did); returns ``(this rank's device, owned)``.

    On CUDA each process drives ``cuda:LOCAL_RANK`` and talks NCCL; on CPU, Gloo.
    """
    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={info.local_rank} but only {torch.cuda.device_count()} "
                               f"CUDA device(s) are visible: launch at most that many processes per node")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if dist.is_initialized():
        if dist.get_world_size() != info.world_size:
            raise RuntimeError(f"process group has {dist.get_world_size()} ranks, WORLD_SIZE says "
                               f"{info.world_size}")
        return device, False
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device, True


def _gather_shards(probs: dict[str, np.ndarray], n: int, info: DistInfo,
                   device: torch.device) -> dict[str, np.ndarray]:
    """Reassemble dev probabilities sharded ``r, r + w, ...`` (see ``shard_plan``) on every rank.

    Shards differ in length by at most one, so each is padded to ``ceil(n / w)`` rows for
    ``all_gather``; every rank ends with the same full arrays in input order.
    """
    world = info.world_size
    rows = -(-n // world)
    widths = [NUM_CLASSES[t] for t in TASKS]
    local = np.concatenate([probs[t] for t in TASKS], axis=1).astype(np.float32, copy=False)
    padded = torch.zeros((rows, sum(widths)), dtype=torch.float32, device=device)
    padded[: len(local)] = torch.from_numpy(local).to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    full = np.empty((n, sum(widths)), dtype=np.float32)
    for r, block in enumerate(gathered):
        size = len(range(r, n, world))
        full[r::world] = block[:size].cpu().numpy()
    bounds = np.cumsum([0] + widths)
    return {t: full[:, bounds[j]:bounds[j + 1]] for j, t in enumerate(TASKS)}


def _sync_buffers(model: nn.Module) -> None:
    # DDP averages gradients, so parameters agree on all ranks, but BatchNorm running statistics
    # are updated from each rank's own batches. Rank 0's are the ones saved; copy them everywhere
    # so every rank evaluates (and keeps as best) the same model.
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def resolve_device(device: str, cpu_threads: int | None = None, key: str = "train.device") -> torch.device:
    """:func:`medicsynth.devices.choose_device` of ``device`` (``key`` names it in errors); on
    CPU, optionally cap torch's intra-op threads.

    Why cap: the loader's decoding threads run beside the model. When torch's OpenMP threads
    have to share cores with them, their spin-waiting collapses throughput (measured on the
    2-core demo machine: ~90 img/s with 2 torch threads vs ~950 img/s with 1).
    """
    from medicsynth.devices import choose_device

    dev = choose_device(device, key=key)
    if dev.type == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    return dev


def class_weights(labels: np.ndarray, scheme: str) -> dict[str, torch.Tensor | None]:
    """Per-task class weights from training label counts; ``none`` gives unweighted CE.

    ``inverse`` weights each class by n / (C · count); ``sqrt_inverse`` takes the square root,
    a milder correction. Weights are normalised to mean 1 so the loss scale stays comparable.
    """
    weights: dict[str, torch.Tensor | None] = {}
    for j, task in enumerate(TASKS):
        if scheme == "none":
            weights[task] = None
            continue
        counts = np.bincount(labels[:, j], minlength=NUM_CLASSES[task]).astype(float)
        w = len(labels) / (NUM_CLASSES[task] * np.maximum(counts, 1.0))
        if scheme == "sqrt_inverse":
            w = np.sqrt(w)
        elif scheme != "inverse":
            raise ValueError(f"train.class_weighting must be none|inverse|sqrt_inverse, not {scheme!r}")
        weights[task] = torch.tensor(w / w.mean(), dtype=torch.float32)
    return weights


def _lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


class LrSchedule:
    """The per-step learning-rate multiplier of ``config.schedule`` (for ``LambdaLR``).

    ``cosine``: linear warm-up over ``warmup_steps`` then cosine decay to 0 at ``total_steps``.
    ``constant``: the same warm-up, then 1. ``plateau``: the same warm-up, then ``scale``, which
    :meth:`end_epoch` multiplies by ``factor`` after ``patience`` consecutive epochs without
    improvement (the count restarts after each cut, as in ``torch.optim.lr_scheduler.ReduceLROnPlateau``
    with ``cooldown=0``), at most ``max_cuts`` times (``None``: no limit). Driven by epoch
    counts only, so it is deterministic.
    """

    def __init__(self, kind: str, total_steps: int, warmup_steps: int, *, factor: float, patience: int,
                 max_cuts: int | None):
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, not {kind!r}")
        self.kind, self.warmup_steps = kind, warmup_steps
        self.factor, self.patience, self.max_cuts = factor, patience, max_cuts
        self.scale, self.cuts, self.bad_epochs = 1.0, 0, 0
        self._cosine = _lr_lambda(total_steps, warmup_steps)

    def __call__(self, step: int) -> float:
        if self.kind == "cosine":
            return self._cosine(step)
        if step < self.warmup_steps:
            return (step + 1) / max(1, self.warmup_steps) * self.scale
        return self.scale

    def end_epoch(self, improved: bool) -> bool:
        """Record one epoch's outcome; returns True when the learning rate was cut (``plateau`` only)."""
        if self.kind != "plateau":
            return False
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        if self.bad_epochs < self.patience or (self.max_cuts is not None and self.cuts >= self.max_cuts):
            return False
        self.scale *= self.factor
        self.cuts += 1
        self.bad_epochs = 0
        return True


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``: ``None`` means plain fp32.

    ``auto``: bf16 on CUDA, fp32 elsewhere; ``fp32``: never autocast; ``bf16``: bf16 on any device
    (CPU autocast covers convolutions and linear layers).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@torch.no_grad()
def predict_loader(model: nn.Module, loader, device: torch.device, *, precision: str = "auto") -> dict[str, np.ndarray]:
    """Softmax probabilities per task, ``(n, C)`` float32 arrays in loader order.

    ``precision`` as :func:`autocast_dtype` (``auto``, what models saved before the recipe
    params were trained with); softmax is always taken in fp32.
    """
    model.eval()
    outs: dict[str, list[np.ndarray]] = {t: [] for t in TASKS}
    dtype = autocast_dtype(precision, device)
    for images, _ in loader:
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(images)
        for t in TASKS:
            outs[t].append(torch.softmax(logits[t].float(), dim=1).cpu().numpy())
    return {t: np.concatenate(v) if v else np.zeros((0, NUM_CLASSES[t])) for t, v in outs.items()}


def dev_loss(labels: np.ndarray, probs: dict[str, np.ndarray],
             weights: dict[str, torch.Tensor | None] | None = None) -> float:
    """The training objective on held-out data: the sum over tasks of mean cross-entropy.

    ``labels`` is ``(n, tasks)``, ``probs`` per-task ``(n, C)`` probabilities; ``weights`` the
    per-task class weights of the training loss (:func:`class_weights`; ``None`` = unweighted),
    applied as ``nn.CrossEntropyLoss`` does (weighted mean). Probabilities are clipped at the
    smallest normal float32 so a confident miss costs about 87 instead of infinity.
    """
    total = 0.0
    for j, t in enumerate(TASKS):
        y = labels[:, j]
        p = np.clip(probs[t][np.arange(len(y)), y].astype(np.float64), np.finfo(np.float32).tiny, None)
        w = None if not weights or weights.get(t) is None else weights[t].cpu().numpy().astype(np.float64)[y]
        total += float(-np.log(p).mean()) if w is None else float((w * -np.log(p)).sum() / w.sum())
    return total


def mean_macro_f1(labels: np.ndarray, probs: dict[str, np.ndarray]) -> float:
    """Mean over tasks of macro-F1 over *all* classes of each task (an absent class scores 0).

    Equal to ``sklearn.metrics.f1_score(..., labels=range(C), average="macro", zero_division=0)``
    (tests/test_training.py checks it), computed from confusion counts so that every training
    process does not pay sklearn's ~1 s import: 30 trainings and evaluations per demo run.
    """
    return float(np.mean([task_macro_f1(labels[:, j], probs[t], NUM_CLASSES[t]) for j, t in enumerate(TASKS)]))


def task_macro_f1(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> float:
    """Macro-F1 over all ``n_classes`` classes of the argmax of ``probs`` ``(n, n_classes)``."""
    cm = confusion_counts(y_true, probs.argmax(1), n_classes).astype(np.float64)
    tp = np.diag(cm)
    den = cm.sum(axis=0) + cm.sum(axis=1)  # (tp + fp) + (tp + fn)
    return float(np.divide(2 * tp, den, out=np.zeros_like(tp), where=den > 0).mean())


def train_classifier(
    train_files: Sequence[str],
    train_labels: np.ndarray,
    dev_files: Sequence[str] | None,
    dev_labels: np.ndarray | None,
    config: TrainConfig,
    *,
    live: Any | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a :class:`MultiTaskClassifier`; early-stop on ``config.early_stop_metric`` when dev is given.

    Without a dev set (k-fold relabelling) it trains for ``config.epochs`` and keeps the last
    epoch. ``live`` is an optional :class:`dvclive.Live` that receives per-epoch metrics.

    Under a data-parallel launcher (``WORLD_SIZE`` > 1, see the module docstring) every rank
    calls this with the same arguments and gets the same result; ``live`` and ``progress`` are
    used on rank 0 only. A process group created here is destroyed before returning; one the
    caller created is left alone.
    """
    seed_everything(config.seed)
    info = dist_info()
    device = resolve_device(config.device, config.cpu_threads)
    owns_group = False
    if info.world_size > 1:
        device, owns_group = _init_distributed(info, device)
    try:
        return _train(train_files, train_labels, dev_files, dev_labels, config, info, device,
                      live=live if info.is_main else None, progress=progress and info.is_main)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _build_model(config: TrainConfig, info: DistInfo, device: torch.device) -> tuple[MultiTaskClassifier, nn.Module]:
    """Step 1: the classifier on ``device`` and what the training step calls.

    Returns ``(model, net)``: ``net`` is ``model`` itself, or its ``DistributedDataParallel``
    wrapper when ``info.world_size`` > 1. Initial weights depend only on ``config.seed`` (the
    caller seeded every generator), so all ranks start from the same weights.
    """
    model = build_classifier(config.arch, pretrained=config.pretrained, dropout=config.dropout).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    net: nn.Module = model
    if info.world_size > 1:
        # Same seed on every rank up to here, so the initial weights agree (DDP also broadcasts
        # rank 0's); from here each rank draws its own dropout masks, still from fixed seeds.
        torch.manual_seed(int(np.random.SeedSequence([config.seed, info.rank]).generate_state(1)[0]))
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, net


def _build_loaders(
    train_files: Sequence[str], train_labels: np.ndarray, dev_files: Sequence[str] | None,
    dev_labels: np.ndarray | None, config: TrainConfig, info: DistInfo, device: torch.device,
):
    """Step 2: ``(train_loader, dev_loader)``; ``dev_loader`` is ``None`` without dev files.

    Both are sharded over the ranks of a data-parallel run; only the training loader applies
    ``config.augment`` (evaluation is never augmented).
    """
    world = info.world_size
    common = dict(resize=config.resize, crop=config.crop, seed=config.seed, backend=config.loader,
                  device=device, num_workers=config.num_workers, channels_last=device.type == "cuda",
                  shard=(info.rank, world) if world > 1 else None)
    train_loader = make_loader(train_files, train_labels, batch_size=config.batch_size, train=True,
                               augment=config.augment, **common)
    dev_loader = None
    if dev_files is not None and len(dev_files):
        dev_loader = make_loader(dev_files, dev_labels, batch_size=config.batch_size * 2, train=False, **common)
    return train_loader, dev_loader


def _build_optimiser(model: nn.Module, config: TrainConfig, world: int, steps_per_epoch: int):
    """Step 3: ``(optimiser, scheduler, schedule, peak_lr)``.

    ``config.optimizer`` Adam (``weight_decay`` as L2 in the gradient) or AdamW (decoupled);
    ``scheduler`` is a ``LambdaLR`` stepped once per batch with ``schedule`` (:class:`LrSchedule`)
    as its multiplier over ``config.epochs * steps_per_epoch`` steps. ``peak_lr`` is
    ``config.lr``, times ``world`` when ``config.scale_lr_with_world_size``.
    """
    lr = config.lr * world if config.scale_lr_with_world_size else config.lr
    optimiser_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[config.optimizer]
    optimiser = optimiser_cls(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    schedule = LrSchedule(config.schedule, config.epochs * steps_per_epoch, int(config.warmup_epochs * steps_per_epoch),
                          factor=config.plateau_factor, patience=config.plateau_patience,
                          max_cuts=config.plateau_max_cuts)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, schedule)
    return optimiser, scheduler, schedule, lr


def _train_epoch(net: nn.Module, loader, losses: dict[str, nn.Module], optimiser, scheduler,
                 device: torch.device, world: int, desc: str, progress: bool,
                 dtype: torch.dtype | None) -> tuple[float, int]:
    """Step 4: one pass over ``loader``; returns ``(mean training loss, images seen by all ranks)``.

    The loss is the sum of the four tasks' cross-entropies (in fp32); ``dtype`` is the autocast
    dtype of the forward pass (:func:`autocast_dtype`; ``None`` = fp32). Under data parallelism
    the returned loss is the mean over ranks (equal step counts by
    :func:`medicsynth.loaders.shard_plan`).
    """
    net.train()
    # Summed on the device and read once per epoch: a per-step .item() would sync the GPU.
    total_loss, batches, seen = torch.zeros((), device=device), 0, 0
    for images, labels in tqdm(loader, desc=desc, disable=None if progress else True, leave=False):
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = net(images)
            loss = sum(losses[t](logits[t].float(), labels[:, j]) for j, t in enumerate(TASKS))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
        total_loss += loss.detach().float()
        batches += 1
        seen += len(labels) * world  # every rank runs the same batch sizes (shard_plan)
    train_loss = float(total_loss) / max(1, batches)
    if world > 1:
        summed = torch.tensor(train_loss, dtype=torch.float64, device=device)
        dist.all_reduce(summed)
        train_loss = float(summed) / world
    return train_loss, seen


def _dev_scores(model: nn.Module, dev_loader, dev_labels: np.ndarray, info: DistInfo,
                device: torch.device, precision: str,
                loss_weights: dict[str, torch.Tensor | None] | None = None) -> dict[str, float]:
    """Step 5: ``{"dev_mean_macro_f1", "dev_macro_f1/<task>"...}`` of ``model`` on the dev set.

    With ``loss_weights`` (the training loss's class weights, a dict even when unweighted) the
    record also holds ``dev_loss`` (:func:`dev_loss`). Every rank predicts its shard; the shards
    are all-gathered, so all ranks score identical arrays and take the same early-stopping decision.
    """
    probs = predict_loader(model, dev_loader, device, precision=precision)
    if info.world_size > 1:
        probs = _gather_shards(probs, len(dev_labels), info, device)
    record = {"dev_mean_macro_f1": mean_macro_f1(dev_labels, probs)}
    for j, t in enumerate(TASKS):
        record[f"dev_macro_f1/{t}"] = task_macro_f1(dev_labels[:, j], probs[t], NUM_CLASSES[t])
    if loss_weights is not None:
        record["dev_loss"] = dev_loss(dev_labels, probs, loss_weights)
    return record


def _log(live: Any | None, record: dict[str, float]) -> None:
    """Step 6: send one epoch's record to DVCLive (when a logger is given)."""
    if live is None:
        return
    for key, value in record.items():
        if key != "epoch":
            live.log_metric(key, value)
    live.next_step()


def _train(
    train_files: Sequence[str],
    train_labels: np.ndarray,
    dev_files: Sequence[str] | None,
    dev_labels: np.ndarray | None,
    config: TrainConfig,
    info: DistInfo,
    device: torch.device,
    *,
    live: Any | None,
    progress: bool,
) -> TrainResult:
    """The training procedure of :func:`train_classifier` on an initialised process (group).

    Steps: build the model (1), the loaders (2) and the optimiser (3); then per epoch train (4),
    score dev (5, when given), log (6), keep the best state by ``config.early_stop_metric``, tell
    the schedule whether its monitored metric improved, and stop after ``config.patience`` epochs
    without improvement. Without dev (or without an early-stopping metric), the last epoch is
    kept. Results depend only on the data, ``config`` and the world size, never on time
    (``seconds`` is only reported).
    """
    world = info.world_size
    model, net = _build_model(config, info, device)
    train_loader, dev_loader = _build_loaders(train_files, train_labels, dev_files, dev_labels,
                                              config, info, device)
    weights = class_weights(train_labels, config.class_weighting)
    losses = {t: nn.CrossEntropyLoss(weight=None if w is None else w.to(device)) for t, w in weights.items()}
    optimiser, scheduler, schedule, lr = _build_optimiser(model, config, world, max(1, len(train_loader)))
    dtype = autocast_dtype(config.precision, device)
    # What decides the kept epoch and early stopping (None: keep the last epoch), and what the
    # plateau schedule watches (the same, or the training loss when there is nothing on dev).
    monitor = config.early_stop_metric if dev_loader is not None else None
    plateau_metric = monitor or "train_loss"

    best_state, best_value, best_epoch, bad_epochs = None, None, 0, 0
    plateau_best = None
    history: list[dict[str, float]] = []
    seen, start = 0, time.perf_counter()
    for epoch in range(config.epochs):
        train_loader.set_epoch(epoch)
        train_loss, epoch_seen = _train_epoch(net, train_loader, losses, optimiser, scheduler, device, world,
                                              f"{config.arch} epoch {epoch + 1}/{config.epochs}", progress, dtype)
        seen += epoch_seen
        if world > 1:
            _sync_buffers(model)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "lr": optimiser.param_groups[0]["lr"]}
        if dev_loader is not None:
            record.update(_dev_scores(model, dev_loader, dev_labels, info, device, config.precision,
                                      weights if monitor == "dev_loss" else None))
        history.append(record)
        _log(live, record)
        improved = monitor is None or _better(record[monitor], best_value, monitor)
        if improved:
            best_value = None if monitor is None else record[monitor]
            best_epoch, bad_epochs = epoch + 1, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        plateau_improved = improved if plateau_metric == monitor else _better(record[plateau_metric], plateau_best,
                                                                             plateau_metric)
        if plateau_improved:
            plateau_best = record[plateau_metric]
        if schedule.end_epoch(plateau_improved):
            # The cut applies from the next step on: LambdaLR set this step's rate already.
            for group, base in zip(optimiser.param_groups, scheduler.base_lrs):
                group["lr"] = base * schedule(scheduler.last_epoch)
        if monitor is not None and config.patience is not None and bad_epochs >= config.patience:
            break
    seconds = time.perf_counter() - start
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    kept = history[best_epoch - 1] if history else {}
    return TrainResult(
        model=model,
        best_epoch=best_epoch,
        best_dev_macro_f1=kept.get("dev_mean_macro_f1", float("nan")),
        history=history,
        seconds=seconds,
        images_per_second=seen / max(seconds, 1e-9),
        loader_backend=train_loader.backend,
        world_size=world,
        lr=lr,
        best_dev_loss=kept.get("dev_loss", float("nan")),
        lr_cuts=schedule.cuts,
    )


def _better(value: float, best: float | None, metric: str) -> bool:
    """Strict improvement of ``metric`` over ``best`` (``None``: nothing yet, so any value is)."""
    return best is None or _DIRECTION[metric] * value > _DIRECTION[metric] * best


def predict_files(
    model: nn.Module, meta: dict, files: Sequence[str], *, batch_size: int = 128,
    device: str = "auto", loader: str = "auto", num_workers: int = 2, cpu_threads: int | None = 1,
) -> dict[str, np.ndarray]:
    """Per-task probabilities for image ``files`` with the eval transform recorded in ``meta``.

    ``meta`` is the saved model's metadata (``resize``, ``crop``; the precision of
    ``meta["config"]["precision"]`` when recorded, else ``auto``, what older models used).
    """
    dev = resolve_device(device, cpu_threads)
    model = model.to(dev)
    dummy = np.zeros((len(files), len(TASKS)), dtype=np.int64)
    loader_ = make_loader(list(files), dummy, batch_size=batch_size, resize=meta["resize"], crop=meta["crop"],
                          train=False, seed=0, backend=loader, device=dev, num_workers=num_workers,
                          channels_last=dev.type == "cuda")
    precision = (meta.get("config") or {}).get("precision", "auto")
    return predict_loader(model, loader_, dev, precision=precision)


def config_dict(config: TrainConfig) -> dict:
    """``config`` as a plain JSON-ready dict (recorded in the saved model's metadata)."""
    return asdict(config)


__all__ = [
    "TrainConfig", "TrainResult", "DistInfo", "dist_info", "train_classifier", "predict_loader", "predict_files",
    "class_weights", "mean_macro_f1", "dev_loss", "seed_everything", "resolve_device", "autocast_dtype",
    "LrSchedule", "OPTIMIZERS", "SCHEDULES", "STOP_METRICS", "PRECISIONS", "CLASSES",
]
