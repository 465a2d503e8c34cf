"""Data recipes: how each local Minari data set is collected, by name (``make-dataset --recipe NAME``).

A recipe turns the expert's actor into a :class:`Behaviour`: which action each step executes,
which action the data set records for it, and what the environment does to the walker in each
episode. :func:`diffusion_rl.collect.make_dataset` does the rest for every recipe alike: seeded
episodes, kept finished episodes, the build lock, the staging folder and the atomic move into place.

* ``expert`` (``walker2d/local-expert-v0``): the expert's stochastic actions, executed and recorded,
  as Minari built its own Walker2d sets.
* ``expert-dart`` (``walker2d/local-expert-dart-v0``): DART (Laskey et al. 2017, "DART: Noise Injection
  for Robust Imitation Learning"). The executed action is the expert's deterministic action plus
  Gaussian noise, and random pushes shove the torso, so the episodes visit states off the expert's own
  path; the recorded label is the expert's clean deterministic action for the observed state: how
  it corrects from there.

A new recipe (issue 14's ``medium``, ``medium-replay``, ``medium-expert``) is a function returning a
:class:`Behaviour` and one :class:`Recipe` line in :data:`RECIPES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import numpy as np

from diffusion_rl.data import DEFAULT_DATASET_ID
from diffusion_rl.disturbances import Disturbance

__all__ = ["RECIPES", "Behaviour", "DartOptions", "NoOptions", "Recipe", "dart_behaviour", "expert_behaviour", "get_recipe", "medium_behaviour"]


@dataclass(frozen=True)
class Behaviour:
    """How one recipe's episodes are collected (what :func:`~diffusion_rl.collect.collect_episodes` needs)."""

    policy: Callable[[np.ndarray, np.ndarray], np.ndarray | tuple[np.ndarray, np.ndarray]]
    """(observations (B, obs_dim), standard-normal noise (B, act_dim)) -> actions, or (executed, recorded) actions."""
    disturb: Callable[[int], Disturbance] | None
    """The disturbance of the episode with this reset seed; None: no disturbance."""
    algorithm: str
    """Minari's ``algorithm_name``."""
    actions: str
    """What the data set's actions are, for its description."""
    key: dict
    """What, besides the policy, the environment and the seed, fixes an episode (keys the kept episodes of a build)."""


@dataclass(frozen=True)
class NoOptions:
    """A recipe without options."""


