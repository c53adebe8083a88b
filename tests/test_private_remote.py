"""The private DVC remote end to end: real ``dvc`` against a local moto S3 server.

Every DVC call is a subprocess of the real CLI in a throw-away git+DVC repository, with AWS
and DVC user config pointed at empty temporary files so nothing on the machine (real keys,
instance metadata, global DVC remotes) can leak in or be touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from medicsynth import agreement, private_remote
from medicsynth.loopback_s3 import MOTO_KEY, isolated_dvc_env, moto_client, moto_s3_server

REPO_ROOT = Path(__file__).resolve().parents[1]
_VENV_DVC = Path(sys.executable).parent / "dvc"
DVC = [str(_VENV_DVC)] if _VENV_DVC.exists() else [sys.executable, "-m", "dvc"]


# --------------------------------------------------------------------------- fixtures


@dataclass
class S3:
    endpoint: str

    def client(self, key: str = MOTO_KEY, secret: str = MOTO_KEY):
        return moto_client(self.endpoint, "s3", key, secret)

    def make_bucket(self, prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def md5s(self, bucket: str) -> set[str]:
        """MD5 keys of the objects DVC stored in ``bucket`` (``files/md5/ab/cdef...``)."""
        return self._md5s(self.client(), bucket)

    def md5s_as(self, bucket: str, access_key: dict) -> set[str]:
        """:meth:`md5s` with an IAM access key, for when the server enforces auth."""
        return self._md5s(self.client(access_key["AccessKeyId"], access_key["SecretAccessKey"]), bucket)

    @staticmethod
    def _md5s(client, bucket: str) -> set[str]:
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
        return {"".join(k.split("/")[-2:]) for k in keys if "/md5/" in f"/{k}"}

    def enforce_auth(self, enabled: bool) -> None:
        # The server runs in this process, and moto reads INITIAL_NO_AUTH_ACTION_COUNT once at
        # import; its reset-auth endpoint is the supported way to change it at run time
        # (moto's set_initial_no_auth_action_count uses the same endpoint in server mode).
        value = b"0" if enabled else b"inf"
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=value,
            method="POST",
            # Not form-encoded, or the server parses the body as a form and moto reads it empty.
            headers={"Content-Type": "application/octet-stream"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[S3]:
    aws_dir = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as mp:
        # boto3 in this process must not read real AWS config either.
        mp.setenv("AWS_CONFIG_FILE", str(aws_dir / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(aws_dir / "credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for var in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            mp.delenv(var, raising=False)
        with moto_s3_server() as endpoint:
            yield S3(endpoint)


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    """Environment for DVC subprocesses (:func:`isolated_dvc_env`, user config in ``tmp``) that
    also imports this checkout's ``medicsynth`` and never reaches the Hugging Face hub."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return isolated_dvc_env(tmp, HF_HUB_OFFLINE="1", PYTHONPATH=pythonpath, **extra)


