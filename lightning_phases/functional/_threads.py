"""Bound the BLAS/OpenMP pools of numpy, scipy and scikit-learn to torch's thread count.

numpy's LAPACK (the noise spectrum) and scikit-learn (the loss mixture) run on
OpenBLAS/MKL/OpenMP pools that ignore ``torch.set_num_threads``: on a loaded
machine one float64 eigendecomposition at n = 1024 took 0.74–6.2 s with the
default pool against 0.16–0.20 s with one thread. Every numpy/scipy/
scikit-learn call of the library runs inside :func:`torch_threads`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import torch

__all__ = ["torch_threads"]


@lru_cache(maxsize=1)
def _controller(num_modules: int) -> Any:
    """A ``ThreadpoolController`` of the libraries loaded now (a cache, keyed on the number of imported modules).

    Scanning the loaded libraries costs ≈ 10–70 ms, a ``limit`` on a known
    controller ≈ 20 µs; a new import (which may load another BLAS or OpenMP
    library) changes the key and triggers a new scan.
    """
    from threadpoolctl import ThreadpoolController  # type: ignore[import-untyped]

    return ThreadpoolController()


@contextmanager
def torch_threads() -> Iterator[None]:
    """Within the block, BLAS and OpenMP pools use at most ``torch.get_num_threads()`` threads."""
    controller = _controller(len(sys.modules))
    with controller.limit(limits=max(1, torch.get_num_threads())):
        yield
