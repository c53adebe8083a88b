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


def oversample_like(real: pd.DataFrame, augmented: pd.DataFrame, seed: int) -> MergeResult:
    """The oversampling baseline: ``real`` plus repeated real rows in place of synthetic ones.

    For every synthetic row of ``augmented`` (rows whose ``source`` is ``synthetic``) one real
    row with the same four labels is repeated, so the result has the augmented set's row count
    and per-task class composition with real images only: it asks whether a synthetic image
    beats repeating a real one. Within a label combination the repeats are a seeded permutation
    of its real rows, cycled (each real row repeated at most once more than any other). A
    combination without a real row (possible only with ``allocate.include_unseen``) takes the
    real rows that match the most tasks instead; ``metrics["inexact"]`` counts those.

    Args:
        real: the real training rows (the relabelled manifest); every row is kept.
        augmented: the augmented training manifest with its ``source`` column.
        seed: seed of ``numpy.random.default_rng`` for the choice of repeated rows.

    Returns:
        A :class:`MergeResult`: ``train`` is ``real`` then the repeats, whose ``image_path`` gets
        the suffix ``#oversample-<k>`` (manifest keys stay unique; ``file`` is the real image)
        and whose ``provenance`` gets ``+oversample``; ``metrics`` records the counts and the
        per-class composition, which equals the augmented set's when ``inexact`` is 0.
    """
    if "source" not in augmented.columns:
        raise ValueError("augmented manifest has no `source` column (expected real|synthetic per row)")
    if real.empty:
        raise ValueError("no real rows to oversample")
    wanted = augmented[augmented["source"] == "synthetic"]
    rng = np.random.default_rng(seed)
    labels = real[list(TASKS)].to_numpy()
    groups = real.groupby(list(TASKS), sort=True).indices  # combination -> positions in real
    members_of: dict[tuple, np.ndarray] = {}  # combination -> real rows that stand in for it
    queues: dict[tuple, list[int]] = {}
    picks, inexact = [], 0
    for combo in wanted[list(TASKS)].itertuples(index=False, name=None):
        if combo not in members_of:
            members = groups.get(combo)
            if members is None:
                matches = (labels == np.array(combo, dtype=object)).sum(axis=1)
                members = np.flatnonzero(matches == matches.max())
            members_of[combo] = np.asarray(members)
            queues[combo] = []
        inexact += combo not in groups
        if not queues[combo]:  # a fresh seeded permutation each time the rows are used up
            queues[combo] = rng.permutation(members_of[combo]).tolist()
        picks.append(int(queues[combo].pop(0)))
    repeats = real.iloc[picks].copy()
    repeats["image_path"] = [f"{p}#oversample-{k}" for k, p in enumerate(repeats["image_path"])]
    repeats["provenance"] = repeats["provenance"] + "+oversample"
    real_rows = real.assign(source="real")
    train = pd.concat([real_rows, repeats.assign(source="real")], ignore_index=True)
    per_class = {
        task: {c: {"rows": int((train[task] == c).sum()),
                   "augmented_rows": int((augmented[task] == c).sum())} for c in CLASSES[task]}
        for task in TASKS
    }
    metrics = {
        "real_rows": int(len(real)),
        "repeated_rows": int(len(repeats)),
        "rows": int(len(train)),
        "augmented_rows": int(len(augmented)),
        "inexact": int(inexact),
        "seed": int(seed),
        "per_class": per_class,
    }
    return MergeResult(train, len(wanted), len(repeats), len(real), metrics)
