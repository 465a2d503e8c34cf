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

Each arm's rows are kept (``.rows/<arm>.json``, written atomically) as soon as the arm finishes,
so a study killed mid-way resumes from its last finished arm.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from diffusion_rl.analysis import bootstrap_ci, paired_difference, plan_drift, wilson_ci
from diffusion_rl.checkpoint import atomic_write_json, atomic_write_text, sha256_file
from diffusion_rl.control import Controller, controller_from_name
from diffusion_rl.planner import EpisodeResult, Planner, rollout

__all__ = ["Arm", "Comparison", "load_rows", "mean_ci", "references", "run_experiment", "scores", "shipped_planner"]

D4RL_WALKER2D = {"random": 1.629008, "expert": 4592.3}
"""D4RL's walker2d reference returns (d4rl/infos.py), for scores comparable with published tables."""

COLUMNS = ("setting", "controller", "window", "guidance_scale", "seed", "return", "normalized", "fell", "diverged", "env_steps",
           "plans", "denoiser_evals", "window_end_drift", "clipped_action_share")


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

    def make_controller(self) -> Controller:
        """A fresh controller for one episode."""
        if self.controller == "fixed":
            return controller_from_name("fixed", window=self.window, threshold=self.threshold)
        return controller_from_name(self.controller, threshold=self.threshold)

    def batch_key(self) -> tuple:
        """Arms with equal keys share one batched rollout."""
        return (self.ddim_steps, self.warm_start, self.planner_options, self.inverse_dynamics)


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

    data = planner.meta.get("dataset") or dataset_reference(planner.meta["config"]["dataset_id"])
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
    sha = {part: pretrained.read_sidecar(pretrained.asset_path(name, part))["sha256"] for part in ("diffuser", "value")}
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
) -> dict:
    """Run every arm on every seed into ``out_dir`` (resuming finished arms) and write the result files; returns the summary.

    ``notes``: what the study decided before this run (for example a setting chosen on tuning seeds), kept in the summary.
    """
    arms, seeds = list(arms), [int(s) for s in seeds]
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"Arm names must be unique, got {names}.")
    for c in comparisons:
        if c.baseline not in names or c.treatment not in names:
            raise ValueError(f"Comparison {c} names an arm that the study does not have ({names}).")
    variants = {a.batch_key(): planner.with_options(**dict(a.planner_options)) for a in arms}  # validates options first
    for a in arms:
        a.make_controller().bind(planner.horizon, planner.obs_normalizer.scale)  # and the controllers
    for name in {a.inverse_dynamics for a in arms} - {None}:
        load_inverse_dynamics(name).check_planner(planner)
    spec = asdict(_Spec([_arm_dict(a) for a in arms], seeds, planner_identity, max_steps, [asdict(c) for c in comparisons]))
    out = Path(out_dir)
    record_path = out / "record.json"
    if record_path.exists():
        old = _read_json(record_path)
        if not isinstance(old, dict) or old.get("spec") != spec:
            raise ValueError(f"{out} holds another study (or a damaged record.json); choose another folder, or delete it to start again.")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record_path, {"spec": spec, "command": command})
    ref = references(planner)
    rows_dir = out / ".rows"
    rows_dir.mkdir(exist_ok=True)
    for stale in rows_dir.glob(".*.tmp"):
        stale.unlink()

    for key, variant in variants.items():
        todo = [a for a in arms if a.batch_key() == key and not (rows_dir / f"{a.name}.json").exists()]
        if not todo:
            continue
        pairs = [(a, s) for a in todo for s in seeds]
        inverse = load_inverse_dynamics(key[3]) if key[3] is not None else None
        results = rollout(variant, [s for _, s in pairs], guidance_scale=[a.guidance_scale for a, _ in pairs],
                          controller=[a.make_controller() for a, _ in pairs], ddim_steps=key[0], warm_start=key[1],
                          max_steps=max_steps, record=True, progress=progress, inverse_dynamics=inverse)
        for a in todo:
            rows = [_row(a, r, ref, variant) for (arm, _), r in zip(pairs, results) if arm is a]
            atomic_write_json(rows_dir / f"{a.name}.json", rows)

    rows = [row for a in arms for row in _read_json(rows_dir / f"{a.name}.json")]
    summary = _summarize(arms, seeds, rows, comparisons, ref)
    if notes:
        summary["notes"] = notes
    _write_csv(out / "episodes.csv", rows)
    atomic_write_json(out / "summary.json", summary)
    hashes = {name: sha256_file(out / name) for name in ("episodes.csv", "summary.json")}
    atomic_write_json(record_path, {"spec": spec, "command": command, "files_sha256": hashes})
    return summary


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
    return d


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
        "setting": a.name, "controller": r.controller, "window": r.window,
        "guidance_scale": "" if a.guidance_scale is None else a.guidance_scale,
        "seed": r.seed, "return": round(r.total_return, 3), "normalized": round(scores(r.total_return, r.length, ref)["normalized"], 5),
        "fell": int(r.fell), "diverged": int(r.diverged), "env_steps": r.length, "plans": plans,
        "denoiser_evals": r.denoiser_evals,
        "window_end_drift": _round(_finite_mean(end_drift)) if end_drift.size else "",
        "clipped_action_share": _round(float((np.abs(executed) > 1).mean())) if executed.size else "",
    }


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
            "steps_per_plan": steps / max(sum(r["plans"] for r in own), 1),
            "window_end_drift": mean_ci([r["window_end_drift"] for r in own if r["window_end_drift"] != ""]),
            "clipped_action_share": mean_ci([r["clipped_action_share"] for r in own if r["clipped_action_share"] != ""]),
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


def _write_csv(path: Path, rows: list[dict]) -> None:
    lines = [",".join(COLUMNS)] + [",".join(str(r[c]) for c in COLUMNS) for r in rows]
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
