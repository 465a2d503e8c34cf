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
