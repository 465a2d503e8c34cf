"""The window-size experiment: the study's Fig. 1 and 2, with confidence intervals and the drift analysis.

For every executed window k (actions run per plan, 1..H), unguided and guided, the sweep runs
closed-loop episodes on fixed reset seeds and records each one (real states, actions, rewards and
the plan in force). Every episode of every setting shares one batched rollout, so a denoiser call
plans for all episodes that replan at that step. ``workers`` processes split the seeds; since each
plan row is computed independently of its batch-mates (see :class:`~diffusion_rl.planner.Planner`),
the split changes the wall time, not a single result.

Files in the output folder:

* ``episodes/<setting>-s<seed>.npz``: one recorded episode, written atomically as it ends; a rerun
  of the same command skips them (an interrupted sweep loses only the episodes still running).
* ``episodes.csv``: one row per episode (setting, window, guided, seed, return, length, fell, ...).
* ``summary.json``: per setting the mean with a 95% bootstrap interval, raw and normalized, the fall
  rate with a Wilson interval; the trend test; guided-minus-unguided per window; the normalizers.
* ``drift.csv`` and ``shift.csv``: plan-versus-reality drift by offset, and the distance to the data
  and the drift before falls versus steady walking.
* ``video_episodes.npz``: the two episodes the book films (the best setting's median episode, a fall).
* ``sweep.json``: what was run (settings, seeds, planner SHA-256), by which command, how long it took,
  and the SHA-256 of each file above, which :func:`load_results` checks before it reads them.

Only ``episodes/`` is large; the rest is what ships in ``diffusion_rl/assets/window_sweep``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import os
import queue
import time
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from diffusion_rl.analysis import (
    STUDY_TABLE,
    nearest_data_distance,
    paired_difference,
    plan_drift,
    trend_test,
    wilson_ci,
    within_seed_trend_test,
)
from diffusion_rl.checkpoint import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from diffusion_rl.disturbances import Disturbance
from diffusion_rl.experiment import D4RL_WALKER2D, mean_ci, references, scores, shipped_planner
from diffusion_rl.planner import EpisodeResult, Planner, check_guidance_scale, rollout

__all__ = [
    "D4RL_WALKER2D",
    "PRESETS",
    "RESULT_FILES",
    "SHIPPED",
    "Setting",
    "SweepConfig",
    "SweepResults",
    "analyse_sweep",
    "check_result_hashes",
    "load_results",
    "load_sweep_planner",
    "parse_windows",
    "result_hashes",
    "run_episodes",
    "run_sweep",
]

SHIPPED = Path(__file__).parent / "assets" / "window_sweep"
"""The full sweep's result files, as shipped with the package (the book reads these)."""

STEADY_SKIP = 50
"""Steps ignored at the start of an episode (the walker gets going) when measuring steady walking."""
BEFORE_FALL = 200
"""Steps before a fall that count as 'before the fall' rather than steady walking (the profiles' length)."""


@dataclass(frozen=True)
class Setting:
    """One column of the study's table: an executed window k, with or without guidance."""

    window: int
    guidance_scale: float | None = None

    @property
    def guided(self) -> bool:
        return self.guidance_scale is not None

    @property
    def label(self) -> str:
        """File-name-safe name, e.g. ``k3`` or ``k8-guided``."""
        return f"k{self.window}" + ("-guided" if self.guided else "")


def parse_windows(text: str, horizon: int) -> list[int]:
    """Windows from 'all', 'none', '1,2,8' or '2-8'; each must lie in 1..H."""
    text = str(text).strip().lower()
    if text == "all":
        return list(range(1, horizon + 1))
    if text in ("none", ""):
        return []
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise ValueError(f"Windows must be 'all', 'none', a list like '1,2,8' or a range like '2-8', got {text!r}.") from None
    bad = [k for k in out if not 1 <= k <= horizon]
    if bad:
        raise ValueError(f"Executed windows must lie in 1..{horizon} (the plan's horizon), got {bad}.")
    return sorted(set(out))


