import hashlib

import numpy as np
import pytest
from PIL import Image

from medicsynth.demo_data import DemoConfig, generate_demo, sample_labels
from medicsynth.labels import TASKS
from medicsynth.manifest import validate_manifest


def test_demo_is_deterministic_and_medic_shaped(tmp_path):
    config = DemoConfig(n_train=60, n_dev=20, n_test=30, image_size=48, noise_rate=0.2, seed=3)
    a = generate_demo(config, tmp_path / "a", progress=False)
    b = generate_demo(config, tmp_path / "b", progress=False)
    for split in ("train", "dev", "test"):
        validate_manifest(a[split])
        assert a[split][list(TASKS)].equals(b[split][list(TASKS)])
        first_a = open(a[split]["file"].iloc[0], "rb").read()
        first_b = open(b[split]["file"].iloc[0], "rb").read()
        assert hashlib.sha256(first_a).digest() == hashlib.sha256(first_b).digest()
    img = Image.open(a["train"]["file"].iloc[0])
    assert img.format == "JPEG" and img.mode == "RGB" and img.size == (48, 48)
    assert (a["train"]["image_id"] == "demo").all()  # MEDIC's quirk: image_id holds the source


def test_noise_only_in_train_and_dev_and_clean_labels_saved(tmp_path):
    config = DemoConfig(n_train=300, n_dev=100, n_test=100, image_size=32, noise_rate=0.2, seed=1)
    out = generate_demo(config, tmp_path, progress=False)
    clean = out["clean"].set_index("image_path")
    for split, expect_noise in (("train", True), ("dev", True), ("test", False)):
        df = out[split].set_index("image_path")
        changed = np.mean([(df[t] != clean.loc[df.index, t]).mean() for t in TASKS])
        if expect_noise:
            assert 0.12 < changed < 0.28
        else:
            assert changed == 0


@pytest.mark.slow
def test_class_shares_mimic_medic_imbalance():
    labels = sample_labels(20000, np.random.default_rng(0))
    share = {t: labels[t].value_counts(normalize=True) for t in TASKS}
    assert 0.02 < share["disaster_types"]["landslide"] < 0.04
    assert 0.025 < share["disaster_types"]["other_disaster"] < 0.05
    assert 0.08 < share["damage_severity"]["mild"] < 0.14
    assert 0.02 < share["humanitarian"]["affected_injured_or_dead_people"] < 0.06
    assert 0.06 < share["humanitarian"]["rescue_volunteering_or_donation_effort"] < 0.11
    assert 0.45 < share["disaster_types"]["not_disaster"] < 0.57


def _cue_share(labels: dict, mask, n: int = 40) -> float:
    """Mean share of pixels selected by ``mask(rgb array)`` over ``n`` renderings of ``labels``."""
    from medicsynth.demo_data import render_image

    rng = np.random.default_rng(7)
    return float(np.mean([mask(np.asarray(render_image(labels, 64, rng), dtype=int)).mean() for _ in range(n)]))


def test_damage_and_humanitarian_cues_are_drawn_at_scene_scale():
    # The minority classes must be visible to the demo classifier and to a 32×32-latent generator:
    # rubble area grows with severity (mild clearly above none, severe above mild), and the
    # affected/rescue figures cover a visible share of the image (not 2-8 px specks).
    base = {"informative": "informative", "disaster_types": "not_disaster", "humanitarian": "not_humanitarian"}
    dull = lambda a: (a.max(axis=2) < 110)  # noqa: E731 - dark (severe) rubble on a blue/green calm scene
    brick = lambda a: (a[..., 0] > 120) & (a[..., 1] < 115) & (a[..., 2] < 90) & (a[..., 0] - a[..., 1] > 40)  # noqa: E731 - mild
    rubble = {d: _cue_share({**base, "damage_severity": d}, lambda a: dull(a) | brick(a))
              for d in ("little_or_none", "mild", "severe")}
    assert rubble["little_or_none"] < 0.006 < 0.015 < rubble["mild"] < rubble["severe"] / 2.5
    # mild and severe differ in colour too (brick red vs near-black), not only in size
    assert _cue_share({**base, "damage_severity": "mild"}, brick) > 10 * _cue_share({**base, "damage_severity": "severe"}, brick)
    calm = {**base, "disaster_types": "flood", "damage_severity": "little_or_none"}  # no sun, no flames
    red = lambda a: (a[..., 0] > 150) & (a[..., 1] < 90) & (a[..., 2] < 90)  # noqa: E731
    yellow = lambda a: (a[..., 0] > 190) & (a[..., 1] > 160) & (a[..., 2] < 100)  # noqa: E731
    assert _cue_share({**calm, "humanitarian": "affected_injured_or_dead_people"}, red) > 0.02
    assert _cue_share({**calm, "humanitarian": "rescue_volunteering_or_donation_effort"}, yellow) > 0.02
    assert _cue_share(calm, red) < 0.002 and _cue_share(calm, yellow) < 0.002
