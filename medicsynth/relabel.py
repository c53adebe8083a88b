"""Relabelling noisy labels: flag suspect (image, task) pairs, ask voters, change by consensus.

Flagging:

- :func:`out_of_fold_probs` trains the project's classifier k times and predicts each image with
  the model that did not see it — the input confident learning needs.
- :func:`flag_confident_learning` runs cleanlab's ``find_label_issues`` per task (confident
  learning, Northcutt et al. 2021) and returns a boolean ``(n, tasks)`` matrix and a ranking score.
- :func:`flag_disagreement` is the study's rule: count the tasks (× models) where a model's
  prediction differs from the label; an image with at least ``min_disagreements`` is flagged on
  every task.
- :func:`flag_ensemble` is the study's rule over several architectures: one prediction per
  architecture (out-of-fold, or in-sample as the study's CNNs over all splits), disagreements
  counted over architectures × tasks.

The whole procedure (:func:`run_relabel`) is a sequence of named steps: fold-model config from
``relabel.model`` (:func:`fold_model_config`; never the ``train`` section, so changing the
classifier's training does not rerun relabelling and everything after it), out-of-fold
probabilities, flags (:func:`flag_labels`), the budget (:func:`apply_budget`), votes
(:func:`collect_votes`), consensus, the change table (:func:`change_table`) and the metrics
(:func:`relabel_metrics`).

Voting: each voter returns, per image and task, a label or ``None`` (abstained / failed).
:func:`consensus` changes a flagged label only when voters agree on a *different* label:
``unanimous`` needs every voter to name it (the study's rule); ``majority`` needs more than half
of all voters. Anything else keeps the original label.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from medicsynth.io import atomic_path
from medicsynth.labels import CLASSES, TASKS
from medicsynth.params import require
from medicsynth.manifest import label_matrix
from medicsynth.numerics import current_mode as numerics_mode
from medicsynth.shards import read_image_bytes
from medicsynth.training import TrainConfig, predict_files, train_classifier


def _fold_key(files: np.ndarray, labels: np.ndarray, hold_idx: np.ndarray, config: TrainConfig) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(asdict(config), sort_keys=True).encode())
    # the numerics mode changes the fold models' bits: a cache from the other mode must miss
    digest.update(numerics_mode().encode())
    digest.update("\0".join(files.tolist()).encode())
    for f in files.tolist():  # the images' bytes too: a re-rendered image under the same path must miss
        digest.update(hashlib.sha256(read_image_bytes(f)).digest())
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


def in_sample_probs(
    files: Sequence[str], labels: np.ndarray, config: TrainConfig, *, progress: bool = True,
    cache_dir: str | Path | None = None,
) -> dict[str, np.ndarray]:
    """In-sample class probabilities per task: one model trained on every image, predicting them all.

    The study's flag rule ran its CNNs over images they were trained on; a model that memorised a
    wrong label agrees with it, so in-sample predictions flag fewer images than out-of-fold ones.
    Cached like :func:`out_of_fold_probs` (key: files and bytes, labels, config).
    """
    files = np.asarray(files)
    everything = np.arange(len(files))
    cached = Path(cache_dir) / f"insample-{_fold_key(files, labels, everything, config)}.npz" if cache_dir else None
    if cached is not None and cached.exists():
        with np.load(cached) as saved:
            return {t: saved[t] for t in TASKS}
    result = train_classifier(files.tolist(), labels, None, None, config, progress=progress)
    probs = predict_files(result.model, {"resize": config.resize, "crop": config.crop}, files.tolist(),
                          device=config.device, loader=config.loader, num_workers=config.num_workers,
                          cpu_threads=config.cpu_threads)
    if cached is not None:
        _save_npz(cached, probs)
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


def disagreement_counts(labels: np.ndarray, predictions: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
    """``(n,)`` number of (model, task) pairs whose prediction differs from the label.

    ``labels`` is the ``(n, tasks)`` index matrix; ``predictions`` one ``{task: (n,) index}`` per model.
    """
    count = np.zeros(len(labels), dtype=int)
    for pred in predictions:
        for j, task in enumerate(TASKS):
            count += pred[task] != labels[:, j]
    return count


def flag_ensemble(
    labels: np.ndarray, probs_by_arch: dict[str, dict[str, np.ndarray]], min_disagreements: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The study's ensemble rule: flag an image when archs × tasks disagreements ≥ ``min_disagreements``.

    Args:
        labels: ``(n, tasks)`` class indices (:data:`TASKS` order).
        probs_by_arch: per architecture, ``{task: (n, C) probabilities}`` (one model's predictions;
            its argmax is the model's prediction).
        min_disagreements: threshold on the count (the study: 2 over 3 CNNs × 4 tasks).

    Returns ``(flags, scores, counts)``: ``flags`` ``(n, tasks)`` bool, every task of a flagged
    image True (the voters are asked all four labels, as in the study); ``scores`` ``(n, tasks)``
    the probability of the given label averaged over architectures (lower = more suspicious, the
    budget's ranking); ``counts`` ``(n,)`` the disagreements. Raises ``ValueError`` for no archs.
    """
    if not probs_by_arch:
        raise ValueError("relabel.ensemble_archs: at least one architecture is needed")
    n = len(labels)
    preds = [{t: p[t].argmax(1) for t in TASKS} for p in probs_by_arch.values()]
    counts = disagreement_counts(labels, preds)
    flags = np.repeat((counts >= min_disagreements)[:, None], len(TASKS), axis=1)
    mean = mean_probs(probs_by_arch)
    scores = np.stack([mean[t][np.arange(n), labels[:, j]] for j, t in enumerate(TASKS)], axis=1)
    return flags, scores, counts


