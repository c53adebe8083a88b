"""How many synthetic images to make for each 4-label combination, and the per-image plan.

A *combination* is one label per task, in ``TASKS`` order, e.g.
``("mild", "informative", "rescue_volunteering_or_donation_effort", "flood")``. MEDIC has
3 × 2 × 4 × 7 = 168 of them; only those seen in the training manifest are planned unless
``include_unseen`` is set (an unseen combination has no real image to ground a caption on and is
often implausible, e.g. ``not_informative`` + ``severe`` + ``rescue``).

Two modes:

``weakness`` (the study's rule)
    Each combination gets a weight ``base + Σ label bonus + Σ combination bonus``. A label's bonus
    comes from its class's per-class F1 on the **dev** split of the ``original`` model: the bonus
    of the smallest threshold the F1 falls below (study: < 0.40 → +80, < 0.60 → +40,
    < 0.75 → +20, otherwise 0; the bonuses do not add up across thresholds). Combination bonuses
    are hand-set rules (``match`` one label or a list of labels per task, on one or several tasks;
    all six of the study's are expressible, see ``presets/study.yaml``). The weights are then
    rescaled to ``total`` with an apportionment method that makes the sum exact.

``balance``
    Minority classes are topped up toward a target share of (real + synthetic) per task, with a
    sequential greedy process, see :func:`balance_counts`.

Rescaling and stable plans. Both modes hand out images *one at a time* in an order that does not
depend on ``total`` (weakness: Webster/Sainte-Laguë divisor sequence; balance: the greedy
sequence), so the plan for a bigger total contains the plan for a smaller one. The ``k``-th image
of a combination has id ``f"{combination_slug}-{k:05d}"`` and a seed hashed from that id, so
raising ``total`` only adds rows. Largest-remainder (Hamilton) rounding is available for
comparison with the study but is not house-monotone (the *Alabama paradox*: one more image in
total can take one away from a combination), so it can drop plan rows when ``total`` grows.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from medicsynth.io import read_json
from medicsynth.labels import CLASSES, TASKS, LabelError, validate_label
from medicsynth.manifest import class_counts
from medicsynth.params import require

Combination = tuple[str, str, str, str]

MODES = ("weakness", "balance")
ROUNDINGS = ("webster", "largest_remainder")

# Short, readable label codes for plan ids (ids become file names downstream). Changing one
# renames every planned image, so treat these as part of the data format.
SLUG: dict[str, dict[str, str]] = {
    "damage_severity": {"little_or_none": "none", "mild": "mild", "severe": "severe"},
    "informative": {"informative": "inf", "not_informative": "noinf"},
    "humanitarian": {
        "affected_injured_or_dead_people": "affected",
        "infrastructure_and_utility_damage": "infra",
        "not_humanitarian": "nohum",
        "rescue_volunteering_or_donation_effort": "rescue",
    },
    "disaster_types": {
        "earthquake": "quake",
        "fire": "fire",
        "flood": "flood",
        "hurricane": "hurricane",
        "landslide": "landslide",
        "not_disaster": "nodisaster",
        "other_disaster": "other",
    },
}

PLAN_COLUMNS: tuple[str, ...] = ("id", "seed", *TASKS)


class AllocationError(ValueError):
    """Unusable allocation input or parameters; the message names the file/key and the value."""


# --------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class CombinationBonus:
    """Extra weight for combinations whose labels match ``match`` (every listed task must match).

    ``match`` maps a task to the accepted labels, e.g.
    ``{"damage_severity": ("mild",), "disaster_types": ("hurricane", "flood")}``.
    """

    match: dict[str, tuple[str, ...]]
    bonus: int
    name: str = ""

    def matches(self, combination: Combination) -> bool:
        """True when every task listed in ``match`` has one of its accepted labels."""
        labels = dict(zip(TASKS, combination))
        return all(labels[task] in accepted for task, accepted in self.match.items())

    def describe(self) -> str:
        """``name``, or ``task=a|b & ...`` when the bonus has none (for tables and logs)."""
        if self.name:
            return self.name
        return " & ".join(f"{task}={'|'.join(accepted)}" for task, accepted in self.match.items())


@dataclass(frozen=True)
class AllocateConfig:
    """The ``allocate`` section of ``params.yaml`` (see :meth:`from_params` for the keys)."""

    # No defaults: params.yaml is the one source of values (build with :meth:`from_params`).
    mode: str
    total: int
    base_per_combination: int
    # (threshold, bonus) pairs; a label takes the bonus of the smallest threshold its F1 is below.
    f1_bonuses: tuple[tuple[float, int], ...]
    combination_bonuses: tuple[CombinationBonus, ...]
    rounding: str
    balance_target_share: dict[str, float]
    include_unseen: bool
    seed: int

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "AllocateConfig":
        """Build from the ``allocate`` section; unknown or malformed values raise naming the key.

        Keys: ``mode``, ``total``, ``base_per_combination``, ``f1_thresholds`` (list of floats in
        [0, 1]) with ``f1_bonuses`` (list of ints, same length), ``combination_bonuses`` (list of
        ``{match: {task: label | [labels]}, bonus: int, name: str?}``), ``rounding``,
        ``balance_target_share`` (a float for every task or ``{task: float}``),
        ``include_unseen``, ``seed``. ``train_manifest``, ``dev_report`` and ``f1_reports`` are
        paths the stage reads (see :func:`f1_source_paths`).
        Every key is required (a missing one raises ``KeyError`` naming ``allocate.<key>``).
        """
        p = dict(params)

        def get(key: str) -> Any:
            return require(p, "allocate", key)

        mode = str(get("mode"))
        if mode not in MODES:
            raise AllocationError(f"allocate.mode {mode!r} not in {MODES}")
        rounding = str(get("rounding"))
        if rounding not in ROUNDINGS:
            raise AllocationError(f"allocate.rounding {rounding!r} not in {ROUNDINGS}")
        total = _int(get("total"), "allocate.total", minimum=0)
        base = _int(get("base_per_combination"), "allocate.base_per_combination", minimum=0)

        thresholds = list(get("f1_thresholds"))
        bonuses = list(get("f1_bonuses"))
        if len(thresholds) != len(bonuses):
            raise AllocationError(
                f"allocate.f1_thresholds ({len(thresholds)} values) and allocate.f1_bonuses "
                f"({len(bonuses)} values) must have the same length"
            )
        pairs = []
        for i, (thr, bonus) in enumerate(zip(thresholds, bonuses)):
            thr = float(thr)
            if not 0.0 <= thr <= 1.0:
                raise AllocationError(
                    f"allocate.f1_thresholds[{i}] = {thr!r}: F1 thresholds are fractions in "
                    "[0, 1] (write 0.40, not 40)"
                )
            pairs.append((thr, _int(bonus, f"allocate.f1_bonuses[{i}]", minimum=0)))
        pairs.sort()

        combo_bonuses = tuple(
            _combination_bonus(item, i) for i, item in enumerate(get("combination_bonuses") or [])
        )

        share = get("balance_target_share")
        if isinstance(share, dict):
            unknown = set(share) - set(TASKS)
            if unknown:
                raise AllocationError(f"allocate.balance_target_share: unknown task(s) {sorted(unknown)}")
            shares = {task: float(share.get(task, 0.0)) for task in TASKS}
        else:
            shares = {task: float(share) for task in TASKS}
        for task, value in shares.items():
            if not 0.0 <= value <= 1.0:
                raise AllocationError(f"allocate.balance_target_share[{task}] = {value!r} not in [0, 1]")

        return cls(
            mode=mode,
            total=total,
            base_per_combination=base,
            f1_bonuses=tuple(pairs),
            combination_bonuses=combo_bonuses,
            rounding=rounding,
            balance_target_share=shares,
            include_unseen=bool(get("include_unseen")),
            seed=_int(get("seed"), "allocate.seed", minimum=0),
        )


def _int(value: Any, key: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise AllocationError(f"{key} = {value!r}: expected an integer")
    value = int(value)
    if minimum is not None and value < minimum:
        raise AllocationError(f"{key} = {value}: must be >= {minimum}")
    return value


def _combination_bonus(item: Any, i: int) -> CombinationBonus:
    key = f"allocate.combination_bonuses[{i}]"
    if not isinstance(item, dict) or "match" not in item or "bonus" not in item:
        raise AllocationError(f"{key}: expected {{match: {{task: label(s)}}, bonus: int}}, got {item!r}")
    if not isinstance(item["match"], dict) or not item["match"]:
        raise AllocationError(f"{key}.match: expected a non-empty mapping task -> label(s)")
    match = {}
    for task, labels in item["match"].items():
        labels = [labels] if isinstance(labels, str) else list(labels)
        try:
            match[task] = tuple(validate_label(task, label) for label in labels)
        except LabelError as exc:
            raise AllocationError(f"{key}.match: {exc}") from None
    return CombinationBonus(
        match=match, bonus=_int(item["bonus"], f"{key}.bonus"), name=str(item.get("name", ""))
    )


# --------------------------------------------------------------------------------------------
# Inputs


def load_dev_f1(path: str | Path) -> dict[str, dict[str, float]]:
    """Per-class F1 ``{task: {class: f1}}`` from one evaluation report or F1 table.

    Parameters
    ----------
    path
        ``*.json``: an evaluation report, ``{"tasks": {task: {"per_class": {class: {"f1": ...}}}}}``
        (a dev report, ``metrics/dev/<variant>-<arch>.json``) or the same under one split key
        (a test report, ``{"test": {"tasks": ...}}``, as ``metrics/evaluate/`` writes).
        ``*.tsv``: a table with columns ``task``, ``class``, ``f1`` (the study's
        ``study_class_f1.tsv``), one row per class.

    Returns every class of every task with an F1 in [0, 1]; a missing class, a duplicate row or a
    value that is not a fraction raises :class:`AllocationError` naming the file and the entry.
    """
    path = Path(path)
    if not path.is_file():
        raise AllocationError(
            f"{path}: F1 source not found (allocate.dev_report / allocate.f1_reports): run the stage "
            "that writes it (evaluate for metrics/dev/...) or fix the path"
        )
    if path.suffix == ".tsv":
        return _load_f1_tsv(path)
    report = read_json(path)
    tasks = report.get("tasks") if isinstance(report, dict) else None
    if tasks is None and isinstance(report, dict):
        splits = [v for v in report.values() if isinstance(v, dict) and isinstance(v.get("tasks"), dict)]
        if len(splits) == 1:
            tasks = splits[0]["tasks"]
    if not isinstance(tasks, dict):
        raise AllocationError(f"{path}: expected a top-level 'tasks' mapping (or one split holding it)")
    out: dict[str, dict[str, float]] = {}
    for task in TASKS:
        per_class = (tasks.get(task) or {}).get("per_class")
        if not isinstance(per_class, dict):
            raise AllocationError(f"{path}: tasks.{task}.per_class missing")
        out[task] = {}
        for cls in CLASSES[task]:
            entry = per_class.get(cls)
            f1 = entry.get("f1") if isinstance(entry, dict) else None
            out[task][cls] = _check_f1(f1, f"{path}: tasks.{task}.per_class.{cls}.f1")
    return out


def _check_f1(f1: Any, where: str) -> float:
    if isinstance(f1, bool) or not isinstance(f1, (int, float)) or math.isnan(f1):
        raise AllocationError(f"{where} = {f1!r}: expected a number")
    if not 0.0 <= f1 <= 1.0:
        raise AllocationError(f"{where} = {f1!r} not in [0, 1] (F1 is expected as a fraction, not a percentage)")
    return float(f1)


def _load_f1_tsv(path: Path) -> dict[str, dict[str, float]]:
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = [c for c in ("task", "class", "f1") if c not in df.columns]
    if missing:
        raise AllocationError(f"{path}: missing column(s) {', '.join(missing)} (expected task, class, f1)")
    out: dict[str, dict[str, float]] = {task: {} for task in TASKS}
    for i, row in enumerate(df.to_dict("records")):
        where = f"{path}: line {i + 2}"
        task = row["task"].strip()
        if task not in CLASSES:
            raise AllocationError(f"{where}: unknown task {task!r}; expected one of {', '.join(TASKS)}")
        try:
            cls = validate_label(task, row["class"])
        except LabelError as exc:
            raise AllocationError(f"{where}: {exc}") from None
        if cls in out[task]:
            raise AllocationError(f"{where}: duplicate row for {task}/{cls}")
        try:
            value = float(row["f1"])
        except ValueError:
            raise AllocationError(f"{where}: f1 {row['f1']!r} is not a number") from None
        out[task][cls] = _check_f1(value, f"{where}: f1")
    for task in TASKS:
        absent = [c for c in CLASSES[task] if c not in out[task]]
        if absent:
            raise AllocationError(f"{path}: no F1 row for {task} class(es) {', '.join(absent)}")
    return out


def f1_source_paths(params: dict[str, Any]) -> list[str]:
    """The F1 sources named by the ``allocate`` section: ``dev_report`` then ``f1_reports``.

    ``dev_report`` is one path that DVC tracks as a dependency: a report, or a directory whose
    ``*.json`` reports (sorted by name) all count, such as ``metrics/dev/original-s0`` where
    evaluate writes the dev report of every architecture of training seed 0 (so the study's
    lowest-over-three-CNNs rule needs no list, and DVC runs every such evaluation before
    allocate). ``f1_reports`` is an optional list of further paths (F1 tables, other reports)
    whose lowest per-class F1 is taken together with it; they are params only, since dvc.yaml
    cannot list them as deps. A wrong type, or a directory without reports, raises naming the key.
    """
    first = require(params, "allocate", "dev_report")
    if not isinstance(first, str) or not first:
        raise AllocationError(
            f"allocate.dev_report = {first!r}: expected one path (list further reports under allocate.f1_reports)"
        )
    firsts = [first]
    if Path(first).is_dir():
        firsts = [str(p) for p in sorted(Path(first).glob("*.json"))]
        if not firsts:
            raise AllocationError(f"allocate.dev_report = {first!r}: a directory without *.json reports "
                                  "(run the evaluate stages of the original variant first)")
    extra = require(params, "allocate", "f1_reports") or []
    if isinstance(extra, str) or not isinstance(extra, (list, tuple)) or not all(isinstance(x, str) and x for x in extra):
        raise AllocationError(f"allocate.f1_reports = {extra!r}: expected a list of paths ([] for none)")
    return [*firsts, *[x for x in extra if x not in firsts]]


def lowest_f1(paths: Sequence[str | Path]) -> dict[str, dict[str, float]]:
    """Per class, the lowest F1 over several sources (reports of several models, or F1 tables).

    The study allocated from the lowest per-class F1 over its three CNNs: a class that any
    architecture finds hard gets the bonus. ``paths`` are read with :func:`load_dev_f1`; one path
    returns its F1 unchanged. Raises :class:`AllocationError` for an empty list.
    """
    if not paths:
        raise AllocationError("allocate: no F1 source given (allocate.dev_report is empty)")
    sources = [load_dev_f1(p) for p in paths]
    return {task: {cls: min(s[task][cls] for s in sources) for cls in CLASSES[task]} for task in TASKS}


def combination_counts(train: pd.DataFrame) -> dict[Combination, int]:
    """Number of rows per label combination (rows given in canonical labels)."""
    if train.empty:
        return {}
    grouped = train.groupby(list(TASKS), sort=True).size()
    return {tuple(index): int(n) for index, n in grouped.items()}


def all_combinations() -> list[Combination]:
    """All 168 combinations in schema order."""
    out: list[Combination] = [()]  # type: ignore[list-item]
    for task in TASKS:
        out = [combo + (label,) for combo in out for label in CLASSES[task]]
    return out


def candidate_combinations(counts: dict[Combination, int], include_unseen: bool) -> list[Combination]:
    """Combinations to plan for, in schema order: those seen in train, or all of them."""
    return [c for c in all_combinations() if include_unseen or counts.get(c, 0) > 0]


# --------------------------------------------------------------------------------------------
# Apportionment


def apportion(weights: Sequence[float], total: int, method: str = "webster") -> list[int]:
    """Integer counts proportional to ``weights`` that sum exactly to ``total``.

    ``webster``: the Sainte-Laguë divisor method, handed out one unit at a time to the largest
    ``w / (n + 0.5)``; ties go to the earlier index. It is house-monotone: the counts for
    ``total + 1`` are those for ``total`` plus one unit.

    ``largest_remainder`` (Hamilton): floor of each quota ``w * total / Σw``, the leftover units to
    the largest fractional parts (ties to the earlier index). Closest to the quotas, but not
    house-monotone.

    Zero weights get nothing; all-zero weights with ``total > 0`` raise.
    """
    if method not in ROUNDINGS:
        raise AllocationError(f"unknown rounding method {method!r}; expected one of {ROUNDINGS}")
    if any(w < 0 or math.isnan(w) for w in weights):
        raise AllocationError(f"weights must be non-negative numbers, got {list(weights)}")
    counts = [0] * len(weights)
    if total == 0:
        return counts
    weight_sum = float(sum(weights))
    if weight_sum <= 0:
        raise AllocationError(f"cannot share {total} images over {len(weights)} zero-weight combinations")
    if method == "largest_remainder":
        quotas = [w * total / weight_sum for w in weights]
        counts = [math.floor(q) for q in quotas]
        leftover = total - sum(counts)
        order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
        for i in order[:leftover]:
            counts[i] += 1
        return counts
    # Heap of (-priority, index); priority w / (n + 0.5) with n the units already given.
    heap = [(-w / 0.5, i) for i, w in enumerate(weights) if w > 0]
    heapq.heapify(heap)
    for _ in range(total):
        _, i = heapq.heappop(heap)
        counts[i] += 1
        heapq.heappush(heap, (-weights[i] / (counts[i] + 0.5), i))
    return counts


# --------------------------------------------------------------------------------------------
# Modes


@dataclass(frozen=True)
class CombinationWeight:
    """The study's weight of one combination and how it was reached."""

    combination: Combination
    f1: tuple[float, float, float, float]
    label_bonus: tuple[int, int, int, int]
    combination_bonus: int
    weight: int
    reason: str


