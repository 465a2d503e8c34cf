"""The window sweep: a reduced sweep end to end, resume, worker-count invariance, statistics, figures."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from conftest import module_dataset, tiny_common, tiny_runs

from diffusion_rl import analysis, figures, sweep
from diffusion_rl.planner import rollout
from diffusion_rl.training import DiffuserConfig, ValueConfig

matplotlib.use("Agg")

DATA = "walker2d/sweep-tiny-v0"
COMMON = tiny_common(DATA)
RESULT_FILES = sweep.RESULT_FILES


# One tiny dataset for the whole module (an untrained policy: short episodes that fall).
shared_root, minari_root = module_dataset(DATA)


@pytest.fixture(scope="module")
def cfg(shared_root, tmp_path_factory):
    """The reduced sweep of the acceptance checks: 2 windows x 2 episodes x 50 steps (+ a guided row)."""
    d, v = tiny_runs(shared_root, tmp_path_factory, DiffuserConfig(total_steps=80, checkpoint_every=80, **COMMON),
                     ValueConfig(total_steps=40, checkpoint_every=40, **COMMON))
    return sweep.SweepConfig(windows="1,4", guided_windows="4", episodes=2, max_steps=50, workers=1, diffuser=str(d), value=str(v))


@pytest.fixture(scope="module")
def done(cfg, shared_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(shared_root))
        sweep.run_sweep(cfg, out, command="test", progress=False)
    return out


def test_reduced_sweep_writes_every_result_file(done):
    for name in RESULT_FILES:
        assert (done / name).is_file(), name
    res = sweep.load_results(done)
    assert set(res.meta["files_sha256"]) == set(RESULT_FILES)  # what load_results checks
    assert len(res.episodes) == 6
    assert {(e["setting"], e["seed"]) for e in res.episodes} == {(s, seed) for s in ("k1", "k4", "k4-guided") for seed in (10000, 10001)}
    for e in res.episodes:
        assert 1 <= e["length"] <= 50
        assert e["fell"] == (e["length"] < 50)  # the untrained planner falls: the fall analysis runs too
        assert math.isclose(e["normalized"], 100 * e["return"] / res.summary["references"]["data_mean_return"], rel_tol=1e-4)
    assert res.meta["runs"][-1]["episodes_run"] == 6


def test_summary_has_intervals_falls_and_trend(done):
    res = sweep.load_results(done)
    for s in res.summary["settings"]:
        for key in ("return", "normalized", "value_rate", "d4rl_normalized_d4rl_refs"):
            lo, hi = s[key]["ci95"]
            assert lo <= s[key]["mean"] <= hi, (s["setting"], key)
        lo, hi = s["fall_rate"]["ci95"]
        assert 0 <= lo <= s["fall_rate"]["mean"] <= hi <= 1
        assert s["falls"] == sum(e["fell"] for e in res.episodes if e["setting"] == s["setting"])
    ref = res.summary["references"]
    e = res.episodes[0]
    assert math.isclose(e["d4rl_normalized_d4rl_refs"], 100 * (e["return"] - 1.629008) / (4592.3 - 1.629008), abs_tol=1e-4)
    assert ("d4rl_normalized" in e) == (ref["expert_return"] is not None)  # the tiny data has no expert reference
    assert 0 < res.summary["trend"]["unguided"]["p_value"] <= 1
    assert [g["window"] for g in res.summary["guided_minus_unguided"]] == [4]
    assert {r["setting"] for r in res.drift} == {"k1", "k4", "k4-guided"}
    assert max(r["offset"] for r in res.drift if r["setting"] == "k1") == 1  # only executed steps are compared
    assert any(r["phase"] == "before_fall" for r in res.shift)


def test_recorded_episode_replays_alone(cfg, done):
    """An episode from the batched sweep gives the same return when run on its own."""
    res = sweep.load_results(done)
    row = next(e for e in res.episodes if e["setting"] == "k4-guided" and e["seed"] == 10001)
    planner, _ = sweep.load_sweep_planner(cfg)
    (alone,) = rollout(planner, [10001], window=4, guidance_scale=cfg.guidance_scale, max_steps=50)
    assert round(alone.total_return, 3) == row["return"]
    assert alone.length == row["length"]


def test_analysis_alone_keeps_the_recorded_hashes_true(cfg, done, tmp_path):
    out = shutil.copytree(done, tmp_path / "again")
    meta = json.loads((out / "sweep.json").read_text())
    meta["files_sha256"]["shift.csv"] = "0" * 64  # as if an older analysis had written another shift.csv
    (out / "sweep.json").write_text(json.dumps(meta))
    planner, _ = sweep.load_sweep_planner(cfg)
    sweep.analyse_sweep(out, planner, cfg.settings(planner.horizon), cfg.seeds())  # called directly, not by run_sweep
    assert sweep.load_results(out).meta["files_sha256"] == sweep.result_hashes(out)


def test_resume_keeps_finished_episodes(cfg, done, tmp_path):
    out = tmp_path / "resume"
    sweep.run_sweep(cfg, out, progress=False)
    first = {p.name: p.stat().st_mtime_ns for p in (out / "episodes").iterdir()}
    victim = out / "episodes" / "k4-s10000.npz"
    victim.unlink()
    (out / "summary.json").unlink()
    sweep.run_sweep(cfg, out, progress=False)
    assert sweep.load_results(out).meta["runs"][-1]["episodes_run"] == 1
    for p in (out / "episodes").iterdir():
        if p.name != victim.name:
            assert p.stat().st_mtime_ns == first[p.name], p.name  # untouched
    for name in ("episodes.csv", "summary.json", "drift.csv", "shift.csv"):
        assert (out / name).read_bytes() == (done / name).read_bytes(), name  # identical results


def test_worker_count_does_not_change_results(cfg, done, tmp_path):
    from dataclasses import replace

    out = tmp_path / "two"
    sweep.run_sweep(replace(cfg, workers=2), out, progress=False)
    for name in ("episodes.csv", "summary.json", "drift.csv", "shift.csv"):
        assert (out / name).read_bytes() == (done / name).read_bytes(), name


def test_sweep_refuses_mixing_and_bad_windows(cfg, done):
    from dataclasses import replace

    with pytest.raises(ValueError, match="other settings"):
        sweep.run_sweep(replace(cfg, episodes=3), done, progress=False)
    with pytest.raises(ValueError, match=r"1\.\.4"):
        sweep.run_sweep(replace(cfg, windows="1,5"), done / "x", progress=False)
    assert sweep.parse_windows("2-4,1", 4) == [1, 2, 3, 4]
    assert sweep.parse_windows("none", 4) == []
    with pytest.raises(ValueError, match="all"):
        sweep.parse_windows("one", 4)
    with pytest.raises(FileNotFoundError, match="sweep --out"):
        sweep.load_results(done / "missing")


def test_figures_and_table_draw(done):
    import matplotlib.pyplot as plt

    res = sweep.load_results(done)
    for make in (figures.plot_window_scores, figures.plot_episode_scatter, figures.plot_drift, figures.plot_shift):
        fig = make(res)
        assert fig.axes
        plt.close(fig)
    rows = figures.window_table(res)
    assert [r["setting"] for r in rows] == ["k1", "k4", "k4-guided"]
    assert rows[1]["study's window"] == 3
    table = figures.window_table_html(res)
    assert table.count("<tr>") == 2 * 4  # two tables of a header and three settings
    assert all(f"<th>{h}</th>" in table.replace("&#x27;", "'") for h in rows[0] if h != "setting")  # every column shown


def test_cli_sweep_prints_the_table(cfg, tmp_path, capsys):
    from diffusion_rl.cli import main

    rc = main(["sweep", "--out", str(tmp_path / "cli"), "--diffuser", cfg.diffuser, "--value", cfg.value, "--windows", "2",
               "--guided-windows", "none", "--episodes", "2", "--max-steps", "20", "--workers", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "k2" in out and "% of data" in out
    assert main(["sweep", "--out", str(tmp_path / "bad"), "--diffuser", cfg.diffuser, "--windows", "0", "--no-progress"]) == 2


def test_a_sweep_under_pushes_records_them_in_its_spec_rows_and_summary(cfg, tmp_path, capsys):
    from diffusion_rl.cli import main

    out = tmp_path / "pushed"
    args = ["sweep", "--out", str(out), "--diffuser", cfg.diffuser, "--value", cfg.value, "--windows", "2", "--guided-windows", "none",
            "--episodes", "2", "--max-steps", "20", "--workers", "1", "--no-progress", "--push-force", "300", "--push-interval", "10"]
    assert main(args) == 0
    pushed = {"push_force": 300.0, "push_duration": 5, "push_interval": 10, "torso_mass": 1.0, "friction": 1.0}
    assert json.loads((out / "sweep.json").read_text())["spec"]["disturbance"] == pushed
    assert json.loads((out / "summary.json").read_text())["disturbance"] == pushed
    rows = sweep.load_results(out).episodes
    assert all(r["push_force"] == 300.0 and r["push_interval"] == 10 for r in rows)
    # The same folder with another force is another sweep: refused, not mixed in.
    assert main([*args[:-4], "--push-force", "100", "--push-interval", "10"]) == 2
    assert "other settings" in capsys.readouterr().err


# ----------------------------------------------------------------------------- statistics


def test_bootstrap_and_wilson_intervals():
    rng = np.random.default_rng(1)
    x = rng.normal(10, 2, 400)
    lo, hi = analysis.bootstrap_ci(x)
    assert lo < x.mean() < hi and hi - lo < 0.5  # about 2 * 1.96 * 2 / 20 = 0.39
    lo30, hi30 = analysis.bootstrap_ci(x[:30])
    assert hi30 - lo30 > hi - lo
    lo, hi = analysis.wilson_ci(0, 10)
    assert lo == 0.0 and math.isclose(hi, 0.2775, abs_tol=1e-3)
    assert analysis.wilson_ci(30, 30)[1] == 1.0
    lo, hi = analysis.wilson_ci(5, 10)
    assert math.isclose(lo, 0.2366, abs_tol=1e-3) and math.isclose(hi, 0.7634, abs_tol=1e-3)


def test_a_bootstrap_interval_of_one_value_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        analysis.bootstrap_ci([3.0])


def test_within_seed_trend_test_respects_the_design_and_gains_power():
    rng = np.random.default_rng(0)
    seeds = np.tile(np.arange(30), 8)
    k = np.repeat(np.arange(1, 9), 30)
    # Seeds differ a lot (some are hard at every window); the trend is small next to that spread.
    ease = rng.normal(0, 20, 30)[seeds]
    y = 100 - 0.8 * k + ease + rng.normal(0, 3, k.size)
    pooled = analysis.trend_test(k, y)
    within = analysis.within_seed_trend_test(k, y, seeds)
    assert within["spearman_rho"] == pooled["spearman_rho"] and within["slope"] == pooled["slope"]
    assert within["p_value"] < 0.01 < pooled["p_value"], (within["p_value"], pooled["p_value"])
    assert within["slope_ci95"][0] < -0.8 < within["slope_ci95"][1] and within["seeds"] == 30
    # Under the null (no trend) it does not find one.
    null = analysis.within_seed_trend_test(k, ease + rng.normal(0, 3, k.size), seeds)
    assert null["p_value"] > 0.01
    with pytest.raises(ValueError):
        analysis.within_seed_trend_test([1, 2], [1.0, 2.0], [0, 0])


def test_trend_test_finds_a_trend_and_not_noise():
    rng = np.random.default_rng(0)
    k = np.repeat(np.arange(1, 9), 30)
    falling = analysis.trend_test(k, 100 - 3 * k + rng.normal(0, 5, k.size))
    assert falling["spearman_rho"] < -0.5 and falling["p_value"] < 0.001
    assert falling["slope_ci95"][0] < -3 < falling["slope_ci95"][1]
    noise = analysis.trend_test(k, rng.normal(0, 5, k.size))
    assert noise["p_value"] > 0.01
    assert math.isclose(analysis.spearman_rho([1, 2, 3, 4], [10, 20, 30, 40]), 1.0)
    assert math.isclose(analysis.spearman_rho([1, 2, 3, 4], [4, 3, 3, 1]), -0.9486833, abs_tol=1e-6)


def test_plan_drift_and_nearest_data_distance():
    rng = np.random.default_rng(0)
    states = rng.normal(size=(11, 3))
    plans = np.stack([states[p : p + 4] for p in (0, 4, 8) if p + 4 <= 11] + [np.vstack([states[8:11], states[10:11]])])
    drift = analysis.plan_drift(states, plans, np.array([0, 4, 8]), window=4, scale=np.ones(3))
    assert drift.shape == (3, 3)
    assert np.allclose(drift[:2], 0) and np.allclose(drift[2, :2], 0) and np.isnan(drift[2, 2])  # episode ended
    off = analysis.plan_drift(states, plans + 0.5, np.array([0, 4, 8]), window=2, scale=np.full(3, 0.5))
    assert np.allclose(off[:, :2], 1.0) and np.isnan(off[:, 2]).all()  # beyond the executed window: not compared
    data = rng.normal(size=(500, 3))
    query = np.vstack([data[:5], rng.normal(size=(20, 3)) * 3])
    got = analysis.nearest_data_distance(query, data, np.ones(3), chunk=7)
    brute = np.sqrt(((query[:, None] - data[None]) ** 2).sum(-1).min(1) / 3)
    assert np.allclose(got[:5], 0, atol=1e-3) and np.allclose(got, brute, atol=1e-3)  # float32: about 1e-3
