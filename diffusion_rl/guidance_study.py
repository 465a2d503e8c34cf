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
torso height h*, each scored on the planned states (:mod:`diffusion_rl.objectives`). They steer two planners
(:data:`OBJECTIVE_DATA`): the medium-expert one, whose data walk stably only at the expert's speed, and one
trained on the ``speeds`` recipe's data, where a speed policy walks at a target drawn per episode.

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

__all__ = [
    "GUIDANCE_DATA",
    "METHODS",
    "OBJECTIVE_DATA",
    "GuidanceData",
    "ObjectiveData",
    "behaviour_policies",
    "choose_best",
    "choose_objective_steering",
    "guidance_arms",
    "guidance_study",
    "objective_arms",
    "objective_data",
    "objective_tuning_arms",
    "speed_arm",
]

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

OBJECTIVE_WINDOW = 1
OBJECTIVE_SAMPLES = 16
"""Best-of-N's N for the objectives, as for return steering's middle setting."""


@dataclass(frozen=True)
class Steering:
    """How a test-time objective steers a planner: one of the study's ``method`` values and its scale."""

    method: str
    """``best-of-n`` (keep the plan the objective rates highest), ``gradient`` (a step up its gradient after each
    reverse step) or ``inpainting`` (write the target into every intermediate plan)."""
    scale: float | None = None
    """N for best-of-n, kappa for gradient, None for inpainting."""

    def __post_init__(self):
        if self.method not in ("best-of-n", "gradient", "inpainting"):
            raise ValueError(f"Unknown steering method {self.method!r}; choose best-of-n, gradient or inpainting.")

    @property
    def short(self) -> str:
        """The arm-name fragment: ``best-of-16``, ``gradient1``, ``inpainting``."""
        return {"best-of-n": f"best-of-{self.scale}", "gradient": f"gradient{self.scale:g}" if self.scale is not None else "",
                "inpainting": "inpainting"}[self.method]

    def arm_options(self, objective: tuple[str, float]) -> dict:
        """The :class:`~diffusion_rl.experiment.Arm` fields that steer toward ``objective`` = (name, target)."""
        if self.method == "inpainting":
            return {"planner_options": (("inpaint", objective),)}
        if self.method == "gradient":
            return {"guidance_scale": float(self.scale), "planner_options": (("objective", objective),)}
        return {"n_samples": int(self.scale), "planner_options": (("objective", objective),)}


OBJECTIVE_STEERING = (Steering("best-of-n", OBJECTIVE_SAMPLES), Steering("gradient", 1.0), Steering("gradient", 3.0),
                      Steering("inpainting"))
"""The ways of steering by an objective that the tuning stage tries (on a planner with tuning speeds)."""


@dataclass(frozen=True)
class ObjectiveData:
    """A planner that test-time objectives steer: its data, the targets asked of it, and the way it is steered."""

    dataset_id: str
    planner: str
    short: str
    speed_targets: tuple[float, ...]
    """Target speeds v* (m/s) across the data's range of per-episode mean speeds."""
    height_targets: tuple[float, ...] = ()
    """Target torso heights h* (m)."""
    steering: Steering = Steering("best-of-n", OBJECTIVE_SAMPLES)
    tuning_speeds: tuple[float, ...] = ()
    """Targets at which the tuning stage tries every way in ``tried`` (empty: none tried in the study)."""
    tried: tuple[Steering, ...] = OBJECTIVE_STEERING
    """The ways of steering the tuning stage tries."""


OBJECTIVE_DATA = (
    ObjectiveData("walker2d/local-medium-expert-v0", "walker2d-h8-medium-expert", "mexpert", (1.0, 1.5, 2.0, 2.5, 3.0, 3.5),
                  (1.0, 1.1, 1.2)),
    ObjectiveData("walker2d/local-speeds-v0", "walker2d-h8-speeds", "speeds", (1.7, 1.9, 2.1, 2.3, 2.5),
                  steering=Steering("gradient", 3.0), tuning_speeds=(1.7, 2.1, 2.5)),
)
"""The planners the objectives steer. Medium-expert's targets span its data's per-episode mean speeds (5-95%: 1.1-3.4
m/s), and it is steered by best-of-16 selection: before the study, on the tuning seeds (10 episodes at v* = 1.5 and 2.5
m/s), selection missed the target by 0.3 m/s on average and inpainting by 0.4, and both fell in most episodes; with the
value network in the loop the walker kept the expert's gait at about 3 m/s whatever the target (the chapter lists each
trial as an ``evaluate`` command). The torso heights are aimed below the data's usual 1.2-1.3 m. The speeds data's
episodes walk at 1.5 to 2.7 m/s (5-95%: 1.63-2.63), none falling, and its five targets span that range; it is steered
the way the tuning stage chooses at three of them (:func:`choose_objective_steering`)."""


def _labels(data, method: str, scale, speed=None, height=None) -> tuple:
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


def _objective_arm(data: ObjectiveData, steering: Steering, name: str, objective: tuple[str, float], measure: str) -> Arm:
    speed, height = (objective[1], None) if objective[0] == "speed" else (None, objective[1])
    return Arm(f"{data.short}-{name}", OBJECTIVE_WINDOW, ddim_steps=DDIM_STEPS, planner=data.planner, measures=(measure,),
               labels=_labels(data, steering.method, steering.scale, speed=speed, height=height), **steering.arm_options(objective))


