"""Figures and tables of the window-size experiment, drawn from a sweep's result files.

Each function takes :class:`~diffusion_rl.sweep.SweepResults` (``sweep.load_results()``) and
returns a matplotlib figure or a table, so the book shows exactly what the library computed.
Every mean carries its 95% bootstrap interval; every fall rate its Wilson interval.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffusion_rl.sweep import SweepResults

__all__ = ["WindowCurve", "errorbar_by_window", "plot_window_curves", "study_curves", "sweep_curves", "plot_drift", "plot_episode_scatter", "plot_shift", "plot_study_arms", "plot_window_scores", "window_table", "window_table_html"]

UNGUIDED, GUIDED, STUDY = "#1f77b4", "#d62728", "#7f7f7f"


@dataclass(frozen=True)
class WindowCurve:
    """One method's normalized score against the executed window k: a line of the landing page's picture."""

    label: str
    """Legend entry."""
    windows: tuple[int, ...]
    """Executed windows k (actions run per plan before replanning)."""
    scores: tuple[float, ...]
    """Mean return as a percentage of the training data's mean return, one per window."""
    ci95: tuple[tuple[float, float], ...] | None = None
    """95% interval per window, or None where the source reports none (the study)."""
    color: str | None = None
    marker: str = "o"
    linestyle: str = "-"


def study_curves(study: dict | None = None) -> list[WindowCurve]:
    """The study's Fig. 1 as curves (its window w is k = w + 1): unguided, and its one guided setting."""
    from diffusion_rl.analysis import STUDY_TABLE

    t = study or STUDY_TABLE
    curves = []
    for guided, label, marker, ls in ((False, "study (10 episodes, no intervals)", "s", "--"), (True, "study, guided", "D", "none")):
        idx = [i for i, g in enumerate(t["guided"]) if g == guided]
        curves.append(WindowCurve(label, tuple(t["executed_actions"][i] for i in idx), tuple(t["normalized"][i] for i in idx),
                                  color=STUDY, marker=marker, linestyle=ls))
    return curves


def sweep_curves(summary: dict, label: str = "this replication") -> list[WindowCurve]:
    """A sweep's ``summary.json`` as curves with 95% bootstrap intervals: unguided, and guided where it ran any."""
    curves = []
    for guided, color in ((False, UNGUIDED), (True, GUIDED)):
        rows = sorted((s for s in summary["settings"] if s["guided"] == guided), key=lambda s: s["window"])
        if rows:
            name = f"{label}, guided (scale {rows[0]['guidance_scale']:g})" if guided else label
            curves.append(WindowCurve(name, tuple(r["window"] for r in rows), tuple(r["normalized"]["mean"] for r in rows),
                                      tuple(tuple(r["normalized"]["ci95"]) for r in rows), color=color))
    return curves


