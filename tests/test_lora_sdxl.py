"""SDXL LoRA (``adapt.mode: lora``) on a tiny random-weight SDXL pipeline, on the CPU.

The tiny ``StableDiffusionXLPipeline`` uses the component sizes of diffusers' SDXL fast tests
(a two-level UNet with ``addition_embed_type="text_time"``, two 32-wide CLIP text encoders, the
second with a projection) and the tokenizers/VAE conventions of ``tests/tiny_pipelines.py``. It
is saved as a pipeline directory and run through ``stages/adapt.py`` and ``stages/generate.py``
exactly as a downloaded SDXL would be: the family is read from ``model_index.json``. The last
test checks, for every family, that adapt's lora mode is a function of data, code and params
(the LoRA initialisation is seeded by ``adapt.seed``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from medicsynth.diffusion.families import detect_family, native_size
from medicsynth.diffusion.lora import FLOW_KEYS, _SizedImageFiles, train_sdxl_lora
from medicsynth.diffusion.train import LoraTrainConfig
from medicsynth.manifest import read_manifest
from tests import tiny_pipelines
from tests.sections import section
from tests.test_generators import generate_params, run_stage, write_plan, write_train_manifest

torch.set_num_threads(1)


def tiny_sdxl(seed: int = 0):
    """A ``StableDiffusionXLPipeline`` with diffusers' fast-test UNet, two CLIP encoders, a 1-block VAE.

    UNet added embedding: 6 time ids × ``addition_time_embed_dim`` 8 + the 32-wide pooled
    projection of ``text_encoder_2`` = 80; cross-attention width 64 = 32 + 32 (the two encoders'
    hidden states concatenated). The VAE has one block (1 latent cell per pixel), so a 32 px
    image is a 4×32×32 latent, the UNet's ``sample_size``.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(2, 4), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear",
                                       timestep_spacing="leading")
    cfg = tiny_pipelines._clip_config()
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(cfg), text_encoder_2=CLIPTextModelWithProjection(cfg),
        tokenizer=tiny_pipelines.clip_tokenizer(), tokenizer_2=tiny_pipelines.clip_tokenizer(), unet=unet,
        scheduler=scheduler, add_watermarker=False)


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory) -> Path:
    return tiny_pipelines.save(tiny_sdxl(), tmp_path_factory.mktemp("tiny_models") / "sdxl")


def lora_section(model: Path, **kw) -> dict:
    return {**section("adapt.lora", base_model=str(model), rank=4, alpha=4.0, steps=3, batch=2, lr=0.05,
                      resolution=32, gradient_checkpointing=False, mixed_precision="no", captions="template"),
            "warmup_steps": 1, "num_workers": 0, "device": "cpu", **kw}


def test_sdxl_family_is_read_from_model_index(sdxl_model):
    fam = detect_family(sdxl_model)
    assert (fam.name, fam.denoiser, fam.objective, fam.lora_pipeline) == ("sdxl", "unet", "eps", "StableDiffusionXLPipeline")
    assert fam.negative_prompt and native_size(sdxl_model, fam) == 32


@pytest.mark.parametrize("width,height,time_ids", [
    (32, 48, [48, 32, 8, 0, 32, 32]),   # portrait, no resize: the middle 32 rows
    (48, 32, [32, 48, 0, 8, 32, 32]),   # landscape, no resize: the middle 32 columns
    (96, 64, [64, 96, 0, 8, 32, 32]),   # halved to 48×32, then the middle 32 columns
    (48, 40, [40, 48, 0, 3, 32, 32]),   # 0.8×: 38×32 (rounded), crop from column 3
])
def test_time_ids_are_the_original_size_crop_and_target(tmp_path, width, height, time_ids):
    rng = np.random.default_rng(width * height)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "im.png")
    x, prompt, ids = _SizedImageFiles(["im.png"], ["a photo"], 32, tmp_path)[0]
    assert ids.tolist() == time_ids and prompt == "a photo" and x.shape == (3, 32, 32)
    top, left = time_ids[2], time_ids[3]
    if (width, height) in ((32, 48), (48, 32)):  # no resize: the crop is the original's pixels at (top, left)
        expected = torch.from_numpy(pixels[top:top + 32, left:left + 32]).permute(2, 0, 1).float() / 127.5 - 1.0
        assert torch.allclose(x, expected, atol=1e-6)
    elif (width, height) == (96, 64):  # an exact halving: the crop of PIL's own resize at (top, left)
        half = np.asarray(Image.fromarray(pixels).resize((48, 32), Image.Resampling.BICUBIC))
        expected = torch.from_numpy(half[top:top + 32, left:left + 32].copy()).permute(2, 0, 1).float() / 127.5 - 1.0
        assert torch.allclose(x, expected, atol=1e-6)


