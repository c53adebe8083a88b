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
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from medicsynth.io import atomic_path
from medicsynth.labels import CLASSES, NUM_CLASSES, TASKS, label_index, validate_label
from medicsynth.manifest import COLUMNS, canonical_labels
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

    method: str = "classifier"
    threshold: float | dict[str, float] = 0.5
    tasks: tuple[str, ...] = TASKS
    blank_std: float = 8.0
    blank_dominant_share: float = 0.95
    hash: str = "phash"
    phash_bits: int = 256
    phash_threshold: int = 24
    check_real_duplicates: bool = True
    classifier_model: str | None = "models/original-small_cnn"
    batch_size: int = 64
    device: str = "cpu"
    loader: str = "auto"
    workers: int = 0
    cache_dir: str | None = ".filter_cache"
    grid_per_class: int = 4
    vlm: dict[str, Any] = field(default_factory=dict)

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
        """Build from the ``filter`` section; an unknown key is an error (a typo must not pass)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"params.yaml filter: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**dict(params))


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
        return not self.error


def image_stats(path: str | Path, hash_kind: str = "phash", hash_bits: int = 256) -> ImageStats:
    """Decode ``path`` completely and measure it; never raises for a bad file (returns ``error``)."""
    try:
        with Image.open(path) as im:
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
    new generation round does not hash 50k MEDIC photos again.
    """
    words = words_for_bits(hash_bits)
    keys = []
    for f in files:
        try:
            st = os.stat(f)
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