@dataclass
class Repo:
    root: Path
    env: dict[str, str]

    def run(
        self, *args: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            args,
            cwd=self.root,
            env=env or self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def dvc(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(*DVC, *args, **kwargs)

    def cli(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "medicsynth.private_remote", *args, check=False, **kwargs)

    def write(self, rel: str, text: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def add_remote(self, name: str, url: str, endpoint: str, *, default: bool = False) -> None:
        """What docs/PRIVATE_REMOTE.md tells people to run, minus credentials."""
        self.dvc("remote", "add", *(["-d"] if default else []), name, url)
        self.dvc("remote", "modify", "--local", name, "endpointurl", endpoint)

    def wipe(self, *paths: str) -> None:
        """Forget everything local: the DVC cache and the given workspace outputs."""
        shutil.rmtree(self.root / ".dvc" / "cache", ignore_errors=True)
        for rel in paths:
            target = self.root / rel
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()


@pytest.fixture
def repo(tmp_path) -> Repo:
    root = tmp_path / "proj"
    root.mkdir()
    r = Repo(root, _env(tmp_path))
    r.run("git", "init", "-q")
    r.dvc("init", "-q")
    shutil.copy(REPO_ROOT / "AGREEMENT.md", root / "AGREEMENT.md")
    return r


def _accept(root: Path) -> None:
    agreement.accept(
        root, name="Test Person", contact="test@example.org", purpose="unit tests of the remote"
    )


def _set_config(path: Path, section: str, **options: str) -> None:
    """Same edit as `dvc remote add/modify [--local]`, without paying for a DVC start-up per
    option (the round-trip test runs the real commands); configobj is DVC's own parser."""
    from configobj import ConfigObj

    conf = ConfigObj(str(path))
    conf.setdefault(section, {}).update(options)
    conf.write()


def _local_credentials(repo: Repo, remote: str, key: str = "testing", secret: str = "testing") -> None:
    _set_config(
        repo.root / ".dvc" / "config.local",
        f'remote "{remote}"',
        access_key_id=key,
        secret_access_key=secret,
    )


def _configure_remotes(repo: Repo, endpoint: str, public: str, private: str) -> None:
    """Default remote ``public`` and remote ``private``, endpoints in config.local as documented."""
    config, local = repo.root / ".dvc" / "config", repo.root / ".dvc" / "config.local"
    _set_config(config, "core", remote="public")
    for name, bucket in (("public", public), ("private", private)):
        _set_config(config, f'remote "{name}"', url=f"s3://{bucket}/dvcstore")
        _set_config(local, f'remote "{name}"', endpointurl=endpoint)


def _digests(root: Path, rels: list[str]) -> dict[str, str]:
    out = {}
    for rel in rels:
        path = root / rel
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            out[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


# --------------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_push_wipe_pull_roundtrip_restores_identical_files(repo, s3):
    bucket = s3.make_bucket("store")
    repo.add_remote("store", f"s3://{bucket}/dvcstore", s3.endpoint, default=True)
    repo.dvc("remote", "modify", "--local", "store", "access_key_id", "testing")
    repo.dvc("remote", "modify", "--local", "store", "secret_access_key", "testing")
    repo.write("images/a.txt", "synthetic image a\n")
    repo.write("images/sub/b.bin", "synthetic image b " * 1000)
    repo.write("captions.tsv", "id\tcaption\n1\ta flooded street\n")
    repo.dvc("add", "-q", "images", "captions.tsv")
    before = _digests(repo.root, ["images", "captions.tsv"])

    repo.dvc("push", "-q")
    assert {_md5("synthetic image a\n"), _md5("synthetic image b " * 1000)} <= s3.md5s(bucket)
    assert not (repo.root / ".dvc" / "config").read_text().count("secret_access_key")

    repo.wipe("images", "captions.tsv")
    assert not (repo.root / "images").exists()
    repo.dvc("pull", "-q")
    assert _digests(repo.root, ["images", "captions.tsv"]) == before


PIPELINE = """\
stages:
  make:
    cmd: >-
      echo public-only > public.txt &&
      mkdir -p gen && echo private-a > gen/a.txt && echo private-b > gen/b.txt &&
      echo metrics-private > model.bin
    outs:
      - public.txt
      - gen:
          remote: private
      - model.bin:
          remote: private
"""


@pytest.fixture
def remotes(repo, s3) -> tuple[Repo, str, str]:
    """A repo with default remote ``public`` and remote ``private``, each on its own bucket."""
    public, private = s3.make_bucket("public"), s3.make_bucket("private")
    _configure_remotes(repo, s3.endpoint, public, private)
    _local_credentials(repo, "public")
    return repo, public, private


@pytest.fixture
def routed(remotes) -> tuple[Repo, str, str]:
    """``remotes`` plus a pipeline: ``public.txt`` to the default remote, the rest to ``private``."""
    repo, public, private = remotes
    repo.write("dvc.yaml", PIPELINE)
    repo.write("raw.bin", "raw private upload\n")
    repo.dvc("repro", "-q")
    repo.dvc("add", "-q", "raw.bin")
    dvcfile = repo.root / "raw.bin.dvc"
    # A .dvc file routes to a remote the same way: a `remote` key on the output.
    dvcfile.write_text(
        dvcfile.read_text().replace("  path: raw.bin\n", "  path: raw.bin\n  remote: private\n")
    )
    return repo, public, private


@pytest.mark.e2e
def test_per_output_remote_routes_push_and_pull_to_the_right_bucket(routed, s3):
    repo, public, private = routed
    outs = private_remote.private_outputs(repo.root)
    assert [(o.path, o.stage) for o in outs] == [
        ("gen", "make"),
        ("model.bin", "make"),
        ("raw.bin", "raw.bin.dvc"),
    ]
    assert private_remote.select_targets(repo.root, ["make"], outs) == ["gen", "model.bin"]
    assert private_remote.select_targets(repo.root, [str(repo.root / "gen" / "a.txt")], outs) == [
        "gen/a.txt"
    ]
    with pytest.raises(private_remote.PrivateRemoteError, match="public.txt.*not an output routed"):
        private_remote.select_targets(repo.root, [str(repo.root / "public.txt")], outs)

    _local_credentials(repo, "private")
    _accept(repo.root)
    private_md5s = {
        _md5("private-a\n"),
        _md5("private-b\n"),
        _md5("metrics-private\n"),
        _md5("raw private upload\n"),
    }
    outputs = ["public.txt", "gen", "model.bin", "raw.bin"]
    before = _digests(repo.root, outputs)

    # Our push sends only the private outputs, to the private bucket.
    pushed = repo.cli("push")
    assert pushed.returncode == 0, pushed.stderr
    assert private_md5s <= s3.md5s(private)
    assert s3.md5s(public) == set()
    # Plain `dvc push` honours per-output remotes: the public output lands in the public bucket only.
    repo.dvc("push", "-q")
    assert s3.md5s(public) == {_md5("public-only\n")}
    assert _md5("public-only\n") not in s3.md5s(private)

    repo.wipe(*outputs)
    pulled = repo.cli("pull")
    assert pulled.returncode == 0, pulled.stderr
    assert not (repo.root / "public.txt").exists(), "private pull must not fetch default-remote outputs"
    assert _digests(repo.root, outputs[1:]) == {k: v for k, v in before.items() if k != "public.txt"}

    # A non-private target is refused before DVC runs.
    refused = repo.cli("pull", "public.txt")
    assert refused.returncode == 2
    assert "not an output routed to remote 'private'" in refused.stderr


@pytest.mark.e2e
def test_pull_refused_without_agreement(remotes, s3):
    repo, _, private = remotes
    _local_credentials(repo, "private")
    proc = repo.cli("pull")
    assert proc.returncode == 2
    assert "AGREEMENT.md has not been accepted" in proc.stderr
    assert "make accept-agreement" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    # The accepted-then-changed case is refused too (text hash no longer matches).
    _accept(repo.root)
    with (repo.root / "AGREEMENT.md").open("a") as fh:
        fh.write("\nAmended.\n")
    proc = repo.cli("push")
    assert proc.returncode == 2 and "AGREEMENT.md changed since Test Person accepted it" in proc.stderr
    assert s3.md5s(private) == set()


@pytest.mark.e2e
def test_pull_refused_without_credentials(remotes, s3):
    repo, _, private = remotes
    _accept(repo.root)
    proc = repo.cli("pull")
    assert proc.returncode == 2, proc.stderr
    assert "no S3 credentials for DVC remote 'private'" in proc.stderr
    assert "dvc remote modify --local private access_key_id" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    # A half-configured environment is named precisely.
    proc = repo.cli("push", env={**repo.env, "AWS_ACCESS_KEY_ID": "only-the-id"})
    assert proc.returncode == 2
    assert "AWS_ACCESS_KEY_ID but not AWS_SECRET_ACCESS_KEY" in proc.stderr
    assert s3.md5s(private) == set()


@pytest.mark.e2e
def test_agreement_cli_accept_then_status(repo):
    accepted = repo.run(
        sys.executable, "-m", "medicsynth.agreement", "accept", "--yes",
        "--name", "Ada L.", "--contact", "ada@example.org",
        "--purpose", "flood damage research, non-commercial",
    )  # fmt: skip
    assert "accepted AGREEMENT.md" in accepted.stdout
    record = json.loads((repo.root / agreement.ACCEPTANCE_FILE).read_text())
    assert (
        record["agreement_sha256"]
        == hashlib.sha256((REPO_ROOT / "AGREEMENT.md").read_bytes()).hexdigest()
    )
    assert record["name"] == "Ada L." and record["purpose"] == "flood damage research, non-commercial"
    assert repo.run(sys.executable, "-m", "medicsynth.agreement", "status").returncode == 0
    # Accepting needs an explicit yes when nobody is at a terminal.
    no = repo.run(
        sys.executable, "-m", "medicsynth.agreement", "accept",
        "--name", "B", "--contact", "b@example.org", "--purpose", "something non-commercial",
        check=False,
    )  # fmt: skip
    assert no.returncode == 1 and "without --yes" in no.stderr
    # Fields missing and no terminal to ask on: an error naming them and the rules.
    missing = repo.run(sys.executable, "-m", "medicsynth.agreement", "accept", "--name", "B", check=False)
    assert missing.returncode == 2
    assert "--contact, --purpose not given and no terminal" in missing.stderr
    assert "at least 10 characters" in missing.stderr


@pytest.mark.e2e
def test_agreement_cli_asks_on_a_terminal(repo):
    """`make accept-agreement` without arguments, as a person at a terminal answers it."""
    import pty
    import threading

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "medicsynth.agreement", "accept"],
        cwd=repo.root, env=repo.env, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
    )  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    # Name, contact, a too-short purpose (asked again), the purpose, the confirmation.
    for line in ("Ada L.", "ada@example.org", "test", "flood damage research", "I agree"):
        os.write(master, f"{line}\n".encode())
    assert proc.wait(timeout=60) == 0
    reader.join(timeout=10)
    os.close(master)
    shown = b"".join(chunks).decode("utf-8", "replace")
    assert "at least 10 characters" in shown and "is too short" in shown
    assert "Type \"I agree\"" in shown
    record = json.loads((repo.root / agreement.ACCEPTANCE_FILE).read_text())
    assert (record["name"], record["contact"], record["purpose"]) == (
        "Ada L.", "ada@example.org", "flood damage research",
    )  # fmt: skip


def test_ask_fields_asks_only_for_missing_fields_until_valid():
    answers = iter(["", "ada@example.org", "short", "non-commercial flood research"])
    asked: list[str] = []
    said: list[str] = []

    def ask(prompt: str) -> str:
        asked.append(prompt)
        return next(answers)

    fields = agreement.ask_fields("Ada", None, None, ask=ask, say=said.append)
    assert fields == ("Ada", "ada@example.org", "non-commercial flood research")
    assert [p.split(" ")[0] for p in asked] == ["Contact", "Contact", "Purpose", "Purpose"]
    assert "contact must not be empty" in said[0] and "at least 10 characters" in said[1]


@pytest.mark.e2e
def test_wrong_credentials_refused_when_auth_is_enforced(routed, s3):
    repo, _, private = routed
    _accept(repo.root)
    iam = moto_client(s3.endpoint, "iam")
    user = f"collaborator-{uuid.uuid4().hex[:6]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(
        UserName=user,
        PolicyName="private-remote",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
            }
        ),
    )
    key = iam.create_access_key(UserName=user)["AccessKey"]
    good = {
        **repo.env,
        "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
        "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
    }
    bad = {**good, "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"][:-4] + "XXXX"}

    s3.enforce_auth(True)
    try:
        # The server really checks signatures now: moto's default "testing" keys are unknown to IAM.
        with pytest.raises(Exception, match="InvalidAccessKeyId"):
            s3.client().list_objects_v2(Bucket=private)

        pushed = repo.cli("push", env=good)
        assert pushed.returncode == 0, pushed.stderr
        assert {_md5("private-a\n"), _md5("raw private upload\n")} <= s3.md5s_as(private, key)
        repo.wipe("gen", "model.bin", "raw.bin")

        refused = repo.cli("pull", env=bad)
        assert refused.returncode == 1
        assert "ERROR: failed to" in refused.stderr  # DVC's own message is passed through
        assert "The store rejected the credentials" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert not (repo.root / "gen").exists()

        pulled = repo.cli("pull", env=good)
        assert pulled.returncode == 0, pulled.stderr
        assert (repo.root / "gen" / "a.txt").read_text() == "private-a\n"
        assert (repo.root / "raw.bin").read_text() == "raw private upload\n"
    finally:
        s3.enforce_auth(False)


