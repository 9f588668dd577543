"""The update a parameter-server shard applies to its slice: torch's SGD (with momentum),
Adam, AdamW and Adagrad on one flat tensor, written out.

Why not `torch.optim`: the first `step()` of a torch optimizer in a process imports
`torch._dynamo` (`Optimizer.step` runs inside `_use_grad_for_differentiable`, which imports
it unconditionally, and `add_param_group` inside `_disable_dynamo`, which does too): about
0.85 s of CPU for modules a shard never uses. A shard process does nothing else that needs
them, and on a 2-core machine its two shards' imports stood between `ps` and its first step
(median 7.75 s with torch's optimizers, 6.65 s with this, taking turns: benchmarks/README.md).

The arithmetic is torch's single-tensor path (what torch runs for a CPU tensor), op for op
and in the same order, so a shard's iterates equal torch's bit for bit
(tests/unit/test_shard_optimizer.py); the learning rate follows the same schedule of the
same update count (`pipelines.training.schedule`); `state_dict` has torch's layout, so a
shard's checkpoint made with torch's optimizer loads here, and this one's loads into torch's.
"""
from __future__ import annotations

import torch

from pipelines.optim_config import OptimSection
from pipelines.training.schedule import LearningRate, advance

HYPERPARAMETERS = {
    "sgd": {"dampening": 0, "nesterov": False},
    "adam": {"betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False},
    "adamw": {"betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False},
    "adagrad": {"lr_decay": 0, "eps": 1e-10, "initial_accumulator_value": 0},
}
"""torch's defaults for what `make_optimizer` leaves to them, per `optim.name`."""
STATE_KEYS = {"sgd": {"momentum_buffer"}, "adam": {"step", "exp_avg", "exp_avg_sq"},
              "adamw": {"step", "exp_avg", "exp_avg_sq"}, "adagrad": {"step", "sum"}}


class ShardOptimizer:
    """`optim.name`'s update of one flat tensor, its lr set before each step by
    `schedule.advance`, as a torch optimizer's is, the count kept in the param group."""

    def __init__(self, section: OptimSection, param: torch.Tensor, updates_per_epoch: int | None = None):
        self.name, self.param = section.name, param
        self.rate = LearningRate(section, updates_per_epoch)
        group = {"lr": section.lr, "weight_decay": section.weight_decay, **HYPERPARAMETERS[section.name]}
        if section.name == "sgd":
            group["momentum"] = section.momentum
        self.param_groups = [group]
        self.state: dict = {}
        if section.name == "adagrad":  # torch's Adagrad makes its state in its constructor
            self.state = {"step": torch.tensor(0.0), "sum": torch.zeros_like(param)}

    def step(self, grad: torch.Tensor) -> None:
        group = self.param_groups[0]
        advance(group, self.rate)  # the schedule as `schedule.follow` runs it for torch's
        with torch.no_grad():
            {"sgd": self._sgd, "adagrad": self._adagrad}.get(self.name, self._adam)(grad, group)

    # --- torch's single-tensor updates (torch/optim/{sgd,adam,adagrad}.py) ---------------

    def _sgd(self, grad: torch.Tensor, group: dict) -> None:
        p, momentum = self.param, group["momentum"]
        if group["weight_decay"] != 0:
            grad = grad.add(p, alpha=group["weight_decay"])
        if momentum != 0:
            buf = self.state.get("momentum_buffer")
            if buf is None:
                buf = self.state["momentum_buffer"] = grad.detach().clone()
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        p.add_(grad, alpha=-group["lr"])

    def _adam(self, grad: torch.Tensor, group: dict) -> None:
        p, lr, (beta1, beta2) = self.param, group["lr"], group["betas"]
        if not self.state:
            self.state = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                          "exp_avg_sq": torch.zeros_like(p)}
        exp_avg, exp_avg_sq = self.state["exp_avg"], self.state["exp_avg_sq"]
        self.state["step"] += 1
        if group["weight_decay"] != 0:
            if self.name == "adamw":  # decoupled: the weights shrink, the gradient is left alone
                p.mul_(1 - lr * group["weight_decay"])
            else:
                grad = grad.add(p, alpha=group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = self.state["step"].item()
        step_size = lr / (1 - beta1**step)
        denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
        p.addcdiv_(exp_avg, denom, value=-step_size)

    def _adagrad(self, grad: torch.Tensor, group: dict) -> None:
        p, total = self.param, self.state["sum"]
        self.state["step"] += 1
        step = self.state["step"].item()
        if group["weight_decay"] != 0:
            grad = grad.add(p, alpha=group["weight_decay"])
        clr = group["lr"] / (1 + (step - 1) * group["lr_decay"])
        total.addcmul_(grad, grad, value=1)
        p.addcdiv_(grad, total.sqrt().add_(group["eps"]), value=-clr)

    # --- checkpoints, in torch's layout -------------------------------------------------

    def state_dict(self) -> dict:
        return {"state": {0: dict(self.state)} if self.state else {},
                "param_groups": [{**self.param_groups[0], "params": [0]}]}

    def load_state_dict(self, saved: dict) -> None:
        """A state saved by this class or by the torch optimizer of the same name."""
        state = {k: v for k, v in (saved["state"].get(0) or {}).items() if v is not None}
        if state and set(state) != STATE_KEYS[self.name]:
            raise ValueError(f"a saved {'/'.join(sorted(state))} optimizer state does not fit "
                             f"optim.name {self.name!r}")
        for key, value in state.items():
            if key == "step":  # torch keeps the count a float32 scalar on the CPU
                state[key] = torch.tensor(float(value))
            else:
                state[key] = value.to(self.param.device, self.param.dtype).clone()
        if state:  # else the constructor's (Adagrad's zeros; nothing for the others)
            self.state = state
        self.param_groups = [{k: v for k, v in saved["param_groups"][0].items() if k != "params"}]
