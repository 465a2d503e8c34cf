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

``control``: what closing the loop costs (the chapter "Closing the loop"): score against denoiser
evaluations per environment step for

* fixed windows k = 1..8 with the 20-step sampler and with DDIM of S = 1, 2, 3, 5, 10 steps;
* warm starts of n = 1, 2, 4, 8 levels at k = 1, 2, 4;
* replanning when the real state leaves the plan (state error) and when the denoiser finds the rest of
  the plan implausible (likelihood), over a range of thresholds;
* actions from an inverse-dynamics model toward the plan's next state, against the plan's own actions.

The default controller (the cheapest setting that keeps 98% of the k = 1 score) is chosen on the
tuning seeds, among fixed windows with DDIM and the two adaptive triggers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diffusion_rl.experiment import Arm, Comparison, load_rows, run_experiment, shipped_planner

__all__ = ["STUDIES", "EVAL_SEEDS", "TUNING_SEEDS", "choose_default", "control_study", "load_study", "run_study", "sampler_study", "setting_name"]

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


STATE_ERROR_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
"""Replanning thresholds of the state-error controller (RMS distance in the data's standard deviations)."""
LIKELIHOOD_THRESHOLDS = (0.1, 0.2, 0.3, 0.5, 1.0)
"""Replanning thresholds of the likelihood controller (RMS reconstruction error, normalized units)."""
DDIM_STEPS = (1, 2, 3, 5, 10)
WARM_STARTS = (1, 2, 4, 8)
KEEP_SHARE = 0.98
"""The default controller must keep this share of the k = 1, 20-step score (on the tuning seeds)."""
INVERSE_DYNAMICS = "walker2d"


def setting_name(controller: str = "fixed", window: int | None = 1, threshold: float | None = None, ddim_steps: int | None = None,
                 warm_start: int | None = None, inverse_dynamics: str | None = None) -> str:
    """A setting's name, naming every option: e.g. ``fixed-k4-ddim2``, ``state-error-0.3-ddim1-invdyn``."""
    parts = [f"fixed-k{window}" if controller == "fixed" else f"{controller}-{threshold:g}"]
    parts.append(f"ddim{ddim_steps}" if ddim_steps is not None else "ddpm20")
    if warm_start is not None:
        parts.append(f"warm{warm_start}")
    if inverse_dynamics is not None:
        parts.append("invdyn")
    return "-".join(parts)


def _arm(controller: str = "fixed", window: int | None = 1, threshold: float | None = None, ddim_steps: int | None = None,
         warm_start: int | None = None, inverse_dynamics: str | None = None) -> Arm:
    name = setting_name(controller, window, threshold, ddim_steps, warm_start, inverse_dynamics)
    return Arm(name, window if controller == "fixed" else None, ddim_steps=ddim_steps, controller=controller, threshold=threshold,
               warm_start=warm_start, inverse_dynamics=inverse_dynamics)


def _candidates() -> list[Arm]:
    """The settings the default controller is chosen from: cheap fixed windows and both adaptive triggers."""
    arms = [_arm("fixed", k, ddim_steps=s) for s in (1, 2) for k in (2, 3, 4)]
    arms += [_arm("state-error", None, tau, ddim_steps=s) for s in (1, 2, 3) for tau in STATE_ERROR_THRESHOLDS]
    arms += [_arm("likelihood", None, tau, ddim_steps=s) for s in (1, 2) for tau in LIKELIHOOD_THRESHOLDS]
    return arms


