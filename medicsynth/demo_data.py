"""A deterministic, MEDIC-shaped demo dataset that runs offline on a CPU.

The demo exists so the whole pipeline can be run, tested and scored without MEDIC's 71k images.
It is built to behave like MEDIC where that matters for this project:

* **Same schema**: MEDIC's seven columns and exact label strings; ``image_id`` holds the source
  (``demo``) and ``event_name`` an id, mirroring MEDIC's column quirk.
* **Same imbalance**: labels are drawn from a joint process whose marginals follow MEDIC's dev
  shares (landslide ≈3%, other_disaster ≈4%, mild ≈11%, affected ≈4%, rescue ≈8%, ...), and
  whose correlations follow MEDIC's (``not_informative`` images are mostly ``not_disaster``,
  ``not_humanitarian`` and ``little_or_none``).
* **Learnable but not trivial visual cues** (documented in ``docs/DEMO_DATA.md``):

  - informative: a disaster-area photo (sky + ground) vs either a flat "card" with text-like
    stripes (60% of not_informative images) or an unrelated photo with a large foreground
    subject (40%). Some informative photos hold a smaller subject too, and the two size
    ranges overlap, so a share of photos is genuinely ambiguous, as in MEDIC;
  - disaster_types: palette + scene shape (earthquake: tilted, jagged horizon in dusty greys;
    fire: flame triangles on a dark-orange sky; flood: a blue water band with wave lines;
    hurricane: grey-green sky with diagonal streaks; landslide: a brown diagonal slope;
    not_disaster: blue sky, green ground, sun; other_disaster: purple haze with smoke blobs);
  - damage_severity: a rubble mound on the ground that grows and darkens with severity (none:
    at most a speck; mild: a brick-red mound 16–26 px wide; severe: a near-black one 24–48 px wide,
    at 64 px; the widths overlap and brightness jitter narrows the colour gap, so some mild and
    severe images are ambiguous);
  - humanitarian: figures at scene scale (12–18 px) — 2–4 red figures lying on white sheets
    (affected), 3–5 standing figures in yellow vests with a white band (rescue), 1–3 pale broken
    buildings (infrastructure), nothing (not_humanitarian); figures can overlap rubble and
    subjects.

  Damage and humanitarian cues are drawn large enough for the demo classifier to learn the
  minority classes (mild, affected, rescue) and for the demo diffusion model (4×32×32 latents)
  to render them: with 2–8 px figures and debris neither happened (mild F1 0, generated images
  matched their damage/humanitarian labels 20–28% of the time).

  Every image gets colour jitter, position jitter, Gaussian pixel noise and, sometimes, blur.
* **Label noise**: in train and dev, each task's label is replaced with probability
  ``noise_rate`` by another class drawn from the class prior (annotators who err tend to pick a
  common class). The clean labels are saved separately so relabelling can be scored. Test labels
  are clean.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from medicsynth.labels import CLASSES, TASKS

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class DemoConfig:
    """Size and noise of the demo dataset."""

    n_train: int = 1600
    n_dev: int = 400
    n_test: int = 800
    image_size: int = 64
    noise_rate: float = 0.10
    seed: int = 0
    jpeg_quality: int = 92


# Conditional label process (see module docstring); probabilities follow CLASSES order.
P_INFORMATIVE = 0.56
# Rendering of the informative task: the share of not_informative images drawn as unrelated
# photos (the rest are cards), the share of informative photos that hold a subject too, and the
# subject radii (px at 64 px; the ranges overlap on 7-9 px).
P_UNRELATED_PHOTO = 0.40
P_SUBJECT_IN_INFORMATIVE = 0.25
SUBJECT_RADIUS = {"not_informative": (7, 16), "informative": (4, 9)}
P_DISASTER_GIVEN_INFORMATIVE = {  # earthquake fire flood hurricane landslide not_disaster other
    "informative": (0.28, 0.075, 0.17, 0.16, 0.04, 0.22, 0.055),
    "not_informative": (0.036, 0.012, 0.018, 0.018, 0.012, 0.88, 0.024),
}
P_HUMANITARIAN_GIVEN_INFORMATIVE = {  # affected infrastructure not_humanitarian rescue
    "informative": (0.06, 0.70, 0.10, 0.14),
    "not_informative": (0.01, 0.02, 0.95, 0.02),
}
P_DAMAGE = {  # little_or_none mild severe
    "not_informative": (0.92, 0.05, 0.03),
    "calm": (0.70, 0.15, 0.15),  # informative, not_disaster
    "disaster": (0.20, 0.16, 0.64),  # informative, any disaster
}


def sample_labels(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Draw ``n`` four-label combinations from the demo's MEDIC-like joint process."""
    rows = []
    for _ in range(n):
        informative = "informative" if rng.random() < P_INFORMATIVE else "not_informative"
        disaster = rng.choice(CLASSES["disaster_types"], p=P_DISASTER_GIVEN_INFORMATIVE[informative])
        humanitarian = rng.choice(
            CLASSES["humanitarian"], p=P_HUMANITARIAN_GIVEN_INFORMATIVE[informative]
        )
        if informative == "not_informative":
            damage_key = "not_informative"
        else:
            damage_key = "calm" if disaster == "not_disaster" else "disaster"
        damage = rng.choice(CLASSES["damage_severity"], p=P_DAMAGE[damage_key])
        rows.append(
            {
                "damage_severity": str(damage),
                "informative": informative,
                "humanitarian": str(humanitarian),
                "disaster_types": str(disaster),
            }
        )
    return pd.DataFrame(rows, columns=list(TASKS))


