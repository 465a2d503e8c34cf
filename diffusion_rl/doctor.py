"""``python -m diffusion_rl doctor``: what this machine has, what works, and what to do about what does not.

The first thing to run when something is wrong. It reports the versions, torch's threads and CUDA,
whether MuJoCo can render offscreen, the Minari datasets present, and whether every shipped file
matches the SHA-256 in its sidecar. Every probe is guarded, so a broken install becomes a line in
the report (with what to do), never a traceback. It reads metadata only and takes a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffusion_rl.gl import GL_TIMEOUT_S, INSTALL_HINT, probe_gl

__all__ = ["ASSETS", "GL_TIMEOUT_S", "PACKAGES", "SWEEP_FILES", "run_doctor"]

ASSETS = Path(__file__).parent / "assets"
"""The shipped files the doctor verifies (weights + sidecars, and ``window_sweep/``)."""

PACKAGES = ("torch", "numpy", "gymnasium", "mujoco", "minari", "safetensors")
"""Distributions whose versions are reported (read from their metadata, not imported)."""

SWEEP_FILES = ("episodes.csv", "summary.json", "drift.csv", "shift.csv", "sweep.json", "video_episodes.npz")
"""The window sweep's result files the book reads."""


WALKER_SHAPES = {"observation": [17], "action": [6]}
"""Observation and action shapes of Walker2d-v5: a dataset with others cannot train these planners."""

_REINSTALL = "restore it with `git checkout -- diffusion_rl/assets` (or reinstall the package)"

def _guard(report: dict, section: str, probe: Callable[[dict], Any]) -> None:
    """Run one probe; if it raises, record the failure as a problem instead of crashing the doctor."""
    try:
        probe(report)
    except Exception as exc:  # a doctor that crashes diagnoses nothing
        report[section] = {"error": f"{type(exc).__name__}: {exc}"}
        report["problems"].append(f"{section}: the check itself failed ({type(exc).__name__}: {exc}); "
                                  "reinstall with `pip install -e .` and rerun `python -m diffusion_rl doctor`.")


# ----------------------------------------------------------------------------- probes


def _versions(report: dict) -> None:
    from importlib.metadata import PackageNotFoundError, version

    import diffusion_rl

    out = {"python": f"{platform.python_version()} ({sys.executable})",
           "diffusion_rl": f"{diffusion_rl.__version__} ({Path(diffusion_rl.__file__).parent})"}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
            report["problems"].append(f"{name} is not installed: run `pip install -e .` (or `make setup`).")
    report["versions"] = out


def _torch(report: dict) -> None:
    import torch

    cuda = torch.cuda.is_available()
    report["torch"] = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "cuda": cuda,
                       "cuda_device": torch.cuda.get_device_name(0) if cuda else None}


def _gl(report: dict) -> None:
    gl = {"MUJOCO_GL": os.environ.get("MUJOCO_GL"), "PYOPENGL_PLATFORM": os.environ.get("PYOPENGL_PLATFORM"), "works": False}
    works, detail = probe_gl()
    gl.update({"works": True, "backend": detail} if works else {"error": detail})
    report["gl"] = gl
    if not gl["works"]:
        report["problems"].append(
            f"Offscreen rendering fails (MUJOCO_GL={gl['MUJOCO_GL']!r}): {gl['error']}. Videos and the book need it "
            f"(training and evaluation do not): {INSTALL_HINT}."
        )


def _shape(space_json: str | None) -> list[int] | None:
    """The shape in a Minari metadata space description (a JSON string), or None."""
    try:
        return list(json.loads(space_json)["shape"])
    except (TypeError, ValueError, KeyError):
        return None


