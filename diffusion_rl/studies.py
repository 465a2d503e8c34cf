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

``guidance``: three ways to steer toward high return (gradient guidance, best-of-N selection, classifier-free
guidance on the return) on expert and mixed-quality data, and objectives chosen at test time
(:mod:`diffusion_rl.guidance_study`, the chapter "When guidance matters").

``push``: pushes on the torso (the chapter "Push the walker"): fall rate and normalized return against
push force for the SAC expert and planners (:data:`PUSH_AGENTS`), every agent on the same seeds and the
same pushes. The tuning seeds locate the forces where the expert falls in 20% and in half of its episodes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from diffusion_rl.disturbances import Disturbance
from diffusion_rl.experiment import (
    EVAL_SEEDS,
    EXPERT,
    TUNING_SEEDS,
    Arm,
    Comparison,
    load_rows,
    run_experiment,
    shipped_planner,
)
from diffusion_rl.guidance_study import guidance_study
from diffusion_rl.planner import Planner

__all__ = ["EVAL_SEEDS", "PUSH_AGENTS", "PUSH_FORCES", "PUSH_PAIRS", "STUDIES", "TUNING_SEEDS", "Agent", "choose_default", "choose_push_default", "control_study",
           "expert_forces", "load_study", "push_arms", "push_study", "run_study", "sampler_study", "setting_name"]


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


# ----------------------------------------------------------------------------- push the walker

PUSH_FORCES = (0.0, 100.0, 200.0, 300.0, 400.0)
"""Push forces in newtons; each push lasts 5 steps (40 ms) every 100 steps, :class:`Disturbance`'s defaults."""

PUSH = Disturbance()
"""The pushes' duration and interval (the forces come from :data:`PUSH_FORCES`): 5 steps every 100, the first at step 100."""

REFERENCE_PLANNER = "walker2d-h8"
"""The planner whose data set's mean return normalizes every agent's return (whichever planners act): one scale for all."""

DEFAULT = "default"
"""``Agent.planner`` for the shipped default: whatever ``pretrained.load()`` loads, run with its ``DEFAULT_CONTROL``."""


@dataclass(frozen=True)
class Agent:
    """One agent of the push study: the SAC expert, or a shipped planner run with one controller setting."""

    name: str
    """The ``agent`` column (and the start of its arms' names)."""
    planner: str | None = None
    """A shipped planner's name (``pretrained.PRETRAINED``); ``default``: the shipped default; None: the SAC expert."""
    controller: str = "fixed"
    """When to replan (:mod:`diffusion_rl.control`); ignored for ``default``, which brings its own."""
    window: int | None = 1
    """Executed window k of the fixed controller."""
    threshold: float | None = None
    """The adaptive controllers' threshold."""
    ddim_steps: int | None = None
    """DDIM steps per plan; None is the 20-step DDPM sampler."""
    warm_start: int | None = None
    """Re-noise the previous plan to this many levels instead of sampling from pure noise."""


PUSH_AGENTS = (
    Agent(EXPERT),
    Agent("default", DEFAULT),
    Agent("k1-ddpm20", "walker2d-h8", window=1),
    Agent("k2-ddim2", "walker2d-h8", window=2, ddim_steps=2),
    Agent("k4-ddim1", "walker2d-h8", window=4, ddim_steps=1),
    Agent("se0.2-ddim1", "walker2d-h8", controller="state-error", threshold=0.2, ddim_steps=1),
    Agent("dart-k1-ddim2", "walker2d-h8-dart", window=1, ddim_steps=2),
    Agent("dart-k2-ddim2", "walker2d-h8-dart", window=2, ddim_steps=2),
    Agent("dart-k8-ddpm20", "walker2d-h8-dart", window=8),
    Agent("dart-se0.2-ddim2", "walker2d-h8-dart", controller="state-error", threshold=0.2, ddim_steps=2),
    Agent("dppo-k8-ddpm20", "walker2d-h8-dppo", window=8),
    Agent("dart-push-k8-ddpm20", "walker2d-h8-dart-push", window=8),
    Agent("dart-push-k1-ddim2", "walker2d-h8-dart-push", window=1, ddim_steps=2),
)
"""The push study's agents. A new planner is one more line here, naming its shipped planner:
``Agent("dart-k1-ddpm20", "walker2d-h8-dart", window=1)``."""

