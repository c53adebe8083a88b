"""Push and pull the private artifacts (DVC remote ``private``) behind the data agreement.

Synthetic images, captions grounded on real photographs and trained models are derived from
MEDIC (CC BY-NC-SA 4.0) and describe real people, so they live on an S3 remote that is not
public. In ``dvc.yaml`` every cached output carries ``remote: private`` (no default remote is
configured, so an output without one would be moved by nobody: :func:`outputs_without_remote`).
This module is the front door to that remote:

- it refuses unless ``AGREEMENT.md`` is accepted on this machine for its current text
  (:mod:`medicsynth.agreement`) and S3 credentials are available;
- it lists the outputs routed to ``private`` from DVC's own view of the pipeline
  (``dvc.yaml`` with templating/foreach resolved, and ``.dvc`` files), so targets are exact;
- it runs the real ``dvc pull/push -r private`` on exactly those targets. Passing targets
  matters: ``-r private`` without targets would also send or fetch outputs that belong to
  the default remote.

Credentials are only checked for presence, never printed, copied or stored; DVC and
botocore read them again from ``.dvc/config.local`` or the environment.

The gate is a *recorded acceptance* of the agreement, not access control: access is the S3
credentials a maintainer issues after it. Plain ``dvc pull``/``dvc repro --pull`` honour
``remote: private`` too and do not look at the acceptance; the commands here are the ones the
documentation gives.

CLI::

    python -m medicsynth.private_remote status
    python -m medicsynth.private_remote pull [targets...] [-j N] [--run-cache]
    python -m medicsynth.private_remote push [targets...] [-j N] [--run-cache]
    python -m medicsynth.private_remote reproduce [-j N]     # collaborators: pull, then repro

Exit codes: 0 done (or ``status`` all green); 1 DVC itself failed (or ``status`` found a
problem); 2 refused before any data moved (agreement, credentials, targets, config).
"""

from __future__ import annotations

import argparse
import configparser
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from medicsynth import agreement

REMOTE = "private"
# Remote options that are secrets: they belong in .dvc/config.local, never in .dvc/config.
SECRET_OPTIONS = ("access_key_id", "secret_access_key", "session_token")
# Substrings of DVC/botocore errors that mean "the store rejected who you are", as opposed to
# missing objects or network trouble; used only to add a hint to DVC's own message.
AUTH_FAILURE_MARKERS = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "Forbidden",
    "403",
    "ExpiredToken",
    "InvalidToken",
    "Unable to locate credentials",
    "NoCredentialsError",
)


class PrivateRemoteError(RuntimeError):
    """A refusal or a misconfiguration, with a message meant for the person at the terminal."""


class DvcCommandError(PrivateRemoteError):
    """The gate passed but ``dvc pull/push`` itself failed (its own error is printed above)."""


@dataclass(frozen=True)
class PrivateOutput:
    """One DVC-tracked output routed to the private remote."""

    path: str  # relative to the repository root, POSIX separators
    stage: str  # DVC stage address: "generate", "sub/dvc.yaml:train", "data/x.dvc"


# --------------------------------------------------------------------------- credentials


def _dvc_config_levels(root: Path) -> dict[str, tuple[str, dict]]:
    """Per-level DVC config: level -> (file, parsed dict). Levels: system, global, repo, local."""
    from dvc.config import Config, ConfigError

    try:
        config = Config(dvc_dir=str(root / ".dvc"), validate=False)
        return {level: (config.files[level], config.load_one(level)) for level in Config.LEVELS}
    except ConfigError as exc:
        raise PrivateRemoteError(f"cannot read DVC config under {root / '.dvc'}: {exc}") from None


def _profile_exists(profile: str, env: Mapping[str, str]) -> bool:
    home = Path(env.get("HOME", str(Path.home())))
    files = (
        (Path(env.get("AWS_SHARED_CREDENTIALS_FILE", home / ".aws" / "credentials")), profile),
        (
            Path(env.get("AWS_CONFIG_FILE", home / ".aws" / "config")),
            profile if profile == "default" else f"profile {profile}",
        ),
    )
    for path, section in files:
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except configparser.Error as exc:
            raise PrivateRemoteError(f"{path}: cannot parse AWS config ({exc})") from None
        if parser.has_section(section):
            return True
    return False


