"""The expert: Soft Actor-Critic (Haarnoja et al. 2018) on Walker2d, written for a small CPU.

The study trained on Minari's Walker2d expert data, which came from an SB3 SAC policy. No dataset
hub is reachable here, so we train our own SAC expert and collect data with it. This file is the
whole algorithm and reads top to bottom: networks, replay buffer, update, training loop with
exact resume, evaluation, and export of the small policy file that the package ships.

Why not Stable-Baselines3: on 2 CPU cores it runs about 40-65 env steps/s, and its replay buffer
and checkpoints are pickles. This implementation evaluates both critics in one batched matmul,
uses fused Adam and ``_foreach`` target updates, and checkpoints with ``weights_only`` loading, so
a multi-hour run can be killed at any moment and resumed to the same weights.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from diffusion_rl.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
)
from diffusion_rl.disturbances import Disturbance
from diffusion_rl.envs import ENV_ID, EVAL_SEEDS, make_env
from diffusion_rl.runtime import StopOnSignal, portable_command, torch_threads

__all__ = [
    "EVAL_SEEDS",
    "Actor",
    "SACConfig",
    "episode_reset_seed",
    "evaluate_policy",
    "export_policy",
    "load_policy",
    "policy_episodes",
    "record_episode",
    "SHIPPED_POLICIES",
    "shipped_policy_path",
    "speed_tracking",
    "train_sac",
]

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0

RESUME_MAY_CHANGE = frozenset({"total_steps", "threads", "eval_every", "eval_episodes", "checkpoint_every"})
"""Options that do not change the trajectory of training, so a resumed run may use new values.
(With MKL's AVX-512 kernels, 1 and 2 threads give bit-identical results, which tests/test_expert.py checks; its
AVX2 kernels add up by thread, so on such a CPU a resume is bit-exact only with the same --threads.)"""


@dataclass(frozen=True)
class SACConfig:
    """Hyperparameters of the expert's SAC run (defaults follow CleanRL's SAC for MuJoCo)."""

    env_id: str = ENV_ID
    """Gymnasium environment id."""
    total_steps: int = 1_000_000
    """Environment steps to train for."""
    seed: int = 1
    """Seeds torch, numpy and the env resets; the same seed gives the same weights."""
    learning_starts: int = 10_000
    """Uniform-random steps that fill the replay buffer before updates start."""
    batch_size: int = 256
    """Transitions per gradient step."""
    gamma: float = 0.99
    """Discount factor."""
    tau: float = 0.005
    """Polyak rate of the target critics."""
    policy_lr: float = 3e-4
    """Adam learning rate of the actor and the entropy temperature."""
    q_lr: float = 1e-3
    """Adam learning rate of the critics."""
    hidden: int = 256
    """Width of the two hidden layers of every network."""
    buffer_size: int = 1_000_000
    """Replay capacity (transitions)."""
    eval_every: int = 25_000
    """Env steps between evaluations for the learning curve."""
    eval_episodes: int = 5
    """Deterministic episodes per learning-curve point."""
    checkpoint_every: int = 25_000
    """Env steps between atomic checkpoints (taken at the next episode end)."""
    threads: int = 1
    """torch intra-op threads; results are bit-identical only for the same count."""
    task: str = "walk"
    """"walk": Walker2d's reward (the expert); "speed": walk at a target speed drawn per episode (envs.TargetSpeed)."""


# ----------------------------------------------------------------------------- networks


