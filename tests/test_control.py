"""Controllers: the fixed window is the old rule bit for bit; the state-error trigger's limits; bad options."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffusion_rl import pretrained
from diffusion_rl.control import FixedWindow, StateError, controller_from_name
from diffusion_rl.planner import rollout


@pytest.fixture(scope="module")
def planner():
    return pretrained.load("walker2d-h8", device="cpu")


def same(a, b) -> bool:
    return [(r.total_return, r.length, r.fell, r.n_plans) for r in a] == [(r.total_return, r.length, r.fell, r.n_plans) for r in b]


def test_a_fixed_window_controller_is_the_window_rule_bit_for_bit(planner, foreign_cpu):
    """The scored k = 8 episodes replay to the shipped sidecar's returns through the controller layer too."""
    score = planner.meta["score"]["unguided_k8"]
    seeds = [score["seeds"][0], score["seeds"][7]]
    results = rollout(planner, seeds, controller=FixedWindow(8))
    assert all(r.n_plans == math.ceil(r.length / 8) and r.denoiser_evals == 20 * r.n_plans for r in results)
    if foreign_cpu:
        pytest.skip(foreign_cpu)
    assert [round(r.total_return, 2) for r in results] == [score["returns"][0], score["returns"][7]]


def test_threshold_zero_is_k1_and_infinity_is_kH(planner):
    seeds = [10_000, 10_001]
    assert same(rollout(planner, seeds, controller=StateError(0.0), max_steps=60), rollout(planner, seeds, window=1, max_steps=60))
    assert same(rollout(planner, seeds, controller=StateError(math.inf), max_steps=120), rollout(planner, seeds, window=8, max_steps=120))


def test_a_middle_threshold_replans_between_the_two(planner):
    (r,) = rollout(planner, [10_002], controller=StateError(0.3), max_steps=200)
    assert 200 / 8 < r.n_plans < 200 and r.controller == "state-error-0.3" and r.window == 8


def test_controllers_do_not_depend_on_their_batch_mates(planner):
    """An adaptive episode that shares its denoiser calls with others gives the same result alone."""
    mixed = rollout(planner, [10_003, 10_004, 10_005], controller=[StateError(0.3), FixedWindow(2), StateError(0.1)], max_steps=80)
    alone = rollout(planner, [10_003], controller=StateError(0.3), max_steps=80)
    assert same(mixed[:1], alone)


def test_the_default_controller_does_not_depend_on_how_episodes_are_batched(planner):
    d = pretrained.DEFAULT_CONTROL["walker2d-h8"]

    def run(seeds):
        c = controller_from_name(d["controller"], window=d["window"], threshold=d["threshold"])
        return rollout(planner, seeds, controller=c, ddim_steps=d["ddim_steps"], warm_start=d["warm_start"], max_steps=60)

    together = run([10_003, 10_004, 10_005, 10_006])
    assert same(together, [run([s])[0] for s in (10_003, 10_004, 10_005, 10_006)])
    assert same(together[2:], run([10_005, 10_006]))


@pytest.mark.parametrize("bad, match", [
    (lambda: StateError(-0.1), ">= 0"), (lambda: StateError(float("nan")), ">= 0"), (lambda: FixedWindow(2.5), "integer"), (lambda: FixedWindow(0).bind(8, np.ones(17)), "1..8"),
    (lambda: controller_from_name("oracle"), "Unknown controller"),
    (lambda: controller_from_name("fixed", window=2, threshold=0.3), "not --threshold"),
    (lambda: controller_from_name("state-error", window=2, threshold=0.3), "not --window"),
    (lambda: controller_from_name("state-error"), "needs --threshold"),
])
def test_bad_controller_options_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_window_and_controller_together_or_a_window_past_h_are_refused(planner):
    with pytest.raises(ValueError, match="not both"):
        rollout(planner, [0], window=2, controller=FixedWindow(2), max_steps=3)
    with pytest.raises(ValueError, match="1..8"):
        rollout(planner, [0], controller=FixedWindow(9), max_steps=3)


def test_state_error_measures_in_data_standard_deviations():
    c = StateError(1.0).bind(8, np.array([1.0, 2.0]))
    c.new_plan(np.zeros((8, 1)), np.zeros((8, 2)))
    assert c.wants_plan(np.array([5.0, 5.0])) is False  # offset 0: the plan starts at the real state
    c.advance()
    assert math.isclose(c.error(np.array([1.0, 2.0])), 1.0)
    assert not c.wants_plan(np.array([1.0, 2.0])) and c.wants_plan(np.array([1.5, 2.0]))