def _default_profile_has_keys(env: Mapping[str, str]) -> Path | None:
    home = Path(env.get("HOME", str(Path.home())))
    path = Path(env.get("AWS_SHARED_CREDENTIALS_FILE", home / ".aws" / "credentials"))
    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error:
        return None
    if parser.has_option("default", "aws_access_key_id") and parser.has_option(
        "default", "aws_secret_access_key"
    ):
        return path
    return None


def find_credentials(
    root: str | Path, remote: str = REMOTE, env: Mapping[str, str] | None = None
) -> str:
    """Describe where DVC will find S3 credentials for ``remote``; never returns the secret.

    Accepted, in the order dvc-s3/botocore use them: keys, ``profile`` or ``credentialpath``
    set for the remote in ``.dvc/config.local`` (or the user's global/system DVC config);
    ``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY`` in the environment; ``AWS_PROFILE``
    naming an existing profile; keys in the ``[default]`` profile of the shared credentials
    file. Instance roles and SSO without a profile are not detected (use a profile).

    Raises :class:`PrivateRemoteError` if none is found, if a source is half-configured, or
    if secrets sit in the committed ``.dvc/config``.
    """
    root = Path(root)
    env = os.environ if env is None else env
    levels = _dvc_config_levels(root)

    repo_file, repo_conf = levels["repo"]
    if remote not in repo_conf.get("remote", {}):
        known = sorted(set().union(*(conf.get("remote", {}) for _, conf in levels.values())))
        if remote not in known:
            raise PrivateRemoteError(
                f"no DVC remote named {remote!r} (known: {', '.join(known) or 'none'}); "
                f"add it with `dvc remote add {remote} s3://BUCKET/PATH`"
            )
    leaked = [opt for opt in SECRET_OPTIONS if repo_conf.get("remote", {}).get(remote, {}).get(opt)]
    if leaked:
        raise PrivateRemoteError(
            f"{repo_file}: remote {remote!r} has {', '.join(leaked)} in the committed config; "
            f"move it with `dvc remote modify --local {remote} {leaked[0]} ...`, remove it with "
            f"`dvc remote modify --unset {remote} {leaked[0]}`, and rotate the key"
        )

    for level in ("local", "global", "system"):
        path, conf = levels[level]
        options = conf.get("remote", {}).get(remote, {})
        has_id, has_secret = bool(options.get("access_key_id")), bool(options.get("secret_access_key"))
        if has_id and has_secret:
            return f"access_key_id/secret_access_key for remote {remote!r} in {path}"
        if has_id != has_secret:
            missing = "secret_access_key" if has_id else "access_key_id"
            raise PrivateRemoteError(
                f"{path}: remote {remote!r} has only one of access_key_id/secret_access_key; "
                f"set {missing} with `dvc remote modify --local {remote} {missing} ...`"
            )
        if options.get("credentialpath"):
            credpath = Path(options["credentialpath"]).expanduser()
            if not credpath.is_file():
                raise PrivateRemoteError(
                    f"{path}: credentialpath {credpath} for remote {remote!r} does not exist"
                )
            return f"credentialpath {credpath} for remote {remote!r} in {path}"
        if options.get("profile"):
            if not _profile_exists(options["profile"], env):
                raise PrivateRemoteError(
                    f"{path}: profile {options['profile']!r} for remote {remote!r} is not in the AWS "
                    "credentials or config file"
                )
            return f"AWS profile {options['profile']!r} for remote {remote!r} in {path}"

    has_id, has_secret = bool(env.get("AWS_ACCESS_KEY_ID")), bool(env.get("AWS_SECRET_ACCESS_KEY"))
    if has_id and has_secret:
        return "environment variables AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    if has_id != has_secret:
        present, missing = (
            ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
            if has_id
            else ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
        )
        raise PrivateRemoteError(f"environment has {present} but not {missing}")
    if env.get("AWS_PROFILE"):
        if not _profile_exists(env["AWS_PROFILE"], env):
            raise PrivateRemoteError(
                f"AWS_PROFILE={env['AWS_PROFILE']!r} is not a profile in the AWS credentials "
                "or config file"
            )
        return f"AWS profile {env['AWS_PROFILE']!r} from AWS_PROFILE"
    default_file = _default_profile_has_keys(env)
    if default_file is not None:
        return f"[default] profile in {default_file}"

    raise PrivateRemoteError(
        f"no S3 credentials for DVC remote {remote!r}. "
        "Ask the maintainers for an access key, then either\n"
        f"  dvc remote modify --local {remote} access_key_id YOUR_KEY_ID\n"
        f"  dvc remote modify --local {remote} secret_access_key YOUR_SECRET\n"
        "or export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE). "
        "See docs/PRIVATE_REMOTE.md."
    )


