"""The quality gate for synthetic images: decode, blank, near-duplicate and label-consistency rules.

Every synthetic image goes through the rules in a fixed order, cheapest first:

1. ``decode``: the file exists and decodes completely.
2. ``blank``: not blank or near-constant — the largest per-channel pixel standard deviation is at
   least ``blank_std`` *and* no single (coarsely quantised) colour covers ``blank_dominant_share``
   of the image; an image the generator flagged (``blank_flag``, e.g. a safety-checker black
   frame) fails too.
3. ``duplicate_real``: its perceptual hash is more than ``phash_threshold`` bits away from every
   real training image (a memorised training photo must not pass as synthetic).
4. ``duplicate_synthetic``: among the images that passed rules 1–3, ordered by plan id then
   seed, no earlier image that is itself kept by this rule lies within ``phash_threshold`` bits:
   of a group of near-copies the first one stays. (Images that fail the later label rule still
   count as "first": the rules run cheapest first so that the paid judge sees fewer images.)
5. ``label``: the image shows what it was generated for, judged by ``method``:

   - ``classifier``: the original model gives the intended label probability ≥ ``threshold`` on
     every checked task (``tasks``);
   - ``vlm``: a vision-language judge, asked blind for all four labels, returns the intended
     label on every checked task; a failed call rejects the image as ``judge_failed``;
   - ``none``: no label check.

Every rule is recorded for every image (``rule_<name>`` = ``pass`` / ``fail`` / ``skip``) with
its measurements, and ``reason`` names the first failing rule (``kept`` if none). Rules 2–3 and
the classifier are evaluated for every image that decodes, rule 4 for the images that passed
1–3, and the judge, a paid call, only for images that passed 1–4; ``skip`` marks a rule that was
not evaluated.

Whenever a classifier model is given its predictions are recorded, whatever the method: the
share of generated images whose argmax equals the intended label (``agreement``) measures the
generator's fidelity, and is computed on *all* decodable images, before any filtering.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from medicsynth.timing import write_metrics
from medicsynth.io import atomic_path, write_json
from medicsynth.labels import CLASSES, NUM_CLASSES, TASKS, label_index, validate_label
from medicsynth.manifest import (COLUMNS, canonical_labels, read_manifest, resolve_file, split_ref, write_manifest,
                                 write_tsv)
from medicsynth.shards import open_image
from medicsynth.params import from_section
from medicsynth.phash import HASH_KINDS, greedy_duplicates, hash_size_for_bits, image_hash, nearest, words_for_bits

METHODS: tuple[str, ...] = ("classifier", "vlm", "none")
RULES: tuple[str, ...] = ("decode", "blank", "duplicate_real", "duplicate_synthetic", "label")
# ``reason`` values, in rule order; the label rule has one reason per way of failing it.
REASONS: tuple[str, ...] = (
    "decode_error",
    "blank",
    "duplicate_real",
    "duplicate_synthetic",
    "label_mismatch",
    "judge_disagrees",
    "judge_failed",
)
KEPT = "kept"
PASS, FAIL, SKIP = "pass", "fail", "skip"

# Blank test on a thumbnail: a near-constant image stays near-constant when shrunk, and the
# statistics of a 128-px thumbnail cost a fraction of a full-size pass.
BLANK_THUMBNAIL = 128
# Colours are quantised to this many bits per channel before counting the dominant one, so
# noise or JPEG ringing on a flat frame does not split it into many colours.
DOMINANT_COLOUR_BITS = 4


@dataclass
class FilterConfig:
    """Settings of the quality gate (params.yaml section ``filter``; see :meth:`from_params`)."""

    # No defaults: params.yaml is the one source of values (build with :meth:`from_params`).
    method: str
    threshold: float | dict[str, float]
    tasks: tuple[str, ...]
    blank_std: float
    blank_dominant_share: float
    hash: str
    phash_bits: int
    phash_threshold: int
    check_real_duplicates: bool
    classifier_model: str | None
    batch_size: int
    device: str
    loader: str
    workers: int
    cache_dir: str | None
    grid_per_class: int
    vlm: dict[str, Any]

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"filter.method {self.method!r} not in {METHODS}")
        self.tasks = tuple(self.tasks)
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"filter.tasks {list(self.tasks)!r}: expected a non-empty subset of {TASKS}")
        if self.hash not in HASH_KINDS:
            raise ValueError(f"filter.hash {self.hash!r} not in {HASH_KINDS}")
        hash_size_for_bits(self.phash_bits)  # raises on a non-square bit count
        if not 0 <= self.phash_threshold < self.phash_bits:
            raise ValueError(f"filter.phash_threshold {self.phash_threshold} outside [0, {self.phash_bits})")
        for task in self.tasks:
            p = self.threshold_for(task)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"filter.threshold for {task} is {p}; expected a probability in [0, 1]")
        if self.method == "classifier" and not self.classifier_model:
            raise ValueError("filter.method is 'classifier' but filter.classifier_model is empty")

    def threshold_for(self, task: str) -> float:
        """Probability threshold of ``task`` (``threshold`` may be one number or one per task)."""
        if isinstance(self.threshold, Mapping):
            if task not in self.threshold:
                raise ValueError(f"filter.threshold has no value for checked task {task!r}")
            return float(self.threshold[task])
        return float(self.threshold)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> FilterConfig:
        """Build from the ``filter`` section (``params`` is that section).

        Every field is a required key (a missing one raises ``KeyError`` naming ``filter.<key>``);
        an unknown key raises ``ValueError`` (a typo must not pass).
        """
        return from_section(cls, {"filter": params}, "filter")


# ---------------------------------------------------------------------------------------------
# Per-image checks (decode, blank statistics, hash) — one decode per file.


@dataclass(frozen=True)
class ImageStats:
    """What one decode of an image gave: an error, or its blank statistics and packed hash."""

    error: str = ""
    pixel_std: float = float("nan")
    dominant_share: float = float("nan")
    hash: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        """True when the image decoded (no ``error``)."""
        return not self.error


def image_stats(path: str | Path, hash_kind: str = "phash", hash_bits: int = 256) -> ImageStats:
    """Decode ``path`` completely and measure it; never raises for a bad file (returns ``error``)."""
    try:
        with open_image(path) as im:
            # JPEG can decode at 1/2–1/8 scale for almost nothing; the statistics and hashes are
            # taken from small thumbnails anyway. The whole stream is still read, so truncation
            # is still caught.
            im.draft("RGB", (BLANK_THUMBNAIL, BLANK_THUMBNAIL))
            im.load()
            rgb = im.convert("RGB")
    except FileNotFoundError:
        return ImageStats(error=f"file not found: {path}")
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        return ImageStats(error=f"{type(exc).__name__}: {exc}")
    if min(rgb.size) < 1:
        return ImageStats(error=f"empty image {rgb.size}")
    thumb = rgb.copy()
    thumb.thumbnail((BLANK_THUMBNAIL, BLANK_THUMBNAIL), Image.Resampling.BILINEAR)
    pixels = np.asarray(thumb).reshape(-1, 3)
    pixel_std = float(pixels.std(axis=0).max())
    shift = 8 - DOMINANT_COLOUR_BITS
    q = (pixels >> shift).astype(np.int64)
    code = (q[:, 0] << (2 * DOMINANT_COLOUR_BITS)) | (q[:, 1] << DOMINANT_COLOUR_BITS) | q[:, 2]
    dominant = float(np.bincount(code).max() / len(code))
    hashed = image_hash(rgb, hash_kind, hash_size_for_bits(hash_bits))
    return ImageStats(pixel_std=pixel_std, dominant_share=dominant, hash=hashed)


def _image_stats_args(args: tuple[str, str, int]) -> ImageStats:
    return image_stats(*args)


def measure_images(
    files: Sequence[str], hash_kind: str, hash_bits: int, *, workers: int = 0, desc: str = "images"
) -> list[ImageStats]:
    """:func:`image_stats` for every file, in order; ``workers`` > 0 spreads it over processes."""
    jobs = [(str(f), hash_kind, hash_bits) for f in files]
    if workers and workers > 0 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            it = pool.map(_image_stats_args, jobs, chunksize=64)
            return list(tqdm(it, total=len(jobs), desc=desc, leave=False))
    return [_image_stats_args(j) for j in tqdm(jobs, desc=desc, leave=False)]


def real_image_hashes(
    files: Sequence[str],
    hash_kind: str,
    hash_bits: int,
    *,
    workers: int = 0,
    cache_dir: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Packed hashes of the real images; returns ``(hashes (m, w), ok mask (n,))``.

    Files that fail to decode are left out (``ok`` False) — real-image problems belong to the
    prepare stage, and one bad photo must not stop the filter. With ``cache_dir`` the hashes are
    kept in a file keyed by path, size and modification time, so re-running the filter after a
    new generation round does not hash 50k MEDIC photos again (a shard member is keyed by its
    reference and its shard's size and time).
    """
    words = words_for_bits(hash_bits)
    keys = []
    for f in files:
        try:
            st = os.stat(split_ref(f)[0])  # a shard member: its shard's size and time
            keys.append(f"{f}|{st.st_size}|{st.st_mtime_ns}")
        except OSError:
            keys.append("")  # missing: never cached, reported as not ok below
    cache: dict[str, np.ndarray] = {}
    cache_path = Path(cache_dir) / f"real_{hash_kind}_{hash_bits}.npz" if cache_dir else None
    if cache_path is not None and cache_path.exists():
        with np.load(cache_path, allow_pickle=False) as npz:
            cache = dict(zip(npz["keys"].tolist(), npz["hashes"]))
    todo = [i for i, k in enumerate(keys) if k and k not in cache]
    stats = measure_images([files[i] for i in todo], hash_kind, hash_bits, workers=workers, desc="hash real")
    for i, s in zip(todo, stats):
        if s.ok:
            cache[keys[i]] = s.hash
    if cache_path is not None and todo:
        _save_cache(cache_path, cache, words)
    ok = np.array([bool(k) and k in cache for k in keys], dtype=bool)
    rows = [cache[k] for k, good in zip(keys, ok) if good]
    hashes = np.stack(rows) if rows else np.zeros((0, words), np.uint64)
    return hashes, ok


