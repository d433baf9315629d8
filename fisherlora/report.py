"""The initialisation report: ``report.json``, ``report.md`` and ``energy.png``."""

from __future__ import annotations

import json
from pathlib import Path

from fisherlora.layers import decoder_layer_index, layer_kind

__all__ = ["write_report", "plot_energy", "summary_rows", "rank_grid"]


def summary_rows(report: dict) -> list[tuple[str, str]]:
    """(label, value) rows of the closing summary printed by the command."""
    cal = report.get("calibration", {})
    t = report.get("timings_s", {})
    ranks = sorted({e["rank"] for e in report["layers"]})
    rows = [
        ("layers adapted", str(report["num_layers"])),
        ("rank r", ", ".join(map(str, ranks))),
        ("calibration", f"{cal.get('sequences', 0)} sequences, {cal.get('tokens', 0):,} tokens "
                        f"({cal.get('label_tokens', 0):,} with loss)"),
        ("Fisher energy captured (mean)", f"{report['mean_energy_captured']:.1%}"),
        ("overlap with PiSSA's top-r (mean)", f"{report['mean_pissa_overlap']:.1%}"),
    ]
    start = report.get("config", {}).get("init", "filet")
    if start != "filet":  # a gradient start: the selection describes the gradient's spectrum (DESIGN §1 step 6)
        rows[3:5] = [("start", f"init={start}"), ("gradient's top-r share of Σσ² (mean)",
                                                 f"{report['mean_energy_captured']:.1%}")]
    rows += [(f"time: {k}", f"{v:.1f} s") for k, v in t.items()]
    rows.append(("peak memory", f"{report['peak_memory_mb']:,.0f} MiB"))
    return rows


def _meaning(report: dict) -> list[str]:
    """What the two headline figures mean and what to expect, with this run's yardsticks."""
    rand, pissa = report.get("mean_random_share", 0.0), report.get("mean_pissa_energy_captured", 0.0)
    return [
        "## What the figures mean", "",
        "- **Energy captured**: the chosen directions' share of the layer's total Fisher energy Σe_i, with "
        "e_i = (u_iᵀGu_i)(v_iᵀAv_i): how much of the loss curvature on your data (as K-FAC sees it) lies in the "
        "directions the adapter trains. fisherlora keeps the r largest energies, so no r directions capture more. "
        f"Yardsticks of this run: a random choice of r of the k directions captures r/k ({rand:.1%} on average), "
        f"PiSSA's top-r σ {pissa:.1%}. Expect a share well above both (tens of percent when the curvature is "
        "concentrated); one near r/k means it is spread out and a larger rank helps more.",
        "- **PiSSA overlap**: the share of the chosen directions that are also among the r largest singular values "
        "(PiSSA's choice). 100% means fisherlora chose what PiSSA chooses; a random choice gives about r/k. Low "
        "values are common and are the point of the method: the Fisher energy often sits in directions far down "
        "the spectrum (small σ), which energy.png shows against PiSSA's top-r region.", ""]


def _next_commands(report: dict) -> list[str]:
    from fisherlora.card import base_loading_code

    return ["## Next", "", "Train (the adapter on the ORIGINAL base, LoRA weights trainable), then convert or merge:",
            "", "```python", "import torch", "import fisherlora",
            base_loading_code(report.get("model"), report.get("dtype") or "float32"),
            'model = fisherlora.load(base, "<this folder>", is_trainable=True)',
            "# train with transformers' Trainer or TRL's SFTTrainer (examples/), then",
            'model.save_pretrained("trained")',
            "```", "", "```bash",
            "fisherlora convert <this folder> trained -o plain          # plain LoRA, rank 2r, for the original base",
            "fisherlora merge <this folder> --adapter trained -o merged  # a full model with the adapter merged in",
            "fisherlora report <this folder>                            # this summary again",
            "```"]


def _markdown(report: dict) -> str:
    cal = report.get("calibration", {})
    lines = ["# fisherlora initialisation report", "",
             f"Model `{report.get('model')}` ({report.get('dtype')}), calibration data "
             f"`{report.get('data') or 'batches passed from Python'}`: {cal.get('sequences', 0)} sequences, "
             f"{cal.get('tokens', 0):,} tokens ({cal.get('label_tokens', 0):,} with loss).", ""]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary_rows(report)]
    cfg = report["config"]
    lines += ["", "Config: " + ", ".join(f"`{k}={v}`" for k, v in cfg.items()), ""]
    start = cfg.get("init", "filet")
    lines += _meaning(report) if start == "filet" else [
        "## What the figures mean", "",
        f"- **init={start}**: the adapter starts from the weight gradient (docs/DESIGN.md §1 step 6), not from the "
        "weight's singular triplets: A holds its first r directions, B the next r. In the table below σ are the "
        f"singular values of the {'whitened ' if start == 'natural_gradient' else ''}gradient, 'energy captured' is "
        "the share of Σσ² its first r directions hold, the chosen indices are 0..r-1, and the PiSSA columns do not "
        "apply.", ""]
    lines += ["## Per layer", "",
              "| layer | shape | r | energy captured | PiSSA's top-r would capture | PiSSA overlap | "
              "chosen σ (max/min) | σ_1 | chosen indices |",
              "|---|---|---|---|---|---|---|---|---|"]
    for e in report["layers"]:
        idx = e["indices"]
        shown = ", ".join(map(str, idx[:8])) + (" …" if len(idx) > 8 else "")
        lines.append(f"| {e['name']} | {e['shape'][0]}×{e['shape'][1]} | {e['rank']} | {e['energy_captured']:.1%} | "
                     f"{e.get('pissa_energy_captured', 0):.1%} | {e['pissa_overlap']:.0%} | "
                     f"{max(e['sigma']):.3g}/{min(e['sigma']):.3g} | {e['sigma_max']:.3g} | {shown} |")
    lines += [""] + _next_commands(report)
    return "\n".join(lines) + "\n"


