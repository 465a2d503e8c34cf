"""The shared experiment runner: arms x seeds -> per-episode rows -> summary with intervals -> SHA-256 record.

A study is a list of :class:`Arm` (one setting each: a window, a guidance scale, sampler options)
run on the same reset seeds, so any two arms can be compared episode by episode. The runner
writes, into one folder:

* ``episodes.csv``: one row per (arm, seed): return, normalized score, fall, length, plans made,
  denoiser evaluations, and the plan-versus-reality drift and the share of planned actions the
  environment had to clip;
* ``summary.json``: per arm, means with 95% bootstrap intervals and fall rates with Wilson
  intervals; per comparison, paired differences on the same seeds;
* ``record.json``: the command, the seeds, the planner's SHA-256s, the arms, and the SHA-256 of
  each result file. Nothing in these three files depends on the clock or the machine, so the same
  command rebuilds them byte for byte.

An arm may run under a :class:`~diffusion_rl.disturbances.Disturbance` (pushes, shifted dynamics),
with another planner than the run's own (``planners``), or be the SAC expert itself (``agent="expert"``,
its deterministic actor through :func:`diffusion_rl.expert.policy_episodes`), so one study compares
every agent on the same seeds and the same pushes. Such studies get ``agent`` and the disturbance's
columns in ``episodes.csv``; studies without them keep their original columns, byte for byte.

Each arm's rows are kept (``.rows/<arm>.json``, written atomically) as soon as the arm finishes,
so a study killed mid-way resumes from its last finished arm.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from diffusion_rl.analysis import bootstrap_ci, paired_difference, plan_drift, wilson_ci
from diffusion_rl.checkpoint import atomic_write_json, atomic_write_text, sha256_file
from diffusion_rl.control import Controller, controller_from_name
from diffusion_rl.disturbances import Disturbance
from diffusion_rl.planner import EpisodeResult, Planner, rollout

__all__ = ["EVAL_SEEDS", "EXPERT", "TUNING_SEEDS", "Arm", "Comparison", "expert_episodes", "load_rows", "mean_ci", "references", "run_experiment", "scores",
           "shipped_planner"]

EVAL_SEEDS = list(range(10_000, 10_030))
"""The studies' evaluation seeds: 30 episodes per setting."""
TUNING_SEEDS = list(range(20_000, 20_030))
"""Where a study chooses its settings before it runs them on :data:`EVAL_SEEDS`."""

D4RL_WALKER2D = {"random": 1.629008, "expert": 4592.3}
"""D4RL's walker2d reference returns (d4rl/infos.py), for scores comparable with published tables."""

COLUMNS = ("setting", "controller", "window", "guidance_scale", "seed", "return", "normalized", "fell", "diverged", "env_steps",
           "plans", "denoiser_evals", "window_end_drift", "clipped_action_share")
DISTURBANCE_COLUMNS = tuple(f.name for f in fields(Disturbance))
"""Added (with ``agent``) to the rows of studies whose arms name an agent or a disturbance."""

MEASURES = ("mean_speed", "mean_height")
"""What an episode measures besides its return (:class:`~diffusion_rl.planner.EpisodeResult`), for test-time objectives."""

EXPERT = "expert"
"""The ``agent`` that is the shipped SAC expert (deterministic) instead of a planner."""


