"""An L-BFGS worker: a model replica over the training data, evaluating portions.

The objective of an epoch is the mean loss over its examples (all of the training split,
or a fixed sample of `strategy.batch_size`), cut into P contiguous portions. For portion p
of n_p of the N examples a worker computes ``loss_p * n_p / N`` and its gradient, so that
the sum over portions is exactly the full-batch mean torch computes (and with one portion
it is that very computation). It takes the trial point from the shards once per
evaluation, sends each shard its slice of the portion's gradient directly, and returns
only the scalar loss to the coordinator.

Random draws in the loss (an opted-in stochastic model) come from a seed fixed per
portion, so every evaluation of a point sees the same noise, whichever worker runs it.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from pipelines.config import RunConfig
from pipelines.data import Dataset
from pipelines.errors import quiet_numpy_views
from pipelines.strategies.lbfgs.streamed import portion_chunks
from pipelines.training.flat import ShardLayout, flat_gradients, load_parameters, to_wire
from pipelines.training.loop import build_model, epoch_permutation

quiet_numpy_views()


def epoch_examples(train_size: int, batch_size: int | None, seed: int, epoch: int) -> torch.Tensor:
    """Indices of the examples whose mean loss is epoch `epoch`'s objective."""
    if batch_size is None or batch_size >= train_size:
        return torch.arange(train_size)
    return epoch_permutation(train_size, seed, epoch)[:batch_size].sort().values


def portion_bounds(examples: int, portions: int) -> list[tuple[int, int]]:
    """[start, stop) of each portion: contiguous, sizes differing by at most one."""
    edges = [round(i * examples / portions) for i in range(portions + 1)]
    return list(zip(edges[:-1], edges[1:]))


def noise_seed(seed: int, portion: int) -> int:
    return seed * 1_000_003 + portion


class LbfgsWorker:
    def __init__(self, run: RunConfig, data: Dataset, initial: dict, shards: list,
                 layout: ShardLayout):
        torch.set_num_threads(max(1, int(run.resources.cpus_per_worker)))
        self.run_config, self.options = run, run.strategy.options
        self.model = build_model(run, data)
        self.model.load_state_dict(initial)
        self.x, self.y = data.x_train, data.y_train
        self.table = data.stream  # a streamed table: portions read from its files (`streamed.py`)
        self.shards, self.layout = shards, layout
        self.loaded: int | None = None
        self.examples: tuple[int, torch.Tensor] | None = None
        self.built_at = time.time()

    def built(self) -> float:
        """When this actor's constructor ended (wall clock, for the start-up timeline)."""
        return self.built_at

    def gradient(self, evaluation: int, epoch: int, portion: int, attempt: int) -> tuple[float, int, float]:
        """Loss share and gradient of `portion` at the evaluation's trial point; the
        gradient goes to the shards. Returns (loss share, examples, seconds)."""
        import ray

        began = time.perf_counter()
        self._load(evaluation)
        idx, weight = self._portion(epoch, portion)
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        torch.manual_seed(noise_seed(self.run_config.seed, portion))
        if self.table is not None:
            share, rows = self._streamed_portion(portion)
        else:
            loss = self.model.loss((self.x[idx], self.y[idx]))
            if weight != 1.0:
                loss = loss * weight
            loss.backward()
            share, rows = float(loss.detach()), len(idx)
        gradient = flat_gradients(self.model)
        ray.get([shard.deposit.remote(evaluation, portion, attempt, to_wire(part))
                 for shard, part in zip(self.shards, self.layout.split(gradient))])
        return share, rows, time.perf_counter() - began

    def _streamed_portion(self, portion: int) -> tuple[float, int]:
        """Backward over the portion's rows chunk by chunk, gradients adding up."""
        share, rows = 0.0, 0
        for x, y in portion_chunks(self.table, portion, self.options.portions_for(self.run_config)):
            loss = self.model.loss((x, y)) * (len(y) / self.table.rows)
            loss.backward()
            share, rows = share + float(loss.detach()), rows + len(y)
        return share, rows

    @torch.no_grad()
    def statistics(self, evaluation: int, epoch: int, portion: int, attempt: int):
        """Batch norm's statistics of `portion` at the trial point: its running statistics
        reset and made a plain average, then one train-mode forward. The coordinator
        averages them over portions: the statistics of the whole objective's examples."""
        self._load(evaluation)
        idx, _ = self._portion(epoch, portion)
        for module in batch_norms(self.model):
            module.reset_running_stats()
            module.momentum = None
        self.model.train()
        torch.manual_seed(noise_seed(self.run_config.seed, portion))
        self.model.loss((self.x[idx], self.y[idx]))
        return batch_norm_statistics(self.model).numpy(), len(idx), 0.0

    def _load(self, evaluation: int) -> None:
        """Install the trial point of `evaluation` (pulled once, however many portions)."""
        import ray

        if self.loaded == evaluation:
            return
        parts = ray.get([shard.read.remote("trial") for shard in self.shards])
        load_parameters(self.model, torch.cat([torch.from_numpy(p) for p in parts]))
        self.loaded = evaluation

    def _portion(self, epoch: int, portion: int) -> tuple[torch.Tensor, float]:
        if self.table is not None:
            return torch.empty(0, dtype=torch.long), 1.0  # the rows are read in `_streamed_portion`
        if self.examples is None or self.examples[0] != epoch:
            self.examples = (epoch, epoch_examples(len(self.y), self.options.batch_size,
                                                   self.run_config.seed, epoch))
        examples = self.examples[1]
        start, stop = portion_bounds(len(examples), self.options.portions_for(self.run_config))[portion]
        if start == 0 and stop == len(examples):
            return examples, 1.0
        return examples[start:stop], (stop - start) / len(examples)


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batch_norm(model: nn.Module) -> bool:
    return bool(batch_norms(model))


def batch_norm_statistics(model: nn.Module) -> torch.Tensor:
    """Running means and variances of every batch-norm layer, as one flat vector."""
    return torch.cat([torch.cat([m.running_mean, m.running_var]) for m in batch_norms(model)])


@torch.no_grad()
def load_batch_norm_statistics(model: nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for m in batch_norms(model):
        for buffer in (m.running_mean, m.running_var):
            buffer.copy_(flat[offset:offset + buffer.numel()])
            offset += buffer.numel()