@dataclass(frozen=True)
class DartOptions:
    """Options of the ``expert-dart`` recipe."""

    action_noise: float = 0.2
    """Std of the Gaussian noise on each executed action (actions lie in [-1, 1])."""
    # Why 0.2: the expert set's own stochastic actions already lie 0.17 RMS from the deterministic action
    # (measured on walker2d/local-expert-v0), so less noise would visit fewer off-path states than the plain
    # expert set does; about that spread keeps the walker mostly upright, so the pushes add the recoveries.
    max_push: float = 200.0
    """Largest push force in newtons; each episode draws its force uniformly from [0, max_push]."""
    # Why 200 N: the push study's middle force; harder pushes make the expert itself fall, and a fall
    # ends the episode with few recovery steps recorded.
    push_duration: int = 5
    """Steps each push lasts (as the push study's pushes)."""
    min_interval: int = 50
    """Fewest steps between pushes; each episode draws its interval uniformly from [min_interval, max_interval]."""
    max_interval: int = 150
    """Most steps between pushes. A drawn interval, unlike the push study's fixed 100 steps, shoves the walker
    at every phase of its gait, so the data teaches recoveries, not a schedule."""

    def __post_init__(self):
        for name in ("action_noise", "max_push"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        for name in ("push_duration", "min_interval", "max_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive whole number of steps, got {value!r}.")
        if not self.push_duration <= self.min_interval <= self.max_interval:
            raise ValueError(f"Need push_duration <= min_interval <= max_interval, got {self.push_duration}, {self.min_interval}, "
                             f"{self.max_interval}.")


def expert_behaviour(actor, options: NoOptions) -> Behaviour:
    """The expert's stochastic actions (tanh-Gaussian, the given noise), executed and recorded."""

    def policy(obs: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return actor.act(obs, noise=noise)

    return Behaviour(policy, None, "SAC (diffusion_rl.expert), stochastic actions",
                     "actions sampled stochastically (tanh-Gaussian, per-episode noise seeded by the reset seed)", {})


def medium_behaviour(actor, options: NoOptions) -> Behaviour:
    """The medium policy's stochastic actions, executed and recorded (D4RL's "medium" data)."""
    expert = expert_behaviour(actor, options)
    return Behaviour(expert.policy, None, "SAC medium policy (diffusion_rl.expert, stopped at 100k steps), stochastic actions",
                     expert.actions, {"recipe": "medium"})


_PUSH_STREAM = 0xDA27
"""Tags the pushes' generator so it never shares draws with the action noise (seeded by the bare reset seed)."""


def dart_behaviour(actor, options: DartOptions) -> Behaviour:
    """DART: execute the deterministic action plus Gaussian noise under random pushes; record the deterministic action."""
    o = options

    def policy(obs: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        clean = actor.act(obs, deterministic=True)
        return np.clip(clean + o.action_noise * noise, -1.0, 1.0), clean

    def disturb(seed: int) -> Disturbance:
        rng = np.random.default_rng([int(seed), _PUSH_STREAM])
        force = float(rng.uniform(0.0, o.max_push))
        interval = int(rng.integers(o.min_interval, o.max_interval, endpoint=True))
        return Disturbance(push_force=force, push_duration=o.push_duration, push_interval=interval)

    actions = (f"DART: executed actions are the deterministic action plus Gaussian noise of std {o.action_noise:g} (seeded by the "
               f"reset seed), under pushes on the torso of a force drawn per episode from [0, {o.max_push:g}] N for {o.push_duration} "
               f"steps every {o.min_interval}-{o.max_interval} steps (drawn per episode); recorded actions are the deterministic "
               "action for each observed state")
    return Behaviour(policy, disturb, "SAC (diffusion_rl.expert), DART: noisy executed actions, deterministic labels, random pushes",
                     actions, {"recipe": "expert-dart", "options": asdict(o)})


@dataclass(frozen=True)
class Recipe:
    """A named way to collect a data set."""

    name: str
    """The ``--recipe`` name."""
    dataset_id: str
    """The Minari id it builds unless told another."""
    behaviour: Callable[..., Behaviour]
    """(expert actor, options) -> :class:`Behaviour`."""
    options: type = NoOptions
    """Its options dataclass (validates them)."""
    policy: str = "expert"
    """Which shipped SAC policy acts (:data:`diffusion_rl.expert.SHIPPED_POLICIES`)."""
    summary: str = ""
    """One line for ``--help``."""

    def make_options(self, options: dict | None = None):
        """The recipe's options from a dict of the ones given; an option it does not take is an error."""
        options = dict(options or {})
        known = {f.name for f in fields(self.options)}
        if unknown := sorted(set(options) - known):
            takes = f"it takes {', '.join(sorted(known))}" if known else "it takes none"
            raise ValueError(f"The {self.name} recipe takes no option {', '.join(unknown)} ({takes}).")
        return self.options(**options)


RECIPES = {r.name: r for r in [
    Recipe("expert", DEFAULT_DATASET_ID, expert_behaviour, summary="the expert's stochastic episodes"),
    Recipe("expert-dart", "walker2d/local-expert-dart-v0", dart_behaviour, DartOptions,
           summary="DART: noisy executed actions under random pushes, the expert's clean actions recorded"),
    Recipe("medium", "walker2d/local-medium-v0", medium_behaviour, policy="medium",
           summary="the medium policy's stochastic episodes (D4RL's medium)"),
]}
"""Every data recipe by name."""


def get_recipe(name: str) -> Recipe:
    """The recipe ``name``, with a one-line error naming the others."""
    if name not in RECIPES:
        raise ValueError(f"Unknown data recipe {name!r}; choose from {', '.join(RECIPES)}.")
    return RECIPES[name]
