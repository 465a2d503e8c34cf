"""The Walker2d environment, made the same way everywhere in the project."""

from __future__ import annotations

import gymnasium as gym

import diffusion_rl  # noqa: F401  (sets MUJOCO_GL before mujoco is imported)
from diffusion_rl.disturbances import Disturbance, DisturbanceWrapper

__all__ = ["ENV_ID", "EVAL_SEEDS", "make_env"]

ENV_ID = "Walker2d-v5"
"""The environment Minari's own ``mujoco/walker2d/*-v0`` datasets were collected in."""

EVAL_SEEDS = tuple(range(10_000, 10_020))
"""Reset seeds of the 20 evaluation episodes: the expert and every planner are scored on these."""


def make_env(env_id: str = ENV_ID, render_mode: str | None = None, disturbance: Disturbance | None = None, **kwargs) -> gym.Env:
    """Make a Walker2d environment (1000-step time limit, as in Minari and D4RL), disturbed if ``disturbance`` is active."""
    env = gym.make(env_id, render_mode=render_mode, **kwargs)
    return DisturbanceWrapper(env, disturbance) if disturbance is not None and disturbance.active else env
