"""The early-stopping watcher on its own: what counts as an improvement, when it stops, and
that its state (best weights included) survives a checkpoint."""
import math

import pytest
import torch

from pipelines.config import ConfigError, from_dict
from pipelines.optim_config import EarlyStoppingSection
from pipelines.training.early_stopping import EarlyStopping, check_metric, outcome


def weights(value: float):
    return lambda: {"w": torch.full((2,), value)}


def watch(values, **section):
    stopper = EarlyStopping(EarlyStoppingSection(metric="val_loss", **section))
    stops = [stopper.update(e, {"val_loss": v}, weights(v)) for e, v in enumerate(values)]
    return stopper, stops


def test_it_stops_after_patience_epochs_without_an_improvement_and_keeps_the_best():
    stopper, stops = watch([1.0, 0.8, 0.81, 0.9], patience=2)
    assert stops == [False, False, False, True]  # the run ends after epoch 4
    assert stopper.best_epoch == 1 and stopper.best_value == 0.8
    assert torch.equal(stopper.best_model["w"], torch.full((2,), 0.8))
    best, figures, reason = outcome(stopper.state())
    assert figures == {"best_epoch": 2.0, "stopped_early": 1.0}
    assert reason == "stopped early: val_loss has not improved by more than 0 for 2 epoch(s) since epoch 2 (0.8000)"


def test_min_delta_mode_and_non_finite_values():
    _, stops = watch([1.0, 0.95, 0.92], patience=2, min_delta=0.1)  # improvements under min_delta
    assert stops == [False, False, True]
    maximised = EarlyStopping(EarlyStoppingSection(metric="val_accuracy", patience=1))
    assert maximised.section.maximise
    assert [maximised.update(e, {"val_accuracy": v}, weights(v)) for e, v in enumerate([0.5, 0.9, 0.7])] == \
        [False, False, True]
    stopper, _ = watch([math.nan, 2.0, math.inf], patience=5)
    assert stopper.best_epoch == 1  # nan and inf never count as the best


def test_the_state_survives_a_checkpoint_round_trip(tmp_path):
    stopper, _ = watch([1.0, 0.7, 0.9], patience=3)
    torch.save(stopper.state(), tmp_path / "state.pt")
    again = EarlyStopping(stopper.section, torch.load(tmp_path / "state.pt", weights_only=True))
    assert again.update(3, {"val_loss": 0.95}, weights(0.95)) is False and again.wait == 2
    assert again.update(4, {"val_loss": 0.96}, weights(0.96)) is True
    assert torch.equal(again.best_model["w"], torch.full((2,), 0.7))


def test_nothing_watched_changes_nothing():
    stopper = EarlyStopping(EarlyStoppingSection())
    assert not stopper.active and stopper.update(0, {}, weights(0)) is False
    assert stopper.checkpoint_extra() == {} and outcome(None) == (None, {}, None)


def test_bad_settings_are_one_line():
    with pytest.raises(ConfigError, match="optim.early_stopping.metric val_acc is not reported by this run; "
                                          "it reports train_loss, val_loss"):
        check_metric("optim.early_stopping.metric", "val_acc", ["train_loss", "val_loss"])
    with pytest.raises(ConfigError, match="optim.early_stopping.patience must be >= 1, got 0"):
        from_dict({"optim": {"early_stopping": {"metric": "val_loss", "patience": 0}}})
    with pytest.raises(ConfigError, match="ps workers run their epochs on their own clocks"):
        from_dict({"strategy": {"name": "ps"}, "optim": {"early_stopping": {"metric": "val_loss"}}})
