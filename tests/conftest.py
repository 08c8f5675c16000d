"""Shared pytest configuration: deterministic CPU runs, a small thread count, headless plots."""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
