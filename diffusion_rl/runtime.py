"""Where and how work runs: torch CPU threads, the device, and stopping cleanly on a signal.

Small per-step inference (an MLP on a batch of a few observations) is fastest on one thread,
and on a 2-core machine a second thread is worse than useless as soon as anything else runs:
torch's OpenMP threads wait on each other at every op and throughput drops 3-4x. Env loops
therefore run their policy inside ``torch_threads(1)``.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["StopOnSignal", "display_path", "pick_device", "portable_command", "torch_threads"]


def _portable_arg(arg: str, cwd: Path) -> str:
    """One argument with its absolute path, if any, made relative to ``cwd`` or cut to its last two parts."""
    opt, eq, value = arg.partition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
    if not os.path.isabs(value):
        return arg
    path = Path(value)
    if path.is_relative_to(cwd):
        return opt + eq + (path.relative_to(cwd).as_posix() or ".")
    # Outside the working tree the folder says nothing to another machine; keep what names the file.
    return opt + eq + "/".join(["...", *path.parts[-2:]])


def display_path(path: str | os.PathLike) -> str:
    """A folder as printed where others read it (the book's pages): relative, ``~/...`` or ``$TMPDIR/...``.

    The book shows what the chapters print, so an absolute path would publish the folders of the
    machine that built it.
    """
    import tempfile

    p = Path(path).expanduser().absolute()
    for base, label in ((Path.cwd(), ""), (Path(tempfile.gettempdir()), "$TMPDIR/"), (Path.home(), "~/")):
        base = base.absolute()
        if p.is_relative_to(base):
            rel = p.relative_to(base).as_posix()
            return (label + rel) if label else (rel if rel != "." else ".")
    return str(path)


def portable_command(args: Sequence[str], program: str = "python -m diffusion_rl", cwd: str | os.PathLike | None = None) -> str:
    """The command line recorded in shipped files: no absolute paths or home folders of the machine that ran it."""
    here = Path(cwd or os.getcwd()).resolve()
    return " ".join([program, *(shlex.quote(_portable_arg(a, here)) for a in args)])


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the enclosed block with ``n`` torch intra-op threads, then restore the previous count."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class StopOnSignal:
    """Turn SIGTERM/SIGINT into a request to checkpoint and stop at the end of the current step."""

    def __init__(self):
        import signal

        self.requested, self._old = False, {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: keep the default behaviour
                pass

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: a CUDA device when one is present (a Colab GPU runtime), else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"Unknown device {device!r}: use 'auto', 'cpu' or 'cuda'.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device here; use 'auto' or 'cpu'.")
    return dev
