"""relabel: flag suspect labels, ask the configured voters, change labels only by consensus.

Outputs: data/variants/relabelled/{train,dev}.tsv (and test.tsv only when relabel.splits lists
test), data/relabel/changes.tsv (one row per changed or voted-on label with each voter's answer),
metrics/relabel.json (flags, changes per class, voter usage and failures, and — on the demo —
precision/recall of the changes against the clean labels), plots/relabel_changes.png.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from medicsynth.timing import write_metrics
from medicsynth.labels import CLASSES, TASKS
from medicsynth.manifest import label_matrix, read_manifest, write_manifest, write_tsv
from medicsynth.params import load_params, section
from medicsynth.relabel import (
    consensus, flag_confident_learning, flag_disagreement, model_votes, out_of_fold_probs, score_corrections,
)
from medicsynth.training import TrainConfig

SPLIT_FILES = {"train": "data/variants/original/train.tsv", "dev": "data/variants/original/dev.tsv",
               "test": "data/prepared/test.tsv"}
OUT = Path("data/variants/relabelled")


def vlm_votes(provider: str, cfg: dict, llm: dict, files: list[str], rows: np.ndarray, n: int):
    """Ask one VLM provider for the four labels of the flagged images; -1 where it failed."""
    from medicsynth.llm import client_from_params, classify_request

    client = client_from_params({"provider": provider, **cfg}, llm.get("cache_dir", ".llm_cache"))
    requests = [classify_request(files[i], TASKS) for i in rows]
    results = client.run(requests, desc=f"relabel votes ({provider})")
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


def plot_changes(changes: pd.DataFrame, path: Path) -> None:
    fig, axes = plt.subplots(1, len(TASKS), figsize=(4.2 * len(TASKS), 3.6))
    for ax, task in zip(axes, TASKS):
        sub = changes[(changes["task"] == task) & changes["changed"]]
        classes = list(CLASSES[task])
        to_ = [int((sub["new"] == c).sum()) for c in classes]
        from_ = [int((sub["old"] == c).sum()) for c in classes]
        x = np.arange(len(classes))
        ax.bar(x - 0.2, from_, 0.4, label="changed from")
        ax.bar(x + 0.2, to_, 0.4, label="changed to")
        ax.set_xticks(x, [c[:14] for c in classes], rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{task} ({len(sub)} changes)", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    params = load_params()
    p = section(params, "relabel")
    splits = list(p.get("splits", ["train", "dev"]))
    frames = {s: read_manifest(SPLIT_FILES[s]) for s in splits}
    pool = pd.concat(frames.values(), ignore_index=True)
    files = pool["file"].tolist()
    labels = label_matrix(pool)
    n = len(pool)

    train_params = {k: v for k, v in section(params, "train").items() if k != "archs"}
    config = TrainConfig(**(train_params | {"arch": p.get("arch", "small_cnn")}))
    probs = out_of_fold_probs(files, labels, config, k=p.get("k_folds", 3), epochs=p.get("cv_epochs"),
                              seed=p.get("seed", 0), cache_dir=p.get("cache_dir"))
    if p.get("flag", "confident_learning") == "confident_learning":
        flags, scores = flag_confident_learning(labels, probs)
    elif p["flag"] == "disagreement":
        preds = {t: probs[t].argmax(1) for t in TASKS}
        flags = flag_disagreement(labels, [preds], p.get("min_disagreements", 2))
        scores = np.stack([probs[t][np.arange(n), labels[:, j]] for j, t in enumerate(TASKS)], axis=1)
    else:
        raise ValueError(f"relabel.flag must be confident_learning or disagreement, not {p['flag']!r}")

    # Budget: rank flagged images by their most suspicious task; only the top max_flagged vote.
    flagged_rows = np.nonzero(flags.any(1))[0]
    flagged_before_budget = len(flagged_rows)
    order = flagged_rows[np.argsort(np.where(flags, scores, 1.0)[flagged_rows].min(1), kind="stable")]
    max_flagged = p.get("max_flagged")
    if max_flagged is not None and len(order) > max_flagged:
        dropped = order[max_flagged:]
        flags[dropped] = False
        order = order[:max_flagged]

    voters = list(p.get("voters", ["model"]))
    votes, answers, usage = [], {}, {}
    for voter in voters:
        if voter == "model":
            votes.append(model_votes(probs, p.get("model_threshold", 0.5)))
        elif voter in ("openai", "anthropic"):
            v, answers[voter], usage[voter] = vlm_votes(voter, p.get(voter, {}), params.get("llm", {}), files, order, n)
            votes.append(v)
        else:
            raise ValueError(f"relabel.voters: unknown voter {voter!r} (model, openai, anthropic)")
    new = consensus(labels, flags, votes, p.get("consensus", "unanimous"))

    relabelled = pool.copy()
    rows = []
    for j, task in enumerate(TASKS):
        relabelled[task] = [CLASSES[task][k] for k in new[:, j]]
        for i in np.nonzero(flags[:, j])[0]:
            row = {"image_path": pool["image_path"].iat[i], "split": pool["split"].iat[i], "task": task,
                   "old": CLASSES[task][labels[i, j]], "new": CLASSES[task][new[i, j]],
                   "changed": bool(new[i, j] != labels[i, j]), "self_confidence": round(float(scores[i, j]), 4)}
            for voter, v in zip(voters, votes):
                row[f"vote_{voter}"] = CLASSES[task][v[i, j]] if v[i, j] >= 0 else answers.get(voter, {}).get(int(i), "abstain")
            rows.append(row)
    changed_any = (new != labels).any(1)
    relabelled.loc[changed_any, "provenance"] = relabelled.loc[changed_any, "provenance"] + "+relabel"
    for split in splits:
        write_manifest(relabelled[relabelled["split"] == split], OUT / f"{split}.tsv")
    for split in ("train", "dev"):  # the variant always has train and dev
        if split not in splits:
            write_manifest(read_manifest(SPLIT_FILES[split]), OUT / f"{split}.tsv")
    changes = pd.DataFrame(rows, columns=["image_path", "split", "task", "old", "new", "changed", "self_confidence"]
                           + [f"vote_{v}" for v in voters])
    write_tsv(changes, "data/relabel/changes.tsv")
    plot_changes(changes, Path("plots/relabel_changes.png"))

    metrics = {
        "flag": p.get("flag", "confident_learning"), "voters": voters, "consensus": p.get("consensus", "unanimous"),
        "images": n, "flagged_before_budget": int(flagged_before_budget), "flagged_images": int(flags.any(1).sum()),
        "flagged_labels": {t: int(flags[:, j].sum()) for j, t in enumerate(TASKS)},
        "changed_labels": {t: int((new[:, j] != labels[:, j]).sum()) for j, t in enumerate(TASKS)},
        "changed_images": int(changed_any.sum()),
        "changes_per_class": {t: {c: int(((new[:, j] != labels[:, j]) & (new[:, j] == k)).sum())
                                  for k, c in enumerate(CLASSES[t])} for j, t in enumerate(TASKS)},
        "usage": usage,
    }
    clean_path = Path("data/prepared/clean_labels.tsv")
    if clean_path.exists():
        metrics["against_clean_labels"] = score_corrections(pool, relabelled, pd.read_csv(clean_path, sep="\t", dtype=str))
    write_metrics(metrics, "metrics/relabel.json", "relabel")  # voter latencies -> timing/relabel.json
    print({k: metrics[k] for k in ("flagged_images", "changed_labels")}, metrics.get("against_clean_labels", {}).get("mean_precision"))


if __name__ == "__main__":
    main()
