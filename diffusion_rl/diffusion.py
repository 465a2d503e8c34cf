"""Gaussian diffusion over trajectories: forward noising, the training loss, and the conditioned samplers.

Vocabulary follows Ho et al. (2020) and the study:

* forward noising ``q(tau^t | tau^0) = N(sqrt(abar_t) tau^0, (1 - abar_t) I)`` (:class:`NoiseSchedule`);
* the loss of the study's Algorithm 1.1: noise a data window to a random level ``t``, hold its first
  state noiseless (the condition), and regress the network onto ``tau^0`` (or onto the noise);
* the sampler of Algorithm 1.2: start from Gaussian noise and run the reverse chain, writing the
  current state ``s_0`` back into the first row after every step; optionally nudge each step
  along the gradient of a value network (classifier guidance), mix a return-conditioned and an
  unconditioned prediction (classifier-free guidance), or take fewer, deterministic steps (DDIM).

Time indices run ``t = 0 .. T-1``; ``t = T-1`` is (almost) pure noise and one step below ``t = 0``
is the clean trajectory. Every stage is returned on request (``return_chain``) so the book can plot it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from diffusion_rl.models import TemporalUnet, ValueNet

__all__ = [
    "ClassifierFree",
    "GaussianDiffusion",
    "Guide",
    "GuidePlacement",
    "NoiseSchedule",
    "Sample",
    "check_warm_start",
    "condition",
    "denoising_error",
    "forward_chain",
    "make_betas",
]

ScheduleKind = Literal["cosine", "linear"]
ActionBounds = tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------- schedules


def make_betas(kind: ScheduleKind, n_timesteps: int) -> np.ndarray:
    """Noise added at each of ``n_timesteps`` forward steps, float64.

    ``cosine``: Nichol & Dhariwal (2021), abar_t = cos^2(((t/T + s) / (1 + s)) pi/2), s = 0.008.
    ``linear``: Ho et al. (2020), 1e-4 .. 0.02 at T = 1000, rescaled by 1000/T so that a short chain
    still ends in (nearly) pure noise.
    """
    if not isinstance(n_timesteps, int) or n_timesteps < 1:
        raise ValueError(f"n_timesteps must be a positive integer, got {n_timesteps!r}.")
    if kind == "cosine":
        s = 0.008
        steps = np.linspace(0, n_timesteps, n_timesteps + 1, dtype=np.float64)
        abar = np.cos((steps / n_timesteps + s) / (1 + s) * math.pi / 2) ** 2
        betas = 1 - abar[1:] / abar[:-1]
    elif kind == "linear":
        scale = 1000 / n_timesteps
        betas = np.linspace(scale * 1e-4, scale * 0.02, n_timesteps, dtype=np.float64)
    else:
        raise ValueError(f"Unknown beta schedule {kind!r}: use 'cosine' or 'linear'.")
    return np.clip(betas, 0.0, 0.999)


def _extract(a: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """a[t] per sample, shaped to broadcast over a (B, ...) tensor of ``ndim`` dims."""
    return a[t].reshape(-1, *([1] * (ndim - 1)))


class NoiseSchedule(nn.Module):
    """The forward process q and the posterior q(tau^{t-1} | tau^t, tau^0) of one beta schedule.

    Derived quantities are computed in float64 and stored as float32 buffers, so ``.to(device)``
    moves them with the model that owns the schedule.
    """

    def __init__(self, n_timesteps: int = 20, kind: ScheduleKind = "cosine"):
        super().__init__()
        self.n_timesteps, self.kind = n_timesteps, kind
        betas = make_betas(kind, n_timesteps)
        alphas = 1 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.r_[1.0, abar[:-1]]
        post_var = betas * (1 - abar_prev) / (1 - abar)
        buffers = {
            "betas": betas,
            "alpha_bar": abar,
            "alpha_bar_prev": abar_prev,
            "sqrt_alpha_bar": np.sqrt(abar),
            "sqrt_one_minus_alpha_bar": np.sqrt(1 - abar),
            # q(tau^{t-1} | tau^t, tau^0) = N(coef1 tau^0 + coef2 tau^t, post_var)
            "posterior_variance": post_var,
            "posterior_log_variance": np.log(np.maximum(post_var, 1e-20)),
            "posterior_coef1": betas * np.sqrt(abar_prev) / (1 - abar),
            "posterior_coef2": (1 - abar_prev) * np.sqrt(alphas) / (1 - abar),
        }
        for name, value in buffers.items():
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32), persistent=False)
        self._alpha_bar64 = abar  # float64, for the variance of a DDIM jump (step_variance)

    def step_variance(self, t: int, t_next: int) -> float:
        """Variance of q(tau^{t_next} | tau^t, tau^0) for a reverse step from level t to t_next < t (-1: clean).

        For t_next = t - 1 it is the one-step posterior variance; for a DDIM jump over several levels
        it is the same Gaussian conditioning across the jump (DDIM's eta = 1 variance).
        """
        if not 0 <= t < self.n_timesteps or not -1 <= t_next < t:
            raise ValueError(f"Need 0 <= t < {self.n_timesteps} and -1 <= t_next < t, got t={t}, t_next={t_next}.")
        if t_next == t - 1:
            return float(self.posterior_variance[t])
        abar_t, abar_next = self._alpha_bar64[t], (self._alpha_bar64[t_next] if t_next >= 0 else 1.0)
        return float((1 - abar_next) / (1 - abar_t) * (1 - abar_t / abar_next))

    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) at every t, shape (T,)."""
        return self.alpha_bar / (1 - self.alpha_bar)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw tau^t ~ q(tau^t | tau^0) = sqrt(abar_t) tau^0 + sqrt(1 - abar_t) noise. t: (B,) ints."""
        return _extract(self.sqrt_alpha_bar, t, x0.ndim) * x0 + _extract(self.sqrt_one_minus_alpha_bar, t, x0.ndim) * noise

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert q_sample for tau^0 given the noise."""
        return (x_t - _extract(self.sqrt_one_minus_alpha_bar, t, x_t.ndim) * eps) / _extract(self.sqrt_alpha_bar, t, x_t.ndim)

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Invert q_sample for the noise given tau^0."""
        return (x_t - _extract(self.sqrt_alpha_bar, t, x_t.ndim) * x0) / _extract(self.sqrt_one_minus_alpha_bar, t, x_t.ndim)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(tau^{t-1} | tau^t, tau^0)."""
        mean = _extract(self.posterior_coef1, t, x_t.ndim) * x0 + _extract(self.posterior_coef2, t, x_t.ndim) * x_t
        return mean, _extract(self.posterior_log_variance, t, x_t.ndim)


# ----------------------------------------------------------------------------- conditioning and guidance


def condition(x: torch.Tensor, state: torch.Tensor, action_dim: int) -> torch.Tensor:
    """Inpaint the current state: ``x[:, 0, action_dim:] = state`` (in place; returns ``x``)."""
    x[:, 0, action_dim:] = state
    return x


GuidePlacement = Literal["after", "before"]


@dataclass
class Guide:
    """Classifier guidance: nudge the trajectory along ``scale * grad_tau V(tau, t)`` at every reverse step.

    ``placement`` says where the nudge goes:

    * ``"after"`` (the study's notebook, this library's default): take the reverse step, then push
      the new, less noisy ``x`` (now at the next level) and score it at that level. With
      ``t_stopgrad = 0`` the finished plan gets one last push that no denoising step repairs.
    * ``"before"`` (jannerm/diffuser's code): push ``x_t`` at its own level ``t``, then take the
      reverse step from the pushed point, so the denoiser always has the last word.

    ``scale`` is the guidance scale kappa; ``n_steps`` gradient steps are taken per reverse step; no
    guidance in the sampler's last ``t_stopgrad`` reverse steps (DDPM or DDIM steps alike: for DDPM
    that is every step from a level t < t_stopgrad); ``scale_by_variance`` multiplies the gradient by
    the variance of q(tau^{t'} | tau^t, tau^0) for the step being taken from t to t' (for DDPM the
    one-step posterior variance, Diffuser's code; the study does not scale).
    """

    value: ValueNet
    scale: float = 0.1
    n_steps: int = 1
    t_stopgrad: int = 0
    scale_by_variance: bool = False
    placement: GuidePlacement = "after"

    def __post_init__(self):
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) or self.scale < 0:
            raise ValueError(f"The guidance scale must be a finite number >= 0, got {self.scale!r}.")
        if not isinstance(self.n_steps, int) or self.n_steps < 1:
            raise ValueError(f"n_steps must be a positive integer, got {self.n_steps!r}.")
        if not isinstance(self.t_stopgrad, int) or self.t_stopgrad < 0:
            raise ValueError(f"t_stopgrad must be an integer >= 0, got {self.t_stopgrad!r}.")
        if self.placement not in ("after", "before"):
            raise ValueError(f"Guidance placement must be 'after' or 'before', got {self.placement!r}.")

    def gradient(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """dV/dx at x; the value network's parameters get no gradient."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.value(x, t).sum(), x)
        return grad


@dataclass(frozen=True)
class ClassifierFree:
    """Classifier-free guidance (Ho and Salimans 2022; Decision Diffuser, Ajay et al. 2023) toward a return.

    Each reverse step runs the denoiser twice, with the condition y = ``target`` and without it, and
    uses ``uncond + weight * (cond - uncond)``: weight 0 ignores the target, 1 is the plain
    conditional model, and larger weights extrapolate past it. ``target`` is in the model's condition
    units (the discounted return-to-go over its ``return_scale``; about 1 for the expert).
    """

    target: float = 1.0
    weight: float = 1.2

    def __post_init__(self):
        for name, low in (("target", -math.inf), ("weight", 0.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not math.isfinite(v) or v < low:
                what = "a finite number" + (" >= 0" if low == 0 else "")
                raise ValueError(f"The classifier-free {name} must be {what}, got {v!r}.")


class Sample(NamedTuple):
    """A batch of sampled trajectories (normalized), shape (B, H, D).

    ``chain``: every intermediate tau^t, shape (steps + 1, B, H, D), first the initial noise, last
    the sample (None unless asked for). ``values``: V(tau^0) per sample when a value net was given.
    """

    trajectories: torch.Tensor
    chain: torch.Tensor | None
    values: torch.Tensor | None


# ----------------------------------------------------------------------------- diffusion model

MAX_EPS_AMPLIFICATION = 1e5
"""Largest 1 / sqrt(alpha_bar) accepted with epsilon-prediction (cosine: 406 at T = 20, 2.0e4 at T = 1000;
linear: 1.3e5 at T = 20, where the rescaled betas reach the 0.999 cap, refused)."""



class GaussianDiffusion(nn.Module):
    """A denoiser with its noise schedule: the training loss and the conditioned samplers."""

    def __init__(
        self,
        model: TemporalUnet,
        action_dim: int,
        n_timesteps: int = 20,
        schedule: ScheduleKind = "cosine",
        predict_epsilon: bool = False,
        action_weight: float = 10.0,
        clip_denoised: float | None = None,
    ):
        super().__init__()
        self.model = model
        self.horizon, self.transition_dim = model.cfg.horizon, model.cfg.transition_dim
        self.action_dim = action_dim
        self.n_timesteps = n_timesteps
        self.predict_epsilon = predict_epsilon
        self.clip_denoised = clip_denoised
        self.schedule = NoiseSchedule(n_timesteps, schedule)
        amplification = 1 / math.sqrt(float(self.schedule._alpha_bar64[-1]))
        if predict_epsilon and amplification > MAX_EPS_AMPLIFICATION:
            raise ValueError(
                f"epsilon-prediction with the {schedule} schedule at T = {n_timesteps} divides by sqrt(alpha_bar) = "
                f"{1 / amplification:.1e} at the noisiest level, so every unit of noise error becomes {amplification:.0e} units of "
                "tau^0 error; predict tau^0 instead (the default), or use the cosine schedule or more steps."
            )
        # Per-entry loss weights: the first action counts `action_weight` times (Diffuser), and the
        # conditioned first state is not learned at all: it is given to the model, never predicted.
        weights = torch.ones(self.horizon, self.transition_dim)
        weights[0, :action_dim] = action_weight
        weights[0, action_dim:] = 0.0
        self.register_buffer("loss_weights", weights / weights.mean(), persistent=False)

    # -- training (Algorithm 1.1)

    def loss(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, returns: torch.Tensor | None = None,
             keep: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted MSE of the denoiser on windows x0 (B, H, D) noised to levels t (B,) with ``noise``.

        A return-conditioned denoiser also gets each window's ``returns`` (B, 1), dropped where ``keep`` (B,) is 0.
        """
        state = x0[:, 0, self.action_dim:]
        x_t = condition(self.schedule.q_sample(x0, t, noise), state, self.action_dim)
        pred = self.model(x_t, t) if returns is None else self.model(x_t, t, returns, keep)
        target = noise if self.predict_epsilon else x0
        return (F.mse_loss(pred, target, reduction="none") * self.loss_weights).mean()

    # -- the reverse step

    @property
    def conditional(self) -> bool:
        """Whether the denoiser reads a return condition (classifier-free guidance)."""
        return bool(self.model.cfg.condition_dim)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, action_bounds: ActionBounds | None = None,
                   free: ClassifierFree | None = None) -> torch.Tensor:
        """The network's estimate of tau^0 from tau^t (clipped if ``clip_denoised``; actions kept
        inside ``action_bounds`` = (low, high), each (act_dim,) in normalized units, when given;
        guided toward a return by ``free``)."""
        if free is None:
            out = self.model(x_t, t)
        else:
            if not self.conditional:
                raise ValueError("Classifier-free guidance needs a denoiser trained with a return condition "
                                 "(train-diffuser --returns-condition); this one was trained without one.")
            B = len(x_t)
            y = torch.full((2 * B, self.model.cfg.condition_dim), float(free.target), device=x_t.device, dtype=x_t.dtype)
            keep = torch.cat([torch.ones(B, device=x_t.device), torch.zeros(B, device=x_t.device)]).to(x_t.dtype)
            # One call of twice the batch: the conditioned rows, then the same rows with the condition dropped.
            cond, uncond = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), y, keep).chunk(2)
            out = uncond + free.weight * (cond - uncond)
        x0 = self.schedule.x0_from_eps(x_t, t, out) if self.predict_epsilon else out
        x0 = x0.clamp(-self.clip_denoised, self.clip_denoised) if self.clip_denoised else x0
        if action_bounds is not None:
            low, high = action_bounds
            x0 = torch.cat([torch.maximum(torch.minimum(x0[..., : self.action_dim], high), low), x0[..., self.action_dim:]], -1)
        return x0

    def p_mean_log_variance(self, x_t: torch.Tensor, t: torch.Tensor, action_bounds: ActionBounds | None = None,
                            free: ClassifierFree | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of p(tau^{t-1} | tau^t): the posterior q around the predicted tau^0."""
        return self.schedule.q_posterior(self.predict_x0(x_t, t, action_bounds, free), x_t, t)

    # -- sampling (Algorithm 1.2)

    def sample_noise(self, batch_size: int, n_steps: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """All the Gaussian noise one sampling run consumes, shape (n_steps + 1, B, H, D), drawn on the CPU."""
        n_steps = self.n_timesteps if n_steps is None else n_steps
        return torch.randn(n_steps + 1, batch_size, self.horizon, self.transition_dim, generator=generator)

    @torch.no_grad()
    def sample(
        self,
        state: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        guide: Guide | None = None,
        ddim_steps: int | None = None,
        return_chain: bool = False,
        action_bounds: ActionBounds | None = None,
        warm_start: tuple[torch.Tensor, int] | None = None,
        free: ClassifierFree | None = None,
        inpaint: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Sample:
        """Sample plans that start at ``state`` (B, obs_dim), normalized.

        Randomness comes from ``noise`` (see :meth:`sample_noise`) or else from ``generator``, so a
        seed gives the same plans, with or without guidance. ``ddim_steps`` switches to the
        deterministic DDIM sampler (Song et al. 2021) on that many evenly spaced levels.
        ``action_bounds`` keeps every predicted tau^0's actions in range, so the denoiser's later
        steps (and the plan's states) follow the actions the environment will really apply.
        ``warm_start = (tau, n)`` starts from a guess ``tau`` (B, H, D) of the plan instead of pure
        noise: it is noised to level n - 1 and only those n levels are denoised (Diffuser, section 5.4).
        """
        B = state.shape[0]
        top = self.n_timesteps - 1
        if warm_start is not None:
            start, n = warm_start
            top = check_warm_start(n, self.n_timesteps) - 1
            if start.shape != (B, self.horizon, self.transition_dim):
                raise ValueError(f"The warm start has shape {tuple(start.shape)}, expected {(B, self.horizon, self.transition_dim)}.")
        levels = self.levels(ddim_steps, top)
        n_steps = len(levels)
        if noise is None:
            noise = self.sample_noise(B, n_steps, generator)
        if noise.shape != (n_steps + 1, B, self.horizon, self.transition_dim):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(n_steps + 1, B, self.horizon, self.transition_dim)}.")
        noise = noise.to(state.device, state.dtype)

        def fix(x: torch.Tensor) -> torch.Tensor:
            condition(x, state, self.action_dim)
            return x if inpaint is None else inpaint(x)

        if warm_start is None:
            x = fix(noise[0].clone())
        else:
            t_top = torch.full((B,), top, device=state.device, dtype=torch.long)
            x = fix(self.schedule.q_sample(warm_start[0].to(state.device, state.dtype), t_top, noise[0]))
        chain = [x.clone()] if return_chain else None
        for i, t_int in enumerate(levels):
            t_next = levels[i + 1] if i + 1 < len(levels) else -1  # the level x reaches; -1 is the clean plan
            guided = guide is not None and i < len(levels) - guide.t_stopgrad
            if guided and guide.placement == "before":
                x = self._guide(x, t_int, self.schedule.step_variance(t_int, t_next), guide, fix)
            t = torch.full((B,), t_int, device=state.device, dtype=torch.long)
            if ddim_steps is None:
                mean, log_var = self.p_mean_log_variance(x, t, action_bounds, free)
                x = mean + (t_int > 0) * torch.exp(0.5 * log_var) * noise[i + 1]
            else:
                x = self._ddim_step(x, t, t_next, action_bounds, free)
            fix(x)
            if guided and guide.placement == "after":
                # The value net knows no clean level: a finished plan is scored as level 0.
                x = self._guide(x, max(t_next, 0), self.schedule.step_variance(t_int, t_next), guide, fix)
            if return_chain:
                chain.append(x.clone())

        values = None
        if guide is not None:
            values = guide.value(x, torch.zeros(B, device=x.device, dtype=torch.long))
        return Sample(x, torch.stack(chain) if return_chain else None, values)

    def levels(self, ddim_steps: int | None = None, top: int | None = None) -> list[int]:
        """The levels the sampler steps from, noisiest first: every level from ``top`` (default T - 1)
        down to 0 (DDPM), or ``ddim_steps`` evenly spaced ones (a single DDIM step jumps from ``top``
        straight to the clean plan)."""
        top = self.n_timesteps - 1 if top is None else top
        if not isinstance(top, int) or not 0 <= top < self.n_timesteps:
            raise ValueError(f"The top level must be an integer in 0..{self.n_timesteps - 1}, got {top!r}.")
        if ddim_steps is None:
            return list(range(top, -1, -1))
        if isinstance(ddim_steps, bool) or not isinstance(ddim_steps, int) or not 1 <= ddim_steps <= top + 1:
            raise ValueError(f"ddim_steps must be an integer in 1..{top + 1} (the levels it can step through), got {ddim_steps!r}.")
        if ddim_steps == 1:  # linspace(0, top, 1) is [0]: pure noise would be labelled as almost clean
            return [top]
        return sorted({int(round(v)) for v in np.linspace(0, top, ddim_steps)}, reverse=True)

    def _ddim_step(self, x: torch.Tensor, t: torch.Tensor, t_next: int, action_bounds: ActionBounds | None = None,
                   free: ClassifierFree | None = None) -> torch.Tensor:
        """Deterministic DDIM update (eta = 0) from level t to level t_next (-1: the clean sample)."""
        x0 = self.predict_x0(x, t, action_bounds, free)
        eps = self.schedule.eps_from_x0(x, t, x0)
        abar_next = self.schedule.alpha_bar[t_next] if t_next >= 0 else torch.ones((), device=x.device)
        return abar_next.sqrt() * x0 + (1 - abar_next).sqrt() * eps

    def _guide(self, x: torch.Tensor, level: int, variance: float, guide: Guide,
               fix: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Push x, which sits at noise ``level``, up the value gradient (scored at that level); ``fix`` it again after each push."""
        t = torch.full((x.shape[0],), level, device=x.device, dtype=torch.long)
        for _ in range(guide.n_steps):
            grad = guide.gradient(x, t)
            if guide.scale_by_variance:
                grad = grad * variance
            x = fix(x + guide.scale * grad)
        return x


def check_warm_start(n: int, n_timesteps: int) -> int:
    """Refuse a warm start of n levels outside 1..N."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= n_timesteps:
        raise ValueError(f"A warm start re-noises the previous plan to n of the {n_timesteps} levels: n must be an integer in 1..{n_timesteps}, got {n!r}.")
    return int(n)


# ----------------------------------------------------------------------------- helpers for the book


def forward_chain(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Run q(tau^t | tau^{t-1}) step by step with noise (T, *x0.shape); every level (T + 1, *x0.shape), x0 first."""
    if noise.shape != (schedule.n_timesteps, *x0.shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(schedule.n_timesteps, *x0.shape)}.")
    chain = [x0]
    for beta, z in zip(schedule.betas, noise):
        chain.append((1 - beta).sqrt() * chain[-1] + beta.sqrt() * z)
    return torch.stack(chain)


@torch.no_grad()
def denoising_error(diffusion: GaussianDiffusion, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Squared error of predicted tau^0 per level from x0 (B, H, D) noised as in training; mean over B, (T, H, D)."""
    T, B = diffusion.n_timesteps, x0.shape[0]
    if noise.shape != (T, *x0.shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(T, *x0.shape)}.")
    state = x0[:, 0, diffusion.action_dim:]
    errors = []
    for t_int in range(T):
        t = torch.full((B,), t_int, dtype=torch.long, device=x0.device)
        x_t = condition(diffusion.schedule.q_sample(x0, t, noise[t_int]), state, diffusion.action_dim)
        errors.append(((diffusion.predict_x0(x_t, t) - x0) ** 2).mean(0))
    return torch.stack(errors)