@dataclass(frozen=True)
class Arm:
    """One setting of a study: how the planner is run for every seed."""

    name: str
    """Unique label, the ``setting`` column."""
    window: int | None = 1
    """Executed window k of the fixed controller: actions run per plan."""
    guidance_scale: float | None = None
    """Classifier-guidance scale kappa; None is unguided."""
    ddim_steps: int | None = None
    """DDIM steps per plan; None is the 20-step DDPM sampler."""
    planner_options: tuple[tuple[str, object], ...] = ()
    """(name, value) pairs for :meth:`Planner.with_options`, e.g. (("guide_placement", "before"),)."""
    controller: str = "fixed"
    """When to replan (:mod:`diffusion_rl.control`): ``fixed`` (every ``window`` steps), ``state-error`` or ``likelihood``."""
    threshold: float | None = None
    """The adaptive controllers' threshold tau."""
    warm_start: int | None = None
    """Re-noise the previous plan to this many levels instead of sampling from pure noise."""
    inverse_dynamics: str | None = None
    """Take actions from this shipped inverse-dynamics model (toward the plan's next state) instead of the plan's."""
    agent: str | None = None
    """The ``agent`` column: ``expert`` is the SAC expert (none of the planner's options apply); any other name labels a planner."""
    planner: str | None = None
    """Which of ``run_experiment``'s ``planners`` acts; None is the run's own planner."""
    disturbance: Disturbance | None = None
    """Pushes or shifted dynamics that every episode of this arm meets (seeded by the episode's seed); None: none."""
    n_samples: int = 1
    """Plans drawn per replanning; more than one keeps the one the value network (or objective) rates highest (best-of-N)."""
    labels: tuple[tuple[str, object], ...] = ()
    """(column, value) pairs: a study's own columns in front of each row (for example dataset and method); None writes an empty cell."""
    measures: tuple[str, ...] = ()
    """Which of :data:`MEASURES` this arm's rows fill (a study with labels has every measure's column; the others stay empty)."""

    @property
    def is_expert(self) -> bool:
        """Whether the SAC expert acts instead of a planner."""
        return self.agent == EXPERT

    def make_controller(self) -> Controller:
        """A fresh controller for one episode."""
        if self.controller == "fixed":
            return controller_from_name("fixed", window=self.window, threshold=self.threshold)
        return controller_from_name(self.controller, threshold=self.threshold)

    def batch_key(self) -> tuple:
        """Arms with equal keys share one batched rollout."""
        return (self.ddim_steps, self.warm_start, self.planner_options, self.inverse_dynamics, self.planner, self.disturbance,
                self.n_samples)


@dataclass(frozen=True)
class Comparison:
    """A paired comparison in the summary: ``treatment`` minus ``baseline`` on the same seeds."""

    baseline: str
    treatment: str


@dataclass
class _Spec:
    arms: list[dict]
    seeds: list[int]
    planner: dict
    max_steps: int
    comparisons: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- scores


def references(planner: Planner) -> dict:
    """The normalizers: the data's mean return and reward per step, and random/expert returns."""
    from diffusion_rl.evaluation import dataset_reference

    data = planner.meta.get("reference") or planner.meta.get("dataset") or dataset_reference(planner.meta["config"]["dataset_id"])
    return {
        "dataset_id": data["dataset_id"], "data_mean_return": data["mean_return"], "data_reward_per_step": data["reward_per_step"],
        "random_return": data.get("ref_min_score"), "expert_return": data.get("ref_max_score"),
        "d4rl_random_return": D4RL_WALKER2D["random"], "d4rl_expert_return": D4RL_WALKER2D["expert"],
    }


def scores(ret: float, length: int, ref: dict) -> dict:
    """One return in every normalization the book shows."""
    out = {
        "normalized": 100 * ret / ref["data_mean_return"],
        "value_rate": (ret / max(length, 1)) / ref["data_reward_per_step"],
        "d4rl_normalized_d4rl_refs": 100 * (ret - ref["d4rl_random_return"]) / (ref["d4rl_expert_return"] - ref["d4rl_random_return"]),
    }
    if ref["random_return"] is not None and ref["expert_return"] is not None:
        out["d4rl_normalized"] = 100 * (ret - ref["random_return"]) / (ref["expert_return"] - ref["random_return"])
    return out


