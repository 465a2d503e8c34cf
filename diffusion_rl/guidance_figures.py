"""Figures and tables of the guidance study (the chapter "When guidance matters").

Everything here reads a finished study's ``summary.json`` (and its rows), so the chapter's cells stay
short and the numbers it prints come from the shipped results.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["D4RL_SCORES", "DATA_LABELS", "METHOD_LABELS", "best_versus_unguided", "d4rl_table_html", "data_label", "data_speed_range", "guidance_targets",
           "headline_table_html", "method_table_html", "objective_trials", "objective_video", "plot_data_returns", "plot_data_speeds",
           "plot_speed_tracking", "plot_steering", "settings_of", "speed_targets", "speed_tracking_lines"]

DATA_LABELS = {"walker2d/local-expert-v0": "expert", "walker2d/local-medium-replay-v0": "medium-replay",
               "walker2d/local-medium-expert-v0": "medium-expert"}
"""The return-steering data sets, in the order of the figures' panels and the tables' rows."""
METHOD_LABELS = {"unguided": "unguided", "gradient": "gradient guidance (κ)", "best-of-n": "best-of-N (N)",
                 "classifier-free": "classifier-free (w)"}

D4RL_SCORES = {
    "medium-replay": {"BC": 26.0, "Diffuser (guided)": 70.6, "Decision Diffuser": 75.0},
    "medium-expert": {"BC": 107.5, "Diffuser (guided)": 106.9, "Decision Diffuser": 108.8},
}
"""Published D4RL Walker2d scores (normalized by D4RL's own random and expert returns): BC and Decision Diffuser from
the Decision Diffuser paper's table, Diffuser from its README (medium-replay 70.6 +- 1.6, medium-expert 106.9 +- 0.2)."""


def data_label(dataset: str) -> str:
    """A data set's short name: ``medium-replay`` for ``walker2d/local-medium-replay-v0``."""
    return DATA_LABELS.get(dataset) or dataset.split("/")[-1].removeprefix("local-").removesuffix("-v0")


def settings_of(summary: dict, dataset: str | None = None, window: int | None = None, method: str | None = None) -> list[dict]:
    """The summary's settings with the given data set, window and method (None: any)."""
    out = []
    for s in summary["settings"]:
        labels = s.get("labels", {})
        if dataset is not None and labels.get("dataset") != dataset:
            continue
        if window is not None and s["window"] != window:
            continue
        if method is not None and labels.get("method") != method:
            continue
        if labels.get("target_speed") is not None or labels.get("target_height") is not None:
            continue  # the objective arms are not return steering
        out.append(s)
    return out


def plot_data_returns(profiles: dict, reference_return: float):
    """Each return-steering data set's (:data:`DATA_LABELS`) episode returns, as % of the expert data's mean return: what a
    value function can choose between."""
    import matplotlib.pyplot as plt

    profiles = {d: profiles[d] for d in DATA_LABELS if d in profiles}
    fig, axes = plt.subplots(1, len(profiles), figsize=(4.2 * len(profiles), 3.0), sharex=True, squeeze=False)
    bins = np.linspace(0, 110, 23)
    for ax, (dataset, p) in zip(axes[0], profiles.items()):
        score = 100 * np.asarray(p["returns"]) / reference_return
        ax.hist(np.clip(score, 0, 110), bins=bins, color="tab:gray")
        ax.set_title(f"{data_label(dataset)}: {p['episodes']} episodes, {p['falls']} falls", fontsize=10)
        ax.set_xlabel("episode return, % of the expert data's")
    axes[0][0].set_ylabel("episodes")
    fig.tight_layout()
    return fig


def plot_steering(summary: dict, window: int, datasets: Sequence[str] | None = None):
    """Score against each steering method's scale, one panel per data set; the unguided planner is the grey band."""
    import matplotlib.pyplot as plt

    datasets = list(datasets or DATA_LABELS)
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), sharey=True, squeeze=False)
    colors = {"gradient": "tab:blue", "best-of-n": "tab:orange", "classifier-free": "tab:green"}
    for ax, dataset in zip(axes[0], datasets):
        base = settings_of(summary, dataset, window, "unguided")
        if base:
            lo, hi = base[0]["normalized"]["ci95"]
            ax.axhspan(lo, hi, color="0.85", label="unguided (95% CI)")
            ax.axhline(base[0]["normalized"]["mean"], color="0.4", lw=1)
        for j, method in enumerate(colors):
            own = sorted(settings_of(summary, dataset, window, method), key=lambda s: s["labels"]["scale"])
            if not own:
                continue
            x = np.arange(len(own)) + 4 * j
            means = np.array([s["normalized"]["mean"] for s in own])
            ci = np.array([s["normalized"]["ci95"] for s in own]).T
            ax.errorbar(x, means, yerr=[means - ci[0], ci[1] - means], fmt="o-", color=colors[method], capsize=3,
                        label=METHOD_LABELS[method])
            for xi, s in zip(x, own):
                ax.annotate(f"{s['labels']['scale']:g}", (xi, s["normalized"]["ci95"][0]), textcoords="offset points",
                            xytext=(0, -12), ha="center", fontsize=8, color=colors[method])
        ax.set_title(f"{data_label(dataset)} data, k = {window}")
        ax.set_xticks([])
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("score, % of the expert data's return")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def best_versus_unguided(summary: dict) -> list[dict]:
    """The study's headline comparisons: the tuning seeds' best steering setting minus unguided, per data set and window."""
    settings = {s["name"]: s for s in summary["settings"]}
    out = []
    for c in summary["comparisons"]:
        best, base = settings[c["treatment"]], settings[c["baseline"]]
        out.append({"dataset": best["labels"]["dataset"], "window": best["window"], "setting": c["treatment"],
                    "method": best["labels"]["method"], "scale": best["labels"]["scale"],
                    "unguided": base["normalized"]["mean"], "best": best["normalized"]["mean"],
                    "difference": c["normalized"]["mean"], "ci95": c["normalized"]["ci95"],
                    "falls": (base["falls"], best["falls"]), "episodes": best["episodes"]})
    return out


