"""One label vocabulary across every prompt: each disaster type's described phenomena agree.

Every file under ``prompts/`` is read; each bullet that defines a ``disaster_types`` class
(``- hurricane: ...`` or, in caption prompts, ``- other disaster: ...``, continuation lines
included) is matched against :data:`medicsynth.labels.DISASTER_PHENOMENA`, and so are the
template grammar's scenes. A phenomenon described under another class than the table's (e.g.
"tornado" under ``hurricane``) fails, naming the file, the class and the phenomenon.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from medicsynth import caption_templates as grammar
from medicsynth.labels import CLASSES, DISASTER_PHENOMENA, phenomena_in

PROMPTS = Path(__file__).resolve().parents[1] / "prompts"
DISASTERS = CLASSES["disaster_types"]
# Prompt files that must define every disaster type (the ones a model reads class definitions in).
DEFINING = ("caption_grounded.txt", "caption_hypothetical.txt", "judge_system.txt", "classify_system.txt")


def disaster_definitions(text: str) -> dict[str, str]:
    """``{class: description}`` of the bullets defining disaster types in a prompt's text.

    A bullet is ``- <class>: description`` with the class written with underscores or spaces;
    indented lines that follow it (and are not bullets) continue its description.
    """
    names = {c: c for c in DISASTERS} | {c.replace("_", " "): c for c in DISASTERS}
    bullet = re.compile(r"^(\s*)-\s*(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\s*:(.*)$")
    found: dict[str, str] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = bullet.match(line)
        if not m:
            continue
        indent, description = len(m.group(1)), [m.group(3)]
        for nxt in lines[i + 1:]:
            stripped = nxt.lstrip()
            if not stripped or stripped.startswith("-") or len(nxt) - len(stripped) <= indent:
                break
            description.append(stripped)
        cls = names[m.group(2)]
        assert cls not in found, f"{cls} defined twice"
        found[cls] = " ".join(description)
    return found


def test_parser_reads_both_bullet_styles():
    text = "- hurricane: a typhoon\n  - other disaster: a tornado or\n    a drought\n  - flood: water\n"
    assert disaster_definitions(text) == {"hurricane": " a typhoon", "other_disaster": " a tornado or a drought", "flood": " water"}
    assert phenomena_in("tornadoes and a flooded street, forest fires") == {
        "tornado": "other_disaster", "flood": "flood", "forest fire": "fire"}


@pytest.mark.parametrize("path", sorted(PROMPTS.glob("*.txt")), ids=lambda p: p.name)
def test_every_prompt_describes_each_disaster_type_with_the_shared_vocabulary(path):
    definitions = disaster_definitions(path.read_text(encoding="utf-8"))
    if path.name in DEFINING:
        assert set(definitions) == set(DISASTERS), f"{path.name}: defines {sorted(definitions)}"
    wrong = [
        f"{path.name}: {phenomenon!r} described under {cls}, but labels.DISASTER_PHENOMENA says {expected}"
        for cls, description in definitions.items()
        for phenomenon, expected in phenomena_in(description).items()
        if expected != cls
    ]
    assert not wrong, "\n".join(wrong)
    # Each class's own name-giving phenomena are described under it where it is defined, so the
    # check above compares real descriptions, not empty bullets.
    for cls in set(definitions) - {"not_disaster"}:
        assert any(v == cls for v in phenomena_in(definitions[cls]).values()), f"{path.name}: {cls} names no phenomenon"


def test_tornado_is_other_disaster_in_every_defining_prompt():
    # The one mapping that differed between prompts (judge said hurricane): now stated everywhere.
    for name in DEFINING:
        definitions = disaster_definitions((PROMPTS / name).read_text(encoding="utf-8"))
        assert "tornado" in phenomena_in(definitions["other_disaster"]), name
        assert "tornado" not in phenomena_in(definitions["hurricane"]), name


def test_template_grammar_scenes_agree_with_the_vocabulary():
    for cls, scenes in grammar.SCENES.items():
        for scene in scenes:
            for phenomenon, expected in phenomena_in(scene).items():
                assert expected == cls, f"caption_templates.SCENES[{cls!r}]: {scene!r} names {phenomenon!r} ({expected})"
    assert set(DISASTER_PHENOMENA.values()) <= set(DISASTERS)
