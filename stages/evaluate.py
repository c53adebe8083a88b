"""evaluate: score one trained model on the test split (original labels) and on its dev split.

Usage: python stages/evaluate.py --variant original --arch small_cnn --seed 0
Outputs, with name = <variant>-<arch>-s<seed>: metrics/evaluate/<name>.json (test; headline macro-F1), metrics/dev/<variant>-s<seed>/<arch>.json (dev
per-class F1, read by allocate), data/predictions/<name>/test.tsv (for compare),
plots/evaluate/<name>/ (confusion matrices, per-class F1).
Test labels are always the original ones from data/prepared/test.tsv (the headline, "test").
If the relabel stage was asked to relabel test (relabel.splits lists test, as the study did),
every variant's model is also scored on the relabelled test labels
(data/relabelled_test.tsv, when relabel.splits lists test), reported apart as "test_relabelled", and the predictions
gain <task>_true_relabelled columns (compare scores both).
"""

from __future__ import annotations

import medicsynth  # noqa: F401 - first import: pins the CPU code paths before numpy/torch load (numerics.py)

import argparse
from pathlib import Path

from medicsynth.evaluation import EvaluateConfig, for_metrics, predictions_table, relabelled_labels, score, score_probs
from medicsynth.io import write_json
from medicsynth.labels import CLASSES, TASKS
from medicsynth.manifest import read_manifest, write_tsv
from medicsynth.models import load_classifier
from medicsynth.numerics import apply_params as apply_numerics
from medicsynth.params import from_section, load_params
from medicsynth.plots import plot_confusion, plot_per_class_f1
from medicsynth.shards import check_images

RELABELLED_TEST = Path("data/relabelled_test.tsv")  # from relabel: header only unless it relabelled test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--arch", required=True)
    parser.add_argument("--seed", type=int, required=True, help="training seed of the model")
    args = parser.parse_args()
    params = load_params()
    apply_numerics(params)
    config = from_section(EvaluateConfig, params, "evaluate")
    name = f"{args.variant}-{args.arch}-s{args.seed}"
    model, meta = load_classifier(Path("models") / name / "model.pt")

    test_df = read_manifest("data/prepared/test.tsv")
    check_images(test_df["file"], "data/prepared/test.tsv")  # fail before predicting, naming the row
    report, probs = score(model, meta, test_df, config)
    metrics = {"test": for_metrics(report)}
    relabelled_df = None
    relabelled_test = read_manifest(RELABELLED_TEST) if RELABELLED_TEST.exists() else None
    if relabelled_test is not None and len(relabelled_test):  # one set of relabelled test labels for every variant
        relabelled_df = relabelled_labels(test_df, relabelled_test, str(RELABELLED_TEST))
        metrics["test_relabelled"] = for_metrics(score_probs(probs, relabelled_df, config))
    write_json(metrics, Path("metrics/evaluate") / f"{name}.json")

    dev_df = read_manifest(Path("data/variants") / args.variant / "dev.tsv")
    # metrics/dev/<variant>-s<seed>/<arch>.json: allocate depends on the original variant's seed-0
    # directory, so DVC runs every architecture's evaluation before it (the study's rule).
    write_json(for_metrics(score(model, meta, dev_df, config)[0]),
               Path("metrics/dev") / f"{args.variant}-s{args.seed}" / f"{args.arch}.json")
    write_tsv(predictions_table(test_df, probs, relabelled_df), Path("data/predictions") / name / "test.tsv")

    plot_dir = Path("plots/evaluate") / name
    plot_dir.mkdir(parents=True, exist_ok=True)
    for t in TASKS:
        plot_confusion(report["tasks"][t]["confusion"], CLASSES[t], f"{name}: {t} (test)",
                       plot_dir / f"confusion_{t}.png")
    plot_per_class_f1(report, plot_dir / "per_class_f1.png")
    print(f"{name}: test mean macro-F1 {report['mean_macro_f1']:.3f} "
          + " ".join(f"{t}={report['tasks'][t]['macro_f1']:.3f}" for t in TASKS))


if __name__ == "__main__":
    main()