def label_bonus(f1: float, f1_bonuses: Sequence[tuple[float, int]]) -> int:
    """Bonus of the smallest threshold that ``f1`` is strictly below; 0 if none."""
    for threshold, bonus in sorted(f1_bonuses):
        if f1 < threshold:
            return bonus
    return 0


def weakness_weights(
    combinations: Iterable[Combination], f1: dict[str, dict[str, float]], config: AllocateConfig
) -> list[CombinationWeight]:
    """``base + Σ label bonus + Σ matching combination bonus`` for each combination."""
    out = []
    for combo in combinations:
        f1s = tuple(f1[task][label] for task, label in zip(TASKS, combo))
        bonuses = tuple(label_bonus(v, config.f1_bonuses) for v in f1s)
        parts = [f"base {config.base_per_combination}"]
        for task, label, value, bonus in zip(TASKS, combo, f1s, bonuses):
            if bonus:
                parts.append(f"{label} F1 {value:.2f} +{bonus}")
        extra = 0
        for rule in config.combination_bonuses:
            if rule.matches(combo):
                extra += rule.bonus
                parts.append(f"{rule.describe()} +{rule.bonus}")
        weight = config.base_per_combination + sum(bonuses) + extra
        if weight < 0:
            raise AllocationError(f"combination {combo} has negative weight {weight}: check allocate.combination_bonuses")
        out.append(CombinationWeight(combo, f1s, bonuses, extra, weight, "; ".join(parts)))
    return out


