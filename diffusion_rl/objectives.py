"""Objectives chosen at test time: differentiable scores of planned states, used as guidance without retraining.

Diffuser's "flexible behaviour synthesis": the denoiser knows which trajectories are possible, a
score says which are wanted, and guidance (or best-of-N selection) combines the two at planning time.
An objective here scores a batch of normalized plans (B, H, act + obs) at any noise level, exactly as
the value network does, so :class:`~diffusion_rl.planner.Planner` uses it in the value network's
place (:meth:`~diffusion_rl.planner.Planner.with_objective`).

* :func:`target_speed`: walk at a chosen forward speed v* (the torso's x-velocity, observation 8).
* :func:`target_height`: carry the torso at a chosen height h* (observation 0), a posture no
  episode of any data set aims for.

Both score a plan by minus the mean squared distance of its future states (rows 1..H-1; row 0 is the
real state, which no plan can change) from the target, in the environment's units.

Alone, an objective knows nothing of falling: pushed hard toward a speed, plans leave what the walker can
do. :class:`WithValue` adds it to the value network's return, ``V(tau) + weight * objective(tau)``, so
guidance asks for a good walk at the chosen speed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from diffusion_rl.data import Normalizer

__all__ = ["OBJECTIVES", "Objective", "WithValue", "make_objective", "target_height", "target_speed"]

SPEED_INDEX = 8
"""Walker2d-v5's observation 8: the torso's forward (x) velocity in m/s."""
HEIGHT_INDEX = 0
"""Walker2d-v5's observation 0: the torso's height (z) in m."""


class Objective(nn.Module):
    """Score ``-mean_h (s_h[i] - target)^2`` over a plan's future states, in environment units; shape (B,).

    Called as ``objective(x, t)`` like :class:`~diffusion_rl.models.ValueNet` (the noise level t is
    ignored: the target does not depend on it), so guidance and best-of-N selection take it unchanged.
    """

    def __init__(self, name: str, index: int, target: float, normalizer: Normalizer, action_dim: int):
        super().__init__()
        if isinstance(target, bool) or not isinstance(target, (int, float, np.floating)) or not math.isfinite(target):
            raise ValueError(f"The {name} target must be a finite number, got {target!r}.")
        self.name, self.index, self.target = name, int(index), float(target)
        column = action_dim + self.index
        self.register_buffer("shift", torch.tensor(float(normalizer.shift[column])))
        self.register_buffer("scale", torch.tensor(float(normalizer.scale[column])))
        self.column = column

    def measure(self, x: torch.Tensor) -> torch.Tensor:
        """The planned quantity at every future step of normalized plans x (B, H, D), in environment units; (B, H - 1)."""
        return x[:, 1:, self.column] * self.scale + self.shift

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return -((self.measure(x) - self.target) ** 2).mean(1)

    def inpaint(self, x: torch.Tensor) -> torch.Tensor:
        """Write the target into the planned quantity of every future step of normalized plans x, in place; returns x."""
        x[:, 1:, self.column] = (self.target - self.shift) / self.scale
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}, observation={self.index}, target={self.target:g}"


class WithValue(nn.Module):
    """``value(x, t) + weight * objective(x, t)``: the value network's return plus a weighted objective, shape (B,)."""

    def __init__(self, value: nn.Module, objective: Objective, weight: float):
        super().__init__()
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"The objective's weight must be a finite number >= 0, got {weight!r}.")
        self.value, self.objective, self.weight = value, objective, float(weight)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.value(x, t) + self.weight * self.objective(x, t)


def target_speed(normalizer: Normalizer, action_dim: int, speed: float) -> Objective:
    """Walk at ``speed`` m/s: the torso's planned forward velocity, pulled toward it."""
    return Objective("speed", SPEED_INDEX, speed, normalizer, action_dim)


def target_height(normalizer: Normalizer, action_dim: int, height: float) -> Objective:
    """Hold the torso at ``height`` m (the walker stands about 1.25 m tall and falls below 0.8 m)."""
    return Objective("height", HEIGHT_INDEX, height, normalizer, action_dim)


OBJECTIVES = {"speed": target_speed, "height": target_height}
"""The test-time objectives by name."""


def make_objective(name: str, normalizer: Normalizer, action_dim: int, target: float) -> Objective:
    """The objective ``name`` with its target, with a one-line error for an unknown name."""
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}.")
    return OBJECTIVES[name](normalizer, action_dim, target)