def _datasets(report: dict) -> None:
    from diffusion_rl.data import DEFAULT_DATASET_ID, datasets_root

    root = datasets_root()
    out: dict[str, Any] = {"root": str(root), "exists": root.is_dir(), "datasets": [], "incomplete": [], "staging": []}
    report["datasets"] = out
    if not root.is_dir():
        report["notes"].append(f"No Minari datasets folder at {root}: build the local expert data with "
                               "`python -m diffusion_rl make-dataset` (about 1 minute) before training.")
        return
    for data_dir in sorted(root.rglob("data")):
        rel = data_dir.parent.relative_to(root)
        if not data_dir.is_dir() or any(p.startswith(".") for p in rel.parts):
            continue  # hidden folders are make-dataset's staging areas, listed below
        dataset_id = "/".join(rel.parts)
        meta_path = data_dir / "metadata.json"
        if not meta_path.is_file():
            # Minari writes metadata.json last: without it the folder is a build that never finished.
            out["incomplete"].append(dataset_id)
            report["notes"].append(f"{data_dir.parent} holds no metadata.json (an unfinished build): delete it, or rerun "
                                   f"`{_rebuild_command(dataset_id)}`, which replaces it.")
            continue
        try:
            md = json.loads(meta_path.read_text())
            env_spec = json.loads(md.get("env_spec") or "{}")
        except (OSError, ValueError) as exc:
            out["incomplete"].append(dataset_id)
            report["notes"].append(f"{meta_path} is unreadable ({exc}): delete {data_dir.parent} and rebuild it with make-dataset.")
            continue
        entry = {"id": md.get("dataset_id", dataset_id), "episodes": md.get("total_episodes"), "steps": md.get("total_steps"),
                 "env_id": env_spec.get("id") if isinstance(env_spec, dict) else None,
                 "observation_shape": _shape(md.get("observation_space")), "action_shape": _shape(md.get("action_space"))}
        entry["fits_walker2d"] = (entry["observation_shape"], entry["action_shape"]) == (WALKER_SHAPES["observation"], WALKER_SHAPES["action"])
        out["datasets"].append(entry)
    out["staging"] = sorted(p.name for p in root.glob(".staging-*"))
    if out["staging"]:
        report["notes"].append(f"{len(out['staging'])} staging folder(s) in {root} from an interrupted make-dataset: "
                               "the next make-dataset removes them.")
    if DEFAULT_DATASET_ID not in {d["id"] for d in out["datasets"]}:
        report["notes"].append(f"{DEFAULT_DATASET_ID} is not built: training, the sweep's analysis and some chapters' "
                               "recomputation need it; run `python -m diffusion_rl make-dataset` (about 1 minute).")


def _rebuild_command(dataset_id: str) -> str:
    """The make-dataset command that rebuilds ``dataset_id``, naming its recipe where the id is a recipe's own."""
    try:
        from diffusion_rl.recipes import RECIPES
    except Exception:  # the doctor must run where gymnasium or torch is broken too; then the plain command
        RECIPES = {}
    recipe = next((r.name for r in RECIPES.values() if r.dataset_id == dataset_id and r.name != "expert"), None)
    return "python -m diffusion_rl make-dataset" + (f" --recipe {recipe}" if recipe else "") + f" --dataset-id {dataset_id}"


def _expected_assets() -> set[str]:
    """The weight files the package ships, by name."""
    from diffusion_rl.expert import SHIPPED_POLICIES, shipped_policy_path
    from diffusion_rl.pretrained import INVERSE_DYNAMICS, PRETRAINED

    return ({shipped_policy_path(name).name for name in SHIPPED_POLICIES} | {name for files in PRETRAINED.values() for name in files.values()}
            | set(INVERSE_DYNAMICS.values()))


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file (hashlib only: this check must work where torch does not import)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _assets(report: dict) -> None:
    rows = []
    report["assets"] = {"folder": str(ASSETS), "files": rows}
    for name in sorted(_expected_assets() | {p.name for p in ASSETS.glob("*.safetensors")}):
        path, side = ASSETS / name, (ASSETS / name).with_suffix(".json")
        row: dict[str, Any] = {"file": name, "ok": False}
        rows.append(row)
        if not path.is_file():
            row["error"] = "missing"
            report["problems"].append(f"The shipped asset {path} is missing: {_REINSTALL}.")
            continue
        row["size"] = path.stat().st_size
        try:
            want = json.loads(side.read_text()).get("sha256")
        except (OSError, ValueError) as exc:
            row["error"] = f"sidecar {side.name} unreadable"
            report["problems"].append(f"The sidecar {side} of {name} is missing or not JSON ({type(exc).__name__}): {_REINSTALL}.")
            continue
        row["sha256"] = _sha256(path)
        if row["sha256"] != want:
            row["error"] = f"SHA-256 {row['sha256'][:12]}... does not match the sidecar's {str(want)[:12]}..."
            report["problems"].append(f"{path} does not match the SHA-256 in its sidecar (modified or corrupted); the package "
                                      f"refuses to load it: {_REINSTALL}.")
            continue
        row["ok"] = True


def _sweep(report: dict) -> None:
    folder = ASSETS / "window_sweep"
    present = [n for n in SWEEP_FILES if (folder / n).is_file()]
    episodes = folder / "episodes"
    out: dict[str, Any] = {"folder": str(folder), "present": present, "missing": [n for n in SWEEP_FILES if n not in present],
                           "recorded_episodes": len(list(episodes.glob("*.npz"))) if episodes.is_dir() else 0}
    report["sweep"] = out
    if out["missing"]:
        report["problems"].append(f"The shipped sweep results lack {', '.join(out['missing'])} (the book reads them): {_REINSTALL}, "
                                  f"or recompute them with `python -m diffusion_rl sweep --out {folder}`.")
    if "sweep.json" not in present:
        return
    from diffusion_rl.sweep import check_result_hashes

    record = json.loads((folder / "sweep.json").read_text())
    try:
        check_result_hashes(folder, record)
    except ValueError as e:
        report["problems"].append(str(e))
    used = record.get("spec", {}).get("planner", {})
    name = used.get("source", {}).get("planner")
    if name:
        shipped = {}
        for part in ("diffuser", "value"):
            side = ASSETS / f"{name}-{part}.json"
            shipped[part] = json.loads(side.read_text()).get("sha256") if side.is_file() else None
        out["planner"] = name
        out["matches_shipped_planner"] = shipped == used.get("sha256")
        if not out["matches_shipped_planner"]:
            report["problems"].append(f"The shipped sweep results were made with another {name} planner than the one shipped: "
                                      f"{_REINSTALL}, or rerun `python -m diffusion_rl sweep --out {folder}`.")


