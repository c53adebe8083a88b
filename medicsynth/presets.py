"""Presets: a YAML file with only the params.yaml keys that differ, in params.yaml's shape.

``presets/study.yaml`` holds the study's settings. Two ways to use a preset::

    python -m medicsynth.presets apply presets/study.yaml          # rewrite params.yaml in place
    python -m medicsynth.presets check presets/study.yaml          # every key exists in params.yaml

``make study-exp`` applies the preset, queues the run as a DVC experiment named ``study`` (the
queued experiment keeps the changed params.yaml) and restores params.yaml, so ``dvc exp show``
lists the study beside the default run; ``dvc queue start`` runs it.

Applying keeps params.yaml's comments and key order (ruamel.yaml round trip, the YAML library DVC
itself uses); a preset key that params.yaml does not have is an error naming it, so a typo in a
preset cannot silently add a parameter no stage reads.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML


class PresetError(ValueError):
    """A preset key that params.yaml does not have, or a preset that is not a mapping."""


def _yaml() -> YAML:
    yaml = YAML()  # round-trip mode: comments, order and quoting survive
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a long commented line
    return yaml


def load_yaml(path: str | Path) -> Any:
    """The YAML document at ``path`` (round-trip types, so it can be written back unchanged)."""
    with open(path, encoding="utf-8") as fh:
        return _yaml().load(fh)


def leaf_keys(preset: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of every leaf of ``preset`` (a list or a scalar is a leaf), in file order."""
    keys: list[str] = []
    for key, value in preset.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            keys.extend(leaf_keys(value, dotted + "."))
        else:
            keys.append(dotted)
    return keys


def merge_into(params: Any, preset: Mapping[str, Any], where: str = "") -> list[str]:
    """Set every leaf of ``preset`` in ``params`` (in place); return the dotted keys set.

    A mapping in the preset merges key by key into the mapping of params.yaml; anything else
    (a scalar or a list) replaces params.yaml's value. Raises :class:`PresetError` naming the
    first preset key that params.yaml lacks, before changing anything.
    """
    check(params, preset, where)
    changed: list[str] = []
    for key, value in preset.items():
        dotted = f"{where}{key}"
        if isinstance(value, Mapping) and isinstance(params.get(key), Mapping):
            changed.extend(merge_into(params[key], value, dotted + "."))
        else:
            params[key] = value
            changed.append(dotted)
    return changed


def check(params: Mapping[str, Any], preset: Mapping[str, Any], where: str = "") -> None:
    """Raise :class:`PresetError` if a key of ``preset`` (at any depth) is not in ``params``."""
    if not isinstance(preset, Mapping):
        raise PresetError(f"preset{' at ' + where.rstrip('.') if where else ''}: expected a mapping")
    for key, value in preset.items():
        dotted = f"{where}{key}"
        if key not in params:
            raise PresetError(f"preset key {dotted!r} is not in params.yaml (a typo, or a key of another version)")
        if isinstance(value, Mapping) and isinstance(params[key], Mapping):
            check(params[key], value, dotted + ".")


def apply_preset(preset_path: str | Path, params_path: str | Path = "params.yaml") -> list[str]:
    """Write ``params_path`` with the preset applied (comments kept); return the keys set."""
    params, preset = load_yaml(params_path), load_yaml(preset_path)
    changed = merge_into(params, preset or {})
    with open(params_path, "w", encoding="utf-8") as fh:
        _yaml().dump(params, fh)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medicsynth.presets", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("apply", "check", "keys"))
    parser.add_argument("preset")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        if args.action == "apply":
            for key in apply_preset(args.preset, args.params):
                print(f"set {key}")
        elif args.action == "check":
            check(load_yaml(args.params), load_yaml(args.preset))
            print(f"{args.preset}: every key exists in {args.params}")
        else:
            print("\n".join(leaf_keys(load_yaml(args.preset))))
    except PresetError as exc:
        print(f"{args.preset}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
