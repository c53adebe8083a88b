"""``adapt.mode: lora`` for every generator family: SD 1.x/2.x, SDXL, SD 3/3.5 and FLUX.1.

The family is read from the base model's ``model_index.json`` (:mod:`medicsynth.diffusion.families`).

- **SD 1.x/2.x** (UNet, DDPM objective): :func:`medicsynth.diffusion.train.train_lora`
  (ε/v-prediction, min-SNR-γ weighting).
- **SDXL** (UNet, DDPM objective, two CLIP text encoders): :func:`train_sdxl_lora`, the recipe of
  diffusers' ``train_dreambooth_lora_sdxl.py``: frozen VAE (fp32) and text encoders, LoRA (peft)
  on the UNet's attention projections; the prompt embedding is the penultimate hidden states of
  both encoders concatenated, the UNet's added conditions are the pooled embedding of
  ``text_encoder_2`` (``text_embeds``) and the micro-conditioning ``time_ids`` = original size
  (h, w) + crop top-left (top, left) + target size (h, w) of each training image; the noise
  schedule is a ``DDPMScheduler`` built from the base model's scheduler config (ε or
  v-prediction, min-SNR-γ weighting as for SD 1.x/2.x).
- **SD 3/3.5 and FLUX.1** (transformer, rectified flow): :func:`train_flow_lora`, the recipe of
  diffusers' ``train_dreambooth_lora_sd3.py`` / ``train_dreambooth_lora_flux.py``: frozen VAE and
  text encoders, LoRA (peft) on the transformer's attention projections; latents
  ``(z - shift_factor) * scaling_factor``; a timestep drawn by
  ``compute_density_for_timestep_sampling`` (logit-normal by default) and looked up in the
  flow-matching scheduler's sigmas; ``x_t = (1 - σ) x_0 + σ ε``; the target is the velocity
  ``ε - x_0``, the loss weighted by ``compute_loss_weighting_for_sd3``. FLUX latents are packed
  into 2×2 patches with their position ids, and the guidance-distilled FLUX.1-dev gets its
  embedded guidance value (the scripts' default 3.5).

Whatever the family, the set-up is :func:`~medicsynth.diffusion.train.prepare_lora`: the
adapters' random initialisation is drawn under :func:`~medicsynth.diffusion.train.seeded_init`
(``adapt.seed``), the LoRA weights train in fp32 and the class-balanced sampler draws from a
generator seeded alike, so the adapter is a function of data, code and params (on a given device);
:func:`save_lora_weights` writes ``pytorch_lora_weights.safetensors`` with the family's own
``save_lora_weights``, into a directory swapped in atomically; generate loads it with
``load_lora_weights`` and fuses it into the denoiser.

:func:`adapt_lora` is the whole ``lora`` mode of the adapt stage (load, caption, train, save).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from medicsynth.devices import choose_device
from medicsynth.diffusion.families import Family, detect_family
from medicsynth.diffusion.train import (
    LoraSetup,
    LoraTrainConfig,
    TrainLog,
    _autocast_dtype,
    _Deadline,
    _ImageFiles,
    atomic_dir,
    min_snr_weights,
    prepare_lora,
    train_lora,
)
from medicsynth.manifest import resolve_file
from medicsynth.params import build_config, require
from medicsynth.shards import open_image

#: adapt.lora keys used only by the flow families (the rest are LoraTrainConfig fields).
FLOW_KEYS = ("guidance", "weighting_scheme", "max_sequence_length")


@dataclass(frozen=True)
class FlowOptions:
    """Flow-matching extras (``adapt.lora`` keys ``FLOW_KEYS``; no defaults: params.yaml sets them)."""

    guidance: float  # FLUX.1-dev's embedded guidance during training (ignored without guidance_embeds)
    weighting_scheme: str  # timestep density: logit_normal | mode | cosmap | sigma_sqrt | none
    max_sequence_length: int  # T5 tokens; 0 = the pipeline's default (SD3 256, FLUX 512)


def load_base_pipeline(model_dir: str | Path, family: Family):
    """The base pipeline on the CPU in fp32, without safety checker (moved/cast by the trainer)."""
    kwargs = {"local_files_only": True}
    if family.name == "sd":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False, **kwargs)
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model_dir, **kwargs)


def _get_sigmas(scheduler, timesteps: torch.Tensor, n_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """σ of each timestep from the flow-matching scheduler's table, shaped to broadcast over latents."""
    schedule = scheduler.timesteps.to(timesteps.device)
    sigmas = scheduler.sigmas.to(timesteps.device, dtype)
    idx = torch.stack([(schedule == t).nonzero()[0, 0] for t in timesteps])
    sigma = sigmas[idx].flatten()
    while sigma.ndim < n_dim:
        sigma = sigma.unsqueeze(-1)
    return sigma


