"""Shared fixtures: every test gets its own Minari folder and a single torch thread."""

from __future__ import annotations

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
