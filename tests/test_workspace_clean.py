"""Running the tests (or any import) must not change what DVC sees as a stage's dependencies.

``medicsynth/llm`` is a directory dependency of relabel, zeroshot and caption. Importing the
package writes ``__pycache__/*.pyc`` into it; unless ``.dvcignore`` hides bytecode, DVC hashes
those files too and ``dvc status`` reports the three stages (paid ones, with API keys) as
modified. Checked here in a real temporary clone of the repository; the full "make demo, then
make test, then dvc status / dvc exp run" sequence is in tests/test_collaborator_e2e.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dvc.repo import Repo

from tests.e2e_helpers import make_repo_copy


def directory_dependency_hashes(root: Path) -> dict[str, str]:
    """DVC's hash of every directory dependency of the pipeline that exists in ``root``."""
    hashes = {}
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            for dep in stage.deps:
                if (root / dep.def_path).is_dir():
                    hashes[dep.def_path] = dep.get_hash().value
    return hashes


def test_bytecode_from_imports_does_not_change_directory_dependencies(tmp_path):
    clone = make_repo_copy(tmp_path / "clone")
    before = directory_dependency_hashes(clone)
    assert "medicsynth/llm" in before, "the check needs a directory dependency on code"
    assert not list((clone / "medicsynth").rglob("__pycache__"))

    # What `make test` leaves behind: bytecode of every imported module, in the checkout itself.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(clone)
    for cmd in (
        [sys.executable, "-m", "compileall", "-q", "medicsynth", "stages", "tests"],
        [sys.executable, "-c", "import medicsynth.llm.client, medicsynth.llm.providers"],
    ):
        subprocess.run(cmd, cwd=clone, env=env, check=True, capture_output=True)
    assert list((clone / "medicsynth" / "llm" / "__pycache__").glob("*.pyc"))

    assert directory_dependency_hashes(clone) == before
