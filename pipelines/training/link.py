"""A slow link between the data-parallel workers, made real on one machine
(`resources.link_mbps`): each exchange a worker starts waits the time its bytes would take
over a link of that speed, so that a run on one machine shows the regime of a cross-node
link (issue 22: local SGD pays where communication is expensive).

What each strategy sends through it, per worker:
- `allreduce`: each DDP bucket's ring allreduce, 2 (W - 1) / W of the bucket, waited for in
  DDP's communication hook, on the backward pass's thread: no overlap with compute (a
  pessimistic link; NCCL and gloo overlap buckets with the rest of the backward).
- `ps`: each push of the gradient slices (float32 or bfloat16 on the wire), before it leaves.
- `diloco`: each round's pseudo-gradient, before it is sent back.
Pulls and the driver's broadcasts are not throttled: a worker's uplink is the modelled
bottleneck, as in the bytes each strategy reports (`bytes_sent_per_worker`).
"""
from __future__ import annotations

import time


def transfer_seconds(nbytes: float, mbps: float) -> float:
    """Seconds `nbytes` take over a link of `mbps` megabits per second (0: no link)."""
    return nbytes * 8 / (mbps * 1e6) if mbps > 0 else 0.0


class Link:
    """One worker's side of the modelled link; counts what it waited."""

    def __init__(self, mbps: float):
        self.mbps = mbps
        self.waited_s = 0.0

    def send(self, nbytes: float) -> None:
        seconds = transfer_seconds(nbytes, self.mbps)
        if seconds > 0:
            time.sleep(seconds)
            self.waited_s += seconds


def throttle_ddp(model, link: Link, world: int):
    """DDP `model` whose every bucket's allreduce first waits on `link` for the bytes a
    ring allreduce sends of it; other models as they are (one worker sends nothing)."""
    from torch.nn.parallel import DistributedDataParallel

    if link.mbps <= 0 or world < 2 or not isinstance(model, DistributedDataParallel):
        return model
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def throttled_allreduce(process_group, bucket):
        buffer = bucket.buffer()
        link.send(2 * (world - 1) / world * buffer.numel() * buffer.element_size())
        return allreduce_hook(process_group, bucket)

    model.register_comm_hook(None, throttled_allreduce)
    return model