# The collaborator workflow of README/docs/PRIVATE_REMOTE.md §4: whoever has a GPU runs the
# GPU stage and pushes outputs + run-cache (`make push-private`); a collaborator without one runs
# `make reproduce-private` on a fresh clone and never runs that stage.
COLLAB_PIPELINE = """\
stages:
  gpu:
    cmd: python gpu.py
    deps: [gpu.py]
    params: [gen.n]
    outs:
      - gen:
          remote: private
  fit:
    cmd: python fit.py
    deps: [fit.py, gen]
    params: [fit.k]
    outs:
      - model.bin:
          remote: private
    metrics:
      - metrics.json:
          cache: false
"""
GPU_PY = """\
import os, pathlib, sys, yaml
if os.environ.get("HAVE_GPU") != "1":
    sys.exit("gpu stage ran on a machine without a GPU")
n = yaml.safe_load(open("params.yaml"))["gen"]["n"]
pathlib.Path("gen").mkdir(exist_ok=True)
for i in range(n):
    pathlib.Path(f"gen/{i}.txt").write_text(f"synthetic {i}\\n")
"""
FIT_PY = """\
import json, pathlib, sys, yaml
k = yaml.safe_load(open("params.yaml"))["fit"]["k"]
with open("fit_runs.log", "a") as fh:  # untracked: counts real executions of this stage
    fh.write(f"k={k}\\n")
if k < 0:
    sys.exit("fit refuses a negative k")
images = sorted(p.read_text() for p in pathlib.Path("gen").glob("*.txt"))
pathlib.Path("model.bin").write_text(f"model k={k} on {len(images)} images\\n")
json.dump({"k": k, "images": len(images)}, open("metrics.json", "w"))
"""


