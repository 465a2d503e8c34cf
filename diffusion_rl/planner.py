"""The planner: sample a plan from the current state, act on it, replan; and the closed loop that runs it.

``Planner.plan`` turns real observations into plans (Algorithm 1.2 with optional value guidance and
best-of-N selection) in the environment's units. ``rollout`` runs many episodes at once: at each
replanning point every live episode gets a plan conditioned on its real state, executes the first
``window`` actions of it (the executed window k, 1..H), and replans, until it falls or reaches 1000 steps.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from diffusion_rl.control import Controller, FixedWindow, InverseDynamicsActions
from diffusion_rl.data import Normalizer
from diffusion_rl.diffusion import ClassifierFree, GaussianDiffusion, Guide, GuidePlacement, check_warm_start, condition
from diffusion_rl.disturbances import Disturbance
from diffusion_rl.envs import ENV_ID, make_env
from diffusion_rl.models import ValueNet
from diffusion_rl.objectives import HEIGHT_INDEX, SPEED_INDEX, WithValue, make_objective
from diffusion_rl.runtime import torch_threads

__all__ = ["Planner", "Plan", "EpisodeResult", "rollout", "shift_plan", "summarize", "check_window", "check_guidance_scale", "episode_generator"]


class Plan(NamedTuple):
    """Plans for a batch of states, in environment units.

    actions (B, H, act_dim), observations (B, H, obs_dim); ``values``: V(tau) per plan (None without
    a value net); ``trajectories``: the normalized samples (B, H, D); ``chain``: every denoising
    stage, normalized, (steps + 1, B, H, D) when asked for.
    """

    actions: np.ndarray
    observations: np.ndarray
    values: np.ndarray | None
    trajectories: torch.Tensor
    chain: torch.Tensor | None


def check_window(window: int, horizon: int) -> int:
    """Refuse an executed window outside 1..H."""
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or not 1 <= window <= horizon:
        raise ValueError(f"The executed window must be an integer in 1..{horizon} (the plan's horizon), got {window!r}.")
    return int(window)


def check_guidance_scale(scale: float | None) -> float | None:
    """Refuse a negative, NaN or infinite guidance scale (None means no guidance)."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"The guidance scale must be a finite number >= 0 (or None for no guidance), got {scale!r}.")
    return float(scale)


def episode_generator(seed: int) -> torch.Generator:
    """The sampler's noise source for the episode with reset seed ``seed`` (independent of batch-mates)."""
    return torch.Generator().manual_seed(int(seed) + 1_000_003)


