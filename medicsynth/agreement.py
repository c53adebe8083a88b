"""Local record that a person accepted ``AGREEMENT.md`` before touching private artifacts.

Acceptance is personal, so it lives in a git-ignored file (``.dvc/agreement.local.json``) next
to ``.dvc/config.local``, which holds the equally personal remote credentials. The record
carries the SHA-256 of the agreement text it was given for: when ``AGREEMENT.md`` changes, the
old acceptance no longer counts and the person is asked to accept again.

This is a gate against accidents (pulling private data without having read the terms), not an
access control: access control is the S3 credentials.

CLI::

    python -m medicsynth.agreement accept          # on a terminal: asks name, contact, purpose
    python -m medicsynth.agreement accept --name "Ada L." --contact ada@example.org \\
        --purpose "non-commercial research on disaster image classification"
    python -m medicsynth.agreement status

Rules of an acceptance (:data:`RULES`): name, contact and purpose are single non-empty lines,
the purpose says what the data is for in at least ``MIN_PURPOSE_CHARS`` (10) characters, and
the text is confirmed by typing ``I agree`` (``--yes`` in scripts, after reading it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from medicsynth.io import write_json

AGREEMENT_FILE = "AGREEMENT.md"
ACCEPTANCE_FILE = ".dvc/agreement.local.json"
# Bumped only if the layout of the acceptance record changes.
RECORD_VERSION = 1
# Below this, a "purpose" is a placeholder ("x", "test"), not a statement.
MIN_PURPOSE_CHARS = 10


# Shown by `accept --help`, `make accept-agreement` and the interactive prompt.
RULES = (
    "name, contact (e-mail or another way to reach you) and purpose are single, non-empty "
    f"lines; the purpose states what you will use the data for, at least {MIN_PURPOSE_CHARS} "
    'characters; you confirm by typing "I agree" after the text is shown (--yes in scripts, '
    "after reading AGREEMENT.md)"
)


class AgreementError(RuntimeError):
    """The agreement is missing, not accepted, accepted for another version, or malformed."""


@dataclass(frozen=True)
class Acceptance:
    """One person's acceptance of one version of the agreement."""

    name: str
    contact: str
    purpose: str
    date: str  # ISO 8601 date (UTC) of acceptance
    agreement_sha256: str
    version: int = RECORD_VERSION


@dataclass(frozen=True)
class AgreementStatus:
    """Whether the acceptance on disk covers the agreement on disk, and why not."""

    accepted: bool
    reason: str
    current_sha256: str | None
    acceptance: Acceptance | None


def find_root(start: str | Path | None = None) -> Path:
    """The repository root: the nearest directory at or above ``start`` holding ``.dvc/``."""
    here = Path(start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / ".dvc").is_dir():
            return candidate
    raise AgreementError(f"{here}: not inside a DVC repository (no .dvc/ directory found above it)")


def agreement_sha256(root: str | Path) -> str:
    """SHA-256 of ``AGREEMENT.md`` with line endings normalised to ``\\n``.

    Normalising keeps the hash stable across checkouts with ``core.autocrlf``; any change of
    wording still changes it.
    """
    path = Path(root) / AGREEMENT_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AgreementError(f"{path}: agreement text not found") from None
    return hashlib.sha256(data.replace(b"\r\n", b"\n")).hexdigest()


def _clean(field: str, value: str) -> str:
    value = (value or "").strip()
    if not value:
        raise AgreementError(f"acceptance: {field} must not be empty")
    if any(ch in value for ch in "\r\n\t\0"):
        raise AgreementError(f"acceptance: {field} must be a single line, got {value!r}")
    return value


def accept(
    root: str | Path,
    *,
    name: str,
    contact: str,
    purpose: str,
    today: dt.date | None = None,
) -> Acceptance:
    """Record that ``name`` accepts the current ``AGREEMENT.md`` for ``purpose``.

    Overwrites an earlier acceptance (a newer version of the text, or a new purpose).
    Written atomically, so an interrupted run leaves either the old record or the new one.
    """
    root = Path(root)
    purpose = _clean("purpose", purpose)
    if len(purpose) < MIN_PURPOSE_CHARS:
        raise AgreementError(
            f"acceptance: purpose {purpose!r} is too short; state what you will use the data for "
            f"(at least {MIN_PURPOSE_CHARS} characters)"
        )
    record = Acceptance(
        name=_clean("name", name),
        contact=_clean("contact", contact),
        purpose=purpose,
        date=(today or dt.datetime.now(dt.UTC).date()).isoformat(),
        agreement_sha256=agreement_sha256(root),
    )
    write_json(asdict(record), root / ACCEPTANCE_FILE)
    return record


def load_acceptance(root: str | Path) -> Acceptance | None:
    """The acceptance record, ``None`` if there is none; a clear error if it is malformed."""
    path = Path(root) / ACCEPTANCE_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AgreementError(f"{path}: not valid JSON ({exc}); delete it and accept again") from None
    if not isinstance(raw, dict):
        raise AgreementError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    required = ("name", "contact", "purpose", "date", "agreement_sha256")
    missing = [key for key in required if not isinstance(raw.get(key), str) or not raw.get(key)]
    if missing:
        raise AgreementError(f"{path}: missing or empty field(s) {', '.join(missing)}; accept again")
    version = raw.get("version", RECORD_VERSION)
    if version != RECORD_VERSION:
        raise AgreementError(
            f"{path}: record version {version!r}, expected {RECORD_VERSION}; accept again"
        )
    return Acceptance(**{key: raw[key] for key in required}, version=version)