@dataclass
class SweepConfig:
    """What to run. Defaults: the full sweep (every window, unguided and guided, 30 episodes)."""

    windows: str = "all"
    """executed windows k run unguided: 'all' (1..H), 'none', a list '1,2,8' or a range '2-8'"""
    guided_windows: str = "all"
    """executed windows k run with guidance, same syntax"""
    guidance_scale: float = 0.3
    """classifier-guidance scale kappa of the guided settings (0.3 was chosen on tuning seeds 20000-20099)"""
    episodes: int = 30
    """episodes per setting; episode i uses reset seed first_seed + i in every setting"""
    first_seed: int = 10_000
    """reset seed of episode 0"""
    max_steps: int = 1000
    """episode length limit"""
    ddim_steps: int = 0
    """0: the DDPM sampler (20 steps, as trained and scored); n > 0: DDIM with n steps (faster, not the study's)"""
    workers: int = 2
    """processes that split the seeds; results do not depend on it"""
    threads: int = 1
    """torch threads per worker"""
    planner: str = "walker2d-h8"
    """shipped planner name"""
    diffuser: str = ""
    """a train-diffuser run (folder or checkpoint.pt) to use instead of the shipped planner"""
    value: str = ""
    """with diffuser: the train-value run for guidance"""
    disturbance: Disturbance | None = None
    """pushes or shifted dynamics in every episode (the CLI's disturbance options); recorded in sweep.json, rows and summary"""

    UNUSED: ClassVar[tuple[str, ...]] = ("disturbance",)  # set through the disturbance option group, not one option

    def settings(self, horizon: int) -> list[Setting]:
        """The settings to run, unguided first."""
        unguided = [Setting(k) for k in parse_windows(self.windows, horizon)]
        guided_windows = parse_windows(self.guided_windows, horizon)
        # Checked here, before anything is written: a bad scale must not leave a sweep.json that blocks the folder.
        scale = check_guidance_scale(float(self.guidance_scale)) if guided_windows else None
        guided = [Setting(k, scale) for k in guided_windows]
        if not unguided + guided:
            raise ValueError("The sweep has no settings: give at least one window (windows or guided_windows).")
        return unguided + guided

    def seeds(self) -> list[int]:
        """The reset seeds, shared by every setting."""
        if not isinstance(self.episodes, int) or self.episodes < 1:
            raise ValueError(f"episodes must be a positive integer, got {self.episodes!r}.")
        return list(range(self.first_seed, self.first_seed + self.episodes))


PRESETS = {
    "full": {},
    # The study's columns: its 'window w' executes w + 1 actions, so windows 1..7 are k = 2..8, then guided 7 = k 8.
    "study": {"windows": "2-8", "guided_windows": "8", "episodes": 10},
}
"""Named configurations: ``full`` (the default) and ``study`` (the study's 8 settings x 10 episodes)."""


# ----------------------------------------------------------------------------- running


def load_sweep_planner(cfg: SweepConfig) -> tuple[Planner, dict]:
    """The planner a config names, and its identity (file SHA-256s) for resume checks."""
    from diffusion_rl import pretrained
    from diffusion_rl.checkpoint import sha256_file

    if cfg.diffuser:
        planner = pretrained.load_run(cfg.diffuser, cfg.value or None)
        files = {"diffuser": cfg.diffuser, "value": cfg.value}
        ident = {k: (sha256_file(_checkpoint_file(v)) if v else None) for k, v in files.items()}
        return planner, {"source": files, "sha256": ident}
    return shipped_planner(cfg.planner)


def _checkpoint_file(run: str) -> Path:
    path = Path(run)
    return path / "checkpoint.pt" if path.is_dir() else path


def episode_path(out: Path, setting: Setting, seed: int) -> Path:
    """Where one recorded episode is stored."""
    return out / "episodes" / f"{setting.label}-s{seed}.npz"


def save_episode(path: Path, r: EpisodeResult) -> None:
    """Write a recorded episode atomically (plain arrays, no pickle)."""
    buf = io.BytesIO()
    np.savez(
        buf, seed=r.seed, window=r.window, guidance_scale=np.nan if r.guidance_scale is None else r.guidance_scale,
        total_return=r.total_return, length=r.length, fell=r.fell, diverged=r.diverged, states=r.states, x=r.x,
        actions=r.actions, rewards=r.rewards, plans=r.plans, plan_steps=r.plan_steps,
    )
    atomic_write_bytes(path, buf.getvalue())


