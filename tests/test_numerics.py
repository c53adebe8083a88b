"""The CPU code paths are pinned on import, so results do not depend on the processor or its vendor."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from medicsynth.numerics import MKL_CBWR_COMPATIBLE, PORTABLE_CPU_ISA, pin_cpu_isa

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


def _probe(code: str) -> dict:
    """Run ``code`` (which prints one JSON line) in a fresh interpreter without the pinned variables."""
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_CPU_ISA}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


PROBE = """
import json, torch, threadpoolctl
from medicsynth.numerics import mkl_cbwr_branch
x, w = torch.rand(2, 3, 8, 8), torch.rand(4, 3, 3, 3)
backend = torch._C._select_conv_backend(x, w, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1, None)
blas = [i.get("architecture") for i in threadpoolctl.threadpool_info() if i["internal_api"] == "openblas"]
print(json.dumps({"mkldnn": torch.backends.mkldnn.enabled, "nnpack": torch._C._get_nnpack_enabled(),
                  "conv": str(backend), "mkl_branch": mkl_cbwr_branch(), "openblas": blas}))
"""


@x86_only
@pytest.mark.parametrize("first", ["medicsynth", "torch"], ids=["package-first", "torch-first"])
def test_the_vendor_neutral_path_reaches_mkl_openblas_and_the_convolutions(first):
    """Whichever is imported first, MKL runs its COMPATIBLE branch and convolutions avoid oneDNN/NNPACK."""
    order = "import medicsynth, torch\n" if first == "medicsynth" else "import torch, medicsynth\n"
    got = _probe(order + PROBE)
    assert got["mkldnn"] is False and got["nnpack"] is False
    assert got["conv"].endswith("Slow2d")  # im2col + MKL GEMM: no cache-size-dependent tiling
    assert got["mkl_branch"] == MKL_CBWR_COMPATIBLE  # the variable reached MKL before its first call
    assert set(got["openblas"]) <= {"Haswell"}


@x86_only
def test_without_the_package_torch_keeps_its_own_choices():
    """The probe can tell the difference (else the test above would prove nothing)."""
    got = _probe("import json, torch\nprint(json.dumps({'mkldnn': torch.backends.mkldnn.enabled}))")
    assert got["mkldnn"] is True
