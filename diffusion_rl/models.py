"""Networks: the temporal U-Net that denoises trajectories, and the value network that scores them.

A trajectory window is a 2-D array ``[batch x horizon x transition_dim]`` whose rows are
``[a_t | s_t]``. Diffuser (Janner et al. 2022) treats the horizon as a 1-D "image" and the
transition dimensions as its channels, so the denoiser is a stack of 1-D convolutions over time:
a U-Net that halves the horizon on the way down and doubles it on the way up. Every residual block
sees the diffusion time ``t`` through a sinusoidal embedding, so one network denoises at every
noise level. The value network reuses the U-Net's down path and ends in a small MLP head. The inverse-dynamics
model is a plain MLP that names the action taking one state to the next (Decision Diffuser's actor).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["InverseDynamics", "LevelSplit", "TemporalUnet", "UNetConfig", "ValueNet", "check_horizon"]


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild a network from a checkpoint (saved with the weights)."""

    transition_dim: int
    horizon: int = 8
    dim: int = 32
    dim_mults: tuple[int, ...] = (1, 2, 4)
    kernel_size: int = 5
    """Width of the temporal convolutions; 5 steps as in Diffuser."""
    blocks_per_level: int = 2
    """Residual blocks per resolution; 1 halves the cost per step."""
    condition_dim: int = 0
    """Size of an extra condition the denoiser reads beside t (1: the return, for classifier-free guidance); 0: none."""

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples become lists)."""
        d = asdict(self)
        d["dim_mults"] = list(self.dim_mults)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**d, "dim_mults": tuple(d["dim_mults"])})


def check_horizon(horizon: int, dim_mults: tuple[int, ...]) -> None:
    """Refuse a horizon the U-Net cannot halve ``len(dim_mults) - 1`` times and restore."""
    factor = 2 ** (len(dim_mults) - 1)
    if not isinstance(horizon, int) or horizon < 1 or horizon % factor:
        raise ValueError(
            f"horizon {horizon!r} does not fit a U-Net with dim_mults={tuple(dim_mults)}: it is halved "
            f"{len(dim_mults) - 1} times, so it must be a positive multiple of {factor} (for example 8 or 32)."
        )


# ----------------------------------------------------------------------------- blocks


class SinusoidalEmbedding(nn.Module):
    """Diffusion time t (an integer per sample) -> a ``dim``-vector of sines and cosines (Vaswani et al. 2017)."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000) * torch.arange(half) / (half - 1)), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class ConvBlock(nn.Sequential):
    """Conv1d -> GroupNorm -> Mish, keeping the horizon's length."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, groups: int = 8):
        super().__init__(nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2), nn.GroupNorm(groups, c_out), nn.Mish())


class ResidualBlock(nn.Module):
    """Two conv blocks with the time embedding added between them, plus a skip connection."""

    def __init__(self, c_in: int, c_out: int, time_dim: int, kernel_size: int):
        super().__init__()
        self.block1 = ConvBlock(c_in, c_out, kernel_size)
        self.block2 = ConvBlock(c_out, c_out, kernel_size)
        self.time = nn.Sequential(nn.Mish(), nn.Linear(time_dim, c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H), temb: (B, time_dim)
        h = self.block1(x) + self.time(temb)[:, :, None]
        return self.block2(h) + self.skip(x)


class Level(nn.Module):
    """The residual blocks of one resolution of the U-Net."""

    def __init__(self, c_in: int, c_out: int, time_dim: int, kernel_size: int, n_blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            [ResidualBlock(c_in if i == 0 else c_out, c_out, time_dim, kernel_size) for i in range(n_blocks)]
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, temb)
        return x


def _time_mlp(dim: int) -> nn.Sequential:
    return nn.Sequential(SinusoidalEmbedding(dim), nn.Linear(dim, dim * 4), nn.Mish(), nn.Linear(dim * 4, dim))


class DownPath(nn.Module):
    """The U-Net's encoder: a level per entry of ``dim_mults``, halving the horizon between levels."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        check_horizon(cfg.horizon, cfg.dim_mults)
        self.channels = [cfg.transition_dim] + [cfg.dim * m for m in cfg.dim_mults]
        self.time_mlp = _time_mlp(cfg.dim)
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        last = len(cfg.dim_mults) - 1
        for i, (c_in, c_out) in enumerate(zip(self.channels[:-1], self.channels[1:])):
            self.levels.append(Level(c_in, c_out, cfg.dim, cfg.kernel_size, cfg.blocks_per_level))
            self.downs.append(nn.Conv1d(c_out, c_out, 3, stride=2, padding=1) if i < last else nn.Identity())

    def forward(self, x: torch.Tensor, t: torch.Tensor, extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """x: (B, D, H) channel-first; ``extra`` (B, dim) is added to the time embedding (a condition's).
        Returns the bottom features, the embedding and the skips."""
        temb = self.time_mlp(t) if extra is None else self.time_mlp(t) + extra
        skips = []
        for level, down in zip(self.levels, self.downs):
            x = level(x, temb)
            skips.append(x)
            x = down(x)
        return x, temb, skips


# ----------------------------------------------------------------------------- networks


class TemporalUnet(nn.Module):
    """Denoiser ``f(tau^t, t)`` over trajectories ``[batch x horizon x transition_dim]``, same shape out.

    With ``cfg.condition_dim`` > 0 it is ``f(tau^t, t, y)``: an MLP embeds the condition y (the
    return, Decision Diffuser) and adds it to the time embedding. ``keep`` (B,) of 0s and 1s drops
    the condition row by row, which is how one network learns both p(tau | y) and p(tau) (classifier-free
    guidance, Ho and Salimans 2022); no condition at all is the same as ``keep = 0``.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.down = DownPath(cfg)
        if cfg.condition_dim:
            self.condition_mlp = nn.Sequential(nn.Linear(cfg.condition_dim, cfg.dim * 4), nn.Mish(), nn.Linear(cfg.dim * 4, cfg.dim))
        channels = self.down.channels
        bottom = channels[-1]
        self.mid = Level(bottom, bottom, cfg.dim, cfg.kernel_size, cfg.blocks_per_level)
        self.levels = nn.ModuleList()
        self.ups = nn.ModuleList()
        # Back up, coarse to fine: a level reads its input joined with the skip of the same resolution,
        # maps 2 * c_big channels to c_small, then doubles the horizon.
        for c_small, c_big in reversed(list(zip(channels[1:-1], channels[2:]))):
            self.levels.append(Level(c_big * 2, c_small, cfg.dim, cfg.kernel_size, cfg.blocks_per_level))
            self.ups.append(nn.ConvTranspose1d(c_small, c_small, 4, stride=2, padding=1))
        self.final = nn.Sequential(ConvBlock(channels[1], channels[1], cfg.kernel_size), nn.Conv1d(channels[1], cfg.transition_dim, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, H, D) trajectories at noise level t: (B,) integers; ``condition`` (B, condition_dim). Returns (B, H, D)."""
        extra = None
        if condition is not None:
            if not self.cfg.condition_dim:
                raise ValueError("This denoiser was trained without a condition; it cannot be given one.")
            extra = self.condition_mlp(condition)
            extra = extra if keep is None else extra * keep[:, None]
        h, temb, skips = self.down(x.transpose(1, 2), t, extra)
        h = self.mid(h, temb)
        # Up level i sees the skip of down level -(i+1); the top level's own skip is not reused (as Diffuser).
        for level, up, skip in zip(self.levels, self.ups, skips[::-1]):
            h = up(level(torch.cat([h, skip], dim=1), temb))
        return self.final(h).transpose(1, 2)


class LevelSplit(nn.Module):
    """Two denoisers of one shape: ``tuned`` at the ``levels`` noise levels from ``first`` up, ``base`` at the others.

    DPPO (Ren et al. 2024) fine-tunes only the last K denoising steps with reinforcement learning and
    keeps the pretrained network for the noisier ones; this module is that pair, a drop-in
    :class:`TemporalUnet` for :class:`~diffusion_rl.diffusion.GaussianDiffusion`.
    """

    def __init__(self, base: TemporalUnet, tuned: TemporalUnet, levels: int, first: int = 0):
        super().__init__()
        if base.cfg != tuned.cfg:
            raise ValueError(f"The two denoisers of a LevelSplit must have one shape, got {base.cfg} and {tuned.cfg}.")
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels must be a positive integer, got {levels!r}.")
        if isinstance(first, bool) or not isinstance(first, int) or first < 0:
            raise ValueError(f"first must be a non-negative integer, got {first!r}.")
        self.cfg, self.base, self.tuned, self.levels, self.first = base.cfg, base, tuned, levels, first

    def forward(self, x: torch.Tensor, t: torch.Tensor, *condition) -> torch.Tensor:
        """The tuned network's output where first <= t < first + levels, the base network's elsewhere."""
        low = (t >= self.first) & (t < self.first + self.levels)
        if bool(low.all()):
            return self.tuned(x, t, *condition)
        if not bool(low.any()):
            return self.base(x, t, *condition)
        return torch.where(low[:, None, None], self.tuned(x, t, *condition), self.base(x, t, *condition))


class ValueNet(nn.Module):
    """Value ``V(tau^t, t)``: the return a (noisy) trajectory window promises, as a scalar per sample."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.down = DownPath(cfg)
        bottom = self.down.channels[-1]
        length = cfg.horizon // 2 ** (len(cfg.dim_mults) - 1)
        self.head = nn.Sequential(nn.Linear(bottom * length + cfg.dim, 256), nn.Mish(), nn.Linear(256, 1))
        # The head predicts a standardized value; these map it back to return units, so that
        # guidance gradients and the reported values are in the units of the reward.
        self.register_buffer("value_shift", torch.zeros(()))
        self.register_buffer("value_scale", torch.ones(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, H, D), t: (B,). Returns (B,)."""
        h, temb, _ = self.down(x.transpose(1, 2), t)
        return self.head(torch.cat([h.flatten(1), temb], dim=1)).squeeze(-1) * self.value_scale + self.value_shift


class InverseDynamics(nn.Module):
    """Inverse dynamics ``a = f(s, s')``: the action that takes state s to state s', all normalized."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, layers: int = 2):
        super().__init__()
        sizes = [2 * obs_dim] + [hidden] * layers
        blocks = [m for a, b in zip(sizes[:-1], sizes[1:]) for m in (nn.Linear(a, b), nn.Mish())]
        self.net = nn.Sequential(*blocks, nn.Linear(sizes[-1], act_dim))
        self.obs_dim, self.act_dim = obs_dim, act_dim

    def forward(self, s: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
        """s, s_next: (..., obs_dim). Returns (..., act_dim)."""
        return self.net(torch.cat([s, s_next], dim=-1))
