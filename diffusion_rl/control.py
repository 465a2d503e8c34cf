"""Controllers: the layer between a plan and the environment that decides when to replan.

A plan predicts H states and actions. A controller holds the plan in force for one episode and,
at every step, answers two questions: is it time for a new plan, and which of the plan's actions
is taken now. :func:`~diffusion_rl.planner.rollout` asks every episode's controller at every step
and batches the episodes that want a plan into shared denoiser calls, so controllers that replan
at different moments still plan together.

* :class:`FixedWindow` (k): execute the first k actions of each plan, then replan. k = 1 replans at
  every step; k = H executes whole plans open loop. This is the study's (and the window sweep's) rule.
* :class:`StateError` (tau): keep executing while the real state stays near the state the plan
  predicted for this step, and replan once the normalized distance exceeds tau, or the plan runs
  out. tau = 0 is k = 1 and tau = infinity is k = H; in between, the plan lasts as long as reality follows it.
* :class:`Likelihood` (tau): replan when the denoiser, asked to reconstruct the rest of the plan from
  the real state, changes it by more than tau (RDM's idea, Zhou et al. 2023); one denoiser call per step.

``controller_from_name`` builds one from the names the command line uses.

Which action is taken is a separate choice that works with every controller: the plan's own action
for this step (the default, as Diffuser), or :class:`InverseDynamicsActions`, which asks a trained
model a = f(s, s') for the action that takes the *real* state to the state the plan predicts next
(Decision Diffuser's actor), so a plan's states are tracked rather than its actions replayed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["CONTROLLERS", "Controller", "FixedWindow", "InverseDynamicsActions", "Likelihood", "StateError", "controller_from_name"]


class Controller:
    """One episode's replanning rule. Subclasses set ``name`` and implement :meth:`wants_plan`."""

    name = "controller"
    probe_level: int | None = None
    """Set by controllers that judge their plan with the denoiser: the noise level of the probe."""

    def __init__(self):
        self.actions: np.ndarray | None = None  # (H, act_dim): the plan in force
        self.states: np.ndarray | None = None  # (H, obs_dim): the states it predicts
        self.offset = 0  # steps executed since the plan was made; row `offset` predicts the current state

    def bind(self, horizon: int, obs_scale: np.ndarray) -> Controller:
        """Learn the plan's horizon and the observation's scale (the planner's normalizer); returns self."""
        self.horizon, self.obs_scale = horizon, np.asarray(obs_scale, np.float64)
        return self

    def wants_plan(self, obs: np.ndarray) -> bool:
        """Whether the episode needs a new plan before acting from the real observation ``obs``."""
        raise NotImplementedError

    def new_plan(self, actions: np.ndarray, states: np.ndarray) -> None:
        """Put a fresh plan in force (its row 0 is the current state)."""
        self.actions, self.states, self.offset = actions, states, 0

    def action(self) -> np.ndarray:
        """The plan's action for this step."""
        return self.actions[self.offset]

    def next_state(self) -> np.ndarray | None:
        """The state the plan predicts after this step's action (None at the plan's last row)."""
        return self.states[self.offset + 1] if self.offset + 1 < len(self.states) else None

    def advance(self) -> None:
        """The action was executed: the plan is one step older."""
        self.offset += 1

    @property
    def max_window(self) -> int:
        """The most actions one plan can have executed (for analyses that compare plan and reality)."""
        return self.horizon

    def label(self) -> str:
        """A short name with the options, for tables and file names."""
        return self.name

    def can_probe(self) -> bool:
        """Whether the plan in force can be probed now (it has run at least one step and has steps left)."""
        return self.actions is not None and 1 <= self.offset < self.horizon

    def observe(self, error: float) -> None:
        """Receive the probe's verdict on the plan in force (controllers with a ``probe_level``)."""


class FixedWindow(Controller):
    """Execute the first ``window`` actions of each plan, then replan (the executed window k)."""

    name = "fixed"

    def __init__(self, window: int):
        super().__init__()
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)):
            raise ValueError(f"The executed window must be an integer, got {window!r}.")
        self.window = int(window)  # its range, 1..H, is checked once the plan's horizon is known (bind)

    def bind(self, horizon: int, obs_scale: np.ndarray) -> Controller:
        if not 1 <= self.window <= horizon:
            raise ValueError(f"The executed window must be an integer in 1..{horizon} (the plan's horizon), got {self.window!r}.")
        return super().bind(horizon, obs_scale)

    def wants_plan(self, obs: np.ndarray) -> bool:
        return self.actions is None or self.offset >= self.window

    @property
    def max_window(self) -> int:
        return self.window

    def label(self) -> str:
        return f"fixed-k{self.window}"