class Planner:
    """A trained denoiser, its normalizer and (optionally) a value network, ready to plan.

    Guidance options (see :class:`~diffusion_rl.diffusion.Guide`): one gradient step after each
    reverse step (``guide_placement="after"``, as the study's notebook), none in the last
    ``t_stopgrad = 2`` steps (as Diffuser), no variance scaling (as the study). With this "after"
    placement, on 100 tuning seeds at k = 8 and scale 0.3, it scored 69.1% of the data's return
    against 66.3% with the study's ``t_stopgrad = 0`` (a difference within the noise) and 59.3%
    unguided. ``guide_placement="before"`` pushes each x_t before its reverse step, as
    jannerm/diffuser's code does.

    ``min_batch``: batches smaller than this are padded. torch's CPU convolution and matmul kernels
    pick their blocking by batch size, so a row's last float bits (and, through MuJoCo's chaos, a whole
    episode) would otherwise depend on how many other episodes share the batch. On this machine's
    kernels every batch of 16 rows or more computes each row identically, whatever its batch-mates;
    tests/test_planner.py checks it, so an episode of a batched sweep can be replayed on its own.
    """

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        normalizer: Normalizer,
        value: ValueNet | None = None,
        meta: dict | None = None,
        n_guide_steps: int = 1,
        t_stopgrad: int = 2,
        scale_by_variance: bool = False,
        min_batch: int = 16,
        guide_placement: GuidePlacement = "after",
        clip_actions: bool = False,
        classifier_free: tuple[float, float] | None = None,
        objective: tuple[str, float] | None = None,
        guide_by_value: bool = False,
        inpaint: tuple[str, float] | None = None,
    ):
        if not isinstance(min_batch, int) or min_batch < 1:
            raise ValueError(f"min_batch must be a positive integer, got {min_batch!r}.")
        self.diffusion = diffusion.eval().requires_grad_(False)
        self.value = value.eval().requires_grad_(False) if value is not None else None
        self.normalizer = normalizer
        # The condition is a bare observation: normalize it with the observation columns' statistics.
        self.obs_normalizer = Normalizer(normalizer.shift[diffusion.action_dim:], normalizer.scale[diffusion.action_dim:], normalizer.kind)
        self.meta = meta or {}
        self.action_dim = diffusion.action_dim
        self.horizon = diffusion.horizon
        self.obs_dim = diffusion.transition_dim - diffusion.action_dim
        self.n_guide_steps, self.t_stopgrad, self.scale_by_variance = n_guide_steps, t_stopgrad, scale_by_variance
        self.guide_placement = guide_placement
        self.clip_actions = clip_actions
        self.guide_by_value = guide_by_value
        self.inpaint = inpaint
        self._inpaint_fn = self._inpainter()
        self.min_batch = min_batch
        if value is not None and (value.cfg.horizon, value.cfg.transition_dim) != (self.horizon, diffusion.transition_dim):
            raise ValueError(
                f"The value network was built for horizon {value.cfg.horizon} and {value.cfg.transition_dim} dims, "
                f"the denoiser for horizon {self.horizon} and {diffusion.transition_dim}: they do not belong together."
            )
        self.value_net = self.value  # the trained value network; an objective may stand in for it as ``value``
        self.classifier_free = self.objective = None
        self._set_steering(classifier_free, objective)

    def _set_steering(self, classifier_free: tuple[float, float] | None, objective: tuple[str, float] | None) -> None:
        """Set (and check) the classifier-free target and weight, and the test-time objective that replaces the value network."""
        if classifier_free is not None:
            target, weight = classifier_free
            self.classifier_free = ClassifierFree(target, weight)  # checks the numbers first
            if not self.diffusion.conditional:
                raise ValueError("Classifier-free guidance needs a denoiser trained with a return condition "
                                 "(train-diffuser --returns-condition true); this planner's was trained without one.")
        else:
            self.classifier_free = None
        self.objective = objective
        if objective is None:
            self.value = self.value_net
            return
        name, target, *weight = objective
        score = make_objective(name, self.normalizer, self.action_dim, target).to(self.device)
        if weight:  # (name, target, weight): the value network's return plus the weighted objective
            if self.value_net is None:
                raise ValueError("An objective weighted against the value network needs a planner with a value network.")
            score = WithValue(self.value_net, score, weight[0])
        self.value = score

    OPTIONS = ("n_guide_steps", "t_stopgrad", "scale_by_variance", "guide_placement", "clip_actions", "classifier_free", "objective",
               "guide_by_value", "inpaint")
    """Sampling options that :meth:`with_options` may change; the networks stay shared.

    ``classifier_free = (target, weight)``: classifier-free guidance toward that return (a denoiser
    trained with ``--returns-condition``); ``objective = (name, target)``: a test-time objective
    (:mod:`diffusion_rl.objectives`) that guidance and best-of-N use instead of the value network;
    ``(name, target, weight)``: added to the value network's return with that weight. ``guide_by_value``:
    the gradient follows the value network while the objective picks among best-of-N's samples.
    ``inpaint = (name, target)``: write the objective's target into every future step of every intermediate
    plan, as the current state is written (a constraint, no gradient).
    """

    def with_options(self, **options) -> Planner:
        """A planner that shares these networks but samples with other options (see ``OPTIONS``)."""
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(f"Unknown planner option(s) {unknown}; choose from {list(self.OPTIONS)}.")
        other = copy.copy(self)
        steering = {"classifier_free": self.classifier_free and (self.classifier_free.target, self.classifier_free.weight),
                    "objective": self.objective}
        for name, value in options.items():
            if name in steering:
                steering[name] = value
            else:
                setattr(other, name, value)
        other._set_steering(**steering)
        other.guide(0.0 if other.value is not None else None)  # validates the guidance options now, not mid-episode
        other._inpaint_fn = other._inpainter()  # built (and checked) once, not at every plan
        return other

    def _inpainter(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The ``inpaint`` option as a function of intermediate plans (None without one)."""
        if self.inpaint is None:
            return None
        name, target = self.inpaint
        return make_objective(name, self.normalizer, self.action_dim, target).to(self.device).inpaint

    @property
    def evals_per_step(self) -> int:
        """Denoiser evaluations per reverse step: two with classifier-free guidance (with and without the condition)."""
        return 2 if self.classifier_free is not None else 1

    def action_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The environment's action range [-1, 1] in the normalizer's units, per action dimension."""
        edges = np.zeros((2, self.action_dim + self.obs_dim))
        edges[:, : self.action_dim] = [[-1.0], [1.0]]
        low, high = torch.as_tensor(self.normalizer.normalize(edges)[:, : self.action_dim], dtype=torch.float32, device=self.device)
        return torch.minimum(low, high), torch.maximum(low, high)

    @property
    def device(self) -> torch.device:
        return next(self.diffusion.parameters()).device

    def to(self, device: str | torch.device) -> Planner:
        """Move the networks to ``device``."""
        self.diffusion.to(device)
        for net in {id(v): v for v in (self.value, self.value_net) if v is not None}.values():
            net.to(device)
        self._inpaint_fn = self._inpainter()  # its target lives on the device too
        return self

    def guide(self, scale: float | None) -> Guide | None:
        """The guidance object for scale kappa (None: unguided)."""
        scale = check_guidance_scale(scale)
        if scale is None:
            return None
        net = self.value_net if self.guide_by_value else self.value
        if net is None:
            raise ValueError("Guidance needs a value network or an objective; this planner was loaded without a value network.")
        return Guide(net, scale, self.n_guide_steps, self.t_stopgrad, self.scale_by_variance, self.guide_placement)

    def guide_settings(self) -> dict:
        """The guidance options, as results record them."""
        return {"n_steps": self.n_guide_steps, "t_stopgrad": self.t_stopgrad,
                "scale_by_variance": self.scale_by_variance, "placement": self.guide_placement}

    def plan(
        self,
        observations: np.ndarray,
        guidance_scale: float | None = None,
        n_samples: int = 1,
        generators: Sequence[torch.Generator] | torch.Generator | None = None,
        seed: int | None = None,
        ddim_steps: int | None = None,
        return_chain: bool = False,
        warm_start: tuple[torch.Tensor, int] | None = None,
        with_values: bool = True,
    ) -> Plan:
        """Plans from observations (B, obs_dim) or (obs_dim,).

        ``n_samples`` > 1 draws that many plans per state and keeps the one the value network rates
        highest (best-of-N). Noise comes from one generator per row (``generators``), or from ``seed``.
        ``warm_start = (tau, n)``: start each row from its guess ``tau`` (B, H, D, normalized, e.g. the
        previous plan shifted by :func:`shift_plan`) noised to level n - 1, and denoise n levels only.
        ``with_values=False`` skips scoring an unguided single plan with the value network (``Plan.values`` is
        then None): the closed loop never reads it, and for a one-step sampler it is a third of the work.
        """
        obs = np.asarray(observations, np.float32)
        single = obs.ndim == 1
        obs = obs[None] if single else obs
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim:
            raise ValueError(f"observations must have shape (B, {self.obs_dim}) or ({self.obs_dim},), got {np.shape(observations)}.")
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}.")
        if n_samples > 1 and self.value is None:
            raise ValueError("Best-of-N selection (n_samples > 1) needs a value network or an objective.")
        guide = self.guide(guidance_scale)
        B = len(obs)
        if generators is None:
            generators = torch.Generator().manual_seed(seed) if seed is not None else torch.default_generator
        if isinstance(generators, torch.Generator):
            generators = [generators] * B
        if len(generators) != B:
            raise ValueError(f"Got {len(generators)} generators for {B} observations.")

        top = None if warm_start is None else check_warm_start(warm_start[1], self.diffusion.n_timesteps) - 1
        n_steps = len(self.diffusion.levels(ddim_steps, top))
        shape = (n_samples, n_steps + 1, self.horizon, self.diffusion.transition_dim)
        # Row-major (state, sample) order: each row's noise depends only on its own generator.
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])  # (B, N, steps+1, H, D)
        noise = noise.flatten(0, 1).transpose(0, 1)  # (steps+1, B*N, H, D)

        # Unguided sampling needs no autograd at all; guided sampling turns it on only for dV/dx.
        with torch.inference_mode() if guide is None else torch.no_grad():
            cond = self.obs_normalizer.normalize(torch.from_numpy(obs).to(self.device)).repeat_interleave(n_samples, 0)
            rows, pad = len(cond), max(0, self.min_batch - len(cond))
            start = None
            if warm_start is not None:
                start = torch.as_tensor(warm_start[0], dtype=torch.float32, device=self.device).repeat_interleave(n_samples, 0)
            if pad:  # see min_batch: padding rows make each row's result independent of its batch-mates
                cond = torch.cat([cond, cond[:1].expand(pad, -1)])
                noise = torch.cat([noise, noise.new_zeros(noise.shape[0], pad, *noise.shape[2:])], 1)
                start = torch.cat([start, start[:1].expand(pad, -1, -1)]) if start is not None else None
            bounds = self.action_bounds() if self.clip_actions else None
            out = self.diffusion.sample(cond, noise=noise, guide=guide, ddim_steps=ddim_steps, return_chain=return_chain,
                                        action_bounds=bounds, warm_start=None if start is None else (start, warm_start[1]),
                                        free=self.classifier_free, inpaint=self._inpaint_fn)
            x, values, chain = out.trajectories, out.values, out.chain
            if guide is not None and guide.value is not self.value:
                values = None  # the guide scored the plans by the value network; the objective chooses among them
            if values is None and self.value is not None and (with_values or n_samples > 1):
                values = self.value(x, torch.zeros(len(x), dtype=torch.long, device=x.device))
        # Plain tensors again (not inference tensors), so callers may differentiate through them.
        x, chain = x[:rows].clone(), (chain[:, :rows].clone() if chain is not None else None)
        values = values[:rows].clone() if values is not None else None
        if n_samples > 1:
            best = values.view(B, n_samples).argmax(1) + torch.arange(B, device=x.device) * n_samples
            x, values = x[best], values[best]
            chain = chain[:, best] if chain is not None else None
        raw = self.normalizer.unnormalize(x.double()).float().cpu().numpy()
        actions, observations_ = raw[..., : self.action_dim], raw[..., self.action_dim:]
        vals = values.cpu().numpy() if values is not None else None
        if single:
            actions, observations_, vals = actions[0], observations_[0], (vals[0] if vals is not None else None)
        return Plan(actions, observations_, vals, x, chain)


    @torch.inference_mode()
    def plan_error(self, observations: np.ndarray, trajectories: torch.Tensor, level: int,
                   generators: Sequence[torch.Generator]) -> np.ndarray:
        """How implausible each remaining plan is from the real state: the denoiser's reconstruction error. Shape (B,).

        Each plan (normalized, (B, H, D), already shifted to the current step) gets the real state
        written into row 0, is noised to ``level`` with its episode's own noise, and is denoised in one
        call; the RMS error of the reconstruction over rows 1..H-1, in normalized units, is the score.
        A plan the model finds likely from this state comes back nearly unchanged (the idea behind
        RDM's replanning test, Zhou et al. 2023, with the reconstruction error standing in for the likelihood).
        """
        if not isinstance(level, int) or not 0 <= level < self.diffusion.n_timesteps:
            raise ValueError(f"The probe level must be an integer in 0..{self.diffusion.n_timesteps - 1}, got {level!r}.")
        cond = self.obs_normalizer.normalize(torch.from_numpy(np.asarray(observations, np.float32)).to(self.device))
        x0 = condition(torch.as_tensor(trajectories, dtype=torch.float32, device=self.device).clone(), cond, self.action_dim)
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators]).to(self.device)
        rows, pad = len(x0), max(0, self.min_batch - len(x0))
        if pad:  # see min_batch
            x0, noise, cond = (torch.cat([v, v[:1].expand(pad, *v.shape[1:])]) for v in (x0, noise, cond))
        t = torch.full((len(x0),), level, dtype=torch.long, device=self.device)
        x_t = condition(self.diffusion.schedule.q_sample(x0, t, noise), cond, self.action_dim)
        error = (self.diffusion.predict_x0(x_t, t) - x0)[:rows, 1:].pow(2).mean((1, 2)).sqrt()
        return error.cpu().numpy()


