"""Trained planners: export EMA weights as safetensors with JSON sidecars, and load them back safely.

``load("walker2d-h8")`` returns a ready :class:`~diffusion_rl.planner.Planner` from the weights the
package ships. Each weight file has a sidecar (``.json``) with its configuration, the dataset it was
trained on, the training command, steps, wall time, final loss, the closed-loop score, and its
SHA-256, which is checked before the file is read. No pickle is ever loaded from these files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from diffusion_rl.checkpoint import CheckpointError, atomic_write_bytes, atomic_write_json, load_checkpoint, sha256_file
from diffusion_rl.control import InverseDynamicsActions
from diffusion_rl.data import Normalizer
from diffusion_rl.diffusion import GaussianDiffusion
from diffusion_rl.models import ValueNet
from diffusion_rl.planner import Planner
from diffusion_rl.training import CONFIGS, build_network, train_command

__all__ = ["DEFAULT_CONTROL", "DEFAULT_PLANNER", "INVERSE_DYNAMICS", "PRETRAINED", "load", "load_inverse_dynamics", "load_run", "export_network", "load_network", "asset_path"]

ASSETS = Path(__file__).parent / "assets"

PRETRAINED = {
    "walker2d-h8": {"diffuser": "walker2d-h8-diffuser.safetensors", "value": "walker2d-h8-value.safetensors"},
    "walker2d-h8-dart": {"diffuser": "walker2d-h8-dart-diffuser.safetensors"},
    "walker2d-h8-dppo": {"diffuser": "walker2d-h8-dppo-diffuser.safetensors", "value": "walker2d-h8-value.safetensors"},
    "walker2d-h8-dart-push": {"diffuser": "walker2d-h8-dart-push-diffuser.safetensors"},
    "walker2d-h8-medium-replay": {"diffuser": "walker2d-h8-medium-replay-diffuser.safetensors",
                                  "value": "walker2d-h8-medium-replay-value.safetensors"},
    "walker2d-h8-medium-expert": {"diffuser": "walker2d-h8-medium-expert-diffuser.safetensors",
                                  "value": "walker2d-h8-medium-expert-value.safetensors"},
    "walker2d-h8-medium-replay-cf": {"diffuser": "walker2d-h8-medium-replay-cf-diffuser.safetensors"},
    "walker2d-h8-medium-expert-cf": {"diffuser": "walker2d-h8-medium-expert-cf-diffuser.safetensors"},
    "walker2d-h8-speeds": {"diffuser": "walker2d-h8-speeds-diffuser.safetensors"},
}
"""Shipped planners by name: the denoiser and value network files in ``diffusion_rl/assets``.

``walker2d-h8`` learned from the expert's own episodes (``walker2d/local-expert-v0``);
``walker2d-h8-dart`` from episodes where the expert's executed actions were noisy and the walker was
pushed, while the recorded actions stayed the expert's clean ones (``make-dataset --recipe expert-dart``);
``walker2d-h8-dppo`` is ``walker2d-h8`` with its last 10 denoising steps fine-tuned by PPO on the reward of
whole 8-step plans (``python -m diffusion_rl finetune``), sharing its value network; ``walker2d-h8-dart-push`` is
``walker2d-h8-dart`` fine-tuned the same way while random pushes shove the walker (``finetune --max-push 300``).
``walker2d-h8-medium-replay`` and ``walker2d-h8-medium-expert`` learned from data of mixed quality
(``make-dataset --recipe medium-replay`` / ``medium-expert``), each with a value network of the discounted return
to the episode's end (Diffuser's); the ``-cf`` planners are denoisers trained on the same data with the return as a
dropped-out condition, for classifier-free guidance (``evaluate --classifier-free-weight W``). ``walker2d-h8-speeds``
learned from a speed policy's walks at many speeds (``make-dataset --recipe speeds``), for test-time speed targets
(``evaluate --target-speed V``); it has no value network."""

DEFAULT_PLANNER = "walker2d-h8-dart"
"""What ``load()`` and ``evaluate`` use when no planner is named: the most robust to pushes among the shipped
planners whose undisturbed k = 1 score is at least 98% of the data's (the push study's tuning seeds)."""

DEFAULT_CONTROL = {
    "walker2d-h8": {"controller": "fixed", "window": 4, "threshold": None, "ddim_steps": 1, "warm_start": None},
    "walker2d-h8-dart": {"controller": "fixed", "window": 1, "threshold": None, "ddim_steps": 2, "warm_start": None},
    "walker2d-h8-dppo": {"controller": "fixed", "window": 8, "threshold": None, "ddim_steps": None, "warm_start": None},
    "walker2d-h8-dart-push": {"controller": "fixed", "window": 8, "threshold": None, "ddim_steps": None, "warm_start": None},
    **{name: {"controller": "fixed", "window": 1, "threshold": None, "ddim_steps": 5, "warm_start": None}
       for name in ("walker2d-h8-medium-replay", "walker2d-h8-medium-expert", "walker2d-h8-medium-replay-cf",
                    "walker2d-h8-medium-expert-cf", "walker2d-h8-speeds")},
}
"""How ``evaluate`` runs each shipped planner when given no controller options. ``walker2d-h8``: the setting
the control study chose on its tuning seeds (``diffusion_rl/assets/control_study/summary.json``, notes.default);
``walker2d-h8-dart``: the push study's choice on its tuning seeds (``push_study/summary.json``, notes.default);
``walker2d-h8-dppo`` and ``walker2d-h8-dart-push``: whole plans, the window they were fine-tuned for; the
mixed-data and speeds planners: every step with 5 DDIM steps, the guidance study's sampler."""

