"""Three ways to steer and objectives chosen at test time: classifier-free guidance on the return,
best-of-N and gradient guidance by a target speed or height, the labelled rows of the guidance study, bad input."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import kill_at_first_checkpoint, module_dataset, tiny_common, tiny_runs

from diffusion_rl import experiment, pretrained
from diffusion_rl.checkpoint import load_checkpoint
from diffusion_rl.cli import main
from diffusion_rl.diffusion import ClassifierFree
from diffusion_rl.envs import make_env
from diffusion_rl.experiment import Arm
from diffusion_rl.models import TemporalUnet, UNetConfig
from diffusion_rl.objectives import SPEED_INDEX, make_objective
from diffusion_rl.planner import rollout
from diffusion_rl.training import DiffuserConfig, ValueConfig, train

DATA = "walker2d/steering-tiny-v0"
COMMON = tiny_common(DATA)
COND = DiffuserConfig(total_steps=40, checkpoint_every=20, returns_condition=True, **COMMON)
shared_root, minari_root = module_dataset(DATA)


@pytest.fixture(scope="module")
def runs(shared_root, tmp_path_factory):
    return tiny_runs(shared_root, tmp_path_factory, DiffuserConfig(total_steps=40, checkpoint_every=40, **COMMON),
                     ValueConfig(total_steps=20, checkpoint_every=20, **COMMON))


@pytest.fixture(scope="module")
def conditional_run(shared_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("cond")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(shared_root))
        train(COND, run, progress=False)
    return run


# ----------------------------------------------------------------------------- classifier-free guidance


def test_a_dropped_condition_is_the_unconditional_model():
    torch.manual_seed(0)
    net = TemporalUnet(UNetConfig(transition_dim=5, horizon=4, dim=8, dim_mults=(1, 2), condition_dim=1))
    x, t, y = torch.randn(3, 4, 5), torch.tensor([0, 2, 4]), torch.tensor([[0.5], [1.0], [-2.0]])
    plain, dropped, kept = net(x, t), net(x, t, y, torch.zeros(3)), net(x, t, y, torch.ones(3))
    assert torch.equal(plain, dropped)
    assert not torch.allclose(plain, kept), "the condition must change the prediction"
    with pytest.raises(ValueError, match="without a condition"):
        TemporalUnet(UNetConfig(transition_dim=5, horizon=4, dim=8, dim_mults=(1, 2)))(x, t, y)


def test_guidance_weight_0_is_unconditional_and_1_is_conditional(conditional_run):
    planner = pretrained.load_run(conditional_run)
    d = planner.diffusion
    x, t = torch.randn(4, d.horizon, d.transition_dim), torch.full((4,), 2)
    y = torch.full((4, 1), 1.0)
    with torch.no_grad():
        # Guidance runs one call of twice the batch; some CPUs' convolution kernels round a batch of 8 and one of 4
        # differently in the last bits (2e-6 seen), hence 1e-5 and not equality.
        assert torch.allclose(d.predict_x0(x, t, free=ClassifierFree(1.0, 0.0)), d.model(x, t), atol=1e-5)
        assert torch.allclose(d.predict_x0(x, t, free=ClassifierFree(1.0, 1.0)), d.model(x, t, y, torch.ones(4)), atol=1e-5)
        far = d.predict_x0(x, t, free=ClassifierFree(1.0, 3.0))
        assert not torch.allclose(far, d.model(x, t, y, torch.ones(4)), atol=1e-4)


@pytest.mark.parametrize("target, weight", [(1.0, -0.5), (1.0, math.nan), (math.inf, 1.0), (1.0, math.inf)])
def test_bad_classifier_free_numbers_are_refused(target, weight):
    with pytest.raises(ValueError, match="classifier-free"):
        ClassifierFree(target, weight)


def test_the_closed_loop_counts_two_evaluations_per_step_with_classifier_free_guidance(conditional_run):
    planner = pretrained.load_run(conditional_run).with_options(classifier_free=(1.0, 1.5))
    plain = pretrained.load_run(conditional_run)
    steered, base = (rollout(p, [10000, 10001], max_steps=6) for p in (planner, plain))
    T = planner.diffusion.n_timesteps
    for r in steered:
        assert r.denoiser_evals == 2 * T * r.n_plans
    assert [r.total_return for r in steered] != [r.total_return for r in base], "the guidance must change the plans"


def test_a_condition_for_a_model_trained_without_one_is_refused(runs):
    planner = pretrained.load_run(runs[0])
    with pytest.raises(ValueError, match="trained with a return condition"):
        planner.with_options(classifier_free=(1.0, 1.2))


def test_conditional_training_resumes_bit_for_bit_after_a_kill(conditional_run, shared_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(shared_root))
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "diffusion_rl", "train-diffuser", "--run-dir", str(run), "--total-steps", "40",
            "--checkpoint-every", "20", "--returns-condition", "true", "--dataset-id", DATA, "--horizon", "4", "--dim", "8",
            "--dim-mults", "1,2", "--n-diffusion-steps", "5", "--batch-size", "8", "--log-every", "10", "--ema-start", "20",
            "--ema-every", "2", "--threads", "1", "--device", "cpu", "--no-progress"]
    kill_at_first_checkpoint(args, run / "checkpoint.pt")
    assert load_checkpoint(run / "checkpoint.pt", kind="diffuser")["step"] < 40
    subprocess.run(args, check=True, capture_output=True)
    a, b = (load_checkpoint(r / "checkpoint.pt", kind="diffuser")["ema"] for r in (run, conditional_run))
    assert a.keys() == b.keys() and any("condition_mlp" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- objectives at test time


def test_speed_guidance_moves_the_planned_speed_toward_the_target():
    # The shipped planner, not a tiny one: 40 training steps leave a denoiser whose answer to a small push is noise.
    planner = pretrained.load("walker2d-h8", device="cpu")
    env = make_env()
    obs = np.repeat(env.reset(seed=0)[0][None].astype(np.float32), 4, 0)
    env.close()
    base = planner.plan(obs, seed=0).observations[:, 1:, SPEED_INDEX].mean()
    spread = float(planner.normalizer.scale[planner.action_dim + SPEED_INDEX])  # the data's speed std: the objective's units
    for target in (base - 3 * spread, base + 3 * spread):
        steered = planner.with_options(objective=("speed", float(target)))
        planned = steered.plan(obs, guidance_scale=5.0, seed=0).observations[:, 1:, SPEED_INDEX].mean()
        assert abs(planned - target) < abs(base - target), (base, target, planned)


def test_best_of_n_keeps_the_plan_the_objective_rates_highest(runs, monkeypatch):
    planner = pretrained.load_run(runs[0], runs[1]).with_options(objective=("speed", 1.0))
    obs = np.zeros((2, planner.obs_dim), np.float32)
    sample, drawn = planner.diffusion.sample, []

    def keep_candidates(*args, **kwargs):
        out = sample(*args, **kwargs)
        drawn.append(out.trajectories[:12].clone())  # 2 states x 6 samples (then padding rows)
        return out

    monkeypatch.setattr(planner.diffusion, "sample", keep_candidates)
    best = planner.plan(obs, n_samples=6, seed=3)
    objective = make_objective("speed", planner.normalizer, planner.action_dim, 1.0)
    speeds = torch.as_tensor(best.observations[:, 1:, SPEED_INDEX])
    assert np.allclose(best.values, -((speeds - 1.0) ** 2).mean(1).numpy(), atol=1e-4)
    scores = objective(drawn[0]).view(2, 6)
    assert len(set(scores.flatten().tolist())) > 2, "the candidates differ"
    assert torch.allclose(torch.as_tensor(best.values), scores.max(1).values, atol=1e-6)


def test_the_value_network_comes_back_when_the_objective_is_dropped(runs):
    planner = pretrained.load_run(runs[0], runs[1])
    steered = planner.with_options(objective=("height", 1.1))
    assert steered.value is not planner.value and steered.value_net is planner.value
    assert steered.with_options(objective=None).value is planner.value


@pytest.mark.parametrize("argv, message", [
    (["--target-speed", "nan", "--guidance-scale", "1"], "--target-speed must be a finite number"),
    (["--target-speed", "1.0"], "give --guidance-scale or --samples"),
    (["--target-speed", "1", "--target-height", "1.2", "--guidance-scale", "1"], "one test-time objective"),
    (["--classifier-free-weight", "-1"], "classifier-free weight must be a finite number >= 0"),
    (["--classifier-free-weight", "nan"], "classifier-free weight must be a finite number >= 0"),
    (["--classifier-free-weight", "1.2"], "trained with a return condition"),
    (["--target-return", "1.0"], "give --classifier-free-weight too"),
    (["--objective-weight", "10", "--samples", "4"], "give --target-speed or --target-height too"),
    (["--inpaint"], "give --target-speed or --target-height too"),
    (["--target-speed", "2", "--samples", "4", "--objective-weight", "-1"], "--objective-weight must be a finite number >= 0"),
    (["--target-speed", "2", "--samples", "4", "--objective-weight", "nan"], "--objective-weight must be a finite number >= 0"),
    (["--target-speed", "2", "--inpaint", "--objective-weight", "3"], "takes no --objective-weight"),
])
def test_evaluate_refuses_bad_steering_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--planner", "walker2d-h8", "--episodes", "1", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir()), "nothing written"


def test_evaluate_runs_inpainting_and_value_plus_objective(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for extra in (["--inpaint"], ["--samples", "2", "--objective-weight", "30"]):
        argv = ["evaluate", "--planner", "walker2d-h8-medium-expert", "--episodes", "1", "--max-steps", "3", "--ddim-steps", "2",
                "--target-speed", "2.0", "--no-progress", *extra]
        assert main(argv) == 0, capsys.readouterr().err
    assert "\"mean_speed\"" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the study's labelled rows


def test_labelled_arms_write_their_columns_and_measures(runs, tmp_path):
    planner = pretrained.load_run(runs[0], runs[1])
    arms = [Arm("plain", 2, labels=(("dataset", DATA), ("method", "unguided"), ("target_speed", None))),
            Arm("fast", 2, 1.0, planner_options=(("objective", ("speed", 2.0)),), measures=("mean_speed",),
                labels=(("dataset", DATA), ("method", "gradient"), ("target_speed", 2.0)))]
    summary = experiment.run_experiment(planner, arms, [10000, 10001], tmp_path, {"source": "test"}, "test", max_steps=12,
                                        progress=False)
    rows = experiment.load_rows(tmp_path)
    header = (tmp_path / "episodes.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["dataset", "method", "target_speed"] and header[-2:] == ["mean_speed", "mean_height"]
    plain, fast = rows[:2], rows[2:]
    assert all(r["mean_speed"] is None and r["target_speed"] is None for r in plain)
    assert all(isinstance(r["mean_speed"], float) and r["target_speed"] == 2.0 for r in fast)
    assert "mean_speed" in summary["settings"][1] and "mean_speed" not in summary["settings"][0]
    # Rerun: tuple-valued options and labels compare equal to the record's lists, so the study resumes.
    again = experiment.run_experiment(planner, arms, [10000, 10001], tmp_path, {"source": "test"}, "test", max_steps=12, progress=False)
    assert again == summary
    with pytest.raises(ValueError, match="same label columns"):
        experiment.run_experiment(planner, [arms[0], Arm("x", 2, labels=(("method", "u"),))], [10000], tmp_path / "b", {}, "",
                                  max_steps=4, progress=False)


def test_an_objective_weighted_against_the_value_adds_to_the_return(runs):
    planner = pretrained.load_run(runs[0], runs[1])
    both = planner.with_options(objective=("speed", 1.0, 20.0))
    x = planner.plan(np.zeros((3, planner.obs_dim), np.float32), seed=1).trajectories
    t = torch.zeros(3, dtype=torch.long)
    speed = make_objective("speed", planner.normalizer, planner.action_dim, 1.0)
    assert torch.allclose(both.value(x, t), planner.value(x, t) + 20.0 * speed(x, t), atol=1e-4)
    with pytest.raises(ValueError, match="weight must be a finite number"):
        planner.with_options(objective=("speed", 1.0, -1.0))
    with pytest.raises(ValueError, match="needs a planner with a value network"):
        pretrained.load_run(runs[0]).with_options(objective=("speed", 1.0, 2.0))


def test_guided_by_the_value_selected_by_the_objective(runs):
    planner = pretrained.load_run(runs[0], runs[1]).with_options(objective=("height", 1.2), guide_by_value=True)
    assert planner.guide(0.1).value is planner.value_net
    plan = planner.plan(np.zeros((2, planner.obs_dim), np.float32), guidance_scale=0.1, n_samples=4, seed=0)
    assert np.allclose(plan.values, planner.value(plan.trajectories, torch.zeros(2, dtype=torch.long)).numpy(), atol=1e-5)


def test_an_inpainted_target_is_in_every_future_step_of_the_plan(runs):
    planner = pretrained.load_run(runs[0], runs[1]).with_options(inpaint=("speed", 1.7))
    plan = planner.plan(np.zeros((3, planner.obs_dim), np.float32), seed=2, ddim_steps=3)
    assert np.allclose(plan.observations[:, 1:, SPEED_INDEX], 1.7, atol=1e-5)
    assert not np.allclose(plan.observations[:, 0, SPEED_INDEX], 1.7), "the current state stays the real one"
    with pytest.raises(ValueError, match="must be a finite number"):
        planner.with_options(inpaint=("speed", math.nan))