def test_sdxl_trainer_feeds_pooled_embeds_and_per_image_time_ids(sdxl_model, tmp_path):
    """The UNet gets SDXL's added conditions: pooled ``text_embeds`` and each image's time ids."""
    from diffusers import StableDiffusionXLPipeline

    rng = np.random.default_rng(0)
    sizes = [(48, 40), (32, 48)]  # (width, height)
    files = []
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        files.append(f"{i}.png")
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_model, local_files_only=True)
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (kwargs["added_cond_kwargs"], kwargs["encoder_hidden_states"].shape)), with_kwargs=True)
    trainer = {k: v for k, v in lora_section(sdxl_model, caption_dropout=0.0).items() if k not in ("captions", *FLOW_KEYS)}
    cfg = LoraTrainConfig.from_params({**trainer, "steps": 2, "balance": "", "seed": 0})
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    log = train_sdxl_lora(pipe, files, ["a photo of flood", "fire smoke"], None, cfg, torch.device("cpu"), tmp_path,
                          progress=False)
    assert log.steps == 2 and len(log.losses) == 2 and all(np.isfinite(log.losses))
    assert len(seen) == 2
    expected = {(40, 48, 0, 3, 32, 32), (48, 32, 8, 0, 32, 32)}
    for added, hidden_shape in seen:
        assert added["text_embeds"].shape == (2, 32)  # text_encoder_2's projection
        assert {tuple(int(v) for v in row) for row in added["time_ids"]} <= expected
        assert hidden_shape == (2, 77, 64)  # both encoders' 32-wide hidden states, concatenated
    # Only LoRA weights were added and trained: every base weight is unchanged.
    state = pipe.unet.state_dict()
    lora_keys = [k for k in state if "lora_" in k]
    assert lora_keys and any(float(state[k].abs().max()) > 0 for k in lora_keys if "lora_B" in k)
    for k, v in base.items():
        key = k if k in state else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[key], v), k


@pytest.mark.slow
def test_adapt_lora_sdxl_through_the_stages_changes_generated_images(sdxl_model, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    write_train_manifest(tmp_path)  # 4 images of 48×40 px
    adapt = {"mode": "lora", "train_manifest": "train.tsv", "balance": "disaster_types", "seed": 0, "threads": 1,
             "lora": lora_section(sdxl_model)}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"storage": section("storage"), "adapt": adapt, "generate": generate_params(
        sdxl_model, lora="models/diffusion/lora")}))
    run_stage("stages/adapt.py", tmp_path, "--out", "models/diffusion", "--metrics", "adapt.json",
              "--plot", "adapt.png", monkeypatch=monkeypatch)
    metrics = json.loads((tmp_path / "adapt.json").read_text())
    assert metrics["family"] == "sdxl" and metrics["phases"]["lora"]["steps"] == 3
    assert np.isfinite(metrics["phases"]["lora"]["loss_first"])
    weights = load_file(tmp_path / "models/diffusion/lora/pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("unet.") for k in weights)
    assert {"to_q", "to_k", "to_v", "to_out"} <= {part for k in weights for part in k.split(".")}
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k or "lora.up" in k)

    # generate renders the same plan with and without the LoRA: the LoRA changes every image.
    plan = write_plan(tmp_path / "captions.tsv", 3)
    args = ["--captions", str(plan), "--manifest", "manifest.tsv", "--metrics", "generate.json"]
    run_stage("stages/generate.py", tmp_path, "--images", "with_lora", *args, monkeypatch=monkeypatch)
    gmetrics = json.loads((tmp_path / "generate.json").read_text())
    assert gmetrics["family"] == "sdxl" and gmetrics["lora"] == "models/diffusion/lora"
    assert (gmetrics["options"]["steps"], gmetrics["options"]["guidance"], gmetrics["options"]["scheduler"]) == (2, 5.0, "dpmsolver++")
    with_lora = read_manifest(tmp_path / "manifest.tsv")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"storage": section("storage"), "adapt": adapt, "generate": generate_params(sdxl_model)}))
    run_stage("stages/generate.py", tmp_path, "--images", "base", *args, monkeypatch=monkeypatch)
    base = read_manifest(tmp_path / "manifest.tsv")
    assert len(with_lora) == len(base) == 3
    assert set(with_lora["provenance_key"]).isdisjoint(base["provenance_key"])  # the LoRA is part of each key
    for a, b in zip(sorted(with_lora["file"]), sorted(base["file"])):
        with Image.open(tmp_path / a) as ia, Image.open(tmp_path / b) as ib:
            assert ia.size == ib.size == (32, 32)
            diff = np.abs(np.asarray(ia).astype(int) - np.asarray(ib).astype(int))
        assert diff.mean() > 1.0, (a, b, float(diff.mean()))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sd", "sd3", "flux"])