def mean_probs(probs_by_arch: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per task the ``(n, C)`` probabilities averaged over architectures (float32, arch order fixed)."""
    arch_probs = list(probs_by_arch.values())
    return {t: (np.sum([p[t].astype(np.float64) for p in arch_probs], axis=0) / len(arch_probs)).astype(np.float32)
            for t in TASKS}


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
    ``recall_per_class[task][class]``: the same recall over the noisy labels whose clean label is
    ``class`` (``noisy``, ``fixed``, ``recall``; recall ``None`` when none is noisy), so a
    correction that never reaches a minority class (e.g. nothing changed *into* mild) shows.
    """
    clean = clean.set_index("image_path").loc[old["image_path"]]
    out: dict = {}
    per_class: dict = {}
    for task in TASKS:
        o, n_, c = old[task].to_numpy(), new[task].to_numpy(), clean[task].to_numpy()
        changed = o != n_
        noisy = o != c
        fixed = changed & (n_ == c)
        per_class[task] = {}
        for cls in CLASSES[task]:
            noisy_c, fixed_c = int((noisy & (c == cls)).sum()), int((fixed & (c == cls)).sum())
            per_class[task][cls] = {"noisy": noisy_c, "fixed": fixed_c,
                                    "recall": fixed_c / noisy_c if noisy_c else None}
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
    out["recall_per_class"] = per_class
    return out


# --------------------------------------------------------------------------------------------
# The relabel procedure (what stages/relabel.py runs), step by step
# --------------------------------------------------------------------------------------------

VOTERS: tuple[str, ...] = ("model", "openai", "anthropic")


def fold_model_config(model_params: dict[str, Any] | None) -> TrainConfig:
    """Step 1: the fold models' :class:`TrainConfig` from ``relabel.model`` (params.yaml).

    Every :class:`TrainConfig` field is a key of ``relabel.model`` (``arch``, ``epochs``, ``lr``,
    ``optimizer``, ``schedule``, ``seed``...; a missing one is a ``KeyError`` naming it), except
    the early-stopping fields: fold models train without a dev set (the held-out fold must stay
    unseen), so ``early_stop_metric`` and ``patience`` are ``None`` (every epoch, the last kept;
    a ``plateau`` schedule watches the training loss). ``seed`` seeds the fold split, and fold
    ``f``'s model trains with ``seed + f``. Raises ``ValueError`` naming the key for a missing
    section or an unknown key.
    """
    if not isinstance(model_params, dict):
        raise ValueError("params.yaml: relabel.model must be a mapping of the fold models' training settings "
                         "(arch, epochs, batch_size, lr, seed, ...)")
    return TrainConfig.from_params(model_params, "relabel.model", early_stop_metric=None, patience=None)


def flag_labels(labels: np.ndarray, probs: dict[str, np.ndarray], method: str,
                min_disagreements: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Step 3: ``(flags, scores)``, both ``(n, tasks)``: suspect labels and their suspicion rank.

    ``method`` is ``confident_learning`` (:func:`flag_confident_learning`) or ``disagreement``
    (:func:`flag_disagreement` with the out-of-fold model's argmax). ``scores`` is the predicted
    probability of the given label (lower = more suspicious).
    """
    if method == "confident_learning":
        return flag_confident_learning(labels, probs)
    if method == "disagreement":
        n = len(labels)
        preds = {t: probs[t].argmax(1) for t in TASKS}
        flags = flag_disagreement(labels, [preds], min_disagreements)
        scores = np.stack([probs[t][np.arange(n), labels[:, j]] for j, t in enumerate(TASKS)], axis=1)
        return flags, scores
    if method == "ensemble":
        raise ValueError("relabel.flag ensemble needs one prediction per architecture: use ensemble_probs and "
                         "flag_ensemble (run_relabel does)")
    raise ValueError(f"relabel.flag must be confident_learning, disagreement or ensemble, not {method!r}")


ENSEMBLE_PREDICTIONS: tuple[str, ...] = ("out_of_fold", "in_sample")


def ensemble_probs(files: Sequence[str], labels: np.ndarray, config: TrainConfig, archs: Sequence[str], *,
                   predictions: str, k: int, cache_dir: str | Path | None,
                   progress: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """Step 2 of ``flag: ensemble``: per architecture in ``archs`` (in that order), ``{task: (n, C)}``.

    Each architecture's models use the fold-model ``config`` with only ``arch`` replaced.
    ``predictions``: ``out_of_fold`` (:func:`out_of_fold_probs` with ``k`` folds; the architecture
    equal to ``config.arch`` reuses the single-model run's cached folds) or ``in_sample``
    (:func:`in_sample_probs`). Raises ``ValueError`` naming the bad key.
    """
    from medicsynth.models import ARCHS

    if predictions not in ENSEMBLE_PREDICTIONS:
        raise ValueError(f"relabel.ensemble_predictions must be one of {', '.join(ENSEMBLE_PREDICTIONS)}, "
                         f"not {predictions!r}")
    archs = list(archs or [])
    if not archs:
        raise ValueError("relabel.ensemble_archs must list at least one architecture for flag: ensemble")
    bad = [a for a in archs if a not in ARCHS]
    if bad or len(set(archs)) != len(archs):
        raise ValueError(f"relabel.ensemble_archs: {archs!r} must be distinct architectures of "
                         f"medicsynth.models.ARCHS ({', '.join(ARCHS)})")
    out: dict[str, dict[str, np.ndarray]] = {}
    for arch in archs:
        arch_config = replace(config, arch=arch)
        if predictions == "out_of_fold":
            out[arch] = out_of_fold_probs(files, labels, arch_config, k=k, seed=config.seed, cache_dir=cache_dir,
                                          progress=progress)
        else:
            out[arch] = in_sample_probs(files, labels, arch_config, cache_dir=cache_dir, progress=progress)
    return out


def apply_budget(flags: np.ndarray, scores: np.ndarray, max_flagged: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Step 4: keep at most ``max_flagged`` flagged images, the most suspicious first.

    Images are ranked by the lowest score among their flagged tasks (stable for ties). Returns
    ``(flags, order)``: a copy of ``flags`` without the images beyond the budget, and the row
    indices of the kept flagged images in ranking order (the order voters are asked in).
    """
    flags = flags.copy()
    flagged_rows = np.nonzero(flags.any(1))[0]
    order = flagged_rows[np.argsort(np.where(flags, scores, 1.0)[flagged_rows].min(1), kind="stable")]
    if max_flagged is not None and len(order) > max_flagged:
        flags[order[max_flagged:]] = False
        order = order[:max_flagged]
    return flags, order


FULL_SIZE = 2**31 - 1  # image_max_side meaning "never downscale" (no image is this large)


def voter_llm_params(provider: str, cfg: dict) -> dict[str, Any]:
    """The ``medicsynth.llm`` params of one VLM voter from ``relabel.<provider>``.

    ``image_max_side: null`` sends full-size images (the study's setting): JPEG, PNG and WebP files
    go unchanged and other formats are re-encoded at their own size. Any other value downscales
    larger images to that longer side (cheaper).
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"params.yaml: relabel.{provider} must be a mapping of medicsynth.llm settings")
    out = {"provider": provider, **cfg}
    if "image_max_side" in out and out["image_max_side"] is None:
        out["image_max_side"] = FULL_SIZE
    return out


def voter_settings(provider: str, cfg: dict, llm: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a VLM voter's requests carry, for the metrics: model id, the temperature actually sent
    (``None`` where the provider's SDK/API takes none: anthropic 2.x, API version 2026-10-21), the
    temperature asked for, and the image size (``full`` or the longest side in px)."""
    from medicsynth.llm.client import config_from_params
    from medicsynth.llm.providers import make_provider

    from medicsynth.llm.client import repository_llm_params

    defaults = (llm if llm is not None and "client" in llm else repository_llm_params()).get("client")
    config = config_from_params({k: v for k, v in voter_llm_params(provider, cfg).items() if k != "cache_dir"},
                                defaults)
    sent = make_provider(config, sdk_client=object()).temperature_sent  # no SDK client is built
    return {"model": config.model, "temperature_requested": cfg.get("temperature"), "temperature_sent": sent,
            "image_max_side": "full" if config.image_max_side == FULL_SIZE else config.image_max_side}


def vlm_votes(provider: str, cfg: dict, cache_dir: str, files: Sequence[str], rows: np.ndarray, n: int,
              llm: dict[str, Any] | None = None):
    """Ask one VLM provider for the four labels of images ``rows``.

    Returns ``(votes, answers, usage)``: an ``(n, tasks)`` int matrix with -1 where the provider
    was not asked or failed, ``{row: "ok" | "failed:<reason>"}`` and the client's usage dict
    (with the cost estimate beside the actual usage). ``llm`` is the params ``llm`` section (client
    defaults, prices); the cost cap is ``relabel.<provider>.budget_usd``, checked before any call.
    """
    from medicsynth.llm import classify_request, client_from_params

    client = client_from_params(voter_llm_params(provider, cfg), cache_dir, llm=llm, where=f"relabel.{provider}")
    requests = [classify_request(files[i], TASKS) for i in rows]
    results = client.raise_if_failing(client.run(requests, desc=f"relabel votes ({provider})"), f"relabel votes ({provider})")
    votes = np.full((n, len(TASKS)), -1, dtype=np.int64)
    answers: dict[int, str] = {}
    for i, result in zip(rows, results):
        if result.ok:
            for j, t in enumerate(TASKS):
                votes[i, j] = CLASSES[t].index(result.value[t])
            answers[int(i)] = "ok"
        else:
            answers[int(i)] = f"failed:{result.failure}"
    return votes, answers, client.usage.as_dict()


def collect_votes(voters: Sequence[str], probs: dict[str, np.ndarray], order: np.ndarray, files: Sequence[str],
                  relabel_params: dict[str, Any], cache_dir: str, llm: dict[str, Any] | None = None):
    """Step 5: one ``(n, tasks)`` vote matrix per voter (-1 = abstained/failed), in ``voters`` order.

    ``model`` votes from the out-of-fold probabilities (``relabel.model_threshold``); ``openai``
    and ``anthropic`` are asked about the images in ``order`` only, with their
    ``relabel.<provider>`` settings. Returns ``(votes, answers, usage)`` (per VLM voter).
    """
    n = len(files)
    votes, answers, usage = [], {}, {}
    for voter in voters:
        if voter == "model":
            votes.append(model_votes(probs, require(relabel_params, "relabel", "model_threshold")))
        elif voter in ("openai", "anthropic"):
            v, answers[voter], usage[voter] = vlm_votes(voter, require(relabel_params, "relabel", voter), cache_dir,
                                                        files, order, n, llm)
            votes.append(v)
        else:
            raise ValueError(f"relabel.voters: unknown voter {voter!r} ({', '.join(VOTERS)})")
    return votes, answers, usage


def change_table(pool: pd.DataFrame, labels: np.ndarray, new: np.ndarray, flags: np.ndarray, scores: np.ndarray,
                 voters: Sequence[str], votes: Sequence[np.ndarray], answers: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Step 7: ``(relabelled, changes)``.

    ``relabelled`` is ``pool`` with the ``new`` labels, ``+relabel`` appended to the provenance
    of every changed image. ``changes`` has one row per flagged (image, task): old and new label,
    ``changed``, the self-confidence score and each voter's answer (a label, ``abstain`` or the
    failure).
    """
    relabelled = pool.copy()
    rows = []
    for j, task in enumerate(TASKS):
        relabelled[task] = [CLASSES[task][k] for k in new[:, j]]
        for i in np.nonzero(flags[:, j])[0]:
            row = {"image_path": pool["image_path"].iat[i], "split": pool["split"].iat[i], "task": task,
                   "old": CLASSES[task][labels[i, j]], "new": CLASSES[task][new[i, j]],
                   "changed": bool(new[i, j] != labels[i, j]), "self_confidence": round(float(scores[i, j]), 4)}
            for voter, v in zip(voters, votes):
                row[f"vote_{voter}"] = (CLASSES[task][v[i, j]] if v[i, j] >= 0
                                        else answers.get(voter, {}).get(int(i), "abstain"))
            rows.append(row)
    changed_any = (new != labels).any(1)
    relabelled.loc[changed_any, "provenance"] = relabelled.loc[changed_any, "provenance"] + "+relabel"
    changes = pd.DataFrame(rows, columns=["image_path", "split", "task", "old", "new", "changed", "self_confidence"]
                           + [f"vote_{v}" for v in voters])
    return relabelled, changes


def relabel_metrics(labels: np.ndarray, new: np.ndarray, flags: np.ndarray, flagged_before_budget: int,
                    settings: dict[str, Any], usage: dict) -> dict[str, Any]:
    """Step 8: flag, change and voter-usage counts (``metrics/relabel.json`` without the clean-label scores)."""
    changed = new != labels
    return {
        **settings,
        "images": int(len(labels)), "flagged_before_budget": int(flagged_before_budget),
        "flagged_images": int(flags.any(1).sum()),
        "flagged_labels": {t: int(flags[:, j].sum()) for j, t in enumerate(TASKS)},
        "changed_labels": {t: int(changed[:, j].sum()) for j, t in enumerate(TASKS)},
        "changed_images": int(changed.any(1).sum()),
        "changes_per_class": {t: {c: int((changed[:, j] & (new[:, j] == k)).sum()) for k, c in enumerate(CLASSES[t])}
                              for j, t in enumerate(TASKS)},
        "usage": usage,
    }


@dataclass
class RelabelResult:
    """What :func:`run_relabel` produces: the relabelled pool, the change table and the metrics."""

    relabelled: pd.DataFrame
    changes: pd.DataFrame
    metrics: dict[str, Any]


def run_relabel(pool: pd.DataFrame, relabel_params: dict[str, Any], *, llm_cache_dir: str = ".llm_cache",
                clean: pd.DataFrame | None = None, progress: bool = True,
                llm: dict[str, Any] | None = None) -> RelabelResult:
    """Relabel the manifest rows ``pool`` (train and dev together) as ``relabel_params`` says.

    Steps: fold-model config (1), ``k_folds`` out-of-fold probabilities (2, cached under
    ``cache_dir``), flags (3), budget (4), votes (5), consensus (6), change table (7), metrics
    (8, plus precision/recall against ``clean`` labels when given, as on the demo). Labels change
    only for flagged (image, task) pairs on which the voters reach ``consensus``.
    """
    p = relabel_params
    files = pool["file"].tolist()
    labels = label_matrix(pool)
    method = require(p, "relabel", "flag")
    config = fold_model_config(require(p, "relabel", "model"))  # 1
    ensemble_settings: dict[str, Any] = {}
    if method == "ensemble":  # 2, 3: one prediction per architecture, disagreements over archs × tasks
        predictions = require(p, "relabel", "ensemble_predictions")
        by_arch = ensemble_probs(files, labels, config, require(p, "relabel", "ensemble_archs"),
                                 predictions=predictions, k=require(p, "relabel", "k_folds"),
                                 cache_dir=require(p, "relabel", "cache_dir"), progress=progress)
        min_dis = require(p, "relabel", "min_disagreements")
        flags, scores, counts = flag_ensemble(labels, by_arch, min_dis)
        probs = mean_probs(by_arch)  # the model voter votes with the ensemble's mean probabilities
        ensemble_settings = {"ensemble_archs": list(by_arch), "ensemble_predictions": predictions,
                             "min_disagreements": int(min_dis),
                             "disagreements_histogram": {str(c): int((counts == c).sum())
                                                         for c in range(int(counts.max(initial=0)) + 1)}}
    else:
        probs = out_of_fold_probs(files, labels, config, k=require(p, "relabel", "k_folds"), seed=config.seed,  # 2
                                  cache_dir=require(p, "relabel", "cache_dir"), progress=progress)
        flags, scores = flag_labels(labels, probs, method, require(p, "relabel", "min_disagreements"))  # 3
    flagged_before_budget = int(flags.any(1).sum())
    flags, order = apply_budget(flags, scores, require(p, "relabel", "max_flagged"))  # 4
    voters = list(require(p, "relabel", "voters"))
    votes, answers, usage = collect_votes(voters, probs, order, files, p, llm_cache_dir, llm)  # 5
    new = consensus(labels, flags, votes, require(p, "relabel", "consensus"))  # 6
    relabelled, changes = change_table(pool, labels, new, flags, scores, voters, votes, answers)  # 7
    settings = {"flag": method, "voters": voters, "consensus": require(p, "relabel", "consensus"),
                **ensemble_settings}
    vlm = {v: voter_settings(v, require(p, "relabel", v), llm) for v in voters if v in ("openai", "anthropic")}
    if vlm:  # what the VLM voters' requests carried (absent with the model voter alone: metrics unchanged)
        settings["voter_settings"] = vlm
    metrics = relabel_metrics(labels, new, flags, flagged_before_budget, settings, usage)  # 8
    if clean is not None:
        metrics["against_clean_labels"] = score_corrections(pool, relabelled, clean)
    return RelabelResult(relabelled, changes, metrics)
