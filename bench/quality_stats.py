"""The quality benchmark's statistics: learning-rate selection on validation, seed statistics, verdicts, tables, curves.

Selection (docs/DESIGN.md §12): each method's learning rate is the grid value with the lowest
VALIDATION loss on the selection seed; the held-out pairs never enter the choice. The grid is
log-spaced (``lr_k = 10^(k / per_decade)``, integer ``k``) and :func:`next_grid_point` extends it by
one point while the best value sits at an edge (within ``[LR_MIN, LR_MAX]``).

Verdict of a method against the reference (fisherlora's default), from the per-seed paired
differences ``d_s = loss_method(s) − loss_ref(s)`` of held-out loss at each one's chosen lr:
``better`` when the mean ``d̄ < 0`` and a two-sided paired t-test rejects ``d̄ = 0`` at 5 %
(``|d̄| > t_{0.975, n−1} · sd(d) / √n``), ``worse`` when ``d̄ > 0`` likewise, otherwise
``within noise``; fewer than 2 paired seeds give ``n/a``.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

LR_MIN, LR_MAX = 1e-6, 1e-1
#: two-sided 97.5 % Student-t quantiles by degrees of freedom (1..10); 1.96 beyond
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def lr_of(k: int, per_decade: int) -> float:
    """The grid's ``k``-th learning rate, ``10^(k / per_decade)``, rounded to 3 significant digits."""
    return float(f"{10 ** (k / per_decade):.3g}")


def grid_index(lr: float, per_decade: int) -> int:
    return round(math.log10(lr) * per_decade)


def pick(sweep: dict[float, float | None]) -> float | None:
    """The learning rate with the lowest finite validation loss (None when none is finite)."""
    finite = {lr: v for lr, v in sweep.items() if v is not None and math.isfinite(v)}
    return min(finite, key=finite.get) if finite else None


def next_grid_point(sweep: dict[float, float | None], per_decade: int) -> float | None:
    """The learning rate to add while the best sits at an edge of the swept grid, else None.

    A best at the top edge adds the next larger point, at the bottom the next smaller one;
    nothing is added outside ``[LR_MIN, LR_MAX]``. A grid where nothing is finite extends
    downwards (every lr diverged)."""
    lrs = sorted(sweep)
    best = pick(sweep)
    if best is None:
        cand = lr_of(grid_index(lrs[0], per_decade) - 1, per_decade)
    elif best == lrs[-1]:
        cand = lr_of(grid_index(best, per_decade) + 1, per_decade)
    elif best == lrs[0]:
        cand = lr_of(grid_index(best, per_decade) - 1, per_decade)
    else:
        return None
    return cand if LR_MIN <= cand <= LR_MAX and cand not in sweep else None