@pytest.fixture
def requests_seen(s3) -> Iterator[list[str]]:
    """Request lines ("GET /bucket/key HTTP/1.1") the moto server answers while the test runs.

    The server runs in this process and logs every request through werkzeug's logger.
    """
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())  # werkzeug colours
            if '"' in message:
                seen.append(message.split('"')[1])

    log = logging.getLogger("werkzeug")
    handler, level = Collect(level=logging.INFO), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield seen
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _object_requests(seen: list[str], bucket: str) -> list[str]:
    """GET/HEAD requests of object keys under the remote prefix (not bucket listings)."""
    return [
        line
        for line in seen
        if line.split(" ")[0] in ("GET", "HEAD")
        and line.split(" ")[1].split("?")[0].startswith(f"/{bucket}/dvcstore/")
    ]


@pytest.fixture
def gpu_pushed(remotes, s3, tmp_path) -> tuple[Repo, Repo, str]:
    """The maintainer ran the GPU stage and pushed (`make push-private`); a collaborator has a
    fresh clone (no cache, no outputs) with endpoint and key in config.local, no default remote."""
    maintainer, _, private = remotes
    maintainer.write("dvc.yaml", COLLAB_PIPELINE)
    maintainer.write("params.yaml", "gen:\n  n: 3\nfit:\n  k: 1\n")
    maintainer.write("gpu.py", GPU_PY)
    maintainer.write("fit.py", FIT_PY)
    # As in the project's .gitignore: the acceptance is personal and never committed.
    maintainer.write(".gitignore", "fit_runs.log\n/.dvc/agreement.local.json\n")
    maintainer.dvc("repro", "-q", env={**maintainer.env, "HAVE_GPU": "1"})
    _local_credentials(maintainer, "private")
    _accept(maintainer.root)
    pushed = maintainer.cli("push", "--run-cache")  # = make push-private
    assert pushed.returncode == 0, pushed.stderr
    assert _md5("synthetic 0\n") in s3.md5s(private)
    # The uncached metrics file travels too: without it the run-cache entry cannot be restored.
    assert "run-cache outputs: " in pushed.stderr
    assert _md5('{"k": 1, "images": 3}') in s3.md5s(private)
    maintainer.run("git", "add", "-A")
    maintainer.run("git", "-c", "user.name=M", "-c", "user.email=m@example.org", "commit", "-qm", "gpu run")

    collab = Repo(tmp_path / "collab", maintainer.env)
    maintainer.run("git", "clone", "-q", str(maintainer.root), str(collab.root))
    assert not (collab.root / "gen").exists() and not (collab.root / "model.bin").exists()
    local = collab.root / ".dvc" / "config.local"
    for name in ("public", "private"):
        _set_config(local, f'remote "{name}"', endpointurl=s3.endpoint)
    _local_credentials(collab, "private")
    return maintainer, collab, private


