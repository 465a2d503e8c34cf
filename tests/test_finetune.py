"""Fine-tuning the denoising chain with PPO (DPPO): the chain's log-probabilities, GAE, exact resume
after a SIGKILL, refusal of bad options and changed resumes, and the exported planner."""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kill_at_first_checkpoint

from diffusion_rl import finetune as ft
from diffusion_rl import pretrained
from diffusion_rl.checkpoint import CheckpointError, load_checkpoint
from diffusion_rl.cli import main
from diffusion_rl.models import LevelSplit, TemporalUnet, UNetConfig

TINY = ft.FinetuneConfig(window=4, finetune_steps=2, n_envs=2, iterations=3, max_episode_steps=16, update_epochs=1,
                         minibatch_size=8, critic_warmup=1, critic_hidden=16, snapshot_every=2, actor_lr=1e-4)
CLI_ARGS = ["--window", "4", "--finetune-steps", "2", "--n-envs", "2", "--iterations", "3", "--max-episode-steps", "16",
            "--update-epochs", "1", "--minibatch-size", "8", "--critic-warmup", "1", "--critic-hidden", "16",
            "--snapshot-every", "2", "--actor-lr", "0.0001", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dppo")
    ft.finetune(TINY, out, progress=False)
    return out


def test_a_run_writes_its_curve_snapshots_and_moves_the_tuned_steps_only(run):
    curve = ft.read_curve(run)
    assert [r["iteration"] for r in curve] == [1, 2, 3]
    assert all(r["env_steps"] > 0 and 0 <= r["fall_rate"] <= 1 for r in curve)
    assert curve[0]["approx_kl"] == 0 and curve[1]["approx_kl"] != 0, "the first iteration trains only the critic"
    assert (run / "snapshots" / "iter-0002.safetensors").exists()
    state = load_checkpoint(run / "checkpoint.pt", kind="finetune")
    base = pretrained.load_network(pretrained.asset_path("walker2d-h8"))[0].model.state_dict()
    assert any(not torch.equal(state["tuned"][k], base[k]) for k in base), "the actor update changed the tuned copy"


def test_sigkill_then_rerun_ends_bit_identical(run, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "diffusion_rl", "finetune", "--run-dir", str(out), *CLI_ARGS]
    kill_at_first_checkpoint(args, out / "checkpoint.pt")
    assert 0 < load_checkpoint(out / "checkpoint.pt")["iteration"] < TINY.iterations, "the kill should land mid-run"
    subprocess.run(args, check=True, capture_output=True)
    a, b = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(run / "checkpoint.pt")
    for part in ("tuned", "critic"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    strip = [{k: v for k, v in r.items() if k != "wall_time_s"} for r in ft.read_curve(out)]
    assert strip == [{k: v for k, v in r.items() if k != "wall_time_s"} for r in ft.read_curve(run)]


def test_resuming_with_changed_options_names_both_values(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    before = (copy / "checkpoint.pt").read_bytes()
    args = ["finetune", "--run-dir", str(copy), *CLI_ARGS]
    changed = [*args[:args.index("--actor-lr")], "--actor-lr", "0.0002", "--no-progress"]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "--actor-lr was 0.0001, now 0.0002" in err and len(err.strip().splitlines()) == 1
    assert (copy / "checkpoint.pt").read_bytes() == before
    # iterations may grow: the run continues where it stopped
    more = [*args[:args.index("--iterations")], "--iterations", "4", *args[args.index("--iterations") + 2:]]
    assert main(more) == 0
    assert [r["iteration"] for r in ft.read_curve(copy)] == [1, 2, 3, 4]


@pytest.mark.parametrize("option, value, says", [
    ("--finetune-steps", "0", "--finetune-steps (K) must be an integer in 1..20"),
    ("--finetune-steps", "21", "1..20"),
    ("--window", "9", "--window must be an integer in 1..8"),
    ("--window", "0", "1..8"),
    ("--clip", "nan", "--clip must be a finite number > 0"),
    ("--clip", "-0.1", "--clip must be"),
    ("--actor-lr", "nan", "--actor-lr must be"),
    ("--critic-lr", "-1", "--critic-lr must be"),
    ("--std-floor", "-0.1", "--std-floor must be"),
    ("--std-floor", "nan", "--std-floor must be"),
    ("--gamma", "1.5", "--gamma must be in [0, 1]"),
    ("--anchor-coef", "nan", "--anchor-coef must be"),
    ("--max-push", "-1", "--max-push must be a finite number >= 0"),
    ("--max-push", "nan", "--max-push must be"),
    ("--fall-penalty", "-5", "--fall-penalty must be a finite number >= 0"),
    ("--fall-penalty", "nan", "--fall-penalty must be"),
    ("--log-prob", "plan-mean", "--log-prob must be one of plan-sum, action-mean, action-sum"),
    ("--anchor-on", "actions", "--anchor-on must be one of plan, states"),
])
def test_bad_options_exit_2_and_write_nothing(tmp_path, capsys, option, value, says):
    out = tmp_path / "run"
    assert main(["finetune", "--run-dir", str(out), option, value, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def _parse_error(argv: list[str], capsys) -> str:
    """argparse's refusal of ``argv``: exit code 2 and one line on stderr, returned."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    return err


def test_a_negative_rate_in_e_notation_reaches_its_check_and_parse_errors_take_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--run-dir", str(out), "--actor-lr", "-1e-5", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == "error: --actor-lr must be a finite number > 0, got -1e-05."
    assert "invalid int value: 'x'" in _parse_error(["finetune", "--run-dir", str(out), "--window", "x"], capsys)
    assert not out.exists()


def test_with_the_last_step_pretrained_k_counts_the_levels_above_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--run-dir", str(out), "--pretrained-last-step", "True", "--finetune-steps", "20", "--no-progress"]) == 2
    assert "--finetune-steps (K) must be an integer in 1..19, got 20." in capsys.readouterr().err
    err = _parse_error(["finetune", "--run-dir", str(out), "--pretrained-last-step", "maybe"], capsys)
    assert "expected true or false, got 'maybe'" in err
    assert not out.exists()


def test_an_anchor_placed_without_a_coefficient_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--run-dir", str(out), "--anchor-on", "states", "--no-progress"]) == 2
    assert "--anchor-on states needs --anchor-coef > 0" in capsys.readouterr().err
    assert not out.exists()


def test_a_base_planner_that_fails_its_sha256_is_refused(tmp_path, monkeypatch, capsys):
    import shutil

    assets = tmp_path / "assets"
    shutil.copytree(pretrained.ASSETS, assets, ignore=shutil.ignore_patterns("*_study", "window_sweep"))
    data = bytearray((assets / "walker2d-h8-diffuser.safetensors").read_bytes())
    data[-1] ^= 1
    (assets / "walker2d-h8-diffuser.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(pretrained, "ASSETS", assets)
    out = tmp_path / "run"
    assert main(["finetune", "--run-dir", str(out), *CLI_ARGS]) == 2
    assert "does not match the SHA-256" in capsys.readouterr().err
    assert not out.exists()


def test_step_log_prob_is_the_gaussian_density_up_to_a_constant():
    diffusion = pretrained.load_network(pretrained.asset_path("walker2d-h8"))[0]
    g = torch.Generator().manual_seed(0)
    x_in, x_out = torch.randn(5, 8, 23, generator=g), torch.randn(5, 8, 23, generator=g)
    level, std = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    mask = ft._free_mask(diffusion)
    logp, mean = ft.step_log_prob(diffusion, x_in, x_out, level, std, mask)
    exact = torch.distributions.Normal(mean, std[:, None, None]).log_prob(x_out)
    constant = (mask * (torch.log(std[:, None, None]) + 0.5 * math.log(2 * math.pi))).sum((1, 2))
    torch.testing.assert_close(logp - constant, (exact * mask).sum((1, 2)))
    assert mask[0, 6:].sum() == 0 and mask.sum() == 8 * 23 - 17, "the conditioned first state is written, not drawn"


def test_the_action_mean_ratio_averages_the_executed_actions_only():
    diffusion = pretrained.load_network(pretrained.asset_path("walker2d-h8"))[0]
    assert torch.equal(ft.ratio_weights(diffusion, "plan-sum", 4), ft._free_mask(diffusion)), "plan-sum: the exact density"
    w = ft.ratio_weights(diffusion, "action-mean", 3)
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-6), "a mean, so a step's ratio does not grow with its dimensions"
    assert torch.all(w[:3, :6] > 0) and w[3:].sum() == 0 and w[:, 6:].sum() == 0, "the executed actions, nothing else"
    g = torch.Generator().manual_seed(1)
    x_in, x_out = torch.randn(4, 8, 23, generator=g), torch.randn(4, 8, 23, generator=g)
    level, std = torch.tensor([0, 1, 2, 3]), torch.full((4,), 0.1)
    logp, mean = ft.step_log_prob(diffusion, x_in, x_out, level, std, w)
    per_dim = -(x_out - mean).pow(2) / (2 * 0.01)
    torch.testing.assert_close(logp, per_dim[:, :3, :6].mean((1, 2)))


def test_the_action_sum_ratio_is_the_exact_density_of_the_executed_actions():
    diffusion = pretrained.load_network(pretrained.asset_path("walker2d-h8"))[0]
    w = ft.ratio_weights(diffusion, "action-sum", 3)
    assert w[:3, :6].eq(1).all() and w.sum() == 3 * 6, "each executed action dimension counts whole, nothing else counts"
    g = torch.Generator().manual_seed(2)
    x_in, x_out = torch.randn(4, 8, 23, generator=g), torch.randn(4, 8, 23, generator=g)
    level, std = torch.tensor([0, 1, 2, 3]), torch.full((4,), 0.2)
    logp, mean = ft.step_log_prob(diffusion, x_in, x_out, level, std, w)
    exact = torch.distributions.Normal(mean[:, :3, :6], 0.2).log_prob(x_out[:, :3, :6]).sum((1, 2))
    torch.testing.assert_close(logp - 18 * (math.log(0.2) + 0.5 * math.log(2 * math.pi)), exact)


def test_the_anchor_on_states_covers_the_sampled_states_only():
    diffusion = pretrained.load_network(pretrained.asset_path("walker2d-h8"))[0]
    assert torch.equal(ft.anchor_weights(diffusion, "plan"), ft._free_mask(diffusion)), "the default keeps the whole step"
    w = ft.anchor_weights(diffusion, "states")
    assert w[:, :6].sum() == 0 and w[0].sum() == 0, "no action, and not the conditioned first state"
    assert w[1:, 6:].eq(1).all() and w.sum() == 7 * 17


def test_training_pushes_are_drawn_per_episode_from_its_seed():
    calm = ft.FinetuneConfig()
    assert ft.training_disturbance(calm, 30_000) is None, "max_push 0 trains undisturbed, as the study"
    cfg = replace(calm, max_push=300.0)
    pushes = [ft.training_disturbance(cfg, s) for s in range(30_000, 30_040)]
    forces = [d.push_force for d in pushes]
    assert all(0 <= f <= 300 for f in forces) and len(set(forces)) == len(forces)
    assert min(forces) < 100 and max(forces) > 200, "the forces span the range"
    assert ft.training_disturbance(cfg, 30_007) == pushes[7], "the same seed meets the same push on a resume"
    assert pushes[0].push_duration == 5 and pushes[0].push_interval == 100, "the push study's pushes"


def test_a_checkpoint_from_before_an_option_existed_resumes_with_its_default(run, tmp_path):
    import shutil

    from diffusion_rl.checkpoint import save_checkpoint

    copy = tmp_path / "old"
    shutil.copytree(run, copy)
    state = load_checkpoint(copy / "checkpoint.pt", kind="finetune")
    for name in ("max_push", "log_prob"):
        del state["config"][name]
    save_checkpoint(copy / "checkpoint.pt", state)
    ft.finetune(replace(TINY, iterations=4), copy, progress=False)
    assert [r["iteration"] for r in ft.read_curve(copy)] == [1, 2, 3, 4]
    with pytest.raises(CheckpointError, match="--max-push was 0.0, now 100.0"):
        ft.finetune(replace(TINY, iterations=5, max_push=100.0), copy, progress=False)


def test_the_trained_steps_have_a_floor_and_the_last_step_gets_noise():
    diffusion = pretrained.load_network(pretrained.asset_path("walker2d-h8"))[0]
    assert ft.step_std(diffusion, 0, 0.1) == 0.1, "the DDPM posterior variance of the last step is 0"
    assert ft.step_std(diffusion, 19, 0.1) > 0.1
    cond = torch.zeros(3, 17)
    x0, x_in, x_out = ft.sample_chain(diffusion, cond, 4, 0.1, torch.Generator().manual_seed(0))
    assert x_in.shape == x_out.shape == (3, 4, 8, 23) and torch.equal(x_out[:, -1], x0)
    assert torch.equal(x_in[:, 1:], x_out[:, :-1]), "each trained step starts where the previous one ended"
    assert torch.all(x0[:, 0, 6:] == 0), "every step keeps the real state in the first row"


def test_with_the_last_step_pretrained_the_trained_steps_sit_above_it_and_the_plan_is_its_mean():
    base = pretrained.load_network(pretrained.asset_path("walker2d-h8"))[0]
    tuned = TemporalUnet(base.model.cfg)  # untrained: any step it takes shows
    policy = copy.deepcopy(base)
    policy.model = LevelSplit(base.model, tuned, 4, first=1)
    cond = torch.zeros(3, 17)
    x0, x_in, x_out = ft.sample_chain(policy, cond, 4, 0.1, torch.Generator().manual_seed(0), first=1)
    assert x_in.shape == x_out.shape == (3, 4, 8, 23) and torch.equal(x_in[:, 1:], x_out[:, :-1])
    t0 = torch.zeros(3, dtype=torch.long)
    mean, _ = base.p_mean_log_variance(x_out[:, -1], t0)  # level 0: the pretrained network, no noise
    torch.testing.assert_close(x0[:, 1:], mean[:, 1:])
    torch.testing.assert_close(x0[:, 0, :6], mean[:, 0, :6])
    assert torch.equal(policy.model(x_out[:, -1], t0), base.model(x_out[:, -1], t0))
    t1 = torch.ones(3, dtype=torch.long)
    assert torch.equal(policy.model(x_in[:, -1], t1), tuned(x_in[:, -1], t1)), "level 1 is the lowest trained step"
    assert ft.first_level(replace(TINY, pretrained_last_step=True)) == 1 and ft.first_level(TINY) == 0


def test_a_run_with_the_last_step_pretrained_exports_and_loads_with_its_levels(tmp_path):
    run = tmp_path / "last"
    ft.finetune(replace(TINY, iterations=2, pretrained_last_step=True), run, progress=False)
    assert load_checkpoint(run / "checkpoint.pt", kind="finetune")["first_level"] == 1
    meta = ft.export_finetuned(run, "tiny-last", tmp_path)
    assert (meta["finetune"]["levels"], meta["finetune"]["first_level"]) == (2, 1)
    net = pretrained.load_network(tmp_path / "tiny-last-diffuser.safetensors")[0]
    assert (net.model.levels, net.model.first) == (2, 1)
    from diffusion_rl.planner import Planner

    kl = ft.chain_kl(Planner(net, pretrained.load_network(pretrained.asset_path("walker2d-h8"))[1]), np.zeros((2, 17), np.float32))
    assert list(kl) == [2, 1] and kl[1] > 0, "the trained levels, the lowest moved by the actor update"
    planner = ft.planner_from_run(run, with_value=False)
    assert (planner.diffusion.model.levels, planner.diffusion.model.first) == (2, 1)


def test_level_split_routes_each_row_by_its_level():
    cfg = UNetConfig(transition_dim=5, dim=8)
    torch.manual_seed(0)
    base, tuned = TemporalUnet(cfg), TemporalUnet(cfg)
    split = LevelSplit(base, tuned, 3)
    x, t = torch.randn(4, 8, 5), torch.tensor([0, 2, 3, 7])
    out = split(x, t)
    torch.testing.assert_close(out[:2], tuned(x[:2], t[:2]))
    torch.testing.assert_close(out[2:], base(x[2:], t[2:]))
    with pytest.raises(ValueError, match="one shape"):
        LevelSplit(base, TemporalUnet(UNetConfig(transition_dim=6, dim=8)), 3)
    above = LevelSplit(base, tuned, 3, first=1)(x, t)  # levels 1..3 tuned: t = 2 and 3 here, not 0 or 7
    torch.testing.assert_close(above[[0, 3]], base(x[[0, 3]], t[[0, 3]]))
    torch.testing.assert_close(above[1:3], tuned(x[1:3], t[1:3]))
    with pytest.raises(ValueError, match="first must be"):
        LevelSplit(base, tuned, 3, first=-1)


def test_gae_ends_at_a_fall_and_bootstraps_at_a_time_limit():
    cfg = replace(ft.FinetuneConfig(), gamma=0.5, gae_lambda=1.0, reward_scale=1.0)
    # Episode 0: two chunks then a fall; episode 1: one chunk, cut by the time limit.
    batch = ft.Batch(None, None, None, np.array([1.0, 2.0, 4.0]), np.array([0, 0, 1]), None,
                     np.array([True, False]), None, None)
    values, last = np.array([0.5, 0.25, 1.0]), np.array([100.0, 8.0])
    adv, targets = ft.gae(values, last, batch, cfg)
    # lambda = 1: targets are discounted returns; a fall adds nothing, the time limit adds gamma * V(last state).
    np.testing.assert_allclose(targets, [1 + 0.5 * 2, 2, 4 + 0.5 * 8])
    np.testing.assert_allclose(adv, targets - values)
    # A fall penalty lands on the falling chunk only, and reaches the chunks before it discounted.
    adv_p, targets_p = ft.gae(values, last, batch, replace(cfg, fall_penalty=10.0))
    np.testing.assert_allclose(targets_p - targets, [0.5 * -10, -10, 0])
    np.testing.assert_allclose(adv_p - adv, targets_p - targets)  # the values are the same, so advantages move alike


def test_the_exported_planner_loads_and_before_any_update_plans_like_its_base(tmp_path):
    run = tmp_path / "warmup"
    ft.finetune(replace(TINY, iterations=1), run, progress=False)  # critic warm-up only: the tuned copy is the base
    meta = ft.export_finetuned(run, "tiny-dppo", tmp_path)
    assert meta["finetuned_from"]["name"] == "walker2d-h8"
    assert meta["finetuned_from"]["sha256"] == json.loads(pretrained.asset_path("walker2d-h8").with_suffix(".json").read_text())["sha256"]
    assert meta["finetune"]["env_steps"] > 0 and meta["finetune"]["wall_time_s"] > 0 and meta["finetune"]["levels"] == 2
    tuned, normalizer, _ = pretrained.load_network(tmp_path / "tiny-dppo-diffuser.safetensors")
    base = pretrained.load_network(pretrained.asset_path("walker2d-h8"))[0]
    assert isinstance(tuned.model, LevelSplit)
    from diffusion_rl.planner import Planner

    obs = np.zeros((2, 17), np.float32)
    a = Planner(tuned, normalizer).plan(obs, seed=3).actions
    b = Planner(base, normalizer).plan(obs, seed=3).actions
    np.testing.assert_array_equal(a, b)
    assert set(ft.chain_kl(Planner(tuned, normalizer), obs).values()) == {0.0}, "no actor update yet: no divergence"
    shipped = ft.chain_kl(pretrained.load("walker2d-h8-dppo", device="cpu", with_value=False), obs)
    assert list(shipped) == list(range(9, -1, -1)) and shipped[0] > 0
    with pytest.raises(ValueError, match="needs a fine-tuned planner"):
        ft.chain_kl(Planner(base, normalizer), obs)
    with pytest.raises(ValueError, match="itself a fine-tuned planner"):
        monkey = dict(pretrained.PRETRAINED, **{"tiny-dppo": {"diffuser": str(tmp_path / "tiny-dppo-diffuser.safetensors")}})
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pretrained, "PRETRAINED", monkey)
            ft._load_base("tiny-dppo")


def test_a_non_finite_loss_stops_the_run_before_a_checkpoint(tmp_path, monkeypatch):
    from diffusion_rl.training import TrainingError

    real = ft.step_log_prob
    monkeypatch.setattr(ft, "step_log_prob", lambda *a: (real(*a)[0] * float("nan"), real(*a)[1]))
    run = tmp_path / "nan"
    with pytest.raises(TrainingError, match="actor loss became nan in iteration 2; the checkpoint keeps iteration 1"):
        ft.finetune(replace(TINY, iterations=2), run, progress=False)
    assert load_checkpoint(run / "checkpoint.pt")["iteration"] == 1


def test_the_shipped_fine_tuned_planner_stores_only_its_tuned_steps_and_checks_its_base(tmp_path):
    import shutil

    from safetensors.torch import load_file

    path = pretrained.asset_path("walker2d-h8-dppo")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert set(meta["finetune"]) >= {"env_steps", "wall_time_s", "levels", "learning_curve", "command"}
    assert meta["finetuned_from"] == {"name": "walker2d-h8", "file": "walker2d-h8-diffuser.safetensors",
                                      "sha256": json.loads(pretrained.asset_path("walker2d-h8").with_suffix(".json").read_text())["sha256"]}
    assert all(k.startswith(("net.model.tuned.", "normalizer.")) for k in load_file(str(path)))
    assert "finetune " in meta["finetune"]["command"] and not meta["finetune"]["command"].startswith("/")
    # A base file beside it that is not the one it was tuned from is refused, not silently used.
    shutil.copy(path, tmp_path / path.name)
    shutil.copy(path.with_suffix(".json"), tmp_path / path.with_suffix(".json").name)
    shutil.copy(pretrained.asset_path("walker2d-h8", "value"), tmp_path / "walker2d-h8-diffuser.safetensors")
    with pytest.raises(CheckpointError, match="fine-tuned from walker2d-h8-diffuser.safetensors"):
        pretrained.load_network(tmp_path / path.name)


def test_evaluate_lists_and_runs_the_fine_tuned_planner(capsys):
    from diffusion_rl.cli import build_parser

    assert "walker2d-h8-dppo" in build_parser()._subparsers._group_actions[0].choices["evaluate"].format_help()
    assert main(["evaluate", "--planner", "walker2d-h8-dppo", "--window", "8", "--first-seed", "10000", "--episodes", "1",
                 "--max-steps", "40", "--no-progress"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert summary["episodes"] == 1 and summary["window"] == 8 and summary["env_steps"] > 0


def test_the_runs_report_reuses_the_scores_of_an_unchanged_run(run, tmp_path, monkeypatch):
    calls = []

    def fake_score(planner, seeds, window):
        calls.append(planner.meta.get("finetune", {}).get("iteration", 0))
        return {"window": window, "seeds": [seeds[0], seeds[-1]], "normalized": 50.0 + len(calls), "falls": 0, "returns": [1.0]}

    monkeypatch.setattr(ft, "score_on_seeds", fake_score)
    first = ft.report_runs([run], tmp_path, snapshots_of=run.name, seeds=[20_000], progress=False)
    assert [s["iteration"] for s in first["snapshots"]] == [0, 2] and first["snapshots_of"] == run.name
    assert len(calls) == 3, "the run's end, the pretrained planner and one snapshot"
    assert ft.report_runs([run], tmp_path, snapshots_of=run.name, seeds=[20_000], progress=False) == first
    assert len(calls) == 3, "an unchanged run is not scored again"
    ft.report_runs([run], tmp_path, snapshots_of=run.name, seeds=[20_001], progress=False)
    assert len(calls) == 6, "other seeds: nothing to reuse"


def test_adding_a_run_keeps_the_reports_other_runs_and_refuses_other_seeds(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ft, "score_on_seeds", lambda planner, seeds, window: {
        "window": window, "seeds": [seeds[0], seeds[-1]], "normalized": 50.0, "falls": 0, "returns": [1.0]})
    first = ft.report_runs([run], tmp_path, snapshots_of=run.name, seeds=[20_000], progress=False)
    gone = dict(first["runs"][0], name="an-old-run")  # a run whose folder no longer exists
    (tmp_path / "runs.json").write_text(json.dumps(dict(first, runs=[gone] + first["runs"])))
    added = ft.report_runs([run], tmp_path, seeds=[20_000], progress=False, add=True)
    assert [r["name"] for r in added["runs"]] == ["an-old-run", run.name]
    assert added["snapshots"] == first["snapshots"] and added["snapshots_of"] == run.name
    assert json.loads((tmp_path / "runs.json").read_text()) == added
    with pytest.raises(ValueError, match="seeds"):
        ft.report_runs([run], tmp_path, seeds=[20_001], progress=False, add=True)
    with pytest.raises(ValueError, match="missing"):
        ft.report_runs([run], tmp_path / "empty", seeds=[20_000], progress=False, add=True)
    before = (tmp_path / "runs.json").read_text()
    assert main(["finetune-report", str(run), "--out", str(tmp_path), "--add", "--compare-at", "5", "--no-progress"]) == 2
    assert "compare-at" in capsys.readouterr().err and (tmp_path / "runs.json").read_text() == before


def test_chapter_10_quotes_each_runs_tuning_score_from_the_report():
    """Where chapter 10 says a run "ended at X% with N falls", X and N are that run's entry in runs.json."""
    book = json.loads((Path(__file__).parents[1] / "book" / "10_finetuning.ipynb").read_text())
    text = "\n".join("".join(c["source"]) for c in book["cells"] if c["cell_type"] == "markdown")
    runs = {r["name"]: r["tuning"] for r in json.loads((pretrained.ASSETS / "finetune_runs" / "runs.json").read_text())["runs"]}
    quoted = re.findall(r"`(dppo-[\w-]+)`\)?[^.`]*?ended (?:at |level: )(\d+\.\d)% with (\d+) falls", text)
    assert len(quoted) >= 7, "the chapter's sentences about runs changed shape; update the pattern"
    for name, score, falls in quoted:
        assert (f"{runs[name]['normalized']:.1f}", runs[name]["falls"]) == (score, int(falls)), name


def test_an_annealed_run_decays_the_actor_rate_and_keeps_its_length_on_resume(tmp_path):
    cfg = replace(TINY, anneal_lr=True)
    ft.finetune(replace(cfg, iterations=3), tmp_path, progress=False)
    state = load_checkpoint(tmp_path / "checkpoint.pt", kind="finetune")
    assert state["actor_opt"]["param_groups"][0]["lr"] == pytest.approx(1e-4 / 3), "the last of 3 iterations runs at 1/3 of the rate"
    with pytest.raises(CheckpointError, match="--iterations was 3, now 4"):
        ft.finetune(replace(cfg, iterations=4), tmp_path, progress=False)