def load_episode(path: Path) -> EpisodeResult:
    """Read an episode written by :func:`save_episode`; a damaged file is a ValueError that says what to do."""
    try:
        with np.load(path, allow_pickle=False) as z:
            g = float(z["guidance_scale"])
            return EpisodeResult(
                seed=int(z["seed"]), window=int(z["window"]), guidance_scale=None if math.isnan(g) else g,
                total_return=float(z["total_return"]), length=int(z["length"]), fell=bool(z["fell"]), diverged=bool(z["diverged"]),
                states=z["states"], x=z["x"], actions=z["actions"], rewards=z["rewards"], plans=z["plans"], plan_steps=z["plan_steps"],
            )
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        # Episodes are written atomically, so this is damage from outside (a disk error, a partial copy).
        raise ValueError(
            f"The recorded episode {path} is damaged ({type(exc).__name__}: {exc}). Delete it and rerun the same "
            "sweep command: only that episode is run again."
        ) from None


def _run_group(cfg: SweepConfig, tasks: list[tuple[int, int, float | None]], out: str, on_step=None, planner: Planner | None = None) -> int:
    """Run (seed, window, scale) episodes in one batched rollout, saving each as it ends; returns env steps.

    A worker process loads its own ``planner``; in this process the caller's is reused.
    """
    from diffusion_rl.runtime import torch_threads

    if planner is None:
        with torch_threads(cfg.threads):
            planner, _ = load_sweep_planner(cfg)
    seeds, windows, scales = (list(c) for c in zip(*tasks))
    out_dir = Path(out)

    def save(_: int, r: EpisodeResult) -> None:
        save_episode(episode_path(out_dir, Setting(r.window, r.guidance_scale), r.seed), r)

    results = rollout(
        planner, seeds, windows, scales, ddim_steps=cfg.ddim_steps or None, max_steps=cfg.max_steps, record=True,
        threads=cfg.threads, on_episode_end=save, on_step=on_step, disturbance=cfg.disturbance,
    )
    return int(sum(r.length for r in results))


def _run_todo(cfg: SweepConfig, todo: list[tuple[Setting, int]], out: Path, progress: bool, planner: Planner) -> int:
    """Run the missing episodes, in ``cfg.workers`` processes (or in this one); returns env steps."""
    from tqdm.auto import tqdm

    seeds = sorted({seed for _, seed in todo})
    workers = max(1, min(int(cfg.workers), len(seeds)))
    # A worker takes every setting of its seeds: the same mix of cheap and costly settings for each.
    groups = [[(seed, s.window, s.guidance_scale) for s, seed in todo if seed in seeds[i::workers]] for i in range(workers)]
    bar = tqdm(total=cfg.max_steps * len(groups), desc="sweep", unit="step", disable=not progress, mininterval=1.0)
    try:
        if workers == 1:
            return _run_group(cfg, groups[0], str(out), bar.update, planner)
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
        with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            q = manager.Queue()
            futures = [pool.submit(_run_group, cfg, g, str(out), q.put) for g in groups]
            while not all(f.done() for f in futures):
                try:
                    bar.update(q.get(timeout=0.5))
                except queue.Empty:
                    pass
            return sum(f.result() for f in futures)
    finally:
        bar.close()


def run_episodes(cfg: SweepConfig, out_dir: str | os.PathLike, command: str = "", progress: bool = True) -> dict:
    """Run the sweep's missing episodes into ``out_dir``/episodes (no analysis); returns this run's record.

    A rerun with the same settings, seeds and planner keeps every finished episode; anything else
    in an existing folder is refused rather than mixed in.
    """
    return _run_episodes(cfg, Path(out_dir), command, progress)[3]["runs"][-1]


