"""The guidance chapter's figures and tables, on a small summary of the study's shape."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from diffusion_rl import guidance_figures as gf  # noqa: E402

MR = "walker2d/local-medium-replay-v0"
SPEEDS = "walker2d/local-speeds-v0"


def setting(name, method, scale, mean, k=1, falls=0, **labels):
    return {"name": name, "window": k, "episodes": 30, "falls": falls, "denoiser_evals_per_step": 5.0,
            "labels": {"dataset": MR, "method": method, "scale": scale, "target_speed": None, "target_height": None, **labels},
            "normalized": {"mean": mean, "ci95": [mean - 5, mean + 5]}, "return": {"mean": mean * 43.46, "ci95": [0, 0]}}


SUMMARY = {
    "references": {"random_return": 3.7, "expert_return": 4385.3},
    "settings": [setting("mreplay-k1-unguided", "unguided", None, 6.0, falls=30),
                 setting("mreplay-k1-gradient0.03", "gradient", 0.03, 40.0, falls=20),
                 setting("mreplay-k1-best-of-16", "best-of-n", 16, 52.0, falls=15),
                 setting("mreplay-k1-free4", "classifier-free", 4.0, 49.0, falls=20),
                 setting("mreplay-speed1", "gradient", 1.0, 30.0, target_speed=1.0)],
    "comparisons": [{"baseline": "mreplay-k1-unguided", "treatment": "mreplay-k1-best-of-16",
                     "normalized": {"mean": 46.0, "ci95": [35.0, 57.0]}}],
}


def test_settings_leave_out_the_objective_arms():
    names = [s["name"] for s in gf.settings_of(SUMMARY, MR, 1)]
    assert "mreplay-speed1" not in names and len(names) == 4
    assert [s["name"] for s in gf.settings_of(SUMMARY, MR, 1, "best-of-n")] == ["mreplay-k1-best-of-16"]


def test_the_headline_is_the_tuning_best_against_unguided():
    (row,) = gf.best_versus_unguided(SUMMARY)
    assert row["method"] == "best-of-n" and row["scale"] == 16 and row["difference"] == 46.0 and row["falls"] == (30, 15)


def test_tables_and_figures_render():
    assert "+46.0 [+35.0, +57.0]" in gf.headline_table_html(SUMMARY)
    html = gf.method_table_html(SUMMARY, 1)
    assert html.count("<tr>") == 5 and "best-of-n" in html
    d4rl = gf.d4rl_table_html(SUMMARY)
    assert "70.6" in d4rl and "medium-replay" in d4rl
    import matplotlib.pyplot as plt

    fig = gf.plot_steering(SUMMARY, 1, [MR])
    assert len(fig.axes) == 1
    plt.close(fig)  # later tests expect no open figures
    fig = gf.plot_data_returns({MR: {"episodes": 3, "falls": 2, "returns": [10.0, 500.0, 4000.0]}}, 4346.0)
    assert len(fig.axes) == 1
    plt.close(fig)


def test_speed_targets_measure_tracking_and_falls():
    rows = [{"target_speed": t, "mean_speed": t + d, "fell": int(f), "method": "gradient"}
            for t, d, f in [(1.0, 0.1, 0), (1.0, -0.1, 1), (2.0, 0.2, 0), (2.0, 0.0, 0), (3.0, -0.3, 0), (3.0, -0.1, 0)]]
    rows.append({"target_speed": None, "mean_speed": None, "fell": 0, "method": "unguided"})
    rows = [{**r, "dataset": MR} for r in rows] + [{"target_speed": 1.0, "mean_speed": 9.0, "fell": 1, "method": "gradient", "dataset": "other"}]
    out = gf.speed_targets(rows, dataset=MR)
    assert out["targets"] == [1.0, 2.0, 3.0] and out["falls"] == {1.0: 1, 2.0: 0, 3.0: 0}
    assert out["mae"] == pytest.approx((0.0 + 0.1 + 0.2) / 3) and out["pearson_r"] > 0.99
    assert gf.speed_targets(rows)["falls"][1.0] == 2  # without a data set, every planner's rows


def test_the_d4rl_table_shows_the_tuning_choice_not_the_best_on_these_seeds():
    summary = {**SUMMARY, "settings": SUMMARY["settings"] + [setting("mreplay-k1-gradient0.1", "gradient", 0.1, 80.0)]}
    html = gf.d4rl_table_html(summary)
    assert "best-of-n, 16" in html and "gradient, 0.1" not in html


def test_targets_say_which_are_met():
    summary = {**SUMMARY, "notes": {"behaviour_policy": {"medium-replay": 35.0}}}
    rows = [{"target_speed": t, "mean_speed": t, "fell": int(i < f), "seed": i, "dataset": MR}
            for t, f in [(1.0, 5), (1.5, 0), (2.0, 0), (2.5, 0), (3.0, 0)] for i in range(30)]
    rows += [{"target_speed": t, "mean_speed": 2.0 + 0.01 * t, "fell": 0, "seed": i, "dataset": SPEEDS} for t in (1.0, 2.0, 3.0) for i in range(30)]
    out = {t["target"].split(" (")[0]: t["met"] for t in gf.guidance_targets(summary, rows, {MR: (1.0, 3.0), SPEEDS: (0.5, 3.5)})}
    assert out["medium-replay: best steering minus unguided >= 10 points at k = 1, paired CI above 0"] is True
    assert out["medium-replay: best steering >= its best behaviour policy"] is True
    assert out["medium-replay, speed: Pearson r >= 0.9 over 5 targets"] is True
    assert out["medium-replay, speed: at most 2 falls in 30 episodes at every target"] is False
    assert out["speeds, speed: Pearson r >= 0.9 over 3 targets"] is False  # too few targets
    assert out["speeds, speed: mean |error| <= 15% of the data's range"] is False  # 0.67 m/s against 0.45
    assert out["speeds, speed: at most 2 falls in 30 episodes at every target"] is True
    assert gf.data_speed_range({SPEEDS: {"mean_speeds": list(np.linspace(0, 4, 101))}}, SPEEDS) == (0.2, 3.8)
    assert gf.data_label(SPEEDS) == "speeds" and gf.data_label(MR) == "medium-replay" and SPEEDS not in gf.DATA_LABELS


def test_speed_figures_render():
    import matplotlib.pyplot as plt

    rows = [{"target_speed": t, "mean_speed": t + 0.1, "fell": 0, "seed": s} for t in (1.0, 2.0) for s in range(3)]
    fig = gf.plot_speed_tracking(rows, (1.1, 3.4))
    assert fig.axes[0].get_xlabel().startswith("target speed")
    plt.close(fig)
    profiles = {MR: {"episodes": 3, "returns": [1.0, 2.0, 3.0], "mean_speeds": [1.0, 2.0, 3.0], "fell": [True, False, False]}}
    fig = gf.plot_data_speeds(profiles, MR)
    assert len(fig.axes) == 1
    plt.close(fig)


def test_objective_trials_list_one_planners_tried_ways_of_steering():
    def trial(dataset, method, scale, target, achieved, falls):
        return {"labels": {"dataset": dataset, "method": method, "scale": scale, "target_speed": target},
                "mean_speed": {"mean": achieved}, "falls": falls, "episodes": 10}

    tuning = {"settings": [trial(SPEEDS, "gradient", 1.0, 2.0, 1.9, 0), trial(SPEEDS, "inpainting", None, 2.0, 2.2, 3),
                           trial(MR, "best-of-n", 16, 2.0, 1.0, 9), {"labels": {"dataset": SPEEDS, "method": "unguided"}}]}
    out = gf.objective_trials(tuning, SPEEDS)
    assert [(t["method"], t["mean_speed"], t["falls"]) for t in out] == [("gradient", 1.9, 0), ("inpainting", 2.2, 3)]


def test_the_returns_figure_shows_only_the_return_steering_data():
    import matplotlib.pyplot as plt

    profile = {"episodes": 3, "falls": 0, "returns": [10.0, 500.0, 4000.0]}
    fig = gf.plot_data_returns({SPEEDS: profile, MR: profile}, 4346.0)
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["medium-replay"]
    plt.close(fig)
