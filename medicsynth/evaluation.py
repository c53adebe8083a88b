"""The ``evaluate`` stage's logic: score a trained classifier on a manifest, tabulate predictions.

Test labels are always the original ones; the stage script reads params, calls these functions
and writes the reports, predictions and plots.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from medicsynth.labels import CLASSES, TASKS
from medicsynth.manifest import label_matrix
from medicsynth.metrics import classification_report
from medicsynth.training import predict_files


@dataclass(frozen=True)
class EvaluateConfig:
    """The ``evaluate`` section of params.yaml (build with :func:`medicsynth.params.from_section`)."""

    batch_size: int  # images per forward pass
    loader: str      # auto | dali | torch
    ece_bins: int    # bins of the expected calibration error


def score(
    model: Any, meta: Mapping[str, Any], df: pd.DataFrame, config: EvaluateConfig
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Predict ``df``'s files and score them against ``df``'s labels.

    Returns ``(report, probs)``: :func:`medicsynth.metrics.classification_report` of the argmax
    predictions, and per-task ``(len(df), C)`` probabilities in :data:`CLASSES` order.
    """
    probs = predict_files(model, meta, df["file"].tolist(), batch_size=config.batch_size, loader=config.loader)
    labels = label_matrix(df)
    y_true = {t: labels[:, j] for j, t in enumerate(TASKS)}
    y_pred = {t: probs[t].argmax(1) for t in TASKS}
    report = classification_report(y_true, y_pred, probs, n_bins=config.ece_bins)
    return report, probs


def for_metrics(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report without matrices/lists, so `dvc metrics show/diff` lists only numbers."""
    return {
        key: ({t: {k: v for k, v in r.items() if k not in ("confusion", "classes")} for t, r in value.items()}
              if key == "tasks" else value)
        for key, value in report.items()
    }


def predictions_table(test_df: pd.DataFrame, probs: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """One row per test image: ``image_path``, per task ``<task>_true``, ``<task>_pred`` and
    ``<task>_prob_<class>`` (rounded to 5 decimals), in ``test_df``'s order (what compare reads)."""
    predictions = pd.DataFrame({"image_path": test_df["image_path"]})
    for t in TASKS:
        predictions[f"{t}_true"] = test_df[t].to_numpy()
        predictions[f"{t}_pred"] = [CLASSES[t][i] for i in probs[t].argmax(1)]
        for k, c in enumerate(CLASSES[t]):
            predictions[f"{t}_prob_{c}"] = probs[t][:, k].round(5)
    return predictions
