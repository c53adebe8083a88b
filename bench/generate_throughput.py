"""Stable Diffusion 1.5 throughput through the generate stage's own code path.

Builds the real SD 1.5 architecture — ``UNet2DConditionModel`` (859.5M parameters),
``AutoencoderKL`` (83.7M), ``CLIPTextModel`` ViT-L/14 text tower (123.1M; 768 wide, 12 layers,
77 tokens) — with random weights and an offline tokenizer, so nothing is downloaded. Random
weights cost exactly the same FLOPs as trained ones. Each variant is a
:class:`medicsynth.diffusion.generate.GenerateOptions`; images are planned with
:func:`~medicsynth.diffusion.generate.plan_jobs` and rendered + written as JPEGs with
:func:`~medicsynth.diffusion.generate.render_jobs` and :class:`~medicsynth.diffusion.generate.Renderer`
— the functions the generate stage runs. Equal work in every variant: 512², 30 DPM-Solver++
steps, classifier-free guidance 7.5 (one batched UNet call per step), VAE decode, JPEG write.

Variants (``--variants``, comma-separated; default: the first four):

=========================  ====================================================================
``defaults_b1``            fp16, batch 1, no speed options (diffusers' defaults incl. SDPA)
``defaults_b16``           … batch 16
``b16_cl_fused_compile``   … + channels_last + fused QKV + torch.compile(UNet) (mode default)
``ours``                   batch 32, channels_last, fused QKV, compile UNet *and* VAE decoder
                           with max-autotune-no-cudagraphs, inductor knobs (1×1 conv as GEMM,
                           coordinate-descent tuning, no epilogue fusion), cuDNN benchmark,
                           static padded batches, VAE decode in chunks of 16, no host sync
                           inside the denoising loop, JPEG encoding overlapped in threads
``ours_default_compile``   ``ours`` with compile mode ``default`` and no inductor knobs: minutes
                           less compilation, to weigh against what autotuning buys
``ours_reduce_overhead``   ``ours_default_compile`` with CUDA graphs (compile mode ``reduce-overhead``)
``ours_b64``               ``ours`` at batch 64
``ours_cudagraphs``        ``ours`` with compile mode max-autotune (CUDA graphs)
``ours_cudnn_attn``        ``ours`` with SDPA restricted to cuDNN attention
``ours_flash_attn``        ``ours`` with SDPA restricted to flash attention
``ours_bf16``              ``ours`` in bf16
=========================  ====================================================================

GPU (one H100)::

    python bench/generate_throughput.py --out bench/results/generate_throughput_h100.json

CPU smoke test (scaled-down SD-1.5-shaped model, 64², 3 steps; proves the script runs)::

    python bench/generate_throughput.py --smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import pandas as pd
import torch

from medicsynth.diffusion.generate import (
    GenerateOptions,
    ModelRef,
    Renderer,
    plan_jobs,
    render_jobs,
    resolve_options,
)
from medicsynth.diffusion.tiny import build_tokenizer, label_prompt, prompt_vocabulary
from medicsynth.io import write_json
from medicsynth.labels import CLASSES, TASKS

# Stable Diffusion 1.5's component configs, written out (values of the released config.json files).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
SD15_SCHEDULER = dict(  # PNDM's config in SD 1.5; generate builds DPM-Solver++ from it
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
)
SD15_PARAMS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}

# A scaled-down model of the same shape for --smoke (CPU, seconds).
SMOKE_UNET = {**SD15_UNET, "sample_size": 8, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1,
              "cross_attention_dim": 32, "attention_head_dim": 2, "norm_num_groups": 8}
SMOKE_VAE = {**SD15_VAE, "block_out_channels": (16, 16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8,
             "sample_size": 64}
SMOKE_TEXT = {**SD15_TEXT, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "projection_dim": 32}


def build_sd15(device: torch.device, dtype: torch.dtype, smoke: bool = False, seed: int = 0):
    """A ``StableDiffusionPipeline`` with SD 1.5's architecture (or the smoke copy), random weights."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(prompt_vocabulary(), model_max_length=77)
    text_cfg = CLIPTextConfig(**(SMOKE_TEXT if smoke else SD15_TEXT), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    # Construct directly on the device: initialising 1B parameters on the host is the slow part.
    with torch.device(device):
        unet = UNet2DConditionModel(**(SMOKE_UNET if smoke else SD15_UNET))
        vae = AutoencoderKL(**(SMOKE_VAE if smoke else SD15_VAE))
        text = CLIPTextModel(text_cfg)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def check_architecture() -> dict:
    """Parameter counts of the full-size build (on the meta device: no memory, no time)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        counts = {
            "unet": sum(p.numel() for p in UNet2DConditionModel(**SD15_UNET).parameters()),
            "vae": sum(p.numel() for p in AutoencoderKL(**SD15_VAE).parameters()),
            "text_encoder": sum(p.numel() for p in CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).parameters()),
        }
    for name, n in counts.items():
        if n != SD15_PARAMS[name]:
            raise AssertionError(f"SD 1.5 {name}: built {n:,} parameters, expected {SD15_PARAMS[name]:,}")
    return counts


def variants(smoke: bool, smoke_compile: bool = False) -> dict[str, GenerateOptions]:
    # Every option spelt out (GenerateOptions has no defaults for what params.yaml sets): the
    # benchmark measures fixed configurations, not whatever params.yaml holds today.
    base = GenerateOptions(model="bench-random-sd15", backend="diffusers", hosted={}, lora="",
                           scheduler="dpmsolver++", steps=30, guidance=7.5, max_sequence_length=0,
                           cpu_offload="none", vae_tiling=False, vae_slicing=False, width=512, height=512,
                           prompt_source="auto", batch_size=0, dtype="fp16", device="auto", threads=0,
                           safety_checker=False, blank_std=2.0, jpeg_quality=95,
                           channels_last=False, fuse_qkv=False, compile=False, compile_vae=False,
                           compile_mode="max-autotune-no-cudagraphs", inductor_tuning=False,
                           cudnn_benchmark=False, tf32=False, pad_batches=False)
    ours = replace(base, batch_size=32, channels_last=True, fuse_qkv=True, compile=True, compile_vae=True,
                   compile_mode="max-autotune-no-cudagraphs", inductor_tuning=True, cudnn_benchmark=True,
                   tf32=True, pad_batches=True, vae_batch=16)
    table = {
        "defaults_b1": replace(base, batch_size=1),
        "defaults_b16": replace(base, batch_size=16),
        "b16_cl_fused_compile": replace(base, batch_size=16, channels_last=True, fuse_qkv=True, compile=True,
                                        compile_mode="default", pad_batches=True),
        "ours": ours,
        "ours_default_compile": replace(ours, compile_mode="default", inductor_tuning=False),
        "ours_reduce_overhead": replace(ours, compile_mode="reduce-overhead", inductor_tuning=False),
        "ours_b64": replace(ours, batch_size=64),
        "ours_cudagraphs": replace(ours, compile_mode="max-autotune"),
        "ours_cudnn_attn": replace(ours, attention_backend="cudnn"),
        "ours_flash_attn": replace(ours, attention_backend="flash"),
        "ours_bf16": replace(ours, dtype="bf16"),
    }
    if smoke:
        # CPU: fp32, tiny size, few steps. Compile stays off unless --smoke-compile (minutes on
        # 2 cores), which traces the same graphs with mode "default" (CPU autotuning is slow).
        table = {k: replace(v, dtype="fp32", width=64, height=64, steps=3, batch_size=min(v.batch_size, 4),
                            compile=v.compile and smoke_compile, compile_vae=v.compile_vae and smoke_compile,
                            compile_mode="default", inductor_tuning=False, attention_backend="auto")
                 for k, v in table.items()}
    return table


def bench_plan(n: int, seed0: int = 0) -> pd.DataFrame:
    """``n`` planned images cycling through label combinations, like a caption plan."""
    rows = []
    for i in range(n):
        labels = {t: CLASSES[t][(i * (k + 1)) % len(CLASSES[t])] for k, t in enumerate(TASKS)}
        rows.append({"id": f"bench-{i:05d}", "seed": seed0 + i, **labels, "caption": label_prompt(labels),
                     "negative_prompt": ""})
    return pd.DataFrame(rows)


_GLOBAL_FLAGS: dict[str, object] = {}


def reset_global_flags() -> None:
    """Undo process-wide switches a previous variant set (cuDNN, TF32, inductor knobs)."""
    import torch._inductor.config as inductor

    if not _GLOBAL_FLAGS:
        _GLOBAL_FLAGS.update(
            benchmark=torch.backends.cudnn.benchmark, matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_tf32=torch.backends.cudnn.allow_tf32,
            inductor={k: getattr(inductor, k) for k in ("conv_1x1_as_mm", "coordinate_descent_tuning",
                                                        "coordinate_descent_check_all_directions", "epilogue_fusion")},
        )
    torch.backends.cudnn.benchmark = _GLOBAL_FLAGS["benchmark"]
    torch.backends.cuda.matmul.allow_tf32 = _GLOBAL_FLAGS["matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = _GLOBAL_FLAGS["cudnn_tf32"]
    for k, v in _GLOBAL_FLAGS["inductor"].items():
        setattr(inductor, k, v)


def run_variant(name: str, opts: GenerateOptions, device: torch.device, n_images: int, warmup_batches: int,
                smoke: bool, out_dir: Path) -> dict:
    reset_global_flags()
    res = resolve_options(opts, device)
    pipe = build_sd15(device, res.dtype, smoke=smoke)
    renderer = Renderer(pipe, opts, res)
    ref = ModelRef(opts.model, out_dir, "bench", "random-weights")
    images_dir = out_dir / name
    images_dir.mkdir(parents=True, exist_ok=True)
    bs = res.batch_size
    n_images = max(n_images, bs)
    n_images -= n_images % bs  # whole batches: every variant measures steady state, not a ragged tail
    plan = bench_plan(n_images + warmup_batches * bs)
    status = plan_jobs(plan, images_dir, opts, ref, "", "caption", opts.width, opts.height)
    warm, timed = status.todo[: warmup_batches * bs], status.todo[warmup_batches * bs:]
    t0 = time.perf_counter()
    if warm:
        render_jobs(renderer, warm, name, opts, progress=False)  # compile/autotune + cudnn benchmark happen here
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stats = render_jobs(renderer, timed, name, opts, progress=False)
    result = {
        "variant": name, "images": stats.rendered, "batch_size": bs, "seconds": round(stats.seconds, 3),
        "images_per_second": round(stats.rendered / stats.seconds, 3), "warmup_seconds": round(warmup_s, 1),
        "blank_flagged": stats.blank, "resolved": res.describe(),
        "options": {k: v for k, v in asdict(opts).items() if k not in ("model", "lora", "negative_prompt")},
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del renderer, pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="defaults_b1,defaults_b16,b16_cl_fused_compile,ours")
    parser.add_argument("--images", type=int, default=128, help="timed images per batched variant")
    parser.add_argument("--images-b1", type=int, default=16, help="timed images for batch-1 variants")
    parser.add_argument("--warmup-batches", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="CPU, scaled-down model, 64², 3 steps")
    parser.add_argument("--smoke-compile", action="store_true", help="with --smoke: keep torch.compile on")
    parser.add_argument("--out", help="also write the results JSON here")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 with --smoke, where 2 threads on a shared 2-core "
                             "machine spin-wait; torch's default otherwise)")
    args = parser.parse_args()
    threads = args.threads if args.threads is not None else (1 if args.smoke else 0)
    if threads:
        torch.set_num_threads(threads)

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke for the CPU check, or on a GPU machine")
    table = variants(args.smoke, args.smoke_compile)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in table]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {sorted(table)}")

    report = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "smoke": args.smoke, "work": "512x512, 30 steps, CFG 7.5" if not args.smoke else "64x64, 3 steps, CFG 7.5",
        "architecture_parameters": check_architecture(), "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        for name in names:
            opts = table[name]
            n = args.images_b1 if opts.batch_size == 1 else args.images
            if args.smoke:
                n = 8
            result = run_variant(name, opts, device, n, args.warmup_batches if not args.smoke else 1, args.smoke, Path(tmp))
            report["results"].append(result)
            print(f"{name:24s} batch {result['batch_size']:3d}  {result['images_per_second']:8.3f} img/s"
                  f"  ({result['images']} images in {result['seconds']:.1f} s, warm-up {result['warmup_seconds']:.0f} s)",
                  flush=True)
            if args.out:  # after every variant, so a run cut short keeps the ones that finished
                write_json(report, args.out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