def mlp(n_in: int, n_out: int, hidden: int) -> nn.Sequential:
    """Two hidden ReLU layers."""
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy. Shapes: obs (batch, obs_dim) -> action (batch, act_dim) in [-1, 1]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.obs_dim, self.act_dim, self.hidden = obs_dim, act_dim, hidden
        self.net = mlp(obs_dim, 2 * act_dim, hidden)

    def _mean_log_std(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        # A smooth squash into [LOG_STD_MIN, LOG_STD_MAX] instead of a hard clamp keeps gradients alive.
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1)
        return mean, log_std

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterized action and its log-probability (with the tanh change of variables)."""
        mean, log_std = self._mean_log_std(obs)
        eps = torch.randn_like(mean)
        u = mean + log_std.exp() * eps
        action = torch.tanh(u)
        log_prob = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        # log(1 - tanh(u)^2) written stably as 2 (log 2 - u - softplus(-2u)).
        log_prob = log_prob - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)
        return action, log_prob

    def with_noise(self, obs: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The action for given standard-normal noise ``eps``: lets a caller own the randomness."""
        mean, log_std = self._mean_log_std(obs)
        return torch.tanh(mean + log_std.exp() * eps)

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """The mean action, squashed: what the expert does when evaluated."""
        return torch.tanh(self._mean_log_std(obs)[0])

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False, noise: np.ndarray | None = None) -> np.ndarray:
        """Numpy in, numpy out, for env loops: one observation (obs_dim,) or a batch (B, obs_dim).

        A batch is computed row by row. Matmul kernels add up in a different order for different
        batch sizes, and MuJoCo amplifies that last-bit difference into a different episode, so an
        episode's actions must not depend on which other episodes share its batch. ``noise``
        (standard normal, same leading shape, act_dim last) replaces the generator's draws.
        """
        x = torch.as_tensor(obs, dtype=torch.float32).reshape(-1, self.obs_dim)
        eps = None if noise is None else torch.as_tensor(noise, dtype=torch.float32).reshape(-1, self.act_dim)
        rows = []
        for i in range(len(x)):
            xi = x[i : i + 1]
            if deterministic:
                rows.append(self.deterministic(xi))
            elif eps is not None:
                rows.append(self.with_noise(xi, eps[i : i + 1]))
            else:
                rows.append(self.sample(xi)[0])
        return torch.cat(rows).reshape(*np.shape(obs)[:-1], self.act_dim).numpy().astype(np.float64)