PUSH_PAIRS = (("dart-k8-ddpm20", "dart-push-k8-ddpm20"), ("dart-k1-ddim2", "dart-push-k1-ddim2"),
              ("dart-k1-ddim2", "dart-se0.2-ddim2"))
"""Paired comparisons between planner agents at every force (baseline, treatment), besides each against the expert:
the DART planner before and after fine-tuning under pushes, at the window it was tuned for and at the default's; and
replanning every step against replanning when the walker leaves the plan (a push moves it off at once)."""


def default_planner() -> tuple[str, dict]:
    """The shipped default planner's name (what ``pretrained.load()`` loads with no argument) and its default controller."""
    from diffusion_rl import pretrained

    name = pretrained.DEFAULT_PLANNER
    return name, dict(pretrained.DEFAULT_CONTROL[name])


def push_arms(agents: Sequence[Agent], forces: Sequence[float], reference: str = REFERENCE_PLANNER,
              push: Disturbance = PUSH, pairs: Sequence[tuple[str, str]] = PUSH_PAIRS) -> tuple[list[Arm], list[Comparison]]:
    """One arm per (agent, force), named ``<agent>-push<force>``, and each planner's paired comparison with the expert at each
    force, and of each of ``pairs`` (baseline and treatment agents) whose agents are both there.

    Each arm meets ``push`` with its force; an arm's ``planner`` is None where the agent's planner is ``reference``
    (the run's own planner), else its name.
    """
    names = [a.name for a in agents]
    if len(set(names)) != len(names):
        raise ValueError(f"Agent names must be unique, got {names}.")
    forces = [float(f) for f in forces]
    if len(set(forces)) != len(forces) or not forces:
        raise ValueError(f"Give each push force once, got {forces}.")
    arms, comparisons = [], []
    for agent in agents:
        if agent.planner is None and agent.name != EXPERT:
            raise ValueError(f"Agent {agent.name!r} names no planner; only the agent {EXPERT!r} (the SAC expert) acts without one.")
        for force in forces:
            disturbance = replace(push, push_force=force)  # refuses a negative or non-finite force
            name = f"{agent.name}-push{force:g}"
            if agent.planner is None:
                arms.append(Arm(name, None, agent=EXPERT, disturbance=disturbance))
                continue
            planner, control = _agent_setting(agent)
            fixed = control["controller"] == "fixed"
            arms.append(Arm(name, control["window"] if fixed else None, ddim_steps=control["ddim_steps"], controller=control["controller"],
                            threshold=control["threshold"], warm_start=control["warm_start"], agent=agent.name,
                            planner=None if planner == reference else planner, disturbance=disturbance))
    if EXPERT in names:
        comparisons = [Comparison(f"{EXPERT}-push{f:g}", f"{a.name}-push{f:g}") for a in agents if a.name != EXPERT for f in forces]
    comparisons += [Comparison(f"{b}-push{f:g}", f"{t}-push{f:g}") for b, t in pairs if b in names and t in names for f in forces]
    return arms, comparisons


def _agent_setting(agent: Agent) -> tuple[str, dict]:
    """The planner and controller an agent runs (the shipped default's for ``default``)."""
    if agent.planner == DEFAULT:
        return default_planner()
    return agent.planner, {"controller": agent.controller, "window": agent.window, "threshold": agent.threshold,
                           "ddim_steps": agent.ddim_steps, "warm_start": agent.warm_start}


def choose_push_default(summary: dict, agents: Sequence[Agent] = PUSH_AGENTS, keep: float = 98.0) -> dict:
    """The most robust planner setting in a push study's summary: the fewest falls summed over the pushed forces, among
    agents whose undisturbed score is at least ``keep``% of the data's return; ties go to fewer denoiser evaluations per step."""
    candidates = []
    for agent in agents:
        if agent.planner is None:
            continue
        rows = [s for s in summary["settings"] if s.get("agent") == agent.name]
        calm = [s for s in rows if s["disturbance"]["push_force"] == 0]
        if not calm or calm[0]["normalized"]["mean"] < keep:
            continue
        falls = sum(s["falls"] for s in rows if s["disturbance"]["push_force"] > 0)
        candidates.append((falls, calm[0]["denoiser_evals_per_step"], agent.name))
    if not candidates:
        raise ValueError(f"No planner agent keeps {keep}% of the data's return undisturbed.")
    falls, evals, name = min(candidates)
    planner, control = _agent_setting(next(a for a in agents if a.name == name))
    return {"agent": name, "planner": planner, "control": control, "pushed_falls": falls, "denoiser_evals_per_step": evals,
            "rule": f"fewest falls over the pushed forces among agents scoring >= {keep:g}% undisturbed; ties: fewer evaluations per step"}


