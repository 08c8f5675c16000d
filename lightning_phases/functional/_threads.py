"""Bound the BLAS/OpenMP pools of numpy, scipy and scikit-learn to torch's thread count.

numpy's LAPACK (the noise spectrum) and scikit-learn (the loss mixture) run on
OpenBLAS/MKL/OpenMP pools that ignore ``torch.set_num_threads``: on a loaded
machine one float64 eigendecomposition at n = 1024 took 0.74–6.2 s with the
default pool against 0.16–0.20 s with one thread. Every numpy/scipy/
scikit-learn call of the library runs inside :func:`torch_threads`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["torch_threads"]


@contextmanager
def torch_threads() -> Iterator[None]:
    """Within the block, BLAS and OpenMP pools use at most ``torch.get_num_threads()`` threads."""
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    with threadpool_limits(limits=max(1, torch.get_num_threads())):
        yield
