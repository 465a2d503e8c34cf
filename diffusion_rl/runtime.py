"""Process-wide compute settings: how many CPU threads torch uses for a piece of work.

Small per-step inference (an MLP on a batch of a few observations) is fastest on one thread,
and on a 2-core machine a second thread is worse than useless as soon as anything else runs:
torch's OpenMP threads wait on each other at every op and throughput drops 3-4x. Env loops
therefore run their policy inside ``torch_threads(1)``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["torch_threads"]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the enclosed block with ``n`` torch intra-op threads, then restore the previous count."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
