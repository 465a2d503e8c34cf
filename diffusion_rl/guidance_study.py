"""The guidance study (chapter "When guidance matters"): ``python -m diffusion_rl study guidance``.

Three ways to steer a diffusion planner toward high return, on expert data and on data of mixed
quality, every one on the same seeds:

* ``gradient``: classifier guidance, a step up the value network's gradient after each reverse step
  (the book's guidance chapter); its scale is kappa;
* ``best-of-n``: draw N plans and keep the one the value network rates highest, no gradients
  (Lu et al. 2025); its scale is N;
* ``classifier-free``: a denoiser trained with the return as a dropped-out condition, sampled toward
  a high return with weight w (Decision Diffuser, Ajay et al. 2023); its scale is w.

And two objectives chosen at test time, with no retraining: a target forward speed v* and a target
torso height h*, each scored on the planned states (:mod:`diffusion_rl.objectives`) and steered by best-of-16 selection.

Every steering arm runs on the tuning seeds first; the best steering setting per data set and window is chosen
there and compared with the unguided planner on the evaluation seeds 10000-10029, with the whole grid
shown beside it. The episode rows carry ``dataset, method, scale, target_speed, target_height`` and,
for the objective arms, the achieved ``mean_speed`` or ``mean_height``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffusion_rl.experiment import EVAL_SEEDS, Arm, Comparison, references, run_experiment, shipped_planner
from diffusion_rl.planner import Planner

__all__ = ["GUIDANCE_DATA", "METHODS", "GuidanceData", "choose_best", "guidance_arms", "behaviour_policies", "guidance_study", "objective_arms"]

METHODS = ("unguided", "gradient", "best-of-n", "classifier-free")
"""The ``method`` column's values for the return-steering arms; objective arms are ``gradient``."""

TUNING_SEEDS = list(range(20_000, 20_010))
"""The tuning stage's seeds: 10 episodes per setting (the grid is large; the evaluation keeps 30)."""


@dataclass(frozen=True)
class GuidanceData:
    """One data set of the study and the planners trained on it."""

    dataset_id: str
    """The Minari id (the ``dataset`` column)."""
    planner: str
    """The shipped planner (denoiser and value network) trained on it."""
    conditional: str | None
    """The shipped return-conditioned denoiser trained on it (classifier-free guidance); None: not trained."""
    gradient_scales: tuple[float, ...]
    """Guidance scales kappa (each value network has its own units: the return it predicts)."""
    short: str
    """A short name for the arms' names."""
    cf_target: float = 1.0
    """Classifier-free guidance's condition (the discounted return-to-go over the model's ``return_scale``): about the
    99th percentile of the data's own windows, high but not beyond what the data holds (Decision Diffuser's practice)."""


GUIDANCE_DATA = (
    GuidanceData("walker2d/local-expert-v0", "walker2d-h8", None, (0.1, 0.3, 1.0), "expert"),
    GuidanceData("walker2d/local-medium-replay-v0", "walker2d-h8-medium-replay", "walker2d-h8-medium-replay-cf",
                 (0.01, 0.03, 0.1), "mreplay", cf_target=0.8),
    GuidanceData("walker2d/local-medium-expert-v0", "walker2d-h8-medium-expert", "walker2d-h8-medium-expert-cf",
                 (0.01, 0.03, 0.1), "mexpert", cf_target=1.1),
)
"""The study's data sets. The expert planner's value network predicts the return inside its 8-step window
(the study's choice); the mixed sets' predict the discounted return to the episode's end (Diffuser's)."""

WINDOWS = (1, 4)
SAMPLES = (4, 16, 64)
WEIGHTS = (1.0, 2.0, 4.0)
"""Classifier-free guidance weights w: 1 is the plain conditional model, more extrapolates past it."""
DDIM_STEPS = 5
"""Every arm samples with 5 DDIM steps, guided in the first 3 (Diffuser's t_stopgrad = 2): best-of-64 at k = 1 costs
64 plans per env step. On 10 tuning seeds the unguided medium-replay planner scored the same with 5 DDIM steps as with
20 DDPM steps (6.3% at k = 1)."""

