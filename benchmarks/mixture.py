"""The loss-mixture fit: ``fit_loss_mixture`` (numpy EM) next to scikit-learn's ``GaussianMixture``.

Side by side in one run, on the same bimodal losses (80 % clean near 0.3, 20 % mislabeled near 2.5):
the warm fit time at several sizes, and the cold cost in a fresh interpreter (the import of the fitting
code and its first fit, after lightning_phases is imported), with the ratios. scikit-learn is fitted with the
settings ``fit_loss_mixture`` uses (two components, ``reg_covar=5e-4``, ``tol=1e-3``, one k-means start)
on the same normalised losses; it is an optional dependency of this script only.

    OMP_NUM_THREADS=1 python benchmarks/mixture.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from lightning_phases.functional import fit_loss_mixture

_COLD = {  # timed after ``lightning_phases.functional`` is imported (a callback has imported it)
    "numpy EM": "f(x)",
    "scikit-learn": (
        "from sklearn.mixture import GaussianMixture as G\n"
        "G(2, reg_covar=5e-4, tol=1e-3, random_state=0).fit(((x - x.min()) / (x.max() - x.min())).numpy()[:, None])"
    ),
}


def losses(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = n // 5
    clean = (0.3 + 0.1 * torch.randn(n - k, generator=gen, dtype=torch.float64)).abs()
    return torch.cat([clean, 2.5 + 0.3 * torch.randn(k, generator=gen, dtype=torch.float64)])


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cold(code: str, n: int) -> float:
    """Seconds of ``code`` (what is imported and the first fit) in a fresh interpreter, our package imported."""
    script = (
        "import time, torch\n"
        f"gen = torch.Generator().manual_seed(0); x = torch.rand({n}, generator=gen, dtype=torch.float64)\n"
        "x[: len(x) // 5] += 2\n"
        "from lightning_phases.functional import fit_loss_mixture as f\n"
        "t0 = time.perf_counter()\n" + code + "\nprint(time.perf_counter() - t0)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1437, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from sklearn.mixture import GaussianMixture

    print("## warm fit, best of", args.repeats)
    print(f"{'n':>6}  {'numpy EM ms':>11}  {'scikit-learn ms':>15}  {'ratio':>6}")
    for n in args.sizes:
        x = losses(n)
        z = ((x - x.min()) / (x.max() - x.min())).numpy()[:, None]
        ours = best_of(lambda x=x: fit_loss_mixture(x), args.repeats)
        theirs = best_of(lambda z=z: GaussianMixture(2, reg_covar=5e-4, tol=1e-3, random_state=0).fit(z), args.repeats)
        print(f"{n:>6}  {1e3 * ours:>11.1f}  {1e3 * theirs:>15.1f}  {theirs / ours:>5.1f}x")
    print("## cold: import and first fit in a fresh interpreter (n = 1437), best of 3")
    seconds = {name: min(cold(code, 1437) for _ in range(3)) for name, code in _COLD.items()}
    for name, s in seconds.items():
        print(f"{name:>12}  {s:.3f} s")
    print(f"ratio {seconds['scikit-learn'] / seconds['numpy EM']:.1f}x")


if __name__ == "__main__":
    main()