def _ran(proc: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr)


def _clean(repo: Repo) -> bool:
    return "Data and pipelines are up to date" in repo.dvc("status").stdout


@pytest.mark.e2e
def test_collaborator_reproduce_refuses_without_agreement_then_reproduces(gpu_pushed, requests_seen):
    _, collab, private = gpu_pushed

    # Without the recorded acceptance: refused before DVC opens a connection.
    requests_seen.clear()
    refused = collab.cli("reproduce")
    assert refused.returncode == 2, refused.stderr
    assert "AGREEMENT.md has not been accepted" in refused.stderr
    assert "not access control" in refused.stderr
    assert [line for line in requests_seen if f"/{private}" in line] == []
    assert not (collab.root / "gen").exists() and not (collab.root / ".dvc" / "cache").exists()

    # Accepted: everything pushed comes from the remote, nothing runs (the GPU stage would fail).
    _accept(collab.root)
    done = collab.cli("reproduce")
    assert done.returncode == 0, done.stdout + done.stderr
    assert _ran(done) == []
    assert _object_requests(requests_seen, private), "the pull must have fetched objects"
    assert sorted(p.name for p in (collab.root / "gen").iterdir()) == ["0.txt", "1.txt", "2.txt"]
    assert (collab.root / "model.bin").read_text() == "model k=1 on 3 images\n"
    assert not (collab.root / "fit_runs.log").exists()
    assert _clean(collab)
    # The in-memory default remote of `reproduce` is not written anywhere.
    assert "remote = private" not in (collab.root / ".dvc" / "config.local").read_text()

    # A downstream parameter changes: fit runs on the pulled outputs, gpu does not.
    collab.write("params.yaml", "gen:\n  n: 3\nfit:\n  k: 2\n")
    done = collab.cli("reproduce")
    assert done.returncode == 0, done.stdout + done.stderr
    assert _ran(done) == ["fit"]
    assert json.loads((collab.root / "metrics.json").read_text()) == {"k": 2, "images": 3}

    # Back to the maintainer's value: the run-cache restores fit without running it.
    collab.write("params.yaml", "gen:\n  n: 3\nfit:\n  k: 1\n")
    done = collab.cli("reproduce")
    assert done.returncode == 0, done.stdout + done.stderr
    assert _ran(done) == [] and "is cached - skipping run" in done.stdout + done.stderr
    assert (collab.root / "fit_runs.log").read_text() == "k=2\n"
    assert (collab.root / "model.bin").read_text() == "model k=1 on 3 images\n"
    assert json.loads((collab.root / "metrics.json").read_text()) == {"k": 1, "images": 3}

    # A failing stage: DVC deletes its outputs before running it; the git-tracked metrics file
    # comes back from git, and the failure is reported as such.
    collab.write("params.yaml", "gen:\n  n: 3\nfit:\n  k: -1\n")
    failed = collab.cli("reproduce")
    assert failed.returncode == 1
    assert "fit refuses a negative k" in failed.stdout + failed.stderr
    assert "Restored from git" in failed.stderr and "metrics.json" in failed.stderr
    assert json.loads((collab.root / "metrics.json").read_text()) == {"k": 1, "images": 3}

    # Changing the GPU stage's own parameter really needs the GPU: it is tried and fails.
    collab.write("params.yaml", "gen:\n  n: 4\nfit:\n  k: 1\n")
    refused = collab.cli("reproduce")
    assert refused.returncode == 1
    assert "gpu stage ran on a machine without a GPU" in refused.stdout + refused.stderr


