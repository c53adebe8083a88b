"""No credentials in files git tracks (or would track on ``git add -A``).

Remote keys belong in ``.dvc/config.local`` or the environment; API keys in the environment.
Both ``.dvc/config.local`` and the agreement acceptance are personal and must stay ignored.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

CONFIG_NAMES = {".dvc/config", "dvc.yaml", "dvc.lock", "params.yaml", "Makefile"}
CONFIG_SUFFIXES = {".cfg", ".ini", ".toml", ".yaml", ".yml", ".json", ".conf", ".env"}
# Anything larger is data, not configuration.
MAX_BYTES = 2_000_000

SECRET_PATTERNS: dict[str, re.Pattern[str]] = {
    # AKIA: long-term key id; ASIA: temporary (STS) key id.
    "AWS access key id": re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9])"),
    "AWS secret key setting": re.compile(r"secret_access_key", re.IGNORECASE),
    "Anthropic API key": re.compile(r"(?<![A-Za-z0-9])sk-ant-[A-Za-z0-9_\-]{20,}"),
    "OpenAI-style API key": re.compile(r"(?<![A-Za-z0-9])sk-(?!ant-)[A-Za-z0-9_\-]{20,}"),
    "private key block": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}


def is_config_like(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return (
        rel in CONFIG_NAMES or name.startswith(".env") or any(name.endswith(s) for s in CONFIG_SUFFIXES)
    )


def find_secrets(text: str) -> list[tuple[int, str]]:
    """(line number, kind) for every line of ``text`` that looks like it holds a secret."""
    hits = []
    for number, line in enumerate(text.splitlines(), start=1):
        hits.extend((number, kind) for kind, pattern in SECRET_PATTERNS.items() if pattern.search(line))
    return hits


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def candidate_files() -> list[str]:
    if shutil.which("git") is None or _git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout")
    # Untracked-but-not-ignored files count: they are one `git add -A` away from a commit.
    listing = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard")
    assert listing.returncode == 0, listing.stderr
    return sorted({p for p in listing.stdout.split("\0") if p})


def test_config_like_files_hold_no_secrets(candidate_files):
    scanned, problems = 0, []
    for rel in filter(is_config_like, candidate_files):
        path = REPO_ROOT / rel
        if not path.is_file() or path.stat().st_size > MAX_BYTES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        scanned += 1
        problems += [f"{rel}:{line}: looks like a {kind}" for line, kind in find_secrets(text)]
    assert ".dvc/config" in candidate_files, "the DVC config should be tracked"
    assert scanned >= 1
    assert not problems, (
        "secrets in files git tracks; move them to .dvc/config.local or the environment:\n"
        + "\n".join(problems)
    )


@pytest.mark.parametrize("rel", [".dvc/config.local", ".dvc/agreement.local.json"])
def test_personal_files_are_ignored_and_untracked(candidate_files, rel):
    assert rel not in candidate_files
    assert _git("ls-files", "--error-unmatch", rel).returncode != 0, f"{rel} is tracked by git"
    assert _git("check-ignore", "-q", rel).returncode == 0, f"{rel} is not git-ignored"


def test_private_remote_configured_without_credentials():
    from configobj import ConfigObj

    conf = ConfigObj(str(REPO_ROOT / ".dvc" / "config"))
    remote = conf.get('remote "private"')
    assert remote is not None, "remote 'private' missing from .dvc/config"
    assert remote["url"] == "s3://medicsynth-private/dvcstore"
    assert not {"access_key_id", "secret_access_key", "session_token"} & set(remote)


# The scanner must catch what it claims to; fake values are assembled at run time so this file
# does not itself look like it leaks a key.
@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("    access_key_id = AKIA" + "Q" * 16, "AWS access key id"),
        ("aws_session = ASIA" + "7" * 16, "AWS access key id"),
        ("    secret_access_key = whatever", "AWS secret key setting"),
        ("AWS_SECRET_ACCESS_KEY=abc", "AWS secret key setting"),
        ('{"openai": "sk-' + "proj-" + "a1B2" * 8 + '"}', "OpenAI-style API key"),
        ("ANTHROPIC_API_KEY=sk-" + "ant-api03-" + "x" * 40, "Anthropic API key"),
        ("-----BEGIN " + "RSA PRIVATE KEY-----", "private key block"),
    ],
)
def test_scanner_detects_planted_secrets(line, kind):
    assert (2, kind) in find_secrets("harmless = 1\n" + line + "\n")


def test_scanner_ignores_ordinary_config():
    text = (
        "['remote \"private\"']\n    url = s3://medicsynth-private/dvcstore\n"
        "task-specific: sk-short\nmodel: AKIA-not-a-key\nmask-rcnn-weights: true\n"
    )
    assert find_secrets(text) == []


def test_is_config_like():
    assert all(
        map(is_config_like, [".dvc/config", "params.yaml", "a/b.toml", ".env", ".env.local", "x.json"])
    )
    assert not any(map(is_config_like, ["README.md", "medicsynth/io.py", ".dvc/config.local"]))


# What the LLM layer writes about failed calls goes through medicsynth.llm.redact: whatever this
# scanner calls an API key must not survive it (fake values assembled at run time, as above).
@pytest.mark.parametrize(
    "line",
    [
        '{"detail": "HTTP 401: Incorrect API key provided: sk-' + "proj-" + "a1B2" * 8 + '"}',
        "x-api-key: sk-" + "ant-api03-" + "x" * 40,
        "Authorization: Bearer sk-" + "Q9" * 15,
    ],
)
def test_redaction_removes_what_the_scanner_flags(line):
    from medicsynth.llm import redact

    assert find_secrets(line) and find_secrets(redact(line)) == []
    assert "[REDACTED]" in redact(line)