def plot_window_curves(curves: Sequence[WindowCurve], horizon: int = 8, ax=None):
    """The whole story in one picture: every method's score against the executed window k, side by side.

    Curves with intervals are drawn with bars and nudged sideways a little so that bars at the same k
    do not hide each other. Later chapters' methods join by appending their :class:`WindowCurve`.
    """
    import matplotlib.pyplot as plt

    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7.0, 4.2))
    with_bars = [c for c in curves if c.ci95 is not None]
    for c in curves:
        k = np.asarray(c.windows, float)
        mean = np.asarray(c.scores, float)
        style = {"color": c.color, "marker": c.marker, "linestyle": c.linestyle, "label": c.label, "ms": 5, "lw": 1.5}
        if c.ci95 is None:
            ax.plot(k, mean, mfc="none", **style)
            continue
        k = k + 0.1 * (with_bars.index(c) - (len(with_bars) - 1) / 2)
        lo, hi = np.asarray(c.ci95, float).T
        ax.errorbar(k, mean, yerr=[mean - lo, hi - mean], capsize=3, **style)
    ax.axhline(100, color="black", lw=0.8, alpha=0.5)
    ax.set(xlabel="executed window k (plan actions run before replanning)", ylabel="score, % of the data's mean return",
           xticks=range(1, horizon + 1), title="Score against the executed window k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="lower left")
    fig.tight_layout()
    return fig


def _settings(res: SweepResults, guided: bool) -> list[dict]:
    return sorted((s for s in res.summary["settings"] if s["guided"] == guided), key=lambda s: s["window"])


def errorbar_by_window(ax, rows: list[dict], key: str, color: str, label: str | None, offset: float = 0.0,
                       scale: float = 1.0, **style) -> None:
    """Settings' means of ``key`` with asymmetric 95% interval bars against the window (``style``: matplotlib overrides)."""
    if not rows:
        return
    k = np.array([r["window"] for r in rows], float) + offset
    mean = np.array([r[key]["mean"] for r in rows]) * scale
    lo = np.array([r[key]["ci95"][0] for r in rows]) * scale
    hi = np.array([r[key]["ci95"][1] for r in rows]) * scale
    ax.errorbar(k, mean, yerr=[mean - lo, hi - mean], color=color, label=label, **{"fmt": "o-", "capsize": 3, "ms": 5, "lw": 1.5, **style})


def window_table(res: SweepResults) -> list[dict]:
    """The study's Fig. 1 as rows: per setting the raw return, every normalization and the fall rate, with intervals."""
    study = res.summary["study"]
    study_by = {(k, g): (n, v) for k, g, n, v in zip(study["executed_actions"], study["guided"], study["normalized"], study["value_rate"])}
    rows = []
    for s in _settings(res, False) + _settings(res, True):
        n, v = study_by.get((s["window"], s["guided"]), (None, None))
        rows.append({
            "setting": s["setting"], "executed window k": s["window"], "study's window": s["window"] - 1 if s["window"] > 1 else None,
            "guided": s["guided"], "episodes": s["episodes"],
            "return": s["return"], "normalized": s["normalized"], "value rate": s["value_rate"],
            "D4RL-style (our refs)": s.get("d4rl_normalized"), "D4RL-style (D4RL refs)": s["d4rl_normalized_d4rl_refs"],
            "falls": s["falls"], "fall rate": s["fall_rate"], "study normalized": n, "study value rate": v,
        })
    return rows


def window_table_html(res: SweepResults) -> str:
    """:func:`window_table` as an HTML table (mean and [95% interval] in each cell), for the book."""
    def cell(x, digits: int = 1) -> str:
        if x is None:
            return "&ndash;"
        if isinstance(x, dict):
            lo, hi = x["ci95"]
            return f"{x['mean']:.{digits}f}<br><small>[{lo:.{digits}f}, {hi:.{digits}f}]</small>"
        if isinstance(x, bool):
            return "yes" if x else "no"
        return f"{x:.{digits}f}" if isinstance(x, float) else html.escape(str(x))

    rows = window_table(res)
    digits = {"value rate": 3, "study value rate": 3, "fall rate": 2, "return": 0}
    key = ["executed window k", "study's window", "guided"]
    # Thirteen columns do not fit a book's text column: two tables, scores and the other normalizations.
    parts = [
        ("Return, normalized score and falls", key + ["return", "normalized", "study normalized", "falls", "fall rate"]),
        ("The same runs in the other normalizations", key + ["episodes", "value rate", "study value rate",
                                                           "D4RL-style (our refs)", "D4RL-style (D4RL refs)"]),
    ]
    tables = []
    for caption, columns in parts:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in columns)
        body = "".join("<tr>" + "".join(f"<td>{cell(r[h], digits.get(h, 1))}</td>" for h in columns) + "</tr>" for r in rows)
        tables.append(f'<table class="window-table"><caption>{html.escape(caption)}</caption>'
                      f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    # Still scrolls sideways on a phone rather than overflowing the page.
    return "".join(f'<div style="overflow-x: auto">{t}</div>' for t in tables)


def plot_window_scores(res: SweepResults):
    """Fig. 1 of the study, with intervals: normalized score (and raw return), value rate and fall rate against k."""
    import matplotlib.pyplot as plt

    ref = res.summary["references"]
    # One panel per row: at the book's column width (7 in) every label stays at 9 pt or more.
    fig, axes = plt.subplots(3, 1, figsize=(7.0, 9.0))
    unguided, guided = _settings(res, False), _settings(res, True)
    study = res.summary["study"]
    ks = np.array(study["executed_actions"])
    is_guided = np.array(study["guided"])

    ax = axes[0]
    errorbar_by_window(ax, unguided, "normalized", UNGUIDED, "unguided")
    errorbar_by_window(ax, guided, "normalized", GUIDED, f"guided (scale {guided[0]['guidance_scale']:g})" if guided else "", offset=0.12)
    ax.plot(ks[~is_guided], np.array(study["normalized"])[~is_guided], "s--", color=STUDY, mfc="none", label="study (10 ep., no bars)")
    ax.plot(ks[is_guided], np.array(study["normalized"])[is_guided], "D", color=STUDY, mfc="none", label="study, guided")
    ax.set(xlabel="executed window k (actions per plan)", ylabel="return / data mean x 100", title="Normalized score (95% CI)")
    raw = ax.secondary_yaxis("right", functions=(lambda y: y * ref["data_mean_return"] / 100, lambda r: r * 100 / ref["data_mean_return"]))
    raw.set_ylabel("return")
    ax.legend(fontsize=9, loc="lower left")

    ax = axes[1]
    errorbar_by_window(ax, unguided, "value_rate", UNGUIDED, "unguided")
    errorbar_by_window(ax, guided, "value_rate", GUIDED, "guided", offset=0.12)
    ax.plot(ks[~is_guided], np.array(study["value_rate"])[~is_guided], "s--", color=STUDY, mfc="none", label="study")
    ax.set(xlabel="executed window k", ylabel="reward per step / data's", title="Value rate (95% CI)")

    ax = axes[2]
    errorbar_by_window(ax, unguided, "fall_rate", UNGUIDED, "unguided", scale=100)
    errorbar_by_window(ax, guided, "fall_rate", GUIDED, "guided", offset=0.12, scale=100)
    ax.set(xlabel="executed window k", ylabel="% of episodes", title="Falls before step 1000 (Wilson 95% CI)", ylim=(-3, 103))
    for ax in axes:
        ax.set_xticks(range(1, res.summary["horizon"] + 1))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_episode_scatter(res: SweepResults, seed: int = 0):
    """Fig. 2 of the study: every episode's return against its window (crosses fell), with each setting's mean and 95% CI."""
    import matplotlib.pyplot as plt

    ref = res.summary["references"]
    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    for guided, color, offset in ((False, UNGUIDED, -0.17), (True, GUIDED, 0.17)):
        eps = [e for e in res.episodes if e["guided"] == guided]
        if not eps:
            continue
        k = np.array([e["window"] for e in eps]) + offset + rng.uniform(-0.1, 0.1, len(eps))
        ret = np.array([e["return"] for e in eps])
        fell = np.array([e["fell"] for e in eps])
        name = "guided" if guided else "unguided"
        ax.scatter(k[~fell], ret[~fell], s=14, color=color, alpha=0.7, label=f"{name}, walked to the limit")
        ax.scatter(k[fell], ret[fell], s=22, color=color, marker="x", alpha=0.9, label=f"{name}, fell")
        # Each setting's mean with its 95% interval, beside its cloud of episodes.
        errorbar_by_window(ax, _settings(res, guided), "return", "k", "mean, 95% CI" if guided else None, offset=offset,
                           fmt="_", ms=12, capsize=4, lw=1.8, zorder=3)
    ax.axhline(ref["data_mean_return"], color="k", lw=1, ls=":", label="data mean return")
    ax.set(xlabel="executed window k (actions per plan)", ylabel="episode return",
           title=f"Every episode ({res.summary['episodes_per_setting']} per setting)")
    ax.set_xticks(range(1, res.summary["horizon"] + 1))
    ax.secondary_yaxis("right", functions=(lambda r: r * 100 / ref["data_mean_return"], lambda y: y * ref["data_mean_return"] / 100)).set_ylabel("normalized")
    ax.legend(fontsize=9, loc="lower left", ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_drift(res: SweepResults):
    """Plan versus reality: drift by offset within the executed window, and at the window's end against k."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(7.0, 6.6))
    ax = axes[0]
    windows = sorted({r["window"] for r in res.drift if not r["guided"]})
    cmap = plt.get_cmap("viridis")
    for i, k in enumerate(windows):
        rows = sorted((r for r in res.drift if r["window"] == k and not r["guided"]), key=lambda r: r["offset"])
        r_ = np.array([r["offset"] for r in rows])
        m = np.array([r["mean"] for r in rows], float)
        color = cmap(i / max(1, len(windows) - 1))
        ax.plot(r_, m, "o-", color=color, ms=3, label=f"k = {k}")
        ax.fill_between(r_, [r["ci_low"] for r in rows], [r["ci_high"] for r in rows], color=color, alpha=0.15)
    ax.set(xlabel="steps since the plan was made (r)", ylabel="RMS error, data std units",
           title="Real state vs the plan's prediction (unguided)")
    ax.legend(fontsize=9, ncol=4)

    ax = axes[1]
    errorbar_by_window(ax, _settings(res, False), "window_end_drift", UNGUIDED, "unguided")
    errorbar_by_window(ax, _settings(res, True), "window_end_drift", GUIDED, "guided", offset=0.12)
    ax.set(xlabel="executed window k", ylabel="RMS error at r = min(k, H-1)", title="Drift at the end of the executed window")
    ax.set_xticks(range(1, res.summary["horizon"] + 1))
    ax.legend(fontsize=9)
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_shift(res: SweepResults):
    """Leaving the data before a fall: distance to the nearest training state, and plan drift relative to steady walking."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(7.0, 6.6))
    for ax, metric, title, ylabel in (
        (axes[0], "nn_distance", "Distance from the nearest state in the data", "RMS distance, data std units"),
        (axes[1], "plan_drift_ratio", "Drift of the plans made before a fall", "drift / same window's steady drift"),
    ):
        rows = sorted((r for r in res.shift if r["metric"] == metric and r["phase"] == "before_fall"), key=lambda r: r["steps_before_fall"])
        if rows:
            d = -np.array([r["steps_before_fall"] for r in rows])
            ax.plot(d, [r["mean"] for r in rows], color=GUIDED, label=f"before a fall ({max(r['episodes'] for r in rows)} falls, 95% CI)")
            ax.fill_between(d, [r["ci_low"] for r in rows], [r["ci_high"] for r in rows], color=GUIDED, alpha=0.2)
        if metric == "nn_distance":
            steady = {r["setting"]: r["mean"] for r in res.shift if r["metric"] == metric and r["phase"] == "steady" and r["mean"] is not None}
            if steady:  # none when every episode fell too early to walk steadily
                lo, hi = min(steady.values()), max(steady.values())
                ax.axhspan(lo, hi, color=UNGUIDED, alpha=0.25, label=f"steady walking ({min(steady, key=steady.get)} to {max(steady, key=steady.get)})")
        else:
            ax.axhline(1.0, color=UNGUIDED, ls="--", label="steady walking")
        ax.set(xlabel="steps relative to the fall", ylabel=ylabel, title=title)
        ax.legend(fontsize=9, loc="upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_study_arms(summary: dict, names: Sequence[str], title: str = "", ax=None):
    """A study's arms side by side: mean normalized score with its 95% interval, and falls, one row each."""
    import matplotlib.pyplot as plt

    rows = {s["name"]: s for s in summary["settings"]}
    missing = [n for n in names if n not in rows]
    if missing:
        raise ValueError(f"The study has no arm(s) {missing}; it has {sorted(rows)}.")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 0.45 * len(names) + 1.2))
    for i, name in enumerate(names):
        s = rows[name]
        mean, (lo, hi) = s["normalized"]["mean"], s["normalized"]["ci95"]
        ax.errorbar(mean, i, xerr=[[mean - lo], [hi - mean]], fmt="o", color=UNGUIDED if s["guidance_scale"] is None else GUIDED, capsize=3)
        ax.annotate(f"{s['falls']}/{s['episodes']} fell", (hi, i), xytext=(6, 0), textcoords="offset points", va="center", fontsize=9)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set(xlabel="% of the data's mean return (95% CI)", title=title)
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.25)
    return ax.figure
