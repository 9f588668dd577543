"""Progress within a long epoch: the fraction done and the rows read per second.

An epoch of a table larger than memory can take minutes; the per-epoch line alone would
leave the terminal silent that long. Every `every_s` seconds within an epoch (none for an
epoch shorter than that) one line says how far it is: "epoch 3/10  42% (1,218 of 2,900
steps)  rows/s 51,230", rows counted over all data-parallel workers.
"""
from __future__ import annotations

import time
from typing import Callable

PROGRESS_EVERY_S = 20.0


class EpochProgress:
    def __init__(self, say: Callable[[str], None] | None, epoch: int, epochs: int, steps: int,
                 world: int = 1, every_s: float = PROGRESS_EVERY_S, clock: Callable[[], float] = time.perf_counter):
        self.say, self.epoch, self.epochs, self.steps, self.world = say, epoch, epochs, steps, world
        self.every_s, self.clock = every_s, clock
        self.began = self.last = clock()

    def __call__(self, steps_done: int, rows_done: int) -> None:
        """After a step: say where the epoch is if `every_s` passed since the last line."""
        if self.say is None:
            return
        now = self.clock()
        if now - self.last < self.every_s:
            return
        self.last = now
        share = f"{100 * steps_done / self.steps:.0f}% " if self.steps else ""
        rate = rows_done * self.world / max(now - self.began, 1e-9)
        self.say(f"epoch {self.epoch + 1}/{self.epochs}  {share}({steps_done:,} of {self.steps:,} steps)  "
                 f"rows/s {rate:,.0f}")
