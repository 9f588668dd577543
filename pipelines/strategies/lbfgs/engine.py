"""The L-BFGS coordinator: `torch.optim.LBFGS.step` with the vectors on the shards.

`epoch()` is one call of torch's ``step(closure)``: at most `iterations_per_epoch`
iterations and `max_evals_per_epoch` evaluations, the same stopping rules, the same
history update, two-loop recursion and first step ``min(1, 1/|g|_1) * lr``, the same
strong-Wolfe search (`search`). Every vector operation is a command to the shards
(`shard`); what stays here are the scalars torch keeps as 0-dim float32 tensors
(rho_i, alpha_i, H_diag, g.d), in the same dtype, so the iterates are torch's.

An evaluation of the objective at x + t d is: the shards form the trial point, the pool
(`pool`) has the workers compute every portion's loss and gradient, the shards sum
the gradients in portion order (adding weight decay, if any) and return g.d.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from pipelines.strategies.lbfgs.pool import PortionPool
from pipelines.strategies.lbfgs.search import strong_wolfe
from pipelines.strategies.lbfgs.shard import ShardGroup


@dataclass
class Iteration:
    """What one iteration did, for the per-iteration metrics."""

    number: int
    loss: float
    grad_norm: float
    step_size: float
    line_search_evals: int
    examples: int
    seconds: float


@dataclass
class LbfgsState:
    """torch.optim.LBFGS's scalar state (its vectors live on the shards)."""

    n_iter: int = 0
    func_evals: int = 0
    """Evaluations of the objective actually run (torch also counts the start of each `step`
    that this coordinator skips when it knows the loss and gradient at x already)."""
    ro: list = field(default_factory=list)
    H_diag: object = 1
    t: object = None
    prev_loss: float | None = None
    loss: float | None = None
    """The loss at the shards' x with its gradient in slot "g", if known (saves an evaluation)."""


