"""Choosing the torch device from a params value (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``).

One rule for every stage: ``auto`` means CUDA when a device is visible, else CPU; an explicit
``cuda`` without a visible device is an error naming the params key, never a silent CPU run.
"""

from __future__ import annotations

from typing import Any


def choose_device(requested: str, *, key: str = "device", cuda_available: bool | None = None) -> Any:
    """The :class:`torch.device` for ``requested``.

    Parameters: ``requested`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``key`` names the
    params key in errors (e.g. ``"generate.device"``); ``cuda_available`` overrides
    ``torch.cuda.is_available()`` (tests).

    Guarantees: ``auto`` gives ``cuda`` exactly when CUDA is available, else ``cpu``; ``cuda``
    (or ``cuda:N``) without CUDA raises ``RuntimeError`` naming ``key``; any other value raises
    ``ValueError`` naming ``key`` and the accepted values.
    """
    import torch

    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    value = str(requested).strip().lower()
    if value == "auto":
        return torch.device("cuda" if available else "cpu")
    if value == "cpu":
        return torch.device("cpu")
    if value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit()):
        if not available:
            raise RuntimeError(f"params.yaml {key} is {requested!r} but no CUDA device is visible; use auto or cpu")
        return torch.device(value)
    raise ValueError(f"params.yaml {key} is {requested!r}; expected auto, cpu, cuda or cuda:N")
