"""Adapt training: the demo text-to-image model from scratch, or a LoRA on a real Stable Diffusion.

Both modes share :func:`train_denoiser`, the latent-diffusion training loop: ε-prediction (or
v-prediction, following the scheduler) with min-SNR-γ loss weighting, captions dropped with
probability ``caption_dropout`` so the model also learns the unconditional prediction that
classifier-free guidance needs, AdamW with linear warm-up and cosine decay to zero.

- **demo** (:func:`train_demo`): builds :mod:`medicsynth.diffusion.tiny`'s pipeline, trains the VAE
  on class-balanced random crops (phase 1), folds a per-channel standardisation of its latents
  into its 1×1 convolutions, encodes the training images once, then trains UNet and text encoder
  jointly on class-balanced batches (phase 2). Steps alone decide every phase and its
  learning-rate schedule: no wall-clock cap, so a busy machine gives the same model, later
  (a LoRA run's optional ``max_seconds`` fails the stage instead of training less). Wall-clock
  figures go to ``timing/adapt.json``, not to the metrics.

  Measured on the demo data before its damage/humanitarian cues were drawn at scene scale
  (2 shared cores, 1 thread, ~4.7 min wall for the stage): the project's ``original`` small CNN
  assigned 64%, 85% and 89% of 280 generated images (the allocate/caption plan, guidance 6) to
  their intended disaster type in three training runs of this recipe (chance 14%; run-to-run
  spread is large); the 2–8 px damage and humanitarian cues of that data were not reliably
  rendered (20–28% agreement). Not yet re-measured on the scene-scale cues.
- **lora** (:func:`train_lora`): loads a local Stable Diffusion checkpoint, freezes it, adds LoRA
  adapters to the UNet's attention projections (``unet.add_adapter(LoraConfig(...))``), trains
  them in bf16 autocast with gradient checkpointing, and saves them with
  ``StableDiffusionPipeline.save_lora_weights`` for generate to load. Its set-up (adapters under
  :func:`seeded_init`, fp32 LoRA weights, the seeded class-balanced loader) is
  :func:`prepare_lora`, shared with the SDXL and flow trainers of :mod:`medicsynth.diffusion.lora`.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from medicsynth.diffusion.tiny import TinyConfig, build_pipeline, count_parameters, save_pipeline
from medicsynth.manifest import resolve_file
from medicsynth.params import build_config
from medicsynth.shards import open_image


@dataclass
class TrainLog:
    """What one training phase did: per-step losses, steps, and its wall time (timing only)."""

    name: str
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        """Results of the phase: a function of data, code and params only (no wall-clock figure)."""
        tail = self.losses[-50:]
        return {
            "steps": self.steps,
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last50_mean": float(np.mean(tail)) if tail else None,
        }

    def timing(self) -> dict:
        """Wall-clock figures of the phase, for ``timing/adapt.json`` (see :mod:`medicsynth.timing`)."""
        return {"seconds": round(self.seconds, 2),
                "steps_per_second": round(self.steps / max(self.seconds, 1e-9), 3)}


def _lr_factor(progress: float, warmup_fraction: float) -> float:
    """Linear warm-up then cosine to zero, as a function of training progress in [0, 1]."""
    if progress < warmup_fraction:
        return max(progress / warmup_fraction, 1e-3)
    rest = (progress - warmup_fraction) / max(1.0 - warmup_fraction, 1e-9)
    return 0.5 * (1.0 + math.cos(math.pi * min(rest, 1.0)))


class PhaseTimeout(RuntimeError):
    """A training phase ran past its wall-clock limit; no model is written."""


class _Deadline:
    """Optional wall-clock limit of a phase: past it the stage fails, it never trains less.

    Steps alone decide the model (and the learning-rate schedule follows steps), so a rerun on a
    busier or slower machine gives the same model, only later. A limit exists to stop a stage
    that would take unreasonably long, with an error naming the params key to change.
    """

    def __init__(self, max_seconds: float | None, what: str, steps: int, key: str):
        if steps < 1:
            raise ValueError(f"{what}: a training phase needs steps >= 1, got {steps}")
        self.max_seconds = max_seconds if max_seconds and max_seconds > 0 else None
        self.what, self.steps, self.key = what, steps, key
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def check(self, step: int) -> None:
        """Raise :class:`PhaseTimeout` when the limit is passed before ``steps`` steps."""
        if self.max_seconds is not None and step < self.steps and self.elapsed() > self.max_seconds:
            raise PhaseTimeout(
                f"{self.what}: {step} of {self.steps} steps done after {self.elapsed():.0f} s, past the "
                f"limit {self.key} = {self.max_seconds:g} s. Stopping early would silently give a different "
                f"model, so the stage fails instead: raise {self.key} (0 = no limit) or lower the steps."
            )


def _set_lr(optimiser: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    for group in optimiser.param_groups:
        group["lr"] = base_lr * factor


# ---------------------------------------------------------------------------------------------
# Shared denoiser training loop


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float | None) -> torch.Tensor | None:
    """Per-sample loss weights of min-SNR-γ (Hang et al. 2023); ``None`` when ``gamma`` is off."""
    if not gamma:
        return None
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped / snr


def train_denoiser(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer,
    noise_scheduler,
    sample_batch: Callable[[torch.Generator], tuple[torch.Tensor, list[str]]],
    parameters: Sequence[torch.nn.Parameter],
    *,
    steps: int,
    lr: float,
    warmup_steps: int = 0,
    weight_decay: float = 1e-2,
    snr_gamma: float | None = 5.0,
    caption_dropout: float = 0.1,
    max_grad_norm: float = 1.0,
    max_seconds: float | None = None,
    limit_key: str = "max_seconds",
    autocast_dtype: torch.dtype | None = None,
    ema_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    name: str = "unet",
) -> TrainLog:
    """Train ``parameters`` to predict the noise added to latents from ``sample_batch``.

    ``sample_batch(generator)`` returns ``(latents, prompts)``: latents already scaled by the
    VAE's ``scaling_factor``, on the UNet's device. The text encoder runs with gradients when any
    of its parameters are in ``parameters`` (demo), frozen otherwise (LoRA). With ``ema_decay``
    > 0 the trained parameters end as their exponential moving average (warmed up as
    ``min(decay, (1 + step) / (10 + step))``), which smooths the last noisy updates of a short run.
    """
    device = next(unet.parameters()).device
    gen = torch.Generator("cpu").manual_seed(seed)
    optimiser = torch.optim.AdamW(list(parameters), lr=lr, weight_decay=weight_decay)
    trainable = [p for g in optimiser.param_groups for p in g["params"]]
    ema = [p.detach().clone() for p in trainable] if ema_decay > 0 else None
    text_trainable = any(p.requires_grad for p in text_encoder.parameters())
    deadline = _Deadline(max_seconds, f"adapt {name}", steps, limit_key)
    warmup_fraction = min(warmup_steps / steps, 0.5) if warmup_steps else 0.0
    log = TrainLog(name=name)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    unet.train()
    text_encoder.train(text_trainable)
    bar = tqdm(total=steps, desc=f"adapt {name}", disable=not progress, leave=False)
    step = 0
    while step < steps:
        deadline.check(step)
        _set_lr(optimiser, lr, _lr_factor(step / steps, warmup_fraction))
        latents, prompts = sample_batch(gen)
        bsz = latents.shape[0]
        drop = torch.rand(bsz, generator=gen) < caption_dropout
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        noise = torch.randn(latents.shape, generator=gen).to(device, latents.dtype)
        timesteps = torch.randint(0, num_train_timesteps, (bsz,), generator=gen).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            with torch.set_grad_enabled(text_trainable):
                hidden = text_encoder(ids, return_dict=False)[0]
            pred = unet(noisy, timesteps, encoder_hidden_states=hidden, return_dict=False)[0]
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        weights = min_snr_weights(noise_scheduler, timesteps, snr_gamma)
        loss = (per_sample * weights).mean() if weights is not None else per_sample.mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
        optimiser.step()
        if ema is not None:
            decay = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in trainable], 1.0 - decay)
        step += 1
        log.losses.append(float(loss.detach()))
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(log.losses[-10:]):.4f}")
    bar.close()
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(trainable, ema):
                p.copy_(e)
    unet.eval()
    text_encoder.eval()
    log.steps, log.seconds = step, deadline.elapsed()
    return log


# ---------------------------------------------------------------------------------------------
# Demo: the tiny pipeline from scratch


@dataclass(kw_only=True)
class DemoTrainConfig:
    """Hyper-parameters of demo training (``adapt.demo`` plus ``adapt.balance`` / ``adapt.seed``).

    Fields without a default are set by params.yaml, the one source of their values (build with
    :meth:`from_params`; a missing key is an error naming it). Fields with a default are recipe
    constants params.yaml does not list (an ``adapt.demo`` key of that name overrides them).
    """

    # Small batches, many updates: at equal compute, VAE batch 8 × 1100 steps reconstructed the
    # rare classes' colours far better than batch 32 × 300, and UNet batch 8 × 1500 steps beat
    # batch 16 × 750 by ~15 points of disaster-type agreement (same seed, same wall time).
    vae_steps: int
    vae_batch: int
    vae_crop: int = 32  # random crops: the notes found full-image VAE training less reliable
    vae_lr: float
    vae_kl_weight: float = 1e-6
    unet_steps: int
    unet_batch: int
    unet_lr: float
    warmup_steps: int
    caption_dropout: float
    snr_gamma: float
    ema_decay: float = 0.0
    latent_norm: str = "channel"  # channel (per-channel standardisation folded into the VAE) | global
    balance: str  # sample training images inversely to this task's class counts ("" = uniform)
    seed: int
    tiny: TinyConfig = field(default_factory=TinyConfig)

    @classmethod
    def from_params(cls, params: dict) -> "DemoTrainConfig":
        """Build from ``adapt.demo`` merged with ``balance`` and ``seed`` (keys of ``adapt``).

        Every key params.yaml sets is required (``KeyError`` naming ``adapt.demo.<key>``); an
        unknown key is a ``ValueError``; ``tiny`` (optional) holds :class:`TinyConfig` fields.
        """
        params = dict(params)
        removed = sorted(k for k in params if k in ("vae_max_seconds", "unet_max_seconds"))
        if removed:
            raise KeyError(
                f"adapt.demo: {removed} no longer exist: the demo model is decided by its steps alone "
                "(a time cap made it depend on how busy the machine was). Delete them from params.yaml "
                "and set adapt.demo.vae_steps / unet_steps instead."
            )
        return build_config(cls, params, "adapt.demo",
                            convert={"tiny": lambda d: TinyConfig.from_dict(d or {})})


def load_images(files: Sequence[str], size: int, root: str | Path = ".") -> torch.Tensor:
    """``(n, 3, size, size)`` uint8 tensor of ``files`` (relative paths resolved against ``root``).

    Images of another size are resized (bicubic); an unreadable file raises naming the file.
    """
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    for i, f in enumerate(tqdm(files, desc="adapt load images", leave=False, disable=len(files) < 500)):
        path = resolve_file(f, root)
        try:
            with open_image(path) as im:  # a file or a shard member
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.Resampling.BICUBIC)
                out[i] = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
        except (OSError, ValueError) as exc:
            raise OSError(f"adapt: cannot read training image {path} (row {i + 2} of the manifest): {exc}") from exc
    return out


def balanced_weights(labels: Sequence[str]) -> torch.Tensor:
    """Sampling weight per image, inverse to its class count, so every class is drawn equally."""
    values, inverse, counts = np.unique(np.asarray(labels, dtype=object), return_inverse=True, return_counts=True)
    return torch.as_tensor(1.0 / counts[inverse], dtype=torch.float64)


def _to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float().div(127.5).sub(1.0)


def train_vae(vae, images: torch.Tensor, cfg: DemoTrainConfig, weights: torch.Tensor | None = None,
              progress: bool = True) -> TrainLog:
    """Phase 1: train the tiny VAE on random ``vae_crop`` crops of ``images`` (uint8 NCHW).

    Loss = MSE + 0.5·L1 on the reconstruction + ``vae_kl_weight``·KL (per latent element), which
    keeps latents near N(0, 1) without blurring the 64 px images away. ``weights`` (per image)
    balance what the VAE sees: drawn uniformly, the rare classes' palettes (purple haze, brown
    slopes) came back as the common classes' colours — a demo classifier recognised 0% of
    reconstructed landslide and other_disaster test images (80% / 100% of the originals); with
    balanced crops and the default steps, 67–80% of both.
    """
    gen = torch.Generator("cpu").manual_seed(cfg.seed)
    optimiser = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=1e-4)
    deadline = _Deadline(None, "adapt vae", cfg.vae_steps, "")
    log = TrainLog(name="vae")
    n, _, h, w = images.shape
    crop = min(cfg.vae_crop, h, w)
    vae.train()
    bar = tqdm(total=cfg.vae_steps, desc="adapt vae", disable=not progress, leave=False)
    step = 0
    while step < cfg.vae_steps:
        _set_lr(optimiser, cfg.vae_lr, _lr_factor(step / cfg.vae_steps, 0.05))
        if weights is not None:
            idx = torch.multinomial(weights, cfg.vae_batch, replacement=True, generator=gen)
        else:
            idx = torch.randint(0, n, (cfg.vae_batch,), generator=gen)
        ys = torch.randint(0, h - crop + 1, (cfg.vae_batch,), generator=gen).tolist()
        xs = torch.randint(0, w - crop + 1, (cfg.vae_batch,), generator=gen).tolist()
        batch = torch.stack([images[i, :, y:y + crop, x:x + crop] for i, y, x in zip(idx.tolist(), ys, xs)])
        x = _to_unit(batch)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + cfg.vae_kl_weight * kl
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimiser.step()
        step += 1
        log.losses.append(float(loss.detach()))
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(log.losses[-10:]):.4f}")
    bar.close()
    vae.eval()
    log.steps, log.seconds = step, deadline.elapsed()
    return log


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of ``images`` (uint8 NCHW), unscaled."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        posterior = vae.encode(_to_unit(images[i:i + batch])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def standardise_latent_channels(vae, means: torch.Tensor) -> None:
    """Fold per-channel latent standardisation into the VAE's 1×1 ``quant_conv``/``post_quant_conv``.

    The tiny VAE's latent channels come out with very different offsets and spreads (e.g. means
    1.8 / -3.0 / 1.3 / -1.2, standard deviations 3.2 / 0.9 / 2.9 / 2.7); one global scale factor
    leaves the narrow channel's information drowned by the diffusion noise early. Rewriting the
    two 1×1 convolutions makes the encoder emit ``(z - mu) / sd`` and the decoder accept it —
    exactly the same autoencoder, still a standard ``AutoencoderKL`` with ``scaling_factor`` 1, so
    the pipeline directory stays loadable by any diffusers code.
    """
    c = means.shape[1]
    mu = means.mean(dim=(0, 2, 3)).double()
    sd = means.std(dim=(0, 2, 3)).double().clamp_min(1e-6)
    q, p = vae.quant_conv, vae.post_quant_conv
    qw, qb = q.weight.double(), q.bias.double()
    qw[:c] /= sd[:, None, None, None]
    qb[:c] = (qb[:c] - mu) / sd
    qb[c:] -= 2.0 * torch.log(sd)  # the second half of the moments is the log-variance
    pw, pb = p.weight.double(), p.bias.double()
    pb += pw[:, :, 0, 0] @ mu
    pw *= sd[None, :, None, None]
    for conv, w, b in ((q, qw, qb), (p, pw, pb)):
        conv.weight.copy_(w.to(conv.weight.dtype))
        conv.bias.copy_(b.to(conv.bias.dtype))


def train_demo(
    images: torch.Tensor,
    prompts: Sequence[str],
    balance_labels: Sequence[str] | None,
    cfg: DemoTrainConfig,
    progress: bool = True,
):
    """Train the tiny pipeline from scratch on ``images`` (uint8 NCHW) and their ``prompts``.

    Returns ``(pipeline, logs)`` where ``logs`` holds the VAE and UNet :class:`TrainLog`.
    ``balance_labels`` (one label per image) makes phase 2 draw every class equally often, so
    minority classes — the ones synthetic images are for — are learnt as well as common ones.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if len(images) == 0:
        raise ValueError("adapt demo: no training images")
    torch.manual_seed(cfg.seed)
    pipe = build_pipeline(cfg.tiny, seed=cfg.seed)
    vae, unet, text_encoder = pipe.vae, pipe.unet, pipe.text_encoder

    weights = balanced_weights(balance_labels) if balance_labels is not None else None
    vae_log = train_vae(vae, images, cfg, weights=weights, progress=progress)
    vae.requires_grad_(False)
    means, _ = encode_images(vae, images)
    if cfg.latent_norm == "channel":
        standardise_latent_channels(vae, means)
        scaling = 1.0
    elif cfg.latent_norm == "global":
        # SD's way: one factor (its 0.18215) to unit variance; generate divides by it.
        scaling = float(1.0 / means.std().clamp_min(1e-6))
    else:
        raise ValueError(f"adapt.demo.latent_norm must be channel or global, got {cfg.latent_norm!r}")
    vae.register_to_config(scaling_factor=scaling)
    means, stds = encode_images(vae, images)

    prompts = list(prompts)

    def sample_batch(gen: torch.Generator):
        if weights is not None:
            idx = torch.multinomial(weights, cfg.unet_batch, replacement=True, generator=gen)
        else:
            idx = torch.randint(0, len(prompts), (cfg.unet_batch,), generator=gen)
        z = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)
        return z * scaling, [prompts[i] for i in idx.tolist()]

    params = [*unet.parameters(), *text_encoder.parameters()]
    unet_log = train_denoiser(
        unet, text_encoder, pipe.tokenizer, pipe.scheduler, sample_batch, params,
        steps=cfg.unet_steps, lr=cfg.unet_lr, warmup_steps=cfg.warmup_steps,
        snr_gamma=cfg.snr_gamma, caption_dropout=cfg.caption_dropout,
        ema_decay=cfg.ema_decay, seed=cfg.seed + 1, progress=progress,
        name="unet+text",
    )
    return pipe, {"vae": vae_log, "unet": unet_log}