INVERSE_DYNAMICS = {"walker2d": "walker2d-inverse-dynamics.safetensors"}
"""Shipped inverse-dynamics models a = f(s, s') by name (``python -m diffusion_rl train-inverse-dynamics``)."""


def asset_path(name: str, part: str = "diffuser") -> Path:
    """Path of a shipped weight file, with a clear error for an unknown name."""
    if name not in PRETRAINED:
        raise CheckpointError(f"No pretrained planner named {name!r}; available: {', '.join(sorted(PRETRAINED))}.")
    if part not in PRETRAINED[name]:
        raise CheckpointError(f"The planner {name!r} ships no {part} network (it has: {', '.join(PRETRAINED[name])}).")
    return ASSETS / PRETRAINED[name][part]


def load(name: str = DEFAULT_PLANNER, device: str = "auto", with_value: bool = True, **planner_options) -> Planner:
    """The shipped planner ``name``, SHA-256 verified, on ``device`` (auto: CUDA if present)."""
    from diffusion_rl.runtime import pick_device

    diffusion, normalizer, meta = load_network(asset_path(name, "diffuser"))
    with_value = with_value and "value" in PRETRAINED.get(name, {})  # a planner may ship without one (no guidance)
    value, value_normalizer = load_network(asset_path(name, "value"))[:2] if with_value else (None, None)
    planner = Planner(diffusion, normalizer, value, meta, **planner_options)  # checks the shapes first
    if value_normalizer is not None:
        check_same_data(normalizer, value_normalizer)
    return planner.to(pick_device(device))


def load_inverse_dynamics(name_or_path: str | os.PathLike = "walker2d") -> InverseDynamicsActions:
    """A shipped inverse-dynamics model by name, or one exported to a .safetensors path, SHA-256 verified."""
    if str(name_or_path) in INVERSE_DYNAMICS:
        path = ASSETS / INVERSE_DYNAMICS[str(name_or_path)]
    elif str(name_or_path).endswith(".safetensors"):
        path = Path(name_or_path)
    else:
        raise CheckpointError(f"No inverse-dynamics model named {str(name_or_path)!r}; available: {', '.join(INVERSE_DYNAMICS)}, or a .safetensors path.")
    net, normalizer, meta = load_network(path)
    if meta["kind"] != "inverse-dynamics":
        raise CheckpointError(f"{path} holds a {meta['kind']!r} network, not an inverse-dynamics model.")
    return InverseDynamicsActions(net, normalizer, meta)


def load_run(diffuser_run: str | os.PathLike, value_run: str | os.PathLike | None = None, **planner_options) -> Planner:
    """A planner from training runs' checkpoints (their EMA weights), for example mid-training."""
    diffusion, normalizer, cfg = _from_checkpoint(diffuser_run, "diffuser")
    value, value_normalizer = _from_checkpoint(value_run, "value")[:2] if value_run is not None else (None, None)
    planner = Planner(diffusion, normalizer, value, {"config": cfg}, **planner_options)  # checks the shapes first
    if value_normalizer is not None:
        check_same_data(normalizer, value_normalizer)
    return planner


def check_same_data(diffuser_normalizer: Normalizer, value_normalizer: Normalizer) -> None:
    """Refuse a denoiser and a value network whose normalizers differ: they were trained on different data."""
    if not diffuser_normalizer.matches(value_normalizer):
        raise ValueError("The denoiser and the value network were trained with different normalizers (different data?).")


def _from_checkpoint(run: str | os.PathLike, kind: str):
    path = Path(run)
    path = path / "checkpoint.pt" if path.is_dir() else path
    state = load_checkpoint(path, kind=kind)
    net, _ = build_network(kind, state["config"], state["transition_dim"], state["action_dim"])
    _load_state(net, state["ema"], path)
    return net, Normalizer.from_state_dict(state["normalizer"]), state["config"]


def _load_state(net: torch.nn.Module, tensors: dict, path: Path) -> None:
    try:
        net.load_state_dict(tensors)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{path} does not fit the network its configuration describes ({first[0] if first else exc}).") from None


# ----------------------------------------------------------------------------- export / import


