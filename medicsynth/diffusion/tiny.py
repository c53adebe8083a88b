"""A tiny text-to-image latent diffusion pipeline that can be built and trained offline on a CPU.

It has Stable Diffusion's structure — ``AutoencoderKL`` + ``UNet2DConditionModel`` +
``CLIPTextModel`` + ``CLIPTokenizer`` + a DDPM noise schedule — at a size that trains in minutes
on two cores (recipe in ``/work/shared/DEMO-GENERATOR-NOTES.md``):

- VAE: blocks (16, 32), one ×2 downsampling, 4 latent channels, no mid-block attention (~160k
  parameters). 64 px images ↔ 4×32×32 latents.
- UNet: blocks (16, 32, 64), 2 attention heads, cross-attention on the text encoder's 64-dim
  hidden states (~1M parameters); v-prediction on a zero-terminal-SNR schedule (see
  :func:`build_scheduler`).
- Text: a 2-layer, 64-wide ``CLIPTextModel`` with a whole-word BPE vocabulary and
  ``model_max_length`` 16 (shorter sequences kept training steps ~25% faster).

Because it is saved as a standard :class:`~diffusers.StableDiffusionPipeline` directory, the
generate stage loads it exactly like a real Stable Diffusion checkpoint.

Prompts: a 2-layer text encoder trained for four minutes cannot read open-ended captions, so the
demo model is trained and sampled on a compact *label prompt* built mechanically from the four
labels (:func:`label_prompt`), one token per label, e.g. ``"flood severe
infrastructureandutilitydamage informative"``. The pipeline directory records this in ``medicsynth.json``
(``prompt_source: labels``) so generate builds the same prompt from each planned image's labels.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from medicsynth.labels import CLASSES, TASKS, validate_label

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"  # CLIP's BPE marks the end of a word with this suffix
# Written next to the pipeline so generate knows how the model expects to be prompted.
META_FILE = "medicsynth.json"

# Order of the label words in a prompt: the disaster type first, it carries the most signal.
PROMPT_ORDER: tuple[str, ...] = ("disaster_types", "damage_severity", "humanitarian", "informative")


def label_prompt(labels: Mapping[str, str]) -> str:
    """The compact prompt the demo model is trained and sampled on: one word per label.

    ``{"disaster_types": "not_disaster", "damage_severity": "little_or_none", ...}`` →
    ``"notdisaster littleornone nothumanitarian notinformative"``. One vocabulary token per
    label, always in the same four positions, is what a 2-layer text encoder trained for four
    minutes learns reliably; multi-word labels ("not disaster" vs "other disaster") share tokens
    and had to be disentangled first (measured: lower agreement). Labels are validated, so a
    typo fails here rather than becoming an unknown token.
    """
    words = []
    for task in PROMPT_ORDER:
        if task not in labels:
            raise KeyError(f"label_prompt needs a {task!r} label; got {sorted(labels)}")
        words.append(validate_label(task, labels[task]).replace("_", ""))
    return " ".join(words)


def prompt_vocabulary() -> list[str]:
    """Every word that :func:`label_prompt` can produce, sorted."""
    return sorted({label.replace("_", "") for task in TASKS for label in CLASSES[task]})


def learn_bpe_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges (in rank order) that turn each of ``words`` into a single token.

    This is BPE training on the word list itself: repeatedly merge the most frequent adjacent
    pair until every word is one symbol. Learning the merges (instead of writing a left-to-right
    chain per word) keeps them consistent: a merge from one word can never split another.
    """
    # CLIP's BPE sees a word as its characters with the end-of-word marker on the last one.
    symbols = {w: [*w[:-1], w[-1] + EOW] for w in sorted(set(words))}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for seq in symbols.values():
            pairs.update(zip(seq, seq[1:]))
        if not pairs:
            return merges
        # Most frequent first; ties broken lexically so the vocabulary is reproducible.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, seq in symbols.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            symbols[w] = out