@pytest.mark.e2e
def test_collaborator_reproduce_recomputes_only_what_the_remote_lacks(gpu_pushed, s3):
    _, collab, private = gpu_pushed
    # The model's object is gone from the bucket (deleted on request, say): fit must run again,
    # on the pulled GPU outputs; the GPU stage must not.
    model = _md5("model k=1 on 3 images\n")
    client = s3.client()
    client.delete_object(Bucket=private, Key=f"dvcstore/files/md5/{model[:2]}/{model[2:]}")
    _accept(collab.root)
    done = collab.cli("reproduce")
    assert done.returncode == 0, done.stdout + done.stderr
    assert _ran(done) == ["fit"]
    assert "model.bin" in done.stderr  # named as not on the remote
    assert (collab.root / "model.bin").read_text() == "model k=1 on 3 images\n"
    assert (collab.root / "fit_runs.log").read_text() == "k=1\n"
    assert _clean(collab)


def test_every_cached_output_of_the_pipeline_has_a_remote():
    assert private_remote.outputs_without_remote(REPO_ROOT) == []
    routed = {o.path for o in private_remote.private_outputs(REPO_ROOT)}
    assert {"data/allocation/plan.tsv", "data/allocation/allocation.tsv", "metrics/compare.md"} <= routed


# --------------------------------------------------------------------------- units (no DVC subprocess)