class EnsembleLinear(nn.Module):
    """``n`` independent linear layers applied in one batched matmul. x: (n, batch, fin) -> (n, batch, fout)."""

    def __init__(self, n: int, fin: int, fout: int):
        super().__init__()
        bound = 1 / math.sqrt(fin)  # nn.Linear's default initialisation
        self.weight = nn.Parameter(torch.empty(n, fin, fout).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, fout).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class TwinCritic(nn.Module):
    """Two Q-networks evaluated together. (obs, action) of (batch, .) -> Q of (2, batch)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, n: int = 2):
        super().__init__()
        self.n = n
        self.l1 = EnsembleLinear(n, obs_dim + act_dim, hidden)
        self.l2 = EnsembleLinear(n, hidden, hidden)
        self.l3 = EnsembleLinear(n, hidden, 1)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, action], dim=-1).expand(self.n, -1, -1)
        return self.l3(F.relu(self.l2(F.relu(self.l1(x))))).squeeze(-1)


# ----------------------------------------------------------------------------- replay buffer


class ReplayBuffer:
    """Fixed-size ring buffer of transitions held in numpy arrays."""

    FIELDS = ("obs", "action", "reward", "next_obs", "terminated")

    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        self.capacity, self.size, self.ptr = capacity, 0, 0
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.action = np.zeros((capacity, act_dim), np.float32)
        self.reward = np.zeros(capacity, np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.terminated = np.zeros(capacity, np.float32)

    def add(self, obs, action, reward, next_obs, terminated) -> None:
        i = self.ptr
        self.obs[i], self.action[i], self.reward[i] = obs, action, reward
        self.next_obs[i], self.terminated[i] = next_obs, terminated
        self.ptr = (self.ptr + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, batch_size: int) -> tuple[torch.Tensor, ...]:
        idx = rng.integers(0, self.size, batch_size)
        return tuple(torch.from_numpy(getattr(self, k)[idx]) for k in self.FIELDS)

    def state_dict(self) -> dict:
        state = {k: torch.from_numpy(getattr(self, k)[: self.size].copy()) for k in self.FIELDS}
        state.update(size=self.size, ptr=self.ptr)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.size, self.ptr = int(state["size"]), int(state["ptr"])
        for k in self.FIELDS:
            getattr(self, k)[: self.size] = state[k].numpy()


# ----------------------------------------------------------------------------- the agent


class SAC:
    """Actor, twin critics with targets, learned temperature, and their optimizers."""

    def __init__(self, obs_dim: int, act_dim: int, cfg: SACConfig):
        self.cfg = cfg
        self.actor = Actor(obs_dim, act_dim, cfg.hidden)
        self.critic = TwinCritic(obs_dim, act_dim, cfg.hidden)
        self.critic_target = TwinCritic(obs_dim, act_dim, cfg.hidden)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)
        self.log_alpha = torch.zeros(1, requires_grad=True)
        self.target_entropy = -float(act_dim)
        adam = dict(fused=True)  # one kernel for all parameters: fewer ops per step on CPU
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.policy_lr, **adam)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.q_lr, **adam)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=cfg.policy_lr, **adam)
        self._params = list(self.critic.parameters())
        self._target_params = list(self.critic_target.parameters())

    def update(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """One gradient step on critics, actor and temperature (SAC v2 with entropy tuning)."""
        obs, action, reward, next_obs, terminated = batch
        alpha = self.log_alpha.exp().detach()

        with torch.no_grad():
            next_action, next_log_prob = self.actor.sample(next_obs)
            q_next = self.critic_target(next_obs, next_action).min(0).values - alpha * next_log_prob
            target = reward + self.cfg.gamma * (1.0 - terminated) * q_next
        q = self.critic(obs, action)
        critic_loss = (q - target).pow(2).mean(1).sum()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()

        # The actor's gradient flows through the critic, but the critic must not collect it.
        self.critic.requires_grad_(False)
        new_action, log_prob = self.actor.sample(obs)
        actor_loss = (alpha * log_prob - self.critic(obs, new_action).min(0).values).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        self.critic.requires_grad_(True)

        alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()

        with torch.no_grad():
            torch._foreach_lerp_(self._target_params, self._params, self.cfg.tau)
        return {"critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(), "alpha": alpha}

    def state_dict(self) -> dict:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "alpha_opt": self.alpha_opt.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.alpha_opt.load_state_dict(state["alpha_opt"])


# ----------------------------------------------------------------------------- evaluation


def evaluate_policy(
    actor: Actor, seeds: tuple[int, ...] | list[int] = EVAL_SEEDS, deterministic: bool = True, env_id: str = ENV_ID,
    task: str = "walk",
) -> np.ndarray:
    """Return of one episode per reset seed, all episodes stepped together in a vector env."""
    return np.array([e["return"] for e in policy_episodes(actor, seeds, deterministic, env_id, task=task)])


def policy_episodes(
    actor: Actor, seeds: Sequence[int], deterministic: bool = True, env_id: str = ENV_ID, disturbance: Disturbance | None = None,
    task: str = "walk", target_speed: float | None = None,
) -> list[dict]:
    """One episode per reset seed (return, length, fell, mean forward speed), all stepped together, optionally under a
    disturbance; ``target_speed`` asks the speed task for that speed in every episode (else each seed draws its own)."""
    import gymnasium as gym

    seeds = list(seeds)
    envs = gym.vector.SyncVectorEnv(
        [lambda: make_env(env_id, disturbance=disturbance, task=task) for _ in seeds], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    with torch_threads(1):
        try:
            obs, _ = envs.reset(seed=seeds, options=None if target_speed is None else {"target_speed": float(target_speed)})
            returns, lengths, distance = np.zeros(len(seeds)), np.zeros(len(seeds), int), np.zeros(len(seeds))
            fell, alive = np.zeros(len(seeds), bool), np.ones(len(seeds), bool)
            while alive.any():
                obs, reward, terminated, truncated, info = envs.step(actor.act(obs, deterministic=deterministic))
                returns += reward * alive
                distance += _step_speed(info, len(seeds)) * alive
                lengths += alive
                fell |= terminated & alive
                alive &= ~(terminated | truncated)
        finally:
            envs.close()
    return [{"seed": s, "return": float(r), "length": int(n), "fell": bool(f), "mean_speed": float(d / max(n, 1))}
            for s, r, n, f, d in zip(seeds, returns, lengths, fell, distance)]


def _step_speed(info: dict, n: int) -> np.ndarray:
    """Each sub-environment's forward speed in this step: an episode that just ended reports it in ``final_info``."""
    speed = np.zeros(n)
    for part in (info, info.get("final_info") or {}):
        if "x_velocity" in part:
            speed = np.where(part["_x_velocity"], part["x_velocity"], speed)
    return speed


