"""An L-BFGS parameter shard: its slice of every vector of the algorithm, and the commands
that do the vector arithmetic there (DistBelief's Sandblaster).

A shard holds its slice of the parameters x, the gradient g, the direction d, the previous
gradient, the gradients of the line search's trial points, and of the history pairs
(s_i, y_i). The coordinator sends short *programs*: lists of commands whose arguments are
slot names and scalars (``("axpy", "q", -0.3, "y", 4)``). Commands that reduce (dot
products, norms) return this shard's partial, and `ShardGroup` sums the partials over
shards in shard order. So the coordinator moves only scalars, and one program is one
round trip however many commands it holds: the two-loop recursion costs one round trip
per history pair and direction, not one per vector operation.

Workers deposit each portion's gradient slice here, tagged with the evaluation and the
attempt that computed it; `combine` sums the attempts the coordinator names, in portion
order, so the result does not depend on which worker answered first or on a dead worker's
half-delivered deposits.
"""
from __future__ import annotations

import time
from collections import deque

import numpy as np
import torch

from pipelines.errors import quiet_numpy_views
from pipelines.training.flat import ShardLayout

# Arrays arriving through Ray's object store are read-only views; a shard only reads them.
quiet_numpy_views()

REDUCE = {"dot": "sum", "abs_sum": "sum", "abs_max": "max", "step_max": "max",
          "hist_dot": "sum", "penalty": "sum"}
"""Commands that return a partial, and how the partials of the shards combine."""


class LbfgsShard:
    def __init__(self, index: int, x: torch.Tensor, history: int, state: dict | None = None):
        torch.set_num_threads(1)  # a few vector operations per call
        self.index, self.history = index, history
        self.slots: dict[str, torch.Tensor] = {"x": x.detach().clone().float()}
        self.s: deque[torch.Tensor] = deque()
        self.y: deque[torch.Tensor] = deque()
        self.deposits: dict[int, dict[tuple[int, int], torch.Tensor]] = {}
        self.combined_upto = -1
        if state:
            self.slots.update({k: v.clone() for k, v in state["slots"].items()})
            self.s, self.y = deque(state["s"]), deque(state["y"])
        self.built_at = time.time()

    def built(self) -> float:
        """When this actor's constructor ended (wall clock, for the start-up timeline)."""
        return self.built_at

    # --- from the workers ------------------------------------------------------------------

    def read(self, slot: str) -> np.ndarray:
        return self.slots[slot].numpy()

    def deposit(self, evaluation: int, portion: int, attempt: int, gradient: np.ndarray) -> None:
        if evaluation <= self.combined_upto:
            return  # a backup's late answer to an evaluation already summed
        self.deposits.setdefault(evaluation, {})[(portion, attempt)] = torch.from_numpy(gradient)

    # --- from the coordinator --------------------------------------------------------------

    def run(self, program: list[tuple]) -> list[float]:
        """Execute the commands in order; return the partials of the reducing ones."""
        out = []
        for command, *args in program:
            value = getattr(self, f"_{command}")(*args)
            if command in REDUCE:
                out.append(float(value))  # a float32 value, exactly
        return out

    def state(self) -> dict:
        """What a checkpoint needs to continue this shard's part of the algorithm."""
        keep = ("x", "g", "d", "prev_g")
        return {"slots": {k: v.clone() for k, v in self.slots.items() if k in keep},
                "s": [v.clone() for v in self.s], "y": [v.clone() for v in self.y]}

    # --- the commands: torch.optim.LBFGS's vector operations, on this slice ----------------

    def _copy(self, dst, src):
        self.slots[dst] = self.slots[src].clone()

    def _neg(self, dst, src):
        self.slots[dst] = self.slots[src].neg()

    def _sub(self, dst, a, b):
        self.slots[dst] = self.slots[a].sub(self.slots[b])

    def _scale(self, dst, src, alpha):
        self.slots[dst] = self.slots[src].mul(alpha)

    def _axpy(self, dst, alpha, src):
        self.slots[dst].add_(self.slots[src], alpha=alpha)

    def _point(self, dst, base, alpha, direction):
        """dst = base + alpha * direction (the line search's trial point)."""
        self.slots[dst] = self.slots[base].add(self.slots[direction], alpha=alpha)

    def _rename(self, dst, src):
        self.slots[dst] = self.slots.pop(src) if dst != src else self.slots[src]

    def _free(self, *names):
        for name in names:
            self.slots.pop(name, None)

    def _dot(self, a, b):
        return self.slots[a].dot(self.slots[b])

    def _abs_sum(self, a):
        return self.slots[a].abs().sum()

    def _abs_max(self, a):
        return self.slots[a].abs().max()

    def _step_max(self, direction, alpha):
        """max |alpha * direction| (torch's lack-of-progress test)."""
        return self.slots[direction].mul(alpha).abs().max()

    def _remember(self, y, s):
        """Append the pair (s, y) to the history, dropping the oldest beyond its size."""
        if len(self.y) == self.history:
            self.y.popleft()
            self.s.popleft()
        self.y.append(self.slots.pop(y))
        self.s.append(self.slots.pop(s))

    def _forget(self):
        self.y.clear()
        self.s.clear()

    def _hist_dot(self, which, i, b):
        return getattr(self, which)[i].dot(self.slots[b])

    def _hist_axpy(self, dst, alpha, which, i):
        self.slots[dst].add_(getattr(self, which)[i], alpha=alpha)

    def _combine(self, dst, evaluation, attempts, weight_decay, point):
        """dst = the sum of the named attempts' gradients in portion order (+ weight decay)."""
        found = self.deposits.pop(evaluation)
        self.combined_upto = max(self.combined_upto, evaluation)
        for stale in [e for e in self.deposits if e <= evaluation]:
            del self.deposits[stale]
        total = found[(0, attempts[0])].clone()
        for portion in range(1, len(attempts)):
            total.add_(found[(portion, attempts[portion])])
        if weight_decay:
            total.add_(self.slots[point], alpha=weight_decay)
        self.slots[dst] = total

    def _penalty(self, weight_decay, point):
        """This slice's part of the L2 term 0.5 * weight_decay * |x|^2."""
        v = self.slots[point]
        return 0.5 * weight_decay * v.dot(v)


class ShardGroup:
    """The coordinator's side: runs one program on every shard and reduces the partials."""

    def __init__(self, shards: list, layout: ShardLayout):
        self.shards, self.layout = shards, layout

    def run(self, program: list[tuple]) -> list[torch.Tensor]:
        """Float32 0-dim tensors, one per reducing command, summed (or maxed) in shard order
        as float32, as torch's own scalars are."""
        import ray

        partials = ray.get([s.run.remote(program) for s in self.shards])
        kinds = [REDUCE[command[0]] for command in program if command[0] in REDUCE]
        out = []
        for k, kind in enumerate(kinds):
            total = torch.tensor(partials[0][k], dtype=torch.float32)
            for shard in partials[1:]:
                value = torch.tensor(shard[k], dtype=torch.float32)
                total = torch.maximum(total, value) if kind == "max" else total + value
            out.append(total)
        return out

    def gather(self, slot: str = "x") -> torch.Tensor:
        """The whole vector (for validation and checkpoints at the end of an epoch only)."""
        import ray

        return torch.cat([torch.from_numpy(np.array(p)) for p in
                          ray.get([s.read.remote(slot) for s in self.shards])])

    def states(self) -> list[dict]:
        import ray

        return ray.get([s.state.remote() for s in self.shards])