# --------------------------------------------------------------------------- outputs


def private_outputs(root: str | Path, remote: str = REMOTE) -> list[PrivateOutput]:
    """Outputs DVC routes to ``remote``: those with ``remote: <remote>`` in ``dvc.yaml`` or a
    ``.dvc`` file, plus outputs without a ``remote`` key when ``remote`` is the default.

    Read through DVC's index, so ``foreach``/``matrix`` stages and ``${}`` templating are
    resolved exactly as ``dvc repro`` resolves them.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    root = Path(root).resolve()
    found: dict[str, PrivateOutput] = {}
    try:
        with Repo(str(root)) as repo:
            default = repo.config["core"].get("remote")
            for out in repo.index.outs:
                target = out.remote or default
                if target != remote or not out.is_in_repo:
                    continue
                rel = Path(os.path.relpath(out.fs_path, root)).as_posix()
                found.setdefault(rel, PrivateOutput(path=rel, stage=_stage_address(out.stage, root)))
    except DvcException as exc:
        raise PrivateRemoteError(f"cannot read the DVC pipeline under {root}: {exc}") from None
    return sorted(found.values(), key=lambda o: o.path)


def outputs_without_remote(root: str | Path) -> list[PrivateOutput]:
    """Cached outputs that name no ``remote:`` while no default remote is configured.

    Such an output is pushed by nobody and pulled by nobody: ``make pull-private`` and
    ``make reproduce-private`` only move outputs routed to ``private``, and plain
    ``dvc pull`` has no default remote to use. Every cached output here should be routed
    deliberately; ``make private-status`` lists offenders and a test keeps the list empty.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    root = Path(root).resolve()
    found: dict[str, PrivateOutput] = {}
    try:
        with Repo(str(root)) as repo:
            if repo.config["core"].get("remote"):
                return []
            for out in repo.index.outs:
                if out.use_cache and not out.remote and out.is_in_repo:
                    rel = Path(os.path.relpath(out.fs_path, root)).as_posix()
                    found.setdefault(rel, PrivateOutput(rel, _stage_address(out.stage, root)))
    except DvcException as exc:
        raise PrivateRemoteError(f"cannot read the DVC pipeline under {root}: {exc}") from None
    return sorted(found.values(), key=lambda o: o.path)


def _stage_address(stage, root: Path) -> str:
    # DVC's own ``stage.addressing`` is relative to the current directory; ours to the root, so
    # the same stage reads the same wherever the CLI is started.
    dvcfile = Path(os.path.relpath(stage.path, root)).as_posix()
    name = getattr(stage, "name", None)
    if not name:
        return dvcfile
    return name if dvcfile == "dvc.yaml" else f"{dvcfile}:{name}"


def _stage_aliases(address: str) -> set[str]:
    """Names a person may use for a stage: "train@a-b", "dvc.yaml:train@a-b", and for
    foreach/matrix stages the group "train", as ``dvc pull train`` accepts."""
    if address.endswith(".dvc"):
        return {address}
    dvcfile, sep, name = address.rpartition(":")
    if not sep:
        dvcfile, name = "dvc.yaml", address
    aliases = set()
    for alias in {name, name.split("@", 1)[0]}:
        aliases.add(f"{dvcfile}:{alias}")
        if dvcfile == "dvc.yaml":
            aliases.add(alias)
    return aliases