def check(root: str | Path) -> AgreementStatus:
    """Compare the acceptance record with the agreement text now in the repository."""
    root = Path(root)
    current = agreement_sha256(root)
    record = load_acceptance(root)
    if record is None:
        return AgreementStatus(
            False, f"{AGREEMENT_FILE} has not been accepted on this machine", current, None
        )
    if record.agreement_sha256 != current:
        return AgreementStatus(
            False,
            f"{AGREEMENT_FILE} changed since {record.name} accepted it on {record.date} "
            f"(accepted sha256 {record.agreement_sha256[:12]}…, current {current[:12]}…); "
            "read it again and re-accept",
            current,
            record,
        )
    return AgreementStatus(
        True, f"accepted by {record.name} <{record.contact}> on {record.date}", current, record
    )


def require(root: str | Path) -> Acceptance:
    """The acceptance covering the current agreement; else :class:`AgreementError` saying what to do."""
    status = check(root)
    if not status.accepted:
        raise AgreementError(
            f"{status.reason}. Read {AGREEMENT_FILE}, then run `make accept-agreement` (on a "
            "terminal it asks for your name, contact and purpose; in scripts pass "
            'NAME="..." CONTACT=... PURPOSE="..."). This is a recorded acceptance, not access '
            "control: access is the S3 key the maintainers issue after it."
        )
    assert status.acceptance is not None
    return status.acceptance


def ask_fields(
    name: str | None,
    contact: str | None,
    purpose: str | None,
    *,
    ask=input,
    say=print,
) -> tuple[str, str, str]:
    """Fill in the fields not given by asking for them, re-asking until each one is valid.

    ``ask(prompt) -> str`` reads one answer (``input`` on a terminal; a scripted function in
    tests), ``say(message)`` reports a rejected answer. Given fields are returned as they are
    (:func:`accept` validates them). The same rules as :func:`accept` apply to answers.
    """

    def valid(field: str, value: str) -> str:
        value = _clean(field, value)
        if field == "purpose" and len(value) < MIN_PURPOSE_CHARS:
            raise AgreementError(
                f"purpose {value!r} is too short: say what you will use the data for "
                f"(at least {MIN_PURPOSE_CHARS} characters)"
            )
        return value

    prompts = {
        "name": "Your name: ",
        "contact": "Contact (e-mail or another way to reach you): ",
        "purpose": f"Purpose (what you will use the data for, at least {MIN_PURPOSE_CHARS} characters): ",
    }
    given = {"name": name, "contact": contact, "purpose": purpose}
    for field, prompt in prompts.items():
        while not given[field]:
            try:
                given[field] = valid(field, ask(prompt))
            except AgreementError as exc:
                say(f"  {exc}")
    return given["name"], given["contact"], given["purpose"]  # type: ignore[return-value]


def _confirm(root: Path, assume_yes: bool) -> bool:
    if assume_yes:
        return True
    if not sys.stdin.isatty():
        print(
            "refusing to accept non-interactively without --yes; read AGREEMENT.md first",
            file=sys.stderr,
        )
        return False
    print((root / AGREEMENT_FILE).read_text(encoding="utf-8"))
    answer = input('Type "I agree" to accept these terms: ')
    return answer.strip().lower() == "i agree"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medicsynth.agreement", description="Accept AGREEMENT.md or show its status."
    )
    parser.add_argument("--root", help="repository root (default: nearest directory with .dvc/)")
    sub = parser.add_subparsers(dest="command", required=True)
    acc = sub.add_parser(
        "accept",
        help="record acceptance of the current AGREEMENT.md",
        description="Record acceptance of the current AGREEMENT.md. On a terminal, fields not "
        f"given as options are asked for. Rules: {RULES}.",
    )
    acc.add_argument("--name", help="your name (asked on a terminal if omitted)")
    acc.add_argument("--contact", help="e-mail or other way to reach you (asked if omitted)")
    acc.add_argument(
        "--purpose",
        help=f"what you will use the private artifacts for, at least {MIN_PURPOSE_CHARS} "
        "characters (asked if omitted)",
    )
    acc.add_argument("--yes", action="store_true", help="do not show the text and ask; you have read it")
    sub.add_parser("status", help="exit 0 if the current AGREEMENT.md is accepted, 1 otherwise")
    args = parser.parse_args(argv)

    try:
        root = Path(args.root) if args.root else find_root()
        if args.command == "accept":
            agreement_sha256(root)  # fail before prompting if the text is missing
            missing = [f"--{f}" for f in ("name", "contact", "purpose") if not getattr(args, f)]
            if missing and not sys.stdin.isatty():
                raise AgreementError(
                    f"{', '.join(missing)} not given and no terminal to ask on; pass them "
                    '(make accept-agreement NAME="..." CONTACT=... PURPOSE="..."). '
                    f"Rules: {RULES}"
                )
            if missing:
                print(f"Accepting {AGREEMENT_FILE}. Rules: {RULES}.\n")
            name, contact, purpose = ask_fields(args.name, args.contact, args.purpose)
            if not _confirm(root, args.yes):
                print("not accepted", file=sys.stderr)
                return 1
            record = accept(root, name=name, contact=contact, purpose=purpose)
            print(
                f"accepted {AGREEMENT_FILE} (sha256 {record.agreement_sha256}) for {record.name} "
                f"<{record.contact}> on {record.date}; recorded in {ACCEPTANCE_FILE} (git-ignored)"
            )
            return 0
        status = check(root)
    except AgreementError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(("accepted: " if status.accepted else "NOT accepted: ") + status.reason)
    if status.acceptance is not None:
        print(f"purpose: {status.acceptance.purpose}")
    return 0 if status.accepted else 1


if __name__ == "__main__":
    sys.exit(main())
