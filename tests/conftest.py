"""Shared fixtures of the test suite.

- ``llm_server``: a started loopback OpenAI/Anthropic-compatible server
  (:class:`tests.api_server.FakeLLMServer`), available to every test module without an import.
- ``tiny_pipeline``: one ``dvc repro`` of the whole pipeline on the tiny e2e config, committed,
  run once per session; e2e modules take independent copies (:func:`tests.e2e_helpers.copy_repo`)
  instead of each paying for the same run (~3-4 minutes on 2 cores).
- ``make_manifest``: builds a valid project manifest from label dicts (the tiny frames that
  merge, allocation and caption tests need).

Markers (declared in pyproject.toml): ``e2e`` on tests that run ``dvc`` or stage scripts as
subprocesses, ``slow`` on other tests that take more than a few seconds on 2 cores;
``make test-fast`` runs ``-m "not e2e and not slow"``. Complete params sections for configs are
in :mod:`tests.sections`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd
import pytest

from medicsynth.manifest import COLUMNS, validate_manifest
from tests.api_server import llm_server  # noqa: F401 - the shared pytest fixture
from tests.e2e_helpers import make_repo_copy, run


def build_manifest(
    groups: Sequence[tuple[Mapping[str, str], int]],
    *,
    prefix: str = "img",
    split: str = "train",
    source: str = "real",
) -> pd.DataFrame:
    """A validated manifest with ``n`` rows of each ``(labels, n)`` group, in order.

    ``image_path`` and ``file`` are ``f"{prefix}{i}"`` with ``i`` counting over all rows (unique);
    ``image_id``/``event_name`` are placeholders, ``provenance`` is ``"test"``.
    """
    rows = []
    for labels, n in groups:
        for _ in range(n):
            i = len(rows)
            rows.append({"image_id": "x", "event_name": "x", "image_path": f"{prefix}{i}", **labels,
                         "split": split, "source": source, "provenance": "test", "file": f"{prefix}{i}"})
    return validate_manifest(pd.DataFrame(rows, columns=list(COLUMNS)))


@pytest.fixture
def make_manifest() -> Callable[..., pd.DataFrame]:
    """:func:`build_manifest`, as a fixture."""
    return build_manifest


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """A committed repository copy after ``dvc repro`` of every stage on the tiny e2e config.

    Read-only for tests: take a copy with :func:`tests.e2e_helpers.copy_repo` before changing it.
    """
    repo = make_repo_copy(tmp_path_factory.mktemp("tiny-pipeline"))
    run(["dvc", "repro"], repo, timeout=3600)  # the limit only stops a hung run
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "pipeline run"], repo)
    return repo
