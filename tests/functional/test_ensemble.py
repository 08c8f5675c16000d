"""Order parameters, noise spectrum and effective dimension against whole-ensemble enumeration."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_phases.errors import DegenerateInputError, PhaseStatisticsWarning
from lightning_phases.functional import (
    effective_dimension,
    gradient_gram,
    minibatch_variance_factor,
    noise_spectrum,
    order_parameters,
    per_sample_grads,
)
from tests.reference.ensemble import (
    effective_dimension_loop,
    enumerate_order_parameters,
    explicit_noise_covariance,
)

EXACT = ("A", "A0", "A_parallel", "A_perp", "D", "D_parallel", "sigma2_lambda")


def _jac(n: int, p: int, seed: int, shift: float = 0.7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # a common direction plus noise, like real per-sample gradients
    return torch.randn(n, p, generator=gen, dtype=torch.float64) + shift * torch.randn(
        1, p, generator=gen, dtype=torch.float64
    )


@pytest.mark.parametrize("n,b,p,seed", [(9, 3, 5, 0), (9, 3, 20, 1), (8, 2, 12, 2), (7, 6, 4, 3), (6, 1, 9, 4)])
def test_exact_fields_equal_enumeration(n, b, p, seed):
    jac = _jac(n, p, seed)
    ref = enumerate_order_parameters(jac, b)
    assert math.isclose(ref["mean_lambda"], 1.0, rel_tol=1e-12)  # <λ_μ> = 1 by definition
    op = order_parameters(jac @ jac.T, b, num_minibatches=64, generator=0)
    for field in EXACT:
        assert math.isclose(getattr(op, field), ref[field], rel_tol=1e-6, abs_tol=1e-12), field


def test_R_within_monte_carlo_tolerance():
    n, b = 9, 3
    jac = _jac(n, 6, 5, shift=0.5)
    exact = enumerate_order_parameters(jac, b)["R"]
    gram = jac @ jac.T
    estimates = [order_parameters(gram, b, num_minibatches=400, generator=s).R for s in range(8)]
    spread = torch.tensor(estimates).std().item()
    mean = sum(estimates) / len(estimates)
    # each estimate is an average of ~160k correlated pair cosines; 8 seeds pin the mean well
    assert abs(mean - exact) < max(4 * spread / math.sqrt(len(estimates)), 5e-3), (mean, exact, spread)
    assert all(abs(e - exact) < 0.1 for e in estimates)


def test_R_reproducible_with_seed_and_generator():
    gram = (lambda j: j @ j.T)(_jac(12, 7, 6))
    a = order_parameters(gram, 4, generator=123).R
    b = order_parameters(gram, 4, generator=torch.Generator().manual_seed(123)).R
    c = order_parameters(gram, 4, generator=124).R
    assert a == b and a != c
    state = torch.random.get_rng_state()
    order_parameters(gram, 4)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched


@pytest.mark.filterwarnings("ignore::lightning_phases.errors.PhaseStatisticsWarning")
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 30),
    p=st.integers(1, 25),
    data=st.data(),
)
def test_identities_hold(n, p, data):
    b = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 10_000))
    jac = _jac(n, p, seed)
    op = order_parameters(jac @ jac.T, b, num_minibatches=8, generator=0)
    scale = max(op.A, 1e-12)
    assert math.isclose(op.A, op.A0 + op.D, rel_tol=1e-9, abs_tol=1e-12 * scale)
    assert math.isclose(op.A, op.A_parallel + op.A_perp, rel_tol=1e-9, abs_tol=1e-9 * scale)
    assert math.isclose(op.D, op.A_perp + op.D_parallel, rel_tol=1e-9, abs_tol=1e-9 * scale)
    assert op.sigma2_lambda >= 0 and op.D >= 0
    assert math.isclose(op.D, float(noise_spectrum(jac @ jac.T, b).sum()), rel_tol=1e-8, abs_tol=1e-10 * scale)


@pytest.mark.parametrize("n,b,p,seed", [(9, 3, 5, 0), (9, 3, 20, 1), (8, 4, 7, 2)])
def test_spectrum_equals_explicit_covariance(n, b, p, seed):
    jac = _jac(n, p, seed)
    spectrum = noise_spectrum(jac @ jac.T, b)
    assert spectrum.shape == (n - 1,) and spectrum.dtype == torch.float64
    assert torch.all(spectrum[:-1] >= spectrum[1:])
    explicit = torch.linalg.eigvalsh(explicit_noise_covariance(jac, b)).flip(0).clamp_min(0)
    k = min(n - 1, p)
    torch.testing.assert_close(spectrum[:k], explicit[:k], rtol=1e-6, atol=1e-10)
    assert torch.all(spectrum[k:] < 1e-10)  # at most min(n-1, P) non-zero


def test_spectrum_of_a_real_model_and_effective_dimension():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3)).double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    jac = per_sample_grads(model, x, y)
    gram, _ = gradient_gram(model, x, y)
    ref = enumerate_order_parameters(jac, 3)
    op = order_parameters(gram, 3, generator=0)
    for field in EXACT:
        assert math.isclose(getattr(op, field), ref[field], rel_tol=1e-6), field
    spectrum = noise_spectrum(gram, 3)
    for f in (0.5, 0.9, 0.99, 1.0):
        assert effective_dimension(spectrum, f) == effective_dimension_loop(spectrum.tolist(), f)


@pytest.mark.parametrize(
    "eig,f,k",
    [
        ([5.0, 3.0, 2.0], 0.5, 1),
        ([5.0, 3.0, 2.0], 0.8, 2),
        ([5.0, 3.0, 2.0], 0.81, 3),
        ([2.0, 3.0, 5.0], 0.8, 2),
        ([1.0, 1.0, 1.0, 1.0], 0.9, 4),
        ([0.0, 0.0], 0.9, 0),
        ([7.0, 0.0, 0.0], 1.0, 1),
    ],
)
def test_effective_dimension_cases(eig, f, k):
    assert effective_dimension(torch.tensor(eig), f) == k == (effective_dimension_loop(eig, f) if sum(eig) else 0)


def test_effective_dimension_errors():
    with pytest.raises(DegenerateInputError, match="fraction"):
        effective_dimension(torch.ones(3), 0.0)
    with pytest.raises(DegenerateInputError, match="fraction"):
        effective_dimension(torch.ones(3), 1.5)
    with pytest.raises(DegenerateInputError, match="NaN"):
        effective_dimension(torch.tensor([1.0, float("nan")]))
    with pytest.raises(DegenerateInputError, match="negative"):
        effective_dimension(torch.tensor([1.0, -1.0]))


def test_minibatch_variance_factor():
    assert minibatch_variance_factor(10, 10) == 0.0
    assert math.isclose(minibatch_variance_factor(10, 1), 1.0)
    assert math.isclose(minibatch_variance_factor(9, 3), 6 / 24)


# ----------------------------------------------------------------- degenerate input


def test_too_few_samples_and_bad_batch_size():
    g = torch.eye(1, dtype=torch.float64)
    with pytest.raises(DegenerateInputError, match="n=1"):
        order_parameters(g, 1)
    with pytest.raises(DegenerateInputError, match="n=1"):
        noise_spectrum(g, 1)
    g = torch.eye(4, dtype=torch.float64)
    with pytest.raises(DegenerateInputError, match="batch_size=5 is larger"):
        order_parameters(g, 5)
    with pytest.raises(DegenerateInputError, match="batch_size=5 is larger"):
        noise_spectrum(g, 5)
    with pytest.raises(DegenerateInputError, match=">= 1"):
        order_parameters(g, 0)
    with pytest.raises(DegenerateInputError, match="square"):
        order_parameters(torch.ones(3, 4), 2)
    with pytest.raises(DegenerateInputError, match="num_minibatches"):
        order_parameters(g, 2, num_minibatches=1)


def test_nan_gram_gives_nan_fields_and_one_warning():
    jac = _jac(6, 4, 0)
    gram = jac @ jac.T
    gram[2, 3] = gram[3, 2] = float("nan")
    with pytest.warns(PhaseStatisticsWarning) as record:
        op = order_parameters(gram, 2)
    assert len(record) == 1
    assert all(math.isnan(v) for v in op.as_dict().values())
    with pytest.warns(PhaseStatisticsWarning):
        assert torch.isnan(noise_spectrum(gram, 2)).all()
    gram[0, 0] = float("inf")
    with pytest.warns(PhaseStatisticsWarning):
        assert math.isnan(order_parameters(gram, 2).A)


def test_zero_mean_gradient():
    v = torch.randn(1, 5, dtype=torch.float64)
    jac = torch.cat([v, -v, 2 * v, -2 * v])  # mean exactly zero
    with pytest.warns(PhaseStatisticsWarning, match="mean gradient is zero") as record:
        op = order_parameters(jac @ jac.T, 2)
    assert len(record) == 1
    assert pytest.approx(0.0, abs=1e-12) == op.A0
    assert op.D > 0 and math.isclose(op.A, op.D)
    assert math.isnan(op.sigma2_lambda) and math.isnan(op.A_perp)
    assert math.isfinite(op.R)


def test_full_batch_has_no_noise_and_undefined_R():
    jac = _jac(5, 3, 1)
    with pytest.warns(PhaseStatisticsWarning, match="R is undefined"):
        op = order_parameters(jac @ jac.T, 5)
    assert op.D == 0 and op.sigma2_lambda == 0 and math.isclose(op.A, op.A0) and math.isnan(op.R)
    assert torch.all(noise_spectrum(jac @ jac.T, 5) == 0)


def test_healthy_input_does_not_warn():
    jac = _jac(10, 8, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        order_parameters(jac @ jac.T, 3)
        noise_spectrum(jac @ jac.T, 3)


# ----------------------------------------------------------------- leading eigenvalues (Lanczos) against eigvalsh


def _gram_with_spectrum(eig: torch.Tensor, seed: int) -> torch.Tensor:
    """``U diag(eig) Uᵀ`` for a random orthogonal ``U`` (float64)."""
    n = eig.numel()
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * eig) @ q.T


def _spectra(n: int):
    """Many spectra: power laws, low rank, flat, degenerate leading eigenvalues, steps, random."""
    gen = torch.Generator().manual_seed(n)
    r = torch.arange(1, n + 1, dtype=torch.float64)
    out = {f"power{d}": r ** (-d) for d in (0.5, 1.0, 1.5, 2.0, 3.0)}
    out["flat"] = torch.ones(n, dtype=torch.float64)
    for rank in (1, 3, 10, 31):
        e = torch.zeros(n, dtype=torch.float64)
        e[:rank] = 1.0 + torch.rand(rank, generator=gen, dtype=torch.float64)
        out[f"rank{rank}"] = e
    degenerate = 1e-3 * r ** (-1.0)
    degenerate[:6] = 5.0  # six equal leading eigenvalues
    out["degenerate_top"] = degenerate
    step = torch.full((n,), 1e-4, dtype=torch.float64)
    step[:20] = 1.0
    out["step20"] = step
    for s in range(6):
        out[f"random{s}"] = torch.rand(n, generator=gen, dtype=torch.float64) ** (8 + 4 * s)
    return out


def _exact_reference(gram: torch.Tensor, b: int) -> torch.Tensor:
    """The whole spectrum the slow obvious way: eigvalsh of the explicitly centred Gram matrix."""
    n = gram.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    eig = torch.linalg.eigvalsh(h @ gram @ h / n).flip(0)[: n - 1].clamp_min(0)
    return eig * minibatch_variance_factor(n, b)


@pytest.mark.parametrize(("n", "method"), [(40, "lanczos"), pytest.param(512, "lanczos", marks=pytest.mark.slow)])
def test_leading_spectrum_gives_the_exact_effective_dimension(n, method):
    b = 4
    taken = 0
    spectra = _spectra(n)
    if n > 100:  # a probe size near where "auto" uses Lanczos: a few spectra (each exact reference is O(n³))
        spectra = {k: spectra[k] for k in ("power1.0", "power2.0", "rank10", "degenerate_top", "step20", "flat")}
    fractions = (0.5, 0.8, 0.9, 0.99) if n <= 100 else (0.9,)
    for name, eig in spectra.items():
        gram = _gram_with_spectrum(eig, seed=len(name))
        exact = _exact_reference(gram, b)
        total = order_parameters(gram, b, num_minibatches=2).D
        for f in fractions:
            lead = noise_spectrum(gram, b, fraction=f, method=method)
            assert lead.numel() <= n - 1
            taken += lead.numel() < n - 1
            ds = effective_dimension(lead, f, total=total)
            assert ds == effective_dimension(exact, f), (name, f)
            k = min(ds, lead.numel())
            scale = float(exact[0]) if float(exact[0]) > 0 else 1.0
            torch.testing.assert_close(lead[:k], exact[:k], rtol=1e-8, atol=1e-8 * scale, msg=f"{name} f={f}")
        full = noise_spectrum(gram, b)
        assert full.numel() == n - 1
        torch.testing.assert_close(full, exact, rtol=1e-8, atol=1e-10 * float(exact[0] + 1e-300))
    assert taken >= (
        30 if n <= 100 else 4
    )  # the Lanczos path answered most of them (flat and slowly decaying spectra fall back)


def test_effective_dimension_with_a_total():
    lead = torch.tensor([5.0, 3.0])
    assert effective_dimension(lead, 0.5, total=10.0) == 1
    assert effective_dimension(lead, 0.8, total=10.0) == 2
    with pytest.raises(DegenerateInputError, match="less than fraction"):
        effective_dimension(lead, 0.9, total=10.0)
    with pytest.raises(DegenerateInputError, match="total"):
        effective_dimension(lead, 0.5, total=float("nan"))
    # a total equal to the sum up to rounding is the whole spectrum
    assert effective_dimension(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.9, total=4.0 * (1 + 1e-13)) == 4


def test_spectrum_argument_errors():
    g = torch.eye(6, dtype=torch.float64)
    with pytest.raises(DegenerateInputError, match="fraction"):
        noise_spectrum(g, 2, fraction=0.0)
    with pytest.raises(DegenerateInputError, match="method"):
        noise_spectrum(g, 2, fraction=0.9, method="arpack")  # type: ignore[arg-type]


def test_a_sum_too_close_to_the_fraction_is_decided_by_the_exact_path():
    # a centred Gram matrix (its columns orthogonal to 1) with eigenvalues 5, 4 and a tail summing to 1:
    # e_1 + e_2 = 0.9·D exactly, so D_s(0.9) hangs on rounding; the Lanczos path must not decide it
    n = 40
    gen = torch.Generator().manual_seed(0)
    basis = torch.cat(
        [torch.ones(n, 1, dtype=torch.float64), torch.randn(n, n - 1, generator=gen, dtype=torch.float64)], 1
    )
    q = torch.linalg.qr(basis)[0][:, 1:]
    eig = torch.cat(
        [torch.tensor([5.0, 4.0], dtype=torch.float64), torch.full((n - 3,), 1.0 / (n - 3), dtype=torch.float64)]
    )
    gram = (q * eig) @ q.T
    lead = noise_spectrum(gram, 4, fraction=0.9, method="lanczos")
    assert lead.numel() == n - 1  # the whole spectrum
    assert noise_spectrum(gram, 4, fraction=0.8, method="lanczos").numel() < n - 1  # no tie at 0.8: Lanczos


def test_blas_pools_are_bounded_to_torch_threads():
    import numpy  # noqa: F401 - its BLAS pool must be loaded
    from threadpoolctl import threadpool_info

    from lightning_phases.functional._threads import torch_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch_threads():
            inside = [pool["num_threads"] for pool in threadpool_info()]
        outside = [pool["num_threads"] for pool in threadpool_info()]
    finally:
        torch.set_num_threads(before)
    assert inside and all(k == 1 for k in inside)
    assert outside != inside or all(k == 1 for k in outside)  # restored after the block


def test_auto_uses_lanczos_only_from_1024_samples():
    gram = _gram_with_spectrum(torch.arange(1, 41, dtype=torch.float64) ** -3.0, seed=1)
    assert noise_spectrum(gram, 4, fraction=0.9).numel() == 39  # n = 40 < 1024: exact
    assert noise_spectrum(gram, 4, fraction=0.9, method="lanczos").numel() < 39
