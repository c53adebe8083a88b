"""Picking a few examples for plots and reports, spread over groups (no randomness here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def round_robin(groups: Sequence[Sequence[T]], k: int) -> list[T]:
    """Up to ``k`` items taken in turns from ``groups``: the first of each group, then the second...

    Parameters: ``groups`` is a sequence of sequences (in the order turns are taken); ``k`` the
    most items returned (``k`` <= 0 gives ``[]``).

    Guarantees: deterministic (the result depends only on ``groups``' order and ``k``); every
    group contributes before any contributes twice, so one large group cannot hide the others;
    the result has ``min(k, total items)`` entries.
    """
    picked: list[T] = []
    depth = 0
    while len(picked) < k and any(depth < len(g) for g in groups):
        for g in groups:
            if depth < len(g) and len(picked) < k:
                picked.append(g[depth])
        depth += 1
    return picked
