"""Reading ``params.yaml``: each stage asks for the sections it needs, nothing global."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """The whole parameter file as a dict."""
    with open(path, encoding="utf-8") as fh:
        params = yaml.safe_load(fh) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return params


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """One section of ``params``; a clear error if it is missing."""
    try:
        value = params[name]
    except KeyError:
        raise KeyError(f"params.yaml has no section {name!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"params.yaml: section {name!r} must be a mapping")
    return value
