"""A stage's receives for one mini-batch, posted ahead of the actions that use them.

A blocking `recv` issued when its action comes up starts the transfer only then: gloo's
pair hands the tensor over once the receiving side has posted its buffer, so the stage waited
for the hand-shake and the copy even when the sender had finished long before (a 1F1B
stage spent 6.5-12 % of its samples in `recv`, py-spy, 2026-12-07). Posting the next
receives while the current action computes lets the transfer run under that computation;
the action then waits only for what has not arrived. Receives are posted in the
schedule's order, so messages on one link and tag still match in the order they were sent,
and waits happen where the blocking receives were: a schedule that `schedules.simulate`
accepts still runs without deadlock.
"""
from __future__ import annotations

from bisect import bisect_right

import torch
import torch.distributed as dist


class Inbox:
    def __init__(self, wanted: list, device: torch.device, ahead: int = 2):
        """`wanted[k]`: (peer rank, shape, tag) of the tensor action k receives, or None;
        `ahead`: how many receives past the current action stay posted."""
        self._wanted, self._device, self._ahead = wanted, device, ahead
        self._order = [k for k, w in enumerate(wanted) if w is not None]
        self._posted: dict[int, tuple[torch.Tensor, object]] = {}
        self._next = 0

    def before(self, k: int) -> None:
        """Called as action k starts: every receive up to k's, and `ahead` more, posted."""
        limit = min(len(self._order), bisect_right(self._order, k) + self._ahead)
        while self._next < limit:
            action = self._order[self._next]
            peer, shape, tag = self._wanted[action]
            buffer = torch.empty(shape, device=self._device)
            self._posted[action] = (buffer, dist.irecv(buffer, peer, tag=tag))
            self._next += 1

    def take(self, k: int) -> torch.Tensor:
        """Action k's tensor, once it has arrived."""
        buffer, work = self._posted.pop(k)
        work.wait()
        return buffer

    def drained(self) -> bool:
        return not self._posted and self._next == len(self._order)