def _save_cache(path: Path, cache: dict[str, np.ndarray], words: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = np.array(list(cache), dtype=str)
    hashes = np.stack(list(cache.values())) if cache else np.zeros((0, words), np.uint64)
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, keys=keys, hashes=hashes)


# ---------------------------------------------------------------------------------------------
# Label consistency: the original classifier and the VLM judge.

Predictor = Callable[..., dict[str, np.ndarray]]


def classifier_scores(
    files: Sequence[str],
    intended: pd.DataFrame,
    model_dir: str,
    *,
    predictor: Predictor | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    loader: str = "auto",
) -> pd.DataFrame:
    """The original model's view of each image: ``p_intended_<task>``, ``pred_<task>``, ``agree_<task>``.

    ``intended`` holds the four task labels of each file (same order). ``predictor`` defaults to
    :func:`medicsynth.inference.predict_proba`; its probabilities must follow ``CLASSES`` order.
    """
    if predictor is None:
        from medicsynth.inference import predict_proba as predictor
    out = pd.DataFrame(index=intended.index)
    if len(files) == 0:
        for task in TASKS:
            out[f"p_intended_{task}"] = pd.Series(dtype=float)
            out[f"pred_{task}"] = pd.Series(dtype=object)
            out[f"agree_{task}"] = pd.Series(dtype=bool)
        return out
    probs = predictor(model_dir, list(files), batch_size=batch_size, device=device, loader=loader)
    for task in TASKS:
        p = np.asarray(probs.get(task) if isinstance(probs, Mapping) else None)
        if p.ndim != 2 or p.shape != (len(files), NUM_CLASSES[task]):
            raise ValueError(
                f"classifier {model_dir}: {task} probabilities have shape {getattr(p, 'shape', None)}, "
                f"expected ({len(files)}, {NUM_CLASSES[task]})"
            )
        idx = np.array([label_index(task, v) for v in intended[task]], dtype=np.int64)
        out[f"p_intended_{task}"] = p[np.arange(len(files)), idx]
        pred = p.argmax(axis=1)
        out[f"pred_{task}"] = [CLASSES[task][k] for k in pred]
        out[f"agree_{task}"] = pred == idx
    return out