def mean_ci(values: Sequence[float]) -> dict:
    """Mean of the finite values with a 95% bootstrap interval (none for fewer than two values)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "ci95": [None, None]}
    return {"mean": float(np.mean(values)), "ci95": list(bootstrap_ci(values)) if len(values) > 1 else [None, None]}


# ----------------------------------------------------------------------------- running


def load_inverse_dynamics(name: str):
    """A shipped inverse-dynamics model (imported late: the runner sits below the package's loaders)."""
    from diffusion_rl.pretrained import load_inverse_dynamics as load

    return load(name)


def shipped_planner(name: str) -> tuple[Planner, dict]:
    """A shipped planner on the CPU (where results are bit-reproducible) and its identity (its files' SHA-256s)."""
    from diffusion_rl import pretrained

    planner = pretrained.load(name, device="cpu")
    sha = {part: pretrained.read_sidecar(pretrained.asset_path(name, part))["sha256"] for part in pretrained.PRETRAINED[name]}
    return planner, {"source": {"planner": name}, "sha256": sha}


def run_experiment(
    planner: Planner,
    arms: Sequence[Arm],
    seeds: Sequence[int],
    out_dir: str | os.PathLike,
    planner_identity: dict,
    command: str = "",
    comparisons: Sequence[Comparison] = (),
    max_steps: int = 1000,
    progress: bool = True,
    notes: dict | None = None,
    planners: Mapping[str, tuple[Planner, dict]] | None = None,
    part: tuple[int, int] | None = None,
) -> dict | None:
    """Run every arm on every seed into ``out_dir`` (resuming finished arms) and write the result files; returns the summary.

    ``part = (i, n)``: run only the i-th of n shares of the work (1-based) and write no result files (returns
    None), so n processes can share a study; a last call without ``part`` finds every arm's rows and writes them.

    ``notes``: what the study decided before this run (for example a setting chosen on tuning seeds), kept in the summary.
    ``planners``: further planners by name, each with its identity, for arms that name one (``Arm.planner``);
    every row is normalized by ``planner``'s references, so all agents share one scale.
    """
    arms, seeds = list(arms), [int(s) for s in seeds]
    planners = dict(planners or {})
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"Arm names must be unique, got {names}.")
    for c in comparisons:
        if c.baseline not in names or c.treatment not in names:
            raise ValueError(f"Comparison {c} names an arm that the study does not have ({names}).")
    _check_experts(arms)
    _label_columns(arms)
    for a in arms:
        if unknown := set(a.measures) - set(MEASURES):
            raise ValueError(f"Arm {a.name!r} asks for unknown measures {sorted(unknown)}; choose from {MEASURES}.")
    for a in arms:
        if a.planner is not None and a.planner not in planners:
            raise ValueError(f"Arm {a.name!r} names planner {a.planner!r}, which the run was not given ({sorted(planners)}).")
        if a.disturbance is not None and not isinstance(a.disturbance, Disturbance):
            raise ValueError(f"Arm {a.name!r}: disturbance must be a Disturbance, got {a.disturbance!r}.")
    acting = {key: planners[key][0] if key is not None else planner for key in {a.planner for a in arms if not a.is_expert}}
    # Validates the planner options first, and then the controllers.
    variants = {a.batch_key(): acting[a.planner].with_options(**dict(a.planner_options)) for a in arms if not a.is_expert}
    for a in arms:
        if not a.is_expert:
            a.make_controller().bind(acting[a.planner].horizon, acting[a.planner].obs_normalizer.scale)
    for a in arms:
        if a.inverse_dynamics is not None and not a.is_expert:
            load_inverse_dynamics(a.inverse_dynamics).check_planner(acting[a.planner])
    spec = asdict(_Spec([_arm_dict(a) for a in arms], seeds, planner_identity, max_steps, [asdict(c) for c in comparisons]))
    # Only studies that use them name other planners or the expert: the records of older studies stay as they were.
    if used := sorted({a.planner for a in arms} - {None}):
        spec["planners"] = {name: planners[name][1] for name in used}
    actor = None
    if any(a.is_expert for a in arms):
        actor, expert_meta = _load_expert()
        spec["expert"] = {"sha256": expert_meta["sha256"], "deterministic": True}
    spec = json.loads(json.dumps(spec))  # as a record holds it (tuples become lists), so a resumed run compares like with like
    out = Path(out_dir)
    record_path = out / "record.json"
    if record_path.exists():
        old = _read_json(record_path)
        if not isinstance(old, dict) or not isinstance(old.get("spec"), dict) or _rows_spec(old["spec"]) != _rows_spec(spec):
            raise ValueError(f"{out} holds another study (or a damaged record.json); choose another folder, or delete it to start again.")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record_path, {"spec": spec, "command": command})
    ref = references(planner)
    rows_dir = out / ".rows"
    rows_dir.mkdir(exist_ok=True)
    for stale in rows_dir.glob(".*.tmp"):
        stale.unlink()

    mine = set(variants) if part is None else _share(arms, part)
    for key, variant in variants.items():
        if key not in mine:
            continue
        todo = [a for a in arms if not a.is_expert and a.batch_key() == key and not (rows_dir / f"{a.name}.json").exists()]
        if not todo:
            continue
        first = todo[0]  # every arm of the group shares the batch key's options
        pairs = [(a, s) for a in todo for s in seeds]
        inverse = load_inverse_dynamics(first.inverse_dynamics) if first.inverse_dynamics is not None else None
        results = rollout(variant, [s for _, s in pairs], guidance_scale=[a.guidance_scale for a, _ in pairs], n_samples=first.n_samples,
                          controller=[a.make_controller() for a, _ in pairs], ddim_steps=first.ddim_steps, warm_start=first.warm_start,
                          max_steps=max_steps, record=True, progress=progress, inverse_dynamics=inverse, disturbance=first.disturbance)
        for a in todo:
            rows = [_row(a, r, ref, variant) for (arm, _), r in zip(pairs, results) if arm is a]
            atomic_write_json(rows_dir / f"{a.name}.json", rows)
    if part is not None:
        return None
    for a in arms:
        if a.is_expert and not (rows_dir / f"{a.name}.json").exists():
            episodes = expert_episodes(actor, seeds, a.disturbance, max_steps)
            atomic_write_json(rows_dir / f"{a.name}.json", [_expert_row(a, e, ref) for e in episodes])

    rows = [row for a in arms for row in _read_json(rows_dir / f"{a.name}.json")]
    summary = _summarize(arms, seeds, rows, comparisons, ref)
    if notes:
        summary["notes"] = notes
    _write_csv(out / "episodes.csv", rows, _columns(arms))
    atomic_write_json(out / "summary.json", summary)
    hashes = {name: sha256_file(out / name) for name in ("episodes.csv", "summary.json")}
    atomic_write_json(record_path, {"spec": spec, "command": command, "files_sha256": hashes})
    return summary


