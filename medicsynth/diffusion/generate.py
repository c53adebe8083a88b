"""Rendering a caption plan with a text-to-image pipeline: seeded, batched, resumable, sharded.

The unit of work is one *planned image*: a row of ``data/captions/captions.tsv`` with an ``id``,
a ``seed``, four intended labels and a caption. :func:`generate_plan` renders the plan into
``{images_dir}/{id}.jpg`` and guarantees:

- **Batch invariance.** Each image's initial noise (and any scheduler noise) comes from its own
  ``torch.Generator`` seeded with the row's ``seed``, drawn on the CPU, so an image does not
  depend on batch size, batch neighbours, process count or device placement of the RNG. On CPU
  fp32 batched and single renders agree to ≤ 1 grey level (conv/matmul kernels may sum in a
  different order for different batch shapes); see ``tests/test_diffusion.py``.
- **Resume.** Each JPEG carries its provenance in the JPEG comment segment: a key hashing
  everything that determines the pixels (model fingerprint, LoRA, scheduler, steps, guidance,
  size, seed, prompt, negative prompt) plus the blank/NSFW flags. An image whose key matches is
  skipped; a missing, unreadable or stale one is (re-)rendered. Images are written to a temp
  file and renamed, so a kill loses at most the batch in flight, never leaves half a JPEG, and
  image and provenance can never disagree. Raising the plan size renders only the new ids; images
  no longer in the plan are removed at the end, so the output holds exactly the plan's images.
- **Blank detection.** The per-image standard deviation of the uint8 output is computed on the
  device; images below ``blank_std`` (black safety-checker replacements, NaN decodes, flat
  colour collapses) are kept on disk but flagged ``blank_flag=1`` in the manifest and counted.
- **Shards.** With ``per_shard`` set (``storage.layout: shards``) the images end up in WebDataset
  tar shards ``{images_dir}/synthetic-NNNNNN.tar`` (members ``{id}.jpg``, the same JPEG bytes
  as the files layout, and ``{id}.json``, the stamp) in plan order, and the manifest's ``file``
  is ``<shard>#{id}.jpg``. Rendering is unchanged: each image first lands, stamped, in
  ``{images_dir}/.render/{id}.jpg`` (one file per image, so a kill loses at most the batch in
  flight and processes never share a file); the main process then appends them to the shards
  with :class:`medicsynth.shards.ShardWriter` (:func:`pack_shards`) and removes the rendered
  files only once the shards hold them. An image is skipped when its stamp (in the shard's
  ``.json`` member, or the rendered file) matches. Shard membership depends only on the plan
  order, so a run killed anywhere and resumed gives byte-identical shards; a plan change that
  is not an append (ids removed or reordered, a stale image) rebuilds the set from the images
  still valid.
- **Scale-out.** Under ``accelerate launch`` every process computes the same to-do list, takes
  its share with ``PartialState().split_between_processes`` and writes its own images; the main
  process writes the manifest after ``wait_for_everyone`` from the files themselves, so a
  missing image is an error rather than a silent gap.

Families. The model's ``model_index.json`` names its pipeline class and so its family
(:mod:`medicsynth.diffusion.families`): Stable Diffusion 1.x/2.x render through :class:`Renderer`,
a denoising loop on the pipeline's components; SDXL, SD 3/3.5, FLUX.1 and any other diffusers
text-to-image pipeline through :class:`PipelineRenderer`, the pipeline's own ``__call__`` with one
CPU generator per image (same batch invariance). ``steps``/``guidance``/``scheduler`` set to
``auto`` take the family's defaults; families without a negative prompt (FLUX) drop it from the
call and from the provenance key. Big models: ``dtype: bf16``, ``cpu_offload`` (model or
sequential), ``vae_tiling``/``vae_slicing``. ``backend: openai`` renders through the hosted
Images API instead (:mod:`medicsynth.diffusion.hosted`).

Speed options (:class:`GenerateOptions`) are ``"auto"`` in params.yaml: on for CUDA, no-ops on CPU.
Execution details that do not change the recipe (dtype, batch size, compile, attention kernel)
are recorded but not part of the provenance key, so switching them does not re-render.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from medicsynth.numerics import current_mode as numerics_mode
from medicsynth.devices import choose_device
from medicsynth.diffusion.families import Family, detect_family, native_size
from medicsynth.diffusion.tiny import label_prompt, read_meta
from medicsynth.io import atomic_path
from medicsynth.labels import TASKS, LabelError, validate_label
from medicsynth.manifest import member_ref
from medicsynth.params import build_config
from medicsynth.shards import ShardWriter, iter_shard, open_image, read_image_bytes, shard_keys, shard_paths, shard_refs

DEMO_MODEL_DIR = "models/diffusion/demo"
PLAN_COLUMNS: tuple[str, ...] = ("id", "seed", *TASKS, "caption", "negative_prompt")
MANIFEST_EXTRAS: tuple[str, ...] = (
    "plan_id", "seed", "model", "scheduler", "steps", "guidance", "width", "height",
    "blank_flag", "nsfw_flag", "caption", "prompt", "provenance_key",
)
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_WEIGHT_SUFFIXES = (".json", ".txt", ".safetensors", ".bin", ".model")


class GenerateError(RuntimeError):
    """Generation cannot proceed: a missing model, a bad plan row, a missing rendered image."""


# ---------------------------------------------------------------------------------------------
# Options


@dataclass(kw_only=True)
class GenerateOptions:
    """Everything ``params.yaml``'s ``generate`` section can set (its comments explain each key).

    Fields without a default are set by params.yaml, the one source of their values (build with
    :meth:`from_params`; a missing key is an error naming it). Fields with a default are options
    params.yaml does not list (benchmarks and tests set them). Fields typed ``bool | str`` accept
    ``"auto"``: on for CUDA, off (no-op) on CPU.
    """

    model: str
    backend: str  # diffusers (local pipeline) | openai (hosted Images API, medicsynth.diffusion.hosted)
    hosted: dict  # backend openai: HostedConfig fields
    lora: str
    lora_scale: float = 1.0
    scheduler: str  # a SCHEDULERS name, "default" (the model's own) or "auto" (the family's default)
    steps: int | str  # or "auto": the family's default
    guidance: float | str  # or "auto": the family's default (FLUX.1-dev: embedded guidance 3.5)
    max_sequence_length: int  # T5 prompt tokens (SD3/FLUX); 0 = the pipeline's default
    cpu_offload: str  # none | model (one component on the GPU at a time) | sequential (per layer; slowest, least memory)
    vae_tiling: bool  # decode in overlapping tiles (big images on small GPUs)
    vae_slicing: bool  # decode one image of the batch at a time
    guidance_rescale: float = 0.0  # CFG rescale φ (Lin et al. 2024); counters over-saturated colours
    width: int  # 0: the model's native size (UNet sample size × VAE scale factor)
    height: int
    negative_prompt: str = ""
    prompt_source: str  # auto | caption | labels
    batch_size: int  # 0: 8 on CPU, 32 on CUDA
    dtype: str  # auto | fp16 | bf16 | fp32
    device: str  # auto | cpu | cuda | cuda:N (medicsynth.devices.choose_device)
    threads: int  # torch CPU threads; 0 keeps torch's default
    safety_checker: bool
    blank_std: float
    jpeg_quality: int
    writer_threads: int = 4
    vae_batch: int = 0  # decode in chunks of this many images; 0: the whole batch
    channels_last: bool | str
    fuse_qkv: bool | str
    compile: bool | str
    compile_vae: bool | str
    compile_mode: str
    inductor_tuning: bool | str = "auto"
    attention_backend: str = "auto"  # auto | flash | cudnn | efficient | math
    cudnn_benchmark: bool | str
    tf32: bool | str
    pad_batches: bool | str = "auto"  # pad the last batch to full size: no recompile for a new shape

    @classmethod
    def from_params(cls, params: dict) -> "GenerateOptions":
        """Build from the ``generate`` section.

        Every key params.yaml sets is required (``KeyError`` naming ``generate.<key>``); a key
        that is not a field is a ``ValueError`` naming it; ``hosted`` is kept as a mapping
        (:class:`~medicsynth.diffusion.hosted.HostedConfig` validates it when the backend runs).
        """
        return build_config(cls, params, "generate", convert={"hosted": lambda d: dict(d or {})})

    def with_family_defaults(self, family: Family) -> "GenerateOptions":
        """A copy with ``auto`` steps/guidance/scheduler replaced by ``family``'s defaults.

        Explicit values are kept, so the demo's settings (an ``sd``-family model) are unchanged.
        A negative prompt for a family without one is dropped by :func:`plan_jobs`, not here.
        """
        from dataclasses import replace

        return replace(
            self,
            steps=family.steps if self.steps == "auto" else int(self.steps),
            guidance=family.guidance if self.guidance == "auto" else float(self.guidance),
            scheduler=family.scheduler if self.scheduler == "auto" else self.scheduler,
        )


def _flag(value: bool | str, cuda: bool, name: str) -> bool:
    if value == "auto":
        return cuda
    if isinstance(value, bool):
        return value
    raise ValueError(f"generate.{name} must be true, false or auto, got {value!r}")


@dataclass
class Resolved:
    """Options after ``auto`` is decided for the device actually used."""

    device: torch.device
    dtype: torch.dtype
    batch_size: int
    channels_last: bool
    fuse_qkv: bool
    compile: bool
    compile_vae: bool
    inductor_tuning: bool
    cudnn_benchmark: bool
    tf32: bool
    pad_batches: bool

    def describe(self) -> dict:
        d = asdict(self)
        d["device"], d["dtype"] = str(self.device), str(self.dtype).replace("torch.", "")
        return d


_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_options(opts: GenerateOptions, device: torch.device) -> Resolved:
    cuda = device.type == "cuda"
    if opts.dtype == "auto":
        dtype = torch.float16 if cuda else torch.float32
    elif opts.dtype in _DTYPES:
        dtype = _DTYPES[opts.dtype]
    else:
        raise ValueError(f"generate.dtype must be auto, fp16, bf16 or fp32, got {opts.dtype!r}")
    if not cuda and dtype != torch.float32:
        raise ValueError(f"generate.dtype {opts.dtype} on CPU: half precision on CPU is slow and inexact; use fp32 or auto")
    compiled = _flag(opts.compile, cuda, "compile")
    return Resolved(
        device=device,
        dtype=dtype,
        batch_size=opts.batch_size or (32 if cuda else 8),
        channels_last=_flag(opts.channels_last, cuda, "channels_last"),
        fuse_qkv=_flag(opts.fuse_qkv, cuda, "fuse_qkv"),
        compile=compiled,
        compile_vae=_flag(opts.compile_vae, cuda, "compile_vae"),
        inductor_tuning=_flag(opts.inductor_tuning, cuda, "inductor_tuning"),
        cudnn_benchmark=_flag(opts.cudnn_benchmark, cuda, "cudnn_benchmark") and cuda,
        tf32=_flag(opts.tf32, cuda, "tf32") and cuda,
        pad_batches=_flag(opts.pad_batches, compiled, "pad_batches"),
    )


# ---------------------------------------------------------------------------------------------
# Models


@dataclass
class ModelRef:
    """A model directory on local disk and a fingerprint of its content."""

    name: str
    path: Path
    kind: str  # demo | local | hub
    fingerprint: str


def _hash_dir(path: Path, suffixes: Iterable[str] = _WEIGHT_SUFFIXES) -> str:
    """sha256 over relative names and contents of the config/weight files under ``path``."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in tuple(suffixes)
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise GenerateError(f"{path}: no model files (*.json, *.safetensors, *.bin) found")
    for p in files:
        h.update(p.relative_to(path).as_posix().encode() + b"\0")
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def resolve_model(model: str, demo_dir: str | Path = DEMO_MODEL_DIR) -> ModelRef:
    """Turn ``generate.model`` into a local directory, never downloading anything.

    ``demo`` → the pipeline written by the adapt stage; an existing directory → itself; anything
    else is taken as a Hugging Face hub id and looked up **only** in the local HF cache.
    """
    if model == "demo":
        path = Path(demo_dir)
        if not (path / "model_index.json").is_file():
            raise GenerateError(
                f"generate.model is 'demo' but {path}/model_index.json does not exist: run the adapt "
                "stage with adapt.mode: demo first (dvc repro adapt)"
            )
        return ModelRef(model, path, "demo", _hash_dir(path))
    path = Path(model)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise GenerateError(f"generate.model {model!r}: directory has no model_index.json (not a diffusers pipeline)")
        return ModelRef(model, path, "local", _hash_dir(path))
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        raise GenerateError(f"generate.model {model!r} is neither 'demo', an existing directory, nor a hub id owner/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(model, local_files_only=True))
    except LocalEntryNotFoundError:
        raise GenerateError(
            f"generate.model {model!r} is not in the local Hugging Face cache and this project never "
            f"downloads models. Fetch it yourself (e.g. `hf download {model}` on a connected machine, "
            "accepting its licence) or set generate.model to a local pipeline directory."
        ) from None
    # The snapshot folder is named after the commit: an exact, free fingerprint.
    return ModelRef(model, snapshot, "hub", f"{model}@{snapshot.name}")


def prompt_source(opts: GenerateOptions, ref: ModelRef) -> str:
    """``labels`` for models trained on label prompts (the demo), else ``caption``."""
    if opts.prompt_source in ("caption", "labels"):
        return opts.prompt_source
    if opts.prompt_source != "auto":
        raise ValueError(f"generate.prompt_source must be auto, caption or labels, got {opts.prompt_source!r}")
    return read_meta(ref.path).get("prompt_source", "caption")


def load_pipeline(ref: ModelRef, opts: GenerateOptions, res: Resolved, family: Family | None = None):
    """Load the pipeline from local disk in ``res.dtype`` on ``res.device``, LoRA fused in.

    ``family`` (default: read from ``model_index.json``) picks the class: Stable Diffusion 1.x/2.x
    through :class:`~diffusers.StableDiffusionPipeline` (its safety checker optional), any other
    family through :class:`~diffusers.DiffusionPipeline` (the class ``model_index.json`` names).
    Memory options: ``cpu_offload`` (``model``/``sequential``, CUDA only) instead of moving the
    whole pipeline to the device; ``vae_tiling``/``vae_slicing`` on the VAE.
    """
    family = family or detect_family(ref.path)
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": res.dtype}
    if family.name == "sd":
        from diffusers import StableDiffusionPipeline

        if not opts.safety_checker:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipe = StableDiffusionPipeline.from_pretrained(ref.path, **kwargs)
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(ref.path, **kwargs)
    if opts.lora:
        lora_dir = Path(opts.lora)
        if not lora_dir.exists():
            raise GenerateError(f"generate.lora {opts.lora!r} does not exist (run adapt with adapt.mode: lora)")
        pipe.load_lora_weights(lora_dir, adapter_name="medicsynth")
        # Fusing folds the low-rank update into the weights: zero cost per step, compile-friendly.
        pipe.fuse_lora(components=[family.denoiser], lora_scale=opts.lora_scale)
        pipe.unload_lora_weights()
    pipe.set_progress_bar_config(disable=True)
    if opts.vae_tiling:
        pipe.vae.enable_tiling()
    if opts.vae_slicing:
        pipe.vae.enable_slicing()
    if opts.cpu_offload not in ("none", "model", "sequential"):
        raise ValueError(f"generate.cpu_offload must be none, model or sequential, got {opts.cpu_offload!r}")
    if opts.cpu_offload != "none":
        if res.device.type != "cuda":
            raise GenerateError("generate.cpu_offload offloads to the CPU between GPU uses: it needs device cuda")
        if opts.cpu_offload == "model":
            pipe.enable_model_cpu_offload(device=res.device)
        else:
            pipe.enable_sequential_cpu_offload(device=res.device)
        return pipe
    return pipe.to(res.device)


SCHEDULERS: dict[str, tuple[str, dict]] = {
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmsolver++_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "ddpm": ("DDPMScheduler", {}),
}


def make_scheduler(name: str, base_config: dict, default_class: type | None = None):
    """A fresh scheduler of kind ``name`` sharing the model's noise schedule (``base_config``).

    ``default``: the model's own scheduler class (``default_class``), e.g. FLUX's and SD3's
    flow-matching Euler scheduler.
    """
    import diffusers

    if name == "default":
        if default_class is None:
            raise ValueError("generate.scheduler default needs the model's scheduler class")
        return default_class.from_config(base_config)
    if name not in SCHEDULERS:
        raise ValueError(f"generate.scheduler {name!r} unknown; choose default, auto or one of {sorted(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(base_config, **extra)


# ---------------------------------------------------------------------------------------------
# Rendering


@dataclass
class RenderOutput:
    images: np.ndarray  # (B, H, W, 3) uint8
    std: np.ndarray  # (B,) float: per-image pixel standard deviation in grey levels
    nsfw: np.ndarray  # (B,) bool


class Renderer:
    """A loaded pipeline prepared for fast, batch-invariant rendering.

    Uses the pipeline's own components (``encode_prompt``, UNet, scheduler, VAE, safety checker)
    in a denoising loop that keeps classifier-free guidance in one batched UNet call, draws all
    noise from per-image CPU generators, never synchronises with the host inside the loop, and
    returns uint8 images with their blank statistics computed on the device.
    """

    def __init__(self, pipe, opts: GenerateOptions, res: Resolved):
        self.pipe, self.opts, self.res = pipe, opts, res
        self.scheduler_config = dict(pipe.scheduler.config)
        self.scheduler_class = type(pipe.scheduler)
        make_scheduler(opts.scheduler, self.scheduler_config, self.scheduler_class)  # fail early on a bad name
        vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        native = pipe.unet.config.sample_size * vae_scale
        self.height, self.width = opts.height or native, opts.width or native
        if self.height % vae_scale or self.width % vae_scale:
            raise ValueError(f"generate: height/width must be multiples of {vae_scale}, got {self.height}×{self.width}")
        self.latent_shape = (pipe.unet.config.in_channels, self.height // vae_scale, self.width // vae_scale)
        self._prepare()

    # -- speed options ------------------------------------------------------------------------

    def _prepare(self) -> None:
        pipe, res = self.pipe, self.res
        if res.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        if res.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if res.fuse_qkv:
            from diffusers import AutoencoderKL

            pipe.fuse_qkv_projections(unet=True, vae=isinstance(pipe.vae, AutoencoderKL))
        if res.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if res.inductor_tuning:
            import torch._inductor.config as inductor

            # Known-good knobs for UNets (diffusers' SDXL/SD3 speed guides): 1×1 convs as matmuls
            # reach the tensor-core GEMM templates; coordinate-descent tuning searches block sizes.
            inductor.conv_1x1_as_mm = True
            inductor.coordinate_descent_tuning = True
            inductor.coordinate_descent_check_all_directions = True
            inductor.epilogue_fusion = False
        if res.compile:
            pipe.unet.compile(mode=self.opts.compile_mode, fullgraph=True)
        if res.compile_vae:
            pipe.vae.decoder.compile(mode=self.opts.compile_mode, fullgraph=True)
        self._cudagraphs = res.compile and self.opts.compile_mode in ("reduce-overhead", "max-autotune")

    def attention_context(self):
        """SDPA kernel restriction for ``attention_backend`` (a no-op for ``auto``)."""
        name = self.opts.attention_backend
        if name == "auto":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        table = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
        if name not in table:
            raise ValueError(f"generate.attention_backend must be auto or one of {sorted(table)}, got {name!r}")
        return sdpa_kernel([table[name]])

    # -- the denoising loop ----------------------------------------------------------------------

    def initial_latents(self, seeds: Sequence[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Per-image noise from CPU generators (same noise on any device and in any batch)."""
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        noise = torch.stack([torch.randn(self.latent_shape, generator=g, dtype=torch.float32) for g in gens])
        return noise.to(self.res.device, self.res.dtype), gens

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str], negatives: Sequence[str], seeds: Sequence[int]) -> RenderOutput:
        pipe, res, opts = self.pipe, self.res, self.opts
        n = len(prompts)
        if not (n == len(negatives) == len(seeds)) or n == 0:
            raise ValueError("render needs equally many (≥1) prompts, negatives and seeds")
        do_cfg = opts.guidance > 1.0
        with self.attention_context():
            cond, uncond = pipe.encode_prompt(
                list(prompts), res.device, 1, do_cfg, negative_prompt=list(negatives) if do_cfg else None,
            )
            embeds = torch.cat([uncond, cond]) if do_cfg else cond
            scheduler = make_scheduler(opts.scheduler, self.scheduler_config, self.scheduler_class)
            scheduler.set_timesteps(opts.steps, device=res.device)
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)  # skips a per-batch timestep search (a host sync)
            latents, gens = self.initial_latents(seeds)
            latents = latents * scheduler.init_noise_sigma
            step_kwargs = {"generator": gens} if _accepts(scheduler.step, "generator") else {}
            memory_format = torch.channels_last if res.channels_last else torch.contiguous_format
            for t in scheduler.timesteps:
                model_in = torch.cat([latents, latents]) if do_cfg else latents
                model_in = scheduler.scale_model_input(model_in, t).contiguous(memory_format=memory_format)
                if self._cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                eps = pipe.unet(model_in, t, encoder_hidden_states=embeds, return_dict=False)[0]
                if self._cudagraphs:
                    eps = eps.clone()  # the graph's output buffer is reused by the next replay
                if do_cfg:
                    eps_uncond, eps_cond = eps.chunk(2)
                    eps = eps_uncond + opts.guidance * (eps_cond - eps_uncond)
                    if opts.guidance_rescale > 0:
                        eps = rescale_noise_cfg(eps, eps_cond, guidance_rescale=opts.guidance_rescale)
                latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
            images = self.decode(latents)
        nsfw = np.zeros(n, dtype=bool)
        if getattr(pipe, "safety_checker", None) is not None:
            images, flags = pipe.run_safety_checker(images, res.device, embeds.dtype)
            nsfw = np.asarray([bool(f) for f in flags], dtype=bool)
        pixels = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round()
        if nsfw.any():
            pixels[torch.as_tensor(nsfw, device=pixels.device)] = 0  # the checker's black image
        std = pixels.flatten(1).std(dim=1)  # NaN for a NaN decode: flagged blank below
        pixels = torch.nan_to_num(pixels, nan=0.0).to(torch.uint8).permute(0, 2, 3, 1)
        # One device→host copy per batch; it is also the loop's only synchronisation point.
        return RenderOutput(pixels.cpu().numpy(), std.cpu().numpy(), nsfw)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = (latents / vae.config.scaling_factor + shift).to(vae.dtype)
        if self.res.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        chunk = self.opts.vae_batch or len(z)
        outs = []
        for i in range(0, len(z), chunk):
            if self._cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            x = vae.decode(z[i:i + chunk], return_dict=False)[0]
            outs.append(x.clone() if self._cudagraphs else x)
        return torch.cat(outs)


class PipelineRenderer:
    """Rendering through the pipeline's own ``__call__``: SDXL, SD 3/3.5, FLUX.1 and any other
    diffusers text-to-image pipeline.

    Same contract as :class:`Renderer` (``__call__(prompts, negatives, seeds) -> RenderOutput``,
    ``res``, ``height``, ``width``): each image's initial noise comes from its own CPU
    ``torch.Generator`` (the pipelines draw a list of generators image by image), so an image
    does not depend on its batch. Negative prompts are passed only to families that take them;
    FLUX.1-dev's ``guidance`` is its embedded guidance value. ``compile`` compiles the denoiser.
    """

    def __init__(self, pipe, opts: GenerateOptions, res: Resolved, family: Family, width: int, height: int):
        self.pipe, self.opts, self.res, self.family = pipe, opts, res, family
        self.width, self.height = width, height
        if opts.scheduler != "default":
            if family.objective == "flow":
                raise ValueError(
                    f"generate.scheduler {opts.scheduler!r}: {family.name} is a flow-matching model; "
                    "use scheduler: default (its own flow-matching scheduler) or auto"
                )
            pipe.scheduler = make_scheduler(opts.scheduler, dict(pipe.scheduler.config), type(pipe.scheduler))
        if res.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        if res.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        denoiser = getattr(pipe, family.denoiser)
        if res.fuse_qkv and hasattr(denoiser, "fuse_qkv_projections"):
            denoiser.fuse_qkv_projections()
        if res.compile:
            denoiser.compile(mode=opts.compile_mode, fullgraph=False)
        self._call_params = set(__import__("inspect").signature(pipe.__call__).parameters)

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str], negatives: Sequence[str], seeds: Sequence[int]) -> RenderOutput:
        n = len(prompts)
        if not (n == len(negatives) == len(seeds)) or n == 0:
            raise ValueError("render needs equally many (≥1) prompts, negatives and seeds")
        opts = self.opts
        kwargs: dict[str, Any] = dict(
            prompt=list(prompts), num_inference_steps=int(opts.steps), guidance_scale=float(opts.guidance),
            height=self.height, width=self.width, output_type="pt",
            generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
        )
        if self.family.negative_prompt and any(negatives) and "negative_prompt" in self._call_params:
            kwargs["negative_prompt"] = list(negatives)
        if opts.max_sequence_length and "max_sequence_length" in self._call_params:
            kwargs["max_sequence_length"] = int(opts.max_sequence_length)
        if opts.guidance_rescale and "guidance_rescale" in self._call_params:
            kwargs["guidance_rescale"] = float(opts.guidance_rescale)
        out = self.pipe(**kwargs)
        images = out.images if isinstance(out.images, torch.Tensor) else torch.as_tensor(np.asarray(out.images)).permute(0, 3, 1, 2)
        nsfw_flags = getattr(out, "nsfw_content_detected", None)
        nsfw = np.asarray([bool(f) for f in nsfw_flags], dtype=bool) if nsfw_flags else np.zeros(n, dtype=bool)
        pixels = (images.float().clamp(0, 1) * 255).round()
        std = pixels.flatten(1).std(dim=1)
        pixels = torch.nan_to_num(pixels, nan=0.0).to(torch.uint8).permute(0, 2, 3, 1)
        return RenderOutput(pixels.cpu().numpy(), std.cpu().numpy(), nsfw)


def make_renderer(pipe, opts: GenerateOptions, res: Resolved, family: Family, width: int, height: int):
    """:class:`Renderer` (the fast SD 1.x/2.x loop) or :class:`PipelineRenderer` (any other family)."""
    if family.name == "sd":
        renderer = Renderer(pipe, opts, res)
        if (renderer.width, renderer.height) != (width, height):
            raise GenerateError(f"generate: renderer size {renderer.width}×{renderer.height} differs from the planned {width}×{height}")
        return renderer
    return PipelineRenderer(pipe, opts, res, family, width, height)


def _accepts(fn: Callable, name: str) -> bool:
    import inspect

    return name in inspect.signature(fn).parameters


# ---------------------------------------------------------------------------------------------
# Plans, provenance, files


def read_plan(path: str | Path) -> pd.DataFrame:
    """Read and validate the caption plan; errors name the file, the TSV line and the value."""
    path = Path(path)
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    missing = [c for c in PLAN_COLUMNS if c not in df.columns]
    if missing:
        raise GenerateError(f"{path}: missing column(s) {', '.join(missing)}")
    seen: set[str] = set()
    seeds = []
    for i, row in enumerate(df.to_dict("records")):
        line = i + 2
        if not _ID_RE.match(row["id"]):
            raise GenerateError(f"{path}: line {line}: id {row['id']!r} is not a safe file name ([A-Za-z0-9._-])")
        if row["id"] in seen:
            raise GenerateError(f"{path}: line {line}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        try:
            seed = int(row["seed"])
            if not 0 <= seed < 2**63:
                raise ValueError
        except ValueError:
            raise GenerateError(f"{path}: line {line}: seed {row['seed']!r} is not an integer in [0, 2^63)") from None
        seeds.append(seed)
        for task in TASKS:
            try:
                df.at[i, task] = validate_label(task, row[task])
            except LabelError as exc:
                raise GenerateError(f"{path}: line {line}: {exc}") from None
    df["seed"] = seeds
    return df


def provenance_record(row: dict, prompt: str, negative: str, opts: GenerateOptions, ref: ModelRef,
                      lora_fp: str, width: int, height: int, family: Family | None = None) -> dict:
    """What determines an image's pixels (execution details such as dtype or batch excluded).

    Records of Stable Diffusion 1.x/2.x models keep their original keys (so images rendered
    before families existed still match); other families add ``family`` and the T5 length.
    """
    record = {
        "id": row["id"], "seed": int(row["seed"]), "prompt": prompt, "negative_prompt": negative,
        "model": ref.fingerprint, "lora": lora_fp, "lora_scale": opts.lora_scale if lora_fp else None,
        "scheduler": opts.scheduler, "steps": int(opts.steps), "guidance": float(opts.guidance),
        "guidance_rescale": float(opts.guidance_rescale),
        "width": int(width), "height": int(height),
    }
    if family is not None and family.name != "sd":
        record.update(family=family.name, max_sequence_length=int(opts.max_sequence_length))
    mode = numerics_mode()
    if mode != "fast":  # CPU kernels of another numerics mode give other pixels (fast keeps the old keys)
        record["numerics"] = mode
    return record


def provenance_key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:20]


def read_stamp(path: Path | str) -> dict | None:
    """The provenance stamp in a JPEG's comment, or ``None`` if absent/unreadable/corrupt.

    ``path`` is a file or a shard reference (:func:`medicsynth.shards.open_image`).
    """
    try:
        with open_image(path) as im:
            comment = im.info.get("comment")
        if not comment:
            return None
        stamp = json.loads(comment.decode("utf-8") if isinstance(comment, bytes) else comment)
        return stamp if isinstance(stamp, dict) and "key" in stamp else None
    except (OSError, ValueError, SyntaxError):
        return None


def write_jpeg(pixels: np.ndarray, path: Path, stamp: dict, quality: int) -> None:
    """Encode ``pixels`` with ``stamp`` in its comment, write to a temp file, rename into place."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality, comment=json.dumps(stamp, sort_keys=True).encode())
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


@dataclass
class Job:
    """One image to render (or skip)."""

    id: str
    seed: int
    prompt: str
    negative: str
    key: str
    path: Path
    row: dict


@dataclass
class PlanStatus:
    jobs: list[Job]
    todo: list[Job]
    skipped: int
    stale: int
    quarantined: list[dict] = field(default_factory=list)
    # Shard layout: {id: stamp} of the samples already in the shards (:func:`shard_stamps`), read
    # once by plan_jobs; rendering only writes .render/, so it still holds when the shards are packed.
    in_shards: dict[str, dict | None] = field(default_factory=dict)


def plan_jobs(plan: pd.DataFrame, images_dir: Path, opts: GenerateOptions, ref: ModelRef, lora_fp: str,
              source: str, width: int, height: int, plan_path: str = "<plan>",
              family: Family | None = None, shards: bool = False) -> PlanStatus:
    """Decide for each planned image its prompt, provenance key and whether it must be rendered.

    ``shards``: the images live in shards in ``images_dir`` (see the module doc): a job renders
    to ``images_dir/.render/{id}.jpg`` and is done when that file's stamp, or the stamp of its
    sample in the shards, matches.

    Rows with nothing to render (an empty caption when prompting by caption) are quarantined and
    reported instead of producing an unconditioned image. For a ``family`` without negative
    prompts (FLUX) the negative prompt is dropped, so it neither reaches the model nor the key.
    """
    takes_negative = family is None or family.negative_prompt
    jobs, todo, quarantined = [], [], []
    skipped = stale = 0
    in_shards = shard_stamps(images_dir) if shards else {}
    out_dir = images_dir / RENDER_DIR if shards else images_dir
    for i, row in enumerate(plan.to_dict("records")):
        if source == "labels":
            prompt, negative = label_prompt(row), ""  # the demo text encoder knows only label words
        else:
            prompt = row["caption"].strip()
            negative = (row["negative_prompt"].strip() or opts.negative_prompt) if takes_negative else ""
            if not prompt:
                quarantined.append({"id": row["id"], "line": i + 2, "file": plan_path, "reason": "empty caption"})
                continue
        record = provenance_record(row, prompt, negative, opts, ref, lora_fp, width, height, family)
        job = Job(row["id"], int(row["seed"]), prompt, negative, provenance_key(record), out_dir / f"{row['id']}.jpg", row)
        jobs.append(job)
        if shards and job.id in in_shards and not job.path.exists():
            if (in_shards[job.id] or {}).get("key") == job.key:
                skipped += 1
                continue
            stale += 1
        elif job.path.exists():
            stamp = read_stamp(job.path)
            if stamp is not None and stamp.get("key") == job.key:
                skipped += 1
                continue
            stale += 1
        todo.append(job)
    return PlanStatus(jobs, todo, skipped, stale, quarantined, in_shards)


@dataclass
class RenderStats:
    rendered: int = 0
    blank: int = 0
    nsfw: int = 0
    batches: int = 0
    seconds: float = 0.0
    seconds_first_batch: float = 0.0  # includes compilation and autotuning when compile is on
    first_batch_images: int = 0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["images_per_second"] = round(self.rendered / self.seconds, 4) if self.seconds else 0.0
        steady = self.seconds - self.seconds_first_batch
        d["images_per_second_after_first_batch"] = (
            round((self.rendered - self.first_batch_images) / steady, 4) if self.batches > 1 and steady > 0 else None
        )
        return d


def render_jobs(renderer: Renderer, jobs: Sequence[Job], model_name: str, opts: GenerateOptions,
                progress: bool = True, desc: str = "generate") -> RenderStats:
    """Render ``jobs`` in batches, writing each image (with its stamp) as soon as its batch is done.

    JPEG encoding runs in a thread pool overlapping the next batch's denoising; the pool is
    drained before the following batch is handed over, so at most two batches are ever unsaved.
    """
    stats = RenderStats()
    bs = renderer.res.batch_size
    start = time.perf_counter()
    pending: list[Future] = []
    with ThreadPoolExecutor(max_workers=max(1, opts.writer_threads)) as pool, \
            tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress) as bar:
        for b in range(0, len(jobs), bs):
            batch = list(jobs[b:b + bs])
            real = len(batch)
            if renderer.res.pad_batches and real < bs:
                batch += [batch[0]] * (bs - real)  # static shapes for compiled graphs; outputs dropped
            out = renderer([j.prompt for j in batch], [j.negative for j in batch], [j.seed for j in batch])
            for f in pending:
                f.result()  # surface write errors; bounds unsaved work to the batch in flight
            pending = []
            for k, job in enumerate(batch[:real]):
                blank = not bool(out.std[k] >= opts.blank_std)  # NaN counts as blank
                stamp = {"key": job.key, "model": model_name, "blank": blank, "nsfw": bool(out.nsfw[k]),
                         "std": round(float(np.nan_to_num(out.std[k], nan=-1.0)), 3), "dtype": str(renderer.res.dtype).replace("torch.", "")}
                pending.append(pool.submit(write_jpeg, out.images[k], job.path, stamp, opts.jpeg_quality))
                stats.blank += blank
                stats.nsfw += bool(out.nsfw[k])
            stats.rendered += real
            stats.batches += 1
            if stats.batches == 1:
                stats.seconds_first_batch = time.perf_counter() - start
                stats.first_batch_images = real
            bar.update(real)
        for f in pending:
            f.result()
    stats.seconds = time.perf_counter() - start
    return stats


RENDER_DIR = ".render"  # where shard-layout images wait, one stamped file each, until packed
SHARD_PREFIX = "synthetic"


def shard_stamps(images_dir: Path) -> dict[str, dict | None]:
    """``{id: stamp}`` of every sample in the synthetic shards of ``images_dir`` (``None``: no
    readable stamp). Reads the small ``.json`` members only."""
    out: dict[str, dict | None] = {}
    for path in shard_paths(images_dir, SHARD_PREFIX):
        for key in shard_keys(path):
            try:
                stamp = json.loads(read_image_bytes(member_ref(path, f"{key}.json")))
            except (OSError, ValueError):
                stamp = None
            out[key] = stamp if isinstance(stamp, dict) and "key" in stamp else None
    return out


def pack_shards(jobs: Sequence[Job], images_dir: Path, per_shard: int,
                stamps: dict[str, dict | None]) -> dict[str, str]:
    """Put the images of ``jobs`` (rendered, in plan order) into the shards of ``images_dir``.

    ``stamps``: :func:`shard_stamps` of ``images_dir`` as the shards are now
    (:attr:`PlanStatus.in_shards`).

    Appends when the shards already hold a valid prefix of ``jobs`` (the usual resume, or a plan
    that grew); otherwise rebuilds the set: the samples still valid are first copied back to
    ``.render/`` (atomically), then the shards are removed last to first (never leaving a gap),
    then the set is written afresh. Rendered files are removed only after the writer closed,
    so a kill at any point loses no image. Returns ``{id: file reference of its JPEG}``.
    Raises :class:`GenerateError` naming the id when an image is in neither place.
    """
    render = images_dir / RENDER_DIR
    staging = images_dir / f".staging-{SHARD_PREFIX}"
    if staging.is_dir():
        # The writer's staged samples of a killed pack are all still in .render/ (removed only
        # after close), so dropping them loses nothing and keeps the add order = plan order.
        shutil.rmtree(staging)
    by_id = {j.id: j for j in jobs}
    finished = shard_paths(images_dir, SHARD_PREFIX)
    held = [k for p in finished for k in shard_keys(p)]

    def valid(key: str) -> bool:
        job = by_id.get(key)
        if job is None or (stamps.get(key) or {}).get("key") != job.key:
            return False
        fresh = read_stamp(job.path) if job.path.exists() else None
        return fresh is None or fresh.get("key") == job.key

    if held != [j.id for j in jobs[: len(held)]] or not all(valid(k) for k in held):
        render.mkdir(parents=True, exist_ok=True)
        for path in finished:
            for key, fields in iter_shard(path):
                if valid(key) and not by_id[key].path.exists():
                    with atomic_path(by_id[key].path) as tmp:
                        tmp.write_bytes(fields["jpg"])
        for path in reversed(finished):
            path.unlink()
    with ShardWriter(images_dir, SHARD_PREFIX, per_shard) as writer:
        for job in jobs:
            if job.id in writer:
                continue
            stamp = read_stamp(job.path) if job.path.exists() else None
            if stamp is None or stamp.get("key") != job.key:
                raise GenerateError(f"{job.path}: planned image {job.id} is neither in the shards of {images_dir} "
                                    "nor rendered with its provenance; rerun generate")
            writer.add(job.id, {"jpg": job.path.read_bytes(), "json": json.dumps(stamp, sort_keys=True).encode()})
    refs = shard_refs(images_dir, SHARD_PREFIX)
    for job in jobs:
        if job.id in refs:
            job.path.unlink(missing_ok=True)
    if render.is_dir() and not any(render.iterdir()):
        render.rmdir()
    return refs


def build_manifest(status: PlanStatus, images_dir: Path, opts: GenerateOptions, width: int, height: int,
                   refs: dict[str, str] | None = None) -> pd.DataFrame:
    """Manifest rows for every planned image, read back from the files' stamps.

    ``refs`` (shard layout, from :func:`pack_shards`): ``{id: shard reference}``; the rows' ``file``
    and ``image_path`` are those references and the stamps are read from the shards.

    Raises :class:`GenerateError` listing ids whose image is missing or carries another
    provenance — after a complete run that cannot happen, so it means lost work, not a skip.
    """
    rows, problems = [], []
    for job in status.jobs:
        if refs is not None:
            stamp = read_stamp(refs[job.id]) if job.id in refs else None
        else:
            stamp = read_stamp(job.path) if job.path.exists() else None
        if stamp is None or stamp.get("key") != job.key:
            problems.append(job.id)
            continue
        path = refs[job.id] if refs is not None else job.path.as_posix()
        rows.append({
            "image_id": "synthetic", "event_name": "synthetic", "image_path": path,
            **{t: job.row[t] for t in TASKS},
            "split": "train", "source": "synthetic", "provenance": f"generate:{opts.model}", "file": path,
            "plan_id": job.id, "seed": job.seed, "model": opts.model, "scheduler": opts.scheduler,
            "steps": opts.steps, "guidance": opts.guidance, "width": width, "height": height,
            "blank_flag": int(bool(stamp.get("blank")) or bool(stamp.get("nsfw"))), "nsfw_flag": int(bool(stamp.get("nsfw"))),
            "caption": job.row["caption"], "prompt": job.prompt, "provenance_key": job.key,
        })
    if problems:
        shown = ", ".join(problems[:10]) + (" ..." if len(problems) > 10 else "")
        raise GenerateError(f"{images_dir}: {len(problems)} planned image(s) missing or stale after rendering: {shown}")
    columns = ["image_id", "event_name", "image_path", *TASKS, "split", "source", "provenance", "file", *MANIFEST_EXTRAS]
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------------------------------
# The whole stage


def _device(opts: GenerateOptions, state) -> torch.device:
    """The render device: :func:`medicsynth.devices.choose_device` of ``generate.device``.

    Under a multi-process launcher a plain CUDA choice (``auto`` or ``cuda``, no index) becomes
    this process's GPU (``state.device``), so each process renders on its own device.
    """
    device = choose_device(opts.device, key="generate.device")
    if device.type == "cuda" and device.index is None and state.device.type == "cuda":
        return state.device
    return device


def generate_plan(
    plan_path: str | Path,
    images_dir: str | Path,
    manifest_path: str | Path,
    opts: GenerateOptions,
    *,
    demo_dir: str | Path = DEMO_MODEL_DIR,
    progress: bool = True,
    renderer_hook: Callable[[Renderer], Renderer] | None = None,
    prices: dict | None = None,
    per_shard: int | None = None,
) -> dict:
    """Render ``plan_path`` into ``images_dir`` and write the manifest; return the metrics dict.

    ``per_shard``: ``None`` writes one JPEG per image (``storage.layout: files``); an integer
    writes shards of that many images (``shards``, see the module doc).

    ``prices`` (``llm.prices``) is used by the hosted backend only: its cost estimate and
    ``generate.hosted.budget_usd``.

    Works unchanged in one process or under ``accelerate launch`` (see module docstring); the
    manifest and the returned metrics are complete only on the main process (others return
    their own share). ``renderer_hook`` lets tests wrap the renderer (count calls, inject a kill).
    """
    if opts.backend == "openai":
        from medicsynth.diffusion.hosted import generate_hosted

        return generate_hosted(plan_path, images_dir, manifest_path, opts, progress=progress, prices=prices,
                               per_shard=per_shard)
    if opts.backend != "diffusers":
        raise GenerateError(f"generate.backend must be diffusers or openai, got {opts.backend!r}")
    from accelerate import PartialState
    from accelerate.utils import gather_object

    t0 = time.perf_counter()
    state = PartialState(cpu=opts.device == "cpu")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    images_dir, manifest_path = Path(images_dir), Path(manifest_path)
    plan = read_plan(plan_path)
    ref = resolve_model(opts.model, demo_dir)
    family = detect_family(ref.path)
    opts = opts.with_family_defaults(family)
    lora_fp = _hash_dir(Path(opts.lora)) if opts.lora else ""
    source = prompt_source(opts, ref)
    device = _device(opts, state)
    res = resolve_options(opts, device)
    images_dir.mkdir(parents=True, exist_ok=True)

    # Model size must be known before deciding what is stale, so read it from the configs.
    width, height = _native_size(ref.path, opts, family)
    status = plan_jobs(plan, images_dir, opts, ref, lora_fp, source, width, height, str(plan_path), family,
                       shards=per_shard is not None)
    # Every process has read the same files; none may write before all have decided.
    state.wait_for_everyone()

    stats = RenderStats()
    t_load = 0.0
    with state.split_between_processes(status.todo) as mine:
        if mine:
            tl = time.perf_counter()
            pipe = load_pipeline(ref, opts, res, family)
            renderer = make_renderer(pipe, opts, res, family, width, height)
            if renderer_hook is not None:
                renderer = renderer_hook(renderer)
            t_load = time.perf_counter() - tl
            desc = "generate" if state.num_processes == 1 else f"generate[{state.process_index}]"
            stats = render_jobs(renderer, mine, opts.model, opts, progress=progress and state.is_local_main_process, desc=desc)
    state.wait_for_everyone()
    per_process = {"process": state.process_index, "device": str(device), "load_seconds": round(t_load, 2), **stats.as_dict()}
    all_stats = gather_object([per_process]) if state.num_processes > 1 else [per_process]

    metrics: dict[str, Any] = {
        "model": opts.model, "model_fingerprint": ref.fingerprint, "family": family.name, "lora": opts.lora or None,
        "prompt_source": source, "planned": len(plan), "renderable": len(status.jobs),
        "quarantined": len(status.quarantined), "quarantined_rows": status.quarantined[:50],
        "skipped": status.skipped, "stale_rerendered": status.stale,
        "rendered": sum(s["rendered"] for s in all_stats),
        "processes": state.num_processes, "per_process": all_stats,
        "options": {**{k: v for k, v in asdict(opts).items()}, "resolved": res.describe(), "width": width, "height": height},
    }
    if state.is_main_process:
        refs = pack_shards(status.jobs, images_dir, per_shard, status.in_shards) if per_shard is not None else None
        manifest = build_manifest(status, images_dir, opts, width, height, refs)
        from medicsynth.manifest import write_manifest

        write_manifest(manifest, manifest_path)
        planned_names = {j.path.name for j in status.jobs}
        metrics["blank_flagged"] = int(manifest["blank_flag"].sum())
        metrics["nsfw_flagged"] = int(manifest["nsfw_flag"].sum())
        # The output is exactly the plan, as shards are (pack_shards drops the rest): images of an
        # earlier plan (another allocation, a smaller plan) would otherwise stay in the DVC output
        # and make its hash depend on the run's history, not on the data, code and params.
        orphans = [p for p in images_dir.glob("*.jpg") if p.name not in planned_names]
        for path in orphans:
            path.unlink()
        metrics["removed_files_not_in_plan"] = len(orphans)
        render_seconds = max((s["seconds"] for s in all_stats), default=0.0)
        metrics["seconds_render"] = round(render_seconds, 2)
        metrics["images_per_second"] = round(metrics["rendered"] / render_seconds, 4) if render_seconds else 0.0
    metrics["seconds_total"] = round(time.perf_counter() - t0, 2)
    return metrics


def _native_size(model_dir: Path, opts: GenerateOptions, family: Family | None = None) -> tuple[int, int]:
    """``(width, height)`` to render: the options, or the model's native size read from configs."""
    if opts.width and opts.height:
        return opts.width, opts.height
    native = native_size(model_dir, family or detect_family(model_dir))
    return opts.width or native, opts.height or native
