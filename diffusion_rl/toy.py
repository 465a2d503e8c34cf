"""A 2-D toy diffusion: a few Gaussian modes, a small MLP denoiser, forward and reverse chains.

The same machinery as the trajectory planner, on data a reader can see whole: the forward process
is :func:`diffusion_rl.diffusion.forward_chain`, the reverse step is the posterior
:meth:`diffusion_rl.diffusion.NoiseSchedule.q_posterior` around the network's guess of the clean
point, as in the planner's sampler. Because the data is a
Gaussian mixture, the best possible guess ``E[x^0 | x^t]`` is known in closed form
(:func:`posterior_mean`), so the book can show what the regression loss is trained towards.
It trains in a few seconds on one CPU thread.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from diffusion_rl.diffusion import NoiseSchedule, forward_chain

__all__ = [
    "ToyData",
    "ToyDenoiser",
    "ToyDiffusion",
    "density",
    "plot_toy_step",
    "posterior_mean",
    "reverse_chain",
    "toy_forward",
    "train_toy",
]


@dataclass(frozen=True)
class ToyData:
    """An equal-weight mixture of isotropic Gaussians in 2-D: ``modes`` (K, 2) centres, one ``std``."""

    modes: tuple[tuple[float, float], ...] = ((-1.2, -1.2), (-1.2, 1.2), (1.2, -1.2), (1.2, 1.2), (0.0, 0.0))
    std: float = 0.15

    @property
    def centres(self) -> torch.Tensor:
        """The mode centres as a (K, 2) float tensor."""
        return torch.tensor(self.modes, dtype=torch.float32)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n points (n, 2): a uniformly chosen mode plus Gaussian noise of ``std``."""
        which = torch.randint(len(self.modes), (n,), generator=generator)
        return self.centres[which] + self.std * torch.randn(n, 2, generator=generator)

    def nearest_mode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Index of each point's nearest mode and the distance to it, both (N,)."""
        d = torch.cdist(x, self.centres)
        dist, idx = d.min(dim=1)
        return idx, dist


def density(data: ToyData, x: torch.Tensor, abar: float = 1.0) -> torch.Tensor:
    """Density of x^t (N, 2) under q(x^t) when x^0 ~ data: a mixture with means sqrt(abar) mu_k."""
    var = abar * data.std**2 + (1 - abar)  # each component's variance after noising
    d2 = ((x[:, None, :] - math.sqrt(abar) * data.centres[None]) ** 2).sum(-1)
    return torch.exp(-0.5 * d2 / var).mean(1) / (2 * math.pi * var)


def posterior_mean(data: ToyData, x_t: torch.Tensor, abar: float) -> torch.Tensor:
    """The exact E[x^0 | x^t] for the mixture: the best possible x^0-prediction under squared error.

    Bayes' rule per component: the weight of mode k is its likelihood for x^t, and within mode k the
    Gaussian posterior mean shrinks x^t / sqrt(abar) towards mu_k. Its weighted sum is not linear in x^t.
    """
    s2, a = data.std**2, abar
    var = a * s2 + (1 - a)
    mu = data.centres[None]  # (1, K, 2)
    logw = -0.5 * ((x_t[:, None, :] - math.sqrt(a) * mu) ** 2).sum(-1) / var
    w = torch.softmax(logw, dim=1)  # (N, K) responsibilities
    within = mu + (math.sqrt(a) * s2 / var) * (x_t[:, None, :] - math.sqrt(a) * mu)
    return (w[..., None] * within).sum(1)