def test_adapt_lora_is_a_function_of_data_code_and_params(sdxl_model, tmp_path_factory, family, monkeypatch):
    """Two runs of adapt's lora mode give the same adapter bytes (LoRA init seeded by adapt.seed)."""
    import pandas as pd

    from medicsynth.diffusion.lora import adapt_lora

    root = tmp_path_factory.mktemp(f"det_{family}")
    model = sdxl_model if family == "sdxl" else tiny_pipelines.save(tiny_pipelines.BUILDERS[family](), root / "model")
    train = read_manifest(write_train_manifest(root))
    train["file"] = [str(root / f) for f in train["file"]]
    params = {"balance": "disaster_types", "seed": 0, "lora": lora_section(model, steps=1)}
    torch.manual_seed(1)  # the global RNG differs between the two runs: the adapters must not
    adapt_lora(params, train, root / "a", progress=False)
    adapt_lora(params, pd.DataFrame(train), root / "b", progress=False)
    a = (root / "a/lora/pytorch_lora_weights.safetensors").read_bytes()
    b = (root / "b/lora/pytorch_lora_weights.safetensors").read_bytes()
    assert a == b


@pytest.mark.parametrize("family", ["sdxl", "sd", "flux"])
def test_lora_trainers_refuse_zero_steps_naming_the_key(sdxl_model, tmp_path, family):
    """Every trainer's set-up (prepare_lora) names adapt.lora before any sampler or step runs."""
    from medicsynth.diffusion.lora import FlowOptions, load_base_pipeline, train_flow_lora
    from medicsynth.diffusion.train import train_lora

    model = sdxl_model if family == "sdxl" else tiny_pipelines.save(tiny_pipelines.BUILDERS[family](), tmp_path / "m")
    fam = detect_family(model)
    pipe = load_base_pipeline(model, fam)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "0.png")
    trainer = {k: v for k, v in lora_section(model).items() if k not in ("captions", *FLOW_KEYS)}
    cfg = LoraTrainConfig.from_params({**trainer, "steps": 0, "balance": "", "seed": 0})
    args = (["0.png"], ["a photo of flood"], None, cfg)
    with pytest.raises(ValueError, match=r"adapt\.lora: steps and batch must be >= 1, got steps=0"):
        if family == "sdxl":
            train_sdxl_lora(pipe, *args, torch.device("cpu"), tmp_path, progress=False)
        elif family == "sd":
            train_lora(pipe, *args, torch.device("cpu"), tmp_path, progress=False)
        else:
            flow = FlowOptions(guidance=3.5, weighting_scheme="logit_normal", max_sequence_length=0)
            train_flow_lora(pipe, fam, *args, flow, torch.device("cpu"), tmp_path, progress=False)
