"""Wall-clock figures live apart from the metrics DVC tracks.

Seconds, images/s, steps/s and API latencies change on every rerun and with how busy the machine
is; in a file declared under ``metrics:`` they make ``dvc metrics diff`` and ``git status`` noisy
and, worse, suggest that results depend on them. Stages therefore write results to their
metrics file and wall-clock figures to ``timing/<stage>.json`` (git-ignored, not a DVC output or
metric; the latest run's figures only).

Use :func:`write_metrics` where a stage used to call ``medicsynth.io.write_json`` on a metrics
dict that holds such figures: it moves every wall-clock key (see :func:`is_timing_key`) into
the timing file and writes the rest as the metrics file. Or build the two dicts yourself and call
:func:`write_timing`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from medicsynth.io import write_json

TIMING_DIR = Path("timing")

# "seconds", "seconds_total", "load_seconds", "images_per_second", "steps_per_second",
# "latency_s" ... but not configuration such as "max_seconds" or "timeout_s".
_TIMING_KEY = re.compile(r"seconds|per_second|latenc")


def is_timing_key(key: str) -> bool:
    """True when a metrics key names a wall-clock measurement (seconds, rates, latencies).

    Keys starting with ``max_`` are limits from the configuration, not measurements.
    """
    return bool(_TIMING_KEY.search(key)) and not key.startswith("max_")


def split_timing(metrics: Mapping[str, Any]) -> tuple[dict, dict]:
    """Split ``metrics`` into ``(results, timing)``, recursively.

    Parameters: ``metrics``: a JSON-like dict. Dicts are split key by key; a list of dicts is
    split element-wise (the timing side keeps the list, each element holding that element's
    timing keys, so indices still match). Returns two new dicts; ``metrics`` is not modified.
    Guarantee: ``results`` holds no key for which :func:`is_timing_key` is true, at any depth;
    empty sub-dicts are dropped from ``timing``.
    """
    results: dict = {}
    timing: dict = {}
    for key, value in metrics.items():
        if is_timing_key(str(key)):
            timing[key] = value
        elif isinstance(value, Mapping):
            r, t = split_timing(value)
            results[key] = r
            if t:
                timing[key] = t
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            pairs = [split_timing(v) for v in value]
            results[key] = [r for r, _ in pairs]
            if any(t for _, t in pairs):
                timing[key] = [t for _, t in pairs]
        else:
            results[key] = value
    return results, timing


def write_timing(stage: str, timing: Mapping[str, Any], directory: str | Path = TIMING_DIR) -> Path:
    """Write ``timing`` atomically to ``<directory>/<stage>.json`` and return the path.

    ``stage`` names the file (a matrix stage passes e.g. ``"train/original-small_cnn"``).
    """
    path = Path(directory) / f"{stage}.json"
    write_json(dict(timing), path)
    return path


def write_metrics(metrics: Mapping[str, Any], path: str | Path, stage: str,
                  directory: str | Path = TIMING_DIR) -> dict:
    """Write ``metrics`` without its wall-clock keys to ``path``, those keys to the timing file.

    Returns the timing dict (for a stage's closing log line). Both files are written atomically.
    """
    results, timing = split_timing(metrics)
    write_json(results, path)
    write_timing(stage, timing, directory)
    return timing
