"""Applying a trained classifier to image files (used by evaluate, relabel and filter)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from medicsynth.models import load_classifier
from medicsynth.training import predict_files


def predict_proba(
    model_dir: str | Path, files: Sequence[str], *, batch_size: int = 64, device: str = "cpu",
    loader: str = "auto",
) -> dict[str, np.ndarray]:
    """Per-task ``(n, C)`` probabilities, classes in :data:`medicsynth.labels.CLASSES` order.

    ``model_dir`` is a directory holding ``model.pt`` (as written by the train stage) or the file.
    """
    model, meta = load_classifier(model_dir)
    return predict_files(model, meta, files, batch_size=batch_size, device=device, loader=loader)
