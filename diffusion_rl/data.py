"""Offline data: Minari datasets in, normalized trajectory windows out.

The planner learns from fixed-length windows of a trajectory. Each step of a window is one row

    [ a_t (act_dim) | s_t (obs_dim) ]          (Diffuser's layout: action first)

so a window is a ``(horizon, act_dim + obs_dim)`` array and row 0 holds the state the plan is
conditioned on. Shapes in this module are ``(batch, horizon, transition_dim)``.

End of an episode. Minari stores ``T`` actions and ``T + 1`` observations per episode. A window
starting at step ``t`` uses rows ``t .. t + H - 1``:

* in an episode that was *truncated* (the 1000-step time limit) the recording simply stops, so
  only windows that fit entirely inside it are used (``t <= T - H``);
* in an episode that *terminated* (the walker fell), the terminal state is absorbing, so windows
  may run past the end: missing rows repeat the final observation ``s_T`` with a zero action and
  reward. ``terminal`` marks every window that reaches the fall, whose value carries the
  termination penalty. The value function can only learn what a fall costs from those windows,
  and expert data has few: 8 of 99,697 in the shipped dataset (1 of its 101 episodes falls).
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

__all__ = [
    "DEFAULT_DATASET_ID",
    "DatasetError",
    "Episode",
    "Normalizer",
    "TrajectoryWindows",
    "Window",
    "check_dataset_shapes",
    "datasets_root",
    "discounted_returns",
    "is_complete_dataset",
    "load_dataset",
    "load_episodes",
    "local_dataset_path",
    "sample_states",
    "validate_dataset_id",
]

DEFAULT_DATASET_ID = "walker2d/local-expert-v0"
"""The dataset ``python -m diffusion_rl make-dataset`` builds from the shipped expert."""

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)*-v\d+$")
_MAKE_DATASET_HINT = "Build the local expert dataset with `python -m diffusion_rl make-dataset` and load it as '%s'."


class DatasetError(ValueError):
    """A dataset id, file or shape that the project cannot use; the message says what to do."""


# ----------------------------------------------------------------------------- ids and paths


def validate_dataset_id(dataset_id: str) -> str:
    """Check that ``dataset_id`` looks like ``namespace/name-vN`` and cannot escape the datasets folder."""
    if not isinstance(dataset_id, str) or not dataset_id:
        raise DatasetError(f"A dataset id must be a non-empty string like '{DEFAULT_DATASET_ID}', got {dataset_id!r}.")
    parts = dataset_id.split("/")
    if dataset_id.startswith(("/", "~")) or "\\" in dataset_id or any(p in ("", ".", "..") for p in parts):
        raise DatasetError(f"Dataset id {dataset_id!r} is a path, not an id: use the form 'namespace/name-v0'.")
    if not _ID_RE.match(dataset_id):
        raise DatasetError(
            f"Dataset id {dataset_id!r} is malformed: use letters, digits, '_', '-', '.', separated by '/', "
            f"ending in a version such as '-v0' (for example '{DEFAULT_DATASET_ID}')."
        )
    return dataset_id


def datasets_root() -> Path:
    """Minari's datasets folder: ``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``."""
    return Path(os.environ.get("MINARI_DATASETS_PATH") or Path.home() / ".minari" / "datasets")


def local_dataset_path(dataset_id: str) -> Path:
    """The folder a dataset id lives in locally (it may not exist)."""
    path = datasets_root().joinpath(*validate_dataset_id(dataset_id).split("/"))
    if datasets_root().resolve() not in path.resolve().parents:
        raise DatasetError(f"Dataset id {dataset_id!r} resolves outside {datasets_root()}.")
    return path


def is_complete_dataset(path: Path) -> bool:
    """Whether a local dataset folder was finished by Minari (its metadata is written last)."""
    return (path / "data" / "metadata.json").is_file()


# ----------------------------------------------------------------------------- loading