def build_tokenizer(words: Sequence[str] | None = None, model_max_length: int = 16) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` whose vocabulary holds ``words`` (default: the label words) whole.

    Built from an in-memory vocabulary and merge list; transformers 5 ignores ``vocab_file`` in
    the constructor and wants merges as tuples. Characters outside the words' alphabet map to
    the unknown token (``<|endoftext|>``, as in CLIP).
    """
    words = list(words) if words is not None else prompt_vocabulary()
    merges = learn_bpe_merges(words)
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    alphabet = sorted({c for w in words for c in w})
    for token in [*alphabet, *(c + EOW for c in alphabet), *(a + b for a, b in merges)]:
        vocab.setdefault(token, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    return tokenizer


@dataclass(frozen=True)
class TinyConfig:
    """Architecture of the tiny pipeline (defaults: the recipe that reached ≥50% agreement)."""

    image_size: int = 64
    vae_channels: tuple[int, ...] = (16, 32)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (16, 32, 64)
    # Which UNet levels get cross-attention (True) — the full-resolution level does not: at 32×32
    # latents its 1024-token attention would cost more than the whole rest of a training step.
    unet_attention: tuple[bool, ...] = (False, True, True)
    # Per level: the attention block's first attention reads the prompt too, instead of the
    # image itself (diffusers' ``only_cross_attention``). Its cost then grows with the number of
    # latent positions × prompt tokens, not positions², so a full-resolution level can afford it.
    # Tried 2026-12-03 to let the prompt place small figures (unet_attention all True, this
    # (True, False, False)): humanitarian agreement 0.30 vs 0.26, 1.5x slower steps; not default.
    unet_only_cross_attention: tuple[bool, ...] = (False, False, False)
    attention_heads: int = 2
    layers_per_block: int = 1
    norm_groups: int = 8
    vae_norm_groups: int = 8
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    # Standard deviation of the initial token embeddings. CLIP's own 0.02 starts every label word
    # at almost the same vector; a from-scratch UNet then learns the words whose images differ
    # most (disaster type, informative) and never the rest: after training, swapping the
    # humanitarian or damage word moved the text embedding 27-31x less than swapping the disaster
    # word, and the images not visibly. Distinct random vectors from the start (std 1) let it.
    token_init_std: float = 1.0
    max_length: int = 16
    # Noise schedule (DDPM, 1000 training steps). See build_scheduler for why these matter here.
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "v_prediction"
    zero_terminal_snr: bool = True
    timestep_spacing: str = "trailing"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "TinyConfig":
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**fields)


def build_vae(cfg: TinyConfig) -> AutoencoderKL:
    """The tiny VAE: ×2 downsampling per extra block, no mid-block attention."""
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_groups,
        sample_size=cfg.image_size,
        mid_block_add_attention=False,
        # Replaced after VAE training by 1/std of the training latents (see train.py).
        scaling_factor=1.0,
    )


def build_unet(cfg: TinyConfig) -> UNet2DConditionModel:
    """The tiny conditional UNet on ``latent_channels × (image_size / 2^(len(vae)-1))²`` latents."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.unet_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.unet_attention))
    latent_size = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.text_hidden,
        # In diffusers' UNet2DConditionModel this argument is the number of heads (a known
        # misnomer kept for checkpoint compatibility).
        attention_head_dim=cfg.attention_heads,
        only_cross_attention=tuple(cfg.unet_only_cross_attention),
        norm_num_groups=cfg.norm_groups,
    )


def build_text_encoder(cfg: TinyConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A small ``CLIPTextModel`` whose special-token ids match ``tokenizer``."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_hidden * 4,
        projection_dim=cfg.text_hidden,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModel(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, cfg.token_init_std)
    return model


def build_scheduler(cfg: TinyConfig | None = None) -> DDPMScheduler:
    """The training noise schedule; samplers in generate are built from its config.

    Stable Diffusion's ``scaled_linear`` betas leave ~7% of the signal at the last training step,
    so the model never sees pure noise although sampling starts from it; the global colour of a
    scene — the main cue for disaster types here — then comes out as an average. Rescaling the
    betas to zero terminal SNR (Lin et al. 2024) closes that gap; it needs v-prediction (ε is
    undefined at SNR 0), and ``trailing`` spacing makes sampling start at the last training step.
    Measured on the demo data (one seed, guidance 7, 20 DPM-Solver++ steps, disaster-type
    agreement): ε + scaled_linear 16%, ε + linear 26%, v + zero-SNR 56%.
    """
    cfg = cfg or TinyConfig()
    betas = {"scaled_linear": (0.00085, 0.012), "linear": (0.0001, 0.02)}.get(cfg.beta_schedule, (0.0001, 0.02))
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=cfg.beta_schedule,
        beta_start=betas[0],
        beta_end=betas[1],
        prediction_type=cfg.prediction_type,
        rescale_betas_zero_snr=cfg.zero_terminal_snr,
        timestep_spacing=cfg.timestep_spacing,
        clip_sample=False,
        steps_offset=1,
    )


def build_pipeline(cfg: TinyConfig | None = None, seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised tiny pipeline (no download); ``seed`` fixes the initial weights."""
    cfg = cfg or TinyConfig()
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(model_max_length=cfg.max_length)
    return StableDiffusionPipeline(
        vae=build_vae(cfg),
        text_encoder=build_text_encoder(cfg, tokenizer),
        tokenizer=tokenizer,
        unet=build_unet(cfg),
        scheduler=build_scheduler(cfg),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipe: StableDiffusionPipeline, out_dir: str | Path, meta: Mapping) -> None:
    """Save ``pipe`` as a standard diffusers directory plus ``medicsynth.json`` (``meta``).

    ``meta`` should carry ``prompt_source`` (``labels`` for the demo model) so generate prompts
    the model the way it was trained.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    tmp = out_dir / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(dict(meta), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(out_dir / META_FILE)


def read_meta(model_dir: str | Path) -> dict:
    """``medicsynth.json`` of a pipeline directory, or ``{}`` for a model not written by adapt."""
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
