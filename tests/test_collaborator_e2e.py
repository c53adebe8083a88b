"""The real pipeline (tiny config) end to end: a maintainer's run, a collaborator's fresh clone.

One module-scoped `dvc repro` of the whole pipeline plays `make demo`; each test then works on
its own git clone, so neither depends on the other's workspace:

- after `make demo` then `make test` (bytecode written by imports), `dvc status` is clean and
  `dvc exp run -S mix_ratio=...` reruns exactly merge, train/evaluate of augmented and compare;
- the maintainer's `make push-private` to a moto S3 server on loopback; a fresh clone without
  the agreement is refused by `make reproduce-private`'s command with no request for any
  object of the private remote; after acceptance the same command completes, runs no stage
  and leaves `dvc status` clean.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medicsynth import agreement
from tests.e2e_helpers import copy_repo, run
from tests.test_private_remote import (  # noqa: F401  (pytest fixtures used by name)
    _env,
    _object_requests,
    _set_config,
    requests_seen,
    s3,
)

pytestmark = pytest.mark.e2e
# mix_ratio changes the augmented set, the oversampled baseline that copies its composition, their
# trainings (one seed on the tiny config), compare, and the report that presents them.
MIX_RATIO_DOWNSTREAM = {"merge", "baselines", "compare", "report"} | {
    f"{stage}@{variant}-small_cnn-0" for stage in ("train", "evaluate") for variant in ("augmented", "oversampled")}


@pytest.fixture(scope="module")
def demo(tiny_pipeline, tmp_path_factory) -> Path:
    """`make demo` on the tiny config: a committed repository with every output in its cache."""
    return copy_repo(tiny_pipeline, tmp_path_factory.mktemp("maintainer") / "repo")


def _sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1800
    )


def _ran(text: str) -> list[str]:
    """Stages DVC ran (not those restored from the run-cache or skipped), from its log."""
    return re.findall(r"Running stage '([^']+)'", text)


def test_after_demo_then_tests_status_is_clean_and_exp_run_reruns_only_downstream(demo, tmp_path):
    ws = tmp_path / "ws"
    run(["git", "clone", "-q", str(demo), str(ws)], tmp_path)
    run(["dvc", "cache", "dir", "--local", str(demo / ".dvc" / "cache")], ws)
    run(["dvc", "checkout"], ws)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], ws).stdout

    # `make test` in this checkout: every module imported and byte-compiled in place.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(ws)
    for cmd in (
        [sys.executable, "-m", "compileall", "-q", "medicsynth", "stages", "tests", "bench"],
        [sys.executable, "-c", "import medicsynth.llm.client, medicsynth.llm.providers, medicsynth.llm.cache"],
    ):
        assert _sh(cmd, ws, env).returncode == 0
    assert list((ws / "medicsynth" / "llm" / "__pycache__").glob("*.pyc"))
    assert "Data and pipelines are up to date" in run(["dvc", "status"], ws).stdout

    # The tiny pool holds ~24 images, so a small ratio is what changes the augmented set here
    # (the demo's mix_ratio=0.5 plays the same role on its 247-image pool).
    committed = yaml.safe_load((ws / "params.yaml").read_text())["mix_ratio"]
    out = run(["dvc", "exp", "run", "-S", "mix_ratio=0.02"], ws).stdout
    assert set(_ran(out)) == MIX_RATIO_DOWNSTREAM

    # Back to the committed value: all four come from the run-cache, compare included (with
    # its markdown report as a `cache: false` out, DVC never stored compare there).
    back = run(["dvc", "exp", "run", "-S", f"mix_ratio={committed}"], ws).stdout
    # The report alone reruns (a few seconds): its public edition is a git-tracked HTML file, a
    # `cache: false` output that is neither a metric nor a plot, which keeps it out of the run-cache.
    assert _ran(back) == ["report"]
    assert {f"Stage '{s}' is cached" for s in MIX_RATIO_DOWNSTREAM - {"report"}} <= {
        line.split(" - ")[0] for line in back.splitlines()
    }


def test_fresh_clone_refused_without_agreement_then_reproduces_nothing_pushed(
    demo, s3, requests_seen, tmp_path  # noqa: F811
):
    bucket = s3.make_bucket("private")
    env = _env(tmp_path)

    def remote_config(root: Path) -> None:
        # What a maintainer hands out: the bucket (here on loopback) and a key, in config.local.
        _set_config(
            root / ".dvc" / "config.local",
            'remote "private"',
            url=f"s3://{bucket}/dvcstore",
            endpointurl=s3.endpoint,
            access_key_id="testing",
            secret_access_key="testing",
        )

    def cli(root: Path, *args: str) -> subprocess.CompletedProcess:
        return _sh([sys.executable, "-m", "medicsynth.private_remote", *args], root, env)

    # The maintainer: `make push-private` (outputs and run-cache).
    remote_config(demo)
    agreement.accept(demo, name="Maintainer", contact="m@example.org", purpose="runs the GPU stages")
    pushed = cli(demo, "push", "--run-cache")
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert s3.md5s(bucket)

    # A collaborator's fresh clone: no cache, no outputs, no acceptance (it is git-ignored).
    collab = tmp_path / "collab"
    run(["git", "clone", "-q", str(demo), str(collab)], tmp_path)
    assert not (collab / agreement.ACCEPTANCE_FILE).exists()
    remote_config(collab)

    requests_seen.clear()
    refused = cli(collab, "reproduce")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "AGREEMENT.md has not been accepted" in refused.stderr
    assert [line for line in requests_seen if f"/{bucket}" in line] == []
    assert not (collab / "data" / "prepared").exists()

    agreement.accept(collab, name="Collaborator", contact="c@example.org", purpose="reproduce the demo")
    done = cli(collab, "reproduce")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert _ran(done.stdout + done.stderr) == [], "a stage whose outputs were pushed must not run"
    assert _object_requests(requests_seen, bucket)
    for rel in ("data/allocation/plan.tsv", "data/synthetic/manifest.tsv", "metrics/compare.md",
                "models/augmented-small_cnn-s0", "data/variants/relabelled/dev.tsv"):  # fmt: skip
        assert (collab / rel).exists(), rel
    assert "Data and pipelines are up to date" in _sh([*_dvc(), "status"], collab, env).stdout
    assert _sh(["git", "status", "--porcelain"], collab).stdout == ""


def _dvc() -> list[str]:
    venv_dvc = Path(sys.executable).parent / "dvc"
    return [str(venv_dvc)] if venv_dvc.exists() else [sys.executable, "-m", "dvc"]
