"""Scoring planners in closed loop, and exporting trained runs together with their scores.

The score of a planner is the mean return of closed-loop episodes on fixed reset seeds, also given
as a percentage of the training data's mean episode return (the study's normalization).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

from diffusion_rl.checkpoint import atomic_write_json
from diffusion_rl.control import Controller, InverseDynamicsActions
from diffusion_rl.disturbances import Disturbance
from diffusion_rl.envs import EVAL_SEEDS
from diffusion_rl.planner import Planner, rollout, summarize

__all__ = ["EVAL_SEEDS", "dataset_reference", "evaluate", "export_planner", "value_on_terminal_windows"]


def dataset_reference(dataset_id: str) -> dict:
    """The numbers scores are normalized by: the data's mean return and reward per step, and its reference scores."""
    from diffusion_rl.collect import dataset_summary
    from diffusion_rl.data import load_dataset

    ds = load_dataset(dataset_id)
    summary = dataset_summary(ds)
    summary["reward_per_step"] = summary["mean_return"] * summary["episodes"] / summary["steps"]
    summary.pop("path", None)
    return summary


def score_reference(meta: dict) -> dict:
    """The data a planner's scores are normalized by: the expert set for every planner (``meta["reference"]``
    where the planner was trained on other data), so percentages compare across planners."""
    return meta.get("reference") or meta.get("dataset") or {}


def evaluate(
    planner: Planner,
    window: int | None = None,
    guidance_scale: float | None = None,
    seeds: Iterable[int] = EVAL_SEEDS,
    n_samples: int = 1,
    ddim_steps: int | None = None,
    max_steps: int = 1000,
    progress: bool = False,
    controller: Controller | None = None,
    warm_start: int | None = None,
    inverse_dynamics: InverseDynamicsActions | None = None,
    disturbance: Disturbance | None = None,
) -> dict:
    """Closed-loop episodes on ``seeds``: mean/std return, falls, percent of the data's mean return, the planning work, wall time.

    ``window`` k (default 1) or a ``controller`` decides when to replan; ``warm_start`` n re-noises
    the previous plan to n levels instead of sampling each plan from pure noise; ``inverse_dynamics``
    acts toward the plan's next state instead of replaying its actions; ``disturbance`` pushes the walker
    or shifts its dynamics (recorded in the result).
    """
    t0 = time.perf_counter()
    results = rollout(planner, list(seeds), window, guidance_scale, n_samples, ddim_steps, max_steps, progress=progress,
                      controller=controller, warm_start=warm_start, inverse_dynamics=inverse_dynamics, disturbance=disturbance)
    wall = time.perf_counter() - t0
    if "dataset" not in planner.meta and "config" in planner.meta:
        planner.meta["dataset"] = dataset_reference(planner.meta["config"]["dataset_id"])
    reference = score_reference(planner.meta).get("mean_return")
    out = summarize(results, reference)
    if guidance_scale is not None:
        out["guide"] = planner.guide_settings()
    if planner.clip_actions:
        out["clip_actions"] = True
    if ddim_steps is not None or n_samples > 1 or warm_start is not None:
        out.update(ddim_steps=ddim_steps, n_samples=n_samples, warm_start=warm_start)
    steps = int(sum(r.length for r in results))
    plans = sum(r.n_plans for r in results)
    out["controller"] = results[0].controller
    if disturbance is not None and disturbance.active:
        out["disturbance"] = disturbance.to_dict()
    if inverse_dynamics is not None:
        out["actions"] = f"inverse dynamics ({inverse_dynamics.meta.get('file', 'model')})"
    out["plans"] = plans
    out["steps_per_plan"] = steps / max(plans, 1)
    out["denoiser_evals_per_step"] = sum(r.denoiser_evals for r in results) / max(steps, 1)
    out["guidance_gradients_per_step"] = sum(r.guidance_gradients for r in results) / max(steps, 1)
    out["wall_time_s"] = round(wall, 1)
    out["env_steps"] = steps
    out["env_steps_per_s"] = round(steps / wall, 1)
    return out


