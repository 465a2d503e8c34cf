"""Figures and tables of the push chapter: fall rate and score against push force, per agent, with intervals."""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np

__all__ = ["agent_curves", "pair_table_html", "paired_by_force", "plot_push_curves", "push_table_html", "push_targets", "push_video"]


def agent_curves(summary: dict) -> dict[str, list[dict]]:
    """Each agent's settings in a push study's summary, sorted by push force."""
    out: dict[str, list[dict]] = {}
    for s in summary["settings"]:
        out.setdefault(s["agent"], []).append(s)
    return {a: sorted(v, key=lambda s: s["disturbance"]["push_force"]) for a, v in out.items()}


def plot_push_curves(summary: dict, agents: Sequence[str] | None = None, labels: dict[str, str] | None = None):
    """Fall rate (Wilson 95%) and score (bootstrap 95%) against push force, one line per agent."""
    import matplotlib.pyplot as plt

    curves = agent_curves(summary)
    agents = list(agents or curves)
    labels = labels or {}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.4))
    for i, agent in enumerate(agents):
        rows = curves[agent]
        f = np.array([s["disturbance"]["push_force"] for s in rows]) + 4 * (i - (len(agents) - 1) / 2)
        style = {"marker": "o", "ms": 4, "capsize": 3, "lw": 1.5, "color": "black" if agent == "expert" else f"C{i}",
                 "label": labels.get(agent, agent), "linestyle": "--" if agent == "expert" else "-"}
        falls = np.array([100 * s["fall_rate"]["mean"] for s in rows])
        lo, hi = (np.array([100 * s["fall_rate"]["ci95"][j] for s in rows]) for j in (0, 1))
        ax1.errorbar(f, falls, yerr=[falls - lo, hi - falls], **style)
        score = np.array([s["normalized"]["mean"] for s in rows])
        lo, hi = (np.array([s["normalized"]["ci95"][j] for s in rows]) for j in (0, 1))
        ax2.errorbar(f, score, yerr=[score - lo, hi - score], **style)
    ax1.set(xlabel="push force (N), 5 steps every 100", ylabel="episodes that fall, %", ylim=(-3, 103), title="Falls")
    ax2.set(xlabel="push force (N), 5 steps every 100", ylabel="score, % of the data's return", title="Score")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    handles, names = ax1.get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=min(4, len(names)), frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.05 * ((len(names) - 1) // 4), 1, 1))
    return fig


def push_table_html(summary: dict, agents: Sequence[str] | None = None, labels: dict[str, str] | None = None) -> str:
    """Falls out of the episodes and the mean score, per agent (rows) and push force (columns)."""
    curves = agent_curves(summary)
    agents = list(agents or curves)
    labels = labels or {}
    forces = [s["disturbance"]["push_force"] for s in curves[agents[0]]]
    head = "<tr><th>agent</th>" + "".join(f"<th>{f:g} N</th>" for f in forces) + "</tr>"
    body = []
    for agent in agents:
        cells = "".join(f"<td>{s['falls']}/{s['episodes']} · {s['normalized']['mean']:.0f}%</td>" for s in curves[agent])
        body.append(f"<tr><td>{html.escape(labels.get(agent, agent))}</td>{cells}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def paired_by_force(summary: dict, baseline: str, treatment: str) -> list[dict]:
    """The summary's paired comparisons of agent ``treatment`` against ``baseline``, one per push force, sorted by force."""
    curves = agent_curves(summary)
    by = {a: {s["name"]: s for s in curves[a]} for a in (baseline, treatment)}
    out = []
    for c in summary["comparisons"]:
        if c["baseline"] in by[baseline] and c["treatment"] in by[treatment]:
            b, t = by[baseline][c["baseline"]], by[treatment][c["treatment"]]
            if b["disturbance"] == t["disturbance"]:
                out.append({"force": b["disturbance"]["push_force"], "baseline": b, "treatment": t, "fell": c["fell"],
                            "normalized": c["normalized"]})
    if not out:
        raise ValueError(f"The summary pairs no arms of {treatment!r} with {baseline!r}.")
    return sorted(out, key=lambda r: r["force"])


def pair_table_html(summary: dict, baseline: str, treatment: str) -> str:
    """Per push force: the two agents' falls, and the paired differences (treatment - baseline) with 95% intervals."""
    head = ("<tr><th>push</th><th>falls before</th><th>falls after</th><th>fall rate, after - before (points)</th>"
            "<th>score, after - before (points)</th></tr>")
    body = []
    for r in paired_by_force(summary, baseline, treatment):
        fell, score = r["fell"], r["normalized"]
        body.append(f"<tr><td>{r['force']:g} N</td><td>{r['baseline']['falls']}/{r['baseline']['episodes']}</td>"
                    f"<td>{r['treatment']['falls']}/{r['treatment']['episodes']}</td>"
                    f"<td>{100 * fell['mean']:+.0f} [{100 * fell['ci95'][0]:+.0f}, {100 * fell['ci95'][1]:+.0f}]</td>"
                    f"<td>{score['mean']:+.1f} [{score['ci95'][0]:+.1f}, {score['ci95'][1]:+.1f}]</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def push_targets(summary: dict, notes: dict, agent: str = "default", undisturbed: float | None = None) -> list[dict]:
    """The issue's bars for ``agent`` against the expert, at the forces the tuning seeds located."""
    curves = agent_curves(summary)
    by = {a: {s["disturbance"]["push_force"]: s for s in rows} for a, rows in curves.items()}
    low, half = notes["up_to_0.2_falls"], notes["nearest_0.5_falls"]
    rows = []
    for force in sorted(f for f in by["expert"] if f <= low):
        e, d = by["expert"][force]["fall_rate"]["mean"], by[agent][force]["fall_rate"]["mean"]
        rows.append({"target": f"{force:g} N: falls at most the expert's + 5 points", "value": 100 * (d - e), "met": d <= e + 0.05})
    e, d = by["expert"][half]["fall_rate"]["mean"], by[agent][half]["fall_rate"]["mean"]
    rows.append({"target": f"{half:g} N (expert near half): falls less than the expert", "value": 100 * (d - e), "met": d < e})
    if undisturbed is not None:
        rows.append({"target": "undisturbed k = 1: at least 98% of the data's return", "value": undisturbed, "met": undisturbed >= 98})
    return rows


def push_video(planner, control: dict, seed: int, force: float, steps: int = 260, every: int = 3):
    """Side-by-side video of the SAC expert (left) and ``planner`` with ``control`` (right) under the same pushes of ``force``."""
    from diffusion_rl import expert, video
    from diffusion_rl.control import controller_from_name
    from diffusion_rl.disturbances import Disturbance
    from diffusion_rl.planner import rollout

    push = Disturbance(push_force=force)
    actor, _ = expert.load_policy()
    e = expert.record_episode(actor, seed, push, max_steps=steps)
    ctrl = controller_from_name(control["controller"], window=control["window"], threshold=control["threshold"])
    p = rollout(planner, [seed], controller=ctrl, ddim_steps=control["ddim_steps"], warm_start=control["warm_start"],
                max_steps=steps, record=True, disturbance=push)[0]
    left = video.episode_frames(e["states"], e["x"], every=every)
    right = video.episode_frames(p.states, p.x, p.plans[..., planner.action_dim:], p.plan_steps, every=every, show_plan_end=False)
    video.caption_frames(left, f"expert, {force:g} N" + (", falls" if e["fell"] else ""))
    video.caption_frames(right, "planner" + (", falls" if p.fell else ""))
    return video.show_video(video.side_by_side(left, right), fps=20)