def inject_noise(
    labels: pd.DataFrame, rate: float, prior: dict[str, np.ndarray], rng: np.random.Generator
) -> pd.DataFrame:
    """Replace each task label with probability ``rate`` by a different class drawn from ``prior``."""
    noisy = labels.copy()
    for task in TASKS:
        classes = CLASSES[task]
        flip = rng.random(len(labels)) < rate
        values = noisy[task].to_numpy(dtype=object)
        for i in np.nonzero(flip)[0]:
            current = classes.index(values[i])
            p = prior[task].copy()
            p[current] = 0.0
            values[i] = classes[int(rng.choice(len(classes), p=p / p.sum()))]
        noisy[task] = values
    return noisy


def class_prior(labels: pd.DataFrame) -> dict[str, np.ndarray]:
    """Empirical class frequencies per task (with a small floor so no class is impossible)."""
    prior = {}
    for task in TASKS:
        counts = labels[task].value_counts()
        freq = np.array([counts.get(c, 0) for c in CLASSES[task]], dtype=float) + 1.0
        prior[task] = freq / freq.sum()
    return prior


# ---------------------------------------------------------------------------------------------
# Rendering. Coordinates are drawn on a 64-unit canvas and scaled, so any image_size works.

_PALETTES = {
    # sky, ground
    "earthquake": ((178, 168, 150), (118, 100, 82)),
    "fire": ((196, 86, 34), (70, 48, 36)),
    "flood": ((140, 150, 165), (96, 110, 84)),
    "hurricane": ((88, 100, 96), (52, 82, 58)),
    "landslide": ((150, 170, 185), (84, 120, 70)),
    "not_disaster": ((118, 170, 228), (72, 150, 72)),
    "other_disaster": ((138, 92, 150), (110, 104, 112)),
}


def _jitter(colour, rng, amount=18):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


# Rubble of damage_severity: a mound with pale blocks; its width in px (at 64 px) and colour by
# class (mild: brick-red debris; severe: larger and near-black; the widths overlap). Mild was
# grey-brown (92, 84, 76) until 2026-12-03: on the dusty earthquake and other_disaster grounds
# (the commonest disaster type) it all but vanished, so no model learnt mild (test F1 0.27 for
# the demo classifier, relabel never changed a label into mild).
RUBBLE = {"little_or_none": (52, 46, 42), "mild": (164, 84, 56), "severe": (46, 41, 38)}
RUBBLE_WIDTH = {"mild": (16.0, 26.0), "severe": (24.0, 48.0)}