def choose_default(summary: dict, reference: str = "fixed-k1-ddpm20", keep: float = KEEP_SHARE) -> dict:
    """The cheapest setting (denoiser evaluations per step; then the higher score) that keeps ``keep`` of the reference's score."""
    settings = {s["name"]: s for s in summary["settings"]}
    bar = keep * settings[reference]["normalized"]["mean"]
    ok = [s for s in summary["settings"] if s["name"] != reference and s["normalized"]["mean"] >= bar]
    if not ok:
        raise ValueError(f"No setting keeps {keep:.0%} of {reference}'s score.")
    best = min(ok, key=lambda s: (s["denoiser_evals_per_step"], -s["normalized"]["mean"]))
    return {"setting": best["name"], "controller": best["controller"], "window": best["window"], "threshold": best["threshold"],
            "ddim_steps": best["ddim_steps"], "warm_start": best["warm_start"], "bar": bar, "rule": (
                f"the fewest denoiser evaluations per env step among settings scoring >= {keep:.0%} of {reference} on the tuning seeds")}


def control_arms(horizon: int = 8) -> list[Arm]:
    """The control study's settings on the evaluation seeds, before the default's inverse-dynamics twin is added."""
    arms = [_arm("fixed", k) for k in range(1, horizon + 1)]
    arms += [_arm("fixed", k, ddim_steps=s) for s in DDIM_STEPS for k in range(1, horizon + 1)]
    arms += [_arm("fixed", k, warm_start=n) for k in (1, 2, 4) for n in WARM_STARTS]
    arms += [_arm("state-error", None, tau, ddim_steps=s) for s in (None, 1, 2, 3) for tau in STATE_ERROR_THRESHOLDS]
    arms += [_arm("likelihood", None, tau, ddim_steps=s) for s in (1, 2) for tau in LIKELIHOOD_THRESHOLDS]
    arms += [_arm("fixed", k, inverse_dynamics=INVERSE_DYNAMICS) for k in (1, 4, horizon)]
    return arms


def control_study(out_dir: str | os.PathLike, planner_name: str = "walker2d-h8", command: str = "", progress: bool = True) -> dict:
    """Score against compute for fixed windows, few-step samplers, warm starts, adaptive replanning and inverse dynamics."""
    from diffusion_rl.pretrained import ASSETS, read_sidecar
    from diffusion_rl.pretrained import INVERSE_DYNAMICS as SHIPPED

    planner, identity = shipped_planner(planner_name)
    identity = {**identity, "inverse_dynamics_sha256": read_sidecar(ASSETS / SHIPPED[INVERSE_DYNAMICS])["sha256"]}
    out = Path(out_dir)
    H = planner.horizon

    tuning = [_arm("fixed", 1)] + _candidates()
    tuned = run_experiment(planner, tuning, TUNING_SEEDS, out / "tuning", identity, command, progress=progress)
    default = choose_default(tuned)

    arms = control_arms(H)
    names = {a.name for a in arms}
    chosen = default["setting"]
    invdyn_default = setting_name(default["controller"], default["window"], default["threshold"], default["ddim_steps"],
                                  default["warm_start"], INVERSE_DYNAMICS)
    arms.append(_arm(default["controller"], default["window"], default["threshold"], default["ddim_steps"], default["warm_start"], INVERSE_DYNAMICS))

    comparisons = [Comparison("fixed-k1-ddpm20", chosen), Comparison(f"fixed-k{H}-ddpm20", chosen)]
    comparisons += [Comparison("fixed-k1-ddpm20", f"fixed-k1-ddim{s}") for s in DDIM_STEPS]
    comparisons += [Comparison(f"fixed-k{k}-ddpm20", f"fixed-k{k}-ddpm20-warm{n}") for k in (1, 2, 4) for n in WARM_STARTS]
    comparisons += [Comparison(f"fixed-k{k}-ddpm20", f"fixed-k{k}-ddpm20-invdyn") for k in (1, 4, H)]
    comparisons += [Comparison(chosen, invdyn_default)]
    assert chosen in names
    return run_experiment(planner, arms, EVAL_SEEDS, out, identity, command, comparisons, progress=progress,
                          notes={"default": default, "tuning": "tuning/summary.json"})


STUDIES = {"sampler": Study(sampler_study, "sampler_study"), "control": Study(control_study, "control_study")}
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