def load_prompt(path: str | Path) -> str:
    """A prompt file's text, without surrounding whitespace; a clear error if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found")
    return path.read_text(encoding="utf-8").strip()


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


def resolve_file(file: str, root: str | Path) -> str:
    """A manifest ``file`` as a path to open: absolute paths as they are, others under ``root``."""
    p = Path(file)
    return str(p if p.is_absolute() else Path(root) / p)


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

    ``real`` is the real training manifest (its ``file`` column) for the ``duplicate_real`` rule;
    ``None`` or ``config.check_real_duplicates=False`` skips that rule. ``predictor`` replaces
    :func:`medicsynth.inference.predict_proba`; ``judge`` is required with ``method='vlm'``.
    """
    if config.method == "vlm" and judge is None:
        raise ValueError("filter.method is 'vlm' but no judge was given")
    missing = [c for c in ("image_path", "file", *TASKS) if c not in synthetic.columns]
    if missing:
        raise ValueError(f"synthetic manifest lacks column(s) {', '.join(missing)}")
    df = canonical_labels(synthetic.reset_index(drop=True), "synthetic manifest", key="image_path")
    n = len(df)
    files = [resolve_file(f, root) for f in df["file"]]

    # 1–2. decode and blank, one decode per image.
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
    words = words_for_bits(config.phash_bits)
    hashes = np.zeros((n, words), dtype=np.uint64)
    for i, s in enumerate(stats):
        if s.ok:
            hashes[i] = s.hash

    # 3. near-copies of real training images.
    dup_real = np.zeros(n, dtype=bool)
    df["dup_real_of"] = ""
    df["dup_real_dist"] = -1
    check_real = config.check_real_duplicates and real is not None
    real_hash_errors = 0
    if check_real:
        if "file" not in real.columns:
            raise ValueError("real training manifest lacks the 'file' column")
        real_files = [resolve_file(f, root) for f in real["file"]]
        real_hashes, real_ok = real_image_hashes(
            real_files, config.hash, config.phash_bits, workers=config.workers, cache_dir=config.cache_dir
        )
        real_hash_errors = int((~real_ok).sum())
        real_paths = real["image_path"].to_numpy()[real_ok] if "image_path" in real else np.array(real_files)[real_ok]
        rows = np.nonzero(decoded)[0]
        idx, dist = nearest(hashes[rows], real_hashes)
        has = idx >= 0
        df.loc[rows[has], "dup_real_dist"] = dist[has]
        df.loc[rows[has], "dup_real_of"] = np.where(dist[has] <= config.phash_threshold, real_paths[idx[has]], "")
        dup_real[rows[has]] = dist[has] <= config.phash_threshold

    # 4. near-copies within the pool, first by plan id kept. Images already rejected (undecodable,
    # blank, copies of real photos) take no part: they must not make a good image a "duplicate".
    dup_syn = np.zeros(n, dtype=bool)
    df["dup_synthetic_of"] = ""
    df["dup_synthetic_dist"] = -1
    order = pool_order(df)
    pool = order[(decoded & ~blank & ~dup_real)[order]]
    if len(pool):
        dup_of, dist = greedy_duplicates(hashes[pool], config.phash_threshold)
        df.loc[pool, "dup_synthetic_dist"] = dist
        is_dup = dup_of >= 0
        df.loc[pool[is_dup], "dup_synthetic_of"] = df["image_path"].to_numpy()[pool[dup_of[is_dup]]]
        dup_syn[pool[is_dup]] = True

    cheap_pass = decoded & ~blank & ~dup_real & ~dup_syn

    # 5. label consistency. The classifier (cheap, unpaid) sees every decodable image so that
    # agreement measures the generator, not the filter.
    label_pass = np.ones(n, dtype=bool)
    label_reason = np.full(n, "", dtype=object)
    label_rule = np.where(decoded, PASS, SKIP).astype(object)
    if config.classifier_model:
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
            label_pass[rows] = ok
            label_reason[rows[~ok]] = "label_mismatch"
            label_rule[rows] = np.where(ok, PASS, FAIL)
    judge_stats = None
    if config.method == "vlm":
        rows = np.nonzero(cheap_pass)[0]
        label_rule = np.full(n, SKIP, dtype=object)
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
                label_pass[i] = False
                label_reason[i] = "judge_failed"
                label_rule[i] = FAIL
                continue
            df.at[i, "judge_status"] = "ok"
            agree_all = True
            for task in TASKS:
                agree = v.labels[task] == df.at[i, task]
                df.at[i, f"judge_{task}"] = v.labels[task]
                df.at[i, f"judge_agree_{task}"] = agree
                if task in config.tasks:
                    agree_all &= agree
            label_pass[i] = agree_all
            label_reason[i] = "" if agree_all else "judge_disagrees"
            label_rule[i] = PASS if agree_all else FAIL
        judge_stats = {
            "requests": len(rows),
            "ok": int(sum(v.labels is not None for v in verdicts)),
            "failed": int(sum(v.labels is None for v in verdicts)),
            "cached": int(sum(v.cached for v in verdicts)),
            "input_tokens": int(sum(v.input_tokens for v in verdicts)),
            "output_tokens": int(sum(v.output_tokens for v in verdicts)),
            "failures": dict(sorted(Counter(v.failure for v in verdicts if v.labels is None).items())),
        }
    elif config.method == "none":
        label_rule = np.where(decoded, PASS, SKIP).astype(object)
        label_pass[:] = True

    # Rule outcomes and the first failing rule.
    df["rule_decode"] = np.where(decoded, PASS, FAIL)
    df["rule_blank"] = np.where(decoded, np.where(blank, FAIL, PASS), SKIP)
    df["rule_duplicate_real"] = np.where(decoded & check_real, np.where(dup_real, FAIL, PASS), SKIP)
    in_pool = np.zeros(n, dtype=bool)
    in_pool[pool] = True
    df["rule_duplicate_synthetic"] = np.where(in_pool, np.where(dup_syn, FAIL, PASS), SKIP)
    df["rule_label"] = label_rule
    reason = np.full(n, KEPT, dtype=object)
    for mask, name in (
        (~label_pass, None),
        (dup_syn, "duplicate_synthetic"),
        (dup_real, "duplicate_real"),
        (blank, "blank"),
        (~decoded, "decode_error"),
    ):
        # Later rules first, earlier rules overwrite: what remains is the first failing rule.
        reason[mask] = label_reason[mask] if name is None else name
    df["reason"] = reason
    df["kept"] = reason == KEPT

    kept = df[df["kept"]].drop(columns=["kept", "reason"]).reset_index(drop=True)
    metrics = filter_metrics(df, config, judge_stats=judge_stats, real_checked=int(len(real)) if check_real else 0,
                             real_hash_errors=real_hash_errors)
    return FilterResult(decisions=df, kept=kept, metrics=metrics)


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
# The grid plot.


_SHORT_TASK = {"damage_severity": "damage", "informative": "inform.", "humanitarian": "human.", "disaster_types": "disaster"}