class StateError(Controller):
    """Replan when the real state leaves the plan's prediction by more than ``threshold`` (RMS in data stds), or the plan ends."""

    name = "state-error"

    def __init__(self, threshold: float):
        super().__init__()
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or math.isnan(threshold) or threshold < 0:
            raise ValueError(f"The replanning threshold must be a number >= 0 (inf: never before the plan ends), got {threshold!r}.")
        self.threshold = float(threshold)

    def error(self, obs: np.ndarray) -> float:
        """RMS distance between the real state and the plan's prediction for it, in the data's standard deviations."""
        return float(np.sqrt(np.mean(((obs - self.states[self.offset]) / self.obs_scale) ** 2)))

    def wants_plan(self, obs: np.ndarray) -> bool:
        if self.actions is None or self.offset >= self.horizon:
            return True
        return self.offset > 0 and self.error(obs) > self.threshold

    def label(self) -> str:
        return f"state-error-{self.threshold:g}"


class Likelihood(Controller):
    """Replan when the denoiser finds the rest of the plan implausible from the real state (RDM-style), or the plan ends.

    At every step the remaining plan, with the real state written in, is noised to ``level`` and
    denoised once (:meth:`Planner.plan_error`); an RMS reconstruction error above ``threshold``
    (normalized units) triggers a new plan. The probe costs one denoiser evaluation per step.
    """

    name = "likelihood"

    def __init__(self, threshold: float, level: int = 5):
        super().__init__()
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or math.isnan(threshold) or threshold < 0:
            raise ValueError(f"The replanning threshold must be a number >= 0 (inf: never before the plan ends), got {threshold!r}.")
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or level < 0:
            raise ValueError(f"The probe level must be an integer >= 0, got {level!r}.")
        self.threshold, self.probe_level, self.error = float(threshold), int(level), 0.0

    def observe(self, error: float) -> None:
        self.error = error

    def new_plan(self, actions: np.ndarray, states: np.ndarray) -> None:
        super().new_plan(actions, states)
        self.error = 0.0

    def wants_plan(self, obs: np.ndarray) -> bool:
        return self.actions is None or self.offset >= self.horizon or self.error > self.threshold

    def label(self) -> str:
        return f"likelihood-{self.threshold:g}"


CONTROLLERS = {"fixed": FixedWindow, "state-error": StateError, "likelihood": Likelihood}
"""Controllers by the name the command line uses."""


def controller_from_name(name: str, window: int | None = None, threshold: float | None = None) -> Controller:
    """A controller from its command-line name and options; options it does not take are refused."""
    if name not in CONTROLLERS:
        raise ValueError(f"Unknown controller {name!r}; choose from {', '.join(CONTROLLERS)}.")
    if name == "fixed":
        if threshold is not None:
            raise ValueError("The fixed controller takes --window, not --threshold.")
        return FixedWindow(1 if window is None else window)
    if window is not None:
        raise ValueError(f"The {name} controller decides its own window; it takes --threshold, not --window.")
    if threshold is None:
        raise ValueError(f"The {name} controller needs --threshold.")
    return CONTROLLERS[name](threshold)


class InverseDynamicsActions:
    """Actions from an inverse-dynamics model: the action taking the real state to the plan's next state.

    Where the plan has no next state (its last row), the plan's own action is kept.
    """

    def __init__(self, net: torch.nn.Module, normalizer, meta: dict | None = None):
        self.net, self.normalizer, self.meta = net.eval(), normalizer, dict(meta or {})
        self.act_dim, self.obs_dim = net.act_dim, net.obs_dim

    def check_planner(self, planner) -> InverseDynamicsActions:
        """Refuse a model trained for other states or actions than the planner's (shapes named); returns self."""
        if (self.obs_dim, self.act_dim) != (planner.obs_dim, planner.action_dim):
            raise ValueError(
                f"The inverse-dynamics model maps {self.obs_dim}-dim states to {self.act_dim}-dim actions, but the planner "
                f"plans {planner.obs_dim}-dim states and {planner.action_dim}-dim actions: it was trained on another dataset."
            )
        data, own = planner.meta.get("config", {}).get("dataset_id"), self.meta.get("dataset_id")
        if data and own and data != own:
            raise ValueError(f"The inverse-dynamics model was trained on {own!r}, the planner on {data!r}.")
        return self

    @torch.inference_mode()
    def __call__(self, obs: np.ndarray, next_obs: np.ndarray) -> np.ndarray:
        """Actions (B, act_dim) in env units for states (B, obs_dim) and planned next states (B, obs_dim)."""
        norm = self.normalizer
        shift, scale = (torch.as_tensor(v, dtype=torch.float32) for v in (norm.shift, norm.scale))
        A = self.act_dim
        s, s_next = ((torch.as_tensor(np.asarray(v, np.float32)) - shift[A:]) / scale[A:] for v in (obs, next_obs))
        return (self.net(s, s_next) * scale[:A] + shift[:A]).numpy()