def headline_table_html(summary: dict) -> str:
    """The headline comparisons as an HTML table: unguided, the tuning seeds' choice, their paired difference and falls."""
    head = ("<tr><th>data</th><th>k</th><th>unguided</th><th>steered (the tuning seeds' choice)</th>"
            "<th>difference [paired 95% CI]</th><th>falls, unguided / steered</th></tr>")
    rows = []
    for row in best_versus_unguided(summary):
        lo, hi = row["ci95"]
        rows.append(f"<tr><td>{DATA_LABELS.get(row['dataset'], row['dataset'])}</td><td>{row['window']}</td>"
                    f"<td>{row['unguided']:.1f}</td><td>{row['best']:.1f} ({row['method']}, {row['scale']:g})</td>"
                    f"<td>{row['difference']:+.1f} [{lo:+.1f}, {hi:+.1f}]</td>"
                    f"<td>{row['falls'][0]} / {row['falls'][1]} of {row['episodes']}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def method_table_html(summary: dict, window: int) -> str:
    """Every data set's score, falls and planning cost for each method and scale at window k, as an HTML table."""
    head = "<tr><th>data</th><th>method</th><th>scale</th><th>score [95% CI]</th><th>falls</th><th>denoiser evals / step</th></tr>"
    rows = []
    for dataset in DATA_LABELS:
        for method in METHOD_LABELS:
            for s in sorted(settings_of(summary, dataset, window, method), key=lambda s: s["labels"]["scale"] or 0):
                lo, hi = s["normalized"]["ci95"]
                scale = "" if s["labels"]["scale"] is None else f"{s['labels']['scale']:g}"
                rows.append(f"<tr><td>{DATA_LABELS[dataset]}</td><td>{method}</td><td>{scale}</td>"
                            f"<td>{s['normalized']['mean']:.1f} [{lo:.1f}, {hi:.1f}]</td><td>{s['falls']}/{s['episodes']}</td>"
                            f"<td>{s['denoiser_evals_per_step']:.1f}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def d4rl_table_html(summary: dict, window: int = 1) -> str:
    """D4RL's published Walker2d scores beside ours (unguided and the tuning seeds' best steering), normalized the D4RL way."""
    references = summary["references"]
    lo_ref, hi_ref = references["random_return"], references["expert_return"]
    chosen = {row["dataset"]: row for row in best_versus_unguided(summary) if row["window"] == window}
    settings = {s["name"]: s for s in summary["settings"]}
    rows = []
    for dataset, label in DATA_LABELS.items():
        if label not in D4RL_SCORES or dataset not in chosen:
            continue
        row = chosen[dataset]
        unguided = settings_of(summary, dataset, window, "unguided")[0]
        best = settings[row["setting"]]

        def d4rl(s):
            return 100 * (s["return"]["mean"] - lo_ref) / (hi_ref - lo_ref)

        published = ", ".join(f"{k} {v:g}" for k, v in D4RL_SCORES[label].items())
        rows.append(f"<tr><td>{label}</td><td>{published}</td><td>{d4rl(unguided):.1f}</td>"
                    f"<td>{d4rl(best):.1f} ({row['method']}, {row['scale']:g})</td></tr>")
    head = ("<tr><th>data</th><th>published (D4RL, normalized)</th><th>ours, unguided</th>"
            f"<th>ours, steered (the tuning seeds' choice, k = {window})</th></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _speed_rows(rows: list[dict], dataset: str | None = None, method: str | None = None) -> list[dict]:
    return [r for r in rows if r.get("target_speed") is not None and (method is None or r["method"] == method)
            and (dataset is None or r["dataset"] == dataset)]


def data_speed_range(profiles: dict, dataset: str) -> tuple[float, float]:
    """The 5th and 95th percentiles of a data set's per-episode mean speeds (m/s): the speeds it holds."""
    lo, hi = np.percentile(profiles[dataset]["mean_speeds"], [5, 95])
    return round(float(lo), 2), round(float(hi), 2)


def speed_targets(rows: list[dict], method: str | None = None, dataset: str | None = None) -> dict:
    """Achieved mean speed against target over the speed rows (of one data set's planner, or all): Pearson r, mean absolute
    error, falls per target."""
    speed = _speed_rows(rows, dataset, method)
    targets = sorted({r["target_speed"] for r in speed})
    per = {t: [r for r in speed if r["target_speed"] == t] for t in targets}
    achieved = np.array([np.mean([r["mean_speed"] for r in per[t]]) for t in targets])
    r = float(np.corrcoef(targets, achieved)[0, 1]) if len(targets) > 1 else float("nan")
    return {"targets": targets, "achieved": achieved.tolist(), "pearson_r": r,
            "mae": float(np.mean(np.abs(achieved - np.array(targets)))),
            "falls": {t: int(sum(x["fell"] for x in per[t])) for t in targets}, "episodes": {t: len(per[t]) for t in targets}}



def speed_tracking_lines(rows: list[dict], dataset: str) -> list[str]:
    """One line per target speed of a planner's speed rows: the target, the achieved mean speed, the falls."""
    t = speed_targets(rows, dataset=dataset)
    return [f"v* = {v:.1f} m/s: achieved {a:.2f} m/s, {t['falls'][v]} falls in {t['episodes'][v]}"
            for v, a in zip(t["targets"], t["achieved"])]


def objective_trials(tuning: dict, dataset: str) -> list[dict]:
    """The tuning stage's objective trials on one data set's planner: per way of steering and target, the achieved speed and falls."""
    out = []
    for s in tuning["settings"]:
        labels = s.get("labels", {})
        if labels.get("dataset") == dataset and labels.get("target_speed") is not None:
            out.append({"method": labels["method"], "scale": labels["scale"], "target_speed": labels["target_speed"],
                        "mean_speed": s["mean_speed"]["mean"], "falls": s["falls"], "episodes": s["episodes"]})
    return out


def _finish(fig, ax):
    """The two speed figures' common end: a legend at the top left, a light grid, a tight layout."""
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_data_speeds(profiles: dict, dataset: str):
    """One data set's episodes: mean forward speed against return, falls marked; which speeds the data walks without falling."""
    import matplotlib.pyplot as plt

    p = profiles[dataset]
    speed, ret = np.asarray(p["mean_speeds"]), np.asarray(p["returns"])
    fell = np.asarray(p.get("fell", [False] * len(speed)), dtype=bool)
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    ax.scatter(speed[~fell], ret[~fell], s=12, color="tab:blue", label="walked all 1000 steps")
    ax.scatter(speed[fell], ret[fell], s=12, marker="x", color="tab:red", label="fell")
    ax.set_xlabel("episode's mean forward speed (m/s)")
    ax.set_ylabel("episode return")
    ax.set_title(f"{data_label(dataset)} data: {p['episodes']} episodes", fontsize=10)
    return _finish(fig, ax)


def plot_speed_tracking(rows: list[dict], data_range: tuple[float, float] | None = None, dataset: str | None = None):
    """Achieved mean speed against the target speed: each episode (red if it fell), the means, and the line of perfect tracking."""
    import matplotlib.pyplot as plt

    speed = _speed_rows(rows, dataset)
    out = speed_targets(speed)
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    if data_range is not None:
        ax.axvspan(*data_range, color="0.92", label="the data's speeds (5-95%)")
    lo, hi = min(out["targets"]) - 0.3, max(out["targets"]) + 0.3
    ax.plot([lo, hi], [lo, hi], color="0.5", ls="--", lw=1, label="achieved = target")
    for r in speed:
        jitter = 0.06 * ((r["seed"] * 7919) % 11 - 5) / 5
        ax.scatter(r["target_speed"] + jitter, r["mean_speed"], s=9, alpha=0.6, color="tab:red" if r["fell"] else "tab:blue")
    ax.plot(out["targets"], out["achieved"], "ko-", label=f"mean over {max(out['episodes'].values())} episodes")
    for t, a in zip(out["targets"], out["achieved"]):
        falls = out["falls"][t]
        ax.annotate(f"{falls} fall{'' if falls == 1 else 's'}", (t, a), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xlabel("target speed v* (m/s)")
    ax.set_ylabel("achieved mean speed (m/s)")
    ax.set_title(f"r = {out['pearson_r']:.2f}, mean |error| = {out['mae']:.2f} m/s", fontsize=10)
    return _finish(fig, ax)


def objective_video(planner, arm, seed: int, steps: int = 300, every: int = 3):
    """A video of ``planner`` run as the study's ``arm`` (an objective arm, :func:`guidance_study.speed_arm`) from ``seed``,
    captioned with its speed."""
    from diffusion_rl import video
    from diffusion_rl.planner import rollout

    steered = planner.with_options(**dict(arm.planner_options))
    r = rollout(steered, [seed], window=arm.window, n_samples=arm.n_samples, guidance_scale=arm.guidance_scale,
                ddim_steps=arm.ddim_steps, max_steps=steps, record=True)[0]
    frames = video.episode_frames(r.states, r.x, every=every)
    video.caption_frames(frames, f"mean speed {r.mean_speed:.2f} m/s" + (", falls" if r.fell else ""))
    return video.show_video(frames, fps=20)


def guidance_targets(summary: dict, rows: list[dict], speed_ranges: dict[str, tuple[float, float]]) -> list[dict]:
    """The issue's targets, each measured on the evaluation seeds: which are met, with the value that decides.

    ``speed_ranges``: per data set whose planner the speed objective steered, the data's range of speeds (the
    speed targets are measured on each)."""
    out = []
    by_name = {s["name"]: s for s in summary["settings"]}
    mixed = [row for row in best_versus_unguided(summary) if row["window"] == 1 and DATA_LABELS[row["dataset"]] != "expert"]
    behaviour = summary["notes"].get("behaviour_policy", {})
    for row in mixed:
        label = DATA_LABELS[row["dataset"]]
        out.append({"target": f"{label}: best steering minus unguided >= 10 points at k = 1, paired CI above 0",
                    "value": f"{row['difference']:+.1f} [{row['ci95'][0]:+.1f}, {row['ci95'][1]:+.1f}]",
                    "met": row["difference"] >= 10 and row["ci95"][0] > 0})
        if label in behaviour:
            best = by_name[row["setting"]]["normalized"]["mean"]
            out.append({"target": f"{label}: best steering >= its best behaviour policy ({behaviour[label]:.1f})",
                        "value": f"{best:.1f}", "met": best >= behaviour[label]})
    for dataset, (lo, hi) in speed_ranges.items():
        speed = speed_targets(rows, dataset=dataset)
        if not speed["targets"]:
            continue
        label, width = data_label(dataset), hi - lo
        out += [{"target": f"{label}, speed: Pearson r >= 0.9 over {len(speed['targets'])} targets", "value": f"{speed['pearson_r']:.2f}",
                 "met": len(speed["targets"]) >= 5 and speed["pearson_r"] >= 0.9},
                {"target": f"{label}, speed: mean |error| <= 15% of the data's range ({0.15 * width:.2f} m/s)",
                 "value": f"{speed['mae']:.2f}", "met": speed["mae"] <= 0.15 * width},
                {"target": f"{label}, speed: at most 2 falls in 30 episodes at every target",
                 "value": ", ".join(f"{t:g}: {f}" for t, f in speed["falls"].items()), "met": max(speed["falls"].values()) <= 2}]
    return out