def _studies(report: dict) -> None:
    """Every shipped study folder (one with a record.json, as the experiment runner writes) against its recorded SHA-256s."""
    out: dict[str, Any] = {}
    report["studies"] = out
    for record_path in sorted(ASSETS.glob("**/record.json")):
        folder = record_path.parent
        name = str(folder.relative_to(ASSETS))
        try:
            recorded = json.loads(record_path.read_text()).get("files_sha256", {})
        except (OSError, ValueError, AttributeError):
            recorded = None
        bad = ["record.json"] if not recorded else [
            f for f, digest in recorded.items() if not (folder / f).is_file() or _sha256(folder / f) != digest]
        out[name] = "ok" if not bad else f"does not verify: {', '.join(bad)}"
        if bad:
            report["problems"].append(f"The shipped study results in {name} do not match their record ({', '.join(bad)}): "
                                      f"{_REINSTALL}, or rerun the command in its record.json.")


# ----------------------------------------------------------------------------- report


def _format(report: dict) -> str:
    """The report as the lines ``python -m diffusion_rl doctor`` prints."""
    lines = ["diffusion_rl doctor"]
    versions = report.get("versions", {})
    if "error" not in versions:
        for name, v in versions.items():
            lines.append(f"  {name:<13} {v if v is not None else 'NOT INSTALLED'}")
    t = report.get("torch", {})
    if "threads" in t:
        cuda = f"yes ({t['cuda_device']})" if t["cuda"] else "no (CPU only)"
        lines.append(f"  {'torch threads':<13} {t['threads']} of {t['cpus']} CPUs, CUDA: {cuda}")
    gl = report.get("gl", {})
    if "works" in gl:
        state = f"works (backend {gl['backend']!r})" if gl["works"] else f"FAILS: {gl['error']}"
        lines.append(f"rendering: MUJOCO_GL={gl['MUJOCO_GL']!r}: {state}")
    ds = report.get("datasets", {})
    if "root" in ds:
        lines.append(f"datasets in {ds['root']}{'' if ds['exists'] else ' (folder absent)'}:")
        for d in ds["datasets"]:
            shapes = f"obs {d['observation_shape']} act {d['action_shape']}" + ("" if d["fits_walker2d"] else ", NOT Walker2d-shaped")
            lines.append(f"  {d['id']}: {d['episodes']} episodes, {d['steps']} steps, {d['env_id']}, {shapes}")
        lines += [f"  {i}: INCOMPLETE" for i in ds["incomplete"]]
        if not ds["datasets"] and not ds["incomplete"]:
            lines.append("  (none)")
    assets = report.get("assets", {})
    if "files" in assets:
        lines.append(f"shipped assets in {assets['folder']}:")
        for row in assets["files"]:
            state = f"OK (sha256 {row['sha256'][:12]}..., {row['size'] / 1e6:.1f} MB)" if row["ok"] else f"BAD: {row['error']}"
            lines.append(f"  {row['file']:<36} {state}")
    sw = report.get("sweep", {})
    if "present" in sw:
        state = "all present" if not sw["missing"] else f"MISSING {', '.join(sw['missing'])}"
        planner = "" if "matches_shipped_planner" not in sw else (
            f", made by the shipped {sw['planner']}" if sw["matches_shipped_planner"] else f", NOT made by the shipped {sw['planner']}")
        lines.append(f"  window_sweep/ result files: {state}{planner}; {sw['recorded_episodes']} recorded episodes (not shipped)")
    for name, state in report.get("studies", {}).items():
        lines.append(f"  {name + '/ study results:':<36} {state}")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    for problem in report["problems"]:
        lines.append(f"problem: {problem}")
    lines.append(f"verdict: {report['verdict']}")
    return "\n".join(lines)


def run_doctor(verbose: bool = True) -> dict:
    """Probe this installation and return the report (``ok``, ``problems``, each section); print it if ``verbose``."""
    report: dict[str, Any] = {"problems": [], "notes": []}
    for section, probe in (("versions", _versions), ("torch", _torch), ("gl", _gl), ("datasets", _datasets),
                           ("assets", _assets), ("sweep", _sweep), ("studies", _studies)):
        _guard(report, section, probe)
    n = len(report["problems"])
    report["ok"] = n == 0
    report["verdict"] = ("all good: the shipped files verify and rendering works" if n == 0
                         else f"{n} problem{'s' if n > 1 else ''} (each 'problem:' line above says what to do)")
    if verbose:
        print(_format(report), flush=True)
    return report
