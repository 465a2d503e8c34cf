"""Data recipes (``make-dataset --recipe``): DART's clean labels for noisy, pushed episodes, identical rebuilds, bad input.

A tiny untrained actor stands in for the expert (its episodes are short). The kill-safety of the
shared build machinery is tested for the expert recipe in test_faults.py (SIGKILL mid-collection and
mid-write); here an interrupted DART build resumes from its kept episodes to the uninterrupted dataset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_faults import _make_dataset_args, _tiny_policy_file

from diffusion_rl import collect, recipes
from diffusion_rl.cli import main
from diffusion_rl.data import DatasetError, load_dataset
from diffusion_rl.disturbances import DisturbanceWrapper
from diffusion_rl.envs import make_env
from diffusion_rl.expert import load_policy

DART = "walker2d/dart-tiny-v0"
# Short push intervals and a strong push: the tiny actor's episodes are short, and must meet pushes.
OPTIONS = {"action_noise": 0.3, "max_push": 300.0, "push_duration": 2, "min_interval": 3, "max_interval": 6}
N_EPISODES = 6


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory) -> Path:
    return _tiny_policy_file(tmp_path_factory.mktemp("policy"))


def build(root: Path, monkeypatch, policy_file: Path, dataset_id: str = DART, **kw):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return collect.make_dataset(dataset_id, n_episodes=N_EPISODES, policy_path=policy_file, progress=False, recipe="expert-dart",
                                options=OPTIONS, **kw)


def episodes(ds) -> list:
    return list(ds.iterate_episodes())


def test_dart_records_the_clean_action_and_executes_the_noisy_one(tmp_path, monkeypatch, policy_file):
    ds = build(tmp_path / "minari", monkeypatch, policy_file)
    actor, _ = load_policy(policy_file)
    behaviour = recipes.dart_behaviour(actor, recipes.DartOptions(**OPTIONS))
    assert len(episodes(ds)) == N_EPISODES
    pushed = 0
    for k, ep in enumerate(episodes(ds)):
        seed = collect.FIRST_SEED + k
        # The recorded label is the expert's deterministic action for the recorded observation.
        clean = actor.act(ep.observations[:-1], deterministic=True).astype(np.float32)
        assert np.array_equal(ep.actions, clean)
        # Replaying the labels does not reproduce the episode; replaying label + the seed's noise (clipped), under the
        # seed's pushes, does: that is what was executed.
        disturbance = behaviour.disturb(seed)
        pushed += len(ep.actions) > disturbance.push_interval  # the first push came before the episode ended
        rng = np.random.default_rng(seed)
        executed = np.stack([np.clip(a + OPTIONS["action_noise"] * rng.standard_normal(6), -1, 1)
                             for a in actor.act(ep.observations[:-1], deterministic=True)])
        for actions, same in ((executed, True), (ep.actions, False)):
            env = DisturbanceWrapper(make_env(), disturbance)
            obs = [env.reset(seed=seed)[0]] + [env.step(a)[0] for a in actions]
            env.close()
            assert np.array_equal(np.array(obs), ep.observations) == same
    assert pushed >= N_EPISODES // 2, "most episodes should meet a push"
    md = ds.storage.metadata
    assert "DART" in md["algorithm_name"] and "--recipe expert-dart" in md["description"]
    assert md.get("ref_max_score") is None  # the tiny policy's sidecar has no evaluation; the shipped expert's does


def test_a_rebuild_and_an_interrupted_build_give_the_same_dataset(tmp_path, monkeypatch, policy_file):
    reference = episodes(build(tmp_path / "a", monkeypatch, policy_file))
    # Interrupt a build after three finished episodes (as a kill would): nothing is visible, the kept episodes stay.
    real, saved = collect.EpisodeCache.save, []

    def save_then_stop(self, seed, ep):
        real(self, seed, ep)
        saved.append(seed)
        if len(saved) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(collect.EpisodeCache, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "b", monkeypatch, policy_file)
    monkeypatch.setattr(collect.EpisodeCache, "save", real)
    kept = tmp_path / "b" / ".episodes-walker2d--dart-tiny-v0"
    assert len(list(kept.glob("episode-*.npz"))) == 3 and not (tmp_path / "b" / "walker2d" / "dart-tiny-v0").exists()
    assert json.loads((kept / "cache.json").read_text())["recipe"] == "expert-dart"  # never mixed with another recipe's episodes
    rebuilt = episodes(build(tmp_path / "b", monkeypatch, policy_file))
    assert len(rebuilt) == len(reference)
    for a, b in zip(rebuilt, reference):
        for field in ("observations", "actions", "rewards", "terminations", "truncations"):
            assert np.array_equal(getattr(a, field), getattr(b, field))
    meta = [json.loads((tmp_path / r / "walker2d" / "dart-tiny-v0" / "data" / "metadata.json").read_text()) for r in "ab"]
    assert meta[0] == meta[1]
    # The finished DART set is not taken for another recipe's.
    with pytest.raises(DatasetError, match="not by the expert recipe"):
        collect.make_dataset(DART, n_episodes=N_EPISODES, policy_path=policy_file, progress=False)


def test_the_default_ids_and_the_cli(tmp_path, monkeypatch, policy_file, capsys):
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    assert recipes.RECIPES["expert"].dataset_id == "walker2d/local-expert-v0"
    assert recipes.RECIPES["expert-dart"].dataset_id == "walker2d/local-expert-dart-v0"
    args = _make_dataset_args("walker2d/cli-dart-v0", {"n_episodes": 2}, policy_file)[3:]
    assert main(args + ["--recipe", "expert-dart", "--action-noise", "0.1", "--max-push", "50"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["episodes"] == 2 and "DART" in load_dataset("walker2d/cli-dart-v0", download=False).storage.metadata["algorithm_name"]


@pytest.mark.parametrize("extra, message", [
    (["--recipe", "nonsense"], "invalid choice"),
    (["--recipe", "expert-dart", "--action-noise", "nan"], "action_noise"),
    (["--recipe", "expert-dart", "--max-push", "-5"], "max_push"),
    (["--max-push", "100"], "takes no option max_push"),
])
def test_bad_recipe_input_is_one_error_line_and_writes_nothing(tmp_path, monkeypatch, policy_file, capsys, extra, message):
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    args = _make_dataset_args("walker2d/bad-v0", {"n_episodes": 1}, policy_file)[3:] + extra
    try:
        code = main(args)
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and "Traceback" not in "\n".join(err)
    assert not root.exists()


def test_the_medium_recipe_acts_with_the_medium_policy_and_scores_against_the_expert(tmp_path, monkeypatch):
    from diffusion_rl.expert import shipped_policy_path

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    ds = collect.make_dataset("walker2d/medium-tiny-v0", n_episodes=2, progress=False, recipe="medium")
    medium, medium_meta = load_policy(shipped_policy_path("medium"))
    expert, expert_meta = load_policy()
    md = ds.storage.metadata
    assert md["ref_max_score"] == expert_meta["eval_stochastic"]["mean"], "scores are normalized by the expert, as everywhere"
    assert medium_meta["sha256"] in md["description"] and "medium" in md["algorithm_name"]
    ep = next(ds.iterate_episodes())
    obs = ep.observations[:-1]
    # The recorded actions scatter around the medium policy's mean action, not the expert's.
    off_medium = np.abs(ep.actions - medium.act(obs, deterministic=True)).mean()
    off_expert = np.abs(ep.actions - expert.act(obs, deterministic=True)).mean()
    assert off_medium < off_expert
    with pytest.raises(ValueError, match="No shipped policy named"):
        shipped_policy_path("novice")


# ----------------------------------------------------------------------------- medium-replay and medium-expert


@pytest.fixture(scope="module")
def medium_run(tmp_path_factory):
    """A tiny SAC run and its exported actor, standing in for the medium run and the shipped medium policy."""
    from diffusion_rl import expert

    folder = tmp_path_factory.mktemp("medium")
    cfg = expert.SACConfig(total_steps=400, learning_starts=100, batch_size=32, hidden=32, eval_every=1000, eval_episodes=1,
                           checkpoint_every=1000, threads=1)
    ckpt = expert.train_sac(cfg, folder / "run", progress=False)
    policy = folder / "medium-walker2d-sac.safetensors"
    expert.export_policy(ckpt, policy, command="test")
    return ckpt, policy


@pytest.fixture
def tiny_medium(medium_run, monkeypatch):
    """The tiny run's actor as the shipped medium policy (the expert stays the shipped one)."""
    from diffusion_rl import expert

    real = expert.shipped_policy_path
    monkeypatch.setattr(expert, "shipped_policy_path", lambda name="expert": medium_run[1] if name == "medium" else real(name))
    return medium_run[0]


