"""Shared fixtures: every test gets its own Minari folder and a single torch thread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import diffusion_rl  # noqa: F401  (sets MUJOCO_GL before anything imports mujoco)

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def minari_root(tmp_path, monkeypatch):
    """Point Minari at a fresh folder so tests never touch the user's datasets."""
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


@pytest.fixture(scope="session")
def tiny_policy():
    """A small untrained actor as a noisy policy: fast, and it falls quickly (short episodes)."""
    from diffusion_rl.expert import Actor

    torch.manual_seed(0)
    actor = Actor(17, 6, hidden=32)

    def policy(obs: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return actor.act(obs, noise=noise)

    return policy


def tiny_common(dataset_id: str) -> dict:
    """Options shared by the tiny denoiser and value runs the test modules train (seconds on a CPU).

    The device is pinned to the CPU, where the bit-for-bit resume tests hold also on a machine with a
    GPU; tests/test_cuda.py covers the GPU.
    """
    return {"dataset_id": dataset_id, "horizon": 4, "dim": 8, "dim_mults": "1,2", "n_diffusion_steps": 5, "batch_size": 8,
            "log_every": 10, "ema_start": 20, "ema_every": 2, "threads": 1, "device": "cpu"}


def module_dataset(dataset_id: str):
    """Fixtures giving a test module one tiny dataset: ``shared_root, minari_root = module_dataset(DATA)``."""

    @pytest.fixture(scope="module")
    def shared_root(tmp_path_factory, tiny_policy):
        return tiny_dataset(tmp_path_factory, tiny_policy, dataset_id)

    @pytest.fixture(autouse=True)
    def minari_root(shared_root, monkeypatch):
        monkeypatch.setenv("MINARI_DATASETS_PATH", str(shared_root))
        return shared_root

    return shared_root, minari_root


def tiny_dataset(tmp_path_factory, policy, dataset_id: str) -> Path:
    """A 6-episode dataset of ``policy`` (short episodes that fall) in its own Minari folder, for module fixtures."""
    from diffusion_rl.collect import make_dataset

    root = tmp_path_factory.mktemp("minari")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(root))
        make_dataset(dataset_id, n_episodes=6, policy=policy, progress=False)
    return root


def tiny_runs(root: Path, tmp_path_factory, diffuser_cfg, value_cfg) -> tuple[Path, Path]:
    """Train a tiny denoiser and value net on the dataset under ``root``; returns their run folders."""
    from diffusion_rl.training import train

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(root))
        d, v = tmp_path_factory.mktemp("d"), tmp_path_factory.mktemp("v")
        train(diffuser_cfg, d, progress=False)
        train(value_cfg, v, progress=False)
    return d, v


def poison_loss(monkeypatch, name: str, at_call: int) -> None:
    """Make ``diffusion_rl.training.<name>`` (a loss function) return NaN on its ``at_call``-th call."""
    import diffusion_rl.training as tr

    real, calls = getattr(tr, name), {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] == at_call else loss

    monkeypatch.setattr(tr, name, poisoned)
