"""train: fit the multi-task classifier on one dataset variant with one architecture.

Usage: python stages/train.py --variant original --arch small_cnn --seed 0
Multi-GPU (one process per GPU, data-parallel; batch_size is per process):
    accelerate launch --multi_gpu --num_processes 8 stages/train.py --variant augmented --arch resnet50 --seed 0
    torchrun --standalone --nproc_per_node 8 stages/train.py --variant augmented --arch resnet50 --seed 0
Outputs, with name = <variant>-<arch>-s<seed>: models/<name>/model.pt, metrics/train/<name>.json
(summary) and the DVCLive per-epoch logs in metrics/train/<name>/ (declared as plots in dvc.yaml).
Only rank 0 writes them; the other ranks train and exit. The variant's classic augmentation is
train.augment[<variant>] (none when not listed).
"""

from __future__ import annotations

import medicsynth  # noqa: F401 - first import: pins the CPU code paths before numpy/torch load (numerics.py)

import argparse
from contextlib import nullcontext
from pathlib import Path

from dvclive import Live

from medicsynth.timing import write_metrics
from medicsynth.manifest import label_matrix, read_manifest
from medicsynth.models import save_classifier
from medicsynth.numerics import apply_params as apply_numerics
from medicsynth.params import load_params, section
from medicsynth.shards import check_images
from medicsynth.training import TrainConfig, config_dict, dist_info, train_classifier

# train keys that are not TrainConfig fields: the matrix axes and the per-variant policy map.
MATRIX_KEYS = ("archs", "seeds", "augment")


def train_config(params: dict, variant: str, arch: str, seed: int) -> TrainConfig:
    """The TrainConfig of one matrix entry from params.yaml's ``train`` section.

    ``seed`` and ``arch`` come from the matrix; ``augment`` from ``train.augment[variant]``
    (``none`` when the variant is not listed); every other field from its ``train`` key
    (:meth:`TrainConfig.from_params`: a missing key is a ``KeyError`` naming it). Raises
    ``ValueError`` naming the key for a ``train.augment`` that is not a mapping, a ``train.seed``
    left from the old layout, or an unknown key.
    """
    if "seed" in params:
        raise ValueError("params.yaml: train.seed is replaced by train.seeds (a list, e.g. [0, 1, 2])")
    augment = params.get("augment") or {}
    if not isinstance(augment, dict):
        raise ValueError(f"params.yaml: train.augment must map variants to a policy "
                         f"(e.g. {{classic_aug: trivialaugment}}), got {augment!r}")
    return TrainConfig.from_params(params, "train", ignore=MATRIX_KEYS, arch=arch, seed=int(seed),
                                   augment=str(augment.get(variant, "none")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--arch", required=True)
    parser.add_argument("--seed", type=int, required=True, help="training seed (one of train.seeds)")
    args = parser.parse_args()

    params = load_params()
    apply_numerics(params)
    config = train_config(section(params, "train"), args.variant, args.arch, args.seed)
    variant_dir = Path("data/variants") / args.variant
    train_df = read_manifest(variant_dir / "train.tsv")
    dev_df = read_manifest(variant_dir / "dev.tsv")
    for split, df in (("train", train_df), ("dev", dev_df)):  # fail before training, naming the row
        check_images(df["file"], variant_dir / f"{split}.tsv")
    name = f"{args.variant}-{args.arch}-s{args.seed}"
    main_process = dist_info().is_main

    # dvcyaml=None/save_dvc_exp=False: dvc.yaml declares these plots itself. Other ranks of a
    # data-parallel run must not open a Live: it would reset the same directory.
    logger = (Live(dir=f"metrics/train/{name}", dvcyaml=None, save_dvc_exp=False)
              if main_process else nullcontext())
    with logger as live:
        result = train_classifier(
            train_df["file"].tolist(), label_matrix(train_df),
            dev_df["file"].tolist(), label_matrix(dev_df), config, live=live,
        )
    if not main_process:
        return
    meta = {"arch": args.arch, "variant": args.variant, "seed": args.seed, "resize": config.resize, "crop": config.crop,
            "dropout": config.dropout, "config": config_dict(config)}
    save_classifier(result.model, Path("models") / name / "model.pt", meta)
    write_metrics(  # seconds and images/s go to timing/train/<name>.json, not the metrics
        {
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "best_dev_mean_macro_f1": result.best_dev_macro_f1,
            "train_rows": len(train_df),
            "synthetic_rows": int((train_df["source"] == "synthetic").sum()),
            "seed": args.seed,
            "augment": config.augment,
            "seconds": round(result.seconds, 2),
            "train_images_per_second": round(result.images_per_second, 1),
            "loader": result.loader_backend,
            "world_size": result.world_size,
            "global_batch_size": config.batch_size * result.world_size,
            "lr": result.lr,
            # Recipe outcomes that the default recipe does not produce (its summary stays as it was).
            **({"best_dev_loss": result.best_dev_loss} if config.early_stop_metric == "dev_loss" else {}),
            **({"lr_cuts": result.lr_cuts} if config.schedule == "plateau" else {}),
        },
        f"metrics/train/{name}.json",
        f"train/{name}",
    )
    print(f"{name}: best epoch {result.best_epoch}, dev mean macro-F1 {result.best_dev_macro_f1:.3f}, "
          f"{result.seconds:.0f}s ({result.loader_backend}, {result.world_size} process(es))")


if __name__ == "__main__":
    main()