def shift_plan(trajectory: torch.Tensor, steps: int) -> torch.Tensor:
    """A plan (H, D) as seen ``steps`` steps later: its remaining rows first, the last row repeated to fill H."""
    if steps <= 0:
        return trajectory
    rest = trajectory[min(steps, len(trajectory) - 1):]
    return torch.cat([rest, rest[-1:].expand(len(trajectory) - len(rest), -1)])


# ----------------------------------------------------------------------------- the closed loop


@dataclass
class EpisodeResult:
    """One closed-loop episode. ``window``: the most actions one plan could run (k for a fixed window);
    ``n_plans``, ``denoiser_evals`` and ``guidance_gradients`` count the planning work (a DDIM plan of S
    steps is S evaluations; each of best-of-N's samples counts). With ``record``: states (T+1, obs), the root x positions the
    observations omit (T+1,), actions (T, act), rewards (T,), and the plans in force:
    ``plans[j]`` (H, act+obs, env units) began at step ``plan_steps[j]``; its row r predicts step ``plan_steps[j] + r``."""

    seed: int
    window: int
    guidance_scale: float | None
    controller: str = ""
    n_plans: int = 0
    denoiser_evals: int = 0
    guidance_gradients: int = 0
    total_return: float = 0.0
    length: int = 0
    fell: bool = False
    diverged: bool = False
    mean_speed: float = 0.0
    """The torso's forward velocity (observation 8, m/s), averaged over the episode's steps."""
    mean_height: float = 0.0
    """The torso's height (observation 0, m), averaged over the episode's steps."""
    states: np.ndarray | None = None
    x: np.ndarray | None = None
    actions: np.ndarray | None = None
    rewards: np.ndarray | None = None
    plans: np.ndarray | None = None
    plan_steps: np.ndarray | None = None


