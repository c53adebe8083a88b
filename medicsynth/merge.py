"""Mixing filtered synthetic images into the real training set at a given ratio.

``mix_ratio`` is the share of synthetic rows in the augmented training set: with ``n_real`` real
rows it asks for ``round(n_real · r / (1 − r))`` synthetic rows. Real rows are never dropped.

Which synthetic rows: the allocation decided how many images each label combination deserves.
:func:`select_synthetic` follows those priorities when the pool or the ratio asks for fewer
images than were planned: the ``r``-th kept image of a combination that was allocated ``a``
images gets the key ``(r + 0.5) / a``, and the smallest keys win. Every combination is thus
served in proportion to its allocation, and when one runs out (the filter rejected its images)
its share flows to the others instead of being lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from medicsynth.labels import CLASSES, TASKS


@dataclass
class MergeResult:
    """The augmented ``train`` manifest, synthetic rows requested/selected/available, and metrics."""

    train: pd.DataFrame
    requested: int
    selected: int
    pool: int
    metrics: dict


def requested_synthetic(n_real: int, mix_ratio: float) -> int:
    """Synthetic rows needed for a synthetic share of ``mix_ratio`` next to ``n_real`` real rows."""
    if not 0.0 <= mix_ratio < 1.0:
        raise ValueError(f"mix_ratio must be in [0, 1), got {mix_ratio!r}")
    return int(round(n_real * mix_ratio / (1.0 - mix_ratio)))


def select_synthetic(pool: pd.DataFrame, allocation: pd.DataFrame, n: int) -> pd.DataFrame:
    """Pick ``n`` rows of ``pool`` following the allocation's per-combination counts.

    ``pool`` rows need the four task columns and keep their order within a combination (plan
    order); ``allocation`` has the four task columns and ``count``. Combinations missing from
    the allocation get weight 1 (lowest priority), so nothing valid is unusable.
    """
    if n <= 0 or pool.empty:
        return pool.iloc[0:0]
    weights = {tuple(r[t] for t in TASKS): max(float(r["count"]), 1e-9) for _, r in allocation.iterrows()}
    combos = [tuple(r) for r in pool[list(TASKS)].itertuples(index=False)]
    rank = pool.groupby(list(TASKS), sort=False).cumcount().to_numpy()
    alloc = np.array([weights.get(c, 1.0) for c in combos])
    key = (rank + 0.5) / alloc
    order = np.lexsort((np.arange(len(pool)), key))
    return pool.iloc[np.sort(order[:n])]


def merge_training_set(
    real: pd.DataFrame, synthetic_pool: pd.DataFrame, allocation: pd.DataFrame, mix_ratio: float,
) -> MergeResult:
    """Real rows plus synthetic rows at ``mix_ratio``; metrics record what was achieved per class."""
    requested = requested_synthetic(len(real), mix_ratio)
    chosen = select_synthetic(synthetic_pool, allocation, requested)
    columns = list(real.columns) + [c for c in chosen.columns if c not in real.columns]
    real = real.assign(source="real")
    chosen = chosen.assign(source="synthetic", split="train")
    train = pd.concat([real, chosen], ignore_index=True)[columns].fillna("")
    achieved = len(chosen) / max(1, len(train))
    per_class = {
        task: {
            c: {
                "real": int(((train["source"] == "real") & (train[task] == c)).sum()),
                "synthetic": int(((train["source"] == "synthetic") & (train[task] == c)).sum()),
            }
            for c in CLASSES[task]
        }
        for task in TASKS
    }
    for task in TASKS:
        for c, v in per_class[task].items():
            v["synthetic_share"] = round(v["synthetic"] / max(1, v["real"] + v["synthetic"]), 4)
    metrics = {
        "mix_ratio": mix_ratio,
        "real_rows": int(len(real)),
        "synthetic_requested": requested,
        "synthetic_selected": int(len(chosen)),
        "synthetic_pool": int(len(synthetic_pool)),
        "achieved_share": round(achieved, 4),
        "pool_too_small": bool(len(chosen) < requested),
        "per_class": per_class,
    }
    return MergeResult(train, requested, len(chosen), len(synthetic_pool), metrics)
