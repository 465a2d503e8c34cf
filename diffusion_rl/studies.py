"""The book's closed-loop studies beyond the window sweep, each one command: ``python -m diffusion_rl study NAME``.

Every study runs on the evaluation seeds 10000-10029 with the shared runner
(:mod:`diffusion_rl.experiment`); any setting it had to choose was chosen first on the tuning
seeds 20000-20029, by the same command, and the tuning results are shipped beside the results.

``sampler``: what the sampler's corrections change in closed loop (the book's guidance and
distribution-shift chapters):

* guidance placed after each reverse step (the study's notebook) against before it (Diffuser's code),
  and Diffuser's whole guidance recipe, at k = 4 and k = 8 where plans run open loop;
* planned actions kept inside [-1, 1] while sampling, against clipping them only on execution;
* one-step DDIM in the loop at k = 1, 2 and 4, once its first level was fixed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diffusion_rl.experiment import Arm, Comparison, load_rows, run_experiment, shipped_planner

__all__ = ["STUDIES", "EVAL_SEEDS", "TUNING_SEEDS", "load_study", "run_study", "sampler_study"]

EVAL_SEEDS = list(range(10_000, 10_030))
TUNING_SEEDS = list(range(20_000, 20_030))

AFTER_SCALE = 0.3
"""The sweep's guidance scale for the "after" placement (chosen on seeds 20000-20039 when the planner was exported)."""
BEFORE_SCALES = (0.1, 0.3, 1.0)
"""Scales tried for the "before" placement on the tuning seeds; the best goes to the evaluation."""
DIFFUSER_RECIPE = (("guide_placement", "before"), ("n_guide_steps", 2), ("scale_by_variance", True), ("t_stopgrad", 2))
"""jannerm/diffuser's locomotion guidance: before each step, 2 gradient steps, scaled by the posterior variance, none at t < 2; scale 0.1."""
BEFORE = (("guide_placement", "before"),)
CLIP = (("clip_actions", True),)


@dataclass(frozen=True)
class Study:
    """A named study: its function and the folder it ships in."""

    run: Callable[..., dict]
    folder: str


def sampler_study(out_dir: str | os.PathLike, planner_name: str = "walker2d-h8", command: str = "", progress: bool = True) -> dict:
    """Guidance placement, action clipping and one-step DDIM in closed loop; returns the evaluation summary."""
    planner, identity = shipped_planner(planner_name)
    out = Path(out_dir)

    tuning = [Arm(f"before-{s:g}-k8", 8, s, planner_options=BEFORE) for s in BEFORE_SCALES]
    tuned = run_experiment(planner, tuning, TUNING_SEEDS, out / "tuning", identity, command, progress=progress)
    best = max(tuned["settings"], key=lambda s: s["normalized"]["mean"])["guidance_scale"]

    arms, comparisons = [], []
    for k in (8, 4):
        arms += [
            Arm(f"unguided-k{k}", k),
            Arm(f"after-k{k}", k, AFTER_SCALE),
            Arm(f"before-k{k}", k, best, planner_options=BEFORE),
            Arm(f"diffuser-recipe-k{k}", k, 0.1, planner_options=DIFFUSER_RECIPE),
            Arm(f"clip-actions-k{k}", k, planner_options=CLIP),
        ]
        comparisons += [
            Comparison(f"unguided-k{k}", f"after-k{k}"),
            Comparison(f"unguided-k{k}", f"before-k{k}"),
            Comparison(f"after-k{k}", f"before-k{k}"),
            Comparison(f"unguided-k{k}", f"diffuser-recipe-k{k}"),
            Comparison(f"unguided-k{k}", f"clip-actions-k{k}"),
        ]
    arms += [Arm(f"ddim1-k{k}", k, ddim_steps=1) for k in (1, 2, 4)]
    comparisons += [Comparison("unguided-k4", "ddim1-k4")]
    return run_experiment(planner, arms, EVAL_SEEDS, out, identity, command, comparisons, progress=progress)


STUDIES = {"sampler": Study(sampler_study, "sampler_study")}
"""Every study by name, with the folder under ``diffusion_rl/assets/`` that ships its results."""


def run_study(name: str, out_dir: str | os.PathLike | None = None, command: str = "", progress: bool = True) -> dict:
    """Run the study ``name`` into ``out_dir`` (default: its shipped folder)."""
    out = Path(out_dir) if out_dir is not None else study_folder(name)
    return STUDIES[name].run(out, command=command, progress=progress)


def study_folder(name: str) -> Path:
    """Where the study ``name`` ships its results."""
    if name not in STUDIES:
        raise ValueError(f"Unknown study {name!r}; choose from {sorted(STUDIES)}.")
    return Path(__file__).parent / "assets" / STUDIES[name].folder


def load_study(name: str, part: str = "") -> tuple[list[dict], dict]:
    """A shipped study's episode rows and summary (``part="tuning"``: its tuning stage), SHA-256 checked."""
    import json

    folder = study_folder(name) / part
    rows = load_rows(folder)
    return rows, json.loads((folder / "summary.json").read_text())