def _hub_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_dataset(dataset_id: str = DEFAULT_DATASET_ID, download: bool = True):
    """Load a Minari dataset: the local copy if present, else download it where a network allows.

    Offline, a remote id fails within a few seconds (not minari's long retries) with a
    :class:`DatasetError` that names the command building the local dataset.
    """
    import minari

    validate_dataset_id(dataset_id)
    path = local_dataset_path(dataset_id)
    if is_complete_dataset(path):
        try:
            return minari.load_dataset(dataset_id)
        except Exception as exc:
            raise DatasetError(
                f"The local dataset at {path} could not be read ({type(exc).__name__}: {exc}). Delete that folder "
                "and rebuild it with `python -m diffusion_rl make-dataset`."
            ) from None
    hint = _MAKE_DATASET_HINT % DEFAULT_DATASET_ID
    if not download:
        raise DatasetError(f"Dataset {dataset_id!r} is not in {datasets_root()}. {hint}")
    try:
        import huggingface_hub  # noqa: F401  (minari downloads through it)
    except ImportError:
        raise DatasetError(
            f"Dataset {dataset_id!r} is not in {datasets_root()} and downloading needs `pip install \"minari[hf]\"`. {hint}"
        ) from None
    t0 = time.perf_counter()
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
        raise DatasetError(
            f"Dataset {dataset_id!r} is not in {datasets_root()} and the dataset hub cannot be reached "
            f"(checked in {time.perf_counter() - t0:.1f} s). {hint}"
        )
    try:
        return minari.load_dataset(dataset_id, download=True)
    except Exception as exc:
        raise DatasetError(f"Downloading {dataset_id!r} failed ({type(exc).__name__}: {exc}). {hint}") from None


@dataclass(frozen=True)
class Episode:
    """One episode as arrays. observations: (T + 1, obs_dim); actions: (T, act_dim); rewards: (T,)."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: bool
    truncated: bool

    def __len__(self) -> int:
        return len(self.actions)

    def transitions(self) -> np.ndarray:
        """The episode as rows [a_t | s_t], shape (T, act_dim + obs_dim): the planner's layout."""
        return np.concatenate([self.actions, self.observations[: len(self)]], axis=1)

    def __repr__(self) -> str:
        return (
            f"Episode(T={len(self)}, observations={self.observations.shape}, actions={self.actions.shape}, "
            f"return={self.rewards.sum():.1f}, terminated={self.terminated}, truncated={self.truncated})"
        )


def check_dataset_shapes(obs_shape: tuple, act_shape: tuple, env_id: str | None = None) -> None:
    """Refuse a dataset whose observation or action shape differs from the environment's."""
    from diffusion_rl.envs import ENV_ID, make_env

    env = make_env(env_id or ENV_ID)
    want_obs, want_act = env.observation_space.shape, env.action_space.shape
    env.close()
    if tuple(obs_shape) != tuple(want_obs) or tuple(act_shape) != tuple(want_act):
        raise DatasetError(
            f"The dataset's observations {tuple(obs_shape)} and actions {tuple(act_shape)} do not fit "
            f"{env_id or ENV_ID}, which has observations {tuple(want_obs)} and actions {tuple(want_act)}. "
            "Use a Walker2d dataset (for example one built by `python -m diffusion_rl make-dataset`)."
        )


def load_episodes(dataset_or_id=DEFAULT_DATASET_ID, env_id: str | None = None) -> list[Episode]:
    """All episodes of a Minari dataset (or id) as :class:`Episode` arrays, shapes checked against the env."""
    ds = load_dataset(dataset_or_id) if isinstance(dataset_or_id, str) else dataset_or_id
    check_dataset_shapes(ds.observation_space.shape, ds.action_space.shape, env_id)
    return [
        Episode(
            observations=np.asarray(ep.observations, np.float32),
            actions=np.asarray(ep.actions, np.float32),
            rewards=np.asarray(ep.rewards, np.float32),
            terminated=bool(ep.terminations[-1]),
            truncated=bool(ep.truncations[-1]),
        )
        for ep in ds.iterate_episodes()
    ]


