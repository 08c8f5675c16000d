"""`lightning_phases.functional` must work where Lightning is not installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"lightning", "pytorch_lightning", "lightning_fabric"}:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, _Block())
    import torch
    import lightning_phases
    import lightning_phases.functional as F

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    gram, losses = F.gradient_gram(model, x, y)
    op = F.order_parameters(gram, 4)
    mix = F.fit_loss_mixture(losses)
    F.detection_metrics(mix.posterior.nan_to_num(0.0), torch.arange(10) < 3)
    F.flip_labels(y, 0.5, 3, generator=torch.Generator().manual_seed(0))
    F.neuron_statistics(torch.randn(5, 4), torch.ones(4), torch.randn(5))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {"lightning", "pytorch_lightning", "lightning_fabric"})
    assert not loaded, loaded
    print("OK", round(op.A, 6))
    """
)


def test_functional_imports_and_runs_without_lightning():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("OK")


def test_blocking_works():
    """The blocker itself must make a Lightning import fail, or the test above proves nothing."""
    probe = (
        SCRIPT.split("import torch")[0]
        + "\ntry:\n    import pytorch_lightning\nexcept ModuleNotFoundError:\n    print('BLOCKED')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "BLOCKED", result.stderr[-2000:]
