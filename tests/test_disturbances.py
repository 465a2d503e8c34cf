"""Disturbances: pushes and shifted dynamics are seeded, reproducible, exactly nothing when off, and refused when nonsensical."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from diffusion_rl.cli import main
from diffusion_rl.disturbances import Disturbance, DisturbanceWrapper
from diffusion_rl.envs import make_env


def run(disturbance: Disturbance | None, seed: int = 3, steps: int = 60, action: float = 0.0) -> np.ndarray:
    """Observations of an episode driven by a constant action."""
    env = make_env(disturbance=disturbance)
    try:
        obs = [env.reset(seed=seed)[0]]
        for _ in range(steps):
            o, _, terminated, truncated, _ = env.step(np.full(6, action))
            obs.append(o)
            if terminated or truncated:
                break
        return np.array(obs)
    finally:
        env.close()


def test_no_disturbance_is_the_plain_environment_bit_for_bit():
    assert not isinstance(make_env(disturbance=Disturbance()), DisturbanceWrapper)
    plain = run(None)
    # An active wrapper with a push that never comes within the episode changes nothing either.
    late = run(Disturbance(push_force=300.0, push_interval=500))
    assert np.array_equal(plain, late)


def test_a_push_moves_the_torso_along_its_direction_and_only_from_its_step():
    d = Disturbance(push_force=300.0, push_duration=5, push_interval=20)
    plain, pushed = run(None), run(d)
    assert np.array_equal(plain[:21], pushed[:21])  # nothing before the first push acts (step 20 -> observation 21)
    dv = pushed[26, 8] - plain[26, 8]  # torso x-velocity after the push
    assert abs(dv) > 0.5
    assert np.array_equal(run(d), pushed)  # reproducible from the seed


def test_push_directions_come_from_the_episode_seed():
    d = Disturbance(push_force=300.0, push_duration=3, push_interval=10)
    signs = set()
    for seed in range(8):
        plain, pushed = run(None, seed, 15), run(d, seed, 15)
        signs.add(np.sign(pushed[14, 8] - plain[14, 8]))
    assert signs == {-1.0, 1.0}


def test_push_schedule():
    d = Disturbance(push_force=1.0, push_duration=2, push_interval=10)
    assert [d.pushing(t) for t in (0, 9, 10, 11, 12, 19, 20, 21, 22)] == [None, None, 0, 0, None, None, 1, 1, None]
    assert Disturbance(push_force=0.0).pushing(10) is None


def test_dynamics_shifts_scale_the_model_and_do_not_compound_over_resets():
    env = make_env(disturbance=Disturbance(torso_mass=2.0, friction=0.5))
    try:
        model = env.unwrapped.model
        base = make_env().unwrapped.model
        torso = model.body("torso").id
        for seed in (0, 1, 2):
            env.reset(seed=seed)
            assert model.body_mass[torso] == pytest.approx(2.0 * base.body_mass[torso])
            assert np.allclose(model.geom_friction[:, 0], 0.5 * base.geom_friction[:, 0])
    finally:
        env.close()


@pytest.mark.parametrize("kw, match", [
    ({"push_force": -1.0}, ">= 0"), ({"push_force": math.nan}, ">= 0"), ({"push_force": math.inf}, ">= 0"),
    ({"push_duration": 0}, "positive whole"), ({"push_interval": -5}, "positive whole"),
    ({"push_duration": 20, "push_interval": 10}, "does not fit"),
    ({"torso_mass": 0.0}, "> 0"), ({"friction": -1.0}, ">= 0"), ({"friction": math.nan}, ">= 0"),
])
def test_bad_disturbances_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        Disturbance(**kw)


@pytest.mark.parametrize("argv, match", [
    (["--push-force", "-1"], ">= 0"), (["--push-force", "nan"], ">= 0"),
    (["--push-force", "100", "--push-duration", "50", "--push-interval", "20"], "does not fit"),
    (["--torso-mass", "0"], "> 0"),
])
def test_evaluate_refuses_bad_disturbances_with_one_line(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["evaluate", "--episodes", "1", "--max-steps", "2", "--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err and match in err, err
    assert list(tmp_path.iterdir()) == []


def test_evaluate_records_the_disturbance(capsys):
    argv = ["evaluate", "--window", "4", "--ddim-steps", "1", "--episodes", "1", "--max-steps", "30", "--no-progress",
            "--push-force", "50", "--push-interval", "10", "--push-duration", "2"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["disturbance"] == Disturbance(push_force=50.0, push_duration=2, push_interval=10).to_dict()


def test_the_expert_meets_the_same_pushes_and_a_strong_one_topples_it():
    from diffusion_rl.expert import evaluate_policy, load_policy, policy_episodes

    actor, _ = load_policy()
    calm = policy_episodes(actor, [10_000, 10_001])
    assert [e["return"] for e in calm] == list(evaluate_policy(actor, [10_000, 10_001]))
    assert not any(e["fell"] for e in calm) and all(e["length"] == 1000 for e in calm)
    shoved = policy_episodes(actor, [10_000, 10_001], disturbance=Disturbance(push_force=800.0))
    assert all(e["fell"] and e["length"] < 1000 for e in shoved)


def test_a_recorded_expert_episode_is_the_same_episode_as_the_batched_one():
    from diffusion_rl.expert import load_policy, policy_episodes, record_episode

    actor, _ = load_policy()
    push = Disturbance(push_force=300.0, push_interval=50)
    batched = policy_episodes(actor, [20_003], disturbance=push)[0]
    recorded = record_episode(actor, 20_003, push)
    assert recorded["length"] == batched["length"] and recorded["fell"] == batched["fell"]
    assert abs(recorded["return"] - batched["return"]) < 1e-6 * max(1.0, abs(batched["return"]))
    assert recorded["states"].shape == (batched["length"] + 1, 17) and recorded["x"].shape == (batched["length"] + 1,)
