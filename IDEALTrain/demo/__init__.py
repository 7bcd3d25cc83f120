"""Demonstrations: the shipped model on the shipped real scan, and a small training comparison on phantoms.

- :func:`run_sample_demo` (``idealtrain demo``): segments the real cine MRI sample and compares LV
  volumes, EF, mass and Dice with the expert's contours, in seconds.
- :func:`run_train_comparison` (``idealtrain demo --train-comparison``): trains IDEAL and a
  supervised-only baseline on phantoms at a tiny budget; it shows the training pipeline working
  end to end, not the method's benefit (see benchmarks/README.md for that).
"""
from .real_scan import run_sample_demo
from .train_comparison import run_train_comparison

__all__ = ["run_sample_demo", "run_train_comparison"]
