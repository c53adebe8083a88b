"""The CPU code paths are pinned on import, so results do not depend on the processor or its vendor."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

from pathlib import Path

import pytest

from medicsynth.numerics import MKL_CBWR_COMPATIBLE, MODE_ENV, PORTABLE_CPU_ISA, pin_cpu_isa

x86_only = pytest.mark.skipif(platform.machine().lower() not in {"x86_64", "amd64"}, reason="x86-64 only")


@x86_only
def test_pin_sets_only_unset_variables():
    env = {"MKL_CBWR": "COMPATIBLE"}
    changed = pin_cpu_isa(env)
    assert env["MKL_CBWR"] == "COMPATIBLE"  # the user's choice wins
    assert changed == {k: v for k, v in PORTABLE_CPU_ISA.items() if k != "MKL_CBWR"}
    assert env["ONEDNN_MAX_CPU_ISA"] == "AVX2"


@x86_only
def test_importing_the_package_pins_the_isa_before_torch_runs():
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_CPU_ISA}
    code = "import medicsynth, os, json; print(json.dumps({k: os.environ.get(k) for k in %r}))" % list(PORTABLE_CPU_ISA)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert all(f'"{k}": "{v}"' in out for k, v in PORTABLE_CPU_ISA.items())


def _probe(code: str, **extra_env: str) -> dict:
    """Run ``code`` (which prints one JSON line) in a fresh interpreter without the pinned variables."""
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_CPU_ISA and k != MODE_ENV}
    out = subprocess.run([sys.executable, "-c", code], env={**env, **extra_env}, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


#: What a process runs: MKL's branch, the convolution backend, OpenBLAS's kernels (one JSON line).
PROBE = """
import json, torch, threadpoolctl
from medicsynth.numerics import mkl_cbwr_branch
x, w = torch.rand(2, 3, 8, 8), torch.rand(4, 3, 3, 3)
(x.flatten(1) @ torch.rand(192, 4)).sum()  # a first MKL call
backend = torch._C._select_conv_backend(x, w, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1, None)
blas = [i.get("architecture") for i in threadpoolctl.threadpool_info() if i["internal_api"] == "openblas"]
print(json.dumps({"mkldnn": torch.backends.mkldnn.enabled, "nnpack": torch._C._get_nnpack_enabled(),
                  "conv": str(backend), "mkl_branch": mkl_cbwr_branch(), "openblas": blas}))
"""


@x86_only
@pytest.mark.parametrize("first", ["medicsynth", "torch"], ids=["package-first", "torch-first"])
def test_vendor_neutral_reaches_mkl_and_the_convolutions(first):
    """Whichever is imported first, apply_mode puts MKL on COMPATIBLE and convolutions off oneDNN/NNPACK."""
    order = "import medicsynth, torch\n" if first == "medicsynth" else "import torch, medicsynth\n"
    got = _probe(order + "from medicsynth.numerics import apply_mode\napply_mode('vendor_neutral')\n" + PROBE)
    assert got["mkldnn"] is False and got["nnpack"] is False
    assert got["conv"].endswith("Slow2d")  # im2col + MKL GEMM: no cache-size-dependent tiling
    assert got["mkl_branch"] == MKL_CBWR_COMPATIBLE  # the variable reached MKL before its first call
    if first == "medicsynth":  # torch loads numpy, whose OpenBLAS reads its core type then: stages import us first
        assert set(got["openblas"]) <= {"Haswell"}


@x86_only
def test_worker_processes_inherit_the_mode():
    """A process started with the mode in its environment (a DataLoader or filter worker) follows it."""
    got = _probe("import medicsynth, torch\n" + PROBE, **{MODE_ENV: "vendor_neutral"})
    assert (got["mkldnn"], got["mkl_branch"]) == (False, MKL_CBWR_COMPATIBLE)
    # even when it also inherits the fast pin's MKL_CBWR (a parent that imported medicsynth first)
    got = _probe("import medicsynth, torch\n" + PROBE, **{MODE_ENV: "vendor_neutral", "MKL_CBWR": "AVX2"})
    assert (got["mkldnn"], got["mkl_branch"]) == (False, MKL_CBWR_COMPATIBLE)


@x86_only
def test_fast_mode_keeps_onednn_and_is_the_default():
    got = _probe("import medicsynth, torch\nfrom medicsynth.numerics import apply_params\n"
                 "assert apply_params({}) == 'fast'\n" + PROBE)
    assert got["mkldnn"] is True and got["mkl_branch"] != MKL_CBWR_COMPATIBLE
    assert set(got["openblas"]) <= {"Haswell"}


@x86_only
def test_vendor_neutral_after_a_matrix_product_is_refused():
    """Too late: MKL read its branch at the first product, so the results would not be neutral."""
    code = ("import medicsynth, torch\n(torch.rand(64, 64) @ torch.rand(64, 64)).sum()\n"
            "from medicsynth.numerics import apply_mode\ntry:\n    apply_mode('vendor_neutral')\n"
            "except RuntimeError as e:\n    import json; print(json.dumps({'error': str(e)}))\n")
    assert "COMPATIBLE" in _probe(code)["error"]


def test_an_unknown_mode_names_the_key():
    from medicsynth.numerics import apply_params
    with pytest.raises(ValueError, match="numerics must be one of fast, vendor_neutral"):
        apply_params({"numerics": "portable"})


def test_every_stage_imports_the_package_first():
    """numpy loads OpenBLAS (and reads its core type) on import: the pins must come before it."""
    import ast
    from pathlib import Path

    for path in sorted(Path(__file__).resolve().parents[1].glob("stages/*.py")):
        imports = [node for node in ast.parse(path.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))
                   and getattr(node, "module", None) != "__future__"]
        first = imports[0]
        assert isinstance(first, ast.Import) and first.names[0].name == "medicsynth", (
            f"{path.name}: the first import must be `import medicsynth` (numerics pins), not line {first.lineno}")


def test_resume_caches_key_on_the_mode(monkeypatch, tmp_path):
    """relabel's fold cache and generate's provenance stamps must miss across modes, or a run would
    silently keep results computed in the other one (both survive reruns on purpose)."""
    import numpy as np
    from PIL import Image

    from medicsynth.diffusion.generate import GenerateOptions, ModelRef, provenance_record
    from medicsynth.params import load_params
    from medicsynth.relabel import _fold_key, fold_model_config

    path = tmp_path / "a.jpg"
    Image.new("RGB", (4, 4)).save(path)
    files, labels, hold = np.array([str(path)]), np.zeros((1, 4), dtype=np.int64), np.array([0])
    row = {"id": "s1", "seed": 3}
    ref = ModelRef(name="demo", path=tmp_path, kind="demo", fingerprint="m")
    opts = GenerateOptions.from_params(load_params(Path(__file__).resolve().parents[1] / "params.yaml")["generate"])
    config = fold_model_config(load_params(Path(__file__).resolve().parents[1] / "params.yaml")["relabel"]["model"])
    keys, records = [], []
    for mode in ("fast", "vendor_neutral"):
        monkeypatch.setenv(MODE_ENV, mode)
        keys.append(_fold_key(files, labels, hold, config))
        records.append(provenance_record(row, "p", "", opts, ref, "", 64, 64))
    assert keys[0] != keys[1]
    assert "numerics" not in records[0] and records[1]["numerics"] == "vendor_neutral"