# ----------------------------------------------------------------------------- warm start


def test_shift_plan_drops_the_executed_rows_and_repeats_the_last():
    import torch

    from diffusion_rl.planner import shift_plan

    plan = torch.arange(8.0)[:, None].repeat(1, 3)
    assert shift_plan(plan, 3)[:, 0].tolist() == [3, 4, 5, 6, 7, 7, 7, 7]
    assert shift_plan(plan, 0)[:, 0].tolist() == list(range(8))
    assert shift_plan(plan, 8)[:, 0].tolist() == [7] * 8


def test_a_warm_start_of_all_levels_is_a_fresh_plan_in_distribution():
    import torch

    from diffusion_rl.diffusion import GaussianDiffusion
    from diffusion_rl.models import TemporalUnet, UNetConfig

    torch.manual_seed(0)
    diff = GaussianDiffusion(TemporalUnet(UNetConfig(23, 8, dim=8, dim_mults=(1, 2))), 6, 20)
    state = torch.zeros(4000, 17)
    fresh = diff.sample(state, generator=torch.Generator().manual_seed(1)).trajectories
    guess = torch.full((4000, 8, 23), 2.0)  # a confident guess: n = N must forget it
    warm = diff.sample(state, generator=torch.Generator().manual_seed(2), warm_start=(guess, 20)).trajectories
    assert (fresh.mean(0) - warm.mean(0)).abs().max() < 0.05
    assert (fresh.std(0) - warm.std(0)).abs().max() < 0.05
    # Few levels keep the guess: the plan stays near it.
    near = diff.sample(state, generator=torch.Generator().manual_seed(2), warm_start=(guess, 2)).trajectories
    assert (near[:, 1:] - guess[:, 1:]).abs().mean() < (fresh[:, 1:] - guess[:, 1:]).abs().mean()


def test_warm_started_replans_cost_n_levels(planner):
    (r,) = rollout(planner, [10_006], window=2, warm_start=4, max_steps=20)
    assert r.n_plans == 10 and r.denoiser_evals == 20 + 9 * 4
    (d,) = rollout(planner, [10_006], window=2, warm_start=4, ddim_steps=2, max_steps=20)
    assert d.denoiser_evals == 2 * 10


@pytest.mark.parametrize("kw, match", [({"warm_start": 0}, "1..20"), ({"warm_start": 21}, "1..20"),
                                       ({"warm_start": 3, "ddim_steps": 5}, "1..3")])
def test_bad_warm_starts_are_refused(planner, kw, match):
    with pytest.raises(ValueError, match=match):
        rollout(planner, [0], window=2, max_steps=3, **kw)


# ----------------------------------------------------------------------------- the likelihood (RDM-style) trigger


def test_the_denoiser_finds_a_plan_from_elsewhere_implausible(planner):
    import torch

    obs = planner.plan(np.zeros(17), seed=0).observations[0]  # any reachable state
    states = np.stack([obs, obs])
    plan = planner.plan(states, seed=1)
    other = planner.plan(states + np.r_[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, np.zeros(8)], seed=1)  # 3 m/s faster
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    own = planner.plan_error(states, plan.trajectories, 5, gens)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    foreign = planner.plan_error(states, other.trajectories, 5, gens)
    assert (own < foreign).all(), (own, foreign)


def test_likelihood_thresholds_span_k1_to_kH_and_count_the_probes(planner):
    from diffusion_rl.control import Likelihood

    every, never = rollout(planner, [10_007, 10_007], controller=[Likelihood(0.0), Likelihood(math.inf)], max_steps=40)
    assert every.n_plans == 40 and every.denoiser_evals == 40 * 20 + 39  # each step after the first: a probe, then a plan
    assert never.n_plans == 5 and never.denoiser_evals == 5 * 20 + 5 * 7  # whole plans, probed at offsets 1..7
    with pytest.raises(ValueError, match=">= 0"):
        Likelihood(-1.0)


# ----------------------------------------------------------------------------- the control study's tools


def test_the_pareto_front_keeps_only_unbeaten_points():
    from diffusion_rl.analysis import pareto_front

    cost = [20.0, 2.5, 1.0, 0.2, 0.5, 0.2]
    score = [101.0, 65.0, 100.0, 99.0, 98.0, 90.0]
    assert pareto_front(cost, score) == [3, 2, 0]  # 0.5 (98) loses to 0.2 (99); 2.5 (65) to 1.0 (100); ties on cost keep the better