SPEED_DATA = "walker2d-h8-medium-expert"
"""The objectives run on the medium-expert planner: its data hold the widest range of speeds (about 1.1 to 3.4 m/s)."""
SPEED_TARGETS = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5)
"""Target speeds v* (m/s) across the medium-expert data's range of per-episode mean speeds (5-95%: 1.1-3.4)."""
HEIGHT_TARGETS = (1.0, 1.1, 1.2)
"""Target torso heights h* (m): the data's walkers carry the torso at about 1.2-1.3 m; none aims lower."""
OBJECTIVE_SAMPLES = 16
"""Objectives steer by best-of-16 selection. On the tuning seeds (10 episodes at v* = 1.5 and 2.5 m/s) it missed the
target by 0.3 m/s on average, writing the target into the plan (inpainting) by 0.4, and both fell in most episodes; with
the value network in the loop (its gradient, selection by value, or value plus 30 times the objective) the walker kept
the expert's gait at about 3 m/s whatever the target. The chapter lists each trial as an ``evaluate`` command."""
OBJECTIVE_WINDOW = 1


def _labels(data: GuidanceData, method: str, scale, speed=None, height=None) -> tuple:
    return (("dataset", data.dataset_id), ("method", method), ("scale", scale), ("target_speed", speed), ("target_height", height))


def guidance_arms(data: Sequence[GuidanceData] = GUIDANCE_DATA, windows: Sequence[int] = WINDOWS) -> list[Arm]:
    """Unguided, each steering method over its scale, on each data set and window."""
    arms = []
    for d in data:
        planner = d.planner
        for k in windows:
            base = f"{d.short}-k{k}"
            arms.append(Arm(f"{base}-unguided", k, ddim_steps=DDIM_STEPS, planner=planner, labels=_labels(d, "unguided", None)))
            arms += [Arm(f"{base}-gradient{s:g}", k, s, ddim_steps=DDIM_STEPS, planner=planner, labels=_labels(d, "gradient", s))
                     for s in d.gradient_scales]
            arms += [Arm(f"{base}-best-of-{n}", k, ddim_steps=DDIM_STEPS, planner=planner, n_samples=n,
                         labels=_labels(d, "best-of-n", n)) for n in SAMPLES]
            if d.conditional is not None:
                arms += [Arm(f"{base}-free{w:g}", k, ddim_steps=DDIM_STEPS, planner=d.conditional,
                             planner_options=(("classifier_free", (d.cf_target, w)),), labels=_labels(d, "classifier-free", w))
                         for w in WEIGHTS]
    return arms


def objective_arms(data: GuidanceData) -> list[Arm]:
    """A target speed and a target height, each by best-of-N selection on the objective, on one planner."""
    def arm(name, objective, measure, speed=None, height=None):
        return Arm(f"{data.short}-{name}", OBJECTIVE_WINDOW, ddim_steps=DDIM_STEPS, planner=data.planner, n_samples=OBJECTIVE_SAMPLES,
                   planner_options=(("objective", objective),), measures=(measure,),
                   labels=_labels(data, "best-of-n", OBJECTIVE_SAMPLES, speed=speed, height=height))

    return ([arm(f"speed{v:g}", ("speed", v), "mean_speed", speed=v) for v in SPEED_TARGETS]
            + [arm(f"height{h:g}", ("height", h), "mean_height", height=h) for h in HEIGHT_TARGETS])


def choose_best(summary: dict, data: Sequence[GuidanceData] = GUIDANCE_DATA, windows: Sequence[int] = WINDOWS) -> dict:
    """Per data set and window, the steering arm with the highest mean score on the tuning seeds."""
    settings = summary["settings"]
    best = {}
    for d in data:
        for k in windows:
            steered = [s for s in settings if s["name"].startswith(f"{d.short}-k{k}-") and not s["name"].endswith("-unguided")]
            top = max(steered, key=lambda s: s["normalized"]["mean"])
            best[f"{d.short}-k{k}"] = {"setting": top["name"], "normalized": top["normalized"]["mean"]}
    return best


