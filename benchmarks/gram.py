"""Gram matrix + statistics: lightning_phases vs vmap, a Python loop, Opacus and BackPACK.

For an MLP (784-256-256-10), a small CIFAR-sized CNN (3x32x32 -> conv 16 ->
pool -> conv 32 -> pool -> linear 10), torchvision's ``resnet18``
(num_classes=10, 3x32x32, eval mode) and a small Transformer encoder (2
pre-norm blocks of width 64, 4 heads, 16 positions of 32 features), and probe sets of n samples, every
method computes the n x n per-sample-gradient Gram matrix G and then the same
statistics (``order_parameters``, ``noise_spectrum``, ``effective_dimension``).
Times are reported relative to the floor: one plain batched forward + backward
over the same n samples (sum-reduced cross-entropy).

Methods:
  floor     plain batched forward + backward (no per-sample information)
  auto      ``gradient_gram(method="auto")`` (per-layer fast path, the default)
  vmap      ``gradient_gram(method="vmap")`` (torch.func over every parameter)
  loop      one backward per sample in a Python loop, then G = J Jᵀ
  opacus    Opacus ``GradSampleModule`` per-sample gradients, then G = J Jᵀ
  backpack  BackPACK ``BatchGrad`` per-sample gradients, then G = J Jᵀ

Every configuration runs in a fresh subprocess; peak memory is that process's
``ru_maxrss`` (resident set high-water mark, which does see torch's CPU
allocations, unlike ``tracemalloc``) minus its resident set just before the
measured work (after imports, model and data): the extra memory the method
needed at its peak. Times are the best of ``--repeats`` runs after one warm-up
(slow configurations run once, without warm-up). A configuration whose time,
extrapolated linearly in n from the next smaller n (a lower bound: the
Gram product grows as n²), exceeds ``--budget`` seconds (default 20) is
skipped and marked so; estimated over 1 s, it runs once without warm-up.

Run:  python benchmarks/gram.py [--threads 1] [--sizes 256 1024 4096] [--budget 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

MODELS = ("mlp", "cnn", "resnet18", "transformer")
METHODS = ("floor", "auto", "vmap", "loop", "opacus", "backpack")
BATCH = 32  # minibatch size B of the statistics


def _transformer():
    """A small pre-norm Transformer encoder (2 blocks, width 64, 4 heads) on [16 positions, 32 features]."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, width: int = 64, heads: int = 4) -> None:
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
            self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

        def forward(self, x):
            n, t, w = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) / (w // self.heads) ** 0.5, dim=-1)
            x = x + self.proj((att @ v).transpose(1, 2).reshape(n, t, w))
            return x + self.mlp(self.norm2(x))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(32, 64)
            self.blocks = nn.Sequential(Block(), Block())
            self.norm = nn.LayerNorm(64)
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            return self.head(self.norm(self.blocks(self.embed(x))).mean(1))

    return Encoder()


def _build(model_name: str, n: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if model_name == "resnet18":
        import torchvision

        # eval mode (running statistics): per-sample gradients of BatchNorm in training mode are not defined
        return torchvision.models.resnet18(num_classes=10), torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))
    if model_name == "transformer":
        return _transformer(), torch.randn(n, 16, 32), torch.randint(0, 10, (n,))
    if model_name == "mlp":
        model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        x = torch.randn(n, 784)
    else:
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, 10),
        )
        x = torch.randn(n, 3, 32, 32)
    y = torch.randint(0, 10, (n,))
    return model, x, y


def _gram_from_jac(jac):

    from lightning_phases.functional.per_sample import _symmetric

    return _symmetric(jac @ jac.T)


def _per_sample_loop(model, x, y):
    import torch
    import torch.nn.functional as F

    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _opacus_jac(gsm, x, y):
    import torch
    import torch.nn.functional as F

    gsm.zero_grad(set_to_none=True)
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    jac = torch.cat([p.grad_sample.reshape(x.shape[0], -1) for p in gsm.parameters() if p.requires_grad], 1)
    for p in gsm.parameters():
        p.grad_sample = None
        p.grad = None
    return jac


