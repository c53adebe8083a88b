"""The CPU code path is pinned on import, so results do not depend on the processor."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from medicsynth.numerics import PORTABLE_CPU_ISA, pin_cpu_isa

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