def speed_arm(data: ObjectiveData, target: float) -> Arm:
    """The study's arm that steers ``data``'s planner, its way, toward ``target`` m/s."""
    return _objective_arm(data, data.steering, f"speed{target:g}", ("speed", target), "mean_speed")


def objective_data(planner: str) -> ObjectiveData:
    """The entry of :data:`OBJECTIVE_DATA` whose planner is ``planner``."""
    for data in OBJECTIVE_DATA:
        if data.planner == planner:
            return data
    raise ValueError(f"No planner {planner!r} is steered by objectives; choose from {', '.join(d.planner for d in OBJECTIVE_DATA)}.")


def objective_arms(data: ObjectiveData) -> list[Arm]:
    """Each target speed and target height, steered the planner's way."""
    return ([speed_arm(data, v) for v in data.speed_targets]
            + [_objective_arm(data, data.steering, f"height{h:g}", ("height", h), "mean_height") for h in data.height_targets])


def objective_tuning_arms(data: ObjectiveData) -> list[Arm]:
    """Every way of steering the planner's data tries, at each of its tuning speeds (none without them)."""
    return [_objective_arm(data, s, f"{s.short}-speed{v:g}", ("speed", v), "mean_speed") for s in data.tried for v in data.tuning_speeds]


def choose_objective_steering(summary: dict, data: ObjectiveData) -> dict:
    """The way of steering with the fewest falls over the tuning speeds, then the smallest mean |achieved - target| speed."""
    settings = {s["name"]: s for s in summary["settings"]}
    scores = []
    for s in data.tried:
        tried = [settings[f"{data.short}-{s.short}-speed{v:g}"] for v in data.tuning_speeds]
        falls = sum(t["falls"] for t in tried)
        error = float(np.mean([abs(t["mean_speed"]["mean"] - t["labels"]["target_speed"]) for t in tried]))
        scores.append((falls, error, s))
    falls, error, best = min(scores, key=lambda x: (x[0], x[1]))
    return {"method": best.method, "scale": best.scale, "falls": falls, "mean_abs_error": round(error, 4)}


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
    objectives: Sequence[ObjectiveData] = OBJECTIVE_DATA,
) -> dict | None:
    """Every steering arm on the tuning seeds, then with the objectives on the evaluation seeds, the tuning-best against unguided.

    ``objectives``: the planners the test-time objectives steer. Those with tuning speeds try each way of steering
    on the tuning seeds, and the study checks that their evaluation runs the choice (:func:`choose_objective_steering`).

    ``part = (i, n)``: this process's share of both stages (see :func:`~diffusion_rl.experiment.run_experiment`);
    rerun without it to write the results. ``behaviour``: each mixed set's best behaviour policy's data set (by label).
    """
    reference = "walker2d-h8"  # scores are normalized by the expert data's mean return, as everywhere in the book
    steering = guidance_arms(data) + [a for d in objectives for a in objective_tuning_arms(d)]
    arms = [a for a in steering if dict(a.labels)["target_speed"] is None] + [a for d in objectives for a in objective_arms(d)]
    planner, identity = load(reference)
    planners = {name: load(name) for name in dict.fromkeys(a.planner for a in steering + arms)}
    out = Path(out_dir)
    tuned = run_experiment(planner, steering, tuning_seeds, out / "tuning", identity, command, max_steps=max_steps,
                           progress=progress, planners={a.planner: planners[a.planner] for a in steering}, part=part)
    if part is not None:
        return run_experiment(planner, arms, seeds, out, identity, command, max_steps=max_steps, progress=progress,
                              planners={a.planner: planners[a.planner] for a in arms}, part=part)
    best = choose_best(tuned, data)
    chosen = {d.dataset_id: choose_objective_steering(tuned, d) for d in objectives if d.tuning_speeds}
    for d in objectives:
        if d.tuning_speeds and (chosen[d.dataset_id]["method"], chosen[d.dataset_id]["scale"]) != (d.steering.method, d.steering.scale):
            raise ValueError(f"The tuning stage chose {chosen[d.dataset_id]} to steer {d.planner}, but it is set to {d.steering}: "
                             "set its steering to the choice (the evaluation must run the tuning seeds' choice).")
    comparisons = [Comparison(f"{group}-unguided", choice["setting"]) for group, choice in best.items()]
    notes = {"tuning": "tuning/summary.json", "best": best,
             "rule": "per data set and window, the steering setting with the highest mean score on the tuning seeds",
             "data": {d: data_profile(d) for d in dict.fromkeys([d.dataset_id for d in data] + [d.dataset_id for d in objectives])},
             "behaviour_policy": behaviour_policies(references(planner)["data_mean_return"], behaviour)}
    if chosen:
        notes["objective_steering"] = chosen
        notes["objective_rule"] = ("per planner, the way of steering with the fewest falls at the tuning speeds, then the "
                                   "smallest mean absolute speed error")
    return run_experiment(planner, arms, seeds, out, identity, command, comparisons, max_steps, progress, notes=notes,
                          planners=planners)
