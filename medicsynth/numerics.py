"""Machine-independent CPU numerics.

oneDNN (PyTorch's CPU convolutions), MKL (its CPU matrix products) and ATen's own vectorised
kernels pick their code path from the processor they run on: AVX-512 on one machine, AVX2 on
another. The paths sum in different orders, so the same training on the same data gives models
that differ in the last bits, and after a few epochs in early stopping and labels. Measured on
this project's 2-core AMD EPYC (AVX-512) machine: a 2-epoch demo training gave a different
``model.pt`` with ``ONEDNN_MAX_CPU_ISA=AVX2`` than without it, while ``MKL_CBWR`` and
``ATEN_CPU_CAPABILITY`` did not change it there (they do on Intel processors, where MKL and ATen
would choose AVX-512).

:func:`pin_cpu_isa` caps all three at AVX2, which every x86-64 processor of the last decade has,
so every such machine runs the same code path. It only sets variables the user has not set, and
it must run before the libraries initialise (they read the variables on first use), which is why
``medicsynth/__init__.py`` calls it on import. GPU kernels are unaffected.

What the cap does not give: identical bits across processor *vendors*. The same code, data and
params on a 2-core Intel Xeon (AVX-512) gave a different demo model than on the 2-core AMD
EPYC (both capped at AVX2; measured 2026-12-02): MKL's AVX2 branch and oneDNN's kernel blocking
are chosen per vendor and cache size. ``MKL_CBWR=COMPATIBLE`` (MKL's vendor-neutral SSE2 branch)
with oneDNN switched off (``torch.backends.mkldnn.enabled = False``) takes both choices away, at
+47% time per demo training on the Intel machine; it was not checked on a second vendor, so it
is not the default. A ``dvc.lock`` therefore reproduces on machines of the vendor and CPU family
that wrote it (README, "Reproducible results").
"""

from __future__ import annotations

import os
import platform

#: The variables and the values that make the CPU code path the same on every x86-64 machine.
PORTABLE_CPU_ISA = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",   # oneDNN convolutions: no AVX-512/AMX paths
    "MKL_CBWR": "AVX2",             # MKL conditional numerical reproducibility: the AVX2 branch
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's vectorised kernels (reductions, elementwise ops)
}


def pin_cpu_isa(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Cap the CPU instruction set of PyTorch's CPU libraries at AVX2 (x86-64 only).

    Parameters
    ----------
    environ:
        The environment to change; ``os.environ`` by default.

    Returns
    -------
    The variables this call set (those already set by the user are left as they are; on
    non-x86 processors nothing is set, since these libraries have no such choice there).
    """
    env = os.environ if environ is None else environ
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return {}
    changed = {}
    for key, value in PORTABLE_CPU_ISA.items():
        if key not in env:
            env[key] = value
            changed[key] = value
    return changed


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
