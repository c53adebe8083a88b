"""medicsynth: fight class imbalance in MEDIC disaster images with relabelling and synthetic images.

The package holds the domain logic; the DVC stages in ``stages/`` are thin scripts around it.
"""

__version__ = "0.1.0"