def replay(root: Path, monkeypatch, checkpoint: Path):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return collect.make_dataset(progress=False, recipe="medium-replay", options={"checkpoint": str(checkpoint)})


def test_medium_replay_is_the_run_s_replay_buffer_cut_into_its_episodes(tmp_path, monkeypatch, tiny_medium):
    import json as json_

    from diffusion_rl.checkpoint import load_checkpoint
    from diffusion_rl.expert import SACConfig, episode_reset_seed

    ds = replay(tmp_path / "a", monkeypatch, tiny_medium)
    state = load_checkpoint(tiny_medium, kind="sac")
    run_episodes = json_.loads(state["episodes"])
    eps = episodes(ds)
    assert ds.spec.dataset_id == "walker2d/local-medium-replay-v0" and ds.total_steps == 400
    assert len(eps) == len(run_episodes) + 1, "every finished episode, and the one training stopped in"
    for ep, (end, ret, length) in zip(eps, run_episodes):
        assert len(ep.actions) == length and ep.rewards.sum() == pytest.approx(ret, abs=0.01)
        assert ep.terminations[-1] != ep.truncations[-1] and not ep.terminations[:-1].any() and not ep.truncations[:-1].any()
    assert eps[-1].truncations[-1] and not eps[-1].terminations.any()
    # The first observation is the reset state of the run's first episode (stored in float32).
    first, _ = make_env().reset(seed=episode_reset_seed(SACConfig(**state["config"]), 0))
    assert np.allclose(eps[0].observations[0], first, atol=1e-6)
    md = ds.storage.metadata
    assert "replay buffer" in md["algorithm_name"] and md["ref_max_score"] == load_policy()[1]["eval_stochastic"]["mean"]
    # Built again into another folder: the same data.
    again = episodes(replay(tmp_path / "b", monkeypatch, tiny_medium))
    for a, b in zip(eps, again, strict=True):
        for field in ("observations", "actions", "rewards", "terminations", "truncations"):
            assert np.array_equal(getattr(a, field), getattr(b, field))


