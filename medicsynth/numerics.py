"""CPU numerics: the same bits on every machine of a vendor, or on every x86-64 machine.

oneDNN (PyTorch's CPU convolutions), NNPACK (its other convolution backend), MKL (its CPU matrix
products), OpenBLAS (NumPy's) and ATen's own vectorised kernels pick their code path from the
processor they run on: its instruction set, its vendor and its cache sizes. The paths sum in
different orders, so the same training on the same data gives models that differ in the last
bits, and after a few epochs in early stopping and labels. Measured on this project's 2-core
machines:

- AMD EPYC (AVX-512): a 2-epoch demo training gave a different ``model.pt`` with
  ``ONEDNN_MAX_CPU_ISA=AVX2`` than without it. Hence the pins below, set on ``import medicsynth``.
- AMD EPYC vs Intel Xeon, both pinned (2026-12-02): the same commit gave different relabel fold
  models and classifiers. Two causes, found on the AMD machine on 2026-12-03: ``MKL_CBWR=AVX2`` is
  an Intel-only branch, and on the AMD processor MKL falls back to ``AUTO`` (``mkl_serv_cbwr_get``
  returns 2, not 10, as MKL's documentation says it does on non-Intel processors); and oneDNN's
  convolution kernels choose their blocking from the cache sizes. An earlier candidate that only
  switched oneDNN off was no better: PyTorch then convolves with NNPACK, which tiles by cache size
  and thread count (its fingerprint changed with the thread count and between the vendors).

Two modes, chosen by params.yaml's ``numerics`` key (a tracked param: it changes results):

``fast`` (default)
    ATen and oneDNN capped at AVX2, MKL's ``AVX2`` CNR branch, OpenBLAS's Haswell kernels. The
    same bits on every machine of one vendor however busy it is; not across vendors.
``vendor_neutral``
    Also MKL's ``COMPATIBLE`` branch, the one Intel documents as giving the same results on
    Intel and non-Intel processors (SSE2 without the approximate ``rcpps``/``rsqrtps``, fixed
    cache sizes, deterministic reductions, static scheduling) for a fixed thread count, which the
    params fix; and oneDNN and NNPACK off, so convolutions run ATen's ``slow_conv2d`` (im2col +
    MKL GEMM). Costs 1.7x per demo-classifier step and 1.6x for the whole demo on the AMD EPYC
    (``dvc repro`` 22 min 31 s vs 14 min 19 s), which is why it is not the default. Bit equality
    with an Intel machine is by design, not yet measured: ``bench/numerics_check.py`` prints the
    fingerprint to compare (docs/PERFORMANCE.md).

A stage that uses torch calls :func:`apply_params` right after reading params.yaml; it records the
mode in ``MEDICSYNTH_NUMERICS`` so that worker processes, which import the package afresh, follow
it too. GPU kernels are unaffected by either mode.
"""

from __future__ import annotations

import ctypes
import importlib.abc
import importlib.machinery
import os
import platform
import sys
from typing import Any, Mapping

#: The variables and values every process gets on ``import medicsynth`` (x86-64; a user's own wins).
PORTABLE_CPU_ISA = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",    # oneDNN convolutions: no AVX-512/AMX paths
    "MKL_CBWR": "AVX2",              # MKL conditional numerical reproducibility: the AVX2 branch (Intel)
    "ATEN_CPU_CAPABILITY": "avx2",   # ATen's vectorised kernels (reductions, elementwise ops)
    "OPENBLAS_CORETYPE": "Haswell",  # NumPy/SciPy's OpenBLAS: one kernel set, not one per model
}

#: params.yaml ``numerics`` values.
MODES = ("fast", "vendor_neutral")
#: How a process tells the processes it starts which mode to follow.
MODE_ENV = "MEDICSYNTH_NUMERICS"
#: MKL's number for the COMPATIBLE branch (``MKL_CBWR_COMPATIBLE`` in mkl.h).
MKL_CBWR_COMPATIBLE = 3


def _x86() -> bool:
    return platform.machine().lower() in {"x86_64", "amd64"}


