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
