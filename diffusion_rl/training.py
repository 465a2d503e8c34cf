"""Training the denoiser (the study's Algorithm 1.1), the value network used for guidance, and the
inverse-dynamics model that can turn a plan's next state into an action.

One loop serves both: draw a batch of windows, a diffusion level and noise per window from one
seeded generator, take an AdamW step with gradient clipping, and keep an exponential moving average
(EMA) of the weights, which is what gets sampled from. Every ``checkpoint_every`` steps (and on
SIGTERM/SIGINT) the whole state is written atomically: weights, EMA, optimizer, generator, step,
loss log. Rerun the same command after a kill and training continues to the same weights as an
uninterrupted run (on the same machine and thread count).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import shlex
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import ClassVar

import torch
from torch.nn import functional as F

from diffusion_rl.checkpoint import CheckpointError, atomic_write_text, load_checkpoint, save_checkpoint
from diffusion_rl.data import DEFAULT_DATASET_ID, Normalizer, TrajectoryWindows, load_episodes
from diffusion_rl.diffusion import GaussianDiffusion, NoiseSchedule, condition
from diffusion_rl.models import InverseDynamics, TemporalUnet, UNetConfig, ValueNet, check_horizon
from diffusion_rl.runtime import StopOnSignal, display_path, pick_device

__all__ = [
    "TrainConfig",
    "DiffuserConfig",
    "ValueConfig",
    "InverseDynamicsConfig",
    "TrainingError",
    "train",
    "build_windows",
    "build_diffusion",
    "build_value",
    "RESUME_MAY_CHANGE",
    "train_command",
    "read_loss_log",
    "CONFIGS",
    "build_network",
    "validation_error",
]

RESUME_MAY_CHANGE = frozenset({"total_steps", "threads", "checkpoint_every", "device"})
"""Options a resumed run may change. (A different thread count or device gives equally good but not
bit-identical weights: float sums are added up in a different order.)"""


class TrainingError(RuntimeError):
    """Training cannot go on (for example the loss became NaN); the last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainConfig:
    """Options shared by the denoiser and the value network."""

    UNUSED: ClassVar[frozenset[str]] = frozenset()
    """Shared options this kind of network has no use for (kept off its command line)."""

    dataset_id: str = DEFAULT_DATASET_ID
    """Minari dataset to train on (build it with `python -m diffusion_rl make-dataset`)."""
    horizon: int = 8
    """Planning horizon H: steps per window (the study: 8; Diffuser: 32)."""
    n_diffusion_steps: int = 20
    """Diffusion levels T."""
    schedule: str = "cosine"
    """Beta schedule: cosine or linear."""
    normalizer: str = "gaussian"
    """Per-dimension normalization of actions and observations: gaussian or minmax."""
    dim: int = 32
    """Channels of the U-Net's first level."""
    dim_mults: str = "1,2,4"
    """Channel multipliers per level, comma-separated; the horizon is halved between levels."""
    blocks_per_level: int = 2
    """Residual blocks per level."""
    kernel_size: int = 5
    """Width of the temporal convolutions."""
    batch_size: int = 64
    """Windows per gradient step."""
    lr: float = 2e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this value."""
    ema_decay: float = 0.995
    """Decay of the exponential moving average of the weights."""
    ema_every: int = 10
    """Update the EMA every this many steps."""
    ema_start: int = 1000
    """Copy the weights into the EMA (instead of averaging) until this step."""
    total_steps: int = 40_000
    """Gradient steps in all; raise it and rerun to train on."""
    checkpoint_every: int = 1000
    """Write an atomic checkpoint every this many steps."""
    log_every: int = 100
    """Average the loss over this many steps per line of loss.csv."""
    seed: int = 0
    """Seed of the initial weights and of every batch, level and noise draw."""
    threads: int = 2
    """torch CPU threads."""
    device: str = "auto"
    """auto (CUDA if present, else CPU), cpu or cuda."""

    def unet(self, transition_dim: int) -> UNetConfig:
        """The network shape these options describe."""
        return UNetConfig(transition_dim, self.horizon, self.dim, _mults(self.dim_mults), self.kernel_size, self.blocks_per_level)


@dataclass(frozen=True)
class DiffuserConfig(TrainConfig):
    """Options of the denoiser."""

    predict_epsilon: bool = False
    """Predict the noise instead of the clean trajectory tau^0 (Diffuser and the study predict tau^0)."""
    action_weight: float = 10.0
    """Loss weight of the first action, the one that gets executed (Diffuser: 10)."""
    clip_denoised: float = 0.0
    """Clip predicted tau^0 to [-c, c] while sampling; 0 turns clipping off (for gaussian normalization)."""
    returns_condition: bool = False
    """Also condition the denoiser on each window's discounted return-to-go, for classifier-free guidance (Decision Diffuser)."""
    condition_dropout: float = 0.25
    """With --returns-condition: the share of windows trained without their return, so one network also learns p(tau)."""
    return_scale: float = 440.0
    """With --returns-condition: returns-to-go (discount 0.99) are divided by this; the expert's, about 4.4 per step
    over 1 / (1 - 0.99) steps, becomes about 1."""

    def __post_init__(self):
        if not 0 <= self.condition_dropout < 1 or not math.isfinite(self.condition_dropout):
            raise ValueError(f"condition_dropout must lie in [0, 1), got {self.condition_dropout!r}.")
        if not math.isfinite(self.return_scale) or self.return_scale <= 0:
            raise ValueError(f"return_scale must be a finite number > 0, got {self.return_scale!r}.")

    def unet(self, transition_dim: int) -> UNetConfig:
        """The network shape these options describe (with a one-number condition if return-conditioned)."""
        return replace(super().unet(transition_dim), condition_dim=1 if self.returns_condition else 0)


