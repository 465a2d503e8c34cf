"""Windows, padding, normalizer, returns, ids, loading and the dataset build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from diffusion_rl.collect import dataset_summary, make_dataset
from diffusion_rl.data import (
    DatasetError,
    Episode,
    Normalizer,
    TrajectoryWindows,
    discounted_returns,
    load_dataset,
    load_episodes,
    local_dataset_path,
    sample_states,
    validate_dataset_id,
)


def synthetic_episode(T: int, terminated: bool, obs_dim: int = 3, act_dim: int = 2, start: float = 0.0) -> Episode:
    """Observations count up so every row is identifiable: obs[t] = start + t."""
    obs = np.tile((start + np.arange(T + 1, dtype=np.float32))[:, None], (1, obs_dim))
    act = np.tile((100 + start + np.arange(T, dtype=np.float32))[:, None], (1, act_dim))
    return Episode(obs, act, np.ones(T, np.float32), terminated=terminated, truncated=not terminated)


def unnormalized(w: TrajectoryWindows, x: torch.Tensor) -> np.ndarray:
    return w.normalizer.unnormalize(x.double().numpy())


# ----------------------------------------------------------------------------- windows


def test_truncated_episode_only_uses_windows_that_fit():
    w = TrajectoryWindows([synthetic_episode(10, terminated=False)], horizon=4, normalizer="gaussian")
    assert len(w) == 10 - 4 + 1
    last = unnormalized(w, w[len(w) - 1].trajectory)
    np.testing.assert_allclose(last[:, 2:], np.tile(np.arange(6, 10)[:, None], (1, 3)), atol=1e-4)
    assert not w.terminal.any(), "a time-limit cut is not a fall"


def test_terminated_episode_pads_with_absorbing_terminal_state():
    w = TrajectoryWindows([synthetic_episode(3, terminated=True)], horizon=4, normalizer="gaussian")
    assert len(w) == 3  # one window per step, even though the episode is shorter than H
    x = unnormalized(w, w[2].trajectory)  # starts at the last step
    # Row 0 is the last real step; rows 1.. repeat the terminal observation s_T = 3 with zero action.
    np.testing.assert_allclose(x[0], [102, 102, 2, 2, 2], atol=1e-4)
    np.testing.assert_allclose(x[1:, :2], 0, atol=1e-4)
    np.testing.assert_allclose(x[1:, 2:], 3, atol=1e-4)
    assert w.terminal.tolist() == [True, True, True]  # every window reaches the fall


def test_terminal_marks_exactly_the_windows_that_reach_the_fall():
    fell = synthetic_episode(10, terminated=True)
    w = TrajectoryWindows([fell, synthetic_episode(10, terminated=False)], horizon=4, termination_penalty=-100.0, value_scope="window")
    # The fallen episode has 10 windows (padded); those starting at steps 6..9 contain its last step 9.
    assert w.terminal.tolist() == [False] * 6 + [True] * 4 + [False] * 7
    assert bool((w.values[w.terminal] < -50).all()) and bool((w.values[~w.terminal] > 0).all())
    assert w[7].terminal and not w[0].terminal
    unpadded = TrajectoryWindows([fell], horizon=4, pad_terminal=False)
    assert unpadded.terminal.tolist() == [False] * 6 + [True]


def test_no_padding_option_and_layout():
    eps = [synthetic_episode(3, terminated=True), synthetic_episode(6, terminated=False, start=50)]
    w = TrajectoryWindows(eps, horizon=4, pad_terminal=False)
    assert len(w) == 3  # the short terminated episode contributes nothing, the other 6 - 4 + 1
    assert (w.act_dim, w.obs_dim, w.transition_dim) == (2, 3, 5)
    first = unnormalized(w, w[0].trajectory)
    np.testing.assert_allclose(first[0], [150, 150, 50, 50, 50], atol=1e-3)  # [action | observation]


@pytest.mark.parametrize("horizon", [8, 32])
def test_study_and_diffuser_horizons(horizon):
    w = TrajectoryWindows([synthetic_episode(40, terminated=False), synthetic_episode(10, terminated=True)], horizon=horizon)
    assert len(w) == (40 - horizon + 1) + 10
    assert w.sample(4).trajectory.shape == (4, horizon, 5)


def test_windows_never_cross_episodes():
    eps = [synthetic_episode(5, terminated=False, start=0), synthetic_episode(5, terminated=False, start=1000)]
    w = TrajectoryWindows(eps, horizon=3)
    for i in range(len(w)):
        obs = unnormalized(w, w[i].trajectory)[:, 2]
        assert np.allclose(np.diff(obs), 1, atol=1e-3)


def test_batch_matches_getitem():
    w = TrajectoryWindows([synthetic_episode(12, terminated=True), synthetic_episode(9, terminated=False)], horizon=4)
    idx = torch.tensor([0, 5, len(w) - 1])
    b = w.batch(idx)
    assert b.trajectory.shape == (3, 4, 5) and b.value.shape == (3,) and b.terminal.shape == (3,)
    for j, i in enumerate(idx.tolist()):
        assert torch.equal(b.trajectory[j], w[i].trajectory)
        assert torch.equal(b.value[j], w[i].value)


def test_sample_states_returns_states_with_their_real_futures():
    episodes = [synthetic_episode(12, False, start=0.0), synthetic_episode(30, True, start=1000.0)]
    states, futures = sample_states(episodes, 50, horizon=4, seed=3)
    assert states.shape == (50, 3) and futures.shape == (50, 4, 3)
    assert np.array_equal(states, futures[:, 0])
    # obs[t] = start + t: each future counts up by one from its state, inside one episode.
    assert np.array_equal(futures[..., 0] - states[:, None, 0], np.tile(np.arange(4), (50, 1)))
    again, _ = sample_states(episodes, 50, horizon=4, seed=3)
    assert np.array_equal(states, again) and not np.array_equal(states, sample_states(episodes, 50, 4, seed=4)[0])


def test_bad_horizon_and_empty():
    with pytest.raises(DatasetError):
        TrajectoryWindows([synthetic_episode(5, False)], horizon=0)
    with pytest.raises(DatasetError, match="shorter than the horizon"):
        TrajectoryWindows([synthetic_episode(2, False)], horizon=8)
    with pytest.raises(DatasetError):
        TrajectoryWindows([], horizon=8)


# ----------------------------------------------------------------------------- returns


def test_discounted_returns_closed_form():
    r = np.array([1.0, 2.0, 3.0])
    g = discounted_returns(r, 0.5)
    np.testing.assert_allclose(g, [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3])
    g = discounted_returns(r, 0.5, terminated=True, termination_penalty=-100)
    np.testing.assert_allclose(g[-1], 3 - 100)
    np.testing.assert_allclose(g[0], 1 + 0.5 * 2 + 0.25 * (3 - 100))


def test_window_values_episode_and_window_scope():
    ep = synthetic_episode(5, terminated=True)
    w_ep = TrajectoryWindows([ep], horizon=2, discount=0.9, termination_penalty=-10, value_scope="episode")
    expected = discounted_returns(ep.rewards, 0.9, True, -10)
    np.testing.assert_allclose(w_ep.values.numpy(), expected, rtol=1e-6)
    w_win = TrajectoryWindows([ep], horizon=2, discount=0.9, termination_penalty=-10, value_scope="window")
    # Inside a 2-step window: r_t + 0.9 r_{t+1}; the last window holds the penalised last step and padding.
    np.testing.assert_allclose(w_win.values.numpy(), [1.9, 1.9, 1.9, 1 + 0.9 * (1 - 10), 1 - 10], rtol=1e-6)


# ----------------------------------------------------------------------------- normalizer


@pytest.mark.parametrize("kind", ["gaussian", "minmax"])
def test_normalizer_round_trip(kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)) * [1, 10, 100, 0.01, 5, 0] + [0, -3, 7, 2, 0, 4]  # last dim constant
    n = Normalizer.fit(x, kind)
    y = n.normalize(x)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(n.unnormalize(y), x, rtol=1e-12, atol=1e-12)
    if kind == "minmax":
        assert y[:, :5].min() >= -1 - 1e-9 and y[:, :5].max() <= 1 + 1e-9
    else:
        np.testing.assert_allclose(y[:, :5].mean(0), 0, atol=1e-9)
        np.testing.assert_allclose(y[:, :5].std(0), 1, atol=1e-9)
    t = torch.tensor(x, dtype=torch.float32)
    torch.testing.assert_close(n.unnormalize(n.normalize(t)), t, rtol=1e-5, atol=1e-4)
    n2 = Normalizer.from_state_dict(n.state_dict())
    np.testing.assert_array_equal(n2.normalize(x), y)


def test_normalizer_unknown_kind():
    with pytest.raises(ValueError, match="gaussian"):
        Normalizer.fit(np.zeros((3, 2)), "zscore")


# ----------------------------------------------------------------------------- ids and loading


@pytest.mark.parametrize("bad", ["../evil-v0", "walker2d/../../x-v0", "/etc/passwd-v0", "~/x-v0", "no-version", "", "a//b-v0", "a\\b-v0"])
def test_bad_dataset_ids_are_refused(bad):
    with pytest.raises(DatasetError):
        validate_dataset_id(bad)
    with pytest.raises(DatasetError):
        load_dataset(bad)


def test_good_ids_stay_inside_the_datasets_folder(minari_root):
    assert validate_dataset_id("mujoco/walker2d/expert-v0") == "mujoco/walker2d/expert-v0"
    assert local_dataset_path("walker2d/local-expert-v0") == minari_root / "walker2d" / "local-expert-v0"


def test_remote_id_offline_fails_fast_and_names_the_local_command(monkeypatch):
    t0 = time.perf_counter()
    with pytest.raises(DatasetError, match="make-dataset"):
        load_dataset("mujoco/walker2d/expert-v0")
    assert time.perf_counter() - t0 < 5


def test_remote_id_with_hub_client_but_no_network_fails_fast(monkeypatch):
    import types

    import diffusion_rl.data as data

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.ModuleType("huggingface_hub"))
    monkeypatch.setattr(data, "_hub_reachable", lambda *a, **k: False)
    t0 = time.perf_counter()
    with pytest.raises(DatasetError, match="cannot be reached.*make-dataset"):
        load_dataset("mujoco/walker2d/expert-v0")
    assert time.perf_counter() - t0 < 5


# ----------------------------------------------------------------------------- building datasets


def test_tiny_dataset_written_and_reread_in_a_fresh_process(tiny_policy, minari_root):
    ds = make_dataset("walker2d/tiny-v0", n_episodes=4, policy=tiny_policy, progress=False)
    summary = dataset_summary(ds)
    assert summary["episodes"] == 4 and summary["steps"] > 4
    code = "import minari, json; d = minari.load_dataset('walker2d/tiny-v0'); print(json.dumps([d.total_episodes, d.total_steps, d.spec.env_spec.id]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [4, summary["steps"], "Walker2d-v5"]
    eps = load_episodes("walker2d/tiny-v0")
    assert [e.observations.shape[0] for e in eps] == [len(e) + 1 for e in eps]
    # Fixed seeds: the same episodes again, and a complete dataset is reused rather than rebuilt.
    again = make_dataset("walker2d/tiny-v0", n_episodes=4, policy=None, progress=False)
    assert dataset_summary(again) == summary
    with pytest.raises(DatasetError, match="already exists with 4 episodes.*--force"):
        make_dataset("walker2d/tiny-v0", n_episodes=5, policy=tiny_policy, progress=False)
    rebuilt = make_dataset("walker2d/tiny-v0", n_episodes=4, policy=tiny_policy, force=True, progress=False)
    assert dataset_summary(rebuilt)["mean_return"] == summary["mean_return"]


def test_min_steps_collects_whole_episodes_in_seed_order(tiny_policy):
    ds = make_dataset("walker2d/steps-v0", min_steps=60, policy=tiny_policy, progress=False)
    lengths = [len(ep.actions) for ep in ds.iterate_episodes()]
    assert sum(lengths) >= 60 and sum(lengths[:-1]) < 60
    assert [ep.id for ep in ds.iterate_episodes()] == list(range(len(lengths)))


def test_shape_mismatch_is_refused(minari_root):
    import warnings

    import minari
    from minari.data_collector import EpisodeBuffer

    rng = np.random.default_rng(0)
    buffers = [EpisodeBuffer(id=0, seed=0, observations=rng.normal(size=(6, 11)), actions=rng.uniform(-1, 1, (5, 3)).astype(np.float32),
                             rewards=np.ones(5), terminations=np.r_[np.zeros(4, bool), True], truncations=np.zeros(5, bool))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers("hopper/foreign-v0", buffers, env="Hopper-v5")
    with pytest.raises(DatasetError, match=r"\(11,\).*\(3,\).*Walker2d-v5.*\(17,\).*\(6,\)"):
        load_episodes("hopper/foreign-v0")


def test_failed_write_leaves_nothing_behind(tiny_policy, minari_root, monkeypatch):
    import minari

    real = minari.create_dataset_from_buffers

    def half_then_fail(*args, **kwargs):
        real(*args, **kwargs)  # a complete folder exists in staging ...
        raise OSError("disk full")  # ... and then the write fails

    monkeypatch.setattr(minari, "create_dataset_from_buffers", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        make_dataset("walker2d/fail-v0", n_episodes=2, policy=tiny_policy, progress=False)
    assert not local_dataset_path("walker2d/fail-v0").exists()
    assert not list(minari_root.glob(".staging-*"))


def test_killed_write_leaves_nothing_a_rerun_would_trust(minari_root, tiny_policy):
    # A real SIGKILL while minari is writing the episodes.
    script = textwrap.dedent(
        """
        import os, signal
        from diffusion_rl.expert import Actor
        from diffusion_rl.collect import make_dataset
        actor = Actor(17, 6, hidden=32)
        pol = lambda o, n: actor.act(o, noise=n)
        import minari.dataset._storages.hdf5_storage as h5
        real = h5.HDF5Storage.update_episodes
        def die(self, episodes):
            real(self, list(episodes)[:1])  # one episode on disk, then the process is killed
            os.kill(os.getpid(), signal.SIGKILL)
        h5.HDF5Storage.update_episodes = die
        make_dataset("walker2d/killed-v0", n_episodes=3, policy=pol, progress=False)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list(minari_root.glob(".staging-*")), "the kill should have hit the staged write"
    assert not local_dataset_path("walker2d/killed-v0").exists()
    with pytest.raises(DatasetError, match="make-dataset"):
        load_dataset("walker2d/killed-v0", download=False)
    # The rerun clears the stale staging folder and builds the whole dataset.
    ds = make_dataset("walker2d/killed-v0", n_episodes=3, policy=tiny_policy, progress=False)
    assert ds.total_episodes == 3
    assert not list(minari_root.glob(".staging-*"))


def test_networks_trained_on_other_data_do_not_plan_together():
    from diffusion_rl.pretrained import check_same_data

    a = Normalizer(np.zeros(3), np.ones(3), "gaussian")
    check_same_data(a, Normalizer(np.zeros(3), np.ones(3), "gaussian"))
    for other in (Normalizer(np.full(3, 0.5), np.ones(3), "gaussian"), Normalizer(np.zeros(3), np.ones(3), "minmax")):
        with pytest.raises(ValueError, match="different normalizers"):
            check_same_data(a, other)