def export_network(checkpoint: str | os.PathLike, out: str | os.PathLike, extra: dict | None = None, kind: str | None = None) -> dict:
    """Write a training checkpoint's EMA weights and normalizer as safetensors + JSON sidecar; returns the sidecar.

    ``kind``: refuse (before writing anything) a checkpoint of another kind.
    """
    from safetensors.torch import save as st_save

    from diffusion_rl.training import read_loss_log

    checkpoint = Path(checkpoint)
    checkpoint = checkpoint / "checkpoint.pt" if checkpoint.is_dir() else checkpoint
    state = load_checkpoint(checkpoint, kind=kind)
    kind = state.get("kind")
    if kind not in CONFIGS:
        raise CheckpointError(f"{checkpoint} is a {kind!r} checkpoint, not a {', '.join(CONFIGS)} one.")
    tensors = {f"net.{k}": v.contiguous() for k, v in state["ema"].items()}
    norm = state["normalizer"]
    tensors["normalizer.shift"], tensors["normalizer.scale"] = norm["shift"].contiguous(), norm["scale"].contiguous()
    out = Path(out)
    atomic_write_bytes(out, st_save(tensors))
    log = read_loss_log(checkpoint.parent) if (checkpoint.parent / "loss.csv").exists() else []
    meta = {
        "file": out.name,
        "kind": kind,
        "config": state["config"],
        "dataset_id": state["config"]["dataset_id"],
        "action_dim": int(state["action_dim"]),
        "transition_dim": int(state["transition_dim"]),
        "normalizer_kind": norm["kind"],
        "seed": state["config"]["seed"],
        "steps": int(state["step"]),
        "wall_time_s": round(float(state["wall_time"]), 1),
        "final_loss": log[-1]["loss"] if log else None,
        "loss_curve": [[r["step"], r["loss"]] for r in log[:: max(1, len(log) // 100)]],
        "train_command": train_command(CONFIGS[kind](**state["config"]), f"runs/{kind}-h{state['config']['horizon']}"),
        **({"validation": state["validation"]} if "validation" in state else {}),
        **(extra or {}),
        "sha256": sha256_file(out),
    }
    atomic_write_json(out.with_suffix(".json"), meta)
    return meta


def read_sidecar(path: str | os.PathLike) -> dict:
    """The JSON sidecar of a weight file."""
    side = Path(path).with_suffix(".json")
    if not side.exists():
        raise CheckpointError(f"{path} has no sidecar {side.name}; weights are only loaded together with their sidecar.")
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"The sidecar {side} is not valid JSON ({exc}).") from None


def _base_tensors(path: Path, source: dict) -> dict:
    """The pretrained denoiser a fine-tuned file builds on (it stores only its tuned steps), SHA-256 checked."""
    from safetensors.torch import load_file

    base = path.parent / source["file"]
    base = base if base.exists() else ASSETS / source["file"]
    if not base.exists() or sha256_file(base) != source["sha256"]:
        raise CheckpointError(f"{path} was fine-tuned from {source['file']} with SHA-256 {source['sha256'][:12]}..., "
                              "which is missing or different here: refusing to load it.")
    return {"net.model.base." + k.removeprefix("net.model."): v for k, v in load_file(str(base)).items() if k.startswith("net.model.")}


def load_network(path: str | os.PathLike) -> tuple[GaussianDiffusion | ValueNet, Normalizer, dict]:
    """A denoiser or value network from safetensors + sidecar, after checking the SHA-256."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"The weight file {path} is missing. Reinstall the package, or export it with `python -m diffusion_rl export-planner`.")
    meta = read_sidecar(path)
    digest = sha256_file(path)
    if meta.get("sha256") != digest:
        raise CheckpointError(f"{path} does not match the SHA-256 in its sidecar (file {digest[:12]}..., sidecar {str(meta.get('sha256'))[:12]}...): refusing to load it.")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}).") from None
    kind = meta.get("kind")
    if kind not in CONFIGS:
        raise CheckpointError(f"{path}'s sidecar names kind {kind!r}; expected one of {', '.join(CONFIGS)}.")
    net, _ = build_network(kind, meta["config"], meta["transition_dim"], meta["action_dim"])
    if kind == "diffuser" and meta.get("finetune"):  # a fine-tuned planner: the pretrained network and its tuned copy
        from diffusion_rl.models import LevelSplit, TemporalUnet

        net.model = LevelSplit(net.model, TemporalUnet(net.model.cfg), int(meta["finetune"]["levels"]),
                               int(meta["finetune"].get("first_level", 0)))
        tensors = {**_base_tensors(path, meta["finetuned_from"]), **tensors}
    _load_state(net, {k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, path)
    try:
        normalizer = Normalizer(tensors["normalizer.shift"].numpy(), tensors["normalizer.scale"].numpy(), meta["normalizer_kind"])
    except KeyError:
        raise CheckpointError(f"{path} holds no normalizer statistics.") from None
    return net.eval(), normalizer, meta
