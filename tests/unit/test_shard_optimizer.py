"""A ps shard's own optimizer (`shard_optimizer.ShardOptimizer`) against torch's: the same
iterates bit for bit, the same rate schedule, checkpoints that load either way, and the
reason it exists: a shard that trains never imports `torch._dynamo`."""
import copy
import subprocess
import sys

import pytest
import torch

from pipelines.optim_config import OptimSection
from pipelines.strategies.ps.shard_optimizer import ShardOptimizer
from pipelines.training.loop import make_optimizer, restore_optimizer

SETTINGS = [
    {"name": "sgd", "momentum": 0.0, "weight_decay": 0.0},
    {"name": "sgd", "momentum": 0.9, "weight_decay": 1e-3},
    {"name": "adam", "weight_decay": 0.0},
    {"name": "adam", "weight_decay": 0.01},
    {"name": "adamw", "weight_decay": 0.01},
    {"name": "adagrad", "weight_decay": 0.0},
    {"name": "adagrad", "weight_decay": 1e-3},
]
PER_EPOCH, EPOCHS, NUMEL = 4, 3, 1000


def section(settings: dict) -> OptimSection:
    return OptimSection(lr=0.05, epochs=EPOCHS, schedule="cosine", warmup_epochs=1, **settings)


def gradients(steps: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(NUMEL, generator=generator) for _ in range(steps)]


def torch_steps(optimizer, param, grads, scales):
    for grad, scale in zip(grads, scales):
        optimizer.param_groups[0]["lr_scale"] = scale  # what a staleness-aware shard sets
        param.grad = grad.clone()
        optimizer.step()


def shard_steps(optimizer, grads, scales):
    for grad, scale in zip(grads, scales):
        optimizer.param_groups[0]["lr_scale"] = scale
        optimizer.step(grad.clone())


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s['name']}-wd{s['weight_decay']}"
                         + (f"-m{s['momentum']}" if "momentum" in s else ""))
def test_a_shards_iterates_and_state_equal_torchs_bit_for_bit(settings):
    # The same aten kernels on the same operands in the same order give the same bits on
    # any machine, so equality, not a tolerance, is what holds here.
    start = torch.randn(NUMEL, generator=torch.Generator().manual_seed(1))
    steps = EPOCHS * PER_EPOCH
    grads, scales = gradients(steps), [1.0, 0.5, 1.0, 1 / 3] * (steps // 4)
    reference = torch.nn.Parameter(start.clone())
    theirs = make_optimizer(section(settings), [reference], PER_EPOCH)
    mine = ShardOptimizer(section(settings), start.clone(), PER_EPOCH)
    for i in range(steps):
        torch_steps(theirs, reference, grads[i:i + 1], scales[i:i + 1])
        shard_steps(mine, grads[i:i + 1], scales[i:i + 1])
        assert torch.equal(mine.param, reference.detach()), f"step {i + 1}"
        assert mine.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
    torch_state = theirs.state_dict()["state"].get(0, {})
    for key, value in mine.state_dict()["state"].get(0, {}).items():
        assert torch.equal(value, torch_state[key]), key
    assert mine.param_groups[0]["update"] == theirs.param_groups[0]["update"] == steps


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "adagrad"])
def test_a_checkpoint_loads_either_way_and_the_run_goes_on_identically(name):
    settings = {"name": name, "weight_decay": 1e-3, **({"momentum": 0.9} if name == "sgd" else {})}
    grads, half = gradients(8, seed=2), 4
    start = torch.randn(NUMEL, generator=torch.Generator().manual_seed(3))
    reference = torch.nn.Parameter(start.clone())
    theirs = make_optimizer(section(settings), [reference], PER_EPOCH)
    torch_steps(theirs, reference, grads[:half], [1.0] * half)
    # torch's checkpoint into a shard (a run checkpointed before shards had their own optimizer)
    mine = ShardOptimizer(section(settings), reference.detach().clone(), PER_EPOCH)
    restore_optimizer(mine, copy.deepcopy(theirs.state_dict()), section(settings))
    # and the shard's checkpoint back into torch (deep copies: a state dict holds the live
    # tensors, as torch's does, and a checkpoint is a copy)
    back = torch.nn.Parameter(reference.detach().clone())
    again = make_optimizer(section(settings), [back], PER_EPOCH)
    restore_optimizer(again, copy.deepcopy(mine.state_dict()), section(settings))
    torch_steps(theirs, reference, grads[half:], [1.0] * half)
    shard_steps(mine, grads[half:], [1.0] * half)
    torch_steps(again, back, grads[half:], [1.0] * half)
    assert torch.equal(mine.param, reference.detach())
    assert torch.equal(back.detach(), reference.detach())


def test_a_state_of_another_optimizer_is_refused_by_name():
    adam = ShardOptimizer(section({"name": "adam"}), torch.zeros(3))
    adam.step(torch.ones(3))
    adagrad = ShardOptimizer(section({"name": "adagrad"}), torch.zeros(3))
    with pytest.raises(ValueError, match="does not fit optim.name 'adagrad'"):
        adagrad.load_state_dict(adam.state_dict())


def test_a_shard_that_applies_pushes_never_imports_torch_dynamo(tmp_path):
    # What the class is for: torch.optim's first step imports torch._dynamo (about 0.85 s
    # of CPU per shard process). A fresh interpreter builds a real shard from its snapshot
    # and applies pushes, then reports whether the import happened.
    probe = f"""
import sys
import numpy as np, torch
from pipelines.optim_config import OptimSection
from pipelines.strategies.ps.shard import ParameterShard, write_initial_state
write_initial_state({str(tmp_path)!r}, 0, torch.zeros(10), None)
shard = ParameterShard(0, OptimSection(name="adagrad", lr=0.1), "cpu", {str(tmp_path)!r}, 2, True, 4)
for v in range(3):
    shard.push(np.ones(10, dtype=np.float32), v)
shard.state()
assert shard.pull()[0] == 3
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
