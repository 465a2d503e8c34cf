"""Disturbances: pushes on the walker's torso and shifted dynamics, seeded by the episode's reset seed.

A :class:`Disturbance` says what happens to the walker besides its own dynamics; the default is
nothing. :func:`~diffusion_rl.envs.make_env` wraps the environment in :class:`DisturbanceWrapper`
when a disturbance is active, so the expert, every planner and every controller meet the same
pushes on the same seed.

* **Pushes:** every ``push_interval`` steps (the first at step ``push_interval``) a horizontal
  force of ``push_force`` newtons acts on the torso for ``push_duration`` steps. Its direction,
  forward or backward, is drawn for each push from a generator seeded by the episode's reset seed.
* **Dynamics shifts:** the torso's mass and every geom's sliding friction, scaled by a factor.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import gymnasium as gym
import numpy as np

__all__ = ["Disturbance", "DisturbanceWrapper"]


@dataclass(frozen=True)
class Disturbance:
    """What the environment does to the walker besides its own dynamics (the defaults: nothing)."""

    push_force: float = 0.0
    """Horizontal force on the torso during a push, in newtons (0: no pushes)."""
    push_duration: int = 5
    """Environment steps each push lasts (one step is 8 ms of simulated time)."""
    push_interval: int = 100
    """Steps from the start of one push to the start of the next; the first push starts at this step."""
    torso_mass: float = 1.0
    """Factor on the torso's mass."""
    friction: float = 1.0
    """Factor on the sliding friction of every geom (the feet and the floor)."""

    def __post_init__(self):
        for name in ("push_force", "torso_mass", "friction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        for name in ("torso_mass", "friction"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} is a factor on the walker's dynamics and must be > 0, got {getattr(self, name)!r}.")
        for name in ("push_duration", "push_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive whole number of steps, got {value!r}.")
        if self.push_duration > self.push_interval:
            raise ValueError(f"A push of {self.push_duration} steps does not fit an interval of {self.push_interval} steps.")

    @property
    def active(self) -> bool:
        """Whether it changes anything."""
        return self.push_force > 0 or self.torso_mass != 1.0 or self.friction != 1.0

    def to_dict(self) -> dict:
        """The options, for results files."""
        return asdict(self)

    def pushing(self, step: int) -> int | None:
        """The index of the push acting during environment step ``step`` (0-based), or None."""
        if self.push_force <= 0 or step < self.push_interval:
            return None
        return step // self.push_interval - 1 if step % self.push_interval < self.push_duration else None


class DisturbanceWrapper(gym.Wrapper):
    """Applies a :class:`Disturbance` to a MuJoCo Walker2d environment."""

    def __init__(self, env: gym.Env, disturbance: Disturbance):
        super().__init__(env)
        self.disturbance = disturbance
        model = env.unwrapped.model
        self._torso = model.body("torso").id
        self._mass = float(model.body_mass[self._torso])
        self._friction = model.geom_friction[:, 0].copy()
        self._rng = np.random.default_rng()
        self._directions: list[float] = []
        self._step = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        model = self.env.unwrapped.model
        model.body_mass[self._torso] = self._mass * self.disturbance.torso_mass
        model.geom_friction[:, 0] = self._friction * self.disturbance.friction
        if seed is not None:
            # Its own stream, derived from the reset seed: the environment's generator is left untouched.
            self._rng = np.random.default_rng([int(seed), 0x5EED])
        self._directions, self._step = [], 0
        self.env.unwrapped.data.xfrc_applied[:] = 0.0
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        push = self.disturbance.pushing(self._step)
        force = self.env.unwrapped.data.xfrc_applied
        force[:] = 0.0
        if push is not None:
            while len(self._directions) <= push:
                self._directions.append(float(self._rng.choice([-1.0, 1.0])))
            force[self._torso, 0] = self._directions[push] * self.disturbance.push_force
        self._step += 1
        return self.env.step(action)