@pytest.fixture
def bare(tmp_path, monkeypatch) -> Path:
    """A directory that looks like a DVC repo to dvc.config, with user config isolated."""
    for var in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DVC_GLOBAL_CONFIG_DIR", str(tmp_path / "g"))
    monkeypatch.setenv("DVC_SYSTEM_CONFIG_DIR", str(tmp_path / "s"))
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("['remote \"private\"']\n    url = s3://b/p\n")
    shutil.copy(REPO_ROOT / "AGREEMENT.md", tmp_path / "AGREEMENT.md")
    return tmp_path


def _aws_env(tmp: Path, **extra: str) -> dict[str, str]:
    return {
        "HOME": str(tmp),
        "AWS_CONFIG_FILE": str(tmp / "aws_config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "aws_credentials"),
        **extra,
    }


def test_find_credentials_sources(bare):
    env = _aws_env(bare)
    with pytest.raises(private_remote.PrivateRemoteError, match="no S3 credentials"):
        private_remote.find_credentials(bare, env=env)
    assert "environment" in private_remote.find_credentials(
        bare, env={**env, "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "s"}
    )
    with pytest.raises(private_remote.PrivateRemoteError, match="AWS_PROFILE='nope' is not a profile"):
        private_remote.find_credentials(bare, env={**env, "AWS_PROFILE": "nope"})
    (bare / "aws_config").write_text("[profile medic]\nregion = eu-west-1\n")
    assert "'medic'" in private_remote.find_credentials(bare, env={**env, "AWS_PROFILE": "medic"})
    (bare / ".dvc" / "config.local").write_text("['remote \"private\"']\n    access_key_id = id\n")
    with pytest.raises(
        private_remote.PrivateRemoteError, match="config.local: remote 'private' has only one"
    ):
        private_remote.find_credentials(bare, env=env)
    (bare / ".dvc" / "config.local").write_text(
        "['remote \"private\"']\n    access_key_id = id\n    secret_access_key = s\n"
    )
    assert "config.local" in private_remote.find_credentials(bare, env=env)


def test_find_credentials_refuses_secrets_in_committed_config(bare):
    with (bare / ".dvc" / "config").open("a") as fh:
        fh.write("    secret_access_key = oops\n")
    with pytest.raises(
        private_remote.PrivateRemoteError,
        match=r"config: remote 'private' has secret_access_key in the committed",
    ):
        private_remote.find_credentials(
            bare, env=_aws_env(bare, AWS_ACCESS_KEY_ID="i", AWS_SECRET_ACCESS_KEY="s")
        )


def test_find_credentials_unknown_remote(bare):
    with pytest.raises(private_remote.PrivateRemoteError, match="no DVC remote named 'other'"):
        private_remote.find_credentials(bare, "other", env=_aws_env(bare))


def test_acceptance_is_tied_to_the_agreement_text(bare):
    assert not agreement.check(bare).accepted
    with pytest.raises(agreement.AgreementError, match="has not been accepted"):
        agreement.require(bare)
    record = agreement.accept(
        bare, name=" Ada ", contact="ada@example.org", purpose="humanitarian research"
    )
    assert record.name == "Ada"
    assert agreement.require(bare) == record
    # CRLF checkouts hash the same; any change of wording does not.
    text = (bare / "AGREEMENT.md").read_bytes()
    (bare / "AGREEMENT.md").write_bytes(text.replace(b"\n", b"\r\n"))
    assert agreement.check(bare).accepted
    (bare / "AGREEMENT.md").write_bytes(text + b"\n## 8. New clause\n")
    status = agreement.check(bare)
    assert not status.accepted and "changed since Ada accepted it" in status.reason
    with pytest.raises(agreement.AgreementError, match="re-accept"):
        agreement.require(bare)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": ""}, "name must not be empty"),
        ({"contact": "a\nb"}, "contact must be a single line"),
        ({"purpose": "test"}, "purpose 'test' is too short"),
    ],
)
def test_accept_rejects_bad_fields(bare, fields, message):
    kwargs = {"name": "Ada", "contact": "ada@example.org", "purpose": "humanitarian research", **fields}
    with pytest.raises(agreement.AgreementError, match=message):
        agreement.accept(bare, **kwargs)
    assert not (bare / agreement.ACCEPTANCE_FILE).exists()


