"""Replay decision rules on recorded noisy runs (issue 15): choose rules on the tuning half without retraining.

``generalization.py --record DIR`` saves, per cell, the per-sample training
losses after every epoch, the noise mask, the given labels, the clean-test
accuracy curve, the statistics PhaseDetector's tracker was fed and the
weights after every epoch. This script feeds those series to
:class:`~lightning_phases.functional.CleansingTracker` and
:class:`~lightning_phases.functional.PhaseTracker` with candidate settings and
prints, per candidate and cell, what the decision would have been:

* cleansing: ``t_c`` (epoch), the flags' precision / recall / F1 against the
  noise mask, and at ρ = 0 the flagged fraction (a retrain is needed for Q:
  ``generalization.py`` does it for the chosen rule);
* stopping: the recommended epoch, its clean-test accuracy (at the epoch and
  of the phase-II weight average up to it, as PhaseDetector keeps), the
  oracle's best and EarlyStopping's on the noisy validation loss.

The mixture is fitted once per (cell, epoch) and shared by all candidates.

    python benchmarks/replay.py --records DIR --split tuning
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from _common import accuracy  # noqa: E402

from lightning_phases.functional import detection_metrics, fit_loss_mixture, logit_margin  # noqa: E402
from lightning_phases.functional.cleansing import (  # noqa: E402
    CleansingTracker,
    class_wise_flags,
    excess_class_dependence,
)
from lightning_phases.functional.phases import PhaseTracker  # noqa: E402

warnings.filterwarnings("ignore")


def meets_stop_target(acc: float, oracle: float, early_stopping_acc: float) -> bool:
    from generalization import meets_stop_target as m

    return m(acc, oracle, early_stopping_acc)


def half_of(dataset: str, seed: int) -> str:
    from generalization import half_of as h

    return h(dataset, seed)


def load(directory: str, split: str) -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(directory, "*.pt"))):
        rec = torch.load(path)
        dataset, noise, rate, seed = rec["cell"]
        if split != "all" and half_of(dataset, seed) != split:
            continue
        rec["name"] = f"{dataset}:{noise}:{rate:g}:{seed}"
        out.append(rec)
    return out


_FITS: dict[tuple[str, int], tuple] = {}


def fits(rec: dict):
    """(fit, excess class dependence) per epoch, cached."""
    out = []
    for e in range(rec["losses"].shape[0]):
        key = (rec["name"], e)
        if key not in _FITS:
            losses = rec["losses"][e].double()
            fit = fit_loss_mixture(losses, seed=0)
            _FITS[key] = (fit, excess_class_dependence(fit, rec["labels"]))
        out.append(_FITS[key])
    return out


def flags_at(
    rec: dict,
    epoch: int,
    tracker: CleansingTracker | None = None,
    class_wise: bool = True,
    flag_score: str = "auto",
) -> torch.Tensor:
    """GMMCleanser's flags at ``t_c = epoch`` from the recorded series of that epoch: one mixture per given
    class (``class_wise``, the default) of the logit margins (``flag_score="auto"``, where the record has
    them: records from 2026-12-05 on) or of the losses (``"loss"``), or the global fit's flags, capped as
    ``tracker`` (default settings) caps."""
    tracker = tracker or CleansingTracker()
    fit, _ = fits(rec)[epoch]
    losses = rec["losses"][epoch].double()
    cap = tracker.cap_fraction(rec["num_classes"])
    if class_wise:
        scores = margins_at(rec, epoch) if flag_score == "auto" else losses
        return class_wise_flags(scores, rec["labels"], fit, max_fraction=cap)[0]
    return tracker.capped_flags(fit, losses, rec["num_classes"])


_MARGINS: dict[tuple[str, int], torch.Tensor] = {}


def margins_at(rec: dict, epoch: int) -> torch.Tensor:
    """The logit margins ``[n]`` (float64) of the training samples after ``epoch``: recorded (records from
    2026-12-05 on), or computed from the recorded weights of that epoch on the cell's training set, rebuilt
    with ``generalization.make`` (earlier records; the recomputed losses are checked against the recorded)."""
    if "margins" in rec:
        return rec["margins"][epoch].double()
    key = (rec["name"], epoch)
    if key not in _MARGINS:
        from types import SimpleNamespace

        from generalization import make
        from torch.utils.data import DataLoader

        dataset, noise, rate, seed = rec["cell"]
        setting = make(dataset, noise, rate, seed, SimpleNamespace(epochs=None, mnist1d_samples=10000))
        setting.datamodule.setup("fit")
        model = setting.model_fn()
        torch.nn.utils.vector_to_parameters(rec["params"][epoch], model.parameters())
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(x) for x, _ in DataLoader(setting.datamodule.noisy_train, batch_size=1024)])
        losses = torch.nn.functional.cross_entropy(logits, rec["labels"], reduction="none")
        if float((losses - rec["losses"][epoch]).abs().max()) > 1e-4:
            raise SystemExit(f"{rec['name']}: the rebuilt model's losses at epoch {epoch} differ from the record")
        _MARGINS[key] = logit_margin(logits, rec["labels"])
    return _MARGINS[key]


def best_threshold_f1(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """The oracle bound of a loss threshold: the largest F1 of flagging the k highest scores, over every k."""
    hits = truth[torch.argsort(scores, descending=True)].double()
    k = torch.arange(1, hits.numel() + 1, dtype=torch.float64)
    return float((2 * torch.cumsum(hits, 0) / (k + hits.sum())).max())


def best_class_wise_f1(scores: torch.Tensor, truth: torch.Tensor, labels: torch.Tensor) -> float:
    """The oracle bound of any per-class threshold: :func:`best_class_wise_flags`'s F1."""
    return best_class_wise_flags(scores, truth, labels)[0]