@dataclass(frozen=True)
class ValueConfig(TrainConfig):
    """Options of the value network."""

    discount: float = 0.99
    """Discount of the return the network predicts."""
    value_scope: str = "window"
    """window: return inside the H-step window (the study); episode: to the episode's end (Diffuser)."""
    termination_penalty: float = -100.0
    """Added to the reward of a fall, so that guidance steers away from falling."""
    total_steps: int = 20_000
    """Gradient steps in all; raise it and rerun to train on."""


@dataclass(frozen=True)
class InverseDynamicsConfig(TrainConfig):
    """Options of the inverse-dynamics model a = f(s, s'), trained on consecutive states of the same windows."""

    UNUSED: ClassVar[frozenset[str]] = frozenset({"n_diffusion_steps", "schedule", "dim", "dim_mults", "blocks_per_level", "kernel_size"})
    hidden: int = 256
    """Units of each hidden layer of the MLP."""
    layers: int = 2
    """Hidden layers of the MLP."""
    validation_share: float = 0.1
    """Share of the dataset's episodes (its last ones) held out to measure the validation error."""
    batch_size: int = 256
    """Windows per gradient step (each gives H - 1 transitions)."""
    lr: float = 1e-3
    """AdamW learning rate."""
    total_steps: int = 10_000
    """Gradient steps in all; raise it and rerun to train on."""


def _mults(text: str) -> tuple[int, ...]:
    try:
        mults = tuple(int(m) for m in str(text).split(","))
    except ValueError:
        raise ValueError(f"dim_mults must be comma-separated integers such as '1,2,4', got {text!r}.") from None
    if not mults or min(mults) < 1:
        raise ValueError(f"dim_mults must be positive integers, got {text!r}.")
    return mults


CONFIGS: dict[str, type[TrainConfig]] = {"diffuser": DiffuserConfig, "value": ValueConfig, "inverse-dynamics": InverseDynamicsConfig}
"""The config class of each checkpoint kind."""