def balance_counts(
    combinations: Sequence[Combination],
    frequency: Sequence[float],
    class_counts: dict[str, dict[str, int]],
    total: int,
    target_share: dict[str, float],
) -> tuple[list[int], list[dict[str, int]]]:
    """Sequential greedy top-up of minority classes; returns counts and, per combination, why.

    Notation: ``N`` real training images, ``n[t][c]`` real + already planned images of class ``c``
    in task ``t``, ``i`` images planned so far, ``s_t`` the target share of task ``t`` (capped at
    ``1 / K_t`` so that every class can reach it at once).

    For each image ``i + 1``:

    1. target ``g_t = s_t · (N + i + 1)``; pick the class with the largest *relative* gap
       ``(g_t − n[t][c]) / g_t`` over all tasks and classes (ties: task order, then class
       order), among classes some candidate combination contains. While a class is below its
       target it wins over every class above; once all reached it, the budget keeps going to
       the class least above its target, flattening the distribution from the bottom.
    2. Among the candidate combinations containing that class, take the one with the largest
       ``frequency / (planned + 0.5)`` (a Webster sequence), so a class's synthetic images are
       spread over its combinations in proportion to their real frequency.
    3. The image counts toward the class of *every* task in the chosen combination.

    The sequence does not depend on ``total`` (targets use the running count), so the plan for
    a bigger total extends the plan for a smaller one.
    """
    n_real = sum(class_counts[TASKS[0]].values())
    shares = {t: min(float(target_share.get(t, 0.0)), 1.0 / len(CLASSES[t])) for t in TASKS}
    current = {t: dict(class_counts[t]) for t in TASKS}
    counts = [0] * len(combinations)
    picked_for: list[dict[str, int]] = [{} for _ in combinations]
    containing: dict[tuple[str, str], list[int]] = {}
    for k, combo in enumerate(combinations):
        if frequency[k] <= 0:
            continue
        for task, label in zip(TASKS, combo):
            containing.setdefault((task, label), []).append(k)
    reachable = [(t, c) for t in TASKS for c in CLASSES[t] if (t, c) in containing and shares[t] > 0]
    if total and not reachable:
        raise AllocationError("balance mode: no combination with positive frequency to plan for")
    for i in range(total):
        best, best_gap = None, -math.inf
        for task, cls in reachable:
            target = shares[task] * (n_real + i + 1)
            gap = (target - current[task][cls]) / target
            if gap > best_gap:
                best, best_gap = (task, cls), gap
        assert best is not None
        k = max(containing[best], key=lambda j: (frequency[j] / (counts[j] + 0.5), -j))
        counts[k] += 1
        picked_for[k][best[1]] = picked_for[k].get(best[1], 0) + 1
        for task, label in zip(TASKS, combinations[k]):
            current[task][label] += 1
    return counts, picked_for