def data_profile(dataset_id: str) -> dict:
    """What the chapter shows of a data set without loading it: size, falls, and each episode's return and mean speed."""
    from diffusion_rl.data import load_episodes
    from diffusion_rl.objectives import SPEED_INDEX

    episodes = load_episodes(dataset_id)
    return {"episodes": len(episodes), "steps": int(sum(len(e) for e in episodes)), "falls": int(sum(e.terminated for e in episodes)),
            "returns": [round(float(e.rewards.sum()), 1) for e in episodes], "fell": [bool(e.terminated) for e in episodes],
            "mean_speeds": [round(float(e.observations[1:, SPEED_INDEX].mean()), 3) for e in episodes]}


BEHAVIOUR_DATA = {"medium-replay": "walker2d/local-medium-v0", "medium-expert": "walker2d/local-expert-v0"}
"""Each mixed set's best behaviour policy, by the data set of its own episodes: the medium policy made medium-replay's
best episodes, the expert medium-expert's."""


def behaviour_policies(reference_return: float, behaviour: dict[str, str] = BEHAVIOUR_DATA) -> dict:
    """Each mixed set's best behaviour policy's mean return, in % of the expert data's (the target steering must reach)."""
    from diffusion_rl.data import load_episodes

    return {label: round(100 * float(np.mean([e.rewards.sum() for e in load_episodes(dataset)])) / reference_return, 2)
            for label, dataset in behaviour.items()}


def guidance_study(
    out_dir: str | os.PathLike,
    command: str = "",
    progress: bool = True,
    data: Sequence[GuidanceData] = GUIDANCE_DATA,
    seeds: Sequence[int] = EVAL_SEEDS,
    tuning_seeds: Sequence[int] = TUNING_SEEDS,
    max_steps: int = 1000,
    load: Callable[[str], tuple[Planner, dict]] = shipped_planner,
    part: tuple[int, int] | None = None,
    behaviour: dict[str, str] = BEHAVIOUR_DATA,
) -> dict | None:
    """Every steering arm on the tuning seeds, then with the objectives on the evaluation seeds, the tuning-best against unguided.

    The objective arms skip the tuning stage: nothing is chosen among them (their method was chosen on the tuning
    seeds beforehand, see :data:`OBJECTIVE_SAMPLES`).

    ``part = (i, n)``: this process's share of both stages (see :func:`~diffusion_rl.experiment.run_experiment`);
    rerun without it to write the results. ``behaviour``: each mixed set's best behaviour policy's data set (by label).
    """
    reference = "walker2d-h8"  # scores are normalized by the expert data's mean return, as everywhere in the book
    steering = guidance_arms(data)
    arms = steering + [a for d in data if d.planner == SPEED_DATA for a in objective_arms(d)]
    planner, identity = load(reference)
    planners = {name: load(name) for name in dict.fromkeys(a.planner for a in arms)}
    out = Path(out_dir)
    tuned = run_experiment(planner, steering, tuning_seeds, out / "tuning", identity, command, max_steps=max_steps,
                           progress=progress, planners={a.planner: planners[a.planner] for a in steering}, part=part)
    if part is not None:
        return run_experiment(planner, arms, seeds, out, identity, command, max_steps=max_steps, progress=progress,
                              planners=planners, part=part)
    best = choose_best(tuned, data)
    comparisons = [Comparison(f"{group}-unguided", choice["setting"]) for group, choice in best.items()]
    notes = {"tuning": "tuning/summary.json", "best": best,
             "rule": "per data set and window, the steering setting with the highest mean score on the tuning seeds",
             "data": {d.dataset_id: data_profile(d.dataset_id) for d in data},
             "behaviour_policy": behaviour_policies(references(planner)["data_mean_return"], behaviour)}
    return run_experiment(planner, arms, seeds, out, identity, command, comparisons, max_steps, progress, notes=notes,
                          planners=planners)
