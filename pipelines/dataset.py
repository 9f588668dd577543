"""The data a run trains on: its splits as tensors, and what describes them."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: list[str]
    feature_mean: torch.Tensor | None = None
    """The training split's per-feature mean and standard deviation the features were
    standardised with (`data.standardize`); None when they are used as they are."""
    feature_std: torch.Tensor | None = None
    task: str = "classification"
    """classification (labels are class indices) or regression (labels are float targets)."""
    target_mean: float = 0.0
    """A regression target's training mean and standard deviation (`models.targets`)."""
    target_std: float = 1.0
    columns: list[tuple[str, str]] | None = None
    """A table's feature columns and their arrow types (`pipelines.serving`: the logged model
    takes a DataFrame of them); None for digits, synthetic data and a list column."""
    stream: object = None
    """`pipelines.streaming.StreamedTable` where the training rows stay on disk
    (`data.stream`; `x_train` is then empty); None where they are in memory."""
    reference: dict[str, float] = field(default_factory=dict)
    """Figures the data itself knows, logged with the run's test metrics: for `lgssm`
    sequences, the exact Kalman filter's NLL per step (`test_kalman_nll_per_step`)."""
    test_latents: torch.Tensor | None = None
    """The hidden states behind the test split's sequences, where the generator knows them."""

    @property
    def train_rows(self) -> int:
        return self.stream.rows if self.stream is not None else len(self.y_train)

    def sample(self, n: int) -> tuple:
        """A few examples of the data: validation rows, else test, else training rows."""
        for x, y in ((self.x_val, self.y_val), (self.x_test, self.y_test), (self.x_train, self.y_train)):
            if len(y):
                return x[:n], y[:n]
        return self.x_train[:n], self.y_train[:n]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_outputs(self) -> int:
        """The model's outputs per example: one per class, or the one regressed value."""
        return 1 if self.task == "regression" else self.num_classes
