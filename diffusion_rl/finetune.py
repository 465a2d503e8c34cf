"""Fine-tune the denoising chain as an MDP: PPO over the last K denoising steps (DPPO, Ren et al. 2024).

The study's Section 5 proposes to treat the generator as a policy and improve it with the
environment's reward. Each reverse step of the sampler is a Gaussian,
``p(tau^{t-1} | tau^t, s) = N(mu_theta(tau^t, t, s), sigma_t^2 I)``, so sampling a plan is an inner
MDP of N steps inside the environment's MDP: its "actions" are the denoised trajectories, and only
its last step, the clean plan, touches the world, whose first k actions run open loop (an action chunk).

The log-probability of a whole chain is the sum of its steps' Gaussian log-densities, so a policy
gradient on the environment's return reaches the denoiser through every step. As DPPO:

* only the last K steps (levels K-1 .. 0) are trained, in a copy of the denoiser; the noisier
  steps keep the pretrained network (:class:`~diffusion_rl.models.LevelSplit`);
* those steps sample with a standard deviation of at least ``std_floor`` (on normalized units), so
  the policy keeps exploring and its log-probabilities stay finite (the DDPM posterior variance of
  the last step is 0); with ``pretrained_last_step`` the trained steps sit one level higher and the
  last step returns the pretrained network's mean, so that noise is denoised before it is executed;
* a critic V(s) on the environment state, generalized advantage estimation over executed chunks,
  and PPO's clipped ratio per denoising step, with the advantage discounted along the chain.

Optionally an anchor term, the KL divergence between each fine-tuned step and the pretrained
chain's step from the same input, keeps plans near the data. The run reads top to bottom like a
CleanRL script: :func:`finetune` collects whole episodes from a batch of environments, computes
advantages, updates, checkpoints atomically and appends to ``curve.csv``; rerun it to resume.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from diffusion_rl.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
)
from diffusion_rl.diffusion import GaussianDiffusion, condition
from diffusion_rl.disturbances import Disturbance
from diffusion_rl.envs import ENV_ID, make_env
from diffusion_rl.evaluation import score_reference
from diffusion_rl.models import LevelSplit
from diffusion_rl.runtime import StopOnSignal, torch_threads

__all__ = ["ANCHOR_ON", "LOG_PROBS", "RESUME_MAY_CHANGE", "FinetuneConfig", "anchor_weights", "first_level", "chain_kl", "check_config", "export_finetuned", "finetune", "plan_distance_to_data", "planner_from_run", "ratio_weights", "read_curve", "sample_chain", "training_disturbance"]


@dataclass
class FinetuneConfig:
    """Every option of a fine-tuning run; each has a default and the reason for it."""

    planner: str = "walker2d-h8"
    """Shipped planner to start from; its SHA-256 is checked before and on every resume."""
    window: int = 8
    """Executed window k: actions of each plan run open loop (8 = the whole plan, the study's worst case)."""
    finetune_steps: int = 10
    """K: the last K denoising steps are trained (DPPO trains 10 of 20); the noisier ones stay pretrained."""
    std_floor: float = 0.1
    """Smallest standard deviation of a trained step, in normalized units (DPPO: 0.1), so exploration never dies."""
    pretrained_last_step: bool = False
    """Keep the last denoising step (level 0) pretrained, returning its mean, and train levels K..1 instead of K-1..0. The
    floor then adds its noise one step before the clean plan, where a denoising step still acts on it, not to the executed
    actions themselves (with DPPO's placement the exploring policy is the evaluated one plus 0.1 of noise on every action)."""
    n_envs: int = 16
    """Episodes collected per iteration, stepped together so they share each denoiser call."""
    iterations: int = 80
    """PPO iterations (each: n_envs whole episodes, then the update); raise it and rerun to continue a run."""
    max_episode_steps: int = 1000
    """Episode length limit, as in every evaluation."""
    gamma: float = 0.99
    """Discount per executed chunk (DPPO's Gym setting)."""
    gae_lambda: float = 0.95
    """GAE's lambda (DPPO's Gym setting)."""
    denoising_discount: float = 0.99
    """The advantage of the step at level t is scaled by this ** t: noisier steps matter less (DPPO)."""
    log_prob: str = "plan-sum"
    """A step's log-density in PPO's ratio: "plan-sum", the exact density of the whole sampled plan; "action-mean", DPPO's, the mean per-dimension log-density of the executed actions (a ratio about 100x gentler, for DPPO's learning rate 1e-4); "action-sum", the exact density of the executed actions alone (the plan's states and unexecuted actions never reach the world, so their noise stays out of the ratio)."""
    clip: float = 0.01
    """PPO's clipped ratio range per denoising step (DPPO's Gym setting: many small steps, each clipped tightly; the shipped walker2d-h8-dppo used 0.03)."""
    actor_lr: float = 3e-6
    """Adam learning rate of the fine-tuned denoiser: small, since a clip of 0.01 on a 167-dimensional step leaves little room (1e-5 clipped 83 in 100 pairs in one update; the shipped run used 1e-5 with a clip of 0.03)."""
    critic_lr: float = 1e-3
    """Adam learning rate of the critic."""
    anneal_lr: bool = False
    """Decay the actor's learning rate linearly to 0 at the last iteration (CleanRL's PPO default), so the weights settle
    instead of moving as much in the last update as in the first; with it, a resumed run may not change --iterations."""
    update_epochs: int = 4
    """Passes over each iteration's samples."""
    minibatch_size: int = 2048
    """(chunk, denoising step) pairs per actor gradient step."""
    critic_warmup: int = 2
    """First iterations that train only the critic, so the first advantages are not noise (DPPO)."""
    anchor_coef: float = 0.0
    """Weight of the KL divergence to the pretrained chain's steps (0: none); keeps plans near the data."""
    anchor_on: str = "plan"
    """Which part of each step the anchor's KL covers: "plan", all it samples; "states", only the plan's states (with
    --log-prob action-sum, the part the ratio leaves free, which still feeds the next denoising step)."""
    max_push: float = 0.0
    """Train under pushes: each episode draws a torso push of [0, max_push] N, 5 steps every 100 as in the push study (0: undisturbed)."""
    reward_scale: float = 0.01
    """Rewards are multiplied by this for the critic (a chunk of 8 steps earns about 35)."""
    fall_penalty: float = 0.0
    """Subtracted from the reward of the chunk that ends in a fall (0: the environment's reward alone, DPPO's). A fall
    otherwise costs only the reward it forgoes, discounted by gamma per chunk; this makes it cost that much more at once."""
    max_grad_norm: float = 1.0
    """Gradient norm clip of both networks."""
    critic_hidden: int = 256
    """Width of the critic's two hidden layers."""
    seed: int = 0
    """Seeds the networks' initialization, the sampler noise and the minibatch order."""
    first_seed: int = 30_000
    """Reset seed of the first training episode; episode i of iteration j uses first_seed + j * n_envs + i (far from the evaluation seeds 10000-10029 and the tuning seeds 20000-20029)."""
    snapshot_every: int = 10
    """Keep the fine-tuned weights of every this many iterations (for the book's slider)."""
    threads: int = 1
    """torch threads."""
    env_id: str = ENV_ID
    """Gymnasium environment id."""


LOG_PROBS = ("plan-sum", "action-mean", "action-sum")
"""The choices of ``FinetuneConfig.log_prob``."""

ANCHOR_ON = ("plan", "states")
"""The choices of ``FinetuneConfig.anchor_on``."""

RESUME_MAY_CHANGE = frozenset({"iterations", "threads", "snapshot_every"})
"""Options that a resumed run may change: they do not alter the iterations already done (``iterations`` only without ``anneal_lr``).
Another ``threads`` continues bit for bit where MKL runs its AVX-512 kernels, not where it runs its AVX2 ones (they add up by thread)."""


def _positive_finite(name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}.")


def _int_in(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer in {low}..{high if high is not None else ''}, got {value!r}.")


def check_config(cfg: FinetuneConfig, horizon: int | None = None, n_timesteps: int | None = None) -> FinetuneConfig:
    """Refuse options out of range (NaN included) before anything is loaded or written."""
    _int_in("--window", cfg.window, 1, horizon)
    if not isinstance(cfg.pretrained_last_step, bool):
        raise ValueError(f"--pretrained-last-step must be True or False, got {cfg.pretrained_last_step!r}.")
    _int_in("--finetune-steps (K)", cfg.finetune_steps, 1, None if n_timesteps is None else n_timesteps - first_level(cfg))
    for name in ("std_floor", "clip", "actor_lr", "critic_lr", "reward_scale", "max_grad_norm"):
        _positive_finite("--" + name.replace("_", "-"), getattr(cfg, name))
    _positive_finite("--anchor-coef", cfg.anchor_coef, allow_zero=True)
    _positive_finite("--max-push", cfg.max_push, allow_zero=True)
    _positive_finite("--fall-penalty", cfg.fall_penalty, allow_zero=True)
    if cfg.log_prob not in LOG_PROBS:
        raise ValueError(f"--log-prob must be one of {', '.join(LOG_PROBS)}, got {cfg.log_prob!r}.")
    if cfg.anchor_on not in ANCHOR_ON:
        raise ValueError(f"--anchor-on must be one of {', '.join(ANCHOR_ON)}, got {cfg.anchor_on!r}.")
    if cfg.anchor_on != "plan" and cfg.anchor_coef == 0:
        # Otherwise the option would be recorded in the run yet change nothing.
        raise ValueError(f"--anchor-on {cfg.anchor_on} needs --anchor-coef > 0 (with 0 there is no anchor to place).")
    for name in ("gamma", "gae_lambda", "denoising_discount"):
        value = getattr(cfg, name)
        _positive_finite("--" + name.replace("_", "-"), value, allow_zero=True)
        if value > 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {value!r}.")
    for name, low in (("n_envs", 1), ("iterations", 0), ("max_episode_steps", 1), ("update_epochs", 1), ("minibatch_size", 1),
                      ("critic_warmup", 0), ("critic_hidden", 1), ("snapshot_every", 1), ("threads", 1), ("seed", 0), ("first_seed", 0)):
        _int_in("--" + name.replace("_", "-"), getattr(cfg, name), low)
    return cfg


# ----------------------------------------------------------------------------- the policy: a chain of Gaussians


class _Base(NamedTuple):
    diffusion: GaussianDiffusion
    normalizer: object
    meta: dict
    path: Path
    sha256: str


def _load_base(name: str) -> _Base:
    """The pretrained denoiser, SHA-256 checked, frozen."""
    from diffusion_rl.pretrained import asset_path, load_network

    path = asset_path(name, "diffuser")
    diffusion, normalizer, meta = load_network(path)
    if meta.get("finetune"):
        raise ValueError(f"{name} is itself a fine-tuned planner; start from the planner it was tuned from ({meta['finetuned_from']['name']}).")
    return _Base(diffusion.eval().requires_grad_(False), normalizer, meta, path, meta["sha256"])


def first_level(cfg: FinetuneConfig) -> int:
    """The lowest trained noise level: 0, or 1 where the last step stays pretrained."""
    return int(cfg.pretrained_last_step)


def _policy(base: _Base, levels: int, first: int = 0) -> GaussianDiffusion:
    """A copy of the base denoiser whose ``levels`` steps from level ``first`` up use a trainable copy of its network."""
    from diffusion_rl.training import build_network

    policy, _ = build_network("diffuser", base.meta["config"], base.meta["transition_dim"], base.meta["action_dim"])
    tuned = copy.deepcopy(base.diffusion.model).requires_grad_(True).train()
    policy.model = LevelSplit(base.diffusion.model, tuned, levels, first)
    return policy


def step_std(diffusion: GaussianDiffusion, level: int, std_floor: float) -> float:
    """Standard deviation of the trained reverse step from ``level``: the DDPM posterior's, at least ``std_floor``."""
    return max(math.sqrt(float(diffusion.schedule.posterior_variance[level])), std_floor)


@torch.no_grad()
def sample_chain(policy: GaussianDiffusion, cond: torch.Tensor, levels: int, std_floor: float,
                 generator: torch.Generator, first: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample plans from states ``cond`` (B, obs_dim, normalized) and keep the trained steps.

    Returns the clean plans (B, H, D) and, for the ``levels`` trained steps (first + levels - 1 down to
    first), each step's input and output, both (B, levels, H, D). The other steps sample as the DDPM.
    """
    B, H, D = len(cond), policy.horizon, policy.transition_dim
    x = condition(torch.randn(B, H, D, generator=generator), cond, policy.action_dim)
    inputs, outputs = [], []
    for level in range(policy.n_timesteps - 1, -1, -1):
        t = torch.full((B,), level, dtype=torch.long)
        mean, log_var = policy.p_mean_log_variance(x, t)
        z = torch.randn(B, H, D, generator=generator)
        if first <= level < first + levels:
            x_next = condition(mean + step_std(policy, level, std_floor) * z, cond, policy.action_dim)
            inputs.append(x)
            outputs.append(x_next)
        else:
            x_next = condition(mean + (level > 0) * torch.exp(0.5 * log_var) * z, cond, policy.action_dim)
        x = x_next
    return x, torch.stack(inputs, 1), torch.stack(outputs, 1)


def _free_mask(policy: GaussianDiffusion) -> torch.Tensor:
    """1 where the plan is sampled, 0 on the conditioned first state (written, never drawn)."""
    mask = torch.ones(policy.horizon, policy.transition_dim)
    mask[0, policy.action_dim:] = 0
    return mask


def ratio_weights(policy: GaussianDiffusion, log_prob: str, window: int) -> torch.Tensor:
    """Weights over (H, D) that turn per-dimension log-densities into the one PPO's ratio uses (see ``FinetuneConfig.log_prob``)."""
    if log_prob == "plan-sum":
        return _free_mask(policy)
    weights = torch.zeros(policy.horizon, policy.transition_dim)
    weights[:window, : policy.action_dim] = 1.0 if log_prob == "action-sum" else 1.0 / (window * policy.action_dim)
    return weights


def anchor_weights(policy: GaussianDiffusion, anchor_on: str) -> torch.Tensor:
    """Weights over (H, D) of the anchor's KL (see ``FinetuneConfig.anchor_on``): the sampled dimensions it covers."""
    mask = _free_mask(policy)
    if anchor_on == "states":
        mask[:, : policy.action_dim] = 0
    return mask


def step_log_prob(policy: GaussianDiffusion, x_in: torch.Tensor, x_out: torch.Tensor, level: torch.Tensor, std: torch.Tensor,
                  mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x_out | x_in) of one reverse step per row, weighted over dimensions by ``mask``, up to a constant that cancels in
    ratios; and the step's mean."""
    mean, _ = policy.p_mean_log_variance(x_in, level)
    return (-(x_out - mean).pow(2) / (2 * std[:, None, None] ** 2) * mask).sum((1, 2)), mean


# ----------------------------------------------------------------------------- rollouts


class Batch(NamedTuple):
    """One iteration's chunks: a row per executed plan."""

    obs: torch.Tensor  # (N, obs_dim) normalized state the plan started from
    x_in: torch.Tensor  # (N, K, H, D) input of each trained step
    x_out: torch.Tensor  # (N, K, H, D) its sampled output
    rewards: np.ndarray  # (N,) reward of the chunk, summed over its executed steps
    episode: np.ndarray  # (N,) which episode the chunk belongs to
    last_obs: torch.Tensor  # (E, obs_dim) normalized state after each episode's last chunk
    fell: np.ndarray  # (E,) the episode ended by a fall (terminal: nothing to bootstrap)
    returns: np.ndarray  # (E,) each episode's undiscounted return
    lengths: np.ndarray  # (E,)


_PUSH_STREAM = 0xF17E
"""Tags the generator of the training pushes, so that it shares no draws with anything else seeded by the episode."""


def training_disturbance(cfg: FinetuneConfig, seed: int) -> Disturbance | None:
    """The push an episode of the run meets: a force drawn from [0, max_push] N by its reset seed (None: undisturbed)."""
    if cfg.max_push <= 0:
        return None
    force = float(np.random.default_rng([int(seed), _PUSH_STREAM]).uniform(0.0, cfg.max_push))
    return Disturbance(push_force=force)


def collect(policy: GaussianDiffusion, obs_normalizer, action_unnormalize, seeds: list[int], cfg: FinetuneConfig,
            generator: torch.Generator) -> Batch:
    """Run one whole episode per seed, all at once, executing k planned actions per plan."""
    envs = [make_env(cfg.env_id, max_episode_steps=cfg.max_episode_steps, disturbance=training_disturbance(cfg, s)) for s in seeds]
    obs = np.stack([env.reset(seed=s)[0] for env, s in zip(envs, seeds)]).astype(np.float32)
    rows: list[tuple] = []
    E = len(seeds)
    fell, returns, lengths = np.zeros(E, bool), np.zeros(E), np.zeros(E, int)
    last_obs = np.zeros_like(obs)
    live = list(range(E))
    try:
        while live:
            cond = obs_normalizer.normalize(torch.from_numpy(obs[live]))
            plans, x_in, x_out = sample_chain(policy, cond, cfg.finetune_steps, cfg.std_floor, generator, first_level(cfg))
            actions = action_unnormalize(plans[:, : cfg.window])
            still = []
            for j, i in enumerate(live):
                reward, done = 0.0, False
                for a in actions[j]:
                    o, r, terminated, truncated, _ = envs[i].step(np.clip(a, -1.0, 1.0))
                    finite = bool(np.all(np.isfinite(o))) and math.isfinite(r)
                    reward += float(r) if finite else 0.0
                    lengths[i] += 1
                    if not finite or terminated:
                        fell[i], done = True, True
                        break
                    obs[i] = o
                    if truncated:
                        done = True
                        break
                rows.append((cond[j], x_in[j], x_out[j], reward, i))
                returns[i] += reward
                if done:
                    last_obs[i] = obs[i]
                else:
                    still.append(i)
            live = still
    finally:
        for env in envs:
            env.close()
    return Batch(
        torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows]),
        np.array([r[3] for r in rows]), np.array([r[4] for r in rows]),
        obs_normalizer.normalize(torch.from_numpy(last_obs)), fell, returns, lengths,
    )


def gae(values: np.ndarray, last_values: np.ndarray, batch: Batch, cfg: FinetuneConfig) -> tuple[np.ndarray, np.ndarray]:
    """Advantages and value targets per chunk: GAE over each episode's chunks (a fall ends it, a time limit bootstraps)."""
    rewards = batch.rewards * cfg.reward_scale
    adv = np.zeros(len(rewards))
    for e in range(len(batch.fell)):
        idx = np.flatnonzero(batch.episode == e)
        running = 0.0
        for n, j in enumerate(idx[::-1]):
            reward = rewards[j]
            if n == 0:
                next_value = 0.0 if batch.fell[e] else float(last_values[e])
                reward -= cfg.fall_penalty * cfg.reward_scale * batch.fell[e]
            else:
                next_value = float(values[idx[len(idx) - n]])
            delta = reward + cfg.gamma * next_value - values[j]
            running = delta + cfg.gamma * cfg.gae_lambda * running
            adv[j] = running
    return adv, adv + values


def make_critic(obs_dim: int, hidden: int) -> nn.Sequential:
    """V(s): an MLP on the normalized environment state."""
    return nn.Sequential(nn.Linear(obs_dim, hidden), nn.Mish(), nn.Linear(hidden, hidden), nn.Mish(), nn.Linear(hidden, 1))


# ----------------------------------------------------------------------------- the run


CURVE_COLUMNS = ("iteration", "env_steps", "wall_time_s", "episodes", "mean_return", "mean_normalized", "fall_rate",
                 "mean_length", "approx_kl", "clip_fraction", "value_loss", "anchor_kl")


def finetune(cfg: FinetuneConfig, run_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Fine-tune (or resume) in ``run_dir``; returns the checkpoint path.

    ``checkpoint.pt`` is written atomically after every iteration, ``curve.csv`` with it; a run
    killed at any moment and rerun with the same options ends bit-identical to an uninterrupted one.
    """
    from tqdm.auto import tqdm

    base = _load_base(cfg.planner)
    check_config(cfg, base.diffusion.horizon, base.diffusion.n_timesteps)
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    saved = load_checkpoint(ckpt_path, kind="finetune") if ckpt_path.exists() else None
    if saved is not None:
        _check_resume(saved, cfg, base, ckpt_path)
    run_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    K, first = cfg.finetune_steps, first_level(cfg)
    policy = _policy(base, K, first)
    tuned = policy.model.tuned
    obs_dim = base.diffusion.transition_dim - base.diffusion.action_dim
    critic = make_critic(obs_dim, cfg.critic_hidden)
    actor_opt = torch.optim.Adam(tuned.parameters(), lr=cfg.actor_lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr)
    sampler_gen = torch.Generator().manual_seed(cfg.seed + 1)
    order_gen = torch.Generator().manual_seed(cfg.seed + 2)
    iteration, env_steps, wall, curve = 0, 0, 0.0, []
    if saved is not None:
        tuned.load_state_dict(saved["tuned"])
        critic.load_state_dict(saved["critic"])
        actor_opt.load_state_dict(saved["actor_opt"])
        critic_opt.load_state_dict(saved["critic_opt"])
        sampler_gen.set_state(saved["sampler_rng"])
        order_gen.set_state(saved["order_rng"])
        iteration, env_steps, wall = int(saved["iteration"]), int(saved["env_steps"]), float(saved["wall_time"])
        curve = json.loads(saved["curve"])

    from diffusion_rl.planner import Planner

    helper = Planner(base.diffusion, base.normalizer)  # its normalizers, for states in and actions out
    mask = ratio_weights(policy, cfg.log_prob, cfg.window)
    data_return = score_reference(base.meta)["mean_return"]
    std = torch.tensor([step_std(policy, level, cfg.std_floor) for level in range(first + K)])  # by level

    def unnormalize_actions(plans: torch.Tensor) -> np.ndarray:
        return helper.normalizer.unnormalize(plans.double()).float().numpy()[..., : helper.action_dim]

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, {
            "kind": "finetune", "config": asdict(cfg), "base_sha256": base.sha256, "levels": K, "first_level": first,
            "tuned": tuned.state_dict(), "critic": critic.state_dict(),
            "actor_opt": actor_opt.state_dict(), "critic_opt": critic_opt.state_dict(),
            "sampler_rng": sampler_gen.get_state(), "order_rng": order_gen.get_state(),
            "iteration": iteration, "env_steps": env_steps, "wall_time": wall, "curve": json.dumps(curve),
        })
        write_curve(run_dir / "curve.csv", curve)

    stop = StopOnSignal()
    bar = tqdm(total=cfg.iterations, initial=min(iteration, cfg.iterations), disable=not progress, desc="DPPO", unit="it", mininterval=1.0)
    t0 = time.perf_counter() - wall
    try:
        with torch_threads(cfg.threads):
            while iteration < cfg.iterations and not stop.requested:
                if cfg.anneal_lr:
                    for group in actor_opt.param_groups:
                        group["lr"] = cfg.actor_lr * (1 - iteration / cfg.iterations)
                seeds = [cfg.first_seed + iteration * cfg.n_envs + i for i in range(cfg.n_envs)]
                tuned.eval()
                batch = collect(policy, helper.obs_normalizer, unnormalize_actions, seeds, cfg, sampler_gen)
                stats = _update(policy, base.diffusion, critic, actor_opt, critic_opt, batch, std, mask, cfg, order_gen,
                                train_actor=iteration >= cfg.critic_warmup, iteration=iteration)
                iteration += 1
                env_steps += int(batch.lengths.sum())
                wall = time.perf_counter() - t0
                curve.append({
                    "iteration": iteration, "env_steps": env_steps, "wall_time_s": round(wall, 1), "episodes": len(seeds),
                    "mean_return": round(float(batch.returns.mean()), 2), "mean_normalized": round(100 * float(batch.returns.mean()) / data_return, 2),
                    "fall_rate": round(float(batch.fell.mean()), 4), "mean_length": round(float(batch.lengths.mean()), 1), **stats,
                })
                checkpoint()
                if iteration % cfg.snapshot_every == 0:
                    _write_snapshot(run_dir / "snapshots" / f"iter-{iteration:04d}.safetensors", tuned)
                bar.update(1)
                bar.set_postfix(ret=f"{curve[-1]['mean_normalized']:.0f}%", falls=f"{curve[-1]['fall_rate']:.2f}")
            if stop.requested:
                bar.write(f"stopped by signal after iteration {iteration}; checkpoint written, rerun to resume")
    finally:
        stop.restore()
        bar.close()
    if saved is None and iteration == 0:
        checkpoint()
    return ckpt_path


def _update(policy: GaussianDiffusion, reference: GaussianDiffusion, critic: nn.Module, actor_opt, critic_opt, batch: Batch,
            std: torch.Tensor, mask: torch.Tensor, cfg: FinetuneConfig, order_gen: torch.Generator, train_actor: bool,
            iteration: int) -> dict:
    """PPO on one iteration's chunks: the clipped objective per (chunk, trained denoising step), then the critic."""

    K = cfg.finetune_steps
    N = len(batch.rewards)
    with torch.no_grad():
        values = critic(batch.obs).squeeze(-1).numpy()
        last_values = critic(batch.last_obs).squeeze(-1).numpy()
    adv, targets = gae(values, last_values, batch, cfg)
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    adv_t, targets_t = torch.as_tensor(adv, dtype=torch.float32), torch.as_tensor(targets, dtype=torch.float32)

    # Pairs (chunk n, trained step s); step s runs from level first + K-1-s.
    x_in, x_out = batch.x_in.flatten(0, 1), batch.x_out.flatten(0, 1)
    levels = (first_level(cfg) + K - 1 - torch.arange(K)).repeat(N)
    pair_adv = adv_t.repeat_interleave(K) * cfg.denoising_discount ** levels.float()
    pair_std = std[levels]
    tuned = policy.model.tuned
    stats = {"approx_kl": 0.0, "clip_fraction": 0.0, "value_loss": 0.0, "anchor_kl": 0.0}
    if train_actor:
        with torch.no_grad():
            old = torch.cat([step_log_prob(policy, x_in[i], x_out[i], levels[i], pair_std[i], mask)[0]
                             for i in torch.arange(len(levels)).split(cfg.minibatch_size)])
        anchor_mask = anchor_weights(policy, cfg.anchor_on)  # its own dimensions, whatever the ratio weighs
        tuned.train()
        kls, clips, anchors = [], [], []
        for _ in range(cfg.update_epochs):
            for idx in torch.randperm(len(levels), generator=order_gen).split(cfg.minibatch_size):
                logp, mean = step_log_prob(policy, x_in[idx], x_out[idx], levels[idx], pair_std[idx], mask)
                log_ratio = logp - old[idx]
                ratio = log_ratio.exp()
                a = pair_adv[idx]
                loss = torch.max(-a * ratio, -a * ratio.clamp(1 - cfg.clip, 1 + cfg.clip)).mean()
                if cfg.anchor_coef > 0:
                    with torch.no_grad():
                        ref_mean, _ = reference.p_mean_log_variance(x_in[idx], levels[idx])
                    anchor = ((mean - ref_mean).pow(2) / (2 * pair_std[idx, None, None] ** 2) * anchor_mask).sum((1, 2)).mean()
                    loss = loss + cfg.anchor_coef * anchor
                    anchors.append(float(anchor.detach()))
                _gradient_step(loss, actor_opt, cfg.max_grad_norm, "actor", "Lower --actor-lr or raise --std-floor", iteration)
                with torch.no_grad():
                    kls.append(float(((ratio - 1) - log_ratio).mean()))
                    clips.append(float(((ratio - 1).abs() > cfg.clip).float().mean()))
        tuned.eval()
        stats.update(approx_kl=round(float(np.mean(kls)), 6), clip_fraction=round(float(np.mean(clips)), 4),
                     anchor_kl=round(float(np.mean(anchors)), 4) if anchors else 0.0)
    value_losses = []
    for _ in range(cfg.update_epochs):
        for idx in torch.randperm(N, generator=order_gen).split(max(1, cfg.minibatch_size // K)):
            loss = 0.5 * (critic(batch.obs[idx]).squeeze(-1) - targets_t[idx]).pow(2).mean()
            _gradient_step(loss, critic_opt, cfg.max_grad_norm, "critic", "Lower --critic-lr or --reward-scale", iteration)
            value_losses.append(float(loss.detach()))
    stats["value_loss"] = round(float(np.mean(value_losses)), 5)
    return stats


def _gradient_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, max_norm: float, what: str, hint: str, iteration: int) -> None:
    """One clipped optimizer step on ``loss``; a non-finite loss stops the run before anything is checkpointed."""
    from diffusion_rl.training import TrainingError

    if not torch.isfinite(loss):
        raise TrainingError(f"The {what} loss became {float(loss.detach())} in iteration {iteration + 1}; the checkpoint keeps "
                            f"iteration {iteration}. {hint}, then rerun.")
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_([q for group in optimizer.param_groups for q in group["params"]], max_norm)
    optimizer.step()


def _check_resume(saved: dict, cfg: FinetuneConfig, base: _Base, path: Path) -> None:
    """Refuse to resume with options or a base planner that would break exact resume."""
    old = saved["config"]
    # An option added after the run was written has its default there.
    was = {f.name: old.get(f.name, f.default) for f in fields(cfg)}
    may_change = RESUME_MAY_CHANGE - ({"iterations"} if cfg.anneal_lr else set())  # the schedule spans the whole run
    changed = [n for n in was if n not in may_change and was[n] != getattr(cfg, n)]
    if changed:
        what = "; ".join(f"--{n.replace('_', '-')} was {was[n]!r}, now {getattr(cfg, n)!r}" for n in changed)
        raise CheckpointError(f"{path} was written with other options ({what}): rerun with the same options, or use another --run-dir.")
    if saved["base_sha256"] != base.sha256:
        raise CheckpointError(f"{path} was fine-tuned from a base planner with SHA-256 {saved['base_sha256'][:12]}..., but {base.path.name} "
                              f"is now {base.sha256[:12]}...: use the same base, or another --run-dir.")


def _write_snapshot(path: Path, tuned: nn.Module) -> None:
    from safetensors.torch import save as st_save

    atomic_write_bytes(path, st_save({k: v.contiguous() for k, v in tuned.state_dict().items()}))


def write_curve(path: Path, curve: list[dict]) -> None:
    """The learning curve as CSV, written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(curve)
    atomic_write_text(path, buf.getvalue())


def read_curve(run_dir: str | os.PathLike) -> list[dict]:
    """A run's ``curve.csv`` as a list of dicts of numbers."""
    with open(Path(run_dir) / "curve.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------- using a run


def _tuned_policy(state: dict, where: Path) -> tuple[FinetuneConfig, _Base, GaussianDiffusion]:
    """A checkpoint's options, its base planner (still the one it was tuned from) and its fine-tuned chain."""
    cfg = FinetuneConfig(**state["config"])
    base = _load_base(cfg.planner)
    if state["base_sha256"] != base.sha256:
        raise CheckpointError(f"{where} was tuned from a base planner that is no longer the shipped {cfg.planner}.")
    policy = _policy(base, int(state["levels"]), int(state.get("first_level", 0)))
    policy.model.tuned.load_state_dict(state["tuned"])
    return cfg, base, policy


def planner_from_run(run_dir: str | os.PathLike, snapshot: int | None = None, with_value: bool = True):
    """A :class:`~diffusion_rl.planner.Planner` from a run's checkpoint, or from its snapshot after iteration ``snapshot``."""
    from safetensors.torch import load_file

    from diffusion_rl.planner import Planner
    from diffusion_rl.pretrained import PRETRAINED, asset_path, load_network

    run_dir = Path(run_dir)
    state = load_checkpoint(run_dir / "checkpoint.pt", kind="finetune")
    cfg, base, policy = _tuned_policy(state, run_dir)
    if snapshot is not None:
        path = run_dir / "snapshots" / f"iter-{snapshot:04d}.safetensors"
        if not path.exists():
            kept = sorted(int(p.stem[5:]) for p in (run_dir / "snapshots").glob("iter-*.safetensors"))
            raise CheckpointError(f"{run_dir} has no snapshot after iteration {snapshot}; it keeps {kept}.")
        policy.model.tuned.load_state_dict(load_file(str(path)))
    value = load_network(asset_path(cfg.planner, "value"))[0] if with_value and "value" in PRETRAINED[cfg.planner] else None
    meta = {**base.meta, "finetune": {"run": run_dir.name, "iteration": snapshot or int(state["iteration"])}}
    return Planner(policy, base.normalizer, value, meta)


TUNING_SEEDS = tuple(range(20_000, 20_030))
"""Seeds on which runs and snapshots are compared (never the evaluation seeds 10000-10029)."""


def score_on_seeds(planner, seeds: Sequence[int], window: int) -> dict:
    """Unguided closed-loop score of a planner at window k: percent of the data's return, falls, per-seed returns."""
    from diffusion_rl.planner import rollout

    results = rollout(planner, list(seeds), window=window)
    returns = np.array([r.total_return for r in results])
    data = score_reference(planner.meta)["mean_return"]
    return {"window": window, "seeds": [int(seeds[0]), int(seeds[-1])], "normalized": round(100 * float(returns.mean()) / data, 2),
            "falls": int(sum(r.fell for r in results)), "returns": [round(float(x), 2) for x in returns]}


def report_runs(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, snapshots_of: str | None = None,
                seeds: Sequence[int] = TUNING_SEEDS, progress: bool = True, compare_at: int | None = None,
                add: bool = False) -> dict:
    """Compare fine-tuning runs on the tuning seeds at their own window; ``runs.json`` + each run's curve in ``out_dir``.

    ``snapshots_of``: the name of one run whose every snapshot is scored too (the learning curve on held-out seeds).
    ``compare_at``: also score every run's snapshot after that many iterations, so runs of different lengths compare.
    ``add``: keep the report's other runs (and its snapshots) as they are, and add or rescore only ``run_dirs``;
    a run's folder need not outlive its entry. The seeds and ``compare_at`` must then be the report's own.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    report = {"seeds": [int(seeds[0]), int(seeds[-1])], "compare_at": compare_at, "snapshots_of": snapshots_of, "runs": [],
              "snapshots": []}
    # Scores already in runs.json are reused for a run whose checkpoint is unchanged (scoring is deterministic).
    known = json.loads((out / "runs.json").read_text()) if (out / "runs.json").exists() else {}
    if add:
        if not known:
            raise ValueError(f"--add needs an existing report: {out / 'runs.json'} is missing.")
        if known.get("seeds") != report["seeds"] or known.get("compare_at") != compare_at:
            raise ValueError(f"--add keeps the report's seeds {known.get('seeds')} and --compare-at {known.get('compare_at')}; "
                             f"got {report['seeds']} and {compare_at}.")
        if snapshots_of is None:
            report["snapshots_of"], report["snapshots"] = known.get("snapshots_of"), list(known.get("snapshots", []))
        names = {Path(r).name for r in run_dirs}
        report["runs"] = [r for r in known.get("runs", []) if r["name"] not in names]
    if known.get("seeds") != report["seeds"]:
        known = {}
    for run in tqdm(run_dirs, desc="runs", disable=not progress):
        run = Path(run)
        state = load_checkpoint(run / "checkpoint.pt", kind="finetune")
        cfg = FinetuneConfig(**state["config"])
        curve = json.loads(state["curve"])
        entry = {"name": run.name, "command": finetune_command(cfg, f"runs/{run.name}"), "config": state["config"],
                 "iterations": int(state["iteration"]), "env_steps": int(state["env_steps"]), "wall_time_s": round(float(state["wall_time"]), 1)}
        same = next((r for r in known.get("runs", []) if {k: r.get(k) for k in entry} == entry), None)
        entry["tuning"] = same["tuning"] if same else score_on_seeds(planner_from_run(run, with_value=False), seeds, cfg.window)
        if compare_at is not None:
            entry["at"] = same["at"] if same and same.get("at", {}).get("iteration") == compare_at else {
                "iteration": compare_at, **score_on_seeds(planner_from_run(run, compare_at, with_value=False), seeds, cfg.window)}
        report["runs"].append(entry)
        write_curve(out / run.name / "curve.csv", curve)
        if run.name == snapshots_of:
            from diffusion_rl.pretrained import load

            scored = {s["iteration"]: s for s in known.get("snapshots", [])} if same and known.get("snapshots_of") == run.name else {}
            base = load(cfg.planner, device="cpu", with_value=False)
            report["snapshots"].append(scored.get(0) or {"iteration": 0, **score_on_seeds(base, seeds, cfg.window)})
            kept = sorted(int(p.stem[5:]) for p in (run / "snapshots").glob("iter-*.safetensors"))
            for it in tqdm(kept, desc="snapshots", disable=not progress, leave=False):
                report["snapshots"].append(scored.get(it) or {
                    "iteration": it, **score_on_seeds(planner_from_run(run, it, with_value=False), seeds, cfg.window)})
    atomic_write_json(out / "runs.json", report)
    return report


@torch.no_grad()
def chain_kl(planner, states: np.ndarray, std_floor: float = 0.1, seed: int = 0) -> dict[int, float]:
    """How far a fine-tuned planner's trained steps are from its base's: the mean KL divergence per trained level, in nats,
    between the two networks' reverse steps from the same inputs (the tuned chain's own, sampled from ``states``)."""
    split = planner.diffusion.model
    if not isinstance(split, LevelSplit):
        raise ValueError("chain_kl needs a fine-tuned planner (its denoiser is a LevelSplit).")
    policy = planner.diffusion
    cond = planner.obs_normalizer.normalize(torch.from_numpy(np.asarray(states, np.float32)))
    _, x_in, _ = sample_chain(policy, cond, split.levels, std_floor, torch.Generator().manual_seed(seed), split.first)
    mask = _free_mask(policy)
    out = {}
    for s in range(split.levels):
        level = split.first + split.levels - 1 - s
        t = torch.full((len(cond),), level, dtype=torch.long)
        tuned = policy.schedule.q_posterior(split.tuned(x_in[:, s], t), x_in[:, s], t)[0]
        base = policy.schedule.q_posterior(split.base(x_in[:, s], t), x_in[:, s], t)[0]
        out[level] = float(((tuned - base).pow(2) / (2 * step_std(policy, level, std_floor) ** 2) * mask).sum((1, 2)).mean())
    return out


def plan_distance_to_data(planner, states: np.ndarray, data_states: np.ndarray, seed: int = 0) -> np.ndarray:
    """How far one plan from each state strays from the data: the mean RMS distance of its predicted states (rows
    1..H-1) to their nearest data states, in data standard deviations, per plan (N,). Same noise for every planner."""
    from diffusion_rl.analysis import nearest_data_distance

    predicted = planner.plan(np.asarray(states, np.float32), seed=seed, with_values=False).observations[:, 1:]
    d = nearest_data_distance(predicted.reshape(-1, predicted.shape[-1]), data_states, planner.obs_normalizer.scale)
    return d.reshape(len(states), -1).mean(1)


# ----------------------------------------------------------------------------- export


def export_finetuned(run_dir: str | os.PathLike, name: str, out_dir: str | os.PathLike | None = None, command: str = "") -> dict:
    """Write a run's fine-tuned planner as ``<name>-diffuser.safetensors`` + sidecar (base and tuned networks)."""
    from safetensors.torch import save as st_save

    from diffusion_rl.pretrained import ASSETS

    ckpt_path = Path(run_dir) / "checkpoint.pt"
    state = load_checkpoint(ckpt_path, kind="finetune")
    cfg, base, policy = _tuned_policy(state, ckpt_path)
    # Only the tuned steps: the pretrained network is the base planner's own file, which the loader finds by its SHA-256.
    tensors = {f"net.model.tuned.{k}": v.contiguous() for k, v in policy.model.tuned.state_dict().items()}
    tensors["normalizer.shift"] = torch.as_tensor(base.normalizer.shift).contiguous()
    tensors["normalizer.scale"] = torch.as_tensor(base.normalizer.scale).contiguous()
    out = Path(out_dir) if out_dir is not None else ASSETS
    path = out / f"{name}-diffuser.safetensors"
    atomic_write_bytes(path, st_save(tensors))
    curve = json.loads(state["curve"])
    keep = ("file", "kind", "config", "dataset", "dataset_id", "reference", "action_dim", "transition_dim", "normalizer_kind")
    meta = {
        **{k: base.meta[k] for k in keep if k in base.meta},
        "file": path.name,
        "finetuned_from": {"name": cfg.planner, "file": base.path.name, "sha256": base.sha256},
        "finetune": {
            "method": "DPPO: PPO over the last K denoising steps", "run": Path(run_dir).name, "levels": int(state["levels"]),
            "first_level": int(state.get("first_level", 0)), "config": state["config"],
            "iterations": int(state["iteration"]), "env_steps": int(state["env_steps"]), "wall_time_s": round(float(state["wall_time"]), 1),
            "command": finetune_command(cfg, f"runs/{Path(run_dir).name}"), "learning_curve": curve,
        },
        "export_command": command or f"python -m diffusion_rl export-finetuned --run runs/{Path(run_dir).name} --name {name}",
        "seed": cfg.seed,
        "steps": int(state["iteration"]),
        "wall_time_s": round(float(state["wall_time"]), 1),
        "final_training_return": curve[-1] if curve else None,
        "sha256": sha256_file(path),
    }
    atomic_write_json(path.with_suffix(".json"), meta)
    return meta


def finetune_command(cfg: FinetuneConfig, run_dir: str = "runs/finetune") -> str:
    """The command line that reproduces a run (options that differ from the defaults)."""
    default = FinetuneConfig()
    opts = " ".join(f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)}" for f in fields(cfg)
                    if getattr(cfg, f.name) != getattr(default, f.name) and f.name != "threads")
    return f"python -m diffusion_rl finetune --run-dir {run_dir} {opts}".strip()