def select_targets(
    root: str | Path,
    targets: Sequence[str],
    outputs: Sequence[PrivateOutput],
    remote: str = REMOTE,
) -> list[str]:
    """Map user targets onto private output paths (relative to ``root``).

    A target may be a private output path (relative to the current directory), a file or
    folder inside a private directory output, or a stage address; a stage expands to its
    private outputs. No targets means all private outputs. Anything else is refused rather
    than passed on, because ``dvc pull -r private`` on a non-private output would look for
    it in the wrong bucket.
    """
    root = Path(root).resolve()
    if not targets:
        return [o.path for o in outputs]
    selected: list[str] = []
    for target in targets:
        by_stage = [o.path for o in outputs if target in _stage_aliases(o.stage)]
        if by_stage:
            selected.extend(by_stage)
            continue
        rel = Path(os.path.relpath(Path(target).resolve(), root)).as_posix()
        if any(rel == o.path or rel.startswith(o.path.rstrip("/") + "/") for o in outputs):
            selected.append(rel)
            continue
        listing = "\n".join(f"  {o.path}  (stage {o.stage})" for o in outputs) or "  (none)"
        raise PrivateRemoteError(
            f"target {target!r} is not an output routed to remote {remote!r}; "
            f"private outputs are:\n{listing}"
        )
    return list(dict.fromkeys(selected))


# --------------------------------------------------------------------------- running dvc


def gate(root: str | Path, remote: str = REMOTE) -> str:
    """Check, without any network access, that this machine may use ``remote``.

    First the recorded acceptance of the current ``AGREEMENT.md``
    (:func:`medicsynth.agreement.require`): someone who has not accepted should not be nudged
    towards getting keys. Then that S3 credentials are configured (:func:`find_credentials`).
    Returns where the credentials come from. Raises :class:`medicsynth.agreement.AgreementError`
    or :class:`PrivateRemoteError`; nothing has been sent to or requested from the remote when
    it raises.
    """
    root = Path(root).resolve()
    agreement.require(root)
    return find_credentials(root, remote)


def _run_dvc(args: Sequence[str], root: Path) -> tuple[int, str]:
    """Run ``python -m dvc ARGS`` in ``root``, echoing its output and keeping its tail."""
    cmd = [sys.executable, "-m", "dvc", *args]
    tail = bytearray()
    with subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read1(8192), b""):
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            tail += chunk
            del tail[:-65536]
        code = proc.wait()
    return code, tail.decode("utf-8", "replace")


def transfer(
    command: str,
    root: str | Path,
    targets: Sequence[str] = (),
    *,
    remote: str = REMOTE,
    jobs: int | None = None,
    run_cache: bool = False,
) -> int:
    """Gate, then ``dvc pull|push -r <remote>`` the selected private outputs; returns 0.

    Raises :class:`PrivateRemoteError` (or :class:`medicsynth.agreement.AgreementError`) for a
    refusal, before any data moves, and :class:`DvcCommandError` if DVC itself fails (DVC's
    transfers are content-addressed, so simply running again resumes).
    """
    if command not in ("pull", "push"):
        raise ValueError(f"command must be 'pull' or 'push', got {command!r}")
    root = Path(root).resolve()
    source = gate(root, remote)
    outputs = private_outputs(root, remote)
    if not outputs:
        print(
            f"no outputs are routed to remote {remote!r} (remote: {remote} in dvc.yaml); "
            f"nothing to {command}"
        )
        return 0
    selected = select_targets(root, targets, outputs, remote)
    print(
        f"{command} {len(selected)} private output(s) via remote {remote!r}; credentials: {source}",
        file=sys.stderr,
    )
    args = [command, "-r", remote]
    if jobs:
        args += ["-j", str(jobs)]
    if run_cache:
        args.append("--run-cache")
    code, tail = _run_dvc([*args, "--", *selected], root)
    if code != 0:
        raise DvcCommandError(f"`dvc {' '.join(args)}` failed with exit code {code}.{_auth_hint(tail, source)}")
    if command == "push" and run_cache:
        try:
            pushed, absent = push_run_cache_outputs(root, remote, jobs=jobs)
        except Exception as exc:  # DVC/botocore raise many types; the message is what matters
            raise DvcCommandError(
                f"pushing the run-cache's outputs failed: {exc}.{_auth_hint(str(exc), source)}"
            ) from None
        print(
            f"run-cache outputs: {pushed} object(s) pushed"
            + (f"; {absent} no longer in the local cache, not pushed" if absent else ""),
            file=sys.stderr,
        )
    return 0