class DistributedLbfgs:
    def __init__(self, shards: ShardGroup, pool: PortionPool, options, portions: int,
                 weight_decay: float = 0.0, state: LbfgsState | None = None):
        self.shards, self.pool, self.o = shards, pool, options
        self.portions, self.weight_decay = portions, weight_decay
        self.state = state or LbfgsState()
        self.evaluations = 0
        """Evaluations run so far: the id of the next one (the shards key deposits by it)."""
        self.examples_seen = 0

    # --- one evaluation of the objective ---------------------------------------------------

    def evaluate(self, epoch: int, place: list[tuple], into: str, extra: list[tuple] = ()):
        """Loss and gradient at the trial point `place` builds; the gradient goes to slot
        `into`. Returns (loss, the partials `extra` asks for, the pool's answers)."""
        evaluation = self.evaluations
        self.evaluations += 1
        self.shards.run(list(place))
        answers = self.pool.run("gradient", evaluation, epoch, self.portions)
        self.examples_seen += answers.examples
        loss = torch.tensor(answers.values[0], dtype=torch.float32)
        for value in answers.values[1:]:  # float32 and in portion order, as the shards sum
            loss = loss + torch.tensor(value, dtype=torch.float32)
        program = [("combine", into, evaluation, answers.attempts, self.weight_decay, "trial")]
        if self.weight_decay:
            program.append(("penalty", self.weight_decay, "trial"))
        reduced = self.shards.run(program + list(extra))
        if self.weight_decay:
            loss = loss + reduced.pop(0)
        return float(loss), reduced, answers

    # --- one call of torch's step ----------------------------------------------------------

    def epoch(self, epoch: int, on_iteration: Callable[[Iteration], None] = lambda it: None) -> str:
        """Run one `step`; returns why it stopped."""
        o, state = self.o, self.state
        lr, max_iter, history = o.lr, o.iterations_per_epoch, o.history
        max_eval = o.max_evals_per_epoch or max_iter * 5 // 4
        tolerance_grad, tolerance_change = o.tolerance_grad, o.tolerance_change

        if state.loss is None or o.batch_size is not None:  # a new objective, or x unevaluated
            loss, (g_max,), _ = self.evaluate(epoch, [("copy", "trial", "x")], "g", [("abs_max", "g")])
            state.loss = loss
            state.func_evals += 1
        else:  # torch evaluates x again; the last line search left its loss and gradient here
            (g_max,) = self.shards.run([("abs_max", "g")])
            loss = state.loss
        current_evals = 1  # as in torch: the budget of the line searches is the same
        if g_max <= tolerance_grad:
            return "optimal: max |g| <= tolerance_grad"

        n_iter, why = 0, "iterations_per_epoch"
        while n_iter < max_iter:
            began, seen_before = time.perf_counter(), self.examples_seen
            n_iter += 1
            state.n_iter += 1

            # compute the descent direction
            if state.n_iter == 1:
                program = [("forget",), ("neg", "d", "g")]
                state.ro, state.H_diag = [], 1
            else:
                program = self._direction(history)
            first = state.n_iter == 1
            program += [("copy", "prev_g", "g"), ("dot", "g", "d"), ("abs_max", "d")]
            if first:
                program.append(("abs_sum", "g"))
            reduced = self.shards.run(program)
            gtd, d_norm = reduced[0], reduced[1]
            state.prev_loss = loss

            # step length: torch's first step is scaled by the gradient's size
            t = min(1.0, 1.0 / reduced[2]) * lr if first else lr
            if gtd > -tolerance_change:  # directional derivative below tolerance
                why = "directional derivative > -tolerance_change"
                state.t = t
                break

            def trial(step):
                slot = f"g{self.evaluations}"
                f, (g_dot_d,), _ = self.evaluate(epoch, [("point", "trial", "x", float(step), "d")],
                                                 slot, [("dot", slot, "d")])
                return f, slot, g_dot_d

            loss, g_slot, t, ls_evals, created = strong_wolfe(
                trial, t, loss, "g", gtd, d_norm, tolerance_change=tolerance_change,
                max_ls=max_eval - current_evals)
            state.t = t
            finish = [("axpy", "x", float(t), "d"), ("rename", "g", g_slot),
                      ("free", *[s for s in created if s != g_slot]),
                      ("abs_max", "g"), ("step_max", "d", float(t)), ("dot", "g", "g")]
            g_max, step_max, gg = self.shards.run(finish)
            state.loss = loss
            current_evals += ls_evals
            state.func_evals += ls_evals
            on_iteration(Iteration(state.n_iter, loss, float(gg.sqrt()), float(t), ls_evals,
                                   self.examples_seen - seen_before, time.perf_counter() - began))

            # check conditions
            if n_iter == max_iter:
                break
            if current_evals >= max_eval:
                why = "max_evals_per_epoch"
                break
            if g_max <= tolerance_grad:
                why = "optimal: max |g| <= tolerance_grad"
                break
            if step_max <= tolerance_change:
                why = "lack of progress: max |t d| <= tolerance_change"
                break
            if abs(loss - state.prev_loss) < tolerance_change:
                why = "lack of progress: loss change < tolerance_change"
                break
        return why

    def _direction(self, history: int) -> list[tuple]:
        """Update the history with (s, y) and run the two-loop recursion; returns the
        program that finishes d (the last update is sent with the next round trip)."""
        state = self.state
        ys, yy = self.shards.run([("sub", "y", "g", "prev_g"), ("scale", "s", "d", float(state.t)),
                                  ("dot", "y", "s"), ("dot", "y", "y")])
        if ys > 1e-10:
            program = [("remember", "y", "s")]
            if len(state.ro) == history:
                state.ro.pop(0)
            state.ro.append(1.0 / ys)
            state.H_diag = ys / yy  # scale of the initial Hessian approximation
        else:
            program = [("free", "y", "s")]
        ro, num_old = state.ro, len(state.ro)
        al = [None] * num_old
        program.append(("neg", "q", "g"))
        for i in range(num_old - 1, -1, -1):
            (s_q,) = self.shards.run(program + [("hist_dot", "s", i, "q")])
            al[i] = s_q * ro[i]
            program = [("hist_axpy", "q", float(-al[i]), "y", i)]
        program += [("scale", "d", "q", float(state.H_diag)), ("free", "q")]
        for i in range(num_old):
            (y_d,) = self.shards.run(program + [("hist_dot", "y", i, "d")])
            be_i = y_d * ro[i]
            program = [("hist_axpy", "d", float(al[i] - be_i), "s", i)]
        return program
