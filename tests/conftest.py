"""Shared test configuration: deterministic hypothesis, one torch thread per worker."""

import os

import torch
from hypothesis import settings

# Figures (doctests of sknlica.plotting, the gallery) need no display.
os.environ.setdefault("MPLBACKEND", "Agg")

# Under pytest-xdist each worker gets one core; more threads would oversubscribe.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

settings.register_profile("sknlica", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("sknlica")
