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

* ``speeds`` (``walker2d/local-speeds-v0``): the speed policy (SAC trained with ``--task speed``) asked
  for a target forward speed drawn per episode, so the data hold stable walks at many speeds; the
  target is not recorded, only what the walker did.

* ``medium`` (``walker2d/local-medium-v0``): the medium policy's stochastic actions (D4RL's "medium").
* ``medium-replay`` (``walker2d/local-medium-replay-v0``): every transition the medium policy's SAC
  run stored in its replay buffer, from its first random step to the medium checkpoint, cut into the
  run's own episodes (D4RL's "medium-replay").
* ``medium-expert`` (``walker2d/local-medium-expert-v0``): the medium set's episodes, then the expert
  set's, about as many steps of each (D4RL's "medium-expert").

A recipe that rolls a policy out is a function returning a :class:`Behaviour`; one that assembles
episodes from elsewhere (a replay buffer, other data sets) is an ``assemble`` function. Either way it
is one :class:`Recipe` line in :data:`RECIPES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from diffusion_rl.checkpoint import CheckpointError
from diffusion_rl.data import DEFAULT_DATASET_ID
from diffusion_rl.disturbances import Disturbance
from diffusion_rl.envs import ENV_ID, seeded_target_speed

__all__ = ["RECIPES", "Assembly", "Behaviour", "DartOptions", "NoOptions", "Recipe", "ReplayOptions", "SpeedOptions", "dart_behaviour", "episode_target_speed", "expert_behaviour",
           "check_replay_source", "get_recipe", "medium_behaviour", "medium_expert_episodes", "replay_episodes", "speed_behaviour"]


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
    goal: Callable[[int], np.ndarray] | None = None
    """Entries appended to the policy's observation in the episode with this reset seed (what it is asked for,
    such as a target speed); the data set records the plain observation. None: the policy sees only that."""


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
class SpeedOptions:
    """Options of the ``speeds`` recipe."""

    min_speed: float = 1.5
    """Slowest target (m/s); each episode draws its target uniformly from [min_speed, max_speed]. The speed policy
    was trained on targets from 0.5 m/s (envs.TARGET_SPEEDS) but falls below 1.5 (its sidecar's speed_tracking)."""
    max_speed: float = 3.5
    """Fastest target (m/s)."""

    def __post_init__(self):
        for name in ("min_speed", "max_speed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if self.min_speed > self.max_speed:
            raise ValueError(f"Need min_speed <= max_speed, got {self.min_speed} and {self.max_speed}.")


def episode_target_speed(seed: int, options: SpeedOptions) -> float:
    """The target speed the ``speeds`` recipe asks for in the episode with this reset seed (as the speed task draws it)."""
    return seeded_target_speed(seed, (options.min_speed, options.max_speed))


def speed_behaviour(actor, options: SpeedOptions) -> Behaviour:
    """The speed policy's stochastic actions, executed and recorded, each episode asked for its own target speed."""

    def policy(obs: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return actor.act(obs, noise=noise)

    def goal(seed: int) -> np.ndarray:
        return np.array([episode_target_speed(seed, options)])

    actions = (f"actions sampled stochastically (tanh-Gaussian, noise seeded by the reset seed) by a policy asked for a target "
               f"forward speed drawn per episode from [{options.min_speed:g}, {options.max_speed:g}] m/s; the target is not recorded")
    return Behaviour(policy, None, "SAC speed policy (diffusion_rl.expert, --task speed), stochastic actions", actions,
                     {"recipe": "speeds", "options": asdict(options)}, goal=goal)


# ----------------------------------------------------------------------------- assembled recipes


@dataclass(frozen=True)
class Assembly:
    """Episodes a recipe assembles instead of collecting them, with what the data set says of them."""

    episodes: list[dict]
    """Each with ``seed`` and ``observations`` (T + 1, obs), ``actions``, ``rewards``, ``terminations``, ``truncations`` (T each)."""
    actions: str
    """What the data set's actions are, for its description."""
    policy_meta: dict
    """The sidecar of the policy the description names."""


@dataclass(frozen=True)
class ReplayOptions:
    """Options of the ``medium-replay`` recipe."""

    checkpoint: str = "runs/medium-sac/checkpoint.pt"
    """The medium SAC run's checkpoint: its replay buffer holds every transition up to the medium policy."""


MEDIUM_TRAIN_COMMAND = "python -m diffusion_rl train-expert --run-dir runs/medium-sac --total-steps 100000 --seed 1"
"""Recreates ``runs/medium-sac`` (deterministically, about 18 minutes on one core) when it is missing."""


def _medium_run(options: ReplayOptions) -> tuple[dict, dict]:
    """The medium SAC run's checkpoint and the shipped medium policy's sidecar, after checking that they belong together.

    The checkpoint must be the one the shipped medium policy was exported from (same environment, same
    actor weights, same step), so the data end exactly where the medium policy stands.
    """
    import torch
    from safetensors.torch import load_file

    from diffusion_rl.checkpoint import load_checkpoint
    from diffusion_rl.expert import SACConfig, load_policy, shipped_policy_path

    path = Path(options.checkpoint)
    if not path.is_file():
        raise CheckpointError(f"No medium SAC checkpoint at {path}: the medium-replay recipe reads its replay buffer. Recreate it with "
                              f"`{MEDIUM_TRAIN_COMMAND}`, or pass --checkpoint.")
    state = load_checkpoint(path, kind="sac")
    cfg = SACConfig(**state["config"])
    if cfg.env_id != ENV_ID:
        raise CheckpointError(f"{path} is a SAC run on {cfg.env_id}, not {ENV_ID}: its replay buffer is no Walker2d data.")
    _, meta = load_policy(shipped_policy_path("medium"))
    shipped = load_file(str(shipped_policy_path("medium")))
    actor = state["agent"]["actor"]
    if int(state["step"]) != meta["env_steps"] or set(actor) != set(shipped) or not all(torch.equal(actor[k], shipped[k]) for k in shipped):
        raise CheckpointError(f"{path} (step {int(state['step'])}) is not the checkpoint the shipped medium policy was exported from "
                              f"(step {meta['env_steps']}); recreate it with `{MEDIUM_TRAIN_COMMAND}`.")
    return state, meta


def check_replay_source(options: ReplayOptions) -> None:
    """Refuse a missing, foreign or other medium checkpoint before a build writes anything."""
    _medium_run(options)


def replay_episodes(options: ReplayOptions, load_data: Callable[[str], list[dict]] | None = None) -> Assembly:
    """D4RL's medium-replay: every transition in the medium run's replay buffer, cut into the run's episodes.

    The checkpoint is checked by :func:`check_replay_source`. Observations come from the buffer,
    stored in float32. The episode cut off by the end of training ends truncated.
    """
    import json

    from diffusion_rl.expert import SACConfig, episode_reset_seed

    path = Path(options.checkpoint)
    state, meta = _medium_run(options)
    cfg = SACConfig(**state["config"])
    buf = {k: state["buffer"][k].numpy() for k in ("obs", "action", "reward", "next_obs", "terminated")}
    size = int(state["buffer"]["size"])
    if size != int(state["step"]) or len(buf["obs"]) != size:
        raise CheckpointError(f"{path}'s replay buffer holds {size} transitions of {int(state['step'])} steps: it wrapped or was cut.")
    ends = [(int(end), int(length)) for end, _, length in json.loads(state["episodes"])]
    if ends and ends[-1][0] < size:  # the episode training stopped in
        ends.append((size, size - ends[-1][0]))
    episodes = []
    for k, (end, length) in enumerate(ends):
        start = end - length
        terminated = bool(buf["terminated"][end - 1])
        episodes.append({
            "seed": episode_reset_seed(cfg, k),
            "observations": np.concatenate([buf["obs"][start:end], buf["next_obs"][end - 1:end]]).astype(np.float64),
            "actions": buf["action"][start:end].astype(np.float32),
            "rewards": buf["reward"][start:end].astype(np.float64),
            "terminations": np.arange(length) == length - 1 if terminated else np.zeros(length, bool),
            "truncations": np.zeros(length, bool) if terminated else np.arange(length) == length - 1,
        })
    if sum(len(ep["actions"]) for ep in episodes) != size:
        raise CheckpointError(f"{path}'s episode list does not tile its replay buffer; refusing to guess the boundaries.")
    actions = (f"every transition of the medium policy's SAC training run (`{MEDIUM_TRAIN_COMMAND}`) up to step {size}, from its replay "
               f"buffer: {cfg.learning_starts} uniformly random steps, then the learning policy's stochastic actions, cut into the run's "
               "own episodes (observations stored in float32)")
    return Assembly(episodes, actions, meta)


def medium_expert_episodes(options: NoOptions, load_data: Callable[[str], list[dict]]) -> Assembly:
    """D4RL's medium-expert: the medium set's episodes, then the expert set's (built first if missing)."""
    from diffusion_rl.expert import load_policy, shipped_policy_path

    medium, expert = load_data("medium"), load_data("expert")
    actions = (f"the medium set's {len(medium)} episodes ({sum(len(e['actions']) for e in medium)} steps, walker2d/local-medium-v0) then "
               f"the expert set's {len(expert)} ({sum(len(e['actions']) for e in expert)} steps, walker2d/local-expert-v0): stochastic "
               "actions of both policies, about 1 : 1 in steps")
    return Assembly(medium + expert, actions, load_policy(shipped_policy_path("medium"))[1])


@dataclass(frozen=True)
class Recipe:
    """A named way to collect a data set."""

    name: str
    """The ``--recipe`` name."""
    dataset_id: str
    """The Minari id it builds unless told another."""
    behaviour: Callable[..., Behaviour] | None
    """(expert actor, options) -> :class:`Behaviour`; None for an assembled recipe."""
    options: type = NoOptions
    """Its options dataclass (validates them)."""
    policy: str = "expert"
    """Which shipped SAC policy acts (:data:`diffusion_rl.expert.SHIPPED_POLICIES`)."""
    summary: str = ""
    """One line for ``--help``."""
    assemble: Callable[..., Assembly] | None = None
    """(options, load_data) -> :class:`Assembly`, for a recipe whose episodes are not rolled out;
    ``load_data(recipe)`` gives another recipe's episodes (building its data set if missing)."""
    algorithm: str = ""
    """Minari's ``algorithm_name`` of an assembled recipe (a rolled-out one takes its behaviour's)."""
    check: Callable[..., None] | None = None
    """(options) -> None: refuses bad sources of an assembled recipe before anything is written."""

    def algorithm_name(self, options) -> str:
        """What the data set's ``algorithm_name`` says of how it was made."""
        return self.algorithm if self.assemble is not None else self.behaviour(None, options).algorithm

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
    Recipe("speeds", "walker2d/local-speeds-v0", speed_behaviour, SpeedOptions, policy="speed",
           summary="the speed policy's episodes, each asked for its own target speed (1.5-3.5 m/s)"),
    Recipe("medium", "walker2d/local-medium-v0", medium_behaviour, policy="medium",
           summary="the medium policy's stochastic episodes (D4RL's medium)"),
    Recipe("medium-replay", "walker2d/local-medium-replay-v0", None, ReplayOptions, policy="medium",
           summary="every transition of the medium policy's training run, from its replay buffer (D4RL's medium-replay)",
           assemble=replay_episodes, algorithm="SAC replay buffer up to the medium policy (diffusion_rl.expert, 100k steps)",
           check=check_replay_source),
    Recipe("medium-expert", "walker2d/local-medium-expert-v0", None, policy="medium",
           summary="the medium set's episodes and the expert set's, 1 : 1 in steps (D4RL's medium-expert)",
           assemble=medium_expert_episodes, algorithm="SAC medium policy and SAC expert, stochastic actions, 1 : 1"),
]}
"""Every data recipe by name."""


def get_recipe(name: str) -> Recipe:
    """The recipe ``name``, with a one-line error naming the others."""
    if name not in RECIPES:
        raise ValueError(f"Unknown data recipe {name!r}; choose from {', '.join(RECIPES)}.")
    return RECIPES[name]