class ToyDenoiser(nn.Module):
    """A small MLP f(x^t, t) for 2-D points (the noise or x^0); the level enters as a learned embedding."""

    def __init__(self, n_timesteps: int, hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(n_timesteps, hidden)
        self.inp = nn.Linear(2, hidden)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.out = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The prediction (B, 2) for noisy points x (B, 2) at code levels t (B,)."""
        return self.out(self.body(self.inp(x) + self.embed(t)))


@dataclass
class ToyDiffusion:
    """A trained toy model: its data, schedule, network and training log (loss per step)."""

    data: ToyData
    schedule: NoiseSchedule
    model: ToyDenoiser
    predict_epsilon: bool = True
    losses: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0

    @torch.no_grad()
    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's guess of x^0 from x^t at code levels t (B,), whichever it was trained to output."""
        out = self.model(x_t, t)
        return self.schedule.x0_from_eps(x_t, t, out) if self.predict_epsilon else out


def train_toy(
    data: ToyData | None = None,
    n_timesteps: int = 20,
    steps: int = 1500,
    batch_size: int = 512,
    lr: float = 3e-3,
    seed: int = 0,
    predict_epsilon: bool = True,
) -> ToyDiffusion:
    """Train the toy denoiser with the loss of Algorithm 1.1 (no conditioning); seconds on a CPU.

    The same cosine schedule as the planner, a uniform level per example and the closed-form jump
    ``q_sample``. By default the network predicts the noise (Ho et al.'s form): its loss is the x^0
    loss weighted by SNR(t), which makes the nearly clean levels count, and with sharp 2-D modes
    those decide how crisp the samples are.
    """
    data = ToyData() if data is None else data
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the network's initial weights
    schedule = NoiseSchedule(n_timesteps, "cosine")
    model = ToyDenoiser(n_timesteps)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # Cosine decay of the learning rate: a short run ends close to the minimum instead of jittering around it.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        x0 = data.sample(batch_size, gen)
        t = torch.randint(n_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = schedule.q_sample(x0, t, noise)
        loss = F.mse_loss(model(x_t, t), noise if predict_epsilon else x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return ToyDiffusion(data, schedule, model, predict_epsilon, losses, time.perf_counter() - start)


@torch.no_grad()
def reverse_chain(toy: ToyDiffusion, n: int, seed: int = 0, guide_grad=None, kappa: float = 0.0) -> torch.Tensor:
    """Run the reverse chain from N(0, I) for n points; every level (T + 1, n, 2), noise first, samples last.

    Each step draws from the posterior q(x^{t-1} | x^t, x^0 = f(x^t, t)) as the planner's sampler does.
    ``guide_grad(x)``, if given, is added times ``kappa`` after each step (the study's guidance).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=gen)
    chain = [x]
    for t_int in range(toy.schedule.n_timesteps - 1, -1, -1):
        t = torch.full((n,), t_int, dtype=torch.long)
        mean, log_var = toy.schedule.q_posterior(toy.predict_x0(x, t), x, t)
        z = torch.randn(x.shape, generator=gen)
        x = mean + (t_int > 0) * torch.exp(0.5 * log_var) * z
        if guide_grad is not None and kappa:
            x = x + kappa * guide_grad(x)
        chain.append(x)
    return torch.stack(chain)


def toy_forward(toy: ToyDiffusion, n: int, seed: int = 0) -> torch.Tensor:
    """Data points run through the forward chain step by step; every level (T + 1, n, 2), data first."""
    gen = torch.Generator().manual_seed(seed)
    x0 = toy.data.sample(n, gen)
    return forward_chain(toy.schedule, x0, torch.randn(toy.schedule.n_timesteps, n, 2, generator=gen))


def plot_toy_step(toy: ToyDiffusion, forward: torch.Tensor, reverse: torch.Tensor, t: int, lim: float = 3.0):
    """Two panels at level t (0..T): forward points over the true density of x^t, and the reverse chain's points.

    ``forward`` and ``reverse`` are the chains of :func:`toy_forward` and :func:`reverse_chain`
    (reverse is indexed from noise, so level t is ``reverse[T - t]``). Returns the figure.
    """
    import matplotlib.pyplot as plt

    T = toy.schedule.n_timesteps
    abar = 1.0 if t == 0 else float(toy.schedule.alpha_bar[t - 1])
    g = torch.linspace(-lim, lim, 121)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    dens = density(toy.data, torch.stack([xx.flatten(), yy.flatten()], 1), abar).reshape(xx.shape)
    fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.5), sharex=True, sharey=True)
    forward_title = "the data $x^0$" if t == 0 else rf"forward: $x^{{{t}}} \sim q(x^{{{t}}} \mid x^0)$"
    # Contours at fixed shares of the peak: none in the empty corners, where the density is ~0.
    levels = float(dens.max()) * np.array([0.05, 0.2, 0.4, 0.6, 0.8])
    for ax, pts, title, colour in [
        (axes[0], forward[t], forward_title, "tab:blue"),
        (axes[1], reverse[T - t], rf"reverse: $x^{{{t}}}$ from the model", "tab:red"),
    ]:
        ax.contour(xx, yy, dens, levels=levels, colors="0.6", linewidths=0.7)
        ax.scatter(pts[:, 0], pts[:, 1], s=4, alpha=0.5, color=colour)
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=title)
        ax.title.set_size(10)
    axes[0].set_ylabel("contours: true density of $x^t$", fontsize=9)
    snr = "inf" if t == 0 else f"{abar / (1 - abar):.3g}"
    fig.suptitle(rf"t = {t} of {T}:  $\bar\alpha_t$ = {abar:.3f}, SNR = {snr}", fontsize=11)
    fig.tight_layout()
    return fig
