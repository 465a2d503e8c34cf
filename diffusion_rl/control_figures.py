"""Pictures and tables of the control study: score against compute, and when a controller replans.

Every function reads the study's ``summary.json`` (``studies.load_study("control")``) or one
recorded episode, so the chapter "Closing the loop" shows exactly what the library computed.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np

from diffusion_rl.analysis import pareto_front, replanning_trace

__all__ = ["FAMILIES", "comparisons_html", "control_table_html", "family", "front", "plot_front", "plot_replanning"]

FAMILIES = {
    "fixed window, 20 steps": ("#1f77b4", "o", "-"),
    "fixed window, DDIM 1 step": ("#9467bd", "v", ":"),
    "fixed window, DDIM 2 steps": ("#8c564b", "^", ":"),
    "fixed window, DDIM 3 steps": ("#e377c2", "<", ":"),
    "fixed window, DDIM 5 steps": ("#7f7f7f", ">", ":"),
    "fixed window, DDIM 10 steps": ("#bcbd22", "d", ":"),
    "warm start": ("#17becf", "s", ""),
    "state error": ("#2ca02c", "P", ""),
    "likelihood": ("#ff7f0e", "X", ""),
    "inverse dynamics": ("#d62728", "*", ""),
}
"""Each family of settings: colour, marker, line style (fixed windows are joined by a line over k)."""


def family(setting: dict) -> str:
    """The family a setting of the control study belongs to (its ideas, without the numbers)."""
    if setting.get("inverse_dynamics"):
        return "inverse dynamics"
    if setting.get("warm_start"):
        return "warm start"
    if setting["controller"] == "state-error":
        return "state error"
    if setting["controller"] == "likelihood":
        return "likelihood"
    s = setting.get("ddim_steps")
    return "fixed window, 20 steps" if s is None else f"fixed window, DDIM {s} step{'s' if s > 1 else ''}"


def front(summary: dict) -> list[dict]:
    """The settings on the score-versus-compute front (no other setting scores higher for less compute), by cost."""
    settings = summary["settings"]
    idx = pareto_front([s["denoiser_evals_per_step"] for s in settings], [s["normalized"]["mean"] for s in settings])
    return [settings[i] for i in idx]


def plot_front(summary: dict, reference: str = "fixed-k1-ddpm20", keep: float = 0.98, zoom: tuple[float, float] = (90.0, 104.0)):
    """Mean score (95% CI) against denoiser evaluations per env step for every setting, with the front and the
    98% line; below, the same picture zoomed to the scores in ``zoom``, where the front is decided."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(8.5, 10.0), sharex=True, gridspec_kw={"height_ratios": [1.2, 1]})
    for ax in axes:
        _draw_front(ax, summary, reference, keep)
    axes[0].set_title("Score against compute: every setting of the control study")
    axes[1].set_ylim(*zoom)
    axes[1].set_title(f"zoomed to {zoom[0]:g}-{zoom[1]:g}%", fontsize=10)
    axes[1].set_xlabel("denoiser evaluations per environment step (log scale)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def _draw_front(ax, summary: dict, reference: str, keep: float) -> None:
    settings = summary["settings"]
    by_family: dict[str, list[dict]] = {}
    for s in settings:
        by_family.setdefault(family(s), []).append(s)
    for name, (color, marker, line) in FAMILIES.items():
        rows = sorted(by_family.get(name, []), key=lambda s: s["denoiser_evals_per_step"])
        if not rows:
            continue
        x = [s["denoiser_evals_per_step"] for s in rows]
        y = [s["normalized"]["mean"] for s in rows]
        err = np.array([[m - s["normalized"]["ci95"][0], s["normalized"]["ci95"][1] - m] for s, m in zip(rows, y)]).T
        ax.errorbar(x, y, yerr=err, fmt=marker, linestyle=line or "none", color=color, label=name, capsize=2,
                    markersize=6, alpha=0.85, elinewidth=0.8, linewidth=1)
    best = front(summary)
    ax.step([s["denoiser_evals_per_step"] for s in best], [s["normalized"]["mean"] for s in best], where="post",
            color="black", linewidth=1, alpha=0.6, label="front")
    ref = next(s for s in settings if s["name"] == reference)["normalized"]["mean"]
    ax.axhline(keep * ref, color="black", linestyle="--", linewidth=0.8)
    ax.annotate(f"{keep:.0%} of the k = 1 score", (0.99, keep * ref), xycoords=("axes fraction", "data"), xytext=(0, -11),
                textcoords="offset points", fontsize=9, ha="right")
    default = summary.get("notes", {}).get("default", {}).get("setting")
    if default:
        d = next(s for s in settings if s["name"] == default)
        ax.plot(d["denoiser_evals_per_step"], d["normalized"]["mean"], "o", markersize=16, markerfacecolor="none",
                markeredgecolor="black", label=f"default: {default}")
    ax.set_xscale("log")
    ax.set_ylabel("% of the data's mean return (95% CI)")
    ax.grid(alpha=0.3, which="both")


def control_table_html(summary: dict, names: Sequence[str] | None = None) -> str:
    """An HTML table of settings (default: the front): score with interval, falls, actions per plan, evaluations per step."""
    rows = front(summary) if names is None else [next(s for s in summary["settings"] if s["name"] == n) for n in names]
    head = ("<tr><th>setting</th><th>% of data [95% CI]</th><th>falls</th><th>actions per plan</th>"
            "<th>denoiser evals per step</th></tr>")
    body = []
    for s in rows:
        lo, hi = s["normalized"]["ci95"]
        body.append(
            f"<tr><td><code>{html.escape(s['name'])}</code></td><td>{s['normalized']['mean']:.1f} [{lo:.1f}, {hi:.1f}]</td>"
            f"<td>{s['falls']}/{s['episodes']}</td><td>{s['steps_per_plan']:.2f}</td><td>{s['denoiser_evals_per_step']:.3f}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def comparisons_html(summary: dict) -> str:
    """An HTML table of the study's paired comparisons: treatment minus baseline on the same seeds, and their compute."""
    settings = {s["name"]: s for s in summary["settings"]}
    head = ("<tr><th>idea</th><th>against</th><th>score difference, points [95% CI]</th><th>falls</th>"
            "<th>denoiser evals per step</th></tr>")
    body = []
    for c in summary["comparisons"]:
        a, b = settings[c["baseline"]], settings[c["treatment"]]
        d = c["normalized"]
        lo, hi = d["ci95"]
        body.append(
            f"<tr><td><code>{html.escape(c['treatment'])}</code></td><td><code>{html.escape(c['baseline'])}</code></td>"
            f"<td>{d['mean']:+.1f} [{lo:+.1f}, {hi:+.1f}]</td><td>{a['falls']} &rarr; {b['falls']}</td>"
            f"<td>{a['denoiser_evals_per_step']:.2f} &rarr; {b['denoiser_evals_per_step']:.2f}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def plot_replanning(result, threshold: float, scale: np.ndarray, steps: int | None = None, ax=None):
    """One recorded episode of a state-error controller: the error it saw at each step, its threshold, and its replans."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8.5, 3.0))
    trace = replanning_trace(result.states, result.plans[..., -len(scale):], result.plan_steps, scale)
    n = len(trace) if steps is None else min(steps, len(trace))
    ax.plot(np.arange(n), trace[:n], color="#2ca02c", linewidth=1, label="distance to the plan's prediction")
    ax.axhline(threshold, color="black", linestyle="--", linewidth=0.8, label=f"threshold {threshold:g}")
    replans = [p for p in result.plan_steps if p < n]
    ax.plot(replans, np.zeros(len(replans)), "|", color="#d62728", markersize=12, label=f"replans ({len(replans)})")
    top = np.nanmax(trace[:n]) if np.isfinite(trace[:n]).any() else 1.0
    ax.set(xlim=(0, n), ylim=(0, max(top, threshold) * 1.1), xlabel="environment step",
           ylabel="RMS distance (data std)", title=f"threshold {threshold:g}: {n / max(len(replans), 1):.1f} steps per plan")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    return ax.figure
