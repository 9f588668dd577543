"""A sweep with `seeds` ranks configurations by the mean of their seeds' metrics."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.sweep.averaging import described, ranked_configurations
from pipelines.sweep.config import load
from pipelines.sweep.runner import TrialOutcome

SWEEP = """
base: {model: {name: mlp}, strategy: {name: local}, optim: {epochs: 2}}
space:
  optim.lr: {grid: [0.01, 0.1, 0.3]}
metric: val_loss
mode: min
seeds: [0, 1]
"""


def trial(lr: float, seed: int, metric: float | None, status: str = "FINISHED") -> TrialOutcome:
    return TrialOutcome(trial_id=f"{lr}-{seed}", name=f"t_lr{lr}_s{seed}", status=status,
                        params={"optim": {"lr": lr}, "seed": seed}, metric=metric, epochs=2, run_id="r")


@pytest.fixture
def sweep(tmp_path: Path):
    path = tmp_path / "s.yaml"
    path.write_text(SWEEP)
    return load(path)


def test_the_best_mean_wins_over_the_best_single_trial(sweep):
    # lr 0.1 has the luckiest seed (0.05) but the worse mean (0.30); lr 0.01 is steadier (0.12)
    trials = [trial(0.1, 0, 0.05), trial(0.1, 1, 0.55), trial(0.01, 0, 0.10), trial(0.01, 1, 0.14)]
    ranked = ranked_configurations(sweep, trials)
    assert [c.values for c in ranked] == [{"optim.lr": 0.01}, {"optim.lr": 0.1}]
    assert ranked[0].mean == pytest.approx(0.12) and ranked[1].mean == pytest.approx(0.30)
    assert [t.metric for t in ranked[0].trials] == [0.10, 0.14]  # its best seed first
    assert described(sweep, ranked[0]) == "val_loss 0.1200 (mean of seeds 0, 1: 0.1000-0.1400)"


def test_a_configuration_missing_a_seed_ranks_after_the_complete_ones(sweep):
    # lr 0.3 diverged on seed 1: its one good seed (0.01) must not make it the best
    trials = [trial(0.3, 0, 0.01), trial(0.3, 1, None, "FAILED"), trial(0.01, 0, 0.20), trial(0.01, 1, 0.22),
              trial(0.1, 0, 0.02), trial(0.1, 1, 0.9, "KILLED")]
    ranked = ranked_configurations(sweep, trials)
    assert [(c.values["optim.lr"], c.complete) for c in ranked] == [(0.01, True), (0.3, False), (0.1, False)]
    assert described(sweep, ranked[1]).endswith("(mean of seeds 0, 1: 0.0100-0.0100; 1 seed without a metric)")
    assert ranked_configurations(sweep, [trial(0.3, 1, None, "FAILED")]) == []


def test_max_mode_ranks_the_highest_mean_first(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SWEEP.replace("val_loss", "val_accuracy").replace("mode: min", "mode: max"))
    sweep = load(path)
    ranked = ranked_configurations(sweep, [trial(0.1, 0, 0.9), trial(0.1, 1, 0.7), trial(0.01, 0, 0.85),
                                           trial(0.01, 1, 0.83)])
    assert [c.values["optim.lr"] for c in ranked] == [0.01, 0.1]