# --------------------------------------------------------------------------------------------
# Plan


def combination_slug(combination: Combination) -> str:
    """Readable id prefix of a combination, e.g. ``mild-inf-rescue-flood``."""
    return "-".join(SLUG[task][label] for task, label in zip(TASKS, combination))


def image_id(combination: Combination, k: int) -> str:
    """Id of the ``k``-th planned image (0-based) of ``combination``."""
    return f"{combination_slug(combination)}-{k:05d}"


def image_seed(image_id: str, salt: int = 0) -> int:
    """Seed in ``[0, 2**31)`` from the first 8 bytes of ``sha256(f"{salt}:{image_id}")``.

    It depends only on the id (and the global ``allocate.seed`` salt), never on the row order, so
    an image keeps its seed when the plan grows.
    """
    digest = hashlib.sha256(f"{salt}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**31)


def build_plan(combinations: Sequence[Combination], counts: Sequence[int], salt: int = 0) -> pd.DataFrame:
    """One row per planned image (``id, seed`` and the four labels), sorted by id."""
    rows = []
    for combo, n in zip(combinations, counts):
        for k in range(n):
            iid = image_id(combo, k)
            rows.append((iid, image_seed(iid, salt), *combo))
    plan = pd.DataFrame(rows, columns=list(PLAN_COLUMNS))
    return plan.sort_values("id", kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Whole step


@dataclass
class Allocation:
    """Result of :func:`allocate`: the per-combination table, the per-image plan and metrics."""

    table: pd.DataFrame
    plan: pd.DataFrame
    metrics: dict[str, Any]


def allocate(
    train: pd.DataFrame,
    config: AllocateConfig,
    f1: dict[str, dict[str, float]] | None = None,
) -> Allocation:
    """Plan ``config.total`` synthetic images over the label combinations of ``train``.

    ``train`` holds the real training rows with canonical labels (e.g. from
    :func:`medicsynth.manifest.read_manifest`). ``f1`` (dev per-class F1, from
    :func:`load_dev_f1`) is required in ``weakness`` mode.
    """
    counts_real = combination_counts(train)
    if not counts_real:
        raise AllocationError("the training manifest has no rows to allocate from")
    combos = candidate_combinations(counts_real, config.include_unseen)
    real = [counts_real.get(c, 0) for c in combos]

    if config.mode == "weakness":
        if f1 is None:
            raise AllocationError("weakness mode needs the dev per-class F1 report (allocate.dev_report)")
        weights = weakness_weights(combos, f1, config)
        counts = apportion([w.weight for w in weights], config.total, config.rounding)
        extra_columns = {
            **{f"f1_{task}": [w.f1[j] for w in weights] for j, task in enumerate(TASKS)},
            **{f"bonus_{task}": [w.label_bonus[j] for w in weights] for j, task in enumerate(TASKS)},
            "combination_bonus": [w.combination_bonus for w in weights],
            "weight": [w.weight for w in weights],
            "reason": [w.reason for w in weights],
        }
    else:
        # Unseen combinations have no real frequency; a pseudo-count of 1 for every candidate
        # lets them take a share when they are explicitly included.
        smoothing = 1.0 if config.include_unseen else 0.0
        frequency = [r + smoothing for r in real]
        counts, picked_for = balance_counts(
            combos, frequency, class_counts(train), config.total, config.balance_target_share
        )
        extra_columns = {
            "weight": frequency,
            "reason": [
                "balance: " + (", ".join(f"{cls} x{n}" for cls, n in why.items()) if why else "no deficit class picked it")
                for why in picked_for
            ],
        }

    table = pd.DataFrame({task: [c[j] for c in combos] for j, task in enumerate(TASKS)})
    table["real_count"] = real
    for column, values in extra_columns.items():
        table[column] = values
    table["count"] = counts
    table.insert(0, "slug", [combination_slug(c) for c in combos])

    plan = build_plan(combos, counts, config.seed)
    metrics = allocation_metrics(train, plan, table, config)
    return Allocation(table=table, plan=plan, metrics=metrics)


def allocation_metrics(
    train: pd.DataFrame, plan: pd.DataFrame, table: pd.DataFrame, config: AllocateConfig
) -> dict[str, Any]:
    """Totals per class per task: real, planned, and shares before / after adding the plan."""
    before = class_counts(train)
    planned = class_counts(plan)
    n_real, n_plan = len(train), len(plan)
    per_task = {}
    for task in TASKS:
        per_task[task] = {
            cls: {
                "real": before[task][cls],
                "planned": planned[task][cls],
                "share_before": round(before[task][cls] / n_real, 4) if n_real else 0.0,
                "share_after": round((before[task][cls] + planned[task][cls]) / (n_real + n_plan), 4)
                if n_real + n_plan
                else 0.0,
            }
            for cls in CLASSES[task]
        }
    return {
        "mode": config.mode,
        "rounding": config.rounding if config.mode == "weakness" else "sequential",
        "total": n_plan,
        "real_train": n_real,
        "combinations_seen": int((table["real_count"] > 0).sum()),
        "combinations_candidate": len(table),
        "combinations_planned": int((table["count"] > 0).sum()),
        "per_class": per_task,
    }
