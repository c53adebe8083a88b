import pytest
import torch

from medicsynth.devices import choose_device


def test_auto_follows_cuda_availability():
    assert choose_device("auto", cuda_available=False) == torch.device("cpu")
    assert choose_device("auto", cuda_available=True) == torch.device("cuda")
    assert choose_device("cpu", cuda_available=True) == torch.device("cpu")
    assert choose_device("cuda:1", cuda_available=True) == torch.device("cuda:1")


def test_explicit_cuda_without_a_device_and_typos_name_the_key():
    with pytest.raises(RuntimeError, match=r"generate.device is 'cuda' but no CUDA device"):
        choose_device("cuda", key="generate.device", cuda_available=False)
    with pytest.raises(ValueError, match=r"train.device is 'gpu'; expected auto, cpu, cuda"):
        choose_device("gpu", key="train.device", cuda_available=True)


def test_every_device_choice_goes_through_choose_device(monkeypatch):
    """training, generate and the LoRA trainer call the one rule (same errors, same keys)."""
    from types import SimpleNamespace

    from medicsynth.diffusion import generate as gen
    from medicsynth.training import resolve_device
    from tests.sections import section

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"relabel.model.device is 'gpu'"):
        resolve_device("gpu", key="relabel.model.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu_state = SimpleNamespace(device=torch.device("cpu"))
    assert gen._device(gen.GenerateOptions.from_params(section("generate", device="auto")), cpu_state).type == "cpu"
    with pytest.raises(RuntimeError, match=r"generate.device is 'cuda' but no CUDA device"):
        gen._device(gen.GenerateOptions.from_params(section("generate", device="cuda")), cpu_state)
    # Under a multi-process launcher a plain CUDA choice becomes this process's GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rank1 = SimpleNamespace(device=torch.device("cuda:1"))
    assert gen._device(gen.GenerateOptions.from_params(section("generate", device="auto")), rank1) == torch.device("cuda:1")
    assert gen._device(gen.GenerateOptions.from_params(section("generate", device="cuda:0")), rank1) == torch.device("cuda:0")
