"""Complete params sections for unit tests (params.yaml is the only source of defaults).

The configs have no default values, so a test that builds one passes every key. These sections
hold the values the unit tests were written against (the former in-code defaults, e.g. no
combination bonuses), not params.yaml's: a change of the demo's params must not change what a
unit test checks. ``section("allocate", total=60)`` returns a fresh copy with overrides.
"""

from __future__ import annotations

import copy
from typing import Any

SECTIONS: dict[str, dict[str, Any]] = {
    "allocate": {
        "mode": "weakness",
        "total": 280,
        "base_per_combination": 10,
        "f1_thresholds": [0.40, 0.60, 0.75],
        "f1_bonuses": [80, 40, 20],
        "combination_bonuses": [],
        "rounding": "webster",
        "balance_target_share": 0.10,
        "include_unseen": False,
        "f1_reports": [],
        "seed": 0,
    },
    "caption": {
        "backend": "template",
        "proportion_real": 0.5,
        "temperature_grounded": 0.4,
        "temperature_hypothetical": 0.8,
        "min_words": 25,
        "max_words": 50,
        "max_tokens": 77,
        "tokenizer": None,
        "negative_prompts": {},
        "negative_prompt_common": "",
        "prompt_grounded": "prompts/caption_grounded.txt",
        "prompt_hypothetical": "prompts/caption_hypothetical.txt",
        "analysis": False,
        "keywords": ["time_of_day", "region", "camera_angle", "weather"],
        "llm": {},
    },
    "filter": {
        "method": "classifier",
        "threshold": 0.5,
        "tasks": ["damage_severity", "informative", "humanitarian", "disaster_types"],
        "blank_std": 8.0,
        "blank_dominant_share": 0.95,
        "hash": "phash",
        "phash_bits": 256,
        "phash_threshold": 24,
        "check_real_duplicates": True,
        "classifier_model": "models/original-small_cnn",
        "batch_size": 64,
        "device": "cpu",
        "loader": "auto",
        "workers": 0,
        "cache_dir": None,
        "grid_per_class": 4,
        "vlm": {},
    },
}


def section(name: str, **overrides: Any) -> dict[str, Any]:
    """A deep copy of test section ``name`` with ``overrides`` applied (keys must exist)."""
    values = copy.deepcopy(SECTIONS[name])
    unknown = set(overrides) - set(values)
    if unknown:
        raise KeyError(f"tests/sections.py {name}: no key(s) {sorted(unknown)}")
    values.update(overrides)
    return values
