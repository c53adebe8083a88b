"""train: fit the multi-task classifier on one dataset variant with one architecture.

Usage: python stages/train.py --variant original --arch small_cnn
Outputs: models/<variant>-<arch>/model.pt, metrics/train/<variant>-<arch>.json (summary) and the
DVCLive per-epoch logs in metrics/train/<variant>-<arch>/ (declared as plots in dvc.yaml).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dvclive import Live  # noqa: E402

from medicsynth.io import write_json  # noqa: E402
from medicsynth.manifest import label_matrix, read_manifest  # noqa: E402
from medicsynth.models import save_classifier  # noqa: E402
from medicsynth.params import load_params, section  # noqa: E402
from medicsynth.training import TrainConfig, config_dict, train_classifier  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--arch", required=True)
    args = parser.parse_args()

    params = section(load_params(), "train")
    config = TrainConfig(arch=args.arch, **{k: v for k, v in params.items() if k != "archs"})
    variant_dir = Path("data/variants") / args.variant
    train_df = read_manifest(variant_dir / "train.tsv")
    dev_df = read_manifest(variant_dir / "dev.tsv")
    name = f"{args.variant}-{args.arch}"

    # dvcyaml=None/save_dvc_exp=False: dvc.yaml declares these plots itself.
    with Live(dir=f"metrics/train/{name}", dvcyaml=None, save_dvc_exp=False) as live:
        result = train_classifier(
            train_df["file"].tolist(), label_matrix(train_df),
            dev_df["file"].tolist(), label_matrix(dev_df), config, live=live,
        )
    meta = {"arch": args.arch, "variant": args.variant, "resize": config.resize, "crop": config.crop,
            "dropout": config.dropout, "config": config_dict(config)}
    save_classifier(result.model, Path("models") / name / "model.pt", meta)
    write_json(
        {
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "best_dev_mean_macro_f1": result.best_dev_macro_f1,
            "train_rows": len(train_df),
            "synthetic_rows": int((train_df["source"] == "synthetic").sum()),
            "seconds": round(result.seconds, 2),
            "train_images_per_second": round(result.images_per_second, 1),
            "loader": result.loader_backend,
        },
        f"metrics/train/{name}.json",
    )
    print(f"{name}: best epoch {result.best_epoch}, dev mean macro-F1 {result.best_dev_macro_f1:.3f}, "
          f"{result.seconds:.0f}s ({result.loader_backend})")


if __name__ == "__main__":
    main()
