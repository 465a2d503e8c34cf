"""Speed of training and planning on this machine, printed as ratios to reference figures.

Reference figures (measured on the project's 2-core machine with a Diffuser-style 1.0M-parameter
temporal U-Net, see ``REFERENCE`` below): 16.5 train steps/s at batch 32 and 10.7 at batch 64; a
20-step unguided plan for 10 states in 0.2 s, 0.7 s with 2 guide steps. A ratio above 1 is faster.
Speed does not depend on the weights, so random weights and random windows are used: no dataset needed.
The sweep timing runs the study's protocol (8 settings x 10 episodes x up to 1000 steps) with the
shipped planner, because how long episodes last (falls end them early) depends on the weights.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from diffusion_rl.data import Normalizer
from diffusion_rl.diffusion import GaussianDiffusion
from diffusion_rl.models import TemporalUnet, UNetConfig, ValueNet
from diffusion_rl.planner import Planner, rollout
from diffusion_rl.runtime import torch_threads
from diffusion_rl.training import DiffuserConfig, make_optimizer

__all__ = ["REFERENCE", "closed_loop_speed", "default_controller_speed", "run_benchmark", "train_speed", "plan_time"]

REFERENCE = {
    "train_steps_per_s_b32": 16.5,
    "train_steps_per_s_b64": 10.7,
    "plan_s_b10": 0.2,
    "plan_guided2_s_b10": 0.7,
    "study_sweep_s": 3 * 3600 + 35 * 60,
    "default_env_steps_per_s_2cores": 3000.0,
    "default_decisions_per_s_1core": 500.0,
}
"""``study_sweep_s``: the study's 8 settings x 10 episodes took 3 h 35 min; the target here is 5 minutes.
``default_*``: the targets for the shipped default controller (the best point of the control study):
3,000 env steps/s over 20 episodes on 2 cores, and 500 decisions/s for one episode on one core."""

ACT, OBS = 6, 17


def _planner(horizon: int = 8, n_guide_steps: int = 1) -> Planner:
    torch.manual_seed(0)
    cfg = UNetConfig(ACT + OBS, horizon)
    diffusion = GaussianDiffusion(TemporalUnet(cfg), ACT)
    norm = Normalizer(np.zeros(ACT + OBS), np.ones(ACT + OBS), "gaussian")
    return Planner(diffusion, norm, ValueNet(cfg), n_guide_steps=n_guide_steps)


def train_speed(batch_size: int, threads: int, steps: int = 40, horizon: int = 8) -> float:
    """Gradient steps per second of the default denoiser (AdamW, clipping; the training step's work)."""
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(TemporalUnet(UNetConfig(ACT + OBS, horizon)), ACT)
    opt = make_optimizer(diffusion, DiffuserConfig())
    x0 = torch.randn(batch_size, horizon, ACT + OBS)

    def step():
        t = torch.randint(20, (batch_size,))
        loss = diffusion.loss(x0, t, torch.randn_like(x0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        opt.step()

    with torch_threads(threads):
        for _ in range(5):
            step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return steps / (time.perf_counter() - t0)


def plan_time(batch_size: int, threads: int, guidance_scale: float | None = None, n_guide_steps: int = 1, ddim_steps: int | None = None, reps: int = 10) -> float:
    """Seconds per plan for ``batch_size`` states."""
    planner = _planner(n_guide_steps=n_guide_steps)
    obs = np.zeros((batch_size, OBS), np.float32)
    with torch_threads(threads):
        planner.plan(obs, guidance_scale, seed=0, ddim_steps=ddim_steps)
        t0 = time.perf_counter()
        for _ in range(reps):
            planner.plan(obs, guidance_scale, seed=0, ddim_steps=ddim_steps)
        return (time.perf_counter() - t0) / reps


def closed_loop_speed(ddim_steps: int | None, episodes: int = 10, max_steps: int = 200, window: int = 1) -> float:
    """Aggregated env steps per second of the shipped planner in closed loop, one thread."""
    from diffusion_rl import pretrained

    planner = pretrained.load("walker2d-h8", device="cpu")
    t0 = time.perf_counter()
    results = rollout(planner, range(10_000, 10_000 + episodes), window=window, ddim_steps=ddim_steps, max_steps=max_steps)
    return sum(r.length for r in results) / (time.perf_counter() - t0)


def _default_episodes(seeds: list[int], max_steps: int, min_batch: int = 16, name: str = "walker2d-h8") -> tuple[int, float]:
    """Env steps and rollout wall seconds of shipped planner ``name`` with its default controller on ``seeds`` (one thread).

    ``min_batch``: the planner pads smaller batches to this many rows, which makes every episode's result
    independent of its batch-mates (the studies' setting, 16); 1 plans a lone episode without padding.
    """
    from diffusion_rl import pretrained
    from diffusion_rl.control import controller_from_name

    torch.set_num_threads(1)
    control = pretrained.DEFAULT_CONTROL[name]
    planner = pretrained.load(name, device="cpu", min_batch=min_batch)
    controller = controller_from_name(control["controller"], window=control["window"], threshold=control["threshold"])
    t0 = time.perf_counter()
    results = rollout(planner, seeds, controller=controller, ddim_steps=control["ddim_steps"], warm_start=control["warm_start"],
                      max_steps=max_steps)
    return sum(r.length for r in results), time.perf_counter() - t0


def default_controller_speed(episodes: int = 20, max_steps: int = 1000, workers: int = 2,
                             name: str = "walker2d-h8") -> tuple[float, float, float]:
    """Planner ``name``'s default controller's speed: aggregated env steps/s of ``episodes`` split over ``workers``
    processes (one core each), and decisions (env steps) per second of one episode alone on one core, with the
    studies' padded batches and without padding."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    seeds = list(range(10_000, 10_000 + episodes))
    # Fresh interpreters (spawn): forking a process whose torch already ran threads can hang.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        parts = list(pool.map(_default_episodes, [seeds[i::workers] for i in range(workers)], [max_steps] * workers,
                              [16] * workers, [name] * workers))
    aggregated = sum(steps for steps, _ in parts) / max(wall for _, wall in parts)
    steps, wall = _default_episodes(seeds[:1], max_steps, name=name)
    lone_steps, lone_wall = _default_episodes(seeds[:1], max_steps, min_batch=1, name=name)
    return aggregated, steps / wall, lone_steps / lone_wall


def sweep_time(quick: bool = False, workers: int = 2) -> tuple[float, int]:
    """Wall seconds and env steps of the study's sweep protocol with the shipped planner (rollouts only)."""
    import tempfile
    from dataclasses import replace

    from diffusion_rl.sweep import PRESETS, SweepConfig, run_episodes

    cfg = replace(SweepConfig(**PRESETS["study"]), workers=workers)
    if quick:
        cfg = replace(cfg, windows="2,8", episodes=2, max_steps=200)
    with tempfile.TemporaryDirectory() as tmp:
        record = run_episodes(cfg, tmp, progress=False)
    return record["rollout_wall_s"], record["env_steps"]


def run_benchmark(quick: bool = False) -> dict:
    """Measure and print everything; returns the numbers."""
    n = 15 if quick else 60
    reps = 3 if quick else 10
    rows = []
    for threads in (1, 2):
        for b, ref in ((32, REFERENCE["train_steps_per_s_b32"]), (64, REFERENCE["train_steps_per_s_b64"])):
            sps = train_speed(b, threads, n)
            rows.append((f"train steps/s, batch {b}, {threads} thread(s)", sps, f"{sps * b:.0f} samples/s", sps / ref))
    for threads in (1, 2):
        for label, kw, ref in (
            ("plan, 20 steps, unguided", {}, REFERENCE["plan_s_b10"]),
            ("plan, 20 steps, 2 guide steps", {"guidance_scale": 0.1, "n_guide_steps": 2}, REFERENCE["plan_guided2_s_b10"]),
            ("plan, DDIM 5 steps, unguided", {"ddim_steps": 5}, REFERENCE["plan_s_b10"]),
            ("plan, DDIM 1 step, unguided", {"ddim_steps": 1}, REFERENCE["plan_s_b10"]),
        ):
            s = plan_time(10, threads, reps=reps, **kw)
            rows.append((f"{label}, batch 10, {threads} thread(s)", s, "s per plan", ref / s))
    t0 = time.perf_counter()
    results = rollout(_planner(), range(10), window=1, max_steps=30 if quick else 100)
    dt = time.perf_counter() - t0
    steps = sum(r.length for r in results)
    rows.append(("closed loop k=1, 10 episodes (random weights)", steps / dt, "env steps/s", float("nan")))
    # One-step DDIM in the loop, on the shipped planner (its weights decide when episodes end): speed as a ratio to 20 steps.
    episodes, max_steps = (4, 50) if quick else (10, 200)
    full = closed_loop_speed(None, episodes, max_steps)
    one = closed_loop_speed(1, episodes, max_steps)
    rows.append((f"closed loop k=1, 20 DDPM steps, shipped planner, {episodes} ep.", full, "env steps/s", float("nan")))
    rows.append((f"closed loop k=1, 1-step DDIM, shipped planner, {episodes} ep.", one, "env steps/s", one / full))
    agg, single, lone = default_controller_speed(episodes=4 if quick else 20, max_steps=200 if quick else 1000)
    rows.append((f"walker2d-h8 default controller, {4 if quick else 20} ep., 2 processes", agg, "env steps/s (2 cores)",
                 agg / REFERENCE["default_env_steps_per_s_2cores"]))
    rows.append(("walker2d-h8 default controller, 1 episode, 1 core, padded batch", single, "decisions/s",
                 single / REFERENCE["default_decisions_per_s_1core"]))
    rows.append(("walker2d-h8 default controller, 1 episode, 1 core, min_batch=1", lone, "decisions/s",
                 lone / REFERENCE["default_decisions_per_s_1core"]))
    # The shipped default (robust to pushes) beside the original's, as a ratio of env steps/s.
    from diffusion_rl import pretrained

    robust = pretrained.DEFAULT_PLANNER
    r_agg, r_single, r_lone = default_controller_speed(episodes=4 if quick else 20, max_steps=200 if quick else 1000, name=robust)
    control = pretrained.DEFAULT_CONTROL[robust]
    rows.append((f"{robust} default (k={control['window']}, DDIM {control['ddim_steps']}), 2 processes", r_agg,
                 "env steps/s (2 cores)", r_agg / agg))
    rows.append((f"{robust} default, 1 episode, 1 core, min_batch=1", r_lone, "decisions/s", r_lone / lone))
    wall, steps = sweep_time(quick)
    what = "reduced study sweep (2 settings x 2 ep. x 200 steps)" if quick else "study sweep (8 settings x 10 ep. x 1000 steps)"
    rows.append((f"{what}, wall", wall, "s (target 300)", REFERENCE["study_sweep_s"] / wall if not quick else float("nan")))
    rows.append((f"{what}, env steps/s", steps / wall, f"{steps} env steps", float("nan")))

    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'value':>9}  {'unit':<18} {'vs reference':>12}")
    for label, value, unit, ratio in rows:
        ratio_txt = f"{ratio:10.2f}x" if np.isfinite(ratio) else f"{'-':>11}"
        print(f"{label.ljust(width)}  {value:9.3f}  {unit:<18} {ratio_txt}")
    return {label: value for label, value, _, _ in rows}