def demo_metrics(cfg: DemoTrainConfig, pipe, logs: dict[str, TrainLog], n_images: int) -> dict:
    """The ``metrics/adapt.json`` content for a demo run."""
    return {
        "mode": "demo",
        "train_images": n_images,
        "parameters": {
            "vae": count_parameters(pipe.vae),
            "unet": count_parameters(pipe.unet),
            "text_encoder": count_parameters(pipe.text_encoder),
        },
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
        "phases": {name: log.summary() for name, log in logs.items()},
        "config": asdict(cfg),
    }


# ---------------------------------------------------------------------------------------------
# LoRA on a real Stable Diffusion checkpoint


@dataclass(kw_only=True)
class LoraTrainConfig:
    """Hyper-parameters of LoRA training (``adapt.lora`` plus ``adapt.balance`` / ``adapt.seed``).

    Fields without a default are set by params.yaml (build with :meth:`from_params`; a missing
    key is an error naming it); fields with a default are constants params.yaml does not list.
    """

    base_model: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    steps: int
    batch: int
    lr: float
    warmup_steps: int = 100
    resolution: int
    snr_gamma: float = 5.0
    caption_dropout: float = 0.1
    gradient_checkpointing: bool
    mixed_precision: str  # bf16 | fp16 | no (fp32; what CPU tests use)
    balance: str
    max_seconds: float = 0.0  # wall-clock limit: past it the stage fails (never a shorter run); 0 = none
    num_workers: int = 4
    seed: int
    device: str = "auto"  # auto | cpu | cuda (medicsynth.devices.choose_device)

    @classmethod
    def from_params(cls, params: dict) -> "LoraTrainConfig":
        """Build from ``adapt.lora``'s trainer keys merged with ``balance`` and ``seed``.

        Every key params.yaml sets is required (``KeyError`` naming ``adapt.lora.<key>``); an
        unknown key is a ``ValueError``.
        """
        return build_config(cls, params, "adapt.lora", convert={"target_modules": tuple})


