"""medicsynth: fight class imbalance in MEDIC disaster images with relabelling and synthetic images.

The package holds the domain logic; the DVC stages in ``stages/`` are thin scripts around it.

Importing the package pins the CPU code paths of PyTorch's and NumPy's CPU libraries (see
:mod:`medicsynth.numerics`), so that a stage computes the same bytes on any x86-64 machine.
"""

from medicsynth.numerics import bound_openmp_spin, configure_on_import

configure_on_import()  # the CPU code-path pins, and the numerics mode a parent stage chose
bound_openmp_spin()  # speed only: 2 torch threads on a shared 2-core machine (numerics.OPENMP_SPIN)

__version__ = "0.1.0"