def _rubble_pile(d: ImageDraw.ImageDraw, box, poly, width: float, colour, rng: np.random.Generator) -> None:
    """Draw a rubble mound ``width`` units wide (height ≈ 0.45-0.65 × width) on the ground."""
    # Inside the centre crop the classifier sees (train.resize 48 -> crop 40 cuts 5 px of 64 at
    # each side; a random crop up to 11): a mound at the edge was often half cut away.
    x0 = float(rng.uniform(6, max(7.0, 58 - width)))
    base = float(rng.uniform(40, 50))
    height = width * float(rng.uniform(0.45, 0.65))
    n = 6
    top = [(x0 + width * k / n, base - height * np.sin(np.pi * k / n) * float(rng.uniform(0.7, 1.0)))
           for k in range(n + 1)]
    d.polygon(poly(top + [(x0 + width, base), (x0, base)]), fill=_jitter(colour, rng, 10))
    for _ in range(int(2 + width // 5)):
        bx = x0 + float(rng.uniform(0.1, 0.8)) * width
        by = base - float(rng.uniform(0.15, 0.6)) * height
        d.rectangle(box(bx, by, bx + rng.integers(2, 4), by + rng.integers(1, 3)), fill=_jitter((140, 128, 116), rng, 14))


def render_image(labels: dict[str, str], size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one demo image whose visual cues encode ``labels`` (see module docstring)."""
    s = size / 64.0
    img = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(img)
    disaster = labels["disaster_types"]

    def box(x0, y0, x1, y1):
        return [x0 * s, y0 * s, x1 * s, y1 * s]

    def poly(points):
        return [(x * s, y * s) for x, y in points]

    informative = labels["informative"]
    card = informative == "not_informative" and rng.random() >= P_UNRELATED_PHOTO
    if card:
        bg = _jitter((226, 214, 196), rng, 30)
        d.rectangle(box(0, 0, 64, 64), fill=bg)
        if disaster != "not_disaster":  # a poster about a disaster: a palette strip on top
            d.rectangle(box(0, 0, 64, 14), fill=_jitter(_PALETTES[disaster][0], rng))
        ink = _jitter((40, 40, 48), rng, 12)
        y = 18 + rng.integers(0, 5)
        while y < 58:
            x0 = 4 + rng.integers(0, 6)
            x1 = 60 - rng.integers(0, 22)
            d.rectangle(box(x0, y, x1, y + 2), fill=ink)
            y += 6 + rng.integers(0, 3)
    else:
        sky, ground = (_jitter(c, rng) for c in _PALETTES[disaster])
        horizon = 30 + rng.integers(-4, 5)
        d.rectangle(box(0, 0, 64, 64), fill=sky)
        if disaster == "earthquake":
            pts = [(0, horizon + rng.integers(-6, 2))]
            for x in range(8, 72, 8):
                pts.append((x, horizon + rng.integers(-7, 8)))
            d.polygon(poly(pts + [(64, 64), (0, 64)]), fill=ground)
        elif disaster == "landslide":
            d.rectangle(box(0, horizon, 64, 64), fill=ground)
            top = rng.integers(0, 12)
            d.polygon(poly([(0, top), (0, 64), (44 + rng.integers(0, 20), 64)]), fill=_jitter((150, 100, 52), rng))
        else:
            d.rectangle(box(0, horizon, 64, 64), fill=ground)
        if disaster == "fire":
            for _ in range(rng.integers(3, 6)):
                x = rng.integers(0, 56)
                h = rng.integers(10, 22)
                d.polygon(poly([(x, 64), (x + 8, 64), (x + 4, 64 - h)]), fill=_jitter((250, 160, 30), rng, 20))
        elif disaster == "flood":
            level = 40 + rng.integers(-4, 5)
            d.rectangle(box(0, level, 64, 64), fill=_jitter((42, 92, 182), rng))
            for y in range(level + 3, 64, 6):
                d.line(box(2, y, 62, y), fill=_jitter((120, 160, 220), rng), width=max(1, int(s)))
        elif disaster == "hurricane":
            for _ in range(rng.integers(6, 10)):
                x = rng.integers(-10, 60)
                d.line(poly([(x, 0), (x + 14, 26)]), fill=_jitter((214, 220, 220), rng, 10), width=max(1, int(s)))
        elif disaster == "not_disaster":
            cx, cy = 48 + rng.integers(-6, 7), 10 + rng.integers(-3, 4)
            d.ellipse(box(cx - 5, cy - 5, cx + 5, cy + 5), fill=_jitter((250, 230, 90), rng, 10))
        elif disaster == "other_disaster":
            for _ in range(rng.integers(2, 5)):
                cx, cy = rng.integers(6, 58), rng.integers(4, 28)
                r = rng.integers(4, 9)
                d.ellipse(box(cx - r, cy - r, cx + r, cy + r), fill=_jitter((70, 60, 78), rng, 12))
        if informative == "not_informative" or rng.random() < P_SUBJECT_IN_INFORMATIVE:
            # A foreground subject (a person, a pet, a product): large in unrelated photos,
            # smaller when an informative photo happens to hold one.
            lo_r, hi_r = SUBJECT_RADIUS[informative]
            r = rng.integers(lo_r, hi_r + 1)
            cx, cy = 32 + rng.integers(-10, 11), 36 + rng.integers(-8, 9)
            colour = tuple(int(c) for c in rng.integers(40, 256, 3))
            d.ellipse(box(cx - r, cy - 1.3 * r, cx + r, cy + 1.3 * r), fill=colour,
                      outline=tuple(c // 2 for c in colour), width=max(1, int(s)))

    # Damage: a rubble pile whose width grows with severity (scene scale, so a 32×32-latent
    # generator can draw it); mild and severe widths overlap on purpose. None: at most a speck.
    damage = labels["damage_severity"]
    if damage == "little_or_none":
        if rng.random() < 0.5:
            x, y = rng.integers(2, 60), rng.integers(36, 60)
            d.rectangle(box(x, y, x + rng.integers(1, 3), y + 1), fill=_jitter(RUBBLE[damage], rng, 10))
    else:
        lo, hi = RUBBLE_WIDTH[damage]
        _rubble_pile(d, box, poly, float(rng.uniform(lo, hi)), RUBBLE[damage], rng)

    # Humanitarian: figures at scene scale (12-18 px at 64 px), drawn over the rubble.
    hum = labels["humanitarian"]
    if hum == "affected_injured_or_dead_people":  # red figures lying on white sheets
        for _ in range(rng.integers(2, 5)):
            x, y = rng.integers(2, 46), rng.integers(40, 56)
            length = rng.integers(12, 17)
            d.rectangle(box(x - 1, y - 1, x + length + 5, y + 5), fill=_jitter((236, 236, 232), rng, 10))
            d.rectangle(box(x, y, x + length, y + 4), fill=_jitter((205, 28, 32), rng, 12))
            d.ellipse(box(x + length, y, x + length + 4, y + 4), fill=_jitter((230, 190, 160), rng, 10))
    elif hum == "rescue_volunteering_or_donation_effort":  # standing figures in yellow vests
        for _ in range(rng.integers(3, 6)):
            x, y = rng.integers(2, 58), rng.integers(38, 50)
            height = rng.integers(11, 15)
            d.rectangle(box(x, y, x + 5, y + height), fill=_jitter((245, 212, 24), rng, 10))
            d.rectangle(box(x, y + height // 2, x + 4, y + height // 2 + 1), fill=_jitter((240, 240, 240), rng, 8))
            d.ellipse(box(x, y - 4, x + 4, y), fill=_jitter((230, 190, 160), rng, 10))
    elif hum == "infrastructure_and_utility_damage":  # pale broken buildings
        for _ in range(rng.integers(1, 4)):
            x, y = rng.integers(2, 50), rng.integers(20, 32)
            w, h = rng.integers(8, 14), rng.integers(12, 20)
            d.polygon(
                poly([(x, y + h), (x, y + 2), (x + w // 2, y + rng.integers(3, 8)), (x + w, y), (x + w, y + h)]),
                fill=_jitter((196, 196, 188), rng, 14),
            )

    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=0.6 * s))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr * rng.uniform(0.85, 1.15) + rng.normal(0.0, 8.0, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def generate_demo(config: DemoConfig, image_dir: str | Path, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Render the demo dataset under ``image_dir``; return manifests (noisy labels) and clean labels.

    Returns ``{"train", "dev", "test", "clean"}``; the split frames carry the project manifest
    columns, ``clean`` has ``image_path``, ``split`` and the four clean labels for every image.
    Fully determined by ``config`` (same config → byte-identical files).
    """
    image_dir = Path(image_dir)
    rng = np.random.default_rng(config.seed)
    sizes = {"train": config.n_train, "dev": config.n_dev, "test": config.n_test}
    clean = {split: sample_labels(n, rng) for split, n in sizes.items()}
    prior = class_prior(clean["train"])
    out: dict[str, pd.DataFrame] = {}
    clean_rows = []
    for split in SPLITS:
        labels = clean[split]
        noisy = labels if split == "test" else inject_noise(labels, config.noise_rate, prior, rng)
        (image_dir / split).mkdir(parents=True, exist_ok=True)
        paths = []
        render_rng = np.random.default_rng([config.seed, SPLITS.index(split)])
        for i, row in enumerate(
            tqdm(labels.to_dict("records"), desc=f"demo {split}", disable=None if progress else True, leave=False)
        ):
            path = image_dir / split / f"{split}_{i:05d}.jpg"
            render_image(row, config.image_size, render_rng).save(path, quality=config.jpeg_quality)
            paths.append(path.as_posix())
        frame = noisy.copy()
        frame.insert(0, "image_path", paths)
        frame.insert(0, "event_name", [f"demo_{split}_{i:05d}" for i in range(len(paths))])
        frame.insert(0, "image_id", "demo")
        frame["split"] = split
        frame["source"] = "real"
        frame["provenance"] = "demo"
        frame["file"] = paths
        out[split] = frame
        c = labels.copy()
        c.insert(0, "split", split)
        c.insert(0, "image_path", paths)
        clean_rows.append(c)
    out["clean"] = pd.concat(clean_rows, ignore_index=True)
    return out