@dataclass(frozen=True)
class JudgeVerdict:
    """A judge's answer for one image: four labels, or ``labels=None`` and why it failed.

    ``failure`` is a short token for counting (the LLM client's reason: ``refusal``,
    ``invalid_answer``, ``retries_exhausted``...), ``detail`` the message behind it.
    """

    labels: dict[str, str] | None
    failure: str = ""
    detail: str = ""
    cached: bool = False
    input_tokens: int = 0
    output_tokens: int = 0


Judge = Callable[[Sequence[str]], list[JudgeVerdict]]


def llm_judge(
    client: Any, system: str, user: str, *, fallback_prompt: str | None = None, desc: str = "judge"
) -> Judge:
    """A :data:`Judge` asking ``client`` (a :class:`medicsynth.llm.LLMClient`) for the four labels.

    The judge is blind: the prompt never shows the intended labels, so agreeing is evidence that
    the image shows them rather than that the model was led. All four labels are asked for even
    when fewer tasks are checked, so the cached answer serves whatever ``filter.tasks`` says.
    ``fallback_prompt`` replaces ``user`` for the client's one retry after a refusal. Answers
    are cached by the client, so a re-run (or a run after a kill) pays for no image twice.
    """
    from medicsynth.llm import LLMRequest, labels_json_schema, validate_labels_answer

    schema = labels_json_schema(TASKS)

    def validate(obj: Any) -> dict[str, str]:
        return validate_labels_answer(obj, TASKS)

    def judge(files: Sequence[str]) -> list[JudgeVerdict]:
        requests = [
            LLMRequest(
                prompt=user,
                system=system,
                image_path=str(f),
                schema=schema,
                schema_name="medic_labels",
                validate=validate,
                fallback_prompt=fallback_prompt,
                key=str(f),
            )
            for f in files
        ]
        verdicts = []
        for result in client.raise_if_failing(client.run(requests, desc=desc), f"{desc} verdicts"):
            common = dict(
                cached=bool(result.cached),
                input_tokens=int(result.input_tokens or 0),
                output_tokens=int(result.output_tokens or 0),
            )
            if result.ok:
                verdicts.append(JudgeVerdict(dict(result.value), **common))
            else:
                verdicts.append(JudgeVerdict(None, str(result.failure or "failed"), str(result.detail or ""), **common))
        if len(verdicts) != len(files):
            raise RuntimeError(f"judge returned {len(verdicts)} results for {len(files)} images")
        return verdicts

    return judge