def _backpack_jac(model, lossfunc, x, y):
    import torch
    from backpack import backpack
    from backpack.extensions import BatchGrad

    model.zero_grad(set_to_none=True)
    with backpack(BatchGrad()):
        lossfunc(model(x), y).backward()
    jac = torch.cat([p.grad_batch.reshape(x.shape[0], -1) for p in model.parameters() if p.requires_grad], 1)
    for p in model.parameters():
        p.grad_batch = None
        p.grad = None
    return jac


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(model_name: str, n: int, method: str, repeats: int, warmup: bool) -> dict:
    """One configuration, in this (fresh) process."""
    import warnings

    import torch
    import torch.nn.functional as F

    warnings.simplefilter("ignore")
    from lightning_phases.functional import gradient_gram
    from lightning_phases.functional.ensemble import effective_dimension, noise_spectrum, order_parameters

    model, x, y = _build(model_name, n)
    model.eval()

    if method == "floor":

        def gram():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y, reduction="sum").backward()
            return None
    elif method in ("auto", "vmap"):

        def gram():
            return gradient_gram(model, x, y, method=method)[0]
    elif method == "loop":

        def gram():
            return _gram_from_jac(_per_sample_loop(model, x, y))
    elif method == "opacus":
        from opacus import GradSampleModule

        model.train()  # Opacus records activations only in training mode (no dropout/BatchNorm here)
        gsm = GradSampleModule(model, loss_reduction="sum")

        def gram():
            return _gram_from_jac(_opacus_jac(gsm, x, y))
    elif method == "backpack":
        from backpack import extend

        model = extend(model)
        lossfunc = extend(torch.nn.CrossEntropyLoss(reduction="sum"))

        def gram():
            return _gram_from_jac(_backpack_jac(model, lossfunc, x, y))
    else:
        raise ValueError(method)

    def stats(g):
        order_parameters(g, BATCH)
        effective_dimension(noise_spectrum(g, BATCH))

    if warmup:
        g = gram()
        if g is not None:
            stats(g)
        del g
    base = _rss_mb()
    t_gram, t_total = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        g = gram()
        mid = time.perf_counter()
        if g is not None:
            stats(g)
        end = time.perf_counter()
        t_gram.append(mid - start)
        t_total.append(end - start)
        del g
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"gram_s": min(t_gram), "total_s": min(t_total), "peak_extra_mb": max(0.0, peak - base), "peak_mb": peak}


def spectrum_rows(sizes, repeats: int) -> list[str]:
    """The noise spectrum + D_s of one measurement: the whole spectrum (before) against the leading one (after).

    Real Gram matrices: the digits demo's MLP (64-128-128-10) on scikit-learn's digits, at initialisation
    and after 3 epochs of SGD (lr 0.05, batch 32), with B = 32 and f = 0.9.
    """
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    from lightning_phases.functional import gradient_gram
    from lightning_phases.functional.ensemble import effective_dimension, noise_spectrum, order_parameters

    digits = load_digits()
    x_all = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y_all = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    grams = {}
    for label, epochs in (("init", 0), ("3 epochs", 3)):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(epochs):
            for idx in torch.randperm(len(y_all)).split(32):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
                opt.step()
        for n in sizes:
            grams[(label, n)] = gradient_gram(model, x_all[:n], y_all[:n])[0]
    rows = [f"{'state':9s} {'n':>5s} {'D_s':>5s} {'whole ms':>9s} {'leading ms':>11s} {'speed-up':>9s} {'k':>5s}"]
    for (label, n), g in grams.items():
        times = {}
        for mode in ("whole", "leading"):
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                if mode == "whole":
                    ds = effective_dimension(noise_spectrum(g, BATCH), 0.9)
                    k = n - 1
                else:
                    total = order_parameters(g, BATCH, num_minibatches=2).D
                    lead = noise_spectrum(g, BATCH, fraction=0.9)
                    ds_lead = effective_dimension(lead, 0.9, total=total)
                    k = lead.numel()
                best = min(best, time.perf_counter() - start)
            times[mode] = (best, k)
        assert ds == ds_lead, (label, n, ds, ds_lead)
        (tw, _), (tl, k) = times["whole"], times["leading"]
        rows.append(f"{label:9s} {n:5d} {ds:5d} {1e3 * tw:9.1f} {1e3 * tl:11.1f} {tw / tl:8.1f}x {k:5d}")
    return rows