def config_kind(cfg: TrainConfig) -> str:
    """'diffuser', 'value' or 'inverse-dynamics': the checkpoint kind a config trains."""
    return next(kind for kind, cls in CONFIGS.items() if type(cfg) is cls)


# ----------------------------------------------------------------------------- building blocks


def build_windows(cfg: TrainConfig, normalizer: Normalizer | None = None, held_out: bool = False) -> TrajectoryWindows:
    """The training windows of a config's dataset (values as the value config asks; ``held_out``: the inverse-dynamics validation episodes)."""
    if not isinstance(cfg, InverseDynamicsConfig):
        check_horizon(cfg.horizon, _mults(cfg.dim_mults))  # before loading: a bad shape is named even without the data
    episodes = load_episodes(cfg.dataset_id)
    if isinstance(cfg, InverseDynamicsConfig):
        if not 0 < cfg.validation_share < 1:
            raise ValueError(f"validation_share must lie strictly between 0 and 1, got {cfg.validation_share!r}.")
        n_val = max(1, round(cfg.validation_share * len(episodes)))
        if n_val >= len(episodes):
            raise ValueError(f"The dataset has {len(episodes)} episodes: too few to hold out {n_val} for validation.")
        episodes = episodes[-n_val:] if held_out else episodes[:-n_val]
        # No absorbing padding after a fall: its (s_T, s_T, a = 0) pairs are no transitions of the walker.
        return TrajectoryWindows(episodes, cfg.horizon, normalizer or cfg.normalizer, pad_terminal=False)
    value_opts = {}
    if isinstance(cfg, ValueConfig):
        value_opts = dict(discount=cfg.discount, value_scope=cfg.value_scope, termination_penalty=cfg.termination_penalty)
    return TrajectoryWindows(episodes, cfg.horizon, normalizer or cfg.normalizer, **value_opts)


def build_diffusion(cfg: DiffuserConfig, transition_dim: int, action_dim: int) -> GaussianDiffusion:
    """A fresh denoiser with its schedule."""
    return GaussianDiffusion(
        TemporalUnet(cfg.unet(transition_dim)), action_dim, cfg.n_diffusion_steps, cfg.schedule,
        cfg.predict_epsilon, cfg.action_weight, cfg.clip_denoised or None,
    )


def build_value(cfg: ValueConfig, transition_dim: int) -> ValueNet:
    """A fresh value network."""
    return ValueNet(cfg.unet(transition_dim))


def build_network(kind: str, config: dict, transition_dim: int, action_dim: int) -> tuple[GaussianDiffusion | ValueNet | InverseDynamics, TrainConfig]:
    """A fresh network of checkpoint kind ``kind`` from its saved config dict; returns it and the config."""
    if kind not in CONFIGS:
        raise CheckpointError(f"Unknown network kind {kind!r}; expected one of {', '.join(CONFIGS)}.")
    cfg = CONFIGS[kind](**config)
    if kind == "diffuser":
        return build_diffusion(cfg, transition_dim, action_dim), cfg
    if kind == "value":
        return build_value(cfg, transition_dim), cfg
    return InverseDynamics(transition_dim - action_dim, action_dim, cfg.hidden, cfg.layers), cfg