def mean_std(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def verdict(diffs: list[float]) -> str:
    """``better`` / ``worse`` / ``within noise`` / ``n/a`` from paired differences (module docstring)."""
    n = len(diffs)
    if n < 2:
        return "n/a"
    dm, sd = mean_std(diffs)
    half = _T975.get(n - 1, 1.96) * sd / math.sqrt(n)
    if abs(dm) > half:
        return "better" if dm < 0 else "worse"
    return "within noise"


def em_floor(n: int) -> float:
    """Exact match is reported as a number only above 5 correct answers of ``n`` (below that a
    one-answer change moves it by ≥ 20 % of itself)."""
    return 5.0 / n if n else float("inf")


def summarise(records: list[dict], methods: list[str], reference: str, selection_seed: int) -> dict:
    """Per method: the validation sweep (selection seed), the chosen lr, and at that lr the held-out
    loss over seeds, paired differences to ``reference``, verdict, final metric, wall time, size."""
    summary = {}
    for m in methods:
        mine = [r for r in records if r["method"] == m]
        sweep = {r["lr"]: r["val_loss"] for r in mine if r["seed"] == selection_seed}
        sweep = dict(sorted(sweep.items()))
        best = pick(sweep)
        s = {"sweep": sweep, "best_lr": best}
        if best is not None:
            runs = sorted((r for r in mine if r["lr"] == best), key=lambda r: r["seed"])
            lo, hi = (min(sweep), max(sweep))
            s.update(best_at_grid_edge=best in (lo, hi), n=len(runs), run_keys=sorted(r.get("key") or "" for r in runs),
                     seeds={r["seed"]: r["final_loss"] for r in runs},
                     curves={r["seed"]: r["curve"] for r in runs}, size=runs[0].get("size"),
                     wall_s=mean_std([r.get("wall_s") for r in runs])[0])
            s["final_mean"], s["final_std"] = mean_std(s["seeds"].values())
            s["metric_mean"], s["metric_std"] = mean_std([r.get("metric") for r in runs])
        summary[m] = s
    ref = summary.get(reference) or {}
    for m, s in summary.items():
        if s.get("best_lr") is None or ref.get("best_lr") is None:
            continue
        diffs = [s["seeds"][sd] - ref["seeds"][sd] for sd in s["seeds"] if sd in ref["seeds"]]
        dm, dsd = mean_std(diffs)
        s["paired_diff"] = {"per_seed": diffs, "mean": dm, "std": dsd}
        # another name for the reference's spec shares its runs (a run's key holds the spec, not the name)
        s["verdict"] = "reference" if m == reference or s["run_keys"] == ref["run_keys"] else verdict(diffs)
    return summary


def _f(x, fmt="{:.4f}"):
    return "—" if x is None else fmt.format(x)


def markdown(summary: dict, meta: dict, reference: str, metric_name: str, metric_floor: float | None) -> str:
    lines = [f"Settings: {meta['settings_text']}", "",
             f"Held-out loss after training at each method's learning rate chosen on VALIDATION (seed "
             f"{meta['selection_seed']}), mean ± std over seeds; Δ = method − {reference}, paired by seed "
             f"(negative: better than {reference}).", "",
             f"| method | chosen lr | validation sweep | held-out loss | Δ per seed | Δ mean ± std | verdict | "
             f"{metric_name} | wall/run (s) | init ‖ΔW₀‖ | init Σσ(ΔW₀) | init ‖A₀‖ |",
             "|---|---:|---|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    ranked = sorted(summary.items(), key=lambda kv: (kv[1].get("final_mean") is None, kv[1].get("final_mean") or 0))
    for m, s in ranked:
        sweep = ", ".join(f"{lr:g}: {_f(v)}" for lr, v in s["sweep"].items()) or "—"
        if s.get("best_lr") is None:
            lines.append(f"| {m} | — | {sweep} | {s.get('error', 'not finished')} | | | | | | | | |")
            continue
        edge = " (edge)" if s["best_at_grid_edge"] else ""
        pd = s.get("paired_diff") or {}
        per = ", ".join(f"{d:+.4f}" for d in pd.get("per_seed", [])) or "—"
        dms = "—" if pd.get("mean") is None else f"{pd['mean']:+.4f} ± {pd['std']:.4f}"
        mm = s.get("metric_mean")
        if mm is None:
            metric = "—"
        elif metric_floor is not None and mm < metric_floor:
            metric = f"below floor ({mm:.3f})"
        else:
            metric = f"{mm:.3f} ± {s['metric_std']:.3f}"
        size = s.get("size") or {}
        lines.append(f"| {m} | {s['best_lr']:g}{edge} | {sweep} | {s['final_mean']:.4f} ± {s['final_std']:.4f} "
                     f"(n={s['n']}) | {per} | {dms} | {s.get('verdict', '—')} | {metric} | "
                     f"{_f(s.get('wall_s'), '{:.0f}')} | {size.get('delta_fro', 0):.2f} | "
                     f"{size.get('delta_sum_sigma', 0):.1f} | {size.get('A_fro', 0):.2f} |")
    lines += ["", f"Step-0 held-out loss: {_f(meta.get('base_loss'))}; base {metric_name}: "
              f"{_f(meta.get('base_metric'), '{:.3f}')}.",
              "Verdict: paired two-sided t-test over seeds at 5 % (better / worse than the reference, or "
              "within noise); “(edge)”: the chosen lr is still at the edge of the grid after extension."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, ylabel: str = "held-out loss", reference: str | None = None) -> None:
    """Two panels. Left: held-out loss over training steps, mean over seeds, band = min..max.
    Right: the final held-out loss of each method, one dot per seed and the mean, best first, with
    the reference's mean as a vertical line. A name that shares another's runs (the same spec) is
    drawn once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done, drawn = set(), []
    for m, s in summary.items():
        key = tuple(s.get("run_keys") or (m,))
        if s.get("curves") and key not in done:
            done.add(key)
            drawn.append(m)
    colours = plt.get_cmap("tab20").colors
    colour = {m: colours[i % len(colours)] for i, m in enumerate(drawn)}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, max(5, 0.32 * len(drawn) + 1.5)),
                                 gridspec_kw={"width_ratios": [3, 2]})
    for i, m in enumerate(drawn):
        s = summary[m]
        curves = list(s["curves"].values())
        steps = [p[0] for p in curves[0]]
        ys = [[c[k][1] if k < len(c) else float("nan") for c in curves] for k in range(len(steps))]
        ax.plot(steps, [statistics.fmean(y) for y in ys], marker="o", color=colour[m],
                lw=2.2 if m == reference else 1.2, ls=("-", "--", ":")[i // len(colours) % 3],
                label=f"{m} (lr {s['best_lr']:g})")
        ax.fill_between(steps, [min(y) for y in ys], [max(y) for y in ys], color=colour[m], alpha=0.12)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title("over training: mean over seeds, band = min..max")
    ax.legend(fontsize=7)
    ranked = sorted(drawn, key=lambda m: summary[m]["final_mean"], reverse=True)  # best at the top
    for y, m in enumerate(ranked):
        finals = list(summary[m]["seeds"].values())
        bx.scatter(finals, [y] * len(finals), color=colour[m], s=18, alpha=0.7)
        bx.errorbar(summary[m]["final_mean"], y, xerr=summary[m].get("final_std") or 0, fmt="D", color=colour[m],
                    capsize=3, markersize=6)
    if reference in summary and summary[reference].get("final_mean") is not None:
        bx.axvline(summary[reference]["final_mean"], color="grey", ls="--", lw=1)
    bx.set_yticks(range(len(ranked)), [f"{m} ({summary[m].get('verdict', '')})" for m in ranked], fontsize=8)
    bx.set_xlabel(f"final {ylabel}\ndots: seeds; diamond: mean ± std; dashed: {reference}")
    bx.set_title("at the end, best at the top")
    bx.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