def _rows_spec(spec: dict) -> dict:
    """What a study's rows depend on: its spec less the comparisons, which only the summary reads (a part run has none)."""
    return {k: v for k, v in spec.items() if k != "comparisons"}


def _share(arms: Sequence[Arm], part: tuple[int, int]) -> set[tuple]:
    """The batch keys of the i-th of n shares: groups dealt out heaviest first to the lightest share.

    A group's weight counts its plans per env step: samples per plan, two evaluations with classifier-free
    guidance, about twice the work with a gradient, and a plan every k steps.
    """
    i, n = part
    if not (isinstance(i, int) and isinstance(n, int) and 1 <= i <= n):
        raise ValueError(f"part must be (i, n) with 1 <= i <= n, got {part!r}.")
    weight: dict[tuple, float] = {}
    for a in arms:
        if not a.is_expert:
            options = dict(a.planner_options)
            w = a.n_samples * (2 if options.get("classifier_free") else 1) * (2 if a.guidance_scale else 1) / (a.window or 1)
            weight[a.batch_key()] = weight.get(a.batch_key(), 0.0) + w
    loads, shares = [0.0] * n, [set() for _ in range(n)]
    for key in sorted(weight, key=lambda k: -weight[k]):  # stable: equal weights keep the arms' order
        j = loads.index(min(loads))
        loads[j] += weight[key]
        shares[j].add(key)
    return shares[i - 1]


def expert_episodes(actor, seeds: Sequence[int], disturbance: Disturbance | None = None, max_steps: int = 1000) -> list[dict]:
    """The SAC expert's deterministic episodes (return, length, fell) on ``seeds``, cut at ``max_steps`` like a planner's."""
    import gymnasium as gym

    from diffusion_rl.envs import ENV_ID
    from diffusion_rl.expert import policy_episodes

    env = ENV_ID
    spec = gym.spec(ENV_ID)
    if max_steps != spec.max_episode_steps:
        # The same limit as rollout(max_steps=...): an environment spec with that time limit (gym.make takes a spec).
        env = replace(spec, max_episode_steps=max_steps)
    return policy_episodes(actor, seeds, deterministic=True, env_id=env, disturbance=disturbance)


