"""`optim`: the optimizer, its learning-rate schedule and the length of training."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "adagrad": "Adagrad"}
"""`optim.name` -> the `torch.optim` class it builds (`pipelines.training.loop.make_optimizer`)."""
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("constant", "cosine", "step", "plateau")
"""`optim.schedule`: the learning rate as a function of an optimizer's update count
(`pipelines.training.schedule`)."""


def maximised(metric: str) -> bool:
    """Whether a metric gets better upwards: accuracies, ELBOs, R² and pseudo-likelihoods."""
    return any(word in metric for word in ("accuracy", "elbo", "r2", "likelihood"))


@dataclass
class EarlyStoppingSection:
    metric: Optional[str] = None
    """The per-epoch metric to watch, e.g. val_loss or val_accuracy; unset: train every epoch."""
    mode: str = "auto"
    """min, max, or auto: max for accuracies, ELBOs, R² and pseudo-likelihoods, min otherwise."""
    patience: int = 3
    """Epochs without an improvement of more than `min_delta` before the run stops."""
    min_delta: float = 0.0

    @property
    def maximise(self) -> bool:
        return self.mode == "max" if self.mode != "auto" else maximised(self.metric or "")

    def problems(self) -> list[str]:
        return [message for bad, message in (
            (self.mode not in ("auto", "min", "max"),
             f"optim.early_stopping.mode must be auto, min or max, got {self.mode!r}"),
            (self.patience < 1, f"optim.early_stopping.patience must be >= 1, got {self.patience}"),
            (self.min_delta < 0, f"optim.early_stopping.min_delta must be >= 0, got {self.min_delta}"),
        ) if bad]


@dataclass
class OptimSection:
    name: str = "sgd"
    """sgd, adam, adamw or adagrad."""
    lr: float = 0.05
    momentum: float = 0.9
    """Momentum of sgd."""
    weight_decay: float = 0.0
    epochs: int = 10
    grad_clip: Optional[float] = None
    """Clip the global gradient norm to this value (helps RNNs at high learning rates)."""
    steps_per_epoch: Optional[int] = None
    """Cap on optimizer steps per epoch (default: one pass over the training split)."""
    schedule: str = "constant"
    """constant; cosine (from lr down to `min_lr` over the run, as torch's CosineAnnealingLR);
    step (times `lr_gamma` every `lr_step_epochs`, as StepLR). Each follows the optimizer's
    own update count: a step under local, allreduce and pipeline, a push applied by each ps
    shard, an inner step of diloco. plateau (times `lr_gamma` once `plateau_metric` has not
    improved for more than `lr_patience` epochs, down to `min_lr`, as ReduceLROnPlateau)
    follows the epochs' validation, under local, allreduce and pipeline. lbfgs takes none."""
    warmup_epochs: float = 0.0
    """Epochs of linear warm-up (from lr / warm-up steps to lr, as LinearLR) before the schedule."""
    min_lr: float = 0.0
    """Where cosine ends; plateau's floor."""
    lr_gamma: float = 0.1
    """step's and plateau's factor."""
    lr_step_epochs: int = 1
    lr_patience: int = 2
    """plateau: epochs without an improvement the rate waits through; the next one lowers it."""
    plateau_metric: str = "val_loss"
    """plateau: the per-epoch metric watched (better upwards for accuracies, ELBOs, R² and
    pseudo-likelihoods, downwards otherwise)."""
    plateau_threshold: float = 1e-4
    """plateau: the relative change that counts as an improvement (ReduceLROnPlateau's `threshold`)."""
    accumulate: int = 1
    """Global batches whose gradients add up before each optimizer step (the step's batch is
    their union: accumulate x data.batch_size examples), under local and allreduce (DDP
    synchronises once per step); ps, pipeline, diloco and lbfgs have their own ways."""
    precision: str = "fp32"
    """fp32; bf16: the forward under bfloat16 autocast, on CPU and GPU (weights, gradients and
    the optimizer stay float32); fp16: float16 autocast with a gradient scaler, GPU only."""
    early_stopping: EarlyStoppingSection = field(default_factory=EarlyStoppingSection)
    """Stop once `metric` stops improving and test the best epoch's weights, not the last
    (`pipelines.training.early_stopping`)."""

    def problems(self) -> list[str]:
        return [message for bad, message in (
            (self.name not in OPTIMIZERS, f"optim.name must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}"),
            (not self.lr > 0, f"optim.lr must be > 0, got {self.lr}"),
            (not 0 <= self.momentum < 1, f"optim.momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay < 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}"),
            (self.epochs < 1, f"optim.epochs must be >= 1, got {self.epochs}"),
            (self.grad_clip is not None and not self.grad_clip > 0, f"optim.grad_clip must be > 0, got {self.grad_clip}"),
            (self.steps_per_epoch is not None and self.steps_per_epoch < 1,
             f"optim.steps_per_epoch must be >= 1, got {self.steps_per_epoch}"),
            (self.schedule not in SCHEDULES, f"optim.schedule must be one of {', '.join(SCHEDULES)}, "
                                             f"got {self.schedule!r}"),
            (not 0 <= self.warmup_epochs < self.epochs,
             f"optim.warmup_epochs must be in [0, optim.epochs = {self.epochs}), got {self.warmup_epochs}"),
            (not 0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, optim.lr], got {self.min_lr}"),
            (not 0 < self.lr_gamma <= 1, f"optim.lr_gamma must be in (0, 1], got {self.lr_gamma}"),
            (self.lr_step_epochs < 1, f"optim.lr_step_epochs must be >= 1, got {self.lr_step_epochs}"),
            (self.lr_patience < 0, f"optim.lr_patience must be >= 0, got {self.lr_patience}"),
            (not 0 <= self.plateau_threshold < 1,
             f"optim.plateau_threshold must be in [0, 1), got {self.plateau_threshold}"),
            (self.accumulate < 1, f"optim.accumulate must be >= 1, got {self.accumulate}"),
            (self.precision not in PRECISIONS,
             f"optim.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
        ) if bad] + self.early_stopping.problems()

    @property
    def scheduled(self) -> bool:
        return self.schedule != "constant" or self.warmup_epochs > 0
