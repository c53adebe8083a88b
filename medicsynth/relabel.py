"""Relabelling noisy labels: flag suspect (image, task) pairs, ask voters, change by consensus.

Flagging:

- :func:`out_of_fold_probs` trains the project's classifier k times and predicts each image with
  the model that did not see it — the input confident learning needs.
- :func:`flag_confident_learning` runs cleanlab's ``find_label_issues`` per task (confident
  learning, Northcutt et al. 2021) and returns a boolean ``(n, tasks)`` matrix and a ranking score.
- :func:`flag_disagreement` is the study's rule: count the tasks (× models) where a model's
  prediction differs from the label; an image with at least ``min_disagreements`` is flagged on
  every task.

Voting: each voter returns, per image and task, a label or ``None`` (abstained / failed).
:func:`consensus` changes a flagged label only when voters agree on a *different* label:
``unanimous`` needs every voter to name it (the study's rule); ``majority`` needs more than half
of all voters. Anything else keeps the original label.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from medicsynth.io import atomic_path
from medicsynth.labels import CLASSES, TASKS
from medicsynth.training import TrainConfig, predict_files, train_classifier


def _fold_key(files: np.ndarray, labels: np.ndarray, hold_idx: np.ndarray, config: TrainConfig) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(asdict(config), sort_keys=True).encode())
    digest.update("\0".join(files.tolist()).encode())
    for f in files.tolist():  # the images' bytes too: a re-rendered image under the same path must miss
        digest.update(hashlib.sha256(Path(f).read_bytes()).digest())
    digest.update(labels.tobytes())
    digest.update(hold_idx.tobytes())
    return digest.hexdigest()[:32]


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, **arrays)


def out_of_fold_probs(
    files: Sequence[str], labels: np.ndarray, config: TrainConfig, *, k: int = 3, epochs: int | None = None,
    seed: int = 0, progress: bool = True, cache_dir: str | Path | None = None,
) -> dict[str, np.ndarray]:
    """Out-of-fold class probabilities per task from ``k``-fold training.

    Folds are stratified on ``disaster_types`` (the task with the rarest classes). Each fold's
    model trains for ``epochs`` (default ``config.epochs``) on the other folds without early
    stopping, because the held-out fold must stay unseen.

    With ``cache_dir``, each fold's held-out probabilities are saved atomically under a key of
    (files and their bytes, labels, held-out indices, training config), so a stage killed later
    (e.g. while voting) does not retrain finished folds when it is rerun, and re-rendered images
    under the same paths (a changed demo renderer) never reuse stale probabilities.
    """
    files = np.asarray(files)
    n = len(files)
    probs = {t: np.zeros((n, len(CLASSES[t])), dtype=np.float32) for t in TASKS}
    strat = labels[:, TASKS.index("disaster_types")]
    # StratifiedKFold needs each stratum to have >= k members; merge tiny classes into one group.
    counts = np.bincount(strat)
    strat = np.where(counts[strat] >= k, strat, -1)
    if 0 < (strat == -1).sum() < k:  # the merged group itself too small: join the largest class
        strat = np.where(strat == -1, np.bincount(strat[strat >= 0]).argmax(), strat)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    fold_config = replace(config, epochs=epochs or config.epochs, seed=seed)
    for fold, (fit_idx, hold_idx) in enumerate(splitter.split(files, strat)):
        this_config = replace(fold_config, seed=seed + fold)
        cached = Path(cache_dir) / f"oof-{_fold_key(files, labels, hold_idx, this_config)}.npz" if cache_dir else None
        if cached is not None and cached.exists():
            with np.load(cached) as saved:
                fold_probs = {t: saved[t] for t in TASKS}
        else:
            result = train_classifier(files[fit_idx].tolist(), labels[fit_idx], None, None, this_config,
                                      progress=progress)
            meta = {"resize": config.resize, "crop": config.crop}
            fold_probs = predict_files(result.model, meta, files[hold_idx].tolist(), device=config.device,
                                       loader=config.loader, num_workers=config.num_workers,
                                       cpu_threads=config.cpu_threads)
            if cached is not None:
                _save_npz(cached, fold_probs)
        for t in TASKS:
            probs[t][hold_idx] = fold_probs[t]
    return probs


def flag_confident_learning(
    labels: np.ndarray, probs: dict[str, np.ndarray], *, filter_by: str = "prune_by_noise_rate",
) -> tuple[np.ndarray, np.ndarray]:
    """Confident-learning label issues per task.

    Returns ``(flags, scores)``: ``flags[i, j]`` is True when image ``i``'s label for task ``j``
    is a likely issue; ``scores[i, j]`` is cleanlab's self-confidence (the predicted probability
    of the given label; lower = more suspicious), usable to rank the flags.
    """
    from cleanlab.filter import find_label_issues

    n = len(labels)
    flags = np.zeros((n, len(TASKS)), dtype=bool)
    scores = np.ones((n, len(TASKS)), dtype=np.float32)
    for j, task in enumerate(TASKS):
        p = probs[task]
        flags[:, j] = find_label_issues(labels[:, j], p, filter_by=filter_by)
        scores[:, j] = p[np.arange(n), labels[:, j]]
    return flags, scores


def flag_disagreement(
    labels: np.ndarray, predictions: Sequence[dict[str, np.ndarray]], min_disagreements: int = 2,
) -> np.ndarray:
    """The study's rule: flag every task of an image with ≥ ``min_disagreements`` model×task disagreements.

    ``predictions`` holds one ``{task: (n,) predicted index}`` dict per model.
    """
    count = np.zeros(len(labels), dtype=int)
    for pred in predictions:
        for j, task in enumerate(TASKS):
            count += pred[task] != labels[:, j]
    flagged = count >= min_disagreements
    return np.repeat(flagged[:, None], len(TASKS), axis=1)


def model_votes(probs: dict[str, np.ndarray], threshold: float) -> np.ndarray:
    """The ``model`` voter: the argmax class when its probability ≥ ``threshold``, else -1 (abstain)."""
    votes = np.full((len(next(iter(probs.values()))), len(TASKS)), -1, dtype=np.int64)
    for j, task in enumerate(TASKS):
        p = probs[task]
        top = p.argmax(1)
        confident = p[np.arange(len(p)), top] >= threshold
        votes[confident, j] = top[confident]
    return votes


def consensus(labels: np.ndarray, flags: np.ndarray, votes: Sequence[np.ndarray], rule: str = "unanimous") -> np.ndarray:
    """New label matrix: flagged labels replaced where the voters agree on a different class.

    ``votes`` holds one ``(n, tasks)`` int matrix per voter, -1 meaning abstained or failed.
    ``unanimous``: all voters name the same class. ``majority``: more than half of *all* voters
    name it (abstentions count against a change). Unflagged labels never change.
    """
    if rule not in ("unanimous", "majority"):
        raise ValueError(f"relabel.consensus must be unanimous or majority, not {rule!r}")
    new = labels.copy()
    if not votes:
        return new
    stack = np.stack(votes)  # (voters, n, tasks)
    n_voters = stack.shape[0]
    for i, j in zip(*np.nonzero(flags)):
        v = stack[:, i, j]
        v = v[v >= 0]
        if not len(v):
            continue
        values, counts = np.unique(v, return_counts=True)
        best = values[counts.argmax()]
        agree = counts.max()
        ok = agree == n_voters if rule == "unanimous" else agree * 2 > n_voters
        if ok and best != labels[i, j]:
            new[i, j] = best
    return new


def score_corrections(old: pd.DataFrame, new: pd.DataFrame, clean: pd.DataFrame) -> dict:
    """Precision and recall of changed labels against known clean labels (demo only).

    Per task: precision = share of changed labels that now equal the clean label; recall = share
    of noisy labels (old ≠ clean) that were changed to the clean label. Rows match on image_path.
    """
    clean = clean.set_index("image_path").loc[old["image_path"]]
    out: dict = {}
    for task in TASKS:
        o, n_, c = old[task].to_numpy(), new[task].to_numpy(), clean[task].to_numpy()
        changed = o != n_
        noisy = o != c
        fixed = changed & (n_ == c)
        out[task] = {
            "changed": int(changed.sum()),
            "noisy": int(noisy.sum()),
            "fixed": int(fixed.sum()),
            "precision": float(fixed.sum() / changed.sum()) if changed.any() else None,
            "recall": float(fixed.sum() / noisy.sum()) if noisy.any() else None,
        }
    precisions = [v["precision"] for v in out.values() if v["precision"] is not None]
    recalls = [v["recall"] for v in out.values() if v["recall"] is not None]
    out["mean_precision"] = float(np.mean(precisions)) if precisions else None
    out["mean_recall"] = float(np.mean(recalls)) if recalls else None
    return out
