"""Per-process import cost of the stages run 30 times per demo pipeline (train × 15, evaluate × 15).

sklearn (~1 s) and torchvision (~1.5 s: it imports torch._dynamo) were imported by every one of
those processes; the demo's 15-minute budget (README) cannot afford ~75 s of imports for nothing.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from sklearn.metrics import f1_score

from medicsynth.labels import NUM_CLASSES, TASKS
from medicsynth.training import mean_macro_f1


def test_train_and_evaluate_modules_do_not_import_sklearn_or_torchvision():
    code = ("import sys, medicsynth.training, medicsynth.evaluation, medicsynth.models, medicsynth.loaders; "
            "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('sklearn', 'torchvision')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_mean_macro_f1_equals_sklearn_over_all_classes():
    rng = np.random.default_rng(0)
    for n in (3, 50, 400):  # n=3 leaves classes absent: they count as F1 0, as sklearn's labels=range(C)
        labels = np.stack([rng.integers(0, NUM_CLASSES[t], n) for t in TASKS], axis=1)
        probs = {t: rng.random((n, NUM_CLASSES[t])) for t in TASKS}
        expected = np.mean([
            f1_score(labels[:, j], probs[t].argmax(1), labels=range(NUM_CLASSES[t]), average="macro", zero_division=0)
            for j, t in enumerate(TASKS)
        ])
        assert mean_macro_f1(labels, probs) == expected