@dataclass
class ReproduceReport:
    """What :func:`reproduce` did.

    - ``not_on_remote``: private outputs the remote could not provide (never pushed, or
      deleted); their stages were reproduced here instead.
    - ``reproduced``: addresses of the stages DVC ran or restored from the run-cache, in order.
    - ``restored``: git-tracked files (metrics, plots) that a failed stage deleted and that
      were put back from git, so a failure never leaves tracked results missing.
    """

    not_on_remote: list[str]
    reproduced: list[str]
    restored: list[str]


def reproduce(root: str | Path, *, remote: str = REMOTE, jobs: int | None = None) -> ReproduceReport:
    """The collaborator's command: gate, pull every private output, reproduce the rest.

    Works on a fresh clone with nothing pulled. Steps:

    1. **gate** (:func:`gate`): the recorded acceptance of the current ``AGREEMENT.md`` and S3
       credentials, checked before DVC opens any connection, so a refusal requests nothing
       from the remote.
    2. **pull** every output routed to ``remote`` as a whole (directory outputs with all
       their files, the run-cache entries too), tolerating objects the remote lacks. Whole
       outputs matter: a stage's directory dependency that holds only part of its files (or
       only DVC's ``.gitignore``) is "modified", not "missing", to DVC, and the stage would
       run on it and fail.
    3. **reproduce what could not be pulled**: the stages whose outputs the remote lacked,
       with their upstream as needed (``dvc repro`` of those stages, no pulling).
    4. **reproduce the pipeline** with ``remote`` as the default remote *in memory only*
       (``Repo(remote=...)``; ``.dvc/config*`` are not touched): stages whose inputs changed
       are restored from the run-cache when someone already ran them (their outputs are
       pulled from ``remote``), else run. Nothing that was pushed for the current
       ``dvc.lock`` is recomputed.

    If a stage fails, git-tracked files it deleted (DVC removes a stage's outputs, including
    ``cache: false`` metrics, before running it) are restored from git before
    :class:`DvcCommandError` is raised. Refusals raise :class:`PrivateRemoteError` or
    :class:`medicsynth.agreement.AgreementError`.

    Parameters: ``root`` the repository root; ``remote`` the DVC remote name; ``jobs``
    parallel transfers (DVC's default if ``None``).
    """
    from dvc.exceptions import CheckoutError, DownloadError, DvcException
    from dvc.repo import Repo

    root = Path(root).resolve()
    # Step 1: gate. Everything above this line is local; nothing below runs without it.
    source = gate(root, remote)
    paths = [o.path for o in private_outputs(root, remote)]
    print(f"reproduce via remote {remote!r}; credentials: {source}", file=sys.stderr)
    tracked = _tracked_outputs_present(root)
    report = ReproduceReport(not_on_remote=[], reproduced=[], restored=[])
    try:
        with Repo(str(root), remote=remote) as repo:
            # Step 2: pull whole outputs; a missing object is not an error yet.
            if paths:
                try:
                    repo.fetch(targets=paths, remote=remote, jobs=jobs, run_cache=True)
                except DownloadError as exc:
                    print(f"{exc}; what is missing is reproduced below", file=sys.stderr)
                try:
                    repo.checkout(targets=paths)
                except CheckoutError:
                    pass  # listed below from the workspace itself
            missing = _missing_outputs(repo, root, paths)
            report.not_on_remote = [path for path, _ in missing]
            # Step 3: what the remote lacks is reproduced from its inputs (no pulling: the
            # remote has been asked already, and `repro --pull` fails on a missing object).
            stages = list(dict.fromkeys(stage for _, stage in missing))
            if stages:
                print(
                    "not restored from the remote (missing there, or changed here), reproducing: "
                    + ", ".join(report.not_on_remote),
                    file=sys.stderr,
                )
                done = repo.reproduce(targets=stages)
                report.reproduced += [s.addressing for s in done]
            # Step 4: the whole pipeline, run-cache restores pulled from `remote`.
            done = repo.reproduce(pull=True)
            report.reproduced += [s.addressing for s in done if s.addressing not in report.reproduced]
    except BaseException as exc:  # a stage's failure, or Ctrl-C while it runs
        report.restored = _restore_deleted(root, tracked)
        if not isinstance(exc, DvcException):
            raise
        restored = (
            f" Restored from git what the failed stage had deleted: {', '.join(report.restored)}."
            if report.restored
            else ""
        )
        causes, cause = [], exc.__cause__
        while cause is not None:  # DVC wraps the stage's own error ("failed to reproduce 'x'")
            causes.append(str(cause))
            cause = cause.__cause__
        message = ": ".join([str(exc), *causes])
        raise DvcCommandError(f"reproducing failed: {message}.{restored}{_auth_hint(message, source)}") from None
    return report


