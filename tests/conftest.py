"""Shared fixtures: every test gets its own Minari folder and a single torch thread.

The browser test's book build (test_book.py) is the suite's longest single job. It starts in the
background as soon as the tests are collected, on the second core, while every other test and
notebook runs on the first; test_book.py's tests run last and wait for it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import diffusion_rl  # noqa: F401  (sets MUJOCO_GL before anything imports mujoco)

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def minari_root(tmp_path, monkeypatch):
    """Point Minari at a fresh folder so tests never touch the user's datasets."""
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


@pytest.fixture(scope="session")
def expert_replay() -> list[float]:
    """The shipped expert's first two scored episodes, replayed here (one thread, as every test runs): their returns."""
    from diffusion_rl.envs import EVAL_SEEDS
    from diffusion_rl.expert import evaluate_policy, load_policy

    actor, _ = load_policy()
    return [float(r) for r in evaluate_policy(actor, EVAL_SEEDS[:2], deterministic=True)]


@pytest.fixture(scope="session")
def foreign_cpu(expert_replay) -> str | None:
    """A one-line reason to skip where this CPU does not compute the recording machine's bits; None where it does.

    A walker's episode turns a last-bit difference in a matrix product into another return, and MKL and
    oneDNN pick their kernels by CPU generation, so shipped per-episode numbers replay exactly only on
    CPUs whose kernels round as the recording machine's did. The check: the expert's replayed episodes
    give its sidecar's returns to the cent.
    """
    from diffusion_rl.envs import EVAL_SEEDS
    from diffusion_rl.expert import load_policy

    got, want = [round(r, 2) for r in expert_replay], load_policy()[1]["eval_deterministic"]["returns"][:2]
    if got == want:
        return None
    return (f"this CPU's floating-point kernels differ from the recording machine's (the expert's seeds "
            f"{EVAL_SEEDS[0]} and {EVAL_SEEDS[1]} return {got}, its sidecar {want}), so shipped episodes cannot replay exactly")


@pytest.fixture(scope="session")
def tiny_policy():
    """A small untrained actor as a noisy policy: fast, and it falls quickly (short episodes)."""
    from diffusion_rl.expert import Actor

    torch.manual_seed(0)
    actor = Actor(17, 6, hidden=32)

    def policy(obs: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return actor.act(obs, noise=noise)

    return policy


def tiny_common(dataset_id: str) -> dict:
    """Options shared by the tiny denoiser and value runs the test modules train (seconds on a CPU).

    The device is pinned to the CPU, where the bit-for-bit resume tests hold also on a machine with a
    GPU; tests/test_cuda.py covers the GPU.
    """
    return {"dataset_id": dataset_id, "horizon": 4, "dim": 8, "dim_mults": "1,2", "n_diffusion_steps": 5, "batch_size": 8,
            "log_every": 10, "ema_start": 20, "ema_every": 2, "threads": 1, "device": "cpu"}


def module_dataset(dataset_id: str):
    """Fixtures giving a test module one tiny dataset: ``shared_root, minari_root = module_dataset(DATA)``."""

    @pytest.fixture(scope="module")
    def shared_root(tmp_path_factory, tiny_policy):
        return tiny_dataset(tmp_path_factory, tiny_policy, dataset_id)

    @pytest.fixture(autouse=True)
    def minari_root(shared_root, monkeypatch):
        monkeypatch.setenv("MINARI_DATASETS_PATH", str(shared_root))
        return shared_root

    return shared_root, minari_root


def tiny_dataset(tmp_path_factory, policy, dataset_id: str) -> Path:
    """A 6-episode dataset of ``policy`` (short episodes that fall) in its own Minari folder, for module fixtures."""
    from diffusion_rl.collect import make_dataset

    root = tmp_path_factory.mktemp("minari")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(root))
        make_dataset(dataset_id, n_episodes=6, policy=policy, progress=False)
    return root


def tiny_runs(root: Path, tmp_path_factory, diffuser_cfg, value_cfg) -> tuple[Path, Path]:
    """Train a tiny denoiser and value net on the dataset under ``root``; returns their run folders."""
    from diffusion_rl.training import train

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(root))
        d, v = tmp_path_factory.mktemp("d"), tmp_path_factory.mktemp("v")
        train(diffuser_cfg, d, progress=False)
        train(value_cfg, v, progress=False)
    return d, v


def kill_at_first_checkpoint(args: list[str], checkpoint: Path, timeout: float = 120) -> None:
    """Start the command ``args`` and SIGKILL it as soon as ``checkpoint`` exists (or after ``timeout`` s)."""
    import signal

    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and not checkpoint.exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def poison_loss(monkeypatch, name: str, at_call: int) -> None:
    """Make ``diffusion_rl.training.<name>`` (a loss function) return NaN on its ``at_call``-th call."""
    import diffusion_rl.training as tr

    real, calls = getattr(tr, name), {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] == at_call else loss

    monkeypatch.setattr(tr, name, poisoned)


class BookBuild:
    """`jupyter-book build` of the whole book into a temporary folder, running in the background."""

    def __init__(self):
        root = Path(__file__).resolve().parents[1]
        self.out = Path(tempfile.mkdtemp(prefix="diffusion-rl-book-"))
        self.log = open(self.out / "build.log", "w+")
        jb = shutil.which("jupyter-book") or str(Path(sys.executable).with_name("jupyter-book"))
        # One thread per notebook kernel: the build shares the machine with the rest of the suite.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([jb, "build", str(root), "--path-output", str(self.out), "-W", "--keep-going"],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def html(self, timeout: float = 1800) -> Path:
        """Wait for the build; the built HTML folder, or a failure with the build's last output."""
        code = self.proc.wait(timeout=timeout)
        print(f"book built in {time.perf_counter() - self.t0:.0f} s (beside the other tests)")
        self.log.seek(0)
        assert code == 0, self.log.read()[-8000:]
        return self.out / "_build" / "html"

    def close(self) -> None:
        """Stop the build if it still runs, and remove its folder."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.out, ignore_errors=True)


def pytest_collection_modifyitems(session, config, items):
    """Move the book's tests last and start their build now, so that it runs beside everything else."""
    book = [item for item in items if item.path.name == "test_book.py"]
    if book and not config.getoption("collectonly"):
        items[:] = [item for item in items if item.path.name != "test_book.py"] + book
        config.book_build = BookBuild()


def pytest_unconfigure(config):
    build = getattr(config, "book_build", None)
    if build is not None:
        build.close()