def sample_states(episodes: list[Episode], n: int, horizon: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random dataset states (n, obs_dim) and the ``horizon`` real states from each (n, horizon, obs_dim)."""
    rng = np.random.default_rng(seed)
    picks = [(e, int(rng.integers(0, len(episodes[e]) - horizon))) for e in rng.integers(0, len(episodes), n)]
    futures = np.stack([episodes[e].observations[t : t + horizon] for e, t in picks])
    return futures[:, 0].copy(), futures


# ----------------------------------------------------------------------------- normalizer


class Normalizer:
    """Per-dimension affine normalizer with an exact inverse.

    ``gaussian``: (x - mean) / std, as Diffuser. ``minmax``: maps each dimension's range to [-1, 1],
    as the study did for observations. Dimensions with no spread are left centred, not divided by 0.
    Shapes: any ``(..., dim)``.
    """

    def __init__(self, shift: np.ndarray, scale: np.ndarray, kind: str):
        self.shift = np.asarray(shift, np.float64)
        self.scale = np.asarray(scale, np.float64)
        self.kind = kind

    @classmethod
    def fit(cls, x: np.ndarray, kind: Literal["gaussian", "minmax"] = "gaussian", eps: float = 1e-6) -> Normalizer:
        """Fit the statistics of ``x`` of shape (N, dim)."""
        x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
        if kind == "gaussian":
            shift, scale = x.mean(0), x.std(0)
        elif kind == "minmax":
            lo, hi = x.min(0), x.max(0)
            shift, scale = (hi + lo) / 2, (hi - lo) / 2
        else:
            raise ValueError(f"Unknown normalizer kind {kind!r}: use 'gaussian' or 'minmax'.")
        return cls(shift, np.where(scale < eps, 1.0, scale), kind)

    def normalize(self, x):
        """Map data to the normalized space (numpy or torch in, same type out)."""
        shift, scale = self._as(x)
        return (x - shift) / scale

    def unnormalize(self, x):
        """Exact inverse of :meth:`normalize`."""
        shift, scale = self._as(x)
        return x * scale + shift

    def _as(self, x):
        if isinstance(x, torch.Tensor):
            return (torch.as_tensor(self.shift, dtype=x.dtype, device=x.device), torch.as_tensor(self.scale, dtype=x.dtype, device=x.device))
        return self.shift.astype(np.asarray(x).dtype, copy=False), self.scale.astype(np.asarray(x).dtype, copy=False)

    def matches(self, other: Normalizer) -> bool:
        """Whether two normalizers map data the same way (the same data, so their networks belong together)."""
        return self.kind == other.kind and np.allclose(self.shift, other.shift) and np.allclose(self.scale, other.scale)

    def state_dict(self) -> dict:
        """Tensors and a kind, for self-describing checkpoints."""
        return {"shift": torch.from_numpy(self.shift.copy()), "scale": torch.from_numpy(self.scale.copy()), "kind": self.kind}

    @classmethod
    def from_state_dict(cls, state: dict) -> Normalizer:
        """Rebuild from :meth:`state_dict`."""
        return cls(np.asarray(state["shift"]), np.asarray(state["scale"]), str(state["kind"]))

    def __repr__(self) -> str:
        return f"Normalizer(kind={self.kind!r}, dim={self.shift.shape[0]})"


# ----------------------------------------------------------------------------- returns


def discounted_returns(rewards: np.ndarray, discount: float, terminated: bool = False, termination_penalty: float = 0.0) -> np.ndarray:
    """Discounted return-to-go from every step of one episode: G_t = sum_k discount^k r_{t+k}.

    A terminated episode adds ``termination_penalty`` to its last reward (Diffuser uses -100).
    """
    r = np.asarray(rewards, np.float64).copy()
    if terminated and len(r):
        r[-1] += termination_penalty
    out = np.zeros_like(r)
    acc = 0.0
    for t in range(len(r) - 1, -1, -1):
        acc = r[t] + discount * acc
        out[t] = acc
    return out


# ----------------------------------------------------------------------------- windows


class Window(NamedTuple):
    """One training example. trajectory: (H, act_dim + obs_dim) normalized; value: (); terminal: () bool,
    whether the window reaches its episode's fall (so its value carries the termination penalty)."""

    trajectory: torch.Tensor
    value: torch.Tensor
    terminal: torch.Tensor


class TrajectoryWindows(torch.utils.data.Dataset):
    """Every window of ``horizon`` steps in a list of episodes, normalized, with its return.

    ``value`` is the discounted return counted from the window's first step: to the end of the
    episode (``value_scope="episode"``, Diffuser) or inside the window only (``"window"``, the study).
    """

    def __init__(
        self,
        episodes: Iterable[Episode],
        horizon: int = 8,
        normalizer: Normalizer | str = "gaussian",
        discount: float = 0.99,
        termination_penalty: float = 0.0,
        value_scope: Literal["episode", "window"] = "episode",
        pad_terminal: bool = True,
    ):
        episodes = list(episodes)
        if not episodes:
            raise DatasetError("No episodes to build windows from.")
        if not isinstance(horizon, int) or horizon < 1:
            raise DatasetError(f"horizon must be a positive integer, got {horizon!r}.")
        if value_scope not in ("episode", "window"):
            raise DatasetError(f"value_scope must be 'episode' or 'window', got {value_scope!r}.")
        self.horizon, self.discount, self.value_scope = horizon, discount, value_scope
        self.act_dim = episodes[0].actions.shape[1]
        self.obs_dim = episodes[0].observations.shape[1]
        self.transition_dim = self.act_dim + self.obs_dim

        rows, terminal, values, starts, offset = [], [], [], [], 0
        for ep in episodes:
            T = len(ep)
            x = ep.transitions()
            rew = ep.rewards.astype(np.float64).copy()
            if ep.terminated:
                rew[-1] += termination_penalty
            pad = horizon - 1 if (ep.terminated and pad_terminal) else 0
            if pad:
                absorbing = np.concatenate([np.zeros((pad, self.act_dim), np.float32), np.repeat(ep.observations[T:T + 1], pad, 0)], 1)
                x = np.concatenate([x, absorbing])
                rew = np.concatenate([rew, np.zeros(pad)])
            n_starts = T if pad else T - horizon + 1
            if n_starts <= 0:
                continue
            if value_scope == "episode":
                v = discounted_returns(ep.rewards, discount, ep.terminated, termination_penalty)[:n_starts]
            else:
                kernel = discount ** np.arange(horizon)
                v = np.lib.stride_tricks.sliding_window_view(rew, horizon)[:n_starts] @ kernel
            rows.append(x.astype(np.float32))
            terminal.append(np.arange(n_starts) >= T - horizon if ep.terminated else np.zeros(n_starts, bool))
            values.append(v)
            starts.append(offset + np.arange(n_starts))
            offset += len(x)
        if not starts:
            raise DatasetError(f"Every episode is shorter than the horizon {horizon}: no windows fit.")

        raw = np.concatenate(rows)
        self.normalizer = normalizer if isinstance(normalizer, Normalizer) else Normalizer.fit(raw, normalizer)
        self.data = torch.from_numpy(self.normalizer.normalize(raw).astype(np.float32))
        self.terminal = torch.from_numpy(np.concatenate(terminal))
        self.values = torch.from_numpy(np.concatenate(values).astype(np.float32))
        self.starts = torch.from_numpy(np.concatenate(starts))
        self._steps = torch.arange(horizon)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> Window:
        w = self.batch(torch.as_tensor([i]))
        return Window(w.trajectory[0], w.value[0], w.terminal[0])

    def batch(self, idx: torch.Tensor) -> Window:
        """A batch of windows by index, gathered in one indexing op. Shapes: (B, H, D), (B,), (B,)."""
        rows = self.starts[idx][:, None] + self._steps
        return Window(self.data[rows], self.values[idx], self.terminal[idx])

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Window:
        """A uniformly random batch of windows."""
        return self.batch(torch.randint(len(self), (batch_size,), generator=generator))

    def __repr__(self) -> str:
        return (
            f"TrajectoryWindows(windows={len(self)}, horizon={self.horizon}, transition_dim={self.transition_dim} "
            f"[action {self.act_dim} | observation {self.obs_dim}], {self.normalizer}, value_scope={self.value_scope!r}, "
            f"terminal={int(self.terminal.sum())})"
        )