def expert_forces(summary: dict, low: float = 0.2, half: float = 0.5) -> dict:
    """From a push study's summary: the expert's fall rate per force, the largest force up to which it falls in at most
    ``low`` of its episodes, and the force where its fall rate is nearest ``half`` (the issue's two target forces)."""
    rates = {s["disturbance"]["push_force"]: s["fall_rate"]["mean"] for s in summary["settings"] if s.get("agent") == EXPERT}
    if not rates:
        raise ValueError("The summary has no expert arms.")
    forces = sorted(rates)
    below = None
    for f in forces:  # the force range where every force keeps the expert's falls at or below `low`
        if rates[f] > low:
            break
        below = f
    nearest = min(forces, key=lambda f: (abs(rates[f] - half), f))
    return {"expert_fall_rate": {f"{f:g}": rates[f] for f in forces}, f"up_to_{low:g}_falls": below, f"nearest_{half:g}_falls": nearest,
            "reaches_half": max(rates.values()) >= half,
            "rule": f"the largest force with every force up to it at <= {low:.0%} expert falls; the force with expert falls nearest {half:.0%}"}


def push_study(
    out_dir: str | os.PathLike,
    planner_name: str = REFERENCE_PLANNER,
    command: str = "",
    progress: bool = True,
    agents: Sequence[Agent] = PUSH_AGENTS,
    forces: Sequence[float] = PUSH_FORCES,
    seeds: Sequence[int] = EVAL_SEEDS,
    tuning_seeds: Sequence[int] = TUNING_SEEDS,
    max_steps: int = 1000,
    load: Callable[[str], tuple[Planner, dict]] = shipped_planner,
    push: Disturbance = PUSH,
) -> dict:
    """Fall rate and normalized return against push force for every agent, on the tuning seeds and then the evaluation seeds.

    ``load(name)`` gives a planner and its identity (default: the shipped planner, on the CPU); ``push`` the pushes'
    duration and interval. Fewer ``seeds`` and a smaller ``max_steps`` make a quick trial run (into another folder).
    """
    arms, comparisons = push_arms(agents, forces, planner_name, push)
    planner, identity = load(planner_name)
    planners = {name: load(name) for name in dict.fromkeys(a.planner for a in arms if a.planner is not None)}
    out = Path(out_dir)
    tuned = run_experiment(planner, arms, tuning_seeds, out / "tuning", identity, command, comparisons, max_steps, progress,
                           planners=planners)
    notes = {"tuning": "tuning/summary.json"}
    if any(a.name == EXPERT for a in agents):
        notes["expert_forces"] = expert_forces(tuned)  # chosen on the tuning seeds, so the evaluation does not pick its own targets
    if any(a.planner is not None for a in agents):
        notes["default"] = choose_push_default(tuned, agents)  # the robust default, chosen on the tuning seeds too
    return run_experiment(planner, arms, seeds, out, identity, command, comparisons, max_steps, progress, notes=notes,
                          planners=planners)


STUDIES = {"sampler": Study(sampler_study, "sampler_study"), "control": Study(control_study, "control_study"),
           "push": Study(push_study, "push_study"), "guidance": Study(guidance_study, "guidance_study")}
"""Every study by name, with the folder under ``diffusion_rl/assets/`` that ships its results."""


SHARED_STUDIES = frozenset({"guidance"})
"""Studies whose work several processes can share (``study NAME --part i/n``)."""


def run_study(name: str, out_dir: str | os.PathLike | None = None, command: str = "", progress: bool = True,
              part: tuple[int, int] | None = None) -> dict | None:
    """Run the study ``name`` into ``out_dir`` (default: its shipped folder); ``part``: one share of its work (None returned)."""
    out = Path(out_dir) if out_dir is not None else study_folder(name)
    if part is None:
        return STUDIES[name].run(out, command=command, progress=progress)
    if name not in SHARED_STUDIES:
        raise ValueError(f"Only the {', '.join(sorted(SHARED_STUDIES))} study can be run in parts; run the {name} study whole.")
    return STUDIES[name].run(out, command=command, progress=progress, part=part)


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
