"""The SAC expert: exact resume after a real kill, safe checkpoints, the shipped policy."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_rl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from diffusion_rl.expert import (
    EVAL_SEEDS,
    Actor,
    SACConfig,
    load_policy,
    shipped_policy_path,
    train_sac,
)

TINY = SACConfig(total_steps=1500, learning_starts=300, batch_size=32, hidden=32, eval_every=500, eval_episodes=1, checkpoint_every=250)
TINY_ARGS = ["--total-steps", "1500", "--learning-starts", "300", "--batch-size", "32", "--hidden", "32",
             "--eval-every", "500", "--eval-episodes", "1", "--checkpoint-every", "250", "--no-progress"]


def actor_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoint.pt", kind="sac")["agent"]["actor"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref")
    train_sac(TINY, run, progress=False)
    return run


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffusion_rl", *args]


def test_sigkill_then_rerun_gives_the_uninterrupted_weights(reference_run, tmp_path):
    run = tmp_path / "killed"
    proc = subprocess.Popen(cli("train-expert", "--run-dir", str(run), *TINY_ARGS), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Kill it for real once training is under way: curve.csv appears with the first checkpoint
    # that follows an evaluation (step 500 of 1500), so the kill lands mid-run.
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "curve.csv").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    step_at_kill = load_checkpoint(run / "checkpoint.pt", kind="sac")["step"]
    assert 0 < step_at_kill < TINY.total_steps
    subprocess.run(cli("train-expert", "--run-dir", str(run), *TINY_ARGS), check=True, capture_output=True)
    assert load_checkpoint(run / "checkpoint.pt", kind="sac")["step"] == TINY.total_steps
    assert_same_weights(actor_weights(run), actor_weights(reference_run))


def test_sigterm_checkpoints_the_current_step_and_resumes_exactly(reference_run, tmp_path):
    run = tmp_path / "termed"
    args = [a if a != "250" else "100000" for a in TINY_ARGS]  # no periodic checkpoints: only the signal's
    proc = subprocess.Popen(cli("train-expert", "--run-dir", str(run), *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert '"env_step": 500' in proc.stdout.readline()  # the first evaluation: training is under way
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 0
    step = load_checkpoint(run / "checkpoint.pt", kind="sac")["step"]
    assert 0 < step < TINY.total_steps, "the run should have been stopped mid-way"
    train_sac(replace(TINY, checkpoint_every=100000), run, progress=False)
    assert_same_weights(actor_weights(run), actor_weights(reference_run))


def _mkl_avx512() -> bool:
    """Whether MKL runs its AVX-512 kernels here (an AVX-512 CPU, and no MKL variable that picks another path)."""
    forced = [os.environ.get(v, "").upper() for v in ("MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")]
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512") and all(not f or "AVX512" in f for f in forced)


def test_thread_count_does_not_change_the_weights(tmp_path):
    # A property of MKL's kernels, which our code must not break: its AVX-512 kernels give the same bits on 1 and 2
    # threads, its AVX2 ones do not (seen with MKL_ENABLE_INSTRUCTIONS=AVX2), so an exact resume keeps the count there.
    if not _mkl_avx512():
        pytest.skip("MKL does not run its AVX-512 kernels here, and its AVX2 kernels add up by thread")
    cfg = replace(TINY, total_steps=340, hidden=256, batch_size=256, learning_starts=300)
    train_sac(replace(cfg, threads=1), tmp_path / "t1", progress=False)
    train_sac(replace(cfg, threads=2), tmp_path / "t2", progress=False)
    assert_same_weights(actor_weights(tmp_path / "t1"), actor_weights(tmp_path / "t2"))


def test_resume_with_another_algorithm_config_is_refused(reference_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(reference_run, run)
    with pytest.raises(CheckpointError, match="batch_size"):
        train_sac(replace(TINY, batch_size=64), run, progress=False)


def test_curve_is_written(reference_run):
    lines = (reference_run / "curve.csv").read_text().splitlines()
    assert lines[0].startswith("env_step,wall_time_s,eval_mean")
    assert [int(l.split(",")[0]) for l in lines[1:]] == [500, 1000, 1500]


# ----------------------------------------------------------------------------- unsafe or broken files


def test_truncated_checkpoint_gives_a_clear_error(reference_run, tmp_path):
    bad = tmp_path / "checkpoint.pt"
    data = (reference_run / "checkpoint.pt").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupted"):
        load_checkpoint(bad)


def test_not_a_checkpoint_at_all(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="No checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_foreign_torch_file_and_wrong_kind(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="no 'kind'"):
        load_checkpoint(tmp_path / "foreign.pt")
    save_checkpoint(tmp_path / "diffuser.pt", {"kind": "diffuser"})
    with pytest.raises(CheckpointError, match="'diffuser' checkpoint, but a 'sac'"):
        load_checkpoint(tmp_path / "diffuser.pt", kind="sac")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_with_code_is_never_executed(tmp_path):
    torch.save({"kind": "sac", "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt")


def test_atomic_save_leaves_no_temp_files(tmp_path):
    save_checkpoint(tmp_path / "a.pt", {"kind": "x", "v": torch.ones(2)})
    save_checkpoint(tmp_path / "a.pt", {"kind": "x", "v": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]
    assert torch.equal(load_checkpoint(tmp_path / "a.pt")["v"], torch.zeros(2))


# ----------------------------------------------------------------------------- the shipped policy


def test_shipped_policy_verifies_and_reproduces_its_sidecar(expert_replay, foreign_cpu):
    _, meta = load_policy()  # the replay (conftest) loaded the same weights, SHA-256 checked
    assert meta["env_id"] == "Walker2d-v5" and meta["eval_seeds"] == list(EVAL_SEEDS)
    # To the cent on the recording machine's kernels; elsewhere the same walk, within 2% (another CPU moved them 0.8%).
    np.testing.assert_allclose(expert_replay, meta["eval_deterministic"]["returns"][:2], rtol=2e-2 if foreign_cpu else 1e-3)
    for key in ("command", "seed", "env_steps", "wall_time_s", "sha256"):
        assert key in meta


def test_shipped_policy_is_small():
    assert shipped_policy_path().stat().st_size < 2_000_000


def test_tampered_policy_is_refused(tmp_path):
    path = tmp_path / shipped_policy_path().name
    shutil.copy(shipped_policy_path(), path)
    shutil.copy(shipped_policy_path().with_suffix(".json"), path.with_suffix(".json"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_policy(path)
    with pytest.raises(CheckpointError, match="missing"):
        load_policy(tmp_path / "nothing.safetensors")


def test_actions_do_not_depend_on_the_batch_they_share():
    torch.manual_seed(0)
    actor = Actor(17, 6, 256)
    obs = np.random.default_rng(0).normal(size=(20, 17))
    together = actor.act(obs, deterministic=True)
    alone = np.stack([actor.act(o, deterministic=True) for o in obs])
    np.testing.assert_array_equal(together, alone)
    noise = np.random.default_rng(1).normal(size=(20, 6))
    np.testing.assert_array_equal(actor.act(obs, noise=noise)[:3], actor.act(obs[:3], noise=noise[:3]))


def test_actor_noise_interface_matches_sampling():
    actor = Actor(17, 6, 32)
    obs = torch.randn(5, 17)
    assert torch.equal(actor.with_noise(obs, torch.zeros(5, 6)), actor.deterministic(obs))
    a = actor.with_noise(obs, torch.randn(5, 6))
    assert a.shape == (5, 6) and (a.abs() <= 1).all()


def test_the_speed_task_pays_walker2ds_reward_up_to_the_target_and_less_past_it():
    from diffusion_rl.envs import TARGET_SPEEDS, make_env

    plain, task = make_env(), make_env(task="speed")
    try:
        obs, info = task.reset(seed=3)
        target = info["target_speed"]
        assert TARGET_SPEEDS[0] <= target <= TARGET_SPEEDS[1] and obs.shape == (18,) and obs[-1] == target
        assert task.reset(seed=3)[1]["target_speed"] == target, "the reset seed fixes the target"
        assert task.reset(seed=4)[1]["target_speed"] != target
        assert task.reset(seed=3, options={"target_speed": 1.25})[0][-1] == 1.25
        plain.reset(seed=3)
        rng = np.random.default_rng(0)
        for _ in range(60):
            action = rng.uniform(-1, 1, 6)
            o1, r1, *_, i1 = plain.step(action)
            o2, r2, *_, i2 = task.step(action)
            np.testing.assert_array_equal(o1, o2[:-1])
            v = i1["x_velocity"]
            assert r2 == pytest.approx(r1 - v + min(v, 2 * 1.25 - v))
            if v <= 1.25:
                assert r2 == pytest.approx(r1), "Walker2d's own reward below the target"
    finally:
        plain.close()
        task.close()


def test_a_speed_task_run_resumes_exactly_and_an_unknown_task_is_refused(tmp_path):
    cfg = replace(TINY, total_steps=700, task="speed")
    train_sac(cfg, tmp_path / "whole", progress=False)
    train_sac(replace(cfg, total_steps=450), tmp_path / "cut", progress=False)
    train_sac(cfg, tmp_path / "cut", progress=False)
    assert_same_weights(actor_weights(tmp_path / "whole"), actor_weights(tmp_path / "cut"))
    assert actor_weights(tmp_path / "whole")["net.0.weight"].shape[1] == 18, "the actor sees the target"
    with pytest.raises(ValueError, match="Unknown task"):
        train_sac(replace(TINY, task="run"), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_episodes_measure_their_mean_speed_to_the_last_step_and_a_speed_policy_reports_its_tracking():
    from diffusion_rl.expert import policy_episodes, record_episode, speed_tracking

    torch.manual_seed(0)
    actor = Actor(17, 6, hidden=32)
    seeds = [10, 11, 12]
    for ep in policy_episodes(actor, seeds):
        replay = record_episode(actor, ep["seed"])
        dt = 0.008  # Walker2d-v5: frame_skip 4 x timestep 0.002
        # x_velocity is the step's displacement over dt, so its mean over the episode is the whole displacement over time,
        # the last (episode-ending) step included.
        assert ep["length"] == replay["length"]
        assert ep["mean_speed"] == pytest.approx((replay["x"][-1] - replay["x"][0]) / (replay["length"] * dt), rel=1e-6)
    speedy = Actor(18, 6, hidden=32)
    report = speed_tracking(speedy, targets=(1.0, 2.0), seeds=seeds)
    assert [r["target_speed"] for r in report] == [1.0, 2.0] and all(r["episodes"] == 3 for r in report)
    assert all(0 <= r["falls"] <= 3 and np.isfinite(r["mean_speed"]) for r in report)


def test_an_exported_snapshot_names_the_run_that_stops_at_its_step(reference_run, tmp_path):
    from diffusion_rl.checkpoint import save_checkpoint
    from diffusion_rl.expert import export_policy

    state = load_checkpoint(reference_run / "checkpoint.pt", kind="sac")
    assert state["step"] == TINY.total_steps
    snapshot = tmp_path / "speed-sac" / "checkpoint.pt"  # kept aside mid-run: its run went on to more steps
    save_checkpoint(snapshot, {**state, "config": {**state["config"], "total_steps": 10 * TINY.total_steps}})
    meta = export_policy(snapshot, tmp_path / "p.safetensors", command="x")
    assert meta["train_command"].startswith("python -m diffusion_rl train-expert --run-dir runs/speed-sac ")
    assert f"--total-steps {TINY.total_steps} " in meta["train_command"] + " " and meta["env_steps"] == TINY.total_steps


def test_each_shipped_policy_verifies_and_names_the_run_that_makes_it():
    from diffusion_rl.expert import SHIPPED_POLICIES, load_policy, shipped_policy_path

    for name, (run_dir, options) in SHIPPED_POLICIES.items():
        _, meta = load_policy(shipped_policy_path(name))  # checks the SHA-256
        command = meta["train_command"]
        assert command.startswith(f"python -m diffusion_rl train-expert --run-dir {run_dir} "), name
        assert all(opt in command.split() for opt in options.split()), (name, options, command)
        if "--total-steps" in options:
            assert f"--total-steps {meta['env_steps']}" in command
    speed = load_policy(shipped_policy_path("speed"))[1]
    assert speed["obs_dim"] == 18 and len(speed["speed_tracking"]) >= 5  # it sees its target; its tracking is recorded
