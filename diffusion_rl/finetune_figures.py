"""Figures and tables of the fine-tuning chapter: the learning curve, the runs tried, the snapshots' scores."""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np

__all__ = ["paired_by_window", "plot_learning_curve", "plot_snapshot", "runs_table_html", "targets"]


def plot_learning_curve(curve: Sequence[dict], snapshots: Sequence[dict] = (), data_label: str = "training episodes"):
    """Return and fall rate against env steps: the training episodes (exploring) and, if given, the snapshots on the tuning seeds."""
    import matplotlib.pyplot as plt

    steps = np.array([r["env_steps"] for r in curve], float) / 1e3
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    score = np.array([r["mean_normalized"] for r in curve], float)
    falls = np.array([r["fall_rate"] for r in curve], float) * 100
    for ax, y, name in ((ax1, score, "score, % of the data's return"), (ax2, falls, "episodes that fall, %")):
        ax.plot(steps, y, color="0.7", lw=1, label=f"{data_label} ({int(curve[0]['episodes'])} per iteration)")
        if len(y) >= 5:
            smooth = np.convolve(y, np.ones(5) / 5, mode="valid")
            ax.plot(steps[4:], smooth, color="0.3", lw=1.5, label="its running mean over 5 iterations")
        ax.set(xlabel="environment steps (thousands)", ylabel=name)
        ax.grid(alpha=0.3)
    if snapshots:
        by_it = {int(r["iteration"]): r["env_steps"] for r in curve}
        snap = [s for s in snapshots if s["iteration"] == 0 or s["iteration"] in by_it]
        x = np.array([by_it.get(int(s["iteration"]), 0) for s in snap], float) / 1e3
        n = len(snap[0]["returns"]) if snap else 30
        ax1.plot(x, [s["normalized"] for s in snap], "o-", color="C3", label=f"snapshots, tuning seeds ({n} episodes, no exploration noise)")
        ax2.plot(x, [100 * s["falls"] / n for s in snap], "o-", color="C3")
    ax1.legend(fontsize=8, loc="lower right")
    ax1.set_title("Score while fine-tuning (k = whole plans)")
    ax2.set_title("Falls while fine-tuning")
    fig.tight_layout()
    return fig


def plot_snapshot(snapshot: dict, base: dict, data_return: float):
    """One snapshot's episodes on the tuning seeds, seed by seed, against the pretrained planner's (iteration 0)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    n = len(snapshot["returns"])
    seeds = np.arange(n)
    ax.bar(seeds - 0.2, 100 * np.array(base["returns"]) / data_return, width=0.4, color="0.75", label="pretrained")
    ax.bar(seeds + 0.2, 100 * np.array(snapshot["returns"]) / data_return, width=0.4, color="C3",
           label=f"after {snapshot['iteration']} iterations")
    ax.axhline(100, color="black", lw=0.8, alpha=0.5)
    ax.set(xlabel=f"tuning seed (20000 + i), k = {snapshot['window']}", ylabel="% of the data's return", ylim=(0, 115),
           title=f"iteration {snapshot['iteration']}: {snapshot['normalized']:.1f}% of the data, {snapshot['falls']} of {n} fall "
                 f"(pretrained: {base['normalized']:.1f}%, {base['falls']} fall)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def runs_table_html(report: dict, shipped: str | None = None) -> str:
    """The runs tried: their options that differ from the defaults, cost, and k-window score on the tuning seeds."""
    from diffusion_rl.finetune import FinetuneConfig

    default = FinetuneConfig()
    at = report.get("compare_at")
    head = "<tr><th>run</th><th>options (others default)</th><th>iterations</th><th>env steps</th><th>wall time</th>" \
           "<th>k</th><th>end: % of data, falls</th>" + (f"<th>after {at} it.: % of data, falls</th>" if at else "") + "</tr>"
    body = []
    for r in report["runs"]:
        opts = ", ".join(f"{k} = {v}" for k, v in r["config"].items()
                         if getattr(default, k, None) != v and k not in ("threads", "iterations")) or "defaults"
        t = r["tuning"]
        name = html.escape(r["name"]) + (" (shipped)" if r["name"] == shipped else "")
        cells = f"<td>{t['normalized']:.1f}%, {t['falls']} / {len(t['returns'])}</td>"
        if at:
            cells += f"<td>{r['at']['normalized']:.1f}%, {r['at']['falls']} / {len(r['at']['returns'])}</td>"
        body.append(f"<tr><td>{name}</td><td>{html.escape(opts)}</td><td>{r['iterations']}</td><td>{r['env_steps']:,}</td>"
                    f"<td>{r['wall_time_s'] / 60:.0f} min</td><td>{t['window']}</td>{cells}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def targets(before: dict, after: dict, cost: dict, horizon: int = 8) -> list[dict]:
    """The issue's bars against the two window sweeps' summaries (before and after fine-tuning) and the run's cost."""
    def setting(summary: dict, k: int) -> dict:
        return next(s for s in summary["settings"] if s["window"] == k and not s["guided"])

    b1, a1, a8 = setting(before, 1), setting(after, 1), setting(after, horizon)
    rows = [
        {"target": f"k = {horizon}: at least 90% of the data's return", "value": a8["normalized"]["mean"],
         "met": a8["normalized"]["mean"] >= 90},
        {"target": f"k = {horizon}: at most 10% of episodes fall", "value": 100 * a8["fall_rate"]["mean"], "met": a8["fall_rate"]["mean"] <= 0.10},
        {"target": "k = 1: within 3 points of the original", "value": a1["normalized"]["mean"] - b1["normalized"]["mean"],
         "met": abs(a1["normalized"]["mean"] - b1["normalized"]["mean"]) <= 3},
        {"target": "fine-tuning cost at most 2 CPU hours", "value": cost["wall_time_s"] / 3600, "met": cost["wall_time_s"] <= 7200},
    ]
    return rows


def paired_by_window(before, after, window: int) -> dict:
    """Unguided scores at window k, ``after`` minus ``before`` (two sweeps' results) on the same seeds: mean and 95% CI."""
    from diffusion_rl.analysis import paired_difference

    def scores(res):
        return {r["seed"]: r["normalized"] for r in res.episodes if r["window"] == window and not r["guided"]}

    b, a = scores(before), scores(after)
    seeds = sorted(set(b) & set(a))
    return paired_difference([b[s] for s in seeds], [a[s] for s in seeds])
