"""Generator families: what differs between SD 1.x/2.x, SDXL, SD 3/3.5 and FLUX.1 pipelines.

A pipeline directory's ``model_index.json`` names its pipeline class (``_class_name``), and the
class names its family. :func:`detect_family` reads it; the returned :class:`Family` says

- which component denoises (``unet`` or ``transformer``) and how it was trained (``eps``: DDPM
  noise/v-prediction; ``flow``: rectified flow, the velocity ``noise - x0``);
- whether the pipeline takes a negative prompt (FLUX.1-dev is guidance-distilled: its
  ``guidance_scale`` is an embedded conditioning value, not classifier-free guidance, and it has
  no negative prompt; SD3 has one, encoded by all three text encoders);
- the family's defaults for ``generate.steps``/``guidance``/``scheduler`` when they are ``auto``
  (the values of the models' own model cards);
- the LoRA target modules (the attention projections, as diffusers' DreamBooth-LoRA scripts use)
  and the pipeline class whose ``save_lora_weights``/``load_lora_weights`` handle the format.

Loading goes through :class:`diffusers.DiffusionPipeline` (the class named in
``model_index.json``), so any text-to-image pipeline loads; unknown classes get the ``generic``
family, rendered through the pipeline's own ``__call__``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class FamilyError(ValueError):
    """A model directory whose family cannot be used for the requested operation."""


@dataclass(frozen=True)
class Family:
    """Per-family facts and defaults (see the module docstring)."""

    name: str  # sd | sdxl | sd3 | flux | generic
    denoiser: str  # unet | transformer
    objective: str  # eps (DDPM family, incl. v-prediction) | flow (rectified flow)
    negative_prompt: bool  # the pipeline takes a negative prompt
    steps: int  # default denoising steps
    guidance: float  # default guidance scale
    scheduler: str  # default scheduler name (generate.SCHEDULERS key or "default": the model's own)
    native_size: int  # default output side, px, when the configs do not say
    lora_targets: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
    lora_pipeline: str = ""  # diffusers class with save_lora_weights for this family
    distilled_guidance: bool = False  # guidance is an embedded value (FLUX.1-dev), not CFG


FAMILIES: dict[str, Family] = {
    "sd": Family("sd", "unet", "eps", True, 30, 7.5, "dpmsolver++", 512, lora_pipeline="StableDiffusionPipeline"),
    "sdxl": Family("sdxl", "unet", "eps", True, 30, 5.0, "dpmsolver++", 1024,
                   lora_pipeline="StableDiffusionXLPipeline"),
    "sd3": Family("sd3", "transformer", "flow", True, 28, 7.0, "default", 1024,
                  lora_pipeline="StableDiffusion3Pipeline"),
    "flux": Family("flux", "transformer", "flow", False, 28, 3.5, "default", 1024,
                   lora_pipeline="FluxPipeline", distilled_guidance=True),
    "generic": Family("generic", "unet", "eps", True, 30, 7.5, "default", 512),
}

# model_index.json's _class_name -> family. Text-to-image classes only.
PIPELINE_FAMILY: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}


def read_model_index(model_dir: str | Path) -> dict:
    """``model_index.json`` of a pipeline directory; a clear error when it is absent or broken."""
    path = Path(model_dir) / "model_index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FamilyError(f"{path} not found: not a diffusers pipeline directory") from None
    except json.JSONDecodeError as exc:
        raise FamilyError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(index, dict) or "_class_name" not in index:
        raise FamilyError(f"{path}: no _class_name (not a diffusers pipeline index)")
    return index


def detect_family(model_dir: str | Path) -> Family:
    """The :class:`Family` of the pipeline saved in ``model_dir``, from its ``model_index.json``.

    A pipeline class not in :data:`PIPELINE_FAMILY` is ``generic`` when it has a ``unet`` or a
    ``transformer`` component (rendered by its own ``__call__``), else an error naming the class.
    """
    index = read_model_index(model_dir)
    cls = index["_class_name"]
    if cls in PIPELINE_FAMILY:
        return FAMILIES[PIPELINE_FAMILY[cls]]
    if "unet" in index or "transformer" in index:
        base = FAMILIES["generic"]
        denoiser = "unet" if "unet" in index else "transformer"
        return Family(**{**base.__dict__, "denoiser": denoiser})
    raise FamilyError(
        f"{Path(model_dir) / 'model_index.json'}: pipeline class {cls!r} has no unet or transformer; "
        f"supported text-to-image families: {', '.join(sorted(PIPELINE_FAMILY))}"
    )


def vae_scale_factor(model_dir: str | Path) -> int:
    """Pixels per latent cell: ``2 ** (len(vae.block_out_channels) - 1)`` (8 for SD/SDXL/SD3/FLUX)."""
    cfg = json.loads((Path(model_dir) / "vae" / "config.json").read_text(encoding="utf-8"))
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def native_size(model_dir: str | Path, family: Family) -> int:
    """The side, px, the model renders by default (as its pipeline's ``__call__`` would).

    UNet and SD3 transformer configs carry ``sample_size`` (latent cells); FLUX's pipeline uses
    a fixed 128 latent cells (1024 px at scale 8).
    """
    model_dir = Path(model_dir)
    scale = vae_scale_factor(model_dir)
    cfg_path = model_dir / family.denoiser / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    if family.name == "flux":
        return 128 * scale
    sample = cfg.get("sample_size")
    if isinstance(sample, (list, tuple)):
        sample = sample[0]
    return int(sample) * scale if sample else family.native_size