def rank_grid(selections: dict) -> tuple[list[str], list[str], list[list[int | None]]]:
    """The rank of every layer as a grid: ``(rows, kinds, grid)`` with one row per decoder layer
    (``stack.i``; a module outside any stack is its own row), one column per projection kind, and
    ``grid[row][col]`` the rank (None where that layer has no such projection)."""
    rows: dict[str, dict[str, int]] = {}
    kinds: list[str] = []
    for name, sel in selections.items():
        where = decoder_layer_index(name)
        row = name if where is None else f"{where[0]}.{where[1]}"
        kind = layer_kind(name) if where is not None else "(own)"
        rows.setdefault(row, {})[kind] = sel.rank
        if kind not in kinds:
            kinds.append(kind)
    return list(rows), kinds, [[rows[r].get(k) for k in kinds] for r in rows]


def _plot_ranks(ax, selections: dict) -> None:
    """A heat map of the ranks by layer (x) and projection kind (y)."""
    import numpy as np

    rows, kinds, grid = rank_grid(selections)
    values = np.array([[np.nan if v is None else v for v in r] for r in grid], dtype=float).T
    im = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(kinds)), kinds, fontsize=6)
    step = max(1, len(rows) // 30)
    ax.set_xticks(range(0, len(rows), step), [rows[i] for i in range(0, len(rows), step)], fontsize=5, rotation=90)
    if values.size <= 400:  # small grids carry the numbers too
        for (y, x), v in np.ndenumerate(values):
            if not np.isnan(v):
                light = v > (np.nanmin(values) + np.nanmax(values)) / 2  # viridis is light at the top
                ax.text(x, y, str(int(v)), ha="center", va="center", fontsize=5, color="k" if light else "w")
    ax.set_title(f"rank per layer (total {sum(s.rank for s in selections.values())})", fontsize=8)
    ax.figure.colorbar(im, ax=ax, fraction=0.02, pad=0.01).ax.tick_params(labelsize=6)


def plot_energy(selections: dict, path: Path, max_panels: int = 16) -> None:
    """σ versus Fisher energy per layer (log-log), chosen directions marked, PiSSA's top-r band
    shaded, one legend for the figure; below, when the layers' ranks differ
    (``rank_allocation="global"``), a heat map of the rank per layer and projection kind.

    Up to ``max_panels`` layers every layer has a panel; beyond that each projection kind is shown
    at its middle decoder layer (``report.md`` lists every layer).
    """
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups: dict[str, list] = {}
    for name, sel in selections.items():
        groups.setdefault(layer_kind(name), []).append(sel)
    sampled = len(selections) > max_panels
    chosen = [sels[len(sels) // 2] for sels in groups.values()] if sampled else list(selections.values())
    chosen = chosen[:max_panels]
    ncol = min(len(chosen), 4) or 1
    nrow = -(-len(chosen) // ncol)
    heat = len({s.rank for s in selections.values()}) > 1
    fig = plt.figure(figsize=(4.6 * ncol, 3.8 * (nrow + heat) + 0.8))
    gs = fig.add_gridspec(nrow + heat, ncol)
    axes = np.array([[fig.add_subplot(gs[i, j]) for j in range(ncol)] for i in range(nrow)])
    if heat:
        _plot_ranks(fig.add_subplot(gs[nrow, :]), selections)
    for ax, sel in zip(axes.flat, chosen):
        sigma = sel.sigma.numpy()
        energy = sel.energy.clamp_min(1e-30).numpy()
        idx = sel.indices.numpy()
        top = sorted(sigma)[-sel.rank]  # PiSSA keeps the r largest σ: this region
        ax.axvspan(top, sigma.max() * 1.15, color="tab:blue", alpha=0.12, label="PiSSA's top-r σ")
        ax.scatter(sigma, energy, s=5, c="0.6", label="all singular directions")
        ax.scatter(sigma[idx], energy[idx], s=16, c="tab:red", label="chosen by Fisher energy (in the adapter)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{sel.name}\ncaptured {sel.energy_captured:.0%} of the Fisher energy, "
                     f"PiSSA overlap {sel.pissa_overlap:.0%}", fontsize=9)
        ax.set_xlabel("singular value σ_i", fontsize=9)
        ax.set_ylabel("Fisher energy e_i", fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=10, frameon=False,
               markerscale=2)
    where = " (each projection at its middle decoder layer)" if sampled else ""
    fig.suptitle(f"Fisher energy (uᵀGu)(vᵀAv) against σ{where}, rank r = "
                 f"{'/'.join(str(r) for r in sorted({s.rank for s in chosen}))}", fontsize=12)
    fig.tight_layout(rect=(0, 0.8 / fig.get_figheight(), 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, selections: dict, out_dir: Path) -> None:
    """Write ``report.json``, ``report.md`` and ``energy.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "report.md").write_text(_markdown(report))
    plot_energy(selections, out_dir / "energy.png")