class _ImageFiles(torch.utils.data.Dataset):
    """Files → ``[-1, 1]`` tensors: shorter side resized to ``resolution``, centre crop."""

    def __init__(self, files: Sequence[str], prompts: Sequence[str], resolution: int, root: str | Path = "."):
        self.files, self.prompts, self.resolution, self.root = list(files), list(prompts), resolution, Path(root)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        f = self.files[i]
        path = resolve_file(f, self.root)
        try:
            with open_image(path) as im:  # a file or a shard member
                im = im.convert("RGB")
                scale = self.resolution / min(im.size)
                im = im.resize((max(self.resolution, round(im.width * scale)), max(self.resolution, round(im.height * scale))),
                               Image.Resampling.BICUBIC)
                left, top = (im.width - self.resolution) // 2, (im.height - self.resolution) // 2
                im = im.crop((left, top, left + self.resolution, top + self.resolution))
                arr = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
        except (OSError, ValueError) as exc:
            raise OSError(f"adapt lora: cannot read training image {path}: {exc}") from exc
        return _to_unit(arr), self.prompts[i]


def _autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    if mixed_precision == "no":
        return None
    if mixed_precision not in ("bf16", "fp16"):
        raise ValueError(f"adapt.lora.mixed_precision must be bf16, fp16 or no, got {mixed_precision!r}")
    if device.type != "cuda":
        return None  # autocast to half precision on CPU is slow and not what a CPU test wants
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """A context in which torch's global CPU RNG starts at ``seed``; its state is restored after.

    peft draws the LoRA ``A`` matrices (``init_lora_weights="gaussian"``) from the global RNG on
    the CPU (before moving them to the base layer's device); seeding it here makes the adapters a
    function of ``adapt.seed`` alone, whatever ran before in the process.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@dataclass
class LoraSetup:
    """What :func:`prepare_lora` hands a LoRA trainer.

    ``params``: the LoRA weights (fp32, ``requires_grad``), the only ones to optimise;
    ``generator``: the CPU generator seeded with ``adapt.seed`` that the sampler draws from (the
    trainers draw their caption dropout, noise and timesteps from it too); ``loader``: batches of
    ``dataset`` items, ``steps * batch`` draws in all, whole batches only.
    """

    params: list[torch.nn.Parameter]
    generator: torch.Generator
    loader: torch.utils.data.DataLoader


def prepare_lora(
    denoiser: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    balance_labels: Sequence[str] | None,
    cfg: LoraTrainConfig,
    device: torch.device,
) -> LoraSetup:
    """Add LoRA adapters to ``denoiser`` and build the seeded data loader: the set-up of every family.

    Parameters
    ----------
    denoiser
        The frozen UNet or transformer, already on ``device`` in its weight dtype.
    dataset
        The training items (:class:`_ImageFiles` or a subclass), one per image.
    balance_labels
        One label per item: items are drawn inversely to their class counts (``None``: uniform).
    cfg
        ``rank``, ``alpha``, ``target_modules`` (peft ``LoraConfig``, gaussian init),
        ``gradient_checkpointing``, ``steps``, ``batch``, ``num_workers`` and ``seed``.

    The adapters' initialisation is drawn under :func:`seeded_init` (``cfg.seed``) and the global
    RNG is restored after, so the adapters do not depend on what ran before in the process; the
    LoRA weights are cast to fp32 (optimiser state and updates in fp32 whatever the frozen
    weights' dtype). The sampler draws from its own generator, so the batches are a function of
    ``cfg.seed`` and the labels alone (worker processes only decode files: no randomness).
    """
    from peft import LoraConfig

    if cfg.steps < 1 or cfg.batch < 1:
        # Checked here, before the sampler would fail with its own message naming no key.
        raise ValueError(f"adapt.lora: steps and batch must be >= 1, got steps={cfg.steps}, batch={cfg.batch}; "
                         "fix adapt.lora in params.yaml")
    with seeded_init(cfg.seed):
        denoiser.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                                        target_modules=list(cfg.target_modules)))
    params = [p for p in denoiser.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    gen = torch.Generator("cpu").manual_seed(cfg.seed)
    weights = balanced_weights(balance_labels) if balance_labels is not None else torch.ones(len(dataset), dtype=torch.float64)
    sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=cfg.steps * cfg.batch, generator=gen)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch, sampler=sampler, num_workers=cfg.num_workers,
                                         pin_memory=device.type == "cuda", drop_last=True)
    return LoraSetup(params, gen, loader)


def train_lora(
    pipe,
    files: Sequence[str],
    prompts: Sequence[str],
    balance_labels: Sequence[str] | None,
    cfg: LoraTrainConfig,
    device: torch.device,
    root: str | Path = ".",
    progress: bool = True,
) -> TrainLog:
    """Add LoRA adapters to ``pipe.unet`` and train them on ``files`` / ``prompts``.

    ``pipe`` is a loaded :class:`~diffusers.StableDiffusionPipeline`; its VAE and text encoder stay
    frozen. Frozen weights are kept in the autocast dtype on CUDA to halve memory; LoRA weights
    are trained in fp32. Adapters and loader come from :func:`prepare_lora` (adapters seeded by
    ``cfg.seed``); the optimiser (AdamW, weight decay 1e-2) and the noise/timestep generator are
    :func:`train_denoiser`'s, as for the demo. Returns the UNet phase's :class:`TrainLog`; the
    adapters stay attached to ``pipe.unet`` (save them with :func:`save_lora`).
    """
    autocast_dtype = _autocast_dtype(cfg.mixed_precision, device)
    weight_dtype = autocast_dtype or torch.float32
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    vae.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    unet.to(device, dtype=weight_dtype)
    setup = prepare_lora(unet, _ImageFiles(files, prompts, cfg.resolution, root), balance_labels, cfg, device)
    batches = iter(setup.loader)
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    @torch.no_grad()
    def sample_batch(_gen: torch.Generator):
        pixels, batch_prompts = next(batches)
        posterior = vae.encode(pixels.to(device, weight_dtype, non_blocking=True)).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=_gen).to(device, posterior.mean.dtype)
        return ((z - shift) * scaling).to(weight_dtype), list(batch_prompts)

    return train_denoiser(
        unet, text_encoder, pipe.tokenizer, pipe.scheduler, sample_batch, setup.params,
        steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, snr_gamma=cfg.snr_gamma,
        caption_dropout=cfg.caption_dropout, max_seconds=cfg.max_seconds, limit_key="adapt.lora.max_seconds",
        autocast_dtype=autocast_dtype, seed=cfg.seed, progress=progress, name="lora",
    )


def save_lora(pipe, out_dir: str | Path) -> Path:
    """Write the UNet's LoRA weights as ``pytorch_lora_weights.safetensors`` in ``out_dir``.

    The directory is written next to its destination and renamed into place, so a kill never
    leaves a half-written adapter that generate would load.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    return _atomic_dir(out_dir, lambda tmp: StableDiffusionPipeline.save_lora_weights(
        tmp, unet_lora_layers=state, safe_serialization=True))


def atomic_dir(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` then swap ``tmp_dir`` into ``out_dir`` (replacing an old one).

    A kill before the swap leaves ``out_dir`` as it was (the temporary sibling is removed on
    the next call's cleanup or by hand); readers never see a half-written directory.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        write(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old."))
            old.rmdir()
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


_atomic_dir = atomic_dir  # the old private name, kept for callers not yet updated


def save_demo_pipeline(pipe, out_dir: str | Path, meta: dict) -> Path:
    """Save the demo pipeline atomically (see :func:`medicsynth.diffusion.tiny.save_pipeline`)."""
    return _atomic_dir(out_dir, lambda tmp: save_pipeline(pipe, tmp, meta))
