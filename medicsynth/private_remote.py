"""Push and pull the private artifacts (DVC remote ``private``) behind the data agreement.

Synthetic images, captions grounded on real photographs and trained models are derived from
MEDIC (CC BY-NC-SA 4.0) and describe real people, so they live on an S3 remote that is not
public. In ``dvc.yaml`` such outputs carry ``remote: private``; everything else uses the
default remote. This module is the front door to that remote:

- it refuses unless ``AGREEMENT.md`` is accepted on this machine for its current text
  (:mod:`medicsynth.agreement`) and S3 credentials are available;
- it lists the outputs routed to ``private`` from DVC's own view of the pipeline
  (``dvc.yaml`` with templating/foreach resolved, and ``.dvc`` files), so targets are exact;
- it runs the real ``dvc pull/push -r private`` on exactly those targets. Passing targets
  matters: ``-r private`` without targets would also send or fetch outputs that belong to
  the default remote.

Credentials are only checked for presence, never printed, copied or stored; DVC and
botocore read them again from ``.dvc/config.local`` or the environment.

CLI::

    python -m medicsynth.private_remote status
    python -m medicsynth.private_remote pull [targets...] [-j N] [--run-cache]
    python -m medicsynth.private_remote push [targets...] [-j N] [--run-cache]

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
    # Agreement first: someone who has not accepted should not be nudged towards getting keys.
    agreement.require(root)
    source = find_credentials(root, remote)
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
    sub.add_parser("status", help="agreement, credentials and the list of private outputs")
    args = parser.parse_args(argv)

    try:
        root = Path(args.root).resolve() if args.root else agreement.find_root()
        if args.command == "status":
            return _status(root)
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
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