def load_rows(out_dir: str | os.PathLike) -> list[dict]:
    """A finished study's episode rows, after checking its files against the SHA-256s in its record."""
    out = Path(out_dir)
    record = _read_json(out / "record.json")
    for name, digest in (record or {}).get("files_sha256", {}).items():
        if sha256_file(out / name) != digest:
            raise ValueError(f"{out / name} does not match the SHA-256 in record.json: edited or damaged; rerun the study's command.")
    with open(out / "episodes.csv", newline="") as f:
        import csv

        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _arm_dict(a: Arm) -> dict:
    d = asdict(a)
    d["planner_options"] = {k: v for k, v in a.planner_options}
    d["labels"] = {k: v for k, v in a.labels}
    for key in ("labels", "measures"):
        if not d[key]:  # as below: studies without them record what they did before
            del d[key]
    if a.n_samples == 1:
        del d["n_samples"]
    for key in ("agent", "planner", "disturbance"):
        if d[key] is None:  # unused: a study without them records (and summarizes) exactly what it did before they existed
            del d[key]
    return d


def _load_expert():
    """The shipped SAC expert and its sidecar (imported here: studies without the expert never load it)."""
    from diffusion_rl.expert import load_policy

    return load_policy()


def _check_experts(arms: list[Arm]) -> None:
    """The expert takes none of a planner's options: refuse an expert arm that sets one rather than ignore it."""
    default = Arm("")
    for a in arms:
        if not a.is_expert:
            continue
        given = [f for f in ("guidance_scale", "ddim_steps", "planner_options", "threshold", "warm_start", "inverse_dynamics", "planner")
                 if getattr(a, f) != getattr(default, f)]
        if a.controller != "fixed" or a.window is not None:
            given.insert(0, "window or controller")
        if given:
            raise ValueError(f"Arm {a.name!r} is the expert, which takes no planner options; it sets {', '.join(given)} "
                             "(give window=None).")


def _label_columns(arms: list[Arm]) -> tuple[str, ...]:
    """The labels' column names, in their first arm's order (every labelled arm must name the same ones)."""
    names = [tuple(k for k, _ in a.labels) for a in arms if a.labels]
    if any(n != names[0] for n in names):
        raise ValueError(f"Every labelled arm must carry the same label columns, got {sorted(set(names))}.")
    return names[0] if names else ()


def _columns(arms: list[Arm]) -> tuple[str, ...]:
    """The CSV columns: the agent and disturbance columns only for studies that use them; labels and measures only for labelled studies."""
    if labels := _label_columns(arms):
        return labels + COLUMNS + MEASURES
    if not any(a.agent is not None or a.disturbance is not None for a in arms):
        return COLUMNS
    i = COLUMNS.index("seed")
    return ("setting", "agent") + COLUMNS[1:i] + DISTURBANCE_COLUMNS + COLUMNS[i:]


def _disturbance_cells(a: Arm) -> dict:
    return (a.disturbance or Disturbance()).to_dict()


def _expert_row(a: Arm, e: dict, ref: dict) -> dict:
    """One expert episode as a CSV row; the planner's columns are empty (no plans) or zero (no denoiser calls)."""
    return {
        **_label_cells(a), **dict.fromkeys(MEASURES, ""),
        "setting": a.name, "agent": a.agent, "controller": "", "window": "", "guidance_scale": "", **_disturbance_cells(a),
        "seed": e["seed"], "return": round(e["return"], 3), "normalized": round(scores(e["return"], e["length"], ref)["normalized"], 5),
        "fell": int(e["fell"]), "diverged": "", "env_steps": e["length"], "plans": 0, "denoiser_evals": 0,
        "window_end_drift": "", "clipped_action_share": "",
    }