TRACKING_SEEDS = tuple(range(20_000, 20_005))
"""Reset seeds of :func:`speed_tracking`'s episodes: tuning seeds, because the tracking chooses which checkpoint makes data."""


def speed_tracking(actor: Actor, targets: Sequence[float] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5),
                   seeds: Sequence[int] = TRACKING_SEEDS, env_id: str = ENV_ID) -> list[dict]:
    """How well a speed policy walks at each target: its deterministic episodes' mean speed and falls, per target."""
    out = []
    for v in targets:
        eps = policy_episodes(actor, seeds, deterministic=True, env_id=env_id, task="speed", target_speed=v)
        out.append({"target_speed": float(v), "mean_speed": round(float(np.mean([e["mean_speed"] for e in eps])), 3),
                    "falls": int(sum(e["fell"] for e in eps)), "episodes": len(eps)})
    return out


def record_episode(actor: Actor, seed: int, disturbance: Disturbance | None = None, max_steps: int = 1000,
                   env_id: str = ENV_ID) -> dict:
    """One deterministic episode with its states and root x positions (for videos): states (T+1, obs), x (T+1,), return, fell."""
    env = make_env(env_id, max_episode_steps=max_steps, disturbance=disturbance)
    try:
        obs, _ = env.reset(seed=int(seed))
        states, xs, total, fell = [obs], [float(env.unwrapped.data.qpos[0])], 0.0, False
        with torch_threads(1):
            for _ in range(max_steps):
                obs, reward, terminated, truncated, _ = env.step(actor.act(obs[None], deterministic=True)[0])
                states.append(obs)
                xs.append(float(env.unwrapped.data.qpos[0]))
                total += float(reward)
                if terminated or truncated:
                    fell = bool(terminated)
                    break
    finally:
        env.close()
    return {"states": np.asarray(states, np.float32), "x": np.asarray(xs), "return": total, "fell": fell, "length": len(states) - 1}


# ----------------------------------------------------------------------------- training


def episode_reset_seed(cfg: SACConfig, episode: int) -> int:
    """The reset seed of a training run's ``episode``-th episode."""
    # Disjoint from EVAL_SEEDS and from the dataset's seeds; one per episode so resume replays exactly.
    return 1_000_000 * cfg.seed + episode


