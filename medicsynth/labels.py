"""MEDIC's label schema: the four tasks, their exact class strings, and normalisation.

Every other module takes class names and indices from here, so a label outside the schema is
caught in one place.
"""

from __future__ import annotations

TASKS: tuple[str, ...] = ("damage_severity", "informative", "humanitarian", "disaster_types")

CLASSES: dict[str, tuple[str, ...]] = {
    "damage_severity": ("little_or_none", "mild", "severe"),
    "informative": ("informative", "not_informative"),
    "humanitarian": (
        "affected_injured_or_dead_people",
        "infrastructure_and_utility_damage",
        "not_humanitarian",
        "rescue_volunteering_or_donation_effort",
    ),
    "disaster_types": (
        "earthquake",
        "fire",
        "flood",
        "hurricane",
        "landslide",
        "not_disaster",
        "other_disaster",
    ),
}

NUM_CLASSES: dict[str, int] = {task: len(names) for task, names in CLASSES.items()}


class LabelError(ValueError):
    """A label value that is not in the schema."""


def normalise_label(value: object) -> str:
    """Canonical form of a raw label: stripped, lower-case, inner spaces/hyphens as underscores."""
    text = str(value).strip().lower()
    return "_".join(text.replace("-", " ").split())


def validate_label(task: str, value: object) -> str:
    """Return the canonical label for ``task`` or raise :class:`LabelError` naming task and value."""
    if task not in CLASSES:
        raise LabelError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    label = normalise_label(value)
    if label not in CLASSES[task]:
        raise LabelError(
            f"unknown {task} label {value!r}; expected one of {', '.join(CLASSES[task])}"
        )
    return label


def label_index(task: str, label: str) -> int:
    """Index of ``label`` in ``CLASSES[task]`` (the model's output order)."""
    try:
        return CLASSES[task].index(label)
    except ValueError:
        raise LabelError(f"unknown {task} label {label!r}") from None


def label_name(task: str, index: int) -> str:
    """Class name for the model output ``index`` of ``task``."""
    return CLASSES[task][int(index)]
