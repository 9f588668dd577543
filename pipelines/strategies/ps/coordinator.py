"""The parameter server's bookkeeping actor: worker clocks, positions and epoch reports.

Workers tell it, after each push, how many pushes they have made (their clock) and where
they are in the data. With a staleness bound K it is also the stale-synchronous barrier:
`advance` returns only once the caller is at most K clocks ahead of the slowest live
worker, and it records the gap it let through so a run can prove the bound held.
It never touches a tensor: the parameters flow between workers and shards directly.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter


class Coordinator:
    def __init__(self, world: int, staleness: int | None, resumed: dict | None = None):
        """`resumed`: the clocks, positions and pending epoch reports of a run's earlier
        attempt (`progress.load`), which its resumed workers carry on from."""
        resumed = resumed or {}
        self.staleness = staleness
        self.clocks = {rank: resumed.get("clocks", {}).get(rank, 0) for rank in range(world)}
        self.positions: dict[int, tuple[int, int]] = dict(resumed.get("positions", {}))
        """rank -> (epoch, next step) after its last push: where a replacement resumes."""
        self.live = set(range(world))
        self.epochs: dict[int, dict[int, dict]] = {e: dict(r) for e, r in resumed.get("epochs", {}).items()}
        self.gaps: Counter[int] = Counter()
        self.first_step_at: float | None = None
        self.changed = asyncio.Condition()

    async def advance(self, rank: int, clock: int, epoch: int, step: int) -> int:
        """Record a push; under a staleness bound, wait until `rank` may compute the next one."""
        if self.first_step_at is None:
            self.first_step_at = time.time()
        async with self.changed:
            self.clocks[rank] = clock
            self.positions[rank] = (epoch, step)
            self.changed.notify_all()
            if self.staleness is not None:
                await self.changed.wait_for(lambda: clock - self._slowest() <= self.staleness)
                self.gaps[clock - self._slowest()] += 1
        return self._slowest()

    async def retire(self, rank: int) -> None:
        """`rank` has finished (or is given up): it no longer holds the others back."""
        async with self.changed:
            self.live.discard(rank)
            self.changed.notify_all()

    async def epoch_done(self, rank: int, epoch: int, stats: dict) -> None:
        """A worker ended `epoch`; a worker that took it up where another left it (a resumed
        run's) adds its part to what was reported before."""
        reports = self.epochs.setdefault(epoch, {})
        earlier = reports.get(rank)
        if earlier is not None:
            stats = {"loss_sum": earlier["loss_sum"] + stats["loss_sum"],
                     "steps": earlier["steps"] + stats["steps"],
                     "samples": earlier["samples"] + stats["samples"],
                     "began": min(earlier["began"], stats["began"]), "ended": max(earlier["ended"], stats["ended"]),
                     "link_wait_s": earlier.get("link_wait_s", 0.0) + stats.get("link_wait_s", 0.0)}
        reports[rank] = stats

    async def position(self, rank: int) -> tuple[int, int, int] | None:
        """(epoch, step, clock) to resume `rank` from, or None if it never pushed."""
        if rank not in self.positions:
            return None
        return (*self.positions[rank], self.clocks[rank])

    async def report(self, from_epoch: int = 0) -> dict:
        """Epoch reports from `from_epoch` on (the driver polls: keep the reply small)."""
        return {"epochs": {e: r for e, r in self.epochs.items() if e >= from_epoch},
                "gaps": dict(self.gaps), "first_step_at": self.first_step_at,
                "clocks": dict(self.clocks), "positions": dict(self.positions)}

    def _slowest(self) -> int:
        live = [self.clocks[r] for r in self.live]
        return min(live) if live else max(self.clocks.values())