def _run_episodes(cfg: SweepConfig, out: Path, command: str, progress: bool) -> tuple[Planner, list[Setting], list[int], dict]:
    """:func:`run_episodes`, also returning the planner, settings, seeds and the updated sweep.json record."""
    planner, ident = load_sweep_planner(cfg)
    settings, seeds = cfg.settings(planner.horizon), cfg.seeds()
    if not isinstance(cfg.max_steps, int) or cfg.max_steps < 1:
        raise ValueError(f"max_steps must be a positive integer, got {cfg.max_steps!r}.")
    spec = {
        "settings": [[s.window, s.guidance_scale] for s in settings], "seeds": seeds, "max_steps": cfg.max_steps,
        "ddim_steps": cfg.ddim_steps or None, "planner": ident,
        "guide": planner.guide_settings(),
    }
    if cfg.disturbance is not None and cfg.disturbance.active:  # absent otherwise: undisturbed sweeps keep their records
        spec["disturbance"] = cfg.disturbance.to_dict()
    meta_path = out / "sweep.json"
    meta = {"spec": spec, "config": asdict(cfg), "runs": []}
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict) or "spec" not in old:
            raise ValueError(
                f"{meta_path} is not the record of a diffusion_rl sweep (unreadable, or written by something else); "
                "choose another output folder, or delete that file if the folder's episodes are yours to discard."
            )
        if old.get("spec") != spec:
            raise ValueError(
                f"{out} holds a sweep with other settings, seeds or planner ({meta_path}); "
                "rerun with its original options to finish it, or choose another output folder."
            )
        meta = old
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(meta_path, meta)

    # A write killed mid-way leaves its temp file behind (never read: names start with '.' and end
    # in '.tmp'); remove them so a resumed folder holds only finished files. One sweep per folder.
    for stale in [*out.glob(".*.tmp"), *(out / "episodes").glob(".*.tmp")]:
        stale.unlink(missing_ok=True)
    todo = [(s, seed) for s in settings for seed in seeds if not episode_path(out, s, seed).exists()]
    t0 = time.perf_counter()
    env_steps = _run_todo(cfg, todo, out, progress, planner) if todo else 0
    wall = time.perf_counter() - t0
    record = {
        "command": command, "episodes_run": len(todo), "episodes_kept": len(settings) * len(seeds) - len(todo),
        "env_steps": env_steps, "rollout_wall_s": round(wall, 1),
        "env_steps_per_s": round(env_steps / wall, 1) if wall > 0 and env_steps else None,
        "workers": cfg.workers, "threads": cfg.threads, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    meta["runs"].append(record)
    atomic_write_json(meta_path, meta)
    return planner, settings, seeds, meta


def run_sweep(cfg: SweepConfig, out_dir: str | os.PathLike, command: str = "", progress: bool = True) -> dict:
    """Run (or finish) a sweep into ``out_dir`` and analyse it; returns the summary (see :func:`run_episodes`)."""
    out = Path(out_dir)
    planner, settings, seeds, meta = _run_episodes(cfg, out, command, progress)
    t0 = time.perf_counter()
    summary = analyse_sweep(out, planner, settings, seeds)  # also records the result files' hashes in sweep.json
    _update_record(out, lambda record: record["runs"][-1].update(analysis_wall_s=round(time.perf_counter() - t0, 1)))
    return summary


def _update_record(out: Path, change: Callable[[dict], None]) -> None:
    """Apply ``change`` to the folder's sweep.json, written back atomically."""
    record = json.loads((out / "sweep.json").read_text())
    change(record)
    atomic_write_json(out / "sweep.json", record)


RESULT_FILES = ("episodes.csv", "summary.json", "drift.csv", "shift.csv", "video_episodes.npz")
"""The analysed results; ``sweep.json`` records their SHA-256."""


def result_hashes(out_dir: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of each result file present in ``out_dir``."""
    return {n: sha256_file(Path(out_dir) / n) for n in RESULT_FILES if (Path(out_dir) / n).is_file()}


def check_result_hashes(path: Path, meta: dict) -> None:
    """Refuse result files that differ from the SHA-256 their sweep.json recorded (edited or damaged)."""
    recorded = meta.get("files_sha256") or {}
    changed = [n for n, digest in result_hashes(path).items() if n in recorded and digest != recorded[n]]
    if changed:
        raise ValueError(f"{', '.join(changed)} in {path} differ from the SHA-256 recorded in its sweep.json (edited or "
                         f"damaged); refusing to read them. Reinstall the package or rerun `python -m diffusion_rl sweep --out {path}`.")


# ----------------------------------------------------------------------------- analysis


def _data_states(planner: Planner) -> np.ndarray:
    from diffusion_rl.data import load_episodes

    dataset_id = planner.meta.get("dataset", {}).get("dataset_id") or planner.meta["config"]["dataset_id"]
    return np.concatenate([ep.observations for ep in load_episodes(dataset_id)])


def analyse_sweep(out_dir: str | os.PathLike, planner: Planner, settings: Sequence[Setting], seeds: Sequence[int]) -> dict:
    """Read a finished sweep's episodes and write episodes.csv, summary.json, drift.csv, shift.csv, video_episodes.npz."""
    out = Path(out_dir)
    ref = references(planner)
    scale = planner.obs_normalizer.scale
    H = planner.horizon
    data_states = _data_states(planner)
    record = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").is_file() else {}
    disturbance = record.get("spec", {}).get("disturbance")  # its values become columns of every row

    episodes: dict[Setting, list[EpisodeResult]] = {s: [load_episode(episode_path(out, s, seed)) for seed in seeds] for s in settings}
    rows, drift_rows, shift_rows = [], [], []
    fall_profiles: dict[str, list[np.ndarray]] = {"nn_distance": [], "plan_drift_ratio": []}
    summary_settings = []
    for s, eps in episodes.items():
        nn = [_nn_profile(e, data_states, scale) for e in eps]
        drifts = [plan_drift(e.states, e.plans[..., planner.action_dim:], e.plan_steps, e.window, scale) for e in eps]
        # The offset where the executed window ends. A plan's rows predict offsets 0..H-1, so for k = H
        # (whose window ends at offset H, the next replan) the last checkable offset, H - 1, stands in.
        end = min(s.window, H - 1) - 1
        steady_level = _finite_mean(np.concatenate([dr[_steady_plans(e), end] for e, dr in zip(eps, drifts)]))
        for e, d, dr in zip(eps, nn, drifts):
            steady = _steady_slice(e)
            rows.append({
                "setting": s.label, "window": s.window, "guided": s.guided, "guidance_scale": s.guidance_scale, "seed": e.seed,
                "return": round(e.total_return, 3), "length": e.length, "fell": e.fell, "diverged": e.diverged,
                **{k: round(v, 5) for k, v in scores(e.total_return, e.length, ref).items()},
                "window_end_drift": _round(_finite_mean(dr[:, end])),
                "nn_distance_steady": _round(_finite_mean(d[steady])),
                "nn_distance_max": _round(float(np.nanmax(d))),
                **(disturbance or {}),
            })
            if e.fell:
                fall_profiles["nn_distance"].append(_before_end(d, BEFORE_FALL))
                fall_profiles["plan_drift_ratio"].append(_drift_before_fall(e, dr, H) / steady_level)
        # Drift by offset r, one value per episode (its mean over plans), then an interval over episodes.
        for r in range(1, min(s.window, H - 1) + 1):
            per_episode = [float(np.nanmean(dr[:, r - 1])) for dr in drifts if np.isfinite(dr[:, r - 1]).any()]
            drift_rows.append({"setting": s.label, "window": s.window, "guided": s.guided, "offset": r, **_flat(mean_ci(per_episode)), "episodes": len(per_episode)})
        own = rows[-len(eps):]  # this setting's rows, just appended
        steady_nn = [r["nn_distance_steady"] for r in own]
        shift_rows.append({"setting": s.label, "window": s.window, "guided": s.guided, "metric": "nn_distance", "phase": "steady",
                           "steps_before_fall": "", **_flat(mean_ci(steady_nn)), "episodes": len(steady_nn)})
        summary_settings.append(_setting_summary(s, own))

    # Just before falls, pooled over every setting (falls are too few per setting for a profile each).
    # Distances to the data are per step; plan drift is per plan, so it is binned by H steps.
    for metric, profiles in fall_profiles.items():
        if not profiles:
            continue
        stack = np.stack(profiles)  # (falls, bins): column d is d steps (or d-th bin) before the fall
        for d in range(stack.shape[1]):
            col = stack[:, d][np.isfinite(stack[:, d])]
            if len(col) < 2:
                continue
            shift_rows.append({"setting": "all falls", "window": "", "guided": "", "metric": metric, "phase": "before_fall",
                               "steps_before_fall": d if metric == "nn_distance" else d * H, **_flat(mean_ci(col)), "episodes": len(col)})

    summary = {
        "references": ref, "episodes_per_setting": len(seeds), "seeds": [seeds[0], seeds[-1]], "horizon": H,
        "settings": summary_settings, "trend": _trends(rows), "guided_minus_unguided": _guided_effect(rows),
        "study": STUDY_TABLE, "videos": _write_video_episodes(out, episodes, summary_settings, planner.action_dim),
        "units": "distances: RMS over the 17 observation dimensions, in the planner's normalized units (dataset standard deviations)",
        "steady": f"steady walking: steps >= {STEADY_SKIP} that are more than {BEFORE_FALL} steps before a fall; "
                  f"distances to the data measured every {NN_STRIDE}th step there, every step before a fall",
        "plan_drift_ratio": "a plan's drift where its executed window ends (or where the episode ended), divided by the mean "
                            "of the same setting's plans made in steady walking; 1 = as usual",
        **({"disturbance": disturbance} if disturbance else {}),
    }
    _write_csv(out / "episodes.csv", rows)
    _write_csv(out / "drift.csv", drift_rows)
    _write_csv(out / "shift.csv", shift_rows)
    atomic_write_json(out / "summary.json", summary)
    if (out / "sweep.json").is_file():  # keep the recorded hashes true to the files just written
        hashes = result_hashes(out)
        _update_record(out, lambda record: record.update(files_sha256=hashes))
    return summary


def _round(x: float, nd: int = 5) -> float:
    return round(float(x), nd) if math.isfinite(x) else math.nan


def _flat(mc: dict) -> dict:
    """A mean and its interval as three CSV columns."""
    def r(v: float | None) -> float | str:
        return round(v, 5) if v is not None else ""

    lo, hi = mc["ci95"]
    return {"mean": r(mc["mean"]), "ci_low": r(lo), "ci_high": r(hi)}


NN_STRIDE = 5
"""Distances to the data are measured every 5th step (and at every step of the last ``BEFORE_FALL``)."""


def _nn_profile(e: EpisodeResult, data_states: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Distance from each state to the nearest state in the data, NaN at steps not measured."""
    n = len(e.states)
    idx = np.union1d(np.arange(0, n, NN_STRIDE), np.arange(max(0, n - BEFORE_FALL - 1), n))
    out = np.full(n, np.nan)
    out[idx] = nearest_data_distance(e.states[idx], data_states, scale)
    return out


def _finite_mean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def _drift_before_fall(e: EpisodeResult, drift: np.ndarray, H: int) -> np.ndarray:
    """Mean drift (at each plan's last observed offset) of the plans that began in each H-step bin before the fall."""
    bins = np.full(BEFORE_FALL // H + 1, np.nan)
    last_offset = np.array([row[np.isfinite(row)][-1] if np.isfinite(row).any() else np.nan for row in drift])
    before = e.length - np.asarray(e.plan_steps)  # steps from the plan's start to the fall
    for b in range(len(bins)):
        sel = (before > b * H) & (before <= (b + 1) * H)
        bins[b] = _finite_mean(last_offset[sel]) if sel.any() else np.nan
    return bins


def _steady_plans(e: EpisodeResult) -> np.ndarray:
    """Which plans began during steady walking."""
    sl = _steady_slice(e)
    steps = np.asarray(e.plan_steps)
    return (steps >= sl.start) & (steps < sl.stop)


def _steady_slice(e: EpisodeResult) -> slice:
    end = len(e.states) - BEFORE_FALL if e.fell else len(e.states)
    return slice(STEADY_SKIP, max(STEADY_SKIP, end))


def _before_end(values: np.ndarray, n: int) -> np.ndarray:
    """values[-1 - d] for d = 0..n (NaN where the episode was shorter)."""
    out = np.full(n + 1, np.nan)
    tail = values[::-1][: n + 1]
    out[: len(tail)] = tail
    return out


def _setting_summary(s: Setting, rows: list[dict]) -> dict:
    falls = sum(r["fell"] for r in rows)
    out = {"setting": s.label, "window": s.window, "guided": s.guided, "guidance_scale": s.guidance_scale, "episodes": len(rows),
           "return": mean_ci([r["return"] for r in rows]), "std_return": float(np.std([r["return"] for r in rows])),
           "mean_length": float(np.mean([r["length"] for r in rows])), "falls": falls,
           "fall_rate": {"mean": falls / len(rows), "ci95": list(wilson_ci(falls, len(rows)))},
           "diverged": sum(r["diverged"] for r in rows)}
    for key in ("normalized", "value_rate", "d4rl_normalized", "d4rl_normalized_d4rl_refs", "window_end_drift", "nn_distance_steady"):
        if key in rows[0]:
            out[key] = mean_ci([r[key] for r in rows])
    return out


def _trends(rows: list[dict]) -> dict:
    """Score against executed window, unguided (and guided), over all windows and over the study's k = 2..H."""
    out = {}
    for guided in (False, True):
        sub = [r for r in rows if r["guided"] == guided]
        if len({r["window"] for r in sub}) >= 2:
            name = "guided" if guided else "unguided"
            study_range = [r for r in sub if r["window"] >= 2]
            for key, part in ((name, sub), (f"{name}_k2_and_up", study_range)):
                if len({r["window"] for r in part}) >= 2:
                    k, y = [r["window"] for r in part], [r["normalized"] for r in part]
                    out[key] = trend_test(k, y)
                    out[key]["within_seed"] = within_seed_trend_test(k, y, [r["seed"] for r in part])
    return out


def _guided_effect(rows: list[dict]) -> list[dict]:
    """Guided minus unguided normalized score per window, paired by seed."""
    out = []
    for k in sorted({r["window"] for r in rows}):
        u = {r["seed"]: r["normalized"] for r in rows if r["window"] == k and not r["guided"]}
        g = {r["seed"]: r["normalized"] for r in rows if r["window"] == k and r["guided"]}
        common = sorted(set(u) & set(g))
        if common:
            out.append({"window": k, **paired_difference([u[s] for s in common], [g[s] for s in common])})
    return out


def _write_video_episodes(out: Path, episodes: dict[Setting, list[EpisodeResult]], summary: list[dict], action_dim: int) -> dict:
    """Keep the two episodes the book films: the best setting's median episode and a typical fall."""
    best = max(summary, key=lambda s: s["normalized"]["mean"])
    best_setting = next(s for s in episodes if s.label == best["setting"])
    chosen = {"best": _median_episode(episodes[best_setting], lambda e: e.total_return)}
    # The fall: from the unguided setting with the most falls (ties: the longer window), the median fall by length.
    falling = [(sum(e.fell for e in eps), s.window, s) for s, eps in episodes.items() if not s.guided and any(e.fell for e in eps)]
    if falling:
        fall_setting = max(falling, key=lambda t: (t[0], t[1]))[2]
        chosen["fall"] = _median_episode([e for e in episodes[fall_setting] if e.fell], lambda e: e.length)
    arrays, meta = {}, {}
    for name, e in chosen.items():
        arrays.update({f"{name}_states": e.states, f"{name}_x": e.x, f"{name}_plan_steps": e.plan_steps,
                       f"{name}_plans": e.plans[..., action_dim:].astype(np.float16)})
        meta[name] = {"setting": Setting(e.window, e.guidance_scale).label, "window": e.window, "guidance_scale": e.guidance_scale,
                      "seed": e.seed, "return": e.total_return, "length": e.length, "fell": e.fell}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(out / "video_episodes.npz", buf.getvalue())
    return meta


def _median_episode(eps: list[EpisodeResult], key) -> EpisodeResult:
    ranked = sorted(eps, key=lambda e: (key(e), e.seed))
    return ranked[(len(ranked) - 1) // 2]


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        atomic_write_text(path, "")
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------- reading results


@dataclass
class SweepResults:
    """A sweep's result files, loaded: per-episode rows, the summary, drift and shift rows, filmed episodes."""

    episodes: list[dict]
    summary: dict
    drift: list[dict]
    shift: list[dict]
    videos: dict[str, dict[str, np.ndarray]]
    meta: dict
    path: Path


def _read_csv(path: Path) -> list[dict]:
    def parse(v: str):
        if v in ("True", "False"):
            return v == "True"
        if v == "":
            return None
        try:
            f = float(v)
        except ValueError:
            return v
        return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f

    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def load_results(path: str | os.PathLike | None = None) -> SweepResults:
    """Load a sweep's result files (default: the shipped full sweep)."""
    path = Path(path) if path is not None else SHIPPED
    missing = [n for n in ("episodes.csv", "summary.json", "drift.csv", "shift.csv", "sweep.json") if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a finished sweep (missing {', '.join(missing)}); run `python -m diffusion_rl sweep --out {path}`.")
    meta = json.loads((path / "sweep.json").read_text())
    check_result_hashes(path, meta)
    videos: dict[str, dict[str, np.ndarray]] = {}
    if (path / "video_episodes.npz").is_file():
        with np.load(path / "video_episodes.npz", allow_pickle=False) as z:
            for key in z.files:
                name, _, field = key.partition("_")
                videos.setdefault(name, {})[field] = z[key].astype(np.float32) if field == "plans" else z[key]
    return SweepResults(
        episodes=_read_csv(path / "episodes.csv"), summary=json.loads((path / "summary.json").read_text()),
        drift=_read_csv(path / "drift.csv"), shift=_read_csv(path / "shift.csv"), videos=videos,
        meta=meta, path=path,
    )
