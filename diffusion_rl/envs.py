"""The Walker2d environment, made the same way everywhere in the project."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

import diffusion_rl  # noqa: F401  (sets MUJOCO_GL before mujoco is imported)
from diffusion_rl.disturbances import Disturbance, DisturbanceWrapper

__all__ = ["ENV_ID", "EVAL_SEEDS", "TARGET_SPEEDS", "TASKS", "TargetSpeed", "make_env", "seeded_target_speed"]

ENV_ID = "Walker2d-v5"
"""The environment Minari's own ``mujoco/walker2d/*-v0`` datasets were collected in."""

EVAL_SEEDS = tuple(range(10_000, 10_020))
"""Reset seeds of the 20 evaluation episodes: the expert and every planner are scored on these."""


TASKS = ("walk", "speed")
"""What a policy is trained for: Walker2d's own reward, or walking at a target speed (:class:`TargetSpeed`)."""

TARGET_SPEEDS = (0.5, 3.5)
"""The range (m/s) each episode of the speed task draws its target from: below and above the expert's 3.3-3.5."""


def seeded_target_speed(seed: int, speeds: tuple[float, float] = TARGET_SPEEDS) -> float:
    """The target speed an episode with this reset seed asks for: from the seed alone, so a rerun asks the same."""
    return float(np.random.default_rng([int(seed), 5_417]).uniform(*speeds))


class TargetSpeed(gym.Wrapper):
    """Walker2d asked to walk at a target forward speed v*, drawn per episode from ``speeds``.

    The observation gains v* as its last entry. The forward reward becomes min(v, 2 v* - v): Walker2d's own
    reward v up to the target, so a policy learns to walk exactly as the expert did, and falling as fast
    past it. The survival bonus and the control cost are Walker2d's.
    """

    def __init__(self, env: gym.Env, speeds: tuple[float, float] = TARGET_SPEEDS):
        super().__init__(env)
        space = env.observation_space
        self.observation_space = gym.spaces.Box(np.append(space.low, speeds[0]), np.append(space.high, speeds[1]),
                                                dtype=space.dtype)
        self.speeds = (float(speeds[0]), float(speeds[1]))
        self.target = float(np.mean(speeds))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        if options and "target_speed" in options:
            self.target = float(options["target_speed"])
        elif seed is not None:  # a resumed run draws the same target
            self.target = seeded_target_speed(seed, self.speeds)
        else:
            self.target = float(self.np_random.uniform(*self.speeds))
        info["target_speed"] = self.target
        return self._observe(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        v = float(info["x_velocity"])
        reward = float(reward) - float(info["reward_forward"]) + min(v, 2.0 * self.target - v)
        info["target_speed"] = self.target
        return self._observe(obs), reward, terminated, truncated, info

    def _observe(self, obs: np.ndarray) -> np.ndarray:
        return np.append(obs, self.target).astype(obs.dtype)


def make_env(env_id: str = ENV_ID, render_mode: str | None = None, disturbance: Disturbance | None = None,
             task: str = "walk", **kwargs) -> gym.Env:
    """Make a Walker2d environment (1000-step time limit, as in Minari and D4RL), disturbed if ``disturbance`` is active,
    and asked for a target speed if ``task`` is ``"speed"``."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose from {', '.join(TASKS)}.")
    env = gym.make(env_id, render_mode=render_mode, **kwargs)
    env = DisturbanceWrapper(env, disturbance) if disturbance is not None and disturbance.active else env
    return TargetSpeed(env) if task == "speed" else env