def diffuser_loss(net: GaussianDiffusion, x0: torch.Tensor, value: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Algorithm 1.1's loss on one batch."""
    return net.loss(x0, t, noise)


def value_loss(net: ValueNet, schedule: NoiseSchedule, action_dim: int, x0: torch.Tensor, value: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """MSE of the value of noised, state-conditioned windows, in standardized units."""
    x_t = condition(schedule.q_sample(x0, t, noise), x0[:, 0, action_dim:], action_dim)
    return F.mse_loss((net(x_t, t) - value) / net.value_scale, torch.zeros_like(value))


def inverse_dynamics_loss(net: InverseDynamics, action_dim: int, x0: torch.Tensor) -> torch.Tensor:
    """MSE of the action predicted from each pair of consecutive states in the windows (normalized units)."""
    actions, states = x0[..., :action_dim], x0[..., action_dim:]
    return F.mse_loss(net(states[:, :-1], states[:, 1:]), actions[:, :-1])


@torch.no_grad()
def validation_error(cfg: InverseDynamicsConfig, net: InverseDynamics, normalizer: Normalizer) -> dict:
    """The inverse-dynamics model's error over every consecutive pair of states in the held-out episodes' windows.

    MSE in normalized units, RMS in action units, and the RMS spread of the true actions for scale.
    """
    windows = build_windows(cfg, normalizer, held_out=True)
    x = windows.batch(torch.arange(len(windows))).trajectory
    A = windows.act_dim
    pred, target = net(x[:, :-1, A:], x[:, 1:, A:]), x[:, :-1, :A]
    scale = torch.as_tensor(normalizer.scale[:A], dtype=torch.float32)
    return {
        "windows": len(windows),
        "mse_normalized": round(float(F.mse_loss(pred, target)), 6),
        "rms_action": round(float(((pred - target) * scale).pow(2).mean().sqrt()), 6),
        "action_std": round(float((target * scale).std()), 6),
    }


# ----------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, run_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Train (or resume) the denoiser or value network ``cfg`` describes; returns the checkpoint path.

    ``run_dir`` holds ``checkpoint.pt`` and ``loss.csv``. A rerun with the same options resumes.
    """
    from tqdm.auto import tqdm

    kind = config_kind(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    device = pick_device(cfg.device)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)

    windows = build_windows(cfg)
    D, A = windows.transition_dim, windows.act_dim
    torch.manual_seed(cfg.seed)
    net, _ = build_network(kind, asdict(cfg), D, A)
    if kind == "diffuser" and cfg.returns_condition:
        def loss_fn(net, x0, value, t, noise):
            # Drawn from `gen` after the batch's own draws: a resumed run drops the windows an uninterrupted one would.
            keep = (torch.rand(len(x0), generator=gen) >= cfg.condition_dropout).to(x0.dtype).to(x0.device)
            return net.loss(x0, t, noise, (value / cfg.return_scale)[:, None], keep)
    elif kind == "diffuser":
        loss_fn = diffuser_loss
    elif kind == "inverse-dynamics":
        def loss_fn(net, x0, value, t, noise):
            return inverse_dynamics_loss(net, A, x0)
    else:
        net.value_shift.fill_(windows.values.mean())
        net.value_scale.fill_(windows.values.std().clamp_min(1e-6))
        schedule = NoiseSchedule(cfg.n_diffusion_steps, cfg.schedule).to(device)

        def loss_fn(net, x0, value, t, noise):
            return value_loss(net, schedule, A, x0, value, t, noise)

    net.to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = make_optimizer(net, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, wall, log = 0, 0.0, []

    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, kind=kind)
        saved = type(cfg)(**state["config"])
        changed = {k for k, v in asdict(cfg).items() if getattr(saved, k) != v} - RESUME_MAY_CHANGE
        if changed:
            raise CheckpointError(
                f"{ckpt_path} was written with different options ({', '.join(sorted(changed))}); use another "
                f"--run-dir or the same options (only {', '.join(sorted(RESUME_MAY_CHANGE))} may change)."
            )
        net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, wall, log = int(state["step"]), float(state["wall_time"]), [list(r) for r in state["log"].tolist()]

    def checkpoint() -> None:
        extra = {}
        if kind == "inverse-dynamics":  # the held-out error of the weights that get exported (the EMA's)
            extra["validation"] = validation_error(cfg, copy.deepcopy(ema).cpu(), windows.normalizer)
            atomic_write_text(run_dir / "validation.json", json.dumps({"step": step, **extra["validation"]}, indent=2) + "\n")
        save_checkpoint(
            ckpt_path,
            {
                "kind": kind,
                "config": asdict(cfg),
                "model": net.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
                "normalizer": windows.normalizer.state_dict(),
                "action_dim": A,
                "transition_dim": D,
                "step": step,
                "wall_time": wall,
                "log": torch.tensor(log, dtype=torch.float64).reshape(-1, 3),
                **extra,
            },
        )
        _write_log(run_dir / "loss.csv", log)

    stop = StopOnSignal()
    print(f"train {kind}: step {step} of {cfg.total_steps}, run folder {display_path(run_dir)}", flush=True)
    bar = tqdm(total=cfg.total_steps, initial=step, disable=not progress, desc=f"train {kind}", unit="step", smoothing=0.05, mininterval=1.0)
    t0 = time.perf_counter() - wall
    running, n_running = 0.0, 0
    B, H, T = cfg.batch_size, cfg.horizon, cfg.n_diffusion_steps
    try:
        net.train()
        while step < cfg.total_steps and not stop.requested:
            # Every random draw comes from `gen`, in this order, so a resumed run draws what an uninterrupted one would.
            idx = torch.randint(len(windows), (B,), generator=gen)
            t = torch.randint(T, (B,), generator=gen)
            noise = torch.randn(B, H, D, generator=gen)
            batch = windows.batch(idx)
            loss = loss_fn(net, batch.trajectory.to(device), batch.value.to(device), t.to(device), noise.to(device))
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"The {kind} loss became {loss_value} at step {step + 1}; nothing after the last checkpoint "
                    f"(step {step - step % cfg.checkpoint_every}) was saved. Lower --lr or --grad-clip and rerun."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            _update_ema(ema, net, step, cfg)

            running, n_running = running + loss_value, n_running + 1
            if step % cfg.log_every == 0:
                wall = time.perf_counter() - t0
                log.append([step, running / n_running, wall])
                bar.set_postfix(loss=f"{running / n_running:.4f}")
                running, n_running = 0.0, 0
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == cfg.total_steps:
                wall = time.perf_counter() - t0
                checkpoint()
        if stop.requested:
            wall = time.perf_counter() - t0
            checkpoint()
    finally:
        bar.close()
        stop.restore()
        torch.set_num_threads(old_threads)
    return ckpt_path


def make_optimizer(net: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where torch supports it (15% faster training on this CPU)."""
    try:
        return torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # torch < 2.4 has no fused AdamW on the CPU
        return torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, net: torch.nn.Module, step: int, cfg: TrainConfig) -> None:
    """Copy the weights before ``ema_start``, then average them every ``ema_every`` steps."""
    if step % cfg.ema_every:
        return
    ema_p, net_p = list(ema.parameters()), list(net.parameters())
    if step < cfg.ema_start:
        torch._foreach_copy_(ema_p, net_p)
    else:
        torch._foreach_lerp_(ema_p, net_p, 1 - cfg.ema_decay)


def _write_log(path: Path, log: list) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", "loss", "wall_time_s"])
    writer.writerows([int(s), f"{loss:.6g}", f"{w:.1f}"] for s, loss, w in log)
    atomic_write_text(path, buf.getvalue())


def read_loss_log(run_dir: str | os.PathLike) -> list[dict]:
    """The loss curve of a run as rows {step, loss, wall_time_s}."""
    with open(Path(run_dir) / "loss.csv") as f:
        return [{"step": int(r["step"]), "loss": float(r["loss"]), "wall_time_s": float(r["wall_time_s"])} for r in csv.DictReader(f)]


def train_command(cfg: TrainConfig, run_dir: str | os.PathLike = "RUN") -> str:
    """The command line that trains ``cfg`` (options that differ from the defaults), however it was launched."""
    default = type(cfg)()
    opts = [f"--{f.name.replace('_', '-')} {shlex.quote(str(getattr(cfg, f.name)))}" for f in fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)]
    return " ".join([f"python -m diffusion_rl train-{config_kind(cfg)} --run-dir {shlex.quote(str(run_dir))}", *opts])