def test_the_replanning_trace_is_what_the_state_error_controller_saw(planner):
    from diffusion_rl.analysis import replanning_trace

    tau = 0.3
    r = rollout(planner, [10_001], controller=StateError(tau), ddim_steps=1, max_steps=60, record=True)[0]
    trace = replanning_trace(r.states, r.plans[..., planner.action_dim:], r.plan_steps, planner.obs_normalizer.scale)
    replans = set(r.plan_steps.tolist())
    for t in range(1, r.length):
        ran_out = t - max(p for p in replans if p < t) >= planner.horizon
        # The state-error controller replans exactly where the trace it saw crosses tau (or the plan ran out).
        assert (t in replans) == (ran_out or trace[t] > tau), t
    assert np.isnan(trace[0])


def test_the_default_is_the_cheapest_setting_that_keeps_98_percent():
    from diffusion_rl.studies import choose_default

    def s(name, score, evals, controller="state-error"):
        return {"name": name, "normalized": {"mean": score}, "denoiser_evals_per_step": evals, "controller": controller,
                "window": None, "threshold": 0.3, "ddim_steps": 1, "warm_start": None}

    summary = {"settings": [s("fixed-k1-ddpm20", 100.0, 20.0, "fixed"), s("a", 97.9, 0.1), s("b", 98.0, 0.3), s("c", 99.5, 0.2),
                            s("d", 101.0, 0.2)]}
    assert choose_default(summary)["setting"] == "d"  # c and d cost the same: the better score wins; a misses the bar
    with pytest.raises(ValueError, match="No setting"):
        choose_default(summary, keep=1.02)


def test_the_shipped_default_controller_is_the_one_the_tuning_seeds_chose():
    from diffusion_rl.studies import choose_default, load_study

    _, tuning = load_study("control", "tuning")
    _, summary = load_study("control")
    chosen = choose_default(tuning)
    assert summary["notes"]["default"] == chosen
    assert pretrained.DEFAULT_CONTROL["walker2d-h8"] == {k: chosen[k] for k in ("controller", "window", "threshold", "ddim_steps", "warm_start")}


def test_the_control_study_has_every_setting_on_the_same_30_seeds():
    from diffusion_rl.studies import load_study

    rows, summary = load_study("control")
    seeds = {}
    for r in rows:
        seeds.setdefault(r["setting"], []).append(r["seed"])
    assert set(seeds) == {s["name"] for s in summary["settings"]}
    assert all(v == list(range(10_000, 10_030)) for v in seeds.values())
    for col in ("setting", "controller", "seed", "return", "normalized", "fell", "env_steps", "plans", "denoiser_evals"):
        assert col in rows[0]
    k8 = [r for r in rows if r["setting"] == "fixed-k8-ddpm20"]
    window_sweep = [r for r in load_window_sweep_rows() if r["window"] == 8]
    # The same episodes as the window sweep's k = 8: the controller layer is the old rule, bit for bit.
    assert [r["return"] for r in k8] == [round(r["return"], 3) for r in sorted(window_sweep, key=lambda r: r["seed"])]


def load_window_sweep_rows() -> list[dict]:
    from diffusion_rl import sweep

    return [{"window": e["window"], "guidance_scale": e["guidance_scale"], "seed": e["seed"], "return": e["return"]}
            for e in sweep.load_results().episodes if e["setting"] == f"k{e['window']}"]


def test_the_chapter_figures_and_tables_draw_from_the_shipped_study():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusion_rl import control_figures as cf
    from diffusion_rl.studies import load_study

    _, summary = load_study("control")
    front = cf.front(summary)
    costs = [s["denoiser_evals_per_step"] for s in front]
    assert costs == sorted(costs) and len(front) >= 2
    assert all(a["normalized"]["mean"] < b["normalized"]["mean"] for a, b in zip(front, front[1:]))
    assert cf.control_table_html(summary).count("<tr>") == len(front) + 1
    assert cf.comparisons_html(summary).count("<tr>") == len(summary["comparisons"]) + 1
    assert {cf.family(s) for s in summary["settings"]} == set(cf.FAMILIES)
    fig = cf.plot_front(summary)
    assert len(fig.axes) == 2
    plt.close(fig)