def _caption(row: pd.Series) -> str:
    reason = row["reason"]
    p = row.get("p_intended_disaster_types")
    p_txt = f" p={float(p):.2f}" if p is not None and pd.notna(p) and p != "" else ""
    if reason == KEPT:
        return f"kept{p_txt}"
    if reason == "duplicate_synthetic":
        return f"dup synth d={int(row['dup_synthetic_dist'])}"
    if reason == "duplicate_real":
        return f"dup real d={int(row['dup_real_dist'])}"
    if reason == "blank":
        cause = str(row.get("blank_cause", ""))
        if "low_std" in cause:
            return f"blank std={float(row['pixel_std']):.1f}"
        if "dominant_colour" in cause:
            return f"blank 1 colour {float(row['dominant_share']):.0%}"
        return "blank (gen. flag)"
    if reason == "label_mismatch":
        worst = min(
            (t for t in TASKS if f"p_intended_{t}" in row and pd.notna(row[f"p_intended_{t}"])),
            key=lambda t: float(row[f"p_intended_{t}"]),
            default=None,
        )
        if worst is None:
            return "label mismatch"
        return f"label {_SHORT_TASK[worst]} p={float(row[f'p_intended_{worst}']):.2f}"
    if reason == "judge_disagrees":
        wrong = [t for t in TASKS if row.get(f"judge_agree_{t}") is False]
        return "judge: " + (str(row[f"judge_{wrong[0]}"])[:14] if wrong else "disagrees")
    if reason == "judge_failed":
        return "judge failed"
    return reason.replace("_", " ")


def _spread(rows: pd.DataFrame, k: int) -> pd.DataFrame:
    # Rejected samples round-robin over reasons, so one frequent reason does not hide the others.
    groups = [g for _, g in rows.groupby("reason", sort=True)]
    picked = []
    depth = 0
    while len(picked) < k and any(depth < len(g) for g in groups):
        for g in groups:
            if depth < len(g) and len(picked) < k:
                picked.append(g.index[depth])
        depth += 1
    return rows.loc[picked]


def _thumbnail(path: str, cell: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.draft("RGB", (cell, cell))
            rgb = im.convert("RGB")
    except Exception:
        return np.full((cell, cell, 3), 128, dtype=np.uint8)
    if max(rgb.size) > cell:
        rgb.thumbnail((cell, cell), Image.Resampling.LANCZOS)
    # Small images (64 px demo renders) are enlarged with nearest so pixels stay honest.
    scale = cell / max(rgb.size)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    return np.asarray(rgb.resize(size, Image.Resampling.NEAREST))


def plot_filter_grid(
    decisions: pd.DataFrame,
    path: str | Path,
    *,
    root: str | Path = ".",
    per_class: int = 4,
    cell: int = 96,
    seed: int = 0,
) -> None:
    """PNG grid: one row per disaster type, ``per_class`` kept then ``per_class`` rejected samples.

    Captions give the decision (``kept`` with the intended-label probability, or the rejection
    reason with its measurement). Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = CLASSES["disaster_types"]
    cols = 2 * per_class
    fig, axes = plt.subplots(
        len(classes), cols, figsize=(cols * 1.15 + 1.2, len(classes) * 1.3), squeeze=False
    )
    rng = np.random.default_rng(seed)
    for r, cls in enumerate(classes):
        rows = decisions[decisions["disaster_types"] == cls]
        kept = rows[rows["kept"].astype(bool)]
        rejected = rows[~rows["kept"].astype(bool)]
        if len(kept) > per_class:
            kept = kept.loc[np.sort(rng.choice(kept.index.to_numpy(), per_class, replace=False))]
        rejected = _spread(rejected.sample(frac=1.0, random_state=seed), per_class) if len(rejected) else rejected
        samples = [("kept", row) for _, row in kept.iterrows()] + [("rej", row) for _, row in rejected.iterrows()]
        slots = list(range(len(kept))) + [per_class + j for j in range(len(rejected))]
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        for slot, (kind, row) in zip(slots, samples):
            ax = axes[r, slot]
            ax.imshow(_thumbnail(resolve_file(row["file"], root), cell), interpolation="nearest")
            colour = "#1a7f37" if kind == "kept" else "#b42318"
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color(colour)
                spine.set_linewidth(2)
            ax.set_title(_caption(row), fontsize=6.5, color=colour, pad=2)
        if not len(kept):
            axes[r, 0].text(0.5, 0.5, "none kept", ha="center", va="center", fontsize=7, transform=axes[r, 0].transAxes)
        if not len(rejected):
            axes[r, per_class].text(0.5, 0.5, "none rejected", ha="center", va="center", fontsize=7,
                                    transform=axes[r, per_class].transAxes)
        n_kept = int(rows["kept"].astype(bool).sum())
        axes[r, 0].set_ylabel(f"{cls}\n{n_kept}/{len(rows)} kept", fontsize=7.5, rotation=0, ha="right", va="center",
                              labelpad=6)
    fig.suptitle("filter: kept (green, left) vs rejected (red, right) per disaster type", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    try:
        with atomic_path(path, suffix=".tmp.png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