def train_sac(cfg: SACConfig, run_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Train (or resume) SAC in ``run_dir``; returns the path of the final checkpoint.

    The run keeps ``checkpoint.pt`` (written atomically every ``checkpoint_every`` steps, mid-episode
    included, and on SIGTERM/SIGINT) and ``curve.csv``. Run the same call again after a kill and it
    continues from the last checkpoint to the same weights as an uninterrupted run.
    """
    from tqdm.auto import tqdm

    env = make_env(cfg.env_id, task=cfg.task)  # refuses an unknown task before anything is written
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    torch.set_num_threads(cfg.threads)

    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    torch.manual_seed(cfg.seed)
    agent = SAC(obs_dim, act_dim, cfg)
    buffer = ReplayBuffer(cfg.buffer_size, obs_dim, act_dim)
    rng = np.random.default_rng(cfg.seed)
    step, episode, wall, history, episodes, resume_env = 0, 0, 0.0, [], [], None

    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, kind="sac")
        saved = SACConfig(**state["config"])
        changed = {k for k, v in asdict(cfg).items() if getattr(saved, k) != v} - RESUME_MAY_CHANGE
        if changed:
            raise CheckpointError(
                f"{ckpt_path} was written with a different configuration ({', '.join(sorted(changed))}); use "
                f"another --run-dir or the same options (only {', '.join(sorted(RESUME_MAY_CHANGE))} may change)."
            )
        agent.load_state_dict(state["agent"])
        buffer.load_state_dict(state["buffer"])
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = json.loads(state["numpy_rng"])
        step, episode, wall = int(state["step"]), int(state["episode"]), float(state["wall_time"])
        history, episodes = json.loads(state["history"]), json.loads(state["episodes"])
        resume_env = state["env"]

    def checkpoint(env_state: dict) -> None:
        save_checkpoint(
            ckpt_path,
            {
                "kind": "sac",
                "config": asdict(cfg),
                "agent": agent.state_dict(),
                "buffer": buffer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "numpy_rng": json.dumps(rng.bit_generator.state),
                "step": step,
                "episode": episode,
                "wall_time": wall,
                "history": json.dumps(history),
                "episodes": json.dumps(episodes),
                "env": env_state,
            },
        )
        _write_curve(run_dir / "curve.csv", history)

    obs, _ = env.reset(seed=episode_reset_seed(cfg, episode))
    ep_return, ep_len = 0.0, 0
    if resume_env is not None:
        obs, ep_return, ep_len = _restore_env(env, resume_env)
    t0 = time.perf_counter() - wall
    stop = StopOnSignal()
    bar = tqdm(total=cfg.total_steps, initial=step, disable=not progress, desc="SAC", unit="step", smoothing=0.05, mininterval=1.0)
    try:
        while step < cfg.total_steps:
            if step < cfg.learning_starts:
                action = rng.uniform(-1.0, 1.0, act_dim)
            else:
                action = agent.actor.act(obs)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            buffer.add(obs, action, reward, next_obs, terminated)
            obs, step, ep_return, ep_len = next_obs, step + 1, ep_return + reward, ep_len + 1
            if step > cfg.learning_starts:
                losses = agent.update(buffer.sample(rng, cfg.batch_size))
                if not bool(torch.cat([v.reshape(-1) for v in losses.values()]).isfinite().all()):
                    _non_finite(losses, step, cfg)
            bar.update(1)

            if terminated or truncated:
                episodes.append([step, round(ep_return, 2), ep_len])
                episode += 1
                bar.set_postfix(ep_return=f"{ep_return:.0f}", eval=history[-1]["eval_mean"] if history else None)
                obs, _ = env.reset(seed=episode_reset_seed(cfg, episode))
                ep_return, ep_len = 0.0, 0
            if step % cfg.eval_every == 0 or step == cfg.total_steps:
                wall = time.perf_counter() - t0
                returns = evaluate_policy(agent.actor, seeds=EVAL_SEEDS[: cfg.eval_episodes], env_id=cfg.env_id, task=cfg.task)
                history.append(
                    {
                        "env_step": step,
                        "wall_time_s": round(wall, 1),
                        "eval_mean": round(float(returns.mean()), 2),
                        "eval_std": round(float(returns.std()), 2),
                        "train_return_last10": round(float(np.mean([e[1] for e in episodes[-10:]])), 2) if episodes else None,
                        "alpha": round(float(agent.log_alpha.detach().exp()), 5),
                    }
                )
                bar.write(json.dumps(history[-1]))
            if step % cfg.checkpoint_every == 0 or step == cfg.total_steps or stop.requested:
                wall = time.perf_counter() - t0
                checkpoint(_capture_env(env, obs, ep_return, ep_len))
                if stop.requested:
                    bar.write(f"stopped by signal at step {step}; checkpoint written, rerun to resume")
                    break
    finally:
        stop.restore()
        bar.close()
        env.close()
    return ckpt_path


def _non_finite(losses: dict[str, torch.Tensor], step: int, cfg: SACConfig) -> None:
    """Stop a run whose losses became NaN or infinite, before anything is checkpointed."""
    from diffusion_rl.training import TrainingError

    last = (step - 1) - (step - 1) % cfg.checkpoint_every  # checkpoint.pt keeps this step, not the broken weights
    values = ", ".join(f"{k} {float(v.reshape(-1)[0]):.4g}" for k, v in losses.items())
    raise TrainingError(
        f"SAC became non-finite at env step {step} ({values}); nothing after the last checkpoint (step {last}) was "
        "saved. Train again with lower --q-lr and --policy-lr in a new --run-dir (a resume would repeat the same steps)."
    )


def _capture_env(env, obs: np.ndarray, ep_return: float, ep_len: int) -> dict:
    """Everything needed to continue the current episode bit for bit (MuJoCo's full integration state)."""
    import mujoco

    sim = env.unwrapped
    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    mj_state = np.empty(mujoco.mj_stateSize(sim.model, spec))
    mujoco.mj_getState(sim.model, sim.data, mj_state, spec)
    return {
        "mj_state": torch.from_numpy(mj_state),
        "obs": torch.from_numpy(np.asarray(obs, np.float64)),
        "ep_return": float(ep_return),
        "ep_len": int(ep_len),
        "elapsed_steps": int(env.get_wrapper_attr("_elapsed_steps")),
    }


def _restore_env(env, state: dict) -> tuple[np.ndarray, float, int]:
    import mujoco

    sim = env.unwrapped
    mujoco.mj_setState(sim.model, sim.data, state["mj_state"].numpy(), mujoco.mjtState.mjSTATE_INTEGRATION)
    mujoco.mj_forward(sim.model, sim.data)
    env.set_wrapper_attr("_elapsed_steps", state["elapsed_steps"])
    return state["obs"].numpy(), state["ep_return"], state["ep_len"]


def _write_curve(path: Path, history: list[dict]) -> None:
    if not history:
        return
    lines = [",".join(history[0])] + [",".join(str(h[k]) for k in history[0]) for h in history]
    atomic_write_text(path, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- the shipped policy

ASSETS = Path(__file__).parent / "assets"


SHIPPED_POLICIES = {
    "expert": ("runs/expert-sac", ""),
    "medium": ("runs/medium-sac", " --total-steps 100000 --seed 1"),
    "speed": ("runs/speed-sac", " --total-steps 400000 --seed 1 --task speed"),
}
"""The SAC policies the package ships, each with the run that makes it (folder, train-expert options): the expert (1M steps), the medium policy (the
same run stopped at 100k) and the speed policy (the speed task, stopped at 400k steps), which the ``speeds`` recipe needs."""


def shipped_policy_path(name: str = "expert") -> Path:
    """Where the package's policy ``name`` (expert, medium or speed) lives."""
    if name not in SHIPPED_POLICIES:
        raise ValueError(f"No shipped policy named {name!r}; choose from {', '.join(SHIPPED_POLICIES)}.")
    return ASSETS / f"{name}-walker2d-sac.safetensors"


def export_policy(checkpoint_path: str | os.PathLike, out: str | os.PathLike | None = None, command: str | None = None) -> dict:
    """Write the actor of a SAC checkpoint as safetensors plus a JSON sidecar with its evaluation."""
    from safetensors.torch import save as safetensors_bytes

    state = load_checkpoint(checkpoint_path, kind="sac")
    cfg = SACConfig(**state["config"])
    env = make_env(cfg.env_id, task=cfg.task)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    actor = Actor(obs_dim, act_dim, cfg.hidden)
    actor.load_state_dict(state["agent"]["actor"])
    det = evaluate_policy(actor, EVAL_SEEDS, deterministic=True, env_id=cfg.env_id, task=cfg.task)
    torch.manual_seed(0)
    sto = evaluate_policy(actor, EVAL_SEEDS, deterministic=False, env_id=cfg.env_id, task=cfg.task)

    out = Path(out) if out else shipped_policy_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, safetensors_bytes({k: v.contiguous() for k, v in actor.state_dict().items()}))
    sidecar = {
        "file": out.name,
        "sha256": sha256_file(out),
        "kind": "sac-actor",
        "env_id": cfg.env_id,
        "obs_dim": obs_dim,
        "act_dim": act_dim,
        "hidden": cfg.hidden,
        "command": command or portable_command(sys.argv[1:], program=Path(sys.argv[0]).name),
        # a checkpoint kept before its run's end (a snapshot) is what a run told to stop at its step makes
        "train_command": _train_command(replace(cfg, total_steps=min(cfg.total_steps, int(state["step"]))),
                                        f"runs/{Path(checkpoint_path).resolve().parent.name}"),
        "seed": cfg.seed,
        "env_steps": int(state["step"]),
        "wall_time_s": round(float(state["wall_time"]), 1),
        "config": asdict(cfg),
        "eval_seeds": list(EVAL_SEEDS),
        "eval_deterministic": {"mean": float(det.mean()), "std": float(det.std()), "returns": det.round(2).tolist()},
        "eval_stochastic": {"mean": float(sto.mean()), "std": float(sto.std()), "returns": sto.round(2).tolist()},
        "learning_curve": json.loads(state["history"]),
        "torch": torch.__version__,
    }
    if cfg.task == "speed":  # what the speeds recipe relies on: a stable walk at each target
        sidecar["speed_tracking"] = speed_tracking(actor, env_id=cfg.env_id)
        sidecar["speed_tracking_seeds"] = list(TRACKING_SEEDS)
    atomic_write_json(out.with_suffix(".json"), sidecar)
    return sidecar


def _train_command(cfg: SACConfig, run_dir: str = "runs/expert-sac") -> str:
    """The train-expert command line that reproduces ``cfg`` (options that differ from the defaults)."""
    default = SACConfig()
    opts = [f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items() if v != getattr(default, k) or k == "seed"]
    return f"python -m diffusion_rl train-expert --run-dir {run_dir} " + " ".join(opts)


def load_policy(path: str | os.PathLike | None = None) -> tuple[Actor, dict]:
    """Load the shipped (or a given) expert policy after checking its SHA-256 against its sidecar."""
    from safetensors.torch import load_file

    path = Path(path) if path else shipped_policy_path()
    sidecar_path = path.with_suffix(".json")
    if not path.is_file() or not sidecar_path.is_file():
        name = next((n for n in SHIPPED_POLICIES if shipped_policy_path(n).name == path.name), None)
        if name is not None:
            run, options = SHIPPED_POLICIES[name]
            raise CheckpointError(
                f"The {name} policy {path.name} or its sidecar is missing: train it with `python -m diffusion_rl train-expert{options} "
                f"--run-dir {run}` and export it with `python -m diffusion_rl export-expert {run}/checkpoint.pt "
                f"--out diffusion_rl/assets/{path.name}`."
            )
        raise CheckpointError(
            f"Expert policy {path} or its sidecar {sidecar_path.name} is missing. Reinstall the package, or "
            "train one with `python -m diffusion_rl train-expert` and export it with `python -m diffusion_rl export-expert`."
        )
    meta = json.loads(sidecar_path.read_text())
    digest = sha256_file(path)
    if digest != meta.get("sha256"):
        raise CheckpointError(f"{path} does not match the SHA-256 in its sidecar ({digest[:12]} != {str(meta.get('sha256'))[:12]}); refusing to load it.")
    actor = Actor(meta["obs_dim"], meta["act_dim"], meta["hidden"])
    try:
        actor.load_state_dict(load_file(str(path)))
    except Exception as exc:
        raise CheckpointError(f"{path} does not hold a SAC actor of the shape its sidecar names: {exc}") from None
    actor.eval()
    return actor, meta
