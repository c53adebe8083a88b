import pandas as pd
import pytest

from medicsynth.labels import TASKS
from medicsynth.merge import merge_training_set, requested_synthetic, select_synthetic

A = {"damage_severity": "mild", "informative": "informative", "humanitarian": "not_humanitarian", "disaster_types": "flood"}
B = {"damage_severity": "severe", "informative": "informative", "humanitarian": "rescue_volunteering_or_donation_effort",
     "disaster_types": "landslide"}


def test_requested_synthetic():
    assert requested_synthetic(100, 0.0) == 0
    assert requested_synthetic(100, 0.5) == 100
    assert requested_synthetic(90, 0.1) == 10
    with pytest.raises(ValueError):
        requested_synthetic(10, 1.0)


def test_selection_follows_allocation_and_redistributes(make_manifest):
    pool = pd.concat([make_manifest([(A, 10)], prefix="a", source="synthetic"),
                      make_manifest([(B, 2)], prefix="b", source="synthetic")], ignore_index=True)
    alloc = pd.DataFrame([{**A, "count": 30}, {**B, "count": 10}])
    picked = select_synthetic(pool, alloc, 8)
    # proportional 3:1 → 6 A + 2 B
    assert (picked["disaster_types"] == "flood").sum() == 6 and (picked["disaster_types"] == "landslide").sum() == 2
    # B runs out (only 2): the rest flows to A instead of being lost
    picked = select_synthetic(pool, alloc, 11)
    assert len(picked) == 11 and (picked["disaster_types"] == "landslide").sum() == 2
    # within a combination, plan order is kept (first planned images first)
    assert picked[picked["disaster_types"] == "flood"]["image_path"].tolist() == [f"a{i}" for i in range(9)]


def test_merge_keeps_real_rows_and_reports_short_pool(make_manifest):
    real = make_manifest([(A, 20)], prefix="r", source="real")
    pool = make_manifest([(B, 5)], prefix="s", source="synthetic")
    alloc = pd.DataFrame([{**B, "count": 5}])
    result = merge_training_set(real, pool, alloc, 0.5)
    assert (result.train["source"] == "real").sum() == 20
    assert result.metrics["synthetic_requested"] == 20 and result.metrics["synthetic_selected"] == 5
    assert result.metrics["pool_too_small"] is True
    assert result.metrics["achieved_share"] == pytest.approx(5 / 25)
    assert result.metrics["per_class"]["disaster_types"]["landslide"]["synthetic_share"] == 1.0
    zero = merge_training_set(real, pool, alloc, 0.0)
    assert len(zero.train) == 20 and not zero.metrics["pool_too_small"]
    assert set(TASKS) <= set(zero.train.columns)
