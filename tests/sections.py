"""Complete params sections for unit tests (params.yaml is the only source of defaults).

The configs have no default values, so a test that builds one passes every key. These sections
hold the values the unit tests were written against (the former in-code defaults, e.g. no
combination bonuses), not params.yaml's: a change of the demo's params must not change what a
unit test checks. ``section("allocate", total=60)`` returns a fresh copy with overrides.
"""

from __future__ import annotations

import copy
from typing import Any

SECTIONS: dict[str, dict[str, Any]] = {
    # One file per image, as the unit tests were written; the shard tests ask for layout shards.
    "storage": {"layout": "files", "per_shard": 1000},
    "allocate": {
        "mode": "weakness",
        "total": 280,
        "base_per_combination": 10,
        "f1_thresholds": [0.40, 0.60, 0.75],
        "f1_bonuses": [80, 40, 20],
        "combination_bonuses": [],
        "rounding": "webster",
        "balance_target_share": 0.10,
        "include_unseen": False,
        "f1_reports": [],
        "seed": 0,
    },
    "caption": {
        "backend": "template",
        "proportion_real": 0.5,
        "temperature_grounded": 0.4,
        "temperature_hypothetical": 0.8,
        "min_words": 25,
        "max_words": 50,
        "max_tokens": 77,
        "tokenizer": None,
        "negative_prompts": {},
        "negative_prompt_common": "",
        "prompt_grounded": "prompts/caption_grounded.txt",
        "prompt_hypothetical": "prompts/caption_hypothetical.txt",
        "analysis": False,
        "keywords": ["time_of_day", "region", "camera_angle", "weather"],
        "llm": {},
    },
    "filter": {
        "method": "classifier",
        "threshold": 0.5,
        "tasks": ["damage_severity", "informative", "humanitarian", "disaster_types"],
        "blank_std": 8.0,
        "blank_dominant_share": 0.95,
        "hash": "phash",
        "phash_bits": 256,
        "phash_threshold": 24,
        "check_real_duplicates": True,
        "classifier_model": "models/original-small_cnn",
        "batch_size": 64,
        "device": "cpu",
        "loader": "auto",
        "workers": 0,
        "cache_dir": None,
        "grid_per_class": 4,
        "vlm": {},
    },
    # GenerateOptions: every field (params.yaml's keys and the options it does not list).
    "generate": {
        "model": "demo",
        "backend": "diffusers",
        "hosted": {},
        "lora": "",
        "lora_scale": 1.0,
        "scheduler": "dpmsolver++",
        "steps": 20,
        "guidance": 7.0,
        "max_sequence_length": 0,
        "cpu_offload": "none",
        "vae_tiling": False,
        "vae_slicing": False,
        "guidance_rescale": 0.0,
        "width": 0,
        "height": 0,
        "negative_prompt": "",
        "prompt_source": "auto",
        "batch_size": 0,
        "dtype": "auto",
        "device": "auto",
        "threads": 0,
        "safety_checker": True,
        "blank_std": 2.0,
        "jpeg_quality": 95,
        "writer_threads": 4,
        "vae_batch": 0,
        "channels_last": "auto",
        "fuse_qkv": "auto",
        "compile": "auto",
        "compile_vae": "auto",
        "compile_mode": "max-autotune-no-cudagraphs",
        "inductor_tuning": "auto",
        "attention_backend": "auto",
        "cudnn_benchmark": "auto",
        "tf32": "auto",
        "pad_batches": "auto",
    },
    "generate.hosted": {
        "model": "gpt-image-1",
        "base_url": None,
        "size": "1024x1024",
        "quality": None,
        "response_format": None,
        "extra": {},
        "max_calls": 1000,
        "concurrency": 4,
        "timeout_s": 120.0,
        "max_retries": 5,
        "cache_dir": ".llm_cache",
        "budget_usd": None,
    },
    "adapt.demo": {
        "vae_steps": 1000,
        "vae_batch": 8,
        "vae_lr": 2e-3,
        "unet_steps": 1400,
        "unet_batch": 8,
        "unet_lr": 2e-3,
        "warmup_steps": 25,
        "caption_dropout": 0.1,
        "snr_gamma": 5.0,
    },
    "adapt.lora": {
        "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "rank": 16,
        "alpha": 16.0,
        "steps": 2000,
        "batch": 8,
        "lr": 1e-4,
        "resolution": 512,
        "gradient_checkpointing": True,
        "mixed_precision": "bf16",
        "captions": "template",
        "guidance": 3.5,
        "weighting_scheme": "logit_normal",
        "max_sequence_length": 0,
    },
    "report": {
        "title": "medicsynth results",
        "relabel_examples": 6,
        "synthetic_task": "disaster_types",
        "synthetic_per_class": 6,
        "thumbnail_px": 96,
        "allocation_rows": 25,
    },
}


def section(name: str, **overrides: Any) -> dict[str, Any]:
    """A deep copy of test section ``name`` with ``overrides`` applied (keys must exist)."""
    values = copy.deepcopy(SECTIONS[name])
    unknown = set(overrides) - set(values)
    if unknown:
        raise KeyError(f"tests/sections.py {name}: no key(s) {sorted(unknown)}")
    values.update(overrides)
    return values
