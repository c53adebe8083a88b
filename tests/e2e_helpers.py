"""Helpers for end-to-end tests that run the real `dvc` CLI on a temporary copy of the repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A tiny configuration of every stage, so the whole pipeline runs in about a minute on 2 cores.
TINY_PARAMS = {
    "data": {"demo": {"n_train": 240, "n_dev": 80, "n_test": 80, "image_size": 32}},
    # One seed (the demo trains three): every variant × seed is one training; the e2e test adds
    # a second with `dvc exp run -S train.seeds=[0,1]`.
    "train": {"seeds": [0], "epochs": 2, "batch_size": 32, "resize": 32, "crop": 28, "patience": 2,
              "num_workers": 1},
    "relabel": {"k_folds": 2, "model": {"epochs": 1, "batch_size": 32, "resize": 32, "crop": 28, "num_workers": 1}},
    "allocate": {"total": 24},
    "adapt": {"demo": {"vae_steps": 6, "vae_batch": 8, "unet_steps": 8, "unet_batch": 8, "warmup_steps": 2,
                       "tiny": {"image_size": 32}}},
    "generate": {"steps": 3},
    # An 8-step diffusion model renders noise: keep the gate's rules on but loose enough to pass it.
    "filter": {"threshold": 0.0, "blank_std": 0.0, "blank_dominant_share": 1.01, "phash_threshold": 0,
               "check_real_duplicates": False},
    "compare": {"n_boot": 100},
}


def deep_update(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["HF_HUB_OFFLINE"] = "1"
    e["DVC_NO_ANALYTICS"] = "1"
    e.pop("OPENAI_API_KEY", None)
    e.pop("ANTHROPIC_API_KEY", None)
    return e


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def copy_repo(src: Path, dest: Path) -> Path:
    """An independent copy of a repository made by :func:`make_repo_copy` (after its pipeline run).

    Git history, workspace and DVC cache are copied (so run-caches are not shared between tests
    that count which stages run); DVC's state database (``.dvc/tmp``) is left behind, since it
    keys file hashes by inode and the copy's files are new ones.
    """

    def ignore(directory: str, names: list[str]) -> set[str]:
        return {"tmp"} if Path(directory) == src / ".dvc" else set()

    shutil.copytree(src, dest, symlinks=True, ignore=ignore)
    return dest


def make_repo_copy(dest: Path, params_update: dict | None = None) -> Path:
    """Copy tracked + untracked-not-ignored files into ``dest``, apply params, commit."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if not src.is_file():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    params_path = dest / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    deep_update(params, TINY_PARAMS)
    if params_update:
        deep_update(params, params_update)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], dest)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "test copy"], dest)
    return dest
