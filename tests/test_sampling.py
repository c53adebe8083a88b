"""medicsynth.sampling.round_robin: the one rule that picks examples for plots and the report."""

from __future__ import annotations

from medicsynth.sampling import round_robin


def test_round_robin_takes_turns_so_a_large_group_hides_no_other():
    groups = [["a1", "a2", "a3", "a4"], ["b1"], ["c1", "c2"]]
    assert round_robin(groups, 4) == ["a1", "b1", "c1", "a2"]
    assert round_robin(groups, 100) == ["a1", "b1", "c1", "a2", "c2", "a3", "a4"]  # all, once each
    assert round_robin(groups, 0) == [] and round_robin([], 3) == [] and round_robin([[], []], 3) == []