def _run_worker(args, model_name, n, method, repeats, warmup) -> dict | None:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.path.dirname(here) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        model_name,
        str(n),
        method,
        "--threads",
        str(args.threads),
        "--repeats",
        str(repeats),
    ] + (["--warmup"] if warmup else [])
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out (>{args.timeout} s)"}
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail[:80]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _machine() -> str:
    import torch

    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads by default; benchmark run with {{threads}} thread(s); "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "N", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help="torch/BLAS threads per run (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per fast configuration (best is kept)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budget", type=float, default=20.0, help="skip a run estimated to take longer (s)")
    parser.add_argument("--timeout", type=float, default=600.0, help="kill a run after this long (s)")
    parser.add_argument(
        "--spectrum-sizes",
        type=int,
        nargs="*",
        default=[512, 1024],
        help="probe sizes of the spectrum section (whole vs leading eigenvalues; none: skip it)",
    )
    args = parser.parse_args(argv)

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        model_name, n, method = args.worker
        print(json.dumps(worker(model_name, int(n), method, args.repeats, args.warmup)))
        return

    print(_machine().format(threads=args.threads))
    if args.spectrum_sizes:
        import torch

        torch.set_num_threads(args.threads)
        print("## spectrum: noise_spectrum + effective_dimension(0.9) per measurement (best of --repeats)")
        print("whole = every eigenvalue (float64 eigvalsh); leading = noise_spectrum(fraction=0.9) (Lanczos,")
        print("exact fallback) + order_parameters' D as the total; D_s is checked equal; k = eigenvalues returned")
        print("\n".join(spectrum_rows(args.spectrum_sizes, args.repeats)) + "\n")
        if args.sizes == [0]:
            return
    print("ratio = time / floor time (plain batched forward + backward over the same n samples);")
    print("'gram' = G only, 'total' = G + order_parameters + noise_spectrum + effective_dimension;")
    print("peak = extra resident memory at the peak over the process after setup (ru_maxrss).\n")
    results: dict = {}
    for model_name in args.models:
        header = f"{'method':9s} {'n':>5s} {'gram s':>9s} {'total s':>9s} {'gram/floor':>11s} {'total/floor':>12s} {'peak MiB':>9s}"
        print(f"## {model_name}\n{header}\n{'-' * len(header)}")
        for n in sorted(args.sizes):
            for method in args.methods:
                done = [results[(model_name, m, method)] for m in sorted(args.sizes) if m < n]
                skipped_before = any("skipped" in r for r in done)
                timed = [
                    (m, r["total_s"]) for m, r in zip(sorted(m for m in args.sizes if m < n), done) if "total_s" in r
                ]
                estimate = timed[-1][1] * n / timed[-1][0] if timed else None  # linear in n: a lower bound
                if skipped_before or (estimate is not None and estimate > args.budget):
                    est = (
                        "a smaller n was skipped"
                        if skipped_before
                        else f">{args.budget:.0f} s estimated: {estimate:.0f} s"
                    )
                    res = {"skipped": f"skipped ({est})"}
                else:
                    slow = estimate is not None and estimate > 1
                    res = _run_worker(args, model_name, n, method, 1 if slow else args.repeats, warmup=not slow)
                results[(model_name, n, method)] = res
                floor = results.get((model_name, n, "floor"), {}).get("gram_s")
                if "skipped" in res or "error" in res:
                    print(f"{method:9s} {n:5d}  {res.get('skipped') or 'error: ' + res['error']}")
                    continue
                rg = f"{res['gram_s'] / floor:10.1f}x" if floor else "-"
                rt = f"{res['total_s'] / floor:11.1f}x" if floor and method != "floor" else "-"
                print(
                    f"{method:9s} {n:5d} {res['gram_s']:9.3f} {res['total_s']:9.3f} {rg:>11s} {rt:>12s} {res['peak_extra_mb']:9.0f}"
                )
                sys.stdout.flush()
        print()


if __name__ == "__main__":
    main()
