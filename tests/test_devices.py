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
