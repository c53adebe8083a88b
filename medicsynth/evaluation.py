"""The ``evaluate`` stage's logic: score a trained classifier on a manifest, tabulate predictions.

The headline test labels are always the original ones (``data/prepared/test.tsv``). When the
relabel stage relabelled test too (``relabel.splits`` lists test, as the study did), the same
predictions are also scored on the relabelled test labels (:func:`relabelled_labels`,
:func:`score_probs`), reported apart as ``test_relabelled``, and the predictions table gains
``{task}_true_relabelled`` columns beside the untouched ``{task}_true``. The stage script reads
params, calls these functions and writes the reports, predictions and plots.
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
    return score_probs(probs, df, config), probs


def score_probs(probs: Mapping[str, np.ndarray], df: pd.DataFrame, config: EvaluateConfig) -> dict[str, Any]:
    """:func:`medicsynth.metrics.classification_report` of ``probs`` (per task ``(len(df), C)``,
    rows in ``df``'s order) against ``df``'s labels: the same predictions scored on other labels."""
    labels = label_matrix(df)
    y_true = {t: labels[:, j] for j, t in enumerate(TASKS)}
    y_pred = {t: np.asarray(probs[t]).argmax(1) for t in TASKS}
    return classification_report(y_true, y_pred, dict(probs), n_bins=config.ece_bins)


def relabelled_labels(test_df: pd.DataFrame, relabelled_df: pd.DataFrame, source: str = "") -> pd.DataFrame:
    """``test_df`` with its four label columns replaced by those of ``relabelled_df`` (matched on
    ``image_path``); every other column, the order and the row count stay ``test_df``'s.

    Raises ``ValueError`` naming ``source`` and an image when the two files do not hold the same
    images (a relabelled test set from another data version).
    """
    rel = relabelled_df.set_index("image_path")
    missing = test_df.loc[~test_df["image_path"].isin(rel.index), "image_path"]
    extra = sorted(set(rel.index) - set(test_df["image_path"]))
    if len(missing) or extra or rel.index.has_duplicates:
        example = missing.iloc[0] if len(missing) else (extra[0] if extra else rel.index[rel.index.duplicated()][0])
        raise ValueError(f"{source or 'relabelled test'}: its images differ from the original test split "
                         f"({len(missing)} missing, {len(extra)} extra, e.g. {example!r}); rerun relabel")
    out = test_df.copy()
    for t in TASKS:
        out[t] = rel.loc[test_df["image_path"], t].to_numpy()
    return out


def for_metrics(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report without matrices/lists, so `dvc metrics show/diff` lists only numbers."""
    return {
        key: ({t: {k: v for k, v in r.items() if k not in ("confusion", "classes")} for t, r in value.items()}
              if key == "tasks" else value)
        for key, value in report.items()
    }


def predictions_table(test_df: pd.DataFrame, probs: Mapping[str, np.ndarray],
                      relabelled_df: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per test image: ``image_path``, per task ``<task>_true``, ``<task>_pred`` and
    ``<task>_prob_<class>`` (rounded to 5 decimals), in ``test_df``'s order (what compare reads).

    With ``relabelled_df`` (:func:`relabelled_labels` of the test split, same order), per task a
    ``<task>_true_relabelled`` column follows ``<task>_true``; without it the table is unchanged.
    """
    predictions = pd.DataFrame({"image_path": test_df["image_path"]})
    for t in TASKS:
        predictions[f"{t}_true"] = test_df[t].to_numpy()
        if relabelled_df is not None:
            predictions[f"{t}_true_relabelled"] = relabelled_df[t].to_numpy()
        predictions[f"{t}_pred"] = [CLASSES[t][i] for i in probs[t].argmax(1)]
        for k, c in enumerate(CLASSES[t]):
            predictions[f"{t}_prob_{c}"] = probs[t][:, k].round(5)
    return predictions