def _per_episode(value, n: int, name: str) -> list:
    """A setting given once for all episodes, or one per episode."""
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != n:
            raise ValueError(f"Got {len(value)} values of {name} for {n} seeds; give one, or one per seed.")
        return list(value)
    return [value] * n


def rollout(
    planner: Planner,
    seeds: Sequence[int],
    window: int | Sequence[int] | None = None,
    guidance_scale: float | None | Sequence[float | None] = None,
    n_samples: int = 1,
    ddim_steps: int | None = None,
    max_steps: int = 1000,
    record: bool = False,
    threads: int = 1,
    env_id: str = ENV_ID,
    progress: bool = False,
    on_episode_end: Callable[[int, EpisodeResult], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    controller: Controller | Sequence[Controller] | None = None,
    warm_start: int | None = None,
    inverse_dynamics: InverseDynamicsActions | None = None,
    disturbance: Disturbance | None = None,
) -> list[EpisodeResult]:
    """Run one closed-loop episode per reset seed, all at once; returns their results in seed order.

    Each episode's ``controller`` (:mod:`diffusion_rl.control`; one for all, copied per episode, or
    one per seed) decides at every step whether to replan and which planned action to take;
    ``window`` k is shorthand for ``FixedWindow(k)`` (default 1). Every live episode that wants a plan
    samples one from its real state, and ``window``/``controller`` and ``guidance_scale`` may differ
    per episode, so a whole sweep shares each call to the denoiser. Episodes end on a fall
    (termination), at ``max_steps``, or if the simulation produces a non-finite state (flagged
    ``diverged``); ``on_episode_end(index, result)`` is called as each one ends, ``on_step(1)`` after every step.
    ``warm_start`` n: every plan after an episode's first starts from the previous plan, shifted by the
    steps executed since and noised to level n - 1, and denoises n levels instead of all of them.
    ``inverse_dynamics``: take the action that model names for reaching the plan's next state from the
    real state, instead of the plan's own action (:class:`~diffusion_rl.control.InverseDynamicsActions`).
    ``disturbance``: pushes or shifted dynamics (:mod:`diffusion_rl.disturbances`), the same on every seed's episode.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("rollout needs at least one seed.")
    if controller is not None and window is not None:
        raise ValueError("Give rollout a window or a controller, not both (a window k is the controller FixedWindow(k)).")
    if controller is None:
        windows = [check_window(w, planner.horizon) for w in _per_episode(1 if window is None else window, len(seeds), "window")]
        controllers = [FixedWindow(w) for w in windows]
    else:
        controllers = [copy.deepcopy(c) for c in _per_episode(controller, len(seeds), "controller")]
    scale = planner.obs_normalizer.scale
    controllers = [c.bind(planner.horizon, scale) for c in controllers]
    scales = [check_guidance_scale(g) for g in _per_episode(guidance_scale, len(seeds), "guidance_scale")]
    planner.diffusion.levels(ddim_steps)  # refuses S outside 1..N before any episode starts
    if warm_start is not None:
        planner.diffusion.levels(ddim_steps, check_warm_start(warm_start, planner.diffusion.n_timesteps) - 1)  # refuses S > n
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}.")
    if inverse_dynamics is not None:
        inverse_dynamics.check_planner(planner)
    envs = [make_env(env_id, max_episode_steps=max_steps, disturbance=disturbance) for _ in seeds]
    results = [EpisodeResult(seed=s, window=c.max_window, guidance_scale=g, controller=c.label()) for s, c, g in zip(seeds, controllers, scales)]
    def work(warm: bool) -> tuple[int, int]:
        """Denoiser evaluations and guidance gradients of one plan, fresh or warm-started."""
        steps = len(planner.diffusion.levels(ddim_steps, warm_start - 1 if warm else None))
        return n_samples * steps * planner.evals_per_step, n_samples * planner.n_guide_steps * max(0, steps - planner.t_stopgrad)

    previous: list[torch.Tensor | None] = [None] * len(seeds)  # each episode's plan in force, normalized
    gens = [episode_generator(s) for s in seeds]
    obs = np.stack([env.reset(seed=s)[0] for env, s in zip(envs, seeds)]).astype(np.float32)
    logs = [_Log(o, env) for o, env in zip(obs, envs)] if record else None
    live = list(range(len(seeds)))
    bar = _bar(progress, max_steps)
    try:
        with torch_threads(threads):
            for step in range(max_steps):
                if not live:
                    break
                # Controllers that judge their plan with the denoiser (Likelihood) share one probe call.
                probe = [i for i in live if controllers[i].probe_level is not None and controllers[i].can_probe()]
                if probe:
                    level = controllers[probe[0]].probe_level
                    if any(controllers[i].probe_level != level for i in probe):
                        raise ValueError("Every likelihood controller of one rollout must probe at the same level.")
                    shifted = torch.stack([shift_plan(previous[i], controllers[i].offset) for i in probe])
                    for i, e in zip(probe, planner.plan_error(obs[probe], shifted, level, [gens[i] for i in probe])):
                        controllers[i].observe(float(e))
                        results[i].denoiser_evals += 1
                replan = [i for i in live if controllers[i].wants_plan(obs[i])]
                # One denoiser call per guidance scale (and fresh or warm start): every episode that replans now shares it.
                for g, warm in dict.fromkeys((scales[i], warm_start is not None and previous[i] is not None) for i in replan):
                    rows = [i for i in replan if scales[i] == g and (warm_start is not None and previous[i] is not None) == warm]
                    start = None
                    if warm:
                        start = (torch.stack([shift_plan(previous[i], controllers[i].offset) for i in rows]), warm_start)
                    plan = planner.plan(obs[rows], g, n_samples, [gens[i] for i in rows], ddim_steps=ddim_steps, warm_start=start,
                                        with_values=False)
                    evals, gradients = work(warm)
                    for j, i in enumerate(rows):
                        controllers[i].new_plan(plan.actions[j], plan.observations[j])
                        previous[i] = plan.trajectories[j]
                        r = results[i]
                        r.n_plans, r.denoiser_evals = r.n_plans + 1, r.denoiser_evals + evals
                        r.guidance_gradients += gradients if g is not None else 0
                        if record:
                            logs[i].plan(step, np.concatenate([plan.actions[j], plan.observations[j]], 1))
                actions = np.stack([controllers[i].action() for i in live])
                if inverse_dynamics is not None:  # one batched call for every episode whose plan has a next state
                    targets = [controllers[i].next_state() for i in live]
                    has = [j for j, t in enumerate(targets) if t is not None]
                    if has:
                        actions[has] = inverse_dynamics(obs[[live[j] for j in has]], np.stack([targets[j] for j in has]))
                still = []
                for i, action in zip(live, actions):
                    action = np.clip(action, -1.0, 1.0)
                    controllers[i].advance()
                    o, reward, terminated, truncated, _ = envs[i].step(action)
                    r = results[i]
                    finite = bool(np.all(np.isfinite(o))) and math.isfinite(reward)
                    r.total_return += float(reward) if finite else 0.0
                    r.length += 1
                    if finite:  # running means of what test-time objectives ask for
                        r.mean_speed += (float(o[SPEED_INDEX]) - r.mean_speed) / r.length
                        r.mean_height += (float(o[HEIGHT_INDEX]) - r.mean_height) / r.length
                    if record:
                        logs[i].step(o, envs[i], action, reward)
                    if not finite or _simulation_blew_up(envs[i]):
                        r.diverged = True
                    elif terminated:
                        r.fell = True
                    elif not truncated:
                        obs[i] = o
                        still.append(i)
                        continue
                    if record:
                        logs[i].finish(r)
                    if on_episode_end is not None:
                        on_episode_end(i, r)
                live = still
                bar.update(1)
                if on_step is not None:
                    on_step(1)
    finally:
        bar.close()
        for env in envs:
            env.close()
    return results


@functools.cache
def _bad_state_warnings() -> tuple[int, ...]:
    """MuJoCo's warning slots for a NaN or huge position, velocity, acceleration or control."""
    import mujoco

    w = mujoco.mjtWarning
    return tuple(int(x) for x in (w.mjWARN_BADQPOS, w.mjWARN_BADQVEL, w.mjWARN_BADQACC, w.mjWARN_BADCTRL))


def _simulation_blew_up(env) -> bool:
    """Whether MuJoCo met a NaN or huge state or control since the episode's reset.

    MuJoCo resets a simulation whose state became NaN or huge (and zeroes a bad control), so the
    observation after it looks normal: only its warning counters tell that the episode diverged.
    """
    warnings = env.unwrapped.data.warning
    return any(warnings[i].number for i in _bad_state_warnings())


class _Log:
    """What ``record`` keeps of one episode while it runs."""

    def __init__(self, obs: np.ndarray, env):
        self.states, self.x = [obs.copy()], [float(env.unwrapped.data.qpos[0])]
        self.actions, self.rewards, self.plans, self.plan_steps = [], [], [], []

    def plan(self, step: int, plan: np.ndarray) -> None:
        self.plan_steps.append(step)
        self.plans.append(plan)

    def step(self, obs: np.ndarray, env, action: np.ndarray, reward: float) -> None:
        self.states.append(obs)
        self.x.append(float(env.unwrapped.data.qpos[0]))
        self.actions.append(action)
        self.rewards.append(reward)

    def finish(self, r: EpisodeResult) -> None:
        r.states, r.x = np.asarray(self.states, np.float32), np.asarray(self.x)
        r.actions, r.rewards = np.asarray(self.actions, np.float32), np.asarray(self.rewards, np.float32)
        r.plans, r.plan_steps = np.asarray(self.plans, np.float32), np.asarray(self.plan_steps)


def _bar(progress: bool, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not progress, desc="rollout", unit="step", mininterval=1.0)


def summarize(results: Sequence[EpisodeResult], reference_return: float | None = None) -> dict:
    """Mean, std and falls of closed-loop episodes; ``percent`` of ``reference_return`` (the data's mean) if given."""
    returns = np.array([r.total_return for r in results])
    out = {
        "episodes": len(results),
        "seeds": [r.seed for r in results],
        "window": results[0].window if results else None,
        "guidance_scale": results[0].guidance_scale if results else None,
        "mean_return": float(returns.mean()),
        "std_return": float(returns.std()),
        "falls": int(sum(r.fell for r in results)),
        "diverged": int(sum(r.diverged for r in results)),
        "mean_length": float(np.mean([r.length for r in results])),
        "mean_speed": float(np.mean([r.mean_speed for r in results])),
        "mean_height": float(np.mean([r.mean_height for r in results])),
        "returns": [round(float(x), 2) for x in returns],
    }
    if reference_return:
        out["percent_of_data"] = float(100 * returns.mean() / reference_return)
    return out
