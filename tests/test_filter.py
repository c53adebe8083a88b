"""The filter stage: perceptual hashes, every rule of the gate, the judge, metrics and the grid.

Fixtures are demo renders (64 px, as the demo generator produces), a few deliberately broken
images, and a fake classifier whose probabilities each test sets per file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medicsynth import filtering
from medicsynth.demo_data import render_image, sample_labels
from medicsynth.filtering import (
    FilterConfig,
    FilterPaths,
    JudgeVerdict,
    filter_synthetic,
    kept_manifest,
    run_filter,
    write_filter_outputs,
)
from medicsynth.labels import CLASSES, TASKS
from medicsynth.manifest import COLUMNS, read_manifest, write_manifest, write_tsv
from medicsynth.plots import plot_filter_grid
from medicsynth.params import load_params
from medicsynth.phash import greedy_duplicates, hamming, hash_size_for_bits, image_hash, nearest, pack_bits
from tests.sections import section

# ---------------------------------------------------------------------------------------------
# Fixture helpers


def _labels(disaster: str, damage: str = "severe", hum: str = "infrastructure_and_utility_damage") -> dict[str, str]:
    informative = "not_informative" if disaster == "not_disaster" and hum == "not_humanitarian" else "informative"
    return {"damage_severity": damage, "informative": informative, "humanitarian": hum, "disaster_types": disaster}


def _render(labels: dict[str, str], seed: int) -> Image.Image:
    return render_image(labels, 64, np.random.default_rng(seed))


def _perturb(img: Image.Image, seed: int = 0, sigma: float = 4.0, quality: int = 80) -> Image.Image:
    """A slightly different copy: pixel noise then a JPEG round trip."""
    arr = np.asarray(img, dtype=np.float32) + np.random.default_rng(seed).normal(0, sigma, (img.height, img.width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _row(name: str, labels: dict[str, str], plan_id: int, seed: int = 0, **extra) -> dict:
    path = f"data/synthetic/images/{name}.png"
    return {
        "image_id": "synthetic",
        "event_name": "synthetic",
        "image_path": path,
        **labels,
        "split": "train",
        "source": "synthetic",
        "provenance": "test-generator",
        "file": path,
        "plan_id": str(plan_id),
        "seed": str(seed),
        "blank_flag": "0",
        **extra,
    }


class FakePredictor:
    """Stands in for ``medicsynth.inference.predict_proba``: per file, the class to favour per task.

    ``favour[basename][task]`` is the class given probability ``p``; otherwise the row's intended
    label (``intended[basename]``) gets it. The rest of the mass is spread evenly.
    """

    def __init__(self, intended: dict[str, dict[str, str]], favour: dict[str, dict[str, str]] | None = None, p: float = 0.9):
        self.intended = intended
        self.favour = favour or {}
        self.p = p
        self.calls: list[list[str]] = []

    def __call__(self, model_dir, files, *, batch_size=64, device="cpu", loader="auto"):
        self.calls.append(list(files))
        out = {}
        for task in TASKS:
            k = len(CLASSES[task])
            probs = np.full((len(files), k), (1 - self.p) / (k - 1))
            for i, f in enumerate(files):
                name = Path(f).stem
                cls = self.favour.get(name, {}).get(task, self.intended[name][task])
                probs[i, CLASSES[task].index(cls)] = self.p
            out[task] = probs
        return out


@pytest.fixture
def pool(tmp_path):
    """A synthetic pool covering every rule, plus a small real training set.

    Returns ``(synthetic manifest, real manifest, intended labels by name, expected reason by name)``.
    """
    root = tmp_path
    (root / "data/synthetic/images").mkdir(parents=True)
    (root / "data/real").mkdir(parents=True)
    real_rows = []
    real_imgs = {}
    for i, disaster in enumerate(("flood", "fire", "earthquake", "hurricane")):
        img = _render(_labels(disaster), 1000 + i)
        path = f"data/real/real_{i}.jpg"
        img.save(root / path, quality=92)
        real_imgs[i] = img
        real_rows.append(
            {"image_id": "demo", "event_name": f"r{i}", "image_path": path, **_labels(disaster), "split": "train",
             "source": "real", "provenance": "demo", "file": path}
        )
    real = pd.DataFrame(real_rows, columns=list(COLUMNS))

    rows, images, expected = [], {}, {}

    def add(name, img, labels, plan_id, reason, **extra):
        images[name] = img
        rows.append(_row(name, labels, plan_id, **extra))
        expected[name] = reason

    disasters = CLASSES["disaster_types"]
    for i, disaster in enumerate(disasters):
        add(f"good_{disaster}", _render(_labels(disaster), i), _labels(disaster), 10 + i, "kept")
    # The exact copy is listed *first* in the file but has the later plan id: plan order decides.
    add("copy_of_flood", images["good_flood"].copy(), _labels("flood"), 99, "duplicate_synthetic")
    rows.insert(0, rows.pop())
    add("perturbed_fire", _perturb(images["good_fire"]), _labels("fire"), 98, "duplicate_synthetic")
    add("memorised_real", _perturb(real_imgs[2], seed=3), _labels("earthquake", "mild"), 50, "duplicate_real")
    add("blank_grey", Image.new("RGB", (64, 64), (128, 128, 128)), _labels("flood"), 51, "blank")
    # Near-constant: a faint gradient with a few pixels of noise.
    grad = np.tile(np.linspace(100, 104, 64), (64, 1))[..., None].repeat(3, axis=2)
    add("near_constant", Image.fromarray(grad.astype(np.uint8)), _labels("fire"), 52, "blank")
    add("flagged", _render(_labels("hurricane"), 77), _labels("hurricane"), 53, "blank", blank_flag="true")
    add("wrong_label", _render(_labels("landslide"), 78), _labels("landslide"), 54, "label_mismatch")
    for name, img in images.items():
        img.save(root / f"data/synthetic/images/{name}.png")
    # Not an image at all, and a PNG cut short.
    rows.append(_row("corrupt", _labels("flood"), 60))
    expected["corrupt"] = "decode_error"
    (root / "data/synthetic/images/corrupt.png").write_bytes(b"not a png at all")
    buf = io.BytesIO()
    _render(_labels("fire"), 5).save(buf, "PNG")
    rows.append(_row("truncated", _labels("fire"), 61))
    expected["truncated"] = "decode_error"
    (root / "data/synthetic/images/truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])

    synthetic = pd.DataFrame(rows)
    intended = {Path(r["file"]).stem: {t: r[t] for t in TASKS} for r in rows}
    return synthetic, real, intended, expected


def _config(**kw) -> FilterConfig:
    return FilterConfig.from_params(section("filter", **kw))


def _by_name(decisions: pd.DataFrame) -> pd.DataFrame:
    return decisions.set_index(decisions["file"].map(lambda f: Path(f).stem))


# ---------------------------------------------------------------------------------------------
# Perceptual hashes


def test_phash_separates_copies_from_distinct_images():
    rng = np.random.default_rng(0)
    labels = sample_labels(40, rng).to_dict("records")
    imgs = [render_image(lab, 64, rng) for lab in labels]
    hs = hash_size_for_bits(256)
    h = np.stack([image_hash(im, "phash", hs) for im in imgs])
    d = hamming(h, h)
    off_diagonal = d[~np.eye(len(imgs), dtype=bool)]
    assert (np.diag(d) == 0).all()
    # Distinct demo renders are far apart; noisy/JPEG copies stay close (default threshold 24).
    assert off_diagonal.min() > 40
    copies = np.array([int(hamming(h[i], image_hash(_perturb(imgs[i], seed=i), "phash", hs))[0, 0]) for i in range(10)])
    assert copies.max() <= 24, copies


def test_dhash_and_bit_helpers():
    img = _render(_labels("flood"), 0)
    assert image_hash(img, "dhash", 8).shape == (1,)
    assert image_hash(img, "phash", 16).shape == (4,)
    with pytest.raises(ValueError, match="square"):
        hash_size_for_bits(100 + 1)
    with pytest.raises(ValueError, match="unknown hash kind"):
        image_hash(img, "ahash", 8)
    # Packed Hamming distance equals the bitwise count on the unpacked bits.
    rng = np.random.default_rng(1)
    a, b = rng.random(144) < 0.5, rng.random(144) < 0.5
    assert int(hamming(pack_bits(a), pack_bits(b))[0, 0]) == int((a != b).sum())


def test_greedy_duplicates_keeps_first_and_compares_with_kept_only():
    # Bits: A=0…, B = A with 3 bits flipped, C = B with 3 more (6 from A), D far away.
    base = np.zeros(64, dtype=bool)
    b = base.copy()
    b[:3] = True
    c = b.copy()
    c[3:6] = True
    d = ~base
    h = np.stack([pack_bits(x) for x in (base, b, c, d)])
    dup_of, dist = greedy_duplicates(h, threshold=4)
    # B is within 4 of A → duplicate of A; C is 3 from B but B is not kept, and 6 from A → kept.
    assert dup_of.tolist() == [-1, 0, -1, -1]
    assert dist.tolist() == [-1, 3, 3, 58]
    idx, dist = nearest(h[[2, 3]], h[[0, 1]])
    assert idx.tolist() == [1, 1] and dist.tolist() == [3, 61]
    idx, dist = nearest(h[:1], h[:0])
    assert idx.tolist() == [-1] and dist.tolist() == [-1]


# ---------------------------------------------------------------------------------------------
# The gate with the classifier method


def test_every_rule_rejects_with_its_reason(pool, tmp_path):
    synthetic, real, intended, expected = pool
    fake = FakePredictor(intended, favour={"wrong_label": {"disaster_types": "not_disaster"}})
    result = filter_synthetic(synthetic, _config(), real=real, root=tmp_path, predictor=fake)
    d = _by_name(result.decisions)
    assert d["reason"].to_dict() == expected
    # The first by plan id stays even though the copy comes first in the file.
    assert d.at["copy_of_flood", "dup_synthetic_of"] == d.at["good_flood", "image_path"]
    assert d.at["copy_of_flood", "dup_synthetic_dist"] == 0
    assert d.at["perturbed_fire", "dup_synthetic_of"] == d.at["good_fire", "image_path"]
    assert 0 < d.at["perturbed_fire", "dup_synthetic_dist"] <= 24
    assert d.at["memorised_real", "dup_real_of"] == "data/real/real_2.jpg"
    assert d.at["memorised_real", "rule_duplicate_synthetic"] == "skip"
    assert d.at["good_flood", "dup_real_of"] == "" and d.at["good_flood", "dup_real_dist"] > 24
    # All rules are recorded, not just the first failure.
    assert d.at["blank_grey", "rule_decode"] == "pass"
    assert d.at["blank_grey", "rule_blank"] == "fail"
    assert d.at["blank_grey", "rule_duplicate_synthetic"] == "skip"  # blanks take no part in dedup
    assert d.at["blank_grey", "rule_label"] == "pass"  # the classifier still sees it (fake says yes)
    assert d.at["corrupt", "rule_decode"] == "fail" and d.at["corrupt", "rule_label"] == "skip"
    assert "cannot identify image" in d.at["corrupt", "decode_error"]
    assert d.at["truncated", "decode_error"] != ""
    assert d.at["wrong_label", "rule_label"] == "fail"
    assert d.at["wrong_label", "p_intended_disaster_types"] == pytest.approx(0.1 / 6)
    assert d.at["wrong_label", "pred_disaster_types"] == "not_disaster"
    assert d.at["copy_of_flood", "rule_label"] == "pass"
    assert d.at["near_constant", "pixel_std"] < 8.0
    assert d.at["blank_grey", "dominant_share"] == 1.0
    assert d.at["blank_grey", "blank_cause"] == "low_std,dominant_colour"
    assert d.at["flagged", "blank_cause"] == "generator_flag"
    assert d.at["good_fire", "blank_cause"] == ""
    # The undecodable files never reach the classifier.
    assert all("corrupt" not in f and "truncated" not in f for f in fake.calls[0])
    assert len(fake.calls) == 1 and len(fake.calls[0]) == len(synthetic) - 2

    kept = kept_manifest(result.kept)
    assert sorted(Path(f).stem for f in kept["file"]) == sorted(n for n, r in expected.items() if r == "kept")
    assert list(kept.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert {f"p_intended_{t}" for t in TASKS} <= set(kept.columns)
    assert not any(c.startswith("rule_") for c in kept.columns)


def test_metrics_count_reasons_classes_and_agreement(pool, tmp_path):
    synthetic, real, intended, expected = pool
    fake = FakePredictor(intended, favour={"wrong_label": {"disaster_types": "not_disaster"},
                                           "good_earthquake": {"damage_severity": "mild"}}, p=0.9)
    cfg = _config(threshold=0.5, tasks=("disaster_types", "informative"))
    m = filter_synthetic(synthetic, cfg, real=real, root=tmp_path, predictor=fake).metrics
    n = len(expected)
    n_kept = sum(r == "kept" for r in expected.values())
    assert m["total"] == n and m["kept"] == n_kept
    assert m["kept_share"] == round(n_kept / n, 4)
    assert m["rejected"] == {
        "decode_error": 2, "blank": 3, "duplicate_real": 1, "duplicate_synthetic": 2,
        "label_mismatch": 1, "judge_disagrees": 0, "judge_failed": 0,
    }
    assert m["real_images_checked"] == 4 and m["real_hash_errors"] == 0
    # Per class: flood has good_flood (kept), its copy, blank_grey and corrupt.
    assert m["per_class"]["disaster_types"]["flood"] == {"total": 4, "kept": 1, "kept_share": 0.25}
    assert m["per_class"]["disaster_types"]["landslide"] == {"total": 2, "kept": 1, "kept_share": 0.5}
    # Agreement over all decodable images (2 undecodable): one disaster miss, one damage miss.
    scored = n - 2
    c = m["classifier"]
    assert c["scored"] == scored
    assert c["agreement"]["disaster_types"] == round((scored - 1) / scored, 4)
    assert c["agreement"]["damage_severity"] == round((scored - 1) / scored, 4)
    assert c["agreement"]["humanitarian"] == 1.0
    assert c["agreement_per_class"]["disaster_types"]["landslide"] == 0.5
    # good_earthquake's damage is wrong but damage is not a checked task: it is kept.
    assert c["agreement_kept"]["damage_severity"] == round((n_kept - 1) / n_kept, 4)
    assert m["failed_rule"]["label"] == 1


def test_threshold_per_task_and_tasks_subset(pool, tmp_path):
    synthetic, real, intended, _ = pool
    favour = {"good_fire": {"damage_severity": "mild"}}
    fake = FakePredictor(intended, favour=favour, p=0.6)
    # Damage checked: good_fire fails on damage.
    d = _by_name(filter_synthetic(synthetic, _config(threshold=0.5), real=real, root=tmp_path, predictor=fake).decisions)
    assert d.at["good_fire", "reason"] == "label_mismatch"
    # Damage not checked: kept.
    d = _by_name(filter_synthetic(synthetic, _config(tasks=["disaster_types"]), real=real, root=tmp_path, predictor=fake).decisions)
    assert d.at["good_fire", "reason"] == "kept"
    # A per-task threshold above the model's confidence rejects everything that was kept.
    cfg = _config(tasks=["disaster_types", "humanitarian"], threshold={"disaster_types": 0.7, "humanitarian": 0.1})
    d = _by_name(filter_synthetic(synthetic, cfg, real=real, root=tmp_path, predictor=fake).decisions)
    assert set(d.loc[d["rule_label"] == "pass", "reason"]) <= {"blank", "duplicate_synthetic", "duplicate_real"}
    assert (d["reason"] == "kept").sum() == 0
    with pytest.raises(ValueError, match="no value for checked task"):
        _config(tasks=["informative"], threshold={"disaster_types": 0.5})


def test_method_none_and_no_real_check(pool, tmp_path):
    synthetic, real, intended, expected = pool
    cfg = _config(method="none", classifier_model=None, check_real_duplicates=False)
    d = _by_name(filter_synthetic(synthetic, cfg, real=real, root=tmp_path).decisions)
    assert d.at["wrong_label", "reason"] == "kept"
    assert d.at["memorised_real", "reason"] == "kept"
    assert (d["rule_duplicate_real"] == "skip").all()
    assert "p_intended_disaster_types" not in d.columns


def test_bad_inputs_are_named(pool, tmp_path):
    synthetic, real, intended, _ = pool
    bad = synthetic.copy()
    bad.loc[3, "disaster_types"] = "tsunami"
    with pytest.raises(ValueError, match=r"row 5 .*tsunami"):
        filter_synthetic(bad, _config(), real=real, root=tmp_path, predictor=FakePredictor(intended))

    def wrong_shape(model_dir, files, **kw):
        return {t: np.ones((len(files), 2)) for t in TASKS}

    with pytest.raises(ValueError, match=r"damage_severity probabilities have shape \(\d+, 2\)"):
        filter_synthetic(synthetic, _config(), real=real, root=tmp_path, predictor=wrong_shape)
    with pytest.raises(ValueError, match="unknown key"):
        FilterConfig.from_params({**section("filter"), "treshold": 0.5})
    missing = section("filter")
    del missing["threshold"]
    with pytest.raises(KeyError, match=r"params.yaml: missing key filter.threshold"):
        FilterConfig.from_params(missing)
    with pytest.raises(ValueError, match="method"):
        _config(method="clip")
    with pytest.raises(ValueError, match="no judge"):
        filter_synthetic(synthetic, _config(method="vlm"), real=real, root=tmp_path, predictor=FakePredictor(intended))


def test_real_hashes_are_cached(pool, tmp_path, monkeypatch):
    synthetic, real, intended, _ = pool
    files = [str(tmp_path / f) for f in real["file"]]
    calls = []
    original = filtering.measure_images

    def counting(files_, *a, **kw):
        calls.append(len(files_))
        return original(files_, *a, **kw)

    monkeypatch.setattr(filtering, "measure_images", counting)
    cache = tmp_path / "cache"
    h1, ok1 = filtering.real_image_hashes(files, "phash", 256, cache_dir=cache)
    h2, ok2 = filtering.real_image_hashes(files, "phash", 256, cache_dir=cache)
    assert calls == [4, 0] and ok1.all() and ok2.all()
    np.testing.assert_array_equal(h1, h2)
    # A changed file is hashed again; a missing one is reported, not fatal.
    Image.new("RGB", (64, 64), (10, 200, 30)).save(files[0], quality=90)
    files.append(str(tmp_path / "data/real/missing.jpg"))
    h3, ok3 = filtering.real_image_hashes(files, "phash", 256, cache_dir=cache)
    assert calls[-1] == 1 and ok3.tolist() == [True] * 4 + [False] and len(h3) == 4
    assert not (h3[0] == h1[0]).all()


# ---------------------------------------------------------------------------------------------
# The VLM judge (a fake judge here; through the LLM client and the fake API server below)


def test_vlm_method_with_a_judge_callable(pool, tmp_path):
    synthetic, real, intended, expected = pool
    seen = []

    def judge(files):
        seen.extend(files)
        out = []
        for f in files:
            name = Path(f).stem
            labels = dict(intended[name])
            if name == "good_fire":
                return_fail = JudgeVerdict(None, "refusal: content policy")
                out.append(return_fail)
                continue
            if name == "good_hurricane":
                labels["disaster_types"] = "flood"
            if name == "good_earthquake":
                labels["damage_severity"] = "little_or_none"  # unchecked below
            out.append(JudgeVerdict(labels, input_tokens=100, output_tokens=20))
        return out

    cfg = _config(method="vlm", tasks=["disaster_types", "humanitarian", "informative"], classifier_model=None)
    result = filter_synthetic(synthetic, cfg, real=real, root=tmp_path, judge=judge)
    d = _by_name(result.decisions)
    # Only images that passed the cheap rules are sent (paid calls).
    assert sorted(Path(f).stem for f in seen) == sorted(
        n for n, r in expected.items() if r in ("kept", "label_mismatch")
    )
    assert d.at["good_fire", "reason"] == "judge_failed"
    assert d.at["good_fire", "judge_failure"] == "refusal: content policy"
    assert d.at["good_hurricane", "reason"] == "judge_disagrees"
    assert d.at["good_hurricane", "judge_disaster_types"] == "flood"
    assert d.at["good_earthquake", "reason"] == "kept"
    assert d.at["good_earthquake", "judge_agree_damage_severity"] is False
    assert d.at["wrong_label", "reason"] == "kept"  # the judge agreed
    assert d.at["blank_grey", "rule_label"] == "skip" and d.at["blank_grey", "judge_status"] == "not_run"
    m = result.metrics
    assert m["rejected"]["judge_failed"] == 1 and m["rejected"]["judge_disagrees"] == 1
    assert m["judge"]["requests"] == len(seen) and m["judge"]["failed"] == 1
    assert m["judge"]["failures"] == {"refusal: content policy": 1}
    assert m["judge"]["input_tokens"] == 100 * (len(seen) - 1)
    ok = len(seen) - 1
    assert m["judge"]["agreement"]["disaster_types"] == round((ok - 1) / ok, 4)
    assert m["judge"]["agreement"]["damage_severity"] == round((ok - 1) / ok, 4)
    assert "classifier" not in m


# ---------------------------------------------------------------------------------------------
# Grid and the stage end to end


@pytest.mark.slow
def test_grid_png_is_written(pool, tmp_path):
    synthetic, real, intended, _ = pool
    fake = FakePredictor(intended, favour={"wrong_label": {"disaster_types": "not_disaster"}})
    result = filter_synthetic(synthetic, _config(), real=real, root=tmp_path, predictor=fake)
    out = tmp_path / "plots/filter_grid.png"
    plot_filter_grid(result.decisions, out, root=tmp_path, per_class=3, cell=64)
    with Image.open(out) as im:
        assert im.format == "PNG"
        w, h = im.size
    # 7 class rows × 6 sample columns at ~1.2 in per cell and 110 dpi.
    assert h > 7 * 100 and w > 6 * 100
    assert not list(out.parent.glob(".*tmp*"))


def _write_stage_inputs(tmp_path: Path, synthetic: pd.DataFrame, real: pd.DataFrame, method: str) -> None:
    write_tsv(synthetic, tmp_path / "data/synthetic/manifest.tsv")
    write_manifest(real, tmp_path / "data/variants/relabelled/train.tsv")
    (tmp_path / "params.yaml").write_text(
        "filter:\n"
        f"  method: {method}\n"
        "  threshold: 0.5\n"
        "  tasks: [damage_severity, informative, humanitarian, disaster_types]\n"
        "  blank_std: 8.0\n"
        "  blank_dominant_share: 0.95\n"
        "  hash: phash\n"
        "  phash_bits: 256\n"
        "  phash_threshold: 24\n"
        "  check_real_duplicates: true\n"
        "  classifier_model: models/original-small_cnn\n"
        "  batch_size: 64\n"
        "  device: cpu\n"
        "  loader: auto\n"
        "  workers: 0\n"
        "  cache_dir: .filter_cache\n"
        "  grid_per_class: 3\n"
        + ("" if method == "vlm" else "  vlm: {}\n")  # the vlm test appends its own section
    )


def _run_stage(paths: FilterPaths | None = None, predictor=None) -> None:
    # What stages/filter.py does, in-process: params.yaml of the cwd, the package's stage steps.
    config = FilterConfig.from_params(load_params()["filter"])
    paths = paths or FilterPaths()
    write_filter_outputs(run_filter(config, paths, predictor=predictor), config, paths)


def test_stage_writes_all_outputs(pool, tmp_path, monkeypatch):
    synthetic, real, intended, expected = pool
    _write_stage_inputs(tmp_path, synthetic, real, "classifier")
    fake = FakePredictor(intended, favour={"wrong_label": {"disaster_types": "not_disaster"}})
    monkeypatch.chdir(tmp_path)
    _run_stage(predictor=fake)
    kept = read_manifest("data/filtered/manifest.tsv")
    decisions = pd.read_csv("data/filtered/decisions.tsv", sep="\t", dtype=str, keep_default_na=False)
    metrics = json.loads(Path("metrics/filter.json").read_text())
    assert len(decisions) == len(synthetic)
    assert sorted(Path(f).stem for f in kept["file"]) == sorted(n for n, r in expected.items() if r == "kept")
    assert dict(zip(decisions["file"].map(lambda f: Path(f).stem), decisions["reason"])) == expected
    assert {f"rule_{r}" for r in filtering.RULES} <= set(decisions.columns)
    assert metrics["kept"] == len(kept) and metrics["total"] == len(synthetic)
    assert metrics["classifier"]["agreement"]["disaster_types"] < 1.0
    assert Path("plots/filter_grid.png").stat().st_size > 10_000
    assert list(Path(".filter_cache").glob("real_phash_256.npz"))


@pytest.mark.slow
def test_vlm_judge_through_the_api_server(pool, tmp_path, monkeypatch):
    """The stage with ``method: vlm`` against the fake OpenAI API: agree, disagree, refuse, garble."""
    import hashlib

    from tests.api_server import FakeLLMServer, answer, malformed, refusal

    synthetic, real, intended, expected = pool
    repo = Path(__file__).resolve().parents[1]
    by_sha = {
        hashlib.sha256((tmp_path / f).read_bytes()).hexdigest(): Path(f).stem
        for f in synthetic["file"]
    }
    seen: list[str] = []

    def responder(request):
        name = by_sha[request.image_sha256s[0]]
        seen.append(name)
        labels = dict(intended[name])
        if name == "good_hurricane":
            labels["disaster_types"] = "flood"
            return answer(labels)
        if name == "good_fire":
            return refusal()  # refused twice (prompt and fallback) → judge_failed
        if name == "good_landslide":
            return malformed()
        return answer(labels)

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.chdir(tmp_path)
    with FakeLLMServer(responder) as server:
        _write_stage_inputs(tmp_path, synthetic, real, "vlm")
        with open("params.yaml", "a") as fh:
            fh.write(
                "  vlm:\n"
                "    provider: openai\n"
                "    model: gpt-test\n"
                f"    base_url: {server.openai_base_url}\n"
                "    max_retries: 0\n"
                "    concurrency: 2\n"
                "    cache_dir: .llm_cache\n"
            )
        text = Path("params.yaml").read_text().replace("classifier_model: models/original-small_cnn", "classifier_model: null")
        Path("params.yaml").write_text(text)
        prompts = FilterPaths(judge_system=str(repo / "prompts/judge_system.txt"),
                              judge_user=str(repo / "prompts/judge_user.txt"), prompt_dir=str(repo / "prompts"))
        _run_stage(prompts)
        first_count = server.count()
        # The prompt is blind: no intended label is in what the judge sees; the schema asks for all four.
        req = server.requests[0]
        assert req.system == (repo / "prompts/judge_system.txt").read_text().strip()
        assert set(req.schema["properties"]) == set(TASKS)
        # A second run (e.g. after a kill) answers from the cache: no request is paid twice.
        _run_stage(prompts)
        assert server.count() == first_count

    judged = sorted(n for n, r in expected.items() if r in ("kept", "label_mismatch"))
    # good_fire: prompt + refusal fallback = 2 calls; everyone else 1.
    assert sorted(set(seen)) == judged and first_count == len(judged) + 1
    decisions = pd.read_csv("data/filtered/decisions.tsv", sep="\t", dtype=str, keep_default_na=False)
    d = decisions.set_index(decisions["file"].map(lambda f: Path(f).stem))
    assert d.at["good_flood", "reason"] == "kept" and d.at["good_flood", "judge_status"] == "ok"
    assert d.at["good_hurricane", "reason"] == "judge_disagrees"
    assert d.at["good_hurricane", "judge_disaster_types"] == "flood"
    assert d.at["good_fire", "reason"] == "judge_failed" and d.at["good_fire", "judge_failure"] == "refusal"
    assert d.at["good_landslide", "reason"] == "judge_failed"
    assert d.at["good_landslide", "judge_failure"] == "invalid_json"
    assert d.at["blank_grey", "judge_status"] == "not_run"
    metrics = json.loads(Path("metrics/filter.json").read_text())
    assert metrics["rejected"]["judge_failed"] == 2 and metrics["rejected"]["judge_disagrees"] == 1
    assert metrics["judge"]["failures"] == {"invalid_json": 1, "refusal": 1}
    assert metrics["judge"]["requests"] == len(judged)
    assert metrics["judge"]["cached"] == len(judged)  # the second run's view
    kept = read_manifest("data/filtered/manifest.tsv")
    assert sorted(Path(f).stem for f in kept["file"]) == sorted(
        n for n in judged if n not in ("good_hurricane", "good_fire", "good_landslide")
    )


@pytest.mark.slow
def test_with_the_real_predictor(pool, tmp_path):
    """The gate through ``medicsynth.inference.predict_proba`` on a saved (untrained) small CNN."""
    from medicsynth.inference import predict_proba
    from medicsynth.models import build_classifier, save_classifier

    synthetic, real, intended, expected = pool
    save_classifier(build_classifier("small_cnn", pretrained=False, dropout=0.2), tmp_path / "models/original-small_cnn/model.pt",
                    {"arch": "small_cnn", "resize": 64, "crop": 56, "dropout": 0.2})
    calls = []

    def recording(model_dir, files, **kw):
        calls.append((list(files), predict_proba(model_dir, files, **kw)))
        return calls[-1][1]

    cfg = _config(threshold=0.0, loader="torch", batch_size=8)
    result = filter_synthetic(synthetic, cfg, real=real, root=tmp_path, predictor=recording)
    d = _by_name(result.decisions)
    # Threshold 0: the label rule passes everything the model scored, so only the other rules reject.
    assert d["reason"].to_dict() == {n: ("kept" if r == "label_mismatch" else r) for n, r in expected.items()}
    (files, probs), = calls
    for task in TASKS:
        assert probs[task].shape == (len(synthetic) - 2, len(CLASSES[task]))
        np.testing.assert_allclose(probs[task].sum(axis=1), 1.0, atol=1e-5)
    row = [Path(f).stem for f in files].index("good_flood")
    idx = CLASSES["disaster_types"].index("flood")
    assert d.at["good_flood", "p_intended_disaster_types"] == pytest.approx(probs["disaster_types"][row, idx])
    assert 0.0 <= result.metrics["classifier"]["agreement"]["disaster_types"] <= 1.0


def test_empty_pool_gives_empty_outputs(pool, tmp_path):
    synthetic, real, intended, _ = pool
    empty = synthetic.iloc[:0]
    result = filter_synthetic(empty, _config(), real=real, root=tmp_path, predictor=FakePredictor(intended))
    assert len(result.decisions) == 0 and len(result.kept) == 0
    assert result.metrics["total"] == 0 and result.metrics["kept_share"] is None
    write_manifest(kept_manifest(result.kept), tmp_path / "out/manifest.tsv")
    assert len(read_manifest(tmp_path / "out/manifest.tsv")) == 0
    plot_filter_grid(result.decisions, tmp_path / "out/grid.png", root=tmp_path, per_class=2, cell=32)
    assert (tmp_path / "out/grid.png").stat().st_size > 0
