"""Reading ``params.yaml``: each stage asks for the sections it needs, nothing global."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """The whole parameter file as a dict (``path`` must hold a YAML mapping)."""
    with open(path, encoding="utf-8") as fh:
        params = yaml.safe_load(fh) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return params


def section(params: Mapping[str, Any], name: str) -> dict[str, Any]:
    """One section of ``params``; a clear error if it is missing or not a mapping."""
    try:
        value = params[name]
    except KeyError:
        raise KeyError(f"params.yaml has no section {name!r}; add it (see the README)") from None
    if not isinstance(value, dict):
        raise ValueError(f"params.yaml: section {name!r} must be a mapping")
    return value


def require(values: Mapping[str, Any], name: str, key: str) -> Any:
    """``values[key]`` of params section ``name``; a missing key is an error naming ``name.key``.

    params.yaml is the one source of defaults: code never supplies a fallback value, so a key
    removed from (or misspelt in) params.yaml fails loudly instead of silently using a stale copy.
    ``name`` may be dotted for nested sections (``"caption.llm"``).
    """
    if key not in values:
        raise KeyError(
            f"params.yaml: missing key {name}.{key}; add it to params.yaml (every key is documented "
            "there with a comment)"
        )
    return values[key]


def from_section(
    cls: type[T], params: Mapping[str, Any], name: str, *, ignore: Iterable[str] = ()
) -> T:
    """Build dataclass ``cls`` from params section ``name``, one field per key, no defaults used.

    Parameters: ``params`` is the whole parameter file (``load_params()``); ``name`` the section
    (a top-level key); ``ignore`` lists keys of the section that the stage reads itself (paths of
    its inputs) and that are not fields of ``cls``.

    Guarantees: every init field of ``cls`` comes from params.yaml (a missing key raises
    ``KeyError`` naming ``name.key``); a key that is neither a field nor in ``ignore`` raises
    ``ValueError`` naming it (a typo must not pass); ``cls.__post_init__`` validates the values.
    """
    values = section(params, name)
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(values) - known - set(ignore))
    if unknown:
        raise ValueError(
            f"params.yaml {name}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return cls(**{key: require(values, name, key) for key in sorted(known)})


def build_config(
    cls: type[T],
    values: Mapping[str, Any] | None,
    name: str,
    *,
    ignore: Iterable[str] = (),
    convert: Mapping[str, Any] | None = None,
) -> T:
    """Build dataclass ``cls`` from one params section's ``values`` (a mapping, not the whole file).

    Parameters: ``values`` is the section (``None`` counts as empty); ``name`` its dotted
    params.yaml path for errors (``"adapt.demo"``); ``ignore`` lists keys of the section that are
    not fields of ``cls`` (read elsewhere); ``convert`` maps a field name to a callable applied
    to its value (e.g. ``tuple`` for a YAML list).

    Guarantees: a field of ``cls`` without a default is a value params.yaml sets, so it is
    required (a missing key raises ``KeyError`` naming ``name.key``); a field with a default is a
    code constant params.yaml does not list, taken from ``values`` only when present; a key that
    is neither a field nor in ``ignore`` raises ``ValueError`` naming it and the known keys.
    """
    from dataclasses import MISSING

    values = dict(values or {})
    init = [f for f in fields(cls) if f.init]
    known = {f.name for f in init}
    unknown = sorted(set(values) - known - set(ignore))
    if unknown:
        raise ValueError(
            f"params.yaml {name}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    convert = dict(convert or {})
    kwargs: dict[str, Any] = {}
    for f in init:
        if f.default is MISSING and f.default_factory is MISSING:
            kwargs[f.name] = require(values, name, f.name)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
        else:
            continue
        if f.name in convert:
            kwargs[f.name] = convert[f.name](kwargs[f.name])
    return cls(**kwargs)