def test_malformed_acceptance_names_the_file(bare):
    path = bare / agreement.ACCEPTANCE_FILE
    path.write_text("{not json")
    with pytest.raises(agreement.AgreementError, match=r"agreement\.local\.json: not valid JSON"):
        agreement.check(bare)
    path.write_text(json.dumps({"name": "Ada", "contact": "", "purpose": "p", "date": "2026-01-01"}))
    with pytest.raises(
        agreement.AgreementError, match="missing or empty field.*contact, agreement_sha256"
    ):
        agreement.check(bare)


def test_select_targets_expands_matrix_groups_and_stage_files():
    outs = [
        private_remote.PrivateOutput("models/aug-resnet50", "train@aug-resnet50"),
        private_remote.PrivateOutput("models/aug-mobilenet", "train@aug-mobilenet"),
        private_remote.PrivateOutput("data/synthetic", "gen/dvc.yaml:generate"),
    ]
    root = Path.cwd()
    assert private_remote.select_targets(root, ["train"], outs) == [
        "models/aug-resnet50",
        "models/aug-mobilenet",
    ]
    assert private_remote.select_targets(root, ["dvc.yaml:train@aug-mobilenet"], outs) == [
        "models/aug-mobilenet"
    ]
    assert private_remote.select_targets(root, ["gen/dvc.yaml:generate"], outs) == ["data/synthetic"]
    assert private_remote.select_targets(root, [], outs) == [o.path for o in outs]
    with pytest.raises(private_remote.PrivateRemoteError, match="'generate' is not an output routed"):
        private_remote.select_targets(root, ["generate"], outs)  # lives in gen/dvc.yaml, not ./dvc.yaml


SHARD_PIPELINE = """\
stages:
  render:
    cmd: python make_shards.py
    deps:
      - make_shards.py
    outs:
      - images:
          remote: private
      - manifest.tsv:
          remote: private
"""

# Writes shards the way generate does (medicsynth.shards.ShardWriter), and a manifest of references.
MAKE_SHARDS = """\
from pathlib import Path
from medicsynth.manifest import member_ref
from medicsynth.shards import shard_keys, write_shards

paths = write_shards([(f"img_{i:03d}", {"jpg": bytes([i]) * (100 + i)}) for i in range(7)], "images",
                     "synthetic", per_shard=3)
Path("manifest.tsv").write_text("file\\n" + "".join(member_ref(p, f"{k}.jpg") + "\\n"
                                                    for p in paths for k in shard_keys(p)))
"""


@pytest.mark.e2e
def test_private_push_and_pull_of_a_shard_output(remotes, s3):
    """A stage output of tar shards is an ordinary DVC directory: one object per shard goes to
    the private bucket, and after a wipe the private pull restores shards every reference reads."""
    from medicsynth.shards import read_image_bytes

    repo, public, private = remotes
    repo.write("dvc.yaml", SHARD_PIPELINE)
    repo.write("make_shards.py", MAKE_SHARDS)
    repo.dvc("repro", "-q")
    shards_before = sorted(p.name for p in (repo.root / "images").iterdir())
    assert shards_before == ["synthetic-000000.tar", "synthetic-000001.tar", "synthetic-000002.tar"]
    before = _digests(repo.root, ["images", "manifest.tsv"])
    _local_credentials(repo, "private")
    _accept(repo.root)

    pushed = repo.cli("push")
    assert pushed.returncode == 0, pushed.stderr
    shard_md5s = {hashlib.md5((repo.root / "images" / n).read_bytes()).hexdigest() for n in shards_before}
    assert shard_md5s <= s3.md5s(private) and s3.md5s(public) == set()

    repo.wipe("images", "manifest.tsv")
    pulled = repo.cli("pull", "render")
    assert pulled.returncode == 0, pulled.stderr
    assert _digests(repo.root, ["images", "manifest.tsv"]) == before
    refs = (repo.root / "manifest.tsv").read_text().split("\n")[1:-1]
    assert [read_image_bytes(repo.root / r) for r in refs] == [bytes([i]) * (100 + i) for i in range(7)]