def export_planner(
    diffuser_run: str | os.PathLike,
    value_run: str | os.PathLike | None,
    name: str = "walker2d-h8",
    out_dir: str | os.PathLike | None = None,
    guidance_scale: float = 0.3,
    episodes: int = 20,
    command: str = "",
    progress: bool = True,
) -> dict:
    """Export a denoiser and (optionally) a value run as ``<name>-diffuser/-value.safetensors`` and score them.

    The score (unguided k = 1 and k = H, guided k = H, on ``episodes`` fixed seeds) is written into
    both sidecars. A denoiser trained on other data than the expert set is scored against the expert
    set (``reference``), as every planner in the book. Returns the denoiser's sidecar.
    """
    from diffusion_rl import pretrained
    from diffusion_rl.data import DEFAULT_DATASET_ID

    out_dir = Path(out_dir) if out_dir is not None else pretrained.ASSETS
    out_dir.mkdir(parents=True, exist_ok=True)
    dpath, vpath = out_dir / f"{name}-diffuser.safetensors", out_dir / f"{name}-value.safetensors"
    dmeta = pretrained.export_network(diffuser_run, dpath, {"export_command": command})
    dmeta["dataset"] = dataset_reference(dmeta["dataset_id"])
    if dmeta["dataset_id"] != DEFAULT_DATASET_ID:
        dmeta["reference"] = dataset_reference(DEFAULT_DATASET_ID)
    diffusion, normalizer, _ = pretrained.load_network(dpath)
    parts = [(dmeta, dpath)]
    value = None
    if value_run is not None:
        vmeta = pretrained.export_network(value_run, vpath, {"export_command": command})
        value, vnorm, _ = pretrained.load_network(vpath)
        pretrained.check_same_data(normalizer, vnorm)
        parts.append((vmeta, vpath))
    planner = Planner(diffusion, normalizer, value, dmeta)

    seeds = EVAL_SEEDS[:episodes] if episodes <= len(EVAL_SEEDS) else range(EVAL_SEEDS[0], EVAL_SEEDS[0] + episodes)
    H = planner.horizon
    settings = {"unguided_k1": (1, None), f"unguided_k{H}": (H, None)}
    if value is not None:
        settings[f"guided_k{H}"] = (H, guidance_scale)
    score = {}
    for key, (window, scale) in settings.items():
        score[key] = evaluate(planner, window, scale, seeds, progress=progress)
    for meta, path in parts:
        meta["score"] = score
        meta["score_protocol"] = (
            f"closed loop, {len(seeds)} episodes on reset seeds {seeds[0]}..{seeds[-1]}, up to 1000 steps, "
            "a fresh plan every k steps conditioned on the real state; percent_of_data = mean return / data mean return x 100"
        )
        atomic_write_json(path.with_suffix(".json"), meta)
    return dmeta


def value_on_terminal_windows(name: str = "walker2d-h8") -> dict:
    """How a shipped value network scores the training windows that reach a fall, against their targets.

    These windows are the only place the value function can learn what a fall costs; expert data
    has very few, so guidance cannot be expected to steer away from falls unless this fit is good.
    """
    import torch

    from diffusion_rl import pretrained
    from diffusion_rl.training import ValueConfig, build_windows

    value, normalizer, meta = pretrained.load_network(pretrained.asset_path(name, "value"))
    windows = build_windows(ValueConfig(**meta["config"]), normalizer)
    idx = torch.nonzero(windows.terminal).flatten()
    batch = windows.batch(idx)
    with torch.no_grad():
        predicted = value(batch.trajectory, torch.zeros(len(idx), dtype=torch.long))
    return {
        "windows": len(windows), "terminal_windows": len(idx), "termination_penalty": meta["config"]["termination_penalty"],
        "target": [round(float(v), 2) for v in batch.value], "predicted": [round(float(v), 2) for v in predicted],
        "mean_target_other_windows": round(float(windows.values[~windows.terminal].mean()), 2),
    }
