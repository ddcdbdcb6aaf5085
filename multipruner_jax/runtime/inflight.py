"""A bound on dispatched-but-unfinished programs (works around an XLA:CPU deadlock).

XLA:CPU (jaxlib 0.10.2) gives each device a fixed number of execution slots (32). A program that
spans several devices is launched onto each of them by separate tasks, which may take slots out
of order; with more than about 32 programs queued, one device's slots can all be held by later
executions while the earlier one that they wait for cannot get a slot. When the earlier program
holds a collective (an all-reduce or all-gather over the "model" axis), its other devices wait
at the rendezvous forever and XLA aborts after 40 s. Keeping only a few programs in flight
avoids this at no cost (a program of a layer or of one parameter keeps the device busy far
longer than the next dispatch takes).
"""

from __future__ import annotations

from collections import deque
from typing import TypeVar

import jax

T = TypeVar("T")

DEPTH = 8


class InFlight:
    """Waits for the oldest of the outputs handed to ``add`` once more than ``depth`` are
    outstanding."""

    def __init__(self, depth: int = DEPTH):
        self.depth = depth
        self._pending: deque = deque()

    def add(self, out: T) -> T:
        """Record ``out`` (any pytree of arrays) as dispatched; returns it unchanged."""
        self._pending.append(out)
        while len(self._pending) > self.depth:
            jax.block_until_ready(self._pending.popleft())
        return out
