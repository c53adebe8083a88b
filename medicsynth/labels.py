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


# One vocabulary for the disaster_types classes, shared by every prompt that describes them
# (caption, judge and classify prompts under prompts/) and by the template grammar's scenes;
# tests/test_prompt_vocabulary.py reads them all and fails when a phenomenon is described under
# another class than the one listed here.
#
# Tornadoes are ``other_disaster``, not ``hurricane``: MEDIC's ``hurricane`` class is the tropical
# cyclone (hurricane, typhoon and cyclone are regional names of one phenomenon), and a tornado is
# a different, local convective storm. The template grammar that captions the demo's training
# images already put tornadoes (and snowstorms) under ``other_disaster``, as did the caption and
# classify prompts; only the judge prompt said ``hurricane``, so the judge prompt was changed.
DISASTER_PHENOMENA: dict[str, str] = {
    "earthquake": "earthquake",
    "ground shaking": "earthquake",
    "wildfire": "fire",
    "bushfire": "fire",
    "forest fire": "fire",
    "building fire": "fire",
    "flames": "fire",
    "flood": "flood",
    "floodwater": "flood",
    "inundated": "flood",
    "hurricane": "hurricane",
    "typhoon": "hurricane",
    "cyclone": "hurricane",
    "storm surge": "hurricane",
    "landslide": "landslide",
    "mudslide": "landslide",
    "rockfall": "landslide",
    "debris flow": "landslide",
    "tornado": "other_disaster",
    "drought": "other_disaster",
    "explosion": "other_disaster",
    "volcanic": "other_disaster",
    "snowstorm": "other_disaster",
    "derailment": "other_disaster",
    "transport accident": "other_disaster",
    "armed conflict": "other_disaster",
}


def phenomena_in(text: str) -> dict[str, str]:
    """The :data:`DISASTER_PHENOMENA` named in ``text``: ``{phenomenon: class}``.

    Matching is case-insensitive on whole words with an optional ``s/es/ed/ing`` ending
    ("tornadoes", "flooded"); longer phenomena are matched first and removed, so "forest fire"
    counts once. ``text`` is one class's description (a prompt bullet or a grammar scene).
    """
    import re

    found: dict[str, str] = {}
    lowered = text.lower()
    for phenomenon in sorted(DISASTER_PHENOMENA, key=len, reverse=True):
        pattern = r"\b" + re.escape(phenomenon).replace(r"\ ", r"[\s-]+") + r"(?:s|es|ed|ing)?\b"
        if re.search(pattern, lowered):
            found[phenomenon] = DISASTER_PHENOMENA[phenomenon]
            lowered = re.sub(pattern, " ", lowered)
    return found
