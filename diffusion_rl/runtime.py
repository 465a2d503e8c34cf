"""Where and how work runs: torch CPU threads, the device, and stopping cleanly on a signal.

Small per-step inference (an MLP on a batch of a few observations) is fastest on one thread,
and on a 2-core machine a second thread is worse than useless as soon as anything else runs:
torch's OpenMP threads wait on each other at every op and throughput drops 3-4x. Env loops
therefore run their policy inside ``torch_threads(1)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["StopOnSignal", "pick_device", "torch_threads"]


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