def best_class_wise_flags(
    scores: torch.Tensor, truth: torch.Tensor, labels: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """The oracle bound of any per-class threshold: the largest F1 of flagging, in each given class, its
    ``k_c`` highest scores, over every choice of the ``k_c`` together, and those flags (``[n]`` bool).

    F1 = 2·TP / (|S| + P) is a ratio, so it is maximised by Dinkelbach's iteration: for a trial value λ,
    ``2·TP − λ·(|S| + P)`` separates into one best prefix per class (``Σ_top-k (2·t_i − λ)``); λ is then
    set to the F1 of those prefixes, which increases until it is the maximum (exact; checked against
    enumeration of every prefix combination on small cases).
    """
    per_class = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        order = members[torch.argsort(scores[members], descending=True)]
        per_class.append((order, truth[order].double()))
    positives = float(truth.sum())
    lam = 0.0
    flags = torch.zeros(labels.numel(), dtype=torch.bool)
    for _ in range(100):
        tp = size = 0.0
        chosen = torch.zeros(labels.numel(), dtype=torch.bool)
        for order, hits in per_class:
            gain = torch.cumsum(2 * hits - lam, 0)
            j = int(torch.argmax(gain))
            if float(gain[j]) > 0:
                tp += float(hits[: j + 1].sum())
                size += j + 1
                chosen[order[: j + 1]] = True
        new = 2 * tp / (size + positives)
        if abs(new - lam) < 1e-12:
            break
        lam, flags = new, chosen
    return lam, flags


def replay_cleansing(
    rec: dict,
    epochs: list[int] | None = None,
    return_flags: bool = False,
    class_wise: bool = True,
    **tracker_kwargs,
) -> dict:
    tracker = CleansingTracker(**tracker_kwargs)
    all_fits = fits(rec)
    for e in epochs if epochs is not None else range(len(all_fits)):
        fit, dep = all_fits[e]
        tracker.update(fit, rec["losses"][e].double(), dependence=dep, step=e, epoch=e, num_classes=rec["num_classes"])
        if tracker.confirmed:
            break
    n = rec["losses"].shape[1]
    flags = torch.zeros(n, dtype=torch.bool)
    if tracker.confirmed:
        if class_wise:
            flags = flags_at(rec, tracker.t_c_epoch, tracker)
        else:
            flags[tracker.flagged_indices] = True
    truth = rec["truth"]
    res = dict(t_c=tracker.t_c_epoch, flagged=float(flags.float().mean()))
    if return_flags:
        res["flags"] = flags
    if bool(truth.any()):
        det = detection_metrics(flags, truth)
        res.update(precision=det.precision, recall=det.recall, f1=det.f1)
    return res


def subset_record(rec: dict, n: int, seed: int = 0) -> dict:
    """``rec`` with only a fixed random ``n`` of its training samples (``n`` below their number)."""
    total = rec["losses"].shape[1]
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
    return dict(
        rec,
        name=f"{rec['name']}#sub{n}",
        losses=rec["losses"][:, idx],
        truth=rec["truth"][idx],
        labels=rec["labels"][idx],
    )


def replay_phases(rec: dict, **tracker_kwargs) -> dict:
    tracker = PhaseTracker(**tracker_kwargs)
    acc = rec["test_acc"]
    rec_epoch = None
    avg_epochs: list[int] = []
    for item in rec["tracker_inputs"]:
        before = tracker.recommended
        tracker.update(item["stats"], step=item["step"], epoch=item["epoch"])
        if before is None and tracker.model == "four" and tracker.phase_index >= 1 and item["step"] > 0:
            avg_epochs.append(item["epoch"])
        if tracker.recommended is not None:
            rec_epoch = tracker.recommended.epoch
            break
    return dict(
        model=tracker.model,
        epoch=rec_epoch,
        acc=float(acc[rec_epoch]) if rec_epoch is not None else None,
        avg_epochs=avg_epochs,
        timeline=tracker.timeline(),
    )


_EVAL: dict[str, tuple] = {}


def averaged_accuracy(rec: dict, epochs: list[int]) -> float | None:
    """Clean-test accuracy of the average of the recorded weights of ``epochs`` (PhaseDetector's phase-II average)."""
    if not epochs:
        return None
    from generalization import make

    dataset, noise, rate, seed = rec["cell"]
    if rec["name"] not in _EVAL:
        args = argparse.Namespace(epochs=None, mnist1d_samples=10000)
        setting = make(dataset, noise, rate, seed, args)
        setting.datamodule.setup("test")
        _EVAL[rec["name"]] = (setting.model_fn, list(setting.datamodule.test_dataloader()))
    model_fn, batches = _EVAL[rec["name"]]
    model = model_fn()
    torch.nn.utils.vector_to_parameters(rec["params"][epochs].mean(0), model.parameters())
    return accuracy(model, batches)


def early_stopping(rec: dict, patience: int = 10) -> tuple[int, float]:
    """EarlyStopping(patience) on the recorded noisy validation loss: (best epoch, its test accuracy)."""
    vl = rec["val_loss"]
    best, best_e, wait = math.inf, 0, 0
    for e in sorted(vl):
        if vl[e] < best:
            best, best_e, wait = vl[e], e, 0
        else:
            wait += 1
            if wait >= patience:
                break
    return best_e, float(rec["test_acc"][best_e])


def summarize(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows if r.get(key) is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]
    return f"{sum(vals) / len(vals):.3f}" if vals else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", required=True)
    parser.add_argument("--split", default="tuning", choices=("tuning", "heldout", "all"))
    parser.add_argument("--what", default="both", choices=("phases", "cleansing", "both"))
    parser.add_argument("--average", action="store_true", help="evaluate the phase-II weight average (slower)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--every", type=int, default=1, help="cleansing: fit every k-th epoch (a sparse schedule)")
    parser.add_argument(
        "--subset",
        type=int,
        default=None,
        help="cleansing: only the records with more samples, each on a fixed random subset of this many",
    )
    parser.add_argument(
        "--at-runs",
        default=None,
        help="generalization.py --out file of these recorded runs: detection at their t_c (global vs class-wise) "
        "and the oracle bounds of a loss threshold",
    )
    parser.add_argument("--cleanlab", default=None, help="with --at-runs: --out file whose cells carry cleanlab's F1")
    parser.add_argument(
        "--compare",
        default=None,
        help="generalization.py --out file of the same runs: GMMCleanser at its budget there vs every epoch here",
    )
    parser.add_argument(
        "--flag-candidates",
        default=None,
        help="generalization.py --out file of these recorded runs: other flag rules at their t_c vs the shipped one",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    recs = load(args.records, args.split)
    print(f"{len(recs)} records")
    if args.compare:
        compare_schedules(recs, args.compare)
        return
    if args.flag_candidates:
        flag_candidates(recs, args.flag_candidates)
        return
    if args.at_runs:
        flags_at_runs(recs, args.at_runs, args.cleanlab)
        return
    if args.what in ("phases", "both"):
        for name, kw in PHASE_VARIANTS.items():
            rows = []
            for rec in recs:
                r = replay_phases(rec, **kw)
                es_epoch, es_acc = early_stopping(rec)
                oracle = float(rec["test_acc"].max())
                avg = averaged_accuracy(rec, r["avg_epochs"]) if args.average else None
                kept = avg if avg is not None else (r["acc"] if r["acc"] is not None else float(rec["test_acc"][-1]))
                met = meets_stop_target(kept, oracle, es_acc)
                rows.append(dict(name=rec["name"], gap=oracle - kept, es_gap=es_acc - kept, epoch=r["epoch"], met=met))
                if args.verbose:
                    print(
                        f"  {name:<14s} {rec['name']:<28s} stop {r['epoch']} kept {100 * kept:5.1f} oracle {100 * oracle:5.1f} "
                        f"ES {100 * es_acc:5.1f}({es_epoch}) model {r['model']} {r['timeline']}"
                    )
            rows = [r for r in rows if ":0:" not in r["name"]]  # rho = 0: no stop to judge
            ok = sum(1 for r in rows if r["met"])
            mean_gap = sum(r["gap"] for r in rows) / len(rows)
            print(
                f"phases {name:<14s} met {ok}/{len(rows)}  mean(oracle-kept) {100 * mean_gap:5.2f}  "
                f"mean(ES-kept) {100 * sum(r['es_gap'] for r in rows) / len(rows):5.2f}  none {sum(r['epoch'] is None for r in rows)}"
            )
    if args.what in ("cleansing", "both"):
        cleansing_recs = recs
        if args.subset:  # only the records with more samples, each on a fixed random subset
            cleansing_recs = [subset_record(rec, args.subset) for rec in recs if rec["losses"].shape[1] > args.subset]
        for name, kw in CLEANSING_VARIANTS.items():
            rows = []
            for rec in cleansing_recs:
                r = replay_cleansing(rec, epochs=list(range(0, rec["losses"].shape[0], args.every)), **kw)
                r["name"] = rec["name"]
                r["rho"] = rec["cell"][2]
                rows.append(r)
                if args.verbose:
                    print(f"  {name:<14s} {rec['name']:<28s} {r}")
            noisy = [r for r in rows if r["rho"] > 0]
            clean = [r for r in rows if r["rho"] == 0]
            print(
                f"cleansing {name:<14s} fired {sum(r['t_c'] is not None for r in noisy)}/{len(noisy)}  "
                f"mean F1 {sum(r.get('f1', 0.0) for r in noisy) / max(1, len(noisy)):.3f}  "
                f"rho=0 max flagged {max((r['flagged'] for r in clean), default=0):.3f}"
            )


def _read_runs(path: str) -> dict[str, dict]:
    """``generalization.py --out`` lines by cell name (``dataset:noise:rho:seed``)."""
    import json

    runs = {}
    with open(path) as fh:
        for line in fh:
            r = json.loads(line)
            runs[f"{r['dataset']}:{r['noise']}:{r['rho']:g}:{r['seed']}"] = r
    return runs


def flags_at_runs(recs: list[dict], path: str, cleanlab_path: str | None = None) -> None:
    """Detection at the t_c of real runs (``generalization.py --record --out FILE``): the global threshold
    and one mixture per class on the recorded losses of that epoch, the oracle bounds of a loss threshold
    (at that epoch; at any epoch) and of per-class thresholds on the logit margin (the shipped score; at
    that epoch; at any epoch), and cleanlab's F1 (``--cleanlab FILE``: ``--out`` lines with ``cleanlab``)."""
    runs = _read_runs(path)
    cleanlab = _read_runs(cleanlab_path) if cleanlab_path else {}
    print(
        f"{'cell':<30s} t_c | run F1 global class-wise(loss) (margin) | oracle loss at t_c, anywhere | "
        "oracle class-wise margin at t_c, anywhere | cleanlab"
    )
    groups: dict[tuple, list[tuple]] = {}
    rho0 = []
    for rec in recs:
        run = runs.get(rec["name"])
        if run is None:
            continue
        t_c, truth, labels = run["t_c_epoch"], rec["truth"], rec["labels"]
        dataset, noise, rate, _ = rec["cell"]
        if rate == 0:
            rho0.append(0.0 if t_c is None else float(flags_at(rec, t_c).float().mean()))
            continue
        epochs = range(rec["losses"].shape[0])
        anywhere = max(best_threshold_f1(rec["losses"][e].double(), truth) for e in epochs)
        margin_anywhere = max(best_class_wise_f1(margins_at(rec, e), truth, labels) for e in epochs)
        if t_c is None:
            row = (0.0, 0.0, 0.0, 0.0, math.nan, anywhere, math.nan, margin_anywhere)
        else:
            row = (
                (run["gmm"] or {}).get("f1", 0.0),
                detection_metrics(flags_at(rec, t_c, class_wise=False), truth).f1,
                detection_metrics(flags_at(rec, t_c, flag_score="loss"), truth).f1,
                detection_metrics(flags_at(rec, t_c), truth).f1,
                best_threshold_f1(rec["losses"][t_c].double(), truth),
                anywhere,
                best_class_wise_f1(margins_at(rec, t_c), truth, labels),
                margin_anywhere,
            )
        cl = (cleanlab.get(rec["name"]) or {}).get("cleanlab") or {}
        row = (*row, cl.get("f1", math.nan))
        groups.setdefault((dataset, noise, rate), []).append(row)
        print(
            f"{rec['name']:<30s} {str(t_c):>3s} | {row[0]:.3f} {row[1]:.3f} {row[2]:.3f} {row[3]:.3f} | "
            f"{row[4]:.3f} {row[5]:.3f} | {row[6]:.3f} {row[7]:.3f} | {row[8]:.3f}"
        )
    print(
        "\nmean over seeds at rho 0.2 / 0.4: global, class-wise (loss), class-wise (margin) | oracle loss "
        "threshold at t_c, at any epoch | oracle class-wise margin thresholds at t_c, at any epoch | cleanlab"
    )
    wins = [0, 0, 0]
    means = [0.0, 0.0, 0.0]
    bounds: list[list[float]] = [[], []]
    counted = 0
    for key, rows in sorted(groups.items()):
        if key[2] not in (0.2, 0.4):
            continue
        m = [_nanmean([r[i] for r in rows]) for i in range(9)]
        counted += 1
        for i in range(3):
            wins[i] += m[1 + i] >= m[8]
            means[i] += m[1 + i]
        bounds[0].append(m[6])
        bounds[1].append(m[7])
        print(
            f"   {key[0]:<12s} {key[1]:<9s} {key[2]:.1f}  {m[1]:.3f} {m[2]:.3f} {m[3]:.3f} | {m[4]:.3f} {m[5]:.3f} | "
            f"{m[6]:.3f} {m[7]:.3f} | {m[8]:.3f}  {'ok' if m[3] >= m[8] else 'behind'}"
            f"{'' if m[7] >= m[8] else ' (no class-wise margin threshold of any epoch reaches it)'}"
        )
    if counted:
        print(
            f"mean F1: global {means[0] / counted:.3f}, class-wise (loss) {means[1] / counted:.3f}, "
            f"class-wise (margin) {means[2] / counted:.3f}; oracle class-wise margin thresholds "
            f"{_nanmean(bounds[0]):.3f} at t_c, {_nanmean(bounds[1]):.3f} at any epoch"
        )
    print(
        f"at least cleanlab's: global {wins[0]}/{counted}, class-wise (loss) {wins[1]}/{counted}, "
        f"class-wise (margin) {wins[2]}/{counted}"
    )
    if rho0:
        print(f"rho = 0: max flagged (class-wise, at the runs' t_c) {max(rho0):.3f} over {len(rho0)} cells")


def _nanmean(values: list[float]) -> float:
    """The mean of the values that are not NaN (NaN when none is): ``generalization._mean``."""
    from generalization import _mean

    return _mean(values)


def _class_fits(scores: torch.Tensor, labels: torch.Tensor) -> dict[int, tuple[torch.Tensor, object]]:
    """One two-component mixture per given class of ``scores`` (classes of at least 20 samples, fitted)."""
    out = {}
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        if members.numel() < 20:
            continue
        fit = fit_loss_mixture(scores[members], seed=0)
        if math.isfinite(fit.mean_clean):
            out[c] = (members, fit)
    return out


def _separation(fits_by_class: dict) -> tuple[float, float]:
    """Sample-weighted mean Ashman's D and BIC gain per sample of per-class mixtures (both scale-free)."""
    n = d = bic = 0.0
    for members, fit in fits_by_class.values():
        k = members.numel()
        spread = math.sqrt((fit.std_clean**2 + fit.std_noisy**2) / 2) or math.inf
        d += k * abs(fit.mean_noisy - fit.mean_clean) / spread
        bic += fit.bic_gain
        n += k
    return d / max(n, 1.0), bic / max(n, 1.0)


def _cap(flags: torch.Tensor, scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """``flags`` with at most ``floor(fraction · n)`` set: the flagged samples of the highest ``scores``."""
    cap = int(math.floor(fraction * flags.numel()))
    if int(flags.sum()) <= cap:
        return flags
    kept = torch.zeros_like(flags)
    kept[torch.argsort(torch.where(flags, scores, -math.inf), descending=True)[:cap]] = True
    return kept


def _f1_optimal_cut(posterior: torch.Tensor) -> torch.Tensor:
    """Flags ``p_i > F1*/2``: the threshold that maximises the plug-in expected F1 of the posteriors
    (Lipton et al. 2014: the F1-optimal threshold of calibrated probabilities is half the optimal F1)."""
    lam = 0.0
    for _ in range(100):
        sel = posterior > lam / 2
        new = float(2 * posterior[sel].sum() / (sel.sum() + posterior.sum()))
        if abs(new - lam) < 1e-12:
            break
        lam = new
    return posterior > lam / 2


def flag_candidates(recs: list[dict], path: str) -> None:
    """Other flag rules at the t_c of real runs (``generalization.py --record --out FILE``), against the
    shipped one (one mixture per given class of the logit margin, flags at equal weighted densities):

    * ``choose-D`` / ``choose-BIC``: per run, the margin or the loss, whichever score's per-class mixtures
      are better separated (mean Ashman's D; BIC gain per sample);
    * ``F1*/2``: the shipped per-class posteriors, flagged above half the plug-in optimal F1;
    * ``count``: per class, the ``round(r_c · n_c)`` highest margins (the mixture's own estimate of how
      many are mislabeled, as cleanlab's ``prune_by_noise_rate`` removes its estimated count).

    All are capped as the shipped rule is. Mean F1 per group at ρ = 0.2 and 0.4 (0 where no t_c)."""
    runs = _read_runs(path)
    names = ("shipped", "choose-D", "choose-BIC", "F1*/2", "count")
    groups: dict[tuple, list[list[float]]] = {}
    for rec in recs:
        run = runs.get(rec["name"])
        dataset, noise, rate, _ = rec["cell"]
        if run is None or rate not in (0.2, 0.4):
            continue
        t_c, truth, labels = run["t_c_epoch"], rec["truth"], rec["labels"]
        if t_c is None:
            groups.setdefault((dataset, noise, rate), []).append([0.0] * len(names))
            continue
        tracker = CleansingTracker()
        cap = tracker.cap_fraction(rec["num_classes"])
        fit, _ = fits(rec)[t_c]
        margins, losses = margins_at(rec, t_c), rec["losses"][t_c].double()
        shipped, posterior = class_wise_flags(margins, labels, fit, max_fraction=cap)
        by_loss = flags_at(rec, t_c, tracker, flag_score="loss")
        margin_fits = _class_fits(margins, labels)
        sep_margin, sep_loss = _separation(margin_fits), _separation(_class_fits(losses, labels))
        count = shipped.clone()
        for members, class_fit in margin_fits.values():
            count[members] = False
            keep = int(round(class_fit.weight_noisy * members.numel()))
            count[members[torch.argsort(margins[members], descending=True)[:keep]]] = True
        flags = [
            shipped,
            shipped if sep_margin[0] >= sep_loss[0] else by_loss,
            shipped if sep_margin[1] >= sep_loss[1] else by_loss,
            _cap(_f1_optimal_cut(posterior), posterior, cap),
            _cap(count, margins, cap),
        ]
        groups.setdefault((dataset, noise, rate), []).append([detection_metrics(f, truth).f1 for f in flags])
    print(f"{'group':<32s} " + " ".join(f"{n:>10s}" for n in names))
    totals = [0.0] * len(names)
    for key, rows in sorted(groups.items()):
        m = [sum(r[i] for r in rows) / len(rows) for i in range(len(names))]
        totals = [a + b for a, b in zip(totals, m)]
        print(f"   {key[0]:<12s} {key[1]:<9s} {key[2]:.1f}    " + " ".join(f"{v:10.3f}" for v in m))
    if groups:
        print(f"{'mean F1':<32s} " + " ".join(f"{t / len(groups):10.3f}" for t in totals))


def compare_schedules(recs: list[dict], path: str) -> None:
    """GMMCleanser's decision under its default budget (the recorded run) against every epoch (this replay)."""
    runs = _read_runs(path)
    print(f"{'cell':<28s} | budget t_c  F1   | every epoch t_c  F1")
    pairs = []
    for rec in recs:
        run = runs.get(rec["name"])
        if run is None or rec["cell"][2] == 0:
            continue
        every = replay_cleansing(rec)
        budget_f1 = (run["gmm"] or {}).get("f1", 0.0)
        pairs.append((budget_f1, every.get("f1", 0.0), run["t_c_epoch"] is not None, every["t_c"] is not None))
        print(
            f"{rec['name']:<28s} | {str(run['t_c_epoch']):>10s} {budget_f1:.3f} | {str(every['t_c']):>15s} {every.get('f1', 0.0):.3f}"
        )
    n = len(pairs)
    if n:
        print(
            f"{n} cells: mean F1 budget {sum(p[0] for p in pairs) / n:.3f}, every epoch {sum(p[1] for p in pairs) / n:.3f}; "
            f"t_c found {sum(p[2] for p in pairs)} / {sum(p[3] for p in pairs)}"
        )


PHASE_VARIANTS: dict[str, dict] = {
    "default": {},
    **{f"drop{d}": {"memorisation_drop": d} for d in (0.01, 0.05, 0.1, 0.2)},
    **{f"pat{p}": {"patience": p} for p in (3, 4)},
    **{f"sm{a}": {"smoothing": a} for a in (0.3,)},
    "drop0.1pat3": {"memorisation_drop": 0.1, "patience": 3},
    "drop0.05pat3": {"memorisation_drop": 0.05, "patience": 3},
}
CLEANSING_VARIANTS: dict[str, dict] = {
    "old": {"max_fraction": 0.5, "heavy_noise_separation": None},  # the defaults before issue 15's tuning
    "cap(C-1)/C": {"heavy_noise_separation": None},
    **{f"cap+heavy{h}": {"heavy_noise_separation": h} for h in (1.0, 1.4)},
    "default": {},  # the shipped defaults (flags at t_c from one mixture per class)
    "global": {"class_wise": False},  # the global threshold l_c at t_c (before class_wise)
    **{f"cd{c}": {"max_class_dependence": c, "class_wise": False} for c in (0.2, 0.15, 0.05)},  # README table
    "heavy1.2w0.2": {"heavy_noise_weight": 0.2},
    **{f"cap+sep{h}": {"heavy_noise_separation": None, "min_separation": h} for h in (1.6, 1.8)},
    "cap+cd0.1": {"heavy_noise_separation": None, "max_class_dependence": 0.1},
}


if __name__ == "__main__":
    main()