def _missing_outputs(repo, root: Path, paths: Sequence[str]) -> list[tuple[str, str]]:
    """(path, stage address) of the private outputs not in the workspace as ``dvc.lock`` says."""
    wanted = set(paths)
    missing = []
    for out in repo.index.outs:
        rel = Path(os.path.relpath(out.fs_path, root)).as_posix()
        if rel in wanted and out.use_cache and out.status():
            missing.append((rel, out.stage.addressing))
    return sorted(missing)


def _git_tracked(root: Path) -> list[str]:
    proc = subprocess.run(
        ["git", "ls-files", "-z"], cwd=root, capture_output=True, check=False
    )
    if proc.returncode != 0:
        return []  # not a git checkout: nothing tracked to protect
    return [p for p in proc.stdout.decode("utf-8", "replace").split("\0") if p]


def _tracked_outputs_present(root: Path) -> list[str]:
    """Git-tracked files that are (inside) outputs of pipeline stages and exist now."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        outs = [Path(os.path.relpath(o.fs_path, root)).as_posix() for o in repo.index.outs]
    def is_output(rel: str) -> bool:
        return any(rel == o or rel.startswith(o.rstrip("/") + "/") for o in outs)
    return [rel for rel in _git_tracked(root) if is_output(rel) and (root / rel).is_file()]


def _restore_deleted(root: Path, present_before: Sequence[str]) -> list[str]:
    """``git checkout`` the files of ``present_before`` that are gone; returns them."""
    gone = [rel for rel in present_before if not (root / rel).exists()]
    if gone:
        subprocess.run(["git", "checkout", "--", *gone], cwd=root, check=False)
    return [rel for rel in gone if (root / rel).exists()]


def _auth_hint(text: str, source: str) -> str:
    if not any(marker in text for marker in AUTH_FAILURE_MARKERS):
        return ""
    return (
        f" The store rejected the credentials ({source}): check the key id and secret, "
        "that the key is active, and that it has access to the bucket."
    )


def push_run_cache_outputs(root: str | Path, remote: str = REMOTE, *, jobs: int | None = None) -> tuple[int, int]:
    """Push every object the local run-cache entries refer to; returns ``(pushed, absent)``.

    ``dvc push --run-cache`` uploads the run-cache entries (``runs/``) and the objects of the
    targets it is given, but not the objects of ``cache: false`` outputs (metrics, plots) that
    DVC commits to the local cache only for the run-cache. Without those a collaborator's
    ``dvc repro --pull`` finds the entry, cannot restore every output and runs the stage again
    (checked with dvc 3.67.1): every GPU stage here has such an output. Objects already on the
    remote are skipped by DVC's own status check; objects no longer in the local cache (after
    ``dvc gc``) are counted and left out.
    """
    from dvc.repo import Repo

    with Repo(str(Path(root).resolve())) as repo:
        runs = Path(repo.cache.legacy.path) / "runs"
        entries = [(p.parent.name, p.name) for p in sorted(runs.glob("*/*/*")) if p.is_file()]
        if not entries:
            return 0, 0
        objs = set()
        for found in repo.stage_cache.get_used_objs(entries, remote=remote).values():
            objs |= found
        present = {o for o in objs if _in_local_cache(repo, o)}
        result = repo.cloud.push(present, jobs=jobs, remote=remote)
        if result.failed:
            raise DvcCommandError(f"{len(result.failed)} run-cache object(s) failed to upload")
        return len(result.transferred), len(objs) - len(present)


def _in_local_cache(repo, hash_info) -> bool:
    odb = repo.cache.legacy if hash_info.name == "md5-dos2unix" else repo.cache.local
    return odb.exists(hash_info.value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medicsynth.private_remote",
        description=f"Push/pull outputs routed to the DVC remote {REMOTE!r}, after the data agreement.",
    )
    parser.add_argument("--root", help="repository root (default: nearest directory with .dvc/)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("pull", "push"):
        p = sub.add_parser(name, help=f"dvc {name} -r {REMOTE} for private outputs")
        p.add_argument("targets", nargs="*", help="private output paths or stage names (default: all)")
        p.add_argument("-j", "--jobs", type=int, help="parallel transfers (DVC's default if omitted)")
        p.add_argument("--run-cache", action="store_true", help=f"also {name} the run-cache")
    rep = sub.add_parser(
        "reproduce",
        help="collaborators: check the agreement, pull every private output (and the "
        "run-cache), reproduce what cannot be pulled",
    )
    rep.add_argument("-j", "--jobs", type=int, help="parallel transfers (DVC's default if omitted)")
    sub.add_parser("status", help="agreement, credentials and the list of private outputs")
    args = parser.parse_args(argv)

    try:
        root = Path(args.root).resolve() if args.root else agreement.find_root()
        if args.command == "status":
            return _status(root)
        if args.command == "reproduce":
            import logging

            from dvc.logger import setup

            # DVC's own console logging, as its CLI shows it ("Running stage ..."); importing
            # some DVC modules already installs it, and twice would print every line twice.
            if not logging.getLogger("dvc").handlers:
                setup()
            report = reproduce(root, jobs=args.jobs)
            print(
                f"done: {len(report.reproduced)} stage(s) reproduced or restored from the "
                f"run-cache ({', '.join(report.reproduced) or 'none'}); "
                f"{len(report.not_on_remote)} output(s) were not on the remote",
                file=sys.stderr,
            )
            return 0
        return transfer(args.command, root, args.targets, jobs=args.jobs, run_cache=args.run_cache)
    except DvcCommandError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    except (PrivateRemoteError, agreement.AgreementError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2


def _status(root: Path) -> int:
    ok = True
    try:
        state = agreement.check(root)
        print(f"agreement: {'accepted' if state.accepted else 'NOT accepted'} ({state.reason})")
        ok &= state.accepted
    except agreement.AgreementError as exc:
        print(f"agreement: UNUSABLE ({exc})")
        ok = False
    try:
        print(f"credentials: {find_credentials(root)}")
    except PrivateRemoteError as exc:
        print(f"credentials: MISSING ({exc})")
        ok = False
    try:
        outputs = private_outputs(root)
    except PrivateRemoteError as exc:
        print(f"private outputs: UNKNOWN ({exc})")
        return 1
    print(f"private outputs ({len(outputs)}):")
    for out in outputs:
        print(f"  {out.path}  (stage {out.stage})")
    unrouted = outputs_without_remote(root)
    if unrouted:
        ok = False
        print(f"cached outputs with no remote ({len(unrouted)}; add `remote: {REMOTE}` in dvc.yaml):")
        for out in unrouted:
            print(f"  {out.path}  (stage {out.stage})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
