"""MEDIC label answers from a VLM: JSON schema, validation, and the classification request.

The classification prompt follows the study's step 2: one prompt with per-class definitions
(``prompts/classify_system.txt``) and a JSON answer with one key per task
(``prompts/classify_user.txt``, a :class:`string.Template` with ``$tasks``, ``$label_options`` and
``$keys``). After a refusal the client retries once with ``prompts/refusal_fallback.txt`` (an
academic humanitarian research preface) put before the user prompt.

Label strings come from :mod:`medicsynth.labels`; a VLM's casing or spacing slips ("Little or
none") are normalised by :func:`medicsynth.labels.validate_label`, anything else is an error.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from medicsynth.labels import CLASSES, TASKS, LabelError, validate_label
from medicsynth.llm.client import LLMRequest

CLASSIFY_SYSTEM = "classify_system.txt"
CLASSIFY_USER = "classify_user.txt"
REFUSAL_FALLBACK = "refusal_fallback.txt"


class LabelsAnswerError(ValueError):
    """A label answer that is not a complete, valid set of labels for the asked tasks."""


def canonical_tasks(tasks: Iterable[str] = TASKS) -> tuple[str, ...]:
    """``tasks`` checked and put in :data:`TASKS` order (so prompts and cache keys are stable)."""
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in CLASSES]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; expected some of {', '.join(TASKS)}")
    if not tasks:
        raise ValueError("at least one task is needed")
    return tuple(t for t in TASKS if t in tasks)


def labels_json_schema(tasks: Iterable[str] = TASKS) -> dict[str, Any]:
    """JSON schema of an answer: an object with exactly one enum-valued string per task.

    Valid for OpenAI strict structured outputs (every property required, no additional
    properties) and as an Anthropic tool ``input_schema``.
    """
    tasks = canonical_tasks(tasks)
    return {
        "type": "object",
        "properties": {
            task: {"type": "string", "enum": list(CLASSES[task]), "description": f"MEDIC {task} label"}
            for task in tasks
        },
        "required": list(tasks),
        "additionalProperties": False,
    }


def validate_labels_answer(obj: Any, tasks: Iterable[str] = TASKS) -> dict[str, str]:
    """``{task: canonical label}`` from a parsed answer, or :class:`LabelsAnswerError`.

    Raises on a non-object, a missing task (a partial answer), a key that is not an asked task,
    or a value outside the task's classes (after normalising case and whitespace).
    """
    tasks = canonical_tasks(tasks)
    if not isinstance(obj, Mapping):
        raise LabelsAnswerError(f"expected a JSON object with keys {', '.join(tasks)}, got {type(obj).__name__}")
    missing = [t for t in tasks if t not in obj]
    extra = sorted(str(k) for k in obj if k not in tasks)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected {', '.join(extra)}")
        raise LabelsAnswerError("answer keys: " + "; ".join(parts))
    out: dict[str, str] = {}
    for task in tasks:
        value = obj[task]
        if not isinstance(value, str):
            raise LabelsAnswerError(f"{task}: expected a label string, got {value!r}")
        try:
            out[task] = validate_label(task, value)
        except LabelError as exc:
            raise LabelsAnswerError(str(exc)) from None
    return out


@functools.lru_cache(maxsize=64)
def _read_prompt(path: str, mtime_ns: int, size: int) -> str:
    # Keyed by modification time and size too, so an edited prompt is never served stale.
    return Path(path).read_text(encoding="utf-8").strip()


def load_prompt(name: str | Path, prompt_dir: str | Path | None = "prompts") -> str:
    """Text of a prompt file without surrounding whitespace; the project's one prompt reader.

    Args:
        name: file name inside ``prompt_dir``, or, with ``prompt_dir=None``, a path as given
            (``load_prompt("prompts/judge_user.txt", None)``).
        prompt_dir: directory of the version-controlled prompts; ``None`` to read ``name`` as a path.

    Raises :class:`FileNotFoundError` naming the path when the file is missing.
    """
    path = Path(name) if prompt_dir is None else Path(prompt_dir) / name
    try:
        stat = path.stat()
    except OSError:
        stat = None
    if stat is None or not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found")
    return _read_prompt(str(path), stat.st_mtime_ns, stat.st_size)


def with_refusal_preface(prompt: str, prompt_dir: str | Path = "prompts") -> str:
    """``prompt`` preceded by the refusal-fallback preface (``refusal_fallback.txt``)."""
    return f"{load_prompt(REFUSAL_FALLBACK, prompt_dir)}\n\n{prompt}"


def fill_labels_prompt(name: str, tasks: Sequence[str], prompt_dir: str | Path = "prompts") -> str:
    """The prompt file ``name`` of ``prompt_dir`` filled in for ``tasks``, in the order given.

    The file is a :class:`string.Template` with ``$tasks`` (the task names, comma-separated),
    ``$keys`` (the same, quoted: the answer's JSON keys) and ``$label_options`` (one line per task
    listing its allowed labels). Raises :class:`ValueError` naming the file and the placeholder
    when the template uses an unknown or malformed one (fix the prompt file).
    """
    template = string.Template(load_prompt(name, prompt_dir))
    try:
        return template.substitute(
            tasks=", ".join(tasks),
            keys=", ".join(f'"{t}"' for t in tasks),
            label_options="\n".join(f"- {t}: {' | '.join(CLASSES[t])}" for t in tasks),
        )
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{Path(prompt_dir) / name}: bad placeholder {exc}") from None


def classify_user_prompt(tasks: Sequence[str] = TASKS, prompt_dir: str | Path = "prompts") -> str:
    """The user prompt asking for ``tasks``, with their allowed labels listed."""
    return fill_labels_prompt(CLASSIFY_USER, canonical_tasks(tasks), prompt_dir)


def classify_request(
    image_path: str | Path,
    tasks: Iterable[str] = TASKS,
    prompt_dir: str | Path = "prompts",
    *,
    key: str | None = None,
    fallback: bool = True,
) -> LLMRequest:
    """An :class:`LLMRequest` asking a VLM for the MEDIC labels of one image.

    The answer's ``value`` is ``{task: canonical label}`` for the asked tasks (in ``TASKS``
    order). ``fallback=False`` disables the refusal retry. ``key`` defaults to the image path.
    """
    tasks = canonical_tasks(tasks)
    user = classify_user_prompt(tasks, prompt_dir)

    def validate(obj: Any) -> dict[str, str]:
        return validate_labels_answer(obj, tasks)

    return LLMRequest(
        prompt=user,
        system=load_prompt(CLASSIFY_SYSTEM, prompt_dir),
        image_path=str(image_path),
        schema=labels_json_schema(tasks),
        schema_name="medic_labels",
        validate=validate,
        fallback_prompt=with_refusal_preface(user, prompt_dir) if fallback else None,
        key=str(image_path) if key is None else key,
    )
