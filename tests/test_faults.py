"""Fault and bad-input cases of the reliability issue: each one a test that fails if the behaviour regresses.

Cases already tested in other modules are not repeated here:

* unknown or malformed dataset id ('..', absolute, '~', no version): test_data.py::test_bad_dataset_ids_are_refused,
  ::test_remote_id_offline_fails_fast_and_names_the_local_command; the CLI: test_cli.py::test_bad_dataset_id_is_a_clean_error
* dataset shapes that do not fit the environment: test_data.py::test_shape_mismatch_is_refused
* window outside 1..H: test_planner.py::test_window_outside_the_horizon_is_refused, ::test_cli_evaluate_and_export (k = 9),
  test_sweep.py::test_sweep_refuses_mixing_and_bad_windows
* negative, NaN or infinite guidance scale: test_planner.py::test_bad_guidance_scale_in_the_loop,
  test_diffusion.py::test_bad_guidance_scale_is_refused
* horizon the U-Net cannot halve: test_diffusion.py::test_horizon_the_unet_cannot_halve_is_refused
* truncated checkpoint, not a checkpoint, foreign torch file, wrong kind, pickle with code: test_expert.py::
  test_truncated_checkpoint_gives_a_clear_error, ::test_not_a_checkpoint_at_all, ::test_foreign_torch_file_and_wrong_kind,
  ::test_a_pickle_with_code_is_never_executed
* shipped weights tampered, truncated, of another architecture, missing: test_planner.py::
  test_tampered_truncated_and_foreign_weight_files_are_refused, ::test_unknown_pretrained_name, test_expert.py::test_tampered_policy_is_refused
* no working GL backend: test_video.py::test_check_gl_explains_invalid_backend, ::test_broken_egl_fails_rendering_only,
  test_gl.py::test_select_gl_says_what_to_install_when_nothing_renders
* NaN in the denoiser's loss: test_planner.py::test_nan_loss_stops_and_keeps_the_last_good_checkpoint
* SIGKILL and rerun, bit-identical weights: test_planner.py::test_sigkill_then_rerun_gives_the_uninterrupted_weights
  (diffuser, value), test_expert.py::test_sigkill_then_rerun_gives_the_uninterrupted_weights (the expert)
* dataset build killed or failing mid-write: test_data.py::test_killed_write_leaves_nothing_a_rerun_would_trust,
  ::test_failed_write_leaves_nothing_behind
* sweep resume keeps finished episodes; other settings refused: test_sweep.py::test_resume_keeps_finished_episodes,
  ::test_sweep_refuses_mixing_and_bad_windows; worker split: ::test_worker_count_does_not_change_results
* atomic checkpoint writes: test_expert.py::test_atomic_save_leaves_no_temp_files
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import module_dataset, poison_loss, tiny_common, tiny_runs

from diffusion_rl import doctor, pretrained, sweep
from diffusion_rl import planner as planner_module
from diffusion_rl.checkpoint import CheckpointError, load_checkpoint
from diffusion_rl.cli import main
from diffusion_rl.collect import EpisodeCache
from diffusion_rl.data import is_complete_dataset, load_episodes
from diffusion_rl.planner import rollout
from diffusion_rl.training import DiffuserConfig, TrainingError, ValueConfig, train

DATA = "walker2d/faults-tiny-v0"
COMMON = tiny_common(DATA)
TINY_D = DiffuserConfig(total_steps=80, checkpoint_every=40, **COMMON)
TINY_V = ValueConfig(total_steps=40, checkpoint_every=20, **COMMON)
RESULT_FILES = ("episodes.csv", "summary.json", "drift.csv", "shift.csv", "video_episodes.npz")


# One tiny dataset for the whole module (an untrained policy: short episodes that fall).
shared_root, minari_root = module_dataset(DATA)


@pytest.fixture(scope="module")
def runs(shared_root, tmp_path_factory) -> tuple[Path, Path]:
    return tiny_runs(shared_root, tmp_path_factory, TINY_D, TINY_V)


@pytest.fixture(scope="module")
def tiny_planner(runs):
    return pretrained.load_run(*runs)


@pytest.fixture(scope="module")
def cfg(runs) -> sweep.SweepConfig:
    """12 episodes (k = 1 and 4 unguided, k = 4 guided, 4 seeds) of at most 60 steps, in this process."""
    return sweep.SweepConfig(windows="1,4", guided_windows="4", episodes=4, max_steps=60, workers=1,
                             diffuser=str(runs[0]), value=str(runs[1]))


def sweep_args(cfg: sweep.SweepConfig, out: Path) -> list[str]:
    """The sweep command line of ``cfg``."""
    return ["sweep", "--out", str(out), "--diffuser", cfg.diffuser, "--value", cfg.value, "--windows", cfg.windows,
            "--guided-windows", cfg.guided_windows, "--episodes", str(cfg.episodes), "--max-steps", str(cfg.max_steps),
            "--workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def reference(cfg, shared_root, tmp_path_factory) -> Path:
    """The same sweep, uninterrupted."""
    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(shared_root))
        sweep.run_sweep(cfg, out, progress=False)
    return out


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI in this process; assert it failed with one clean ``error:`` message and return it."""
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- bad input at the command line


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--window", "0"], r"1\.\.8"),
    (["evaluate", "--window", "8", "--guidance-scale", "-1"], "guidance scale"),
    (["evaluate", "--window", "8", "--guidance-scale", "nan"], "guidance scale"),
    (["evaluate", "--window", "8", "--guidance-scale", "inf"], "guidance scale"),
    (["evaluate", "--device", "tpu9"], "Unknown device"),
    (["make-dataset", "--dataset-id", "/etc/x-v0", "--episodes", "1"], "is a path"),
    (["train-diffuser", "--dataset-id", "../x-v0", "--run-dir", "{tmp}/r"], "is a path"),
    (["train-value", "--dataset-id", "/abs/x-v0", "--run-dir", "{tmp}/r"], "is a path"),
    (["train-diffuser", "--dataset-id", "walker2d/absent-v0", "--run-dir", "{tmp}/r"], "make-dataset"),
    (["train-diffuser", "--horizon", "6", "--run-dir", "{tmp}/r"], "multiple of 4"),
    (["sweep", "--out", "{tmp}/s", "--windows", "0"], r"1\.\.8"),
    (["sweep", "--out", "{tmp}/s", "--guidance-scale", "nan"], "guidance scale"),
    (["sweep", "--out", "{tmp}/s", "--guidance-scale", "-1"], "guidance scale"),
])
def test_cli_bad_input_is_one_error_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an absent remote id fails at once, not after a network timeout
    err = cli_error(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert re.search(message, err), err
    # A refused sweep writes nothing: a bad sweep.json would block the folder for the corrected command.
    assert not (tmp_path / "s").exists()


def test_cli_file_system_errors_are_one_error_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    err = cli_error(capsys, "sweep", "--out", str(blocker / "sweep"), "--windows", "1", "--guided-windows", "none")
    assert "a-file" in err


def test_cli_refuses_a_file_that_is_not_a_checkpoint(runs, tmp_path, capsys):
    notes = tmp_path / "notes.pt"
    notes.write_text("hello")
    assert "not a readable" in cli_error(capsys, "evaluate", "--diffuser", str(notes), "--no-progress")
    # A denoiser checkpoint given as the value network: another architecture.
    err = cli_error(capsys, "evaluate", "--diffuser", str(runs[0]), "--value", str(runs[0]), "--no-progress")
    assert "'diffuser' checkpoint, but a 'value'" in err


# ----------------------------------------------------------------------------- shapes and horizons that do not fit


def test_planner_refuses_states_of_another_environment(tiny_planner):
    with pytest.raises(ValueError, match=r"observations must have shape \(B, 17\)"):
        rollout(tiny_planner, [0], window=1, max_steps=5, env_id="Hopper-v5")


def test_value_network_of_another_horizon_is_refused(runs, tmp_path, capsys):
    v8 = tmp_path / "v8"
    train(replace(TINY_V, horizon=8, total_steps=2, checkpoint_every=2), v8, progress=False)
    with pytest.raises(ValueError, match="horizon 8.*horizon 4.*do not belong together"):
        pretrained.load_run(runs[0], v8)
    assert "do not belong together" in cli_error(capsys, "evaluate", "--diffuser", str(runs[0]), "--value", str(v8))


def test_resume_with_another_horizon_is_refused(runs, tmp_path):
    shutil.copytree(runs[0], tmp_path / "r")
    with pytest.raises(CheckpointError, match="different options.*horizon"):
        train(replace(TINY_D, horizon=8), tmp_path / "r", progress=False)
    assert load_checkpoint(tmp_path / "r" / "checkpoint.pt")["step"] == TINY_D.total_steps  # untouched


# ----------------------------------------------------------------------------- NaN in training and in the simulation


def test_nan_value_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    poison_loss(monkeypatch, "value_loss", at_call=25)
    with pytest.raises(TrainingError, match="step 25.*step 20"):
        train(TINY_V, tmp_path / "nan", progress=False)
    assert load_checkpoint(tmp_path / "nan" / "checkpoint.pt", kind="value")["step"] == 20


def test_nan_expert_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from diffusion_rl import expert

    real, calls = expert.SAC.update, {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        out = real(self, batch)
        return {**out, "critic_loss": out["critic_loss"] * float("nan")} if calls["n"] == 150 else out

    monkeypatch.setattr(expert.SAC, "update", poisoned)
    cfg = expert.SACConfig(total_steps=400, learning_starts=100, batch_size=32, hidden=32, eval_every=1000, eval_episodes=1,
                           checkpoint_every=100)
    with pytest.raises(TrainingError, match="step 250.*critic_loss nan.*step 200"):
        expert.train_sac(cfg, tmp_path / "sac", progress=False)
    assert load_checkpoint(tmp_path / "sac" / "checkpoint.pt", kind="sac")["step"] == 200


class _BlowUp(gym.Wrapper):
    """Breaks the simulation at step ``at``: a NaN observation, or a state MuJoCo finds NaN-huge and resets."""

    def __init__(self, env: gym.Env, at: int, how: str):
        super().__init__(env)
        self.at, self.how, self.t = at, how, 0

    def step(self, action):
        self.t += 1
        if self.t == self.at and self.how == "unstable":
            self.env.unwrapped.data.qvel[:] = 1e12  # MuJoCo warns, resets the state, and the next observation looks fine
        obs, *rest = self.env.step(action)
        if self.t == self.at and self.how == "nan":
            obs = np.full_like(obs, np.nan)
        return (obs, *rest)


def _break_first_env(monkeypatch, how: str, at: int = 5) -> None:
    """Make the first environment the rollout creates blow up at step ``at``."""
    real, made = planner_module.make_env, {"n": 0}

    def make_env(*args, **kwargs):
        made["n"] += 1
        env = real(*args, **kwargs)
        return _BlowUp(env, at, how) if made["n"] == 1 else env

    monkeypatch.setattr(planner_module, "make_env", make_env)


@pytest.mark.parametrize("how", ["nan", "unstable"])
def test_nan_state_ends_the_episode_and_flags_it(tiny_planner, tmp_path, monkeypatch, how):
    monkeypatch.chdir(tmp_path)  # MuJoCo logs its warning to MUJOCO_LOG.TXT in the working folder
    clean = rollout(tiny_planner, [3, 4], window=1, max_steps=40)
    _break_first_env(monkeypatch, how)
    broken, other = rollout(tiny_planner, [3, 4], window=1, max_steps=40, record=True)
    assert broken.diverged and not broken.fell and broken.length == 5
    assert np.isfinite(broken.total_return) and len(broken.states) == 6
    assert not other.diverged and (other.total_return, other.length) == (clean[1].total_return, clean[1].length)


def test_a_diverged_episode_is_recorded_and_counted_by_the_sweep(cfg, tmp_path, monkeypatch):
    _break_first_env(monkeypatch, "nan")
    small = replace(cfg, windows="1", guided_windows="none", episodes=2)
    summary = sweep.run_sweep(small, tmp_path, progress=False)
    assert summary["settings"][0]["diverged"] == 1
    rows = {r["seed"]: r for r in sweep.load_results(tmp_path).episodes}
    assert rows[10000]["diverged"] and rows[10000]["length"] == 5 and not rows[10001]["diverged"]
    assert sweep.load_episode(sweep.episode_path(tmp_path, sweep.Setting(1), 10000)).diverged


# ----------------------------------------------------------------------------- the sweep: killed, damaged, foreign

# Runs the sweep command with a pause after each episode it saves (a slow machine), so that the
# test's SIGKILL lands mid-run, between finished and unfinished episodes, every time.
_SLOW_SWEEP = """
import sys, time
import diffusion_rl.sweep as sweep
real = sweep.save_episode
def slow(path, result):
    real(path, result)
    time.sleep(0.3)
sweep.save_episode = slow
from diffusion_rl.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sweep_killed_mid_run_resumes_to_the_uninterrupted_results(cfg, reference, tmp_path):
    out = tmp_path / "killed"
    args = sweep_args(cfg, out)
    proc = _kill_when([sys.executable, "-c", _SLOW_SWEEP, *args], None, lambda: len(list((out / "episodes").glob("*.npz"))) >= 2)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "episodes").glob("*.npz")}
    total = len(list((reference / "episodes").glob("*.npz")))
    assert 2 <= len(kept) < total, "the kill should land mid-run"
    assert not any((out / name).exists() for name in RESULT_FILES)  # no analysis was written
    for name in kept:  # every episode file present is complete
        assert (out / "episodes" / name).read_bytes() == (reference / "episodes" / name).read_bytes(), name
    # A kill inside an atomic write leaves a temp file like this one: it must never count as the episode.
    missing = next(p for p in sorted((reference / "episodes").glob("*.npz")) if p.name not in kept)
    (out / "episodes" / f".{missing.name}.x1y2z3.tmp").write_bytes(missing.read_bytes()[:100])

    rerun = subprocess.run([sys.executable, "-m", "diffusion_rl", *args], check=False, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    for name, mtime in kept.items():
        assert (out / "episodes" / name).stat().st_mtime_ns == mtime, f"{name} was redone"
    assert not list(out.rglob("*.tmp")), "the resumed run removes temp files left by the kill"
    last = json.loads((out / "sweep.json").read_text())["runs"][-1]
    assert (last["episodes_kept"], last["episodes_run"]) == (len(kept), total - len(kept))
    for p in (reference / "episodes").glob("*.npz"):
        assert (out / "episodes" / p.name).read_bytes() == p.read_bytes(), p.name
    for name in RESULT_FILES:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_damaged_episode_file_is_named_with_what_to_do(cfg, reference, tmp_path, capsys):
    out = tmp_path / "damaged"
    shutil.copytree(reference, out)
    victim = sweep.episode_path(out, sweep.Setting(4), 10001)
    victim.write_bytes(victim.read_bytes()[:500])
    with pytest.raises(ValueError, match=f"{victim.name} is damaged.*Delete it and rerun"):
        sweep.run_sweep(cfg, out, progress=False)
    assert victim.name in cli_error(capsys, *sweep_args(cfg, out))
    victim.unlink()  # what the message says to do
    sweep.run_sweep(cfg, out, progress=False)
    assert json.loads((out / "sweep.json").read_text())["runs"][-1]["episodes_run"] == 1
    for name in RESULT_FILES:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.mark.parametrize("content", ["{not json", "[1, 2, 3]", '{"spec": "another tool"}', "planner"])
def test_foreign_sweep_json_is_refused(cfg, reference, tmp_path, capsys, content):
    out = tmp_path / "foreign"
    out.mkdir()
    if content == "planner":  # a finished sweep of another planner
        record = json.loads((reference / "sweep.json").read_text())
        record["spec"]["planner"]["sha256"]["diffuser"] = "0" * 64
        content = json.dumps(record)
    (out / "sweep.json").write_text(content)
    with pytest.raises(ValueError, match="not the record of a diffusion_rl sweep|other settings, seeds or planner"):
        sweep.run_sweep(cfg, out, progress=False)
    assert (out / "sweep.json").read_text() == content  # left as it was
    assert not (out / "episodes").exists()
    cli_error(capsys, *sweep_args(cfg, out))


# ----------------------------------------------------------------------------- make-dataset killed mid-build


def _tiny_policy_file(folder: Path, obs_dim: int = 17, seed: int = 0) -> Path:
    """A small untrained actor written as a policy file with its sidecar, for ``make-dataset --policy``
    (``obs_dim`` 18: one that also sees a goal, such as the speed policy's target)."""
    from safetensors.torch import save_file

    from diffusion_rl.checkpoint import sha256_file
    from diffusion_rl.expert import Actor

    torch.manual_seed(seed)
    path = folder / f"tiny-policy-{obs_dim}.safetensors"
    save_file(Actor(obs_dim, 6, hidden=32).state_dict(), str(path))
    path.with_suffix(".json").write_text(json.dumps({"obs_dim": obs_dim, "act_dim": 6, "hidden": 32, "sha256": sha256_file(path)}))
    return path


def _make_dataset_args(dataset_id: str, size: dict, policy: Path) -> list[str]:
    """The CLI command for ``make_dataset(dataset_id, **size)`` (size: n_episodes or min_steps)."""
    flag, n = ("--episodes", size["n_episodes"]) if "n_episodes" in size else ("--steps", size["min_steps"])
    return [sys.executable, "-m", "diffusion_rl", "make-dataset", "--dataset-id", dataset_id, flag, str(n),
            "--policy", str(policy), "--no-progress"]


def _kill_when(args: list[str], env: dict | None, ready, timeout: float = 120) -> subprocess.Popen:
    """Start ``args`` and SIGKILL it the moment ``ready()`` holds (or when it has ended, or after ``timeout`` s)."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + timeout
    while proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc


def _episodes(root: Path, dataset_id: str, monkeypatch) -> list:
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return load_episodes(dataset_id)


def _assert_same_as_uninterrupted(tmp_path: Path, root: Path, dataset_id: str, policy: Path, size: dict, monkeypatch) -> None:
    """The uninterrupted build, elsewhere, has the same episodes bit for bit and the same metadata."""
    from diffusion_rl.collect import make_dataset

    ref_root = tmp_path / "ref"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(ref_root))
    make_dataset(dataset_id, **size, policy_path=policy, progress=False)
    ref, got = _episodes(ref_root, dataset_id, monkeypatch), _episodes(root, dataset_id, monkeypatch)
    assert len(got) == len(ref) == size.get("n_episodes", len(ref))
    for a, b in zip(got, ref):
        for field in ("observations", "actions", "rewards"):
            assert np.array_equal(getattr(a, field), getattr(b, field))
        assert (a.terminated, a.truncated) == (b.terminated, b.truncated)
    final = Path(*dataset_id.split("/"))
    meta = [json.loads((r / final / "data" / "metadata.json").read_text()) for r in (root, ref_root)]
    assert meta[0] == meta[1]


@pytest.mark.slow
@pytest.mark.parametrize("size", [{"n_episodes": 600}, {"min_steps": 9000}])
def test_make_dataset_killed_mid_collection_keeps_its_finished_episodes(tmp_path, monkeypatch, size):
    from diffusion_rl.collect import make_dataset
    from diffusion_rl.expert import load_policy

    dataset_id, root = "walker2d/killed-collect-v0", tmp_path / "minari"
    policy = _tiny_policy_file(tmp_path)
    kept = root / ".episodes-walker2d--killed-collect-v0"
    proc = _kill_when(_make_dataset_args(dataset_id, size, policy), {**os.environ, "MINARI_DATASETS_PATH": str(root)},
                      lambda: len(list(kept.glob("episode-*.npz"))) >= 100)
    assert proc.returncode == -signal.SIGKILL, "the kill should land while episodes are collected"
    n_kept = len(list(kept.glob("episode-*.npz")))
    assert n_kept >= 100 and not (root / "walker2d" / "killed-collect-v0").exists()
    (kept / "episode-130.npz").write_bytes(b"torn")  # a damaged kept episode is collected again, not trusted
    saved_steps = sum(len(np.load(f)["actions"]) for f in kept.glob("episode-*.npz") if f.name != "episode-130.npz")

    # The rerun steps the simulator only for the episodes that were not finished.
    actor, meta = load_policy(policy)
    stepped = []

    def counting(obs: np.ndarray, noise: np.ndarray) -> np.ndarray:
        stepped.append(len(obs))
        return actor.act(obs, noise=noise)

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    ds = make_dataset(dataset_id, **size, policy=counting, policy_meta=meta, progress=False)
    assert n_kept < ds.total_episodes, "the kill should land mid-collection"
    if "n_episodes" in size:
        assert sum(stepped) == ds.total_steps - saved_steps
    else:  # a step target also runs the 15 other environments' episodes in flight when it is met
        longest = max(len(ep.actions) for ep in _episodes(root, dataset_id, monkeypatch))
        assert ds.total_steps - saved_steps <= sum(stepped) <= ds.total_steps - saved_steps + 15 * longest
    assert not kept.exists()
    _assert_same_as_uninterrupted(tmp_path, root, dataset_id, policy, size, monkeypatch)

    # Episodes kept for another policy are never mixed into a build.
    other = EpisodeCache(tmp_path / "other", {"policy_sha256": "a"})
    other.save(7, {"observations": np.zeros((2, 17)), "actions": np.zeros((1, 6)), "rewards": np.zeros(1),
                   "terminations": np.zeros(1, bool), "truncations": np.zeros(1, bool)})
    assert EpisodeCache(tmp_path / "other", {"policy_sha256": "a"}).load(7) is not None
    assert EpisodeCache(tmp_path / "other", {"policy_sha256": "b"}).load(7) is None


@pytest.mark.slow
def test_make_dataset_killed_mid_build_reruns_to_the_same_dataset(tmp_path, monkeypatch):

    dataset_id, root = "walker2d/killed-cli-v0", tmp_path / "minari"
    policy = _tiny_policy_file(tmp_path)
    # 300 short episodes: Minari takes a few tenths of a second to write them, long enough to be caught at it.
    args = _make_dataset_args(dataset_id, {"n_episodes": 300}, policy)
    env = {**os.environ, "MINARI_DATASETS_PATH": str(root)}
    for _ in range(3):  # on a very busy machine the write may finish between two looks; then try again
        proc = _kill_when(args, env, lambda: bool(list(root.glob(".staging-*"))))
        if proc.returncode == -signal.SIGKILL:
            break
        shutil.rmtree(root)
    assert proc.returncode == -signal.SIGKILL, "the kill should land while Minari writes"
    final = Path(*dataset_id.split("/"))
    # Whatever the kill interrupted, nothing half-written is visible under the dataset's id.
    assert not (root / final).exists() or is_complete_dataset(root / final)

    rerun = subprocess.run(args, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert is_complete_dataset(root / final) and not list(root.glob(".staging-*"))
    _assert_same_as_uninterrupted(tmp_path, root, dataset_id, policy, {"n_episodes": 300}, monkeypatch)
    # A third run finds the finished dataset and keeps it.
    before = (root / final / "data" / "main_data.hdf5").stat().st_mtime_ns
    assert subprocess.run(args, check=False, capture_output=True, env=env, timeout=300).returncode == 0
    assert (root / final / "data" / "main_data.hdf5").stat().st_mtime_ns == before


# ----------------------------------------------------------------------------- doctor


def test_doctor_reports_this_machine(shared_root):
    report = doctor.run_doctor(verbose=False)
    for name in ("python", "torch", "numpy", "gymnasium", "mujoco", "minari", "safetensors"):
        assert report["versions"][name], name
    assert report["torch"]["threads"] >= 1 and isinstance(report["torch"]["cuda"], bool)
    assert {r["file"] for r in report["assets"]["files"]} >= {"expert-walker2d-sac.safetensors", "walker2d-h8-diffuser.safetensors",
                                                               "walker2d-h8-value.safetensors"}
    assert all(r["ok"] for r in report["assets"]["files"])
    assert not report["sweep"]["missing"] and report["sweep"]["matches_shipped_planner"]
    (ds,) = report["datasets"]["datasets"]
    assert (ds["id"], ds["episodes"], ds["fits_walker2d"]) == (DATA, 6, True)
    assert report["datasets"]["root"] == str(shared_root)
    # Here every problem, if any, is the GL backend (a machine without one still passes the rest).
    assert report["ok"] == report["gl"]["works"]
    assert all("rendering fails" in p for p in report["problems"])


def test_doctor_command_exits_0_and_ends_with_a_verdict():
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "diffusion_rl", "doctor"], check=False, capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - t0 < 30
    assert "Traceback" not in proc.stderr
    works = "works (backend" in proc.stdout
    assert proc.returncode == (0 if works else 1), proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("verdict: ")


def test_doctor_flags_tampered_and_missing_assets(tmp_path, monkeypatch, capsys):
    assets = tmp_path / "assets"
    (assets / "window_sweep").mkdir(parents=True)
    for p in doctor.ASSETS.glob("*.*"):
        shutil.copy(p, assets / p.name)
    for p in (doctor.ASSETS / "window_sweep").glob("*.*"):
        shutil.copy(p, assets / "window_sweep" / p.name)
    weights = assets / "walker2d-h8-value.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    (assets / "expert-walker2d-sac.safetensors").unlink()
    (assets / "window_sweep" / "summary.json").unlink()
    with (assets / "window_sweep" / "drift.csv").open("a") as f:
        f.write("1,2,3\n")
    monkeypatch.setattr(doctor, "ASSETS", assets)
    report = doctor.run_doctor(verbose=False)
    bad = {r["file"]: r for r in report["assets"]["files"] if not r["ok"]}
    assert set(bad) == {"walker2d-h8-value.safetensors", "expert-walker2d-sac.safetensors"}
    assert "SHA-256" in bad["walker2d-h8-value.safetensors"]["error"] and bad["expert-walker2d-sac.safetensors"]["error"] == "missing"
    assert report["sweep"]["missing"] == ["summary.json"]
    assert not report["ok"]
    for what in ("walker2d-h8-value.safetensors does not match", "expert-walker2d-sac.safetensors is missing", "summary.json"):
        assert any(what in p and "git checkout" in p for p in report["problems"]), what
    assert any("drift.csv in" in p and "differ from the SHA-256" in p for p in report["problems"])
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "problem:" in out and out.strip().splitlines()[-1].startswith("verdict: ")


def test_doctor_flags_edited_study_results(tmp_path, monkeypatch):
    study = tmp_path / "assets" / "some_study"
    study.mkdir(parents=True)
    (study / "episodes.csv").write_text("setting,seed\na,1\n")
    record = {"files_sha256": {"episodes.csv": doctor._sha256(study / "episodes.csv")}}
    (study / "record.json").write_text(json.dumps(record))
    monkeypatch.setattr(doctor, "ASSETS", tmp_path / "assets")
    assert doctor.run_doctor(verbose=False)["studies"] == {"some_study": "ok"}
    (study / "episodes.csv").write_text("setting,seed\na,2\n")
    report = doctor.run_doctor(verbose=False)
    assert report["studies"]["some_study"] == "does not verify: episodes.csv"
    assert any("some_study" in p and "record.json" in p for p in report["problems"])


def test_edited_sweep_results_are_refused(tmp_path):
    folder = shutil.copytree(sweep.SHIPPED, tmp_path / "sweep", ignore=shutil.ignore_patterns("episodes"))
    assert set(sweep.load_results(folder).meta["files_sha256"]) == set(sweep.RESULT_FILES)
    summary = json.loads((folder / "summary.json").read_text())
    summary["trend"] = {"rho": 1.0}  # a doctored result
    (folder / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="summary.json in .* differ from the SHA-256 recorded .* rerun"):
        sweep.load_results(folder)


def test_doctor_reports_a_broken_gl_backend(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "nonsense")
    report = doctor.run_doctor(verbose=False)
    assert not report["gl"]["works"] and "nonsense" in report["gl"]["error"]
    (problem,) = [p for p in report["problems"] if "rendering fails" in p]
    assert "MUJOCO_GL='nonsense'" in problem and "apt-get install" in problem
    assert all(r["ok"] for r in report["assets"]["files"])  # the other probes still ran


def test_doctor_survives_a_probe_that_crashes(monkeypatch, capsys):
    def broken() -> set[str]:
        raise ImportError("no module named torch")

    monkeypatch.setattr(doctor, "_expected_assets", broken)
    report = doctor.run_doctor()
    assert not report["ok"] and any(p.startswith("assets: the check itself failed") for p in report["problems"])
    assert "versions" in report and "sweep" in report
    assert "verdict:" in capsys.readouterr().out


def test_two_builds_of_one_dataset_at_once_both_succeed_with_one_dataset(tmp_path):
    """Two processes (a chapter under nbval and the same chapter in the book build, say) ask for a missing dataset at once."""
    dataset_id, root = "walker2d/twice-v0", tmp_path / "minari"
    args = _make_dataset_args(dataset_id, {"n_episodes": 40}, _tiny_policy_file(tmp_path))
    env = {**os.environ, "MINARI_DATASETS_PATH": str(root)}
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert is_complete_dataset(root / Path(*dataset_id.split("/"))) and not list(root.glob(".staging-*"))
