"""Tiny random-weight diffusers pipelines of each generator family, built offline for tests.

Component sizes follow diffusers' own fast tests (``tests/pipelines/{flux,stable_diffusion_3}``):
a one-layer transformer, 32-wide CLIP and T5 encoders, a one-block VAE. Tokenizers are built in
memory (no hub download): a word-level CLIP BPE (:func:`medicsynth.diffusion.tiny.build_tokenizer`)
and a T5 ``Unigram`` tokenizer with a ``Metaspace`` pre-tokenizer, which survives
``save_pretrained``/``from_pretrained``. Each builder returns the pipeline object; :func:`save`
writes it as a standard pipeline directory that ``DiffusionPipeline.from_pretrained`` reloads.
Rendering two 32 px images with 2 steps takes about a second on a busy 2-core CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "a photo of flood fire earthquake hurricane landslide storm damage severe mild little none "
    "people rescue street house road water smoke ruins city aerial view informative disaster"
).split()


def clip_tokenizer(max_length: int = 77):
    from medicsynth.diffusion.tiny import build_tokenizer

    return build_tokenizer(WORDS, model_max_length=max_length)


def t5_tokenizer(max_length: int = 32):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -1.0) for w in WORDS]
    pieces += [(c, -5.0) for c in sorted({c for w in WORDS for c in w})] + [("▁", -3.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           model_max_length=max_length, extra_ids=0)


def _clip_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, hidden_size=32, intermediate_size=37,
                          layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2,
                          pad_token_id=1, vocab_size=1000, hidden_act="gelu", projection_dim=32,
                          max_position_embeddings=77)


def _t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                   vocab_size=1000, relative_attention_num_buckets=8,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                         scaling_factor=1.5035)


def tiny_flux(seed: int = 0):
    """A ``FluxPipeline`` (CLIP + T5, one double and one single transformer block, guidance-distilled)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(1), text_encoder=CLIPTextModel(_clip_config()),
                        tokenizer=clip_tokenizer(), text_encoder_2=_t5(), tokenizer_2=t5_tokenizer(),
                        transformer=transformer)


def tiny_sd3(seed: int = 0):
    """A ``StableDiffusion3Pipeline`` (two CLIP encoders with projection + T5, one transformer block)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4),
        text_encoder=CLIPTextModelWithProjection(_clip_config()), tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config()), tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5(), tokenizer_3=t5_tokenizer(), transformer=transformer)


def tiny_sd15(seed: int = 0):
    """A ``StableDiffusionPipeline`` (the project's tiny demo architecture at 32 px, random weights)."""
    from medicsynth.diffusion.tiny import TinyConfig, build_pipeline

    pipe = build_pipeline(TinyConfig(image_size=32), seed=seed)
    return pipe


BUILDERS = {"flux": tiny_flux, "sd3": tiny_sd3, "sd": tiny_sd15}


def save(pipe, out_dir: str | Path) -> Path:
    """Write ``pipe`` as a pipeline directory (safetensors) and return it."""
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