# ---------------------------------------------------------------------------------------------
# The gate.


@dataclass
class FilterResult:
    """Every image with all rule outcomes (``decisions``), the kept rows, and the metrics."""

    decisions: pd.DataFrame
    kept: pd.DataFrame
    metrics: dict[str, Any]


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in {"1", "true", "yes", "y", "t"}


def _natural(series: pd.Series) -> pd.Series:
    # Plan ids and seeds may be written as numbers or strings; sort numbers numerically.
    num = pd.to_numeric(series, errors="coerce")
    return num if num.notna().all() else series.astype(str)


def pool_order(df: pd.DataFrame) -> np.ndarray:
    """Positions of ``df``'s rows sorted by plan id, then seed, then image path (stable)."""
    keys = pd.DataFrame({"_pos": np.arange(len(df))})
    by = []
    for column in ("plan_id", "seed", "image_path"):
        if column in df.columns:
            keys[column] = _natural(df[column].reset_index(drop=True))
            by.append(column)
    return keys.sort_values(by + ["_pos"], kind="stable")["_pos"].to_numpy()


def filter_synthetic(
    synthetic: pd.DataFrame,
    config: FilterConfig,
    *,
    real: pd.DataFrame | None = None,
    root: str | Path = ".",
    predictor: Predictor | None = None,
    judge: Judge | None = None,
) -> FilterResult:
    """Run the gate over the ``synthetic`` manifest; see the module docstring for the rules.

    Parameters: ``synthetic`` has ``image_path``, ``file`` and the four task columns (plus
    optional ``plan_id``, ``seed``, ``blank_flag``); ``real`` is the real training manifest (its
    ``file`` column) for the ``duplicate_real`` rule, ``None`` or
    ``config.check_real_duplicates=False`` skips that rule; ``predictor`` replaces
    :func:`medicsynth.inference.predict_proba`; ``judge`` is required with ``method='vlm'``.

    Guarantees: ``decisions`` has one row per input row, in input order, with every rule's
    outcome (``rule_<name>`` pass/fail/skip), its measurements and ``reason`` (the first failing
    rule, or ``kept``); ``kept`` holds the kept rows; the judge is asked only about images that
    passed every cheaper rule. The result depends only on the images, the manifests and ``config``.
    """
    df, files = _gate_inputs(synthetic, config, judge, root)
    decoded, blank, hashes = decode_and_blank_rule(df, files, config)
    dup_real, check_real, real_hash_errors = duplicate_real_rule(df, hashes, decoded, real, config, root)
    dup_syn, pool = duplicate_synthetic_rule(df, hashes, decoded & ~blank & ~dup_real, config)
    cheap_pass = decoded & ~blank & ~dup_real & ~dup_syn
    label = classifier_label_rule(df, files, decoded, config, root, predictor)
    judge_stats = None
    if config.method == "vlm":
        label, judge_stats = judge_label_rule(df, files, cheap_pass, config, judge)
    elif config.method == "none":
        label = LabelOutcome(
            passed=np.ones(len(df), dtype=bool),
            reason=label.reason,
            rule=np.where(decoded, PASS, SKIP).astype(object),
        )
    _record_outcomes(df, decoded, blank, dup_real, check_real, pool, dup_syn, label)
    kept = df[df["kept"]].drop(columns=["kept", "reason"]).reset_index(drop=True)
    metrics = filter_metrics(df, config, judge_stats=judge_stats, real_checked=int(len(real)) if check_real else 0,
                             real_hash_errors=real_hash_errors)
    return FilterResult(decisions=df, kept=kept, metrics=metrics)