def pin_cpu_isa(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set :data:`PORTABLE_CPU_ISA` (x86-64 only) where the user has not set the variable.

    Parameters
    ----------
    environ:
        The environment to change; ``os.environ`` by default.

    Returns
    -------
    The variables this call set (those already set by the user are left as they are; on
    non-x86 processors nothing is set, since these libraries have no such choice there).
    It must run before the libraries initialise: MKL reads ``MKL_CBWR`` at its first call,
    OpenBLAS its core type when NumPy is imported.
    """
    env = os.environ if environ is None else environ
    if not _x86():
        return {}
    changed = {}
    for key, value in PORTABLE_CPU_ISA.items():
        if key not in env:
            env[key] = value
            changed[key] = value
    return changed


def neutral_torch_backends(torch_module) -> None:
    """Switch off PyTorch's cache-size-dependent CPU convolution backends (oneDNN, NNPACK).

    Convolutions then run ATen's ``slow_conv2d``/``slow_conv_transpose2d`` (im2col + MKL GEMM).
    Idempotent; affects CPU tensors only.
    """
    torch_module.backends.mkldnn.enabled = False
    torch_module.backends.nnpack.set_flags(False)


class _ConfigureAfterExec(importlib.abc.Loader):
    """Wraps torch's loader: runs :func:`neutral_torch_backends` once ``torch`` has initialised."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        neutral_torch_backends(module)

    def __getattr__(self, name):  # get_resource_reader, is_package ... of the real loader
        return getattr(self._loader, name)


class _TorchImportHook(importlib.abc.MetaPathFinder):
    """Finds ``torch`` like the rest of ``sys.meta_path`` would, with :class:`_ConfigureAfterExec`."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)  # once, and so that the lookup below does not find us again
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _ConfigureAfterExec(spec.loader)
        return spec


def _neutral_torch_now_or_on_import() -> None:
    """Apply :func:`neutral_torch_backends` to ``torch`` now if imported, else when it is.

    Importing torch costs seconds, so the package does not import it for stages that never use
    it; the hook makes the setting hold whatever module imports torch first.
    """
    if "torch" in sys.modules:
        neutral_torch_backends(sys.modules["torch"])
    elif not any(isinstance(finder, _TorchImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TorchImportHook())


def current_mode() -> str:
    """The numerics mode of this process: the one a stage (or its parent) applied, else ``fast``."""
    return os.environ.get(MODE_ENV, "fast")


def _enter_vendor_neutral() -> None:
    """MKL's COMPATIBLE branch (over any inherited ``MKL_CBWR``: the mode demands it) and
    oneDNN/NNPACK off; shared by :func:`apply_mode` and worker processes' :func:`configure_on_import`."""
    os.environ["MKL_CBWR"] = "COMPATIBLE"
    _neutral_torch_now_or_on_import()


def mkl_cbwr_branch() -> int | None:
    """The CNR branch MKL runs (3 = COMPATIBLE, 2 = AUTO, 1 = off), or None without MKL.

    Asks the MKL inside PyTorch (``mkl_serv_cbwr_get``), which is how :func:`apply_mode` checks
    that the variable reached MKL in time: set after MKL's first call, it is ignored.
    """
    import torch

    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        get = ctypes.CDLL(path).mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    return int(get(1))  # 1 = MKL_CBWR_BRANCH


def apply_mode(mode: str) -> None:
    """Run this process, and the processes it starts, in numerics ``mode`` (one of :data:`MODES`).

    Call it before the first CPU matrix product (a stage: right after reading params.yaml).
    ``fast`` leaves the pins of :func:`pin_cpu_isa` alone. ``vendor_neutral`` sets
    ``MKL_CBWR=COMPATIBLE`` and switches oneDNN and NNPACK off (now, or when torch is imported).

    Raises ``ValueError`` for an unknown mode, and ``RuntimeError`` when MKL already runs another
    branch (it read ``MKL_CBWR`` before this call), since the results would then not be neutral.
    """
    if mode not in MODES:
        raise ValueError(f"params.yaml: numerics must be one of {', '.join(MODES)}, got {mode!r}")
    os.environ[MODE_ENV] = mode
    if mode != "vendor_neutral" or not _x86():
        return
    _enter_vendor_neutral()
    if "torch" in sys.modules:
        branch = mkl_cbwr_branch()
        if branch not in (None, MKL_CBWR_COMPATIBLE):
            raise RuntimeError(f"numerics: vendor_neutral needs MKL's COMPATIBLE branch, but MKL already "
                               f"runs branch {branch} (a matrix product ran before numerics.apply_mode)")


def apply_params(params: Mapping[str, Any]) -> str:
    """:func:`apply_mode` with params.yaml's ``numerics`` (``fast`` when the key is absent); returns it."""
    mode = str(params.get("numerics", "fast"))
    apply_mode(mode)
    return mode


def configure_on_import() -> None:
    """What ``import medicsynth`` does: the pins, and the mode a parent process handed down."""
    if current_mode() == "vendor_neutral" and _x86():
        _enter_vendor_neutral()
    pin_cpu_isa()


#: How long an idle OpenMP thread spins before it sleeps (GNU libgomp, which PyTorch's CPU
#: kernels use). libgomp's default spins ~300,000 iterations: with 2 torch threads on a 2-core
#: machine that other processes share, each thread burns its time slice waiting for the other
#: and the run collapses. Measured (demo training, 2 cores, 2 torch threads; 2 CPU burners for
#: "busy"): default spin 13.0 s idle / 62.4 s busy; OMP_WAIT_POLICY=PASSIVE 18.0 / 30.6;
#: 10,000 spins 16.2 / 36.9; 1 thread 21.5 / 35.3. Speed only: results do not depend on it.
OPENMP_SPIN = {"GOMP_SPINCOUNT": "10000"}


def bound_openmp_spin(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set :data:`OPENMP_SPIN` unless the user set it (must run before torch is imported).

    Returns the variables this call set.
    """
    env = os.environ if environ is None else environ
    changed = {}
    for key, value in OPENMP_SPIN.items():
        if key not in env and "OMP_WAIT_POLICY" not in env:
            env[key] = value
            changed[key] = value
    return changed