def _foreign_checkpoint(source: Path, folder: Path) -> Path:
    from diffusion_rl.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(source, kind="sac")
    state["config"]["env_id"] = "Hopper-v5"
    save_checkpoint(folder / "hopper.pt", state)
    return folder / "hopper.pt"


@pytest.mark.parametrize("case, message", [
    ("missing", "No medium SAC checkpoint"),
    ("foreign", "not Walker2d-v5"),
    ("another run", "not the checkpoint the shipped medium policy was exported from"),
    ("not a checkpoint", "not a readable diffusion_rl checkpoint"),
])
def test_a_bad_medium_checkpoint_is_one_error_line_and_writes_nothing(tmp_path, monkeypatch, medium_run, capsys, case, message):
    from diffusion_rl import expert

    source = medium_run[0]
    path = {"missing": tmp_path / "nothing.pt", "foreign": None, "another run": source, "not a checkpoint": tmp_path / "junk.pt"}[case]
    if case == "foreign":
        path = _foreign_checkpoint(source, tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    if case != "another run":  # the shipped medium policy is not this tiny run's
        real = expert.shipped_policy_path
        monkeypatch.setattr(expert, "shipped_policy_path", lambda name="expert": medium_run[1] if name == "medium" else real(name))
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    assert main(["make-dataset", "--recipe", "medium-replay", "--checkpoint", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not root.exists()


def test_medium_expert_is_the_medium_set_then_the_expert_set(tmp_path, monkeypatch, policy_file):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    # Small stand-ins for the two sets (built by their own recipes; the assembly takes them whatever their size).
    medium = episodes(collect.make_dataset(n_episodes=3, policy_path=policy_file, progress=False, recipe="medium"))
    expert_set = episodes(collect.make_dataset(n_episodes=2, policy_path=policy_file, progress=False, first_seed=500))
    ds = collect.make_dataset(progress=False, recipe="medium-expert")
    both = episodes(ds)
    assert ds.spec.dataset_id == "walker2d/local-medium-expert-v0" and len(both) == 5
    for a, b in zip(both, medium + expert_set, strict=True):
        for field in ("observations", "actions", "rewards", "terminations", "truncations"):
            assert np.array_equal(getattr(a, field), getattr(b, field))
    seeds = [m["seed"] for m in ds.storage.get_episode_metadata(range(5))]
    assert seeds == [123, 124, 125, 500, 501]
    assert "1 : 1" in ds.storage.metadata["algorithm_name"]
    with pytest.raises(ValueError, match="takes no policy"):
        collect.make_dataset(progress=False, recipe="medium-expert", n_episodes=4)


def test_a_medium_expert_build_killed_mid_write_leaves_nothing_loadable_and_reruns_the_same(tmp_path, monkeypatch, policy_file):
    import minari

    from diffusion_rl.data import is_complete_dataset, local_dataset_path

    def sources(root):
        monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
        collect.make_dataset(n_episodes=2, policy_path=policy_file, progress=False, recipe="medium")
        collect.make_dataset(n_episodes=2, policy_path=policy_file, progress=False, first_seed=500)

    sources(tmp_path / "a")
    reference = episodes(collect.make_dataset(progress=False, recipe="medium-expert"))
    sources(tmp_path / "b")
    real = minari.create_dataset_from_buffers

    def write_half_then_die(*args, **kwargs):
        real(*args, **kwargs)  # the staged copy is complete ...
        raise KeyboardInterrupt  # ... but the process dies before it is moved into place

    monkeypatch.setattr(minari, "create_dataset_from_buffers", write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        collect.make_dataset(progress=False, recipe="medium-expert")
    final = local_dataset_path("walker2d/local-medium-expert-v0")
    assert not final.exists() and not is_complete_dataset(final)
    with pytest.raises(DatasetError, match="is not in"):
        load_dataset("walker2d/local-medium-expert-v0", download=False)
    monkeypatch.setattr(minari, "create_dataset_from_buffers", real)
    rebuilt = episodes(collect.make_dataset(progress=False, recipe="medium-expert"))
    for a, b in zip(rebuilt, reference, strict=True):
        for field in ("observations", "actions", "rewards", "terminations", "truncations"):
            assert np.array_equal(getattr(a, field), getattr(b, field))


def test_the_speeds_recipe_asks_each_episode_for_its_target_and_records_the_plain_observation(tmp_path, monkeypatch):
    policy = _tiny_policy_file(tmp_path, obs_dim=18, seed=1)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    ds = collect.make_dataset("walker2d/speeds-tiny-v0", n_episodes=3, policy_path=policy, progress=False, recipe="speeds")
    actor, _ = load_policy(policy)
    options = recipes.SpeedOptions()
    targets = [recipes.episode_target_speed(collect.FIRST_SEED + k, options) for k in range(3)]
    assert len(set(targets)) == 3 and all(options.min_speed <= t <= options.max_speed for t in targets)
    for k, ep in enumerate(episodes(ds)):
        assert ep.observations.shape[1] == 17, "the target is not recorded"
        # Replaying the seed's noise with the seed's target appended reproduces the recorded actions.
        rng = np.random.default_rng(collect.FIRST_SEED + k)
        noise = np.stack([rng.standard_normal(6) for _ in ep.actions])
        seen = np.concatenate([ep.observations[:-1], np.full((len(ep.actions), 1), targets[k])], axis=1)
        np.testing.assert_allclose(ep.actions, actor.act(seen, noise=noise), atol=1e-6)
    with pytest.raises(ValueError, match="min_speed <= max_speed"):
        recipes.SpeedOptions(min_speed=3.0, max_speed=1.0)
    with pytest.raises(ValueError, match="finite"):
        recipes.SpeedOptions(max_speed=float("nan"))


def test_the_speeds_recipe_without_its_policy_names_the_commands_that_make_it(tmp_path, monkeypatch, capsys):
    from diffusion_rl import expert

    monkeypatch.setattr(expert, "ASSETS", tmp_path / "assets")  # a package whose speed policy is not trained yet
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    assert main(["make-dataset", "--recipe", "speeds", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train-expert --total-steps 400000 --seed 1 --task speed --run-dir runs/speed-sac" in err and "export-expert" in err
    assert not (tmp_path / "minari").exists() or not any((tmp_path / "minari").rglob("*.hdf5"))