def _gate_inputs(
    synthetic: pd.DataFrame, config: FilterConfig, judge: Judge | None, root: str | Path
) -> tuple[pd.DataFrame, list[str]]:
    # Step 0: check the inputs; the decisions table starts as the canonical synthetic manifest.
    if config.method == "vlm" and judge is None:
        raise ValueError("filter.method is 'vlm' but no judge was given")
    missing = [c for c in ("image_path", "file", *TASKS) if c not in synthetic.columns]
    if missing:
        raise ValueError(f"synthetic manifest lacks column(s) {', '.join(missing)}")
    df = canonical_labels(synthetic.reset_index(drop=True), "synthetic manifest", key="image_path")
    return df, [resolve_file(f, root) for f in df["file"]]


def decode_and_blank_rule(
    df: pd.DataFrame, files: Sequence[str], config: FilterConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rules 1–2, one decode per image: returns ``(decoded (n,), blank (n,), hashes (n, words))``.

    Adds ``decode_error``, ``pixel_std``, ``dominant_share`` and ``blank_cause`` to ``df``. An
    image is blank when the generator flagged it, its largest per-channel std is below
    ``blank_std``, or one quantised colour covers ``blank_dominant_share``; only decoded images
    can be blank. Undecodable images get an all-zero hash row (never used).
    """
    n = len(df)
    stats = measure_images(files, config.hash, config.phash_bits, workers=config.workers, desc="inspect synthetic")
    decoded = np.array([s.ok for s in stats], dtype=bool)
    df["decode_error"] = [s.error for s in stats]
    df["pixel_std"] = [round(s.pixel_std, 3) for s in stats]
    df["dominant_share"] = [round(s.dominant_share, 4) for s in stats]
    flagged = df["blank_flag"].map(_truthy).to_numpy(dtype=bool) if "blank_flag" in df else np.zeros(n, bool)
    low_std = decoded & (df["pixel_std"].to_numpy(dtype=float) < config.blank_std)
    dominant = decoded & (df["dominant_share"].to_numpy(dtype=float) >= config.blank_dominant_share)
    flagged = flagged & decoded
    blank = flagged | low_std | dominant
    df["blank_cause"] = [
        ",".join(name for name, hit in (("generator_flag", f), ("low_std", s), ("dominant_colour", c)) if hit)
        for f, s, c in zip(flagged, low_std, dominant)
    ]
    hashes = np.zeros((n, words_for_bits(config.phash_bits)), dtype=np.uint64)
    for i, s in enumerate(stats):
        if s.ok:
            hashes[i] = s.hash
    return decoded, blank, hashes


def duplicate_real_rule(
    df: pd.DataFrame,
    hashes: np.ndarray,
    decoded: np.ndarray,
    real: pd.DataFrame | None,
    config: FilterConfig,
    root: str | Path,
) -> tuple[np.ndarray, bool, int]:
    """Rule 3, near-copies of real training images: returns ``(dup_real (n,), checked, real_hash_errors)``.

    Adds ``dup_real_of`` (the real ``image_path`` within ``phash_threshold`` bits, else "") and
    ``dup_real_dist`` (distance to the nearest real image, -1 when not checked). Not checked
    (``checked`` False, nothing flagged) without ``real`` or with ``check_real_duplicates`` off.
    """
    n = len(df)
    dup_real = np.zeros(n, dtype=bool)
    df["dup_real_of"] = ""
    df["dup_real_dist"] = -1
    check_real = config.check_real_duplicates and real is not None
    if not check_real:
        return dup_real, False, 0
    if "file" not in real.columns:
        raise ValueError("real training manifest lacks the 'file' column")
    real_files = [resolve_file(f, root) for f in real["file"]]
    real_hashes, real_ok = real_image_hashes(
        real_files, config.hash, config.phash_bits, workers=config.workers, cache_dir=config.cache_dir
    )
    real_paths = real["image_path"].to_numpy()[real_ok] if "image_path" in real else np.array(real_files)[real_ok]
    rows = np.nonzero(decoded)[0]
    idx, dist = nearest(hashes[rows], real_hashes)
    has = idx >= 0
    df.loc[rows[has], "dup_real_dist"] = dist[has]
    df.loc[rows[has], "dup_real_of"] = np.where(dist[has] <= config.phash_threshold, real_paths[idx[has]], "")
    dup_real[rows[has]] = dist[has] <= config.phash_threshold
    return dup_real, True, int((~real_ok).sum())


def duplicate_synthetic_rule(
    df: pd.DataFrame, hashes: np.ndarray, eligible: np.ndarray, config: FilterConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Rule 4, near-copies within the pool: returns ``(dup_synthetic (n,), pool positions)``.

    Only ``eligible`` images (decoded, not blank, not copies of real photos) take part: a rejected
    image must not make a good one a "duplicate". In :func:`pool_order` (plan id, seed, path) the
    first image of a group of near-copies stays. Adds ``dup_synthetic_of``/``dup_synthetic_dist``.
    """
    dup_syn = np.zeros(len(df), dtype=bool)
    df["dup_synthetic_of"] = ""
    df["dup_synthetic_dist"] = -1
    order = pool_order(df)
    pool = order[eligible[order]]
    if len(pool):
        dup_of, dist = greedy_duplicates(hashes[pool], config.phash_threshold)
        df.loc[pool, "dup_synthetic_dist"] = dist
        is_dup = dup_of >= 0
        df.loc[pool[is_dup], "dup_synthetic_of"] = df["image_path"].to_numpy()[pool[dup_of[is_dup]]]
        dup_syn[pool[is_dup]] = True
    return dup_syn, pool


@dataclass
class LabelOutcome:
    """Rule 5 per image: ``passed`` (bool), ``reason`` (failure reason or ""), ``rule`` (pass/fail/skip)."""

    passed: np.ndarray
    reason: np.ndarray
    rule: np.ndarray


def classifier_label_rule(
    df: pd.DataFrame,
    files: Sequence[str],
    decoded: np.ndarray,
    config: FilterConfig,
    root: str | Path,
    predictor: Predictor | None,
) -> LabelOutcome:
    """Rule 5 with ``method='classifier'``, and the classifier's view whatever the method.

    The classifier (cheap, unpaid) sees every decodable image so that agreement measures the
    generator, not the filter: its columns (:func:`classifier_scores`) are added whenever
    ``classifier_model`` is set. Only with ``method='classifier'`` can an image fail here
    (``label_mismatch``: p(intended) below the task's threshold on a checked task).
    """
    n = len(df)
    outcome = LabelOutcome(
        passed=np.ones(n, dtype=bool),
        reason=np.full(n, "", dtype=object),
        rule=np.where(decoded, PASS, SKIP).astype(object),
    )
    if not config.classifier_model:
        return outcome
    rows = np.nonzero(decoded)[0]
    scores = classifier_scores(
        [files[i] for i in rows],
        df.loc[rows, list(TASKS)],
        resolve_file(config.classifier_model, root),
        predictor=predictor,
        batch_size=config.batch_size,
        device=config.device,
        loader=config.loader,
    )
    for column in scores.columns:
        values = np.full(n, np.nan) if column.startswith("p_") else np.full(n, None, dtype=object)
        values[rows] = scores[column].to_numpy()
        df[column] = values
    if config.method == "classifier":
        ok = np.ones(len(rows), dtype=bool)
        for task in config.tasks:
            ok &= scores[f"p_intended_{task}"].to_numpy(dtype=float) >= config.threshold_for(task)
        outcome.passed[rows] = ok
        outcome.reason[rows[~ok]] = "label_mismatch"
        outcome.rule[rows] = np.where(ok, PASS, FAIL)
    return outcome


def judge_label_rule(
    df: pd.DataFrame, files: Sequence[str], candidates: np.ndarray, config: FilterConfig, judge: Judge
) -> tuple[LabelOutcome, dict[str, Any]]:
    """Rule 5 with ``method='vlm'``: the judge is asked (paid) only about ``candidates``.

    Adds ``judge_status`` (ok/failed/not_run), ``judge_failure``, ``judge_detail``,
    ``judge_<task>`` and ``judge_agree_<task>`` to ``df``. A failed call rejects the image
    (``judge_failed``); a label differing on a checked task rejects it (``judge_disagrees``).
    Returns the outcome and the call statistics for ``metrics['judge']``.
    """
    n = len(df)
    outcome = LabelOutcome(
        passed=np.ones(n, dtype=bool), reason=np.full(n, "", dtype=object), rule=np.full(n, SKIP, dtype=object)
    )
    rows = np.nonzero(candidates)[0]
    df["judge_status"] = "not_run"
    df["judge_failure"] = ""
    df["judge_detail"] = ""
    for task in TASKS:
        df[f"judge_{task}"] = ""
        # object, not str: holds True/False for judged images and None for the others.
        df[f"judge_agree_{task}"] = pd.Series([None] * n, dtype=object)
    verdicts = judge([files[i] for i in rows]) if len(rows) else []
    if len(verdicts) != len(rows):
        raise RuntimeError(f"judge returned {len(verdicts)} verdicts for {len(rows)} images")
    verdicts = [_checked_verdict(v) for v in verdicts]
    for i, v in zip(rows, verdicts):
        if v.labels is None:
            df.at[i, "judge_status"] = "failed"
            df.at[i, "judge_failure"] = v.failure
            df.at[i, "judge_detail"] = v.detail
            outcome.passed[i] = False
            outcome.reason[i] = "judge_failed"
            outcome.rule[i] = FAIL
            continue
        df.at[i, "judge_status"] = "ok"
        agree_all = True
        for task in TASKS:
            agree = v.labels[task] == df.at[i, task]
            df.at[i, f"judge_{task}"] = v.labels[task]
            df.at[i, f"judge_agree_{task}"] = agree
            if task in config.tasks:
                agree_all &= agree
        outcome.passed[i] = agree_all
        outcome.reason[i] = "" if agree_all else "judge_disagrees"
        outcome.rule[i] = PASS if agree_all else FAIL
    stats = {
        "requests": len(rows),
        "ok": int(sum(v.labels is not None for v in verdicts)),
        "failed": int(sum(v.labels is None for v in verdicts)),
        "cached": int(sum(v.cached for v in verdicts)),
        "input_tokens": int(sum(v.input_tokens for v in verdicts)),
        "output_tokens": int(sum(v.output_tokens for v in verdicts)),
        "failures": dict(sorted(Counter(v.failure for v in verdicts if v.labels is None).items())),
    }
    return outcome, stats


def _record_outcomes(
    df: pd.DataFrame,
    decoded: np.ndarray,
    blank: np.ndarray,
    dup_real: np.ndarray,
    check_real: bool,
    pool: np.ndarray,
    dup_syn: np.ndarray,
    label: LabelOutcome,
) -> None:
    # Last step: every rule's outcome, the first failing rule (``reason``) and ``kept``.
    n = len(df)
    df["rule_decode"] = np.where(decoded, PASS, FAIL)
    df["rule_blank"] = np.where(decoded, np.where(blank, FAIL, PASS), SKIP)
    df["rule_duplicate_real"] = np.where(decoded & check_real, np.where(dup_real, FAIL, PASS), SKIP)
    in_pool = np.zeros(n, dtype=bool)
    in_pool[pool] = True
    df["rule_duplicate_synthetic"] = np.where(in_pool, np.where(dup_syn, FAIL, PASS), SKIP)
    df["rule_label"] = label.rule
    reason = np.full(n, KEPT, dtype=object)
    for mask, name in (
        (~label.passed, None),
        (dup_syn, "duplicate_synthetic"),
        (dup_real, "duplicate_real"),
        (blank, "blank"),
        (~decoded, "decode_error"),
    ):
        # Later rules first, earlier rules overwrite: what remains is the first failing rule.
        reason[mask] = label.reason[mask] if name is None else name
    df["reason"] = reason
    df["kept"] = reason == KEPT


def _checked_verdict(verdict: JudgeVerdict) -> JudgeVerdict:
    # A judge other than llm_judge may hand back partial or non-canonical labels.
    if verdict.labels is None:
        return verdict
    try:
        return replace(verdict, labels={task: validate_label(task, verdict.labels[task]) for task in TASKS})
    except (KeyError, ValueError) as exc:
        return replace(verdict, labels=None, failure="invalid_answer", detail=f"{type(exc).__name__}: {exc}")


def _share(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def filter_metrics(
    decisions: pd.DataFrame,
    config: FilterConfig,
    *,
    judge_stats: dict[str, Any] | None = None,
    real_checked: int = 0,
    real_hash_errors: int = 0,
) -> dict[str, Any]:
    """Counts, shares and agreement for ``metrics/filter.json`` from a decisions table."""
    n = len(decisions)
    kept = decisions["kept"].to_numpy(dtype=bool)
    counts = decisions["reason"].value_counts()
    metrics: dict[str, Any] = {
        "method": config.method,
        "tasks_checked": list(config.tasks),
        "total": n,
        "kept": int(kept.sum()),
        "kept_share": _share(int(kept.sum()), n),
        "rejected": {r: int(counts.get(r, 0)) for r in REASONS},
        # Images failing each rule, whether or not an earlier rule already rejected them.
        "failed_rule": {rule: int((decisions[f"rule_{rule}"] == FAIL).sum()) for rule in RULES},
        "real_images_checked": real_checked,
        "real_hash_errors": real_hash_errors,
    }
    per_class: dict[str, dict[str, dict[str, Any]]] = {}
    for task in TASKS:
        per_class[task] = {}
        for cls in CLASSES[task]:
            rows = (decisions[task] == cls).to_numpy()
            total, k = int(rows.sum()), int((rows & kept).sum())
            per_class[task][cls] = {"total": total, "kept": k, "kept_share": _share(k, total)}
    metrics["per_class"] = per_class
    if f"agree_{TASKS[0]}" in decisions.columns:
        scored = decisions[f"p_intended_{TASKS[0]}"].notna().to_numpy()
        agreement, agreement_kept, mean_p, per_class_agreement = {}, {}, {}, {}
        for task in TASKS:
            agree = decisions[f"agree_{task}"].to_numpy()
            a = agree[scored].astype(bool)
            agreement[task] = _share(int(a.sum()), len(a))
            ak = agree[scored & kept].astype(bool)
            agreement_kept[task] = _share(int(ak.sum()), len(ak))
            p_intended = decisions.loc[scored, f"p_intended_{task}"].astype(float)
            mean_p[task] = round(float(p_intended.mean()), 4) if scored.any() else None
            per_class_agreement[task] = {}
            for cls in CLASSES[task]:
                rows = scored & (decisions[task] == cls).to_numpy()
                per_class_agreement[task][cls] = _share(int(agree[rows].astype(bool).sum()), int(rows.sum()))
        metrics["classifier"] = {
            "model": config.classifier_model,
            "scored": int(scored.sum()),
            # Generator fidelity: argmax of the original model == intended label, all decodable images.
            "agreement": agreement,
            "agreement_per_class": per_class_agreement,
            "agreement_kept": agreement_kept,
            "mean_p_intended": mean_p,
        }
    if judge_stats is not None:
        judged = (decisions["judge_status"] == "ok").to_numpy()
        judge_agreement = {}
        for task in TASKS:
            a = decisions.loc[judged, f"judge_agree_{task}"].astype(bool).to_numpy()
            judge_agreement[task] = _share(int(a.sum()), len(a))
        metrics["judge"] = {**judge_stats, "agreement": judge_agreement}
    return metrics


def kept_manifest(kept: pd.DataFrame) -> pd.DataFrame:
    """Kept rows in manifest column order, filter columns after (what ``merge`` reads)."""
    rule_cols = [c for c in kept.columns if c.startswith("rule_")]
    ordered = list(COLUMNS) + [c for c in kept.columns if c not in COLUMNS and c not in rule_cols]
    return kept[ordered]


# ---------------------------------------------------------------------------------------------
# The stage: read the manifests, build the judge, run the gate, write the outputs.


@dataclass(frozen=True)
class FilterPaths:
    """Where the filter stage reads and writes (dvc.yaml's deps and outs), relative to the cwd."""

    synthetic: str = "data/synthetic/manifest.tsv"
    real: str = "data/variants/relabelled/train.tsv"
    out_dir: str = "data/filtered"
    metrics: str = "metrics/filter.json"
    plot: str = "plots/filter_grid.png"
    judge_system: str = "prompts/judge_system.txt"
    judge_user: str = "prompts/judge_user.txt"
    prompt_dir: str = "prompts"  # holds refusal_fallback.txt


def run_filter(config: FilterConfig, paths: FilterPaths, *, predictor: Predictor | None = None,
               llm: dict[str, Any] | None = None) -> FilterResult:
    """Read the stage's inputs, run :func:`filter_synthetic`, return its result (nothing written).

    With ``method='vlm'`` the judge is an LLM client built from ``config.vlm`` (keys from the
    environment) with the judge prompts of ``paths``, retried once after a refusal with the
    project's academic-research preface; ``metrics['judge']['usage']`` then records the calls
    paid now vs answered from the cache, with the cost estimate beside them. ``llm`` is the params
    ``llm`` section (client defaults, prices); ``filter.vlm.budget_usd`` caps the judge's estimated
    cost before any call. ``predictor`` replaces the classifier (tests).
    """
    synthetic = read_manifest(paths.synthetic)
    real = read_manifest(paths.real, validate=False) if config.check_real_duplicates else None
    client = judge = None
    if config.method == "vlm":
        from medicsynth.llm import client_from_params, load_prompt, with_refusal_preface

        client = client_from_params(config.vlm, llm=llm, where="filter.vlm")
        user = load_prompt(Path(paths.judge_user).name, Path(paths.judge_user).parent)
        system = load_prompt(Path(paths.judge_system).name, Path(paths.judge_system).parent)
        # Graphic disaster images are refused often: one retry with the preface (as caption and relabel do).
        judge = llm_judge(client, system, user, fallback_prompt=with_refusal_preface(user, paths.prompt_dir),
                          desc="filter judge")
    result = filter_synthetic(synthetic, config, real=real, predictor=predictor, judge=judge)
    if client is not None:
        result.metrics["judge"]["usage"] = client.usage.as_dict()
    return result


def write_filter_outputs(result: FilterResult, config: FilterConfig, paths: FilterPaths) -> None:
    """Write the stage's declared outputs atomically: decisions, kept manifest, metrics, grid plot."""
    from medicsynth.plots import plot_filter_grid

    out_dir = Path(paths.out_dir)
    write_tsv(result.decisions, out_dir / "decisions.tsv")
    write_manifest(kept_manifest(result.kept), out_dir / "manifest.tsv")
    write_metrics(result.metrics, paths.metrics, "filter")  # judge latencies -> timing/filter.json
    plot_filter_grid(result.decisions, paths.plot, per_class=config.grid_per_class)
