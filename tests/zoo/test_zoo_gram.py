"""Zoo, Gram matrix: every row and method of ``gradient_gram`` against the per-sample autograd loop.

For a row expected ``"exact"`` the fast Gram matrix must equal the reference
``G = J Jᵀ`` (float64, one ``torch.autograd.grad`` per sample) to a relative
Frobenius tolerance set by the model's dtype, and the statistics derived from
it -- the order parameters (with a fixed generator for ``R``), the noise
spectrum and the effective dimension -- must agree. A row expected
``"refused: <substring>"`` must raise ``UnsupportedModelError`` with that
substring, for every method alike.

Tolerances (relative Frobenius norm of ``G − G_ref``):

* float32: ``1e-5``. The fast paths and the reference round differently
  (batched vs. single-sample kernels) by a few float32 ulps (2⁻²⁴ ≈ 6e-8) per
  operation; the zoo measures 5e-8 to 3e-7.
* float64 (``64-true``): ``1e-10``, the same argument at 2⁻⁵³.
* bfloat16 (``bf16-true``): ``2⁻⁵ ≈ 0.031`` against the *exact* value (the
  reference run in float64 on the same bf16 weights and inputs). bf16 keeps 8
  significant bits, so every stored activation and output gradient carries a
  relative rounding of up to ``u = 2⁻⁸``; the per-sample gradient of the
  two-layer model is a product of about four such factors and ``G`` is
  quadratic in it, so ``8u = 2⁻⁵`` bounds the first-order error (the zoo
  measures 2.7e-3, the float64 reference of the same weights vs. a bf16 loop
  2.8e-3).
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

from lightning_phases.errors import PhaseStatisticsWarning, UnsupportedModelError
from lightning_phases.functional import (
    effective_dimension,
    gradient_gram,
    make_generator,
    noise_spectrum,
    order_parameters,
)
from tests.reference.zoo_reference import reference_gram
from tests.zoo.models import (
    BATCH,
    METHODS,
    ROWS,
    RTOL,
    ZooCase,
    ZooRow,
    cast_like_precision,
    expected_refusal,
    probe_batch,
)


def _params(rows=ROWS, methods=METHODS):
    out = []
    for r in rows:
        for method in methods:
            marks = [pytest.mark.slow] if r.slow else []
            if method in r.needs:
                marks.append(pytest.mark.xfail(strict=True, reason=f"needs {r.needs[method]}"))
            out.append(pytest.param(r, method, marks=marks, id=f"{r.name}-{method}"))
    return out


def _probe(case: ZooCase):
    """The model in its training dtype and the first ``probe_size`` samples, cast as the precision plugin does."""
    model = case.module.to(case.dtype)
    x, y = cast_like_precision(*probe_batch(case, range(case.probe_size)), case.dtype)
    return model, x, y


def _fast_gram(case: ZooCase, model, x, y, method: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(G, losses, messages of the PhaseStatisticsWarnings emitted)``."""
    kwargs = {} if case.forward is None else {"forward": case.forward}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gram, losses = gradient_gram(model, x, y, loss_fn=case.loss_fn, method=method, **kwargs)
    return gram, losses, [str(w.message) for w in caught if issubclass(w.category, PhaseStatisticsWarning)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _reference(case: ZooCase, model, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    exact = torch.float64 if case.dtype == torch.bfloat16 else None
    return reference_gram(model, x, y, case.loss_fn, forward=case.forward, compute_dtype=exact)


def _check_statistics(fast: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    """Order parameters, spectrum and D_s of the fast Gram equal those of the reference Gram.

    Each activity/noise field is compared relative to the total activity ``A``
    (they are linear in ``G``, so they inherit its relative error); the
    dimensionless ``R`` and ``sigma2_lambda`` absolutely at ``10·rtol``;
    eigenvalues relative to the largest; ``D_s`` exactly.
    """
    got = order_parameters(fast, BATCH, generator=make_generator(7)).as_dict()
    want = order_parameters(ref, BATCH, generator=make_generator(7)).as_dict()
    scale = abs(want["A"])
    for key, value in want.items():
        tol = 10 * rtol * (1.0 if key in ("R", "sigma2_lambda") else scale)
        assert math.isclose(got[key], value, rel_tol=0, abs_tol=tol), (key, got[key], value)
    spec_fast, spec_ref = noise_spectrum(fast, BATCH), noise_spectrum(ref, BATCH)
    torch.testing.assert_close(spec_fast, spec_ref, rtol=0, atol=10 * rtol * float(spec_ref.max()))
    for fraction in (0.5, 0.9):
        assert effective_dimension(spec_fast, fraction) == effective_dimension(spec_ref, fraction)


@pytest.mark.parametrize(("zoo_row", "method"), _params())
def test_gram_matches_reference_or_refuses(zoo_row: ZooRow, method: str) -> None:
    case = zoo_row.build()
    model, x, y = _probe(case)
    refusal = expected_refusal(zoo_row.expect[method])
    if refusal is not None:
        with pytest.raises(UnsupportedModelError, match=re.escape(refusal)):
            _fast_gram(case, model, x, y, method)
        return
    fast, losses, warned = _fast_gram(case, model, x, y, method)
    expected_warning = zoo_row.warns.get(method)
    if expected_warning is None:
        assert warned == [], warned
    else:
        assert warned and all(expected_warning in m for m in warned), warned
        assert len(warned) == len(set(warned)), f"a warning repeated: {warned}"
    ref, ref_losses = _reference(case, model, x, y)
    assert fast.shape == ref.shape == (case.probe_size, case.probe_size)
    assert fast.dtype == torch.float64
    rtol = zoo_row.rtol.get(method, RTOL[case.dtype])
    assert _rel(fast, ref) <= rtol, f"relative Gram error {_rel(fast, ref):.3e} > {rtol:.1e}"
    _check_statistics(fast, ref, rtol)
    torch.testing.assert_close(losses.double(), ref_losses, rtol=rtol, atol=rtol * float(ref_losses.abs().max()))


def test_probe_gram_is_not_degenerate() -> None:
    """The comparisons above mean something: the reference Grams have full spread (no all-zero gradient)."""
    for r in ROWS:
        if r.slow or any(expected_refusal(e) for e in r.expect.values()):
            continue
        case = r.build()
        model, x, y = _probe(case)
        ref, _ = _reference(case, model, x, y)
        assert bool((ref.diagonal() > 0).all()), r.name
        assert noise_spectrum(ref, BATCH).max() > 0, r.name