def _row(a: Arm, r: EpisodeResult, ref: dict, planner: Planner) -> dict:
    """One episode as a CSV row (rounded so the file does not depend on float printing)."""
    plans = r.n_plans
    A = planner.action_dim
    H = planner.horizon
    drift = plan_drift(r.states, r.plans[..., A:], r.plan_steps, r.window, planner.obs_normalizer.scale)
    ran = np.diff(np.r_[r.plan_steps, r.length]).astype(int)  # actions each plan had executed
    if a.controller == "fixed":
        end_drift = drift[:, min(r.window, H - 1) - 1] if drift.size else drift  # for k = H: offset H - 1, the last a plan predicts
    else:  # each plan where its own run ended
        end_drift = np.array([drift[j, min(n, H - 1) - 1] for j, n in enumerate(ran) if n >= 1])
    # Planned actions within each plan's run (a fixed window counts its whole window, the last plan's too).
    limits = [r.window] * len(ran) if a.controller == "fixed" else ran
    executed = np.concatenate([p[:n, :A] for p, n in zip(r.plans, limits)]) if plans else np.zeros((0, A))
    return {
        **_label_cells(a), **{m: round(getattr(r, m), 5) if m in a.measures else "" for m in MEASURES},
        "setting": a.name, "agent": a.agent or a.name, "controller": r.controller, "window": r.window,
        "guidance_scale": "" if a.guidance_scale is None else a.guidance_scale, **_disturbance_cells(a),
        "seed": r.seed, "return": round(r.total_return, 3), "normalized": round(scores(r.total_return, r.length, ref)["normalized"], 5),
        "fell": int(r.fell), "diverged": int(r.diverged), "env_steps": r.length, "plans": plans,
        "denoiser_evals": r.denoiser_evals,
        "window_end_drift": _round(_finite_mean(end_drift)) if end_drift.size else "",
        "clipped_action_share": _round(float((np.abs(executed) > 1).mean())) if executed.size else "",
    }


def _label_cells(a: Arm) -> dict:
    return {k: "" if v is None else v for k, v in a.labels}


def _summarize(arms: list[Arm], seeds: list[int], rows: list[dict], comparisons: Sequence[Comparison], ref: dict) -> dict:
    by_arm = {a.name: [r for r in rows if r["setting"] == a.name] for a in arms}
    out = {"references": ref, "seeds": [seeds[0], seeds[-1]], "episodes_per_setting": len(seeds), "settings": []}
    for a in arms:
        own = by_arm[a.name]
        falls = sum(r["fell"] for r in own)
        steps = sum(r["env_steps"] for r in own)
        out["settings"].append({
            **_arm_dict(a), "episodes": len(own),
            "normalized": mean_ci([r["normalized"] for r in own]), "return": mean_ci([r["return"] for r in own]),
            "falls": falls, "fall_rate": {"mean": falls / len(own), "ci95": list(wilson_ci(falls, len(own)))},
            "denoiser_evals_per_step": sum(r["denoiser_evals"] for r in own) / max(steps, 1),
            "steps_per_plan": steps / plans if (plans := sum(r["plans"] for r in own)) else None,  # None: the expert plans nothing
            "window_end_drift": mean_ci([r["window_end_drift"] for r in own if r["window_end_drift"] != ""]),
            "clipped_action_share": mean_ci([r["clipped_action_share"] for r in own if r["clipped_action_share"] != ""]),
            **{m: mean_ci([r[m] for r in own]) for m in a.measures},
        })
    out["comparisons"] = []
    for c in comparisons:
        base = {r["seed"]: r for r in by_arm[c.baseline]}
        treat = {r["seed"]: r for r in by_arm[c.treatment]}
        common = sorted(set(base) & set(treat))
        entry = {"baseline": c.baseline, "treatment": c.treatment}
        for key in ("normalized", "fell", "window_end_drift"):
            pairs = [(base[s][key], treat[s][key]) for s in common if base[s][key] != "" and treat[s][key] != ""]
            if len(pairs) > 1:
                entry[key] = paired_difference([p[0] for p in pairs], [p[1] for p in pairs])
        out["comparisons"].append(entry)
    return out


# ----------------------------------------------------------------------------- files


def _finite_mean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def _round(x: float, nd: int = 5) -> float | str:
    return round(float(x), nd) if math.isfinite(x) else ""


def _write_csv(path: Path, rows: list[dict], columns: Sequence[str] = COLUMNS) -> None:
    lines = [",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _parse(v: str):
    if v == "":
        return None
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v