def _train_steps(
    denoiser: torch.nn.Module,
    setup: LoraSetup,
    cfg: LoraTrainConfig,
    name: str,
    loss_of: Callable[[tuple], torch.Tensor],
    progress: bool = True,
) -> TrainLog:
    """The optimisation loop of the SDXL and flow LoRA trainers (diffusers' DreamBooth-LoRA scripts).

    Parameters
    ----------
    denoiser
        The UNet or transformer carrying the adapters (train mode during the loop, eval after).
    setup
        From :func:`~medicsynth.diffusion.train.prepare_lora`: the LoRA parameters and the loader.
    cfg
        ``steps``, ``lr``, ``warmup_steps`` and ``max_seconds`` of ``adapt.lora``.
    name
        The family, for the log (``lora-<name>``), the progress bar and the time-limit error.
    loss_of
        ``loss_of(batch)``: the scalar loss of one batch of ``setup.loader``; its randomness comes
        from ``setup.generator``, so the adapters are a function of data, code and params.

    Per batch: learning rate ``cfg.lr`` with a linear warm-up over ``warmup_steps`` then constant
    (the scripts' ``constant_with_warmup``), the loss, AdamW (weight decay 1e-4) with gradients
    clipped at norm 1; ``cfg.steps`` steps. Past ``max_seconds`` it raises
    :class:`~medicsynth.diffusion.train.PhaseTimeout`: stopping early would silently save a
    shorter-trained adapter (steps alone decide the model). Returns the phase's :class:`TrainLog`.
    """
    from tqdm import tqdm

    optimiser = torch.optim.AdamW(setup.params, lr=cfg.lr, weight_decay=1e-4)
    deadline = _Deadline(cfg.max_seconds, f"adapt lora {name}", cfg.steps, "adapt.lora.max_seconds")
    log = TrainLog(name=f"lora-{name}")
    denoiser.train()
    bar = tqdm(total=cfg.steps, desc=f"adapt lora {name}", disable=not progress, leave=False)
    step = 0
    for batch in setup.loader:
        deadline.check(step)
        for group in optimiser.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        loss = loss_of(batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(setup.params, 1.0)
        optimiser.step()
        step += 1
        log.losses.append(float(loss.detach()))
        bar.update(1)
        if step >= cfg.steps:
            break
    bar.close()
    denoiser.eval()
    log.steps, log.seconds = step, deadline.elapsed()
    return log


def train_flow_lora(
    pipe,
    family: Family,
    files: Sequence[str],
    prompts: Sequence[str],
    balance_labels: Sequence[str] | None,
    cfg: LoraTrainConfig,
    flow: FlowOptions,
    device: torch.device,
    root: str | Path = ".",
    progress: bool = True,
) -> TrainLog:
    """Add LoRA adapters to ``pipe.transformer`` (SD 3/3.5 or FLUX.1) and train them.

    Parameters
    ----------
    pipe
        A loaded ``StableDiffusion3Pipeline`` or ``FluxPipeline``; VAE and text encoders stay
        frozen (in the autocast dtype on CUDA), the LoRA weights train in fp32.
    files, prompts
        Training images (``root``-relative paths) and their captions, same length.
    balance_labels
        One label per image: images are drawn inversely to their class counts (``None``: uniform).
    cfg, flow
        ``adapt.lora`` settings (steps, batch, lr, warm-up, rank/alpha/targets, resolution,
        caption dropout, gradient checkpointing, mixed precision, time cap, seed) and the flow
        extras (:class:`FlowOptions`).

    Returns the phase's :class:`TrainLog`; the adapters stay attached to ``pipe.transformer``
    (save them with :func:`save_lora_weights`). Seeded: the same inputs give the same adapters
    on the same device.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    if len(files) != len(prompts) or not files:
        raise ValueError(f"adapt lora: {len(files)} images and {len(prompts)} prompts (need the same, > 0)")
    autocast_dtype = _autocast_dtype(cfg.mixed_precision, device)
    weight_dtype = autocast_dtype or torch.float32
    transformer, vae = pipe.transformer, pipe.vae
    encoders = [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if getattr(pipe, n, None) is not None]
    for module in (transformer, vae, *encoders):
        module.requires_grad_(False)
        module.to(device, dtype=weight_dtype)
    # Step 1: seeded adapters (fp32), data sampled (class-balanced) by a seeded generator.
    setup = prepare_lora(transformer, _ImageFiles(files, prompts, cfg.resolution, root), balance_labels, cfg, device)
    gen = setup.generator
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # a copy: the pipeline's stays untouched
    n_train = scheduler.config.num_train_timesteps
    scaling, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    seq_kwargs = {"max_sequence_length": flow.max_sequence_length} if flow.max_sequence_length else {}
    is_flux = family.name == "flux"

    def encode(batch_prompts: list[str]):
        with torch.no_grad():
            if is_flux:
                embeds, pooled, text_ids = pipe.encode_prompt(batch_prompts, prompt_2=None, device=device, **seq_kwargs)
                return embeds, pooled, text_ids
            embeds, _, pooled, _ = pipe.encode_prompt(batch_prompts, None, None, device=device,
                                                      do_classifier_free_guidance=False, **seq_kwargs)
            return embeds, pooled, None

    def loss_of(batch) -> torch.Tensor:
        pixels, batch_prompts = batch
        # Step 2: captions dropped for the unconditional prediction; latents of the batch.
        drop = torch.rand(len(batch_prompts), generator=gen) < cfg.caption_dropout
        batch_prompts = ["" if d else p for p, d in zip(batch_prompts, drop.tolist())]
        embeds, pooled, text_ids = encode(batch_prompts)
        with torch.no_grad():
            posterior = vae.encode(pixels.to(device, weight_dtype)).latent_dist
            x0 = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device, posterior.mean.dtype)
            x0 = ((x0 - shift) * scaling).to(weight_dtype)
        # Step 3: timesteps from the density, σ from the scheduler, the noisy latents.
        bsz = x0.shape[0]
        u = compute_density_for_timestep_sampling(weighting_scheme=flow.weighting_scheme, batch_size=bsz,
                                                  logit_mean=0.0, logit_std=1.0, mode_scale=1.29, generator=gen)
        idx = (u * n_train).long().clamp(max=n_train - 1)
        timesteps = scheduler.timesteps[idx].to(device)
        sigmas = _get_sigmas(scheduler, timesteps, x0.ndim, x0.dtype)
        noise = torch.randn(x0.shape, generator=gen).to(device, x0.dtype)
        noisy = (1.0 - sigmas) * x0 + sigmas * noise
        # Step 4: the velocity prediction.
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            if is_flux:
                b, c, h, w = noisy.shape
                packed = pipe._pack_latents(noisy, b, c, h, w)
                img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, device, weight_dtype)
                guidance = (torch.full((b,), flow.guidance, device=device)
                            if transformer.config.guidance_embeds else None)
                pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                   pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                   img_ids=img_ids, return_dict=False)[0]
                scale = pipe.vae_scale_factor
                pred = pipe._unpack_latents(pred, height=h * scale, width=w * scale, vae_scale_factor=scale)
            else:
                pred = transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds,
                                   pooled_projections=pooled, return_dict=False)[0]
        target = noise - x0
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=flow.weighting_scheme, sigmas=sigmas)
        return (weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1).mean(1).mean()

    # Step 5: the loop (learning-rate warm-up, update, time limit) shared with SDXL.
    return _train_steps(transformer, setup, cfg, family.name, loss_of, progress)


# ---------------------------------------------------------------------------------------------
# SDXL: a UNet conditioned on two text encoders, a pooled embedding and size/crop time ids


def crop_geometry(width: int, height: int, resolution: int) -> tuple[int, int]:
    """``(top, left)`` of the square crop the LoRA trainers take of a ``width``×``height`` image.

    :class:`~medicsynth.diffusion.train._ImageFiles` resizes the shorter side to ``resolution``
    (the longer one to ``max(resolution, round(side * scale))``) and takes the centred
    ``resolution``² crop; this is its top-left corner in the resized image, as SDXL's
    ``crops_coords_top_left`` expects (diffusers' script records the same after its resize).
    """
    scale = resolution / min(width, height)
    resized_w = max(resolution, round(width * scale))
    resized_h = max(resolution, round(height * scale))
    return (resized_h - resolution) // 2, (resized_w - resolution) // 2


class _SizedImageFiles(_ImageFiles):
    """:class:`_ImageFiles` items plus each image's SDXL micro-conditioning.

    Item ``i`` is ``(pixels, prompt, time_ids)``: ``pixels`` a ``(3, resolution, resolution)``
    tensor in ``[-1, 1]``, ``time_ids`` an int64 tensor of 6 values: original ``(height,
    width)``, crop ``(top, left)`` (:func:`crop_geometry`), target ``(resolution, resolution)``.
    """

    def __getitem__(self, i: int):
        pixels, prompt = super().__getitem__(i)  # a broken file fails here, its path named
        f = self.files[i]
        with open_image(resolve_file(f, self.root)) as im:  # the header only: the size before any resize
            width, height = im.size
        top, left = crop_geometry(width, height, self.resolution)
        time_ids = torch.tensor([height, width, top, left, self.resolution, self.resolution], dtype=torch.int64)
        return pixels, prompt, time_ids


def train_sdxl_lora(
    pipe,
    files: Sequence[str],
    prompts: Sequence[str],
    balance_labels: Sequence[str] | None,
    cfg: LoraTrainConfig,
    device: torch.device,
    root: str | Path = ".",
    progress: bool = True,
) -> TrainLog:
    """Add LoRA adapters to ``pipe.unet`` of an SDXL pipeline and train them.

    Parameters
    ----------
    pipe
        A loaded :class:`~diffusers.StableDiffusionXLPipeline` (``text_encoder`` optional,
        ``text_encoder_2`` with projection required: it gives the pooled embedding). Text
        encoders and UNet are kept in the autocast dtype on CUDA, the VAE in fp32 (SDXL's VAE
        overflows in fp16; diffusers' script does the same); the LoRA weights train in fp32.
    files, prompts
        Training images (``root``-relative paths) and their captions, same length, > 0.
    balance_labels
        One label per image: images are drawn inversely to their class counts (``None``: uniform).
    cfg
        ``adapt.lora`` settings: steps, batch, lr (AdamW, weight decay 1e-4, linear warm-up over
        ``warmup_steps`` then constant, gradients clipped at norm 1), rank/alpha/targets,
        resolution (square crops), caption dropout (dropped captions encode ``""`` through both
        encoders), ``snr_gamma`` (min-SNR-γ), gradient checkpointing, mixed precision,
        ``max_seconds`` (past it the stage fails: it never trains less), seed.

    Each step: latents ``z * scaling_factor`` (or ``(z - latents_mean) * scaling_factor /
    latents_std`` when the VAE config has them, as the pipeline decodes), a uniform DDPM timestep,
    ``noise_scheduler.add_noise``; the UNet gets the prompt embedding (penultimate hidden states
    of both encoders, concatenated: the pipeline's own ``encode_prompt``) and
    ``added_cond_kwargs`` ``text_embeds`` (pooled, ``(batch, projection_dim)``) and ``time_ids``
    (``(batch, 6)``, per image, see :class:`_SizedImageFiles`); the target is the noise (or the
    velocity for v-prediction). Returns the phase's :class:`TrainLog`; the adapters stay attached
    to ``pipe.unet`` (save them with :func:`save_lora_weights`). Seeded: the same inputs give the
    same adapters on the same device.
    """
    from diffusers import DDPMScheduler

    if len(files) != len(prompts) or not files:
        raise ValueError(f"adapt lora: {len(files)} images and {len(prompts)} prompts (need the same, > 0)")
    if getattr(pipe, "text_encoder_2", None) is None:
        raise ValueError("adapt lora sdxl: the pipeline has no text_encoder_2 (its pooled embedding conditions the UNet)")
    # The pipeline's own check that the UNet's added embedding takes 6 time ids + the pooled width.
    pipe._get_add_time_ids((cfg.resolution, cfg.resolution), (0, 0), (cfg.resolution, cfg.resolution), torch.float32,
                           text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the scripts' training schedule
    prediction = noise_scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"adapt lora sdxl: scheduler prediction_type {prediction!r} (need epsilon or v_prediction)")
    autocast_dtype = _autocast_dtype(cfg.mixed_precision, device)
    weight_dtype = autocast_dtype or torch.float32
    unet, vae = pipe.unet, pipe.vae
    encoders = [m for m in (pipe.text_encoder, pipe.text_encoder_2) if m is not None]
    for module in (unet, *encoders):
        module.requires_grad_(False)
        module.to(device, dtype=weight_dtype)
    vae.requires_grad_(False)
    vae.to(device, dtype=torch.float32)
    # Step 1: seeded adapters (fp32), data (with each image's size and crop) sampled
    # (class-balanced) by a seeded generator.
    setup = prepare_lora(unet, _SizedImageFiles(files, prompts, cfg.resolution, root), balance_labels, cfg, device)
    gen = setup.generator
    n_train = noise_scheduler.config.num_train_timesteps
    scaling = vae.config.scaling_factor
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).to(device)
        std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).to(device)
    else:
        mean = std = None

    def loss_of(batch) -> torch.Tensor:
        pixels, batch_prompts, time_ids = batch
        # Step 2: captions dropped for the unconditional prediction; both encoders; latents.
        drop = torch.rand(len(batch_prompts), generator=gen) < cfg.caption_dropout
        batch_prompts = ["" if d else p for p, d in zip(batch_prompts, drop.tolist())]
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(list(batch_prompts), None, device=device,
                                                      do_classifier_free_guidance=False)
            posterior = vae.encode(pixels.to(device, torch.float32)).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device, posterior.mean.dtype)
            x0 = ((z - mean) * scaling / std if mean is not None else z * scaling).to(weight_dtype)
        # Step 3: a uniform DDPM timestep per image, the noisy latents, the target.
        bsz = x0.shape[0]
        noise = torch.randn(x0.shape, generator=gen).to(device, x0.dtype)
        timesteps = torch.randint(0, n_train, (bsz,), generator=gen).to(device)
        noisy = noise_scheduler.add_noise(x0, noise, timesteps)
        target = noise_scheduler.get_velocity(x0, noise, timesteps) if prediction == "v_prediction" else noise
        # Step 4: the UNet with SDXL's added conditions (pooled text embedding, size/crop time ids).
        added = {"text_embeds": pooled.to(device, weight_dtype), "time_ids": time_ids.to(device, weight_dtype)}
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            pred = unet(noisy, timesteps, encoder_hidden_states=embeds.to(weight_dtype), added_cond_kwargs=added,
                        return_dict=False)[0]
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        snr = min_snr_weights(noise_scheduler, timesteps, cfg.snr_gamma)
        return (per_sample * snr).mean() if snr is not None else per_sample.mean()

    # Step 5: the loop (learning-rate warm-up, update, time limit) shared with the flow families.
    return _train_steps(unet, setup, cfg, "sdxl", loss_of, progress)


def save_lora_weights(pipe, family: Family, out_dir: str | Path) -> Path:
    """Write the denoiser's LoRA as ``pytorch_lora_weights.safetensors`` in ``out_dir``, atomically.

    Uses the family's pipeline class (``StableDiffusionPipeline``/``StableDiffusionXLPipeline``/
    ``StableDiffusion3Pipeline``/``FluxPipeline``) ``save_lora_weights`` (``unet_lora_layers`` for
    the UNet families, ``transformer_lora_layers`` for the others), so ``load_lora_weights`` of
    that class reads it.
    """
    import diffusers
    from peft.utils import get_peft_model_state_dict

    if not family.lora_pipeline:
        raise ValueError(f"adapt lora: no LoRA format known for the {family.name} family")
    denoiser = getattr(pipe, family.denoiser)
    state = get_peft_model_state_dict(denoiser)
    if family.denoiser == "unet":
        from diffusers.utils import convert_state_dict_to_diffusers

        state = convert_state_dict_to_diffusers(state)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    cls = getattr(diffusers, family.lora_pipeline)
    key = "unet_lora_layers" if family.denoiser == "unet" else "transformer_lora_layers"
    return atomic_dir(out_dir, lambda tmp: cls.save_lora_weights(tmp, **{key: state}, safe_serialization=True))


def adapt_lora(params: dict, train: pd.DataFrame, out_dir: str | Path, progress: bool = True) -> tuple[dict, dict]:
    """The adapt stage's ``lora`` mode: returns ``(logs, metrics)`` and writes ``{out_dir}/lora``.

    Parameters
    ----------
    params
        The ``adapt`` section: ``lora`` (``base_model``, ``captions``: template | labels, the
        :class:`~medicsynth.diffusion.train.LoraTrainConfig` fields and the flow extras of
        :class:`FlowOptions`), ``balance``, ``seed``.
    train
        Training rows (``file`` and the four labels).

    The base model is resolved offline (a directory or the local HF cache, never downloaded).
    """
    from medicsynth.diffusion.generate import resolve_model
    from medicsynth.diffusion.tiny import label_prompt

    lora_params = dict(require(params, "adapt", "lora") or {})
    captions = require(lora_params, "adapt.lora", "captions")
    flow = build_config(FlowOptions, {k: lora_params[k] for k in FLOW_KEYS if k in lora_params}, "adapt.lora")
    trainer = {k: v for k, v in lora_params.items() if k not in ("captions", *FLOW_KEYS)}
    balance = require(params, "adapt", "balance") or None
    cfg = LoraTrainConfig.from_params({**trainer, "balance": balance or "", "seed": require(params, "adapt", "seed")})
    device = choose_device(cfg.device, key="adapt.lora.device")
    ref = resolve_model(cfg.base_model)
    family = detect_family(ref.path)
    pipe = load_base_pipeline(ref.path, family)
    rows = train.to_dict("records")
    if captions == "template":
        from medicsynth.captions import template_caption

        prompts = [template_caption(r, seed=i) for i, r in enumerate(rows)]
    elif captions == "labels":
        prompts = [label_prompt(r) for r in rows]
    else:
        raise ValueError(f"adapt.lora.captions must be template or labels, got {captions!r}")
    files = train["file"].tolist()
    labels = train[balance].tolist() if balance else None
    if family.objective == "flow":
        log = train_flow_lora(pipe, family, files, prompts, labels, cfg, flow, device, progress=progress)
    elif family.name == "sd":
        log = train_lora(pipe, files, prompts, labels, cfg, device, progress=progress)
    elif family.name == "sdxl":
        log = train_sdxl_lora(pipe, files, prompts, labels, cfg, device, progress=progress)
    else:
        raise ValueError(f"adapt.mode lora: the {family.name} family ({cfg.base_model}) has no LoRA trainer here; "
                         "supported: sd, sdxl, sd3, flux")
    # The whole output directory is swapped in at once: no stale demo model or old adapter survives.
    atomic_dir(Path(out_dir), lambda tmp: save_lora_weights(pipe, family, tmp / "lora"))
    metrics = {"mode": "lora", "family": family.name, "base_model": cfg.base_model, "base_fingerprint": ref.fingerprint,
               "train_images": len(train), "device": str(device), "captions": captions,
               "phases": {"lora": log.summary()},
               "config": {**vars(cfg), "target_modules": list(cfg.target_modules), **vars(flow)}}
    return {"lora": log}, metrics
