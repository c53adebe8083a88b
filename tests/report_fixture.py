"""A small project directory with every input of the report stage, for the report tests.

Predictions are random but seeded, ``metrics/compare.json`` is written by the real
:func:`medicsynth.compare.run_compare`, images are real JPEG files (tiny, made with PIL), and
the other stage outputs follow the shapes the stages write (same keys, fewer rows).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medicsynth.compare import run_compare
from medicsynth.labels import CLASSES, TASKS
from medicsynth.manifest import COLUMNS

SEEDS = (0, 1)
VARIANTS = ("original", "relabelled", "augmented")


def _image(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path, quality=90)


def _labels(rng: np.random.Generator, n: int, skew: float = 0.0) -> dict[str, list[str]]:
    out = {}
    for t in TASKS:
        k = len(CLASSES[t])
        p = np.ones(k)
        p[0] += skew * k  # the first class dominates: later classes become minorities
        out[t] = [CLASSES[t][i] for i in rng.choice(k, size=n, p=p / p.sum())]
    return out


def build_project(root: Path, seed: int = 0) -> Path:
    """Write the report's inputs under ``root`` and return ``root``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "metrics").mkdir(parents=True, exist_ok=True)

    # Real training manifest (minority classes) and images.
    n_train = 60
    labels = _labels(rng, n_train, skew=1.5)
    rows = []
    for i in range(n_train):
        rel = f"data/prepared/images/train/train_{i:05d}.jpg"
        _image(root / rel, rng)
        rows.append({"image_id": "demo", "event_name": f"demo_train_{i:05d}", "image_path": rel,
                     **{t: labels[t][i] for t in TASKS}, "split": "train", "source": "real", "provenance": "demo", "file": rel})
    train = pd.DataFrame(rows, columns=list(COLUMNS))
    (root / "data/variants/original").mkdir(parents=True, exist_ok=True)
    train.to_csv(root / "data/variants/original/train.tsv", sep="\t", index=False)
    clean = train[["image_path", *TASKS]].copy()
    clean.insert(1, "split", "train")
    clean.to_csv(root / "data/prepared/clean_labels.tsv", sep="\t", index=False)

    # Predictions per variant (the evaluate stage's columns) and compare.json from the real code.
    n_test = 80
    truth = _labels(rng, n_test)
    for v, acc in zip(VARIANTS, (0.6, 0.7, 0.75)):
        for seed_ in SEEDS:  # one model per training seed, as the train/evaluate matrix writes
            pred = {}
            for t in TASKS:
                k = len(CLASSES[t])
                right = rng.random(n_test) < acc
                pred[t] = [y if r else CLASSES[t][rng.integers(k)] for y, r in zip(truth[t], right)]
            df = pd.DataFrame({"image_path": [f"data/prepared/images/test/test_{i:05d}.jpg" for i in range(n_test)],
                               **{f"{t}_true": truth[t] for t in TASKS}, **{f"{t}_pred": pred[t] for t in TASKS}})
            (root / f"data/predictions/{v}-small_cnn-s{seed_}").mkdir(parents=True, exist_ok=True)
            df.to_csv(root / f"data/predictions/{v}-small_cnn-s{seed_}/test.tsv", sep="\t", index=False)
    run_compare(predictions_dir=root / "data/predictions", variants=list(VARIANTS), arch="small_cnn", seeds=SEEDS,
                train_manifest=root / "data/variants/original/train.tsv", out_json=root / "metrics/compare.json",
                out_md=root / "metrics/compare.md", macro_plot=root / "plots/m.png", per_class_plot=root / "plots/c.png",
                diff_plot=root / "plots/d.png", n_boot=50, minority_share=0.2)

    # DVCLive training logs.
    for v in VARIANTS:
        base = root / f"metrics/train/{v}-small_cnn-s0/plots/metrics"
        (base / "dev_macro_f1").mkdir(parents=True, exist_ok=True)
        steps = np.arange(5)
        pd.DataFrame({"step": steps, "dev_mean_macro_f1": 0.5 + 0.05 * steps}).to_csv(base / "dev_mean_macro_f1.tsv", sep="\t", index=False)
        pd.DataFrame({"step": steps, "train_loss": 3.0 - 0.3 * steps}).to_csv(base / "train_loss.tsv", sep="\t", index=False)
        for t in TASKS:
            pd.DataFrame({"step": steps, t: 0.4 + 0.06 * steps}).to_csv(base / "dev_macro_f1" / f"{t}.tsv", sep="\t", index=False)

    # Relabelling: changes.tsv (one row per voted label) and relabel.json.
    changes = []
    for i in range(12):
        t = TASKS[i % 4]
        old, new = CLASSES[t][0], CLASSES[t][1]
        changes.append({"image_path": f"data/prepared/images/train/train_{i:05d}.jpg", "split": "train", "task": t,
                        "old": old, "new": new if i % 3 else old, "changed": str(bool(i % 3)),
                        "self_confidence": "0.1", "vote_model": new if i % 3 else "abstain"})
    (root / "data/relabel").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(changes).to_csv(root / "data/relabel/changes.tsv", sep="\t", index=False)
    relabel = {"flag": "confident_learning", "voters": ["model"], "consensus": "unanimous", "images": n_train,
               "flagged_images": 12, "flagged_labels": {t: 3 for t in TASKS}, "changed_labels": {t: 2 for t in TASKS},
               "changed_images": 8, "changes_per_class": {t: {c: (2 if j == 0 else 0) for j, c in enumerate(CLASSES[t])} for t in TASKS},
               "usage": {},
               "against_clean_labels": {**{t: {"changed": 2, "noisy": 3, "fixed": 1, "precision": 0.5, "recall": 0.33} for t in TASKS},
                                        "mean_precision": 0.5, "mean_recall": 0.33}}
    (root / "metrics/relabel.json").write_text(json.dumps(relabel))

    # Allocation.
    combos = []
    for i in range(6):
        combo = {t: CLASSES[t][(i + j) % len(CLASSES[t])] for j, t in enumerate(TASKS)}
        combos.append({"slug": f"c{i}", **combo, "real_count": i, "weight": 10 + i, "reason": f"base 10; +{i}", "count": 2 + i})
    (root / "data/allocation").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(combos).to_csv(root / "data/allocation/allocation.tsv", sep="\t", index=False)
    allocate = {"mode": "weakness", "rounding": "webster", "total": 27, "real_train": n_train, "combinations_seen": 6,
                "combinations_planned": 6,
                "per_class": {t: {c: {"real": 10, "planned": 3, "share_before": 0.2, "share_after": 0.18} for c in CLASSES[t]} for t in TASKS}}
    (root / "metrics/allocate.json").write_text(json.dumps(allocate))

    # Captions, synthetic images and the filter's decisions.
    caps, decisions = [], []
    for i in range(20):
        lab = {t: CLASSES[t][i % len(CLASSES[t])] for t in TASKS}
        pid = f"syn{i:03d}"
        mode = "grounded" if i % 2 else "hypothetical"
        caps.append({"id": pid, "seed": i, **lab, "mode": mode, "caption": f"A scene number {i} <b>not bold</b>"})
        rel = f"data/synthetic/images/{pid}.jpg"
        _image(root / rel, rng)
        kept = i % 3 != 0
        decisions.append({"image_id": "synthetic", "event_name": "synthetic", "image_path": rel, **lab, "split": "train",
                          "source": "synthetic", "provenance": "generate:demo", "file": rel, "plan_id": pid,
                          "caption": caps[-1]["caption"], "reason": "kept" if kept else "label_mismatch",
                          **{f"p_intended_{t}": 0.6 if kept else 0.2 for t in TASKS},
                          **{f"agree_{t}": str(kept) for t in TASKS}})
    (root / "data/captions").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(caps).to_csv(root / "data/captions/captions.tsv", sep="\t", index=False)
    (root / "data/filtered").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(decisions).to_csv(root / "data/filtered/decisions.tsv", sep="\t", index=False)
    filt = {"method": "classifier", "tasks_checked": ["informative", "disaster_types"], "total": 20, "kept": 13, "kept_share": 0.65,
            "rejected": {"decode_error": 0, "blank": 0, "label_mismatch": 7},
            "per_class": {t: {c: {"total": 3, "kept": 2, "kept_share": 0.67} for c in CLASSES[t]} for t in TASKS},
            "classifier": {"agreement": {t: 0.65 for t in TASKS},
                           "agreement_per_class": {t: {c: 0.5 for c in CLASSES[t]} for t in TASKS}}}
    (root / "metrics/filter.json").write_text(json.dumps(filt))
    (root / "metrics/merge.json").write_text(json.dumps({"mix_ratio": 0.1, "achieved_share": 0.10009}))
    (root / "metrics/caption.json").write_text(json.dumps({
        "backend": "openai", "llm_usage": {"grounded": {"requests": 10, "api_calls": 8, "cache_hits": 2, "input_tokens": 1_000_000,
                                                        "output_tokens": 100_000, "failed": 0}}}))
    (root / "metrics/prepare.json").write_text(json.dumps({"source": "demo", "counts": {"train": {"rows": n_train}, "test": {"rows": n_test}}}))
    return root
