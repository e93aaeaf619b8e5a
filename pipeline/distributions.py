"""Random distributions the samplers share (kernels, render). The Generator is passed in:
nothing here reads global random state."""

from __future__ import annotations

import numpy as np


def loguniform(rng: np.random.Generator, lo: float, hi: float, size=None) -> np.ndarray | float:
    """Log-uniform in [lo, hi]; uniform when lo == 0 (log-uniform is undefined there).

    One draw of ``rng.uniform`` per value either way, so the streams of the draws that follow do
    not depend on which branch was taken. Returns a float64 array of ``size``, or a float."""
    if lo <= 0:
        return rng.uniform(lo, hi, size)
    return np.exp(rng.uniform(np.log(lo), np.log(hi), size))
