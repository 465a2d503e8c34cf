"""Training (exact resume, NaN stop), export and safe loading, the planner and its closed loop."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kill_at_first_checkpoint, module_dataset, poison_loss, tiny_common, tiny_runs

from diffusion_rl import pretrained
from diffusion_rl.checkpoint import CheckpointError, load_checkpoint
from diffusion_rl.planner import rollout
from diffusion_rl.training import DiffuserConfig, TrainingError, ValueConfig, read_loss_log, train

DATA = "walker2d/tiny-v0"
COMMON = tiny_common(DATA)
TINY_D = DiffuserConfig(total_steps=120, checkpoint_every=40, **COMMON)
TINY_V = ValueConfig(total_steps=60, checkpoint_every=30, **COMMON)
CLI_ARGS = ["--dataset-id", DATA, "--horizon", "4", "--dim", "8", "--dim-mults", "1,2", "--n-diffusion-steps", "5",
            "--batch-size", "8", "--log-every", "10", "--ema-start", "20", "--ema-every", "2", "--threads", "1", "--device", "cpu", "--no-progress"]


# One tiny dataset for the whole module (an untrained policy: short episodes that fall).
shared_root, minari_root = module_dataset(DATA)


@pytest.fixture(scope="module")
def runs(shared_root, tmp_path_factory):
    return tiny_runs(shared_root, tmp_path_factory, TINY_D, TINY_V)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffusion_rl", *args]


def weights(run: Path, kind: str, part: str = "ema") -> dict:
    return load_checkpoint(run / "checkpoint.pt", kind=kind)[part]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- training


def test_training_writes_a_loss_curve_that_falls(runs):
    log = read_loss_log(runs[0])
    assert [r["step"] for r in log] == list(range(10, 121, 10))
    assert log[-1]["loss"] < log[0]["loss"]


@pytest.mark.parametrize("kind", ["diffuser", "value"])
def test_sigkill_then_rerun_gives_the_uninterrupted_weights(runs, tmp_path, kind):
    run = tmp_path / kind
    ref = runs[0] if kind == "diffuser" else runs[1]
    total = TINY_D.total_steps if kind == "diffuser" else TINY_V.total_steps
    every = TINY_D.checkpoint_every if kind == "diffuser" else TINY_V.checkpoint_every
    args = cli(f"train-{kind}", "--run-dir", str(run), "--total-steps", str(total), "--checkpoint-every", str(every), *CLI_ARGS)
    kill_at_first_checkpoint(args, run / "checkpoint.pt")
    state = load_checkpoint(run / "checkpoint.pt", kind=kind)
    assert 0 < state["step"] < total, "the kill should land mid-run"
    subprocess.run(args, check=True, capture_output=True)
    for part in ("ema", "model"):
        assert_same(weights(run, kind, part), weights(ref, kind, part))


def test_sigterm_checkpoints_the_current_step(runs, tmp_path):
    run = tmp_path / "termed"
    args = cli("train-diffuser", "--run-dir", str(run), "--total-steps", "100000", "--checkpoint-every", "100000", *CLI_ARGS)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "step 0 of 100000" in proc.stdout.readline()  # the signal handlers are installed
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 0
    step = load_checkpoint(run / "checkpoint.pt", kind="diffuser")["step"]
    assert 0 < step < 100000


def test_resume_with_other_options_is_refused(runs, tmp_path):
    import shutil

    shutil.copytree(runs[0], tmp_path / "r")
    with pytest.raises(CheckpointError, match="lr"):
        train(replace(TINY_D, lr=1e-3), tmp_path / "r", progress=False)
    train(replace(TINY_D, total_steps=130), tmp_path / "r", progress=False)  # more steps is fine
    assert load_checkpoint(tmp_path / "r" / "checkpoint.pt")["step"] == 130


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    poison_loss(monkeypatch, "diffuser_loss", at_call=55)
    with pytest.raises(TrainingError, match="step 55.*step 40"):
        train(TINY_D, tmp_path / "nan", progress=False)
    assert load_checkpoint(tmp_path / "nan" / "checkpoint.pt")["step"] == 40


# ----------------------------------------------------------------------------- export and loading


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("assets")
    d = pretrained.export_network(runs[0], out / "t-diffuser.safetensors")
    v = pretrained.export_network(runs[1], out / "t-value.safetensors")
    return out, d, v


def test_export_round_trip_gives_the_ema_weights(runs, exported):
    out, meta, _ = exported
    net, norm, side = pretrained.load_network(out / "t-diffuser.safetensors")
    assert_same(net.state_dict(), {k: v for k, v in weights(runs[0], "diffuser").items()})
    for key in ("config", "steps", "wall_time_s", "final_loss", "seed", "sha256", "dataset_id"):
        assert key in side
    assert side["steps"] == TINY_D.total_steps


def test_tampered_truncated_and_foreign_weight_files_are_refused(exported, tmp_path):
    import shutil

    out = exported[0]
    for name in ("t-diffuser.safetensors", "t-diffuser.json"):
        shutil.copy(out / name, tmp_path / name)
    f = tmp_path / "t-diffuser.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="SHA-256"):
        pretrained.load_network(f)
    with pytest.raises(CheckpointError, match="missing"):
        pretrained.load_network(tmp_path / "nothing.safetensors")
    # The value file with the denoiser's sidecar: the architecture does not fit.
    shutil.copy(out / "t-value.safetensors", f)
    side = json.loads((tmp_path / "t-diffuser.json").read_text())
    side["sha256"] = __import__("diffusion_rl.checkpoint", fromlist=["x"]).sha256_file(f)
    (tmp_path / "t-diffuser.json").write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match="does not fit"):
        pretrained.load_network(f)


def test_unknown_pretrained_name():
    with pytest.raises(CheckpointError, match="walker2d-h8"):
        pretrained.load("walker2d-h99")


# ----------------------------------------------------------------------------- planner and closed loop


@pytest.fixture(scope="module")
def planner(runs):
    return pretrained.load_run(runs[0], runs[1])


def test_plan_shapes_units_and_condition(planner):
    obs = np.random.default_rng(0).normal(size=(3, 17)).astype(np.float32)
    plan = planner.plan(obs, seed=0, return_chain=True)
    assert plan.actions.shape == (3, 4, 6) and plan.observations.shape == (3, 4, 17)
    assert np.allclose(plan.observations[:, 0], obs, atol=1e-4)  # the plan starts at the real state
    assert plan.chain.shape == (6, 3, 4, 23)
    single = planner.plan(obs[0], seed=0)
    assert single.actions.shape == (4, 6)


def test_best_of_n_keeps_the_highest_value(planner):
    obs = np.random.default_rng(1).normal(size=(2, 17)).astype(np.float32)
    best = planner.plan(obs, n_samples=8, generators=[torch.Generator().manual_seed(i) for i in range(2)])
    # Redraw the same 8 candidates per state and score them all.
    T, H, D = planner.diffusion.n_timesteps, planner.horizon, planner.diffusion.transition_dim
    noise = torch.stack([torch.randn((8, T + 1, H, D), generator=torch.Generator().manual_seed(i)) for i in range(2)])
    cond = planner.obs_normalizer.normalize(torch.from_numpy(obs)).repeat_interleave(8, 0)
    x = planner.diffusion.sample(cond, noise=noise.flatten(0, 1).transpose(0, 1)).trajectories
    values = planner.value(x, torch.zeros(16, dtype=torch.long)).view(2, 8)
    assert np.allclose(best.values, values.max(1).values.numpy(), atol=1e-5)
    assert np.all(best.values > values.min(1).values.numpy())


@pytest.mark.parametrize("window", [0, 5, -1, 2.5, True])
def test_window_outside_the_horizon_is_refused(planner, window):
    with pytest.raises(ValueError, match="1..4"):
        rollout(planner, [0], window=window, max_steps=5)


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf")])
def test_bad_guidance_scale_in_the_loop(planner, scale):
    with pytest.raises(ValueError, match="guidance scale"):
        rollout(planner, [0], window=1, guidance_scale=scale, max_steps=5)


def test_rollout_records_and_is_reproducible(planner):
    a = rollout(planner, [1, 2], window=2, max_steps=20, record=True)
    b = rollout(planner, [1, 2], window=2, max_steps=20, guidance_scale=0.0)
    for r, s in zip(a, b):
        assert r.total_return == s.total_return and r.length == s.length
        assert r.states.shape == (r.length + 1, 17) and r.actions.shape == (r.length, 6)
        assert len(r.plans) == len(r.plan_steps) == (r.length + 1) // 2
        assert np.allclose(r.plans[0][0, 6:], r.states[0], atol=1e-4)
        assert r.length == 20 or r.fell


def test_cli_evaluate_and_export(runs, tmp_path):
    res = subprocess.run(cli("evaluate", "--diffuser", str(runs[0]), "--window", "4", "--episodes", "2", "--max-steps", "20", "--no-progress"),
                         capture_output=True, text=True, check=True)
    summary = json.loads(res.stdout)
    assert summary["episodes"] == 2 and "percent_of_data" in summary
    bad = subprocess.run(cli("evaluate", "--diffuser", str(runs[0]), "--window", "9", "--no-progress"), capture_output=True, text=True)
    assert bad.returncode == 2 and "1..4" in bad.stderr and "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------- the shipped planner


def test_shipped_planner_verifies_and_its_sidecar_is_complete():
    planner = pretrained.load("walker2d-h8", device="cpu")
    assert planner.horizon == 8 and planner.value is not None
    meta = planner.meta
    for key in ("config", "dataset_id", "steps", "wall_time_s", "final_loss", "seed", "train_command", "score", "dataset"):
        assert key in meta, key
    assert meta["score"]["unguided_k1"]["episodes"] == 20
    for part in ("diffuser", "value"):
        assert pretrained.asset_path("walker2d-h8", part).stat().st_size < 8_000_000


def test_shipped_planner_walks_when_it_replans_every_step():
    """Four episodes of 300 steps at k = 1: nobody falls, and they earn >= 90% of what the expert earns."""
    from diffusion_rl.envs import make_env
    from diffusion_rl.expert import load_policy

    seeds = [10_000, 10_001, 10_002, 10_003]
    planner = pretrained.load("walker2d-h8", device="cpu")
    results = rollout(planner, seeds, window=1, max_steps=300)
    assert not any(r.fell for r in results)
    actor, expert = load_policy()[0], 0.0
    for seed in seeds:
        env = make_env(max_episode_steps=300)
        obs, _ = env.reset(seed=seed)
        done = False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(actor.act(obs, deterministic=True))
            expert, done = expert + reward, terminated or truncated
    assert sum(r.total_return for r in results) >= 0.9 * expert


def test_the_recorded_train_command_rebuilds_the_config():
    import shlex

    from diffusion_rl.cli import build_parser, config_from_args
    from diffusion_rl.training import train_command

    for cfg in (TINY_D, replace(TINY_D, predict_epsilon=True, clip_denoised=1.0), TINY_V):
        args = build_parser().parse_args(shlex.split(train_command(cfg, "r"))[3:])
        assert config_from_args(type(cfg), args) == cfg


@pytest.mark.parametrize("scale", [None, 0.3])
def test_plans_do_not_depend_on_their_batch_mates(scale):
    from diffusion_rl.planner import episode_generator

    planner = pretrained.load("walker2d-h8", device="cpu")
    obs = planner.obs_normalizer.shift.astype(np.float32) + 0.1 * np.random.default_rng(0).normal(size=(20, 17)).astype(np.float32)
    full = planner.plan(obs, scale, generators=[episode_generator(i) for i in range(20)]).actions
    for n in (1, 2, 17):
        part = planner.plan(obs[:n], scale, generators=[episode_generator(i) for i in range(n)]).actions
        assert np.array_equal(part, full[:n]), n


def test_an_episode_of_a_batch_replays_alone_to_its_sidecar_return(foreign_cpu):
    """Two of the 20 scored guided k = 8 episodes, run on their own, give the sidecar's returns bit for bit.

    (The unguided ones replay in tests/test_control.py, through the controller that ``window=8`` stands for.)
    On a CPU whose kernels round otherwise, each of the two run alone still gives what it gave in their batch.
    """
    planner = pretrained.load("walker2d-h8", device="cpu")
    score = planner.meta["score"]["guided_k8"]
    seeds, scale = [score["seeds"][0], score["seeds"][7]], score["guidance_scale"]
    batch = [round(r.total_return, 2) for r in rollout(planner, seeds, window=8, guidance_scale=scale)]
    if foreign_cpu:
        alone = [round(rollout(planner, [s], window=8, guidance_scale=scale)[0].total_return, 2) for s in seeds]
        assert alone == batch
        pytest.skip(foreign_cpu)
    assert batch == [score["returns"][0], score["returns"][7]]
