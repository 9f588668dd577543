"""A sweep with `seeds` judged by configuration: the mean of its seeds' metrics.

A trial is one configuration (the space's drawn values) at one seed. One run's validation
metric on a small split moves with the seed (its split, initial weights and data order) by as
much as most settings move it, so the best trial of a sweep is often a lucky seed; averaged
over seeds, configurations compare on what they do rather than on the draw.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.sweep.config import SweepConfig
    from pipelines.sweep.runner import TrialOutcome


@dataclass
class Configuration:
    """One configuration's trials, one per seed, and how it ranks."""

    values: dict[str, Any]
    """The drawn values under their dotted keys (as Tune carries them), the seed left out."""
    trials: list["TrialOutcome"]
    """Its trials that finished with a metric, best first."""
    seed_count: int
    """How many seeds the sweep trains each configuration with."""

    @property
    def mean(self) -> float:
        return statistics.fmean(t.metric for t in self.trials)

    @property
    def complete(self) -> bool:
        """Every seed finished with a metric: a mean over fewer would flatter it."""
        return len(self.trials) == self.seed_count


def ranked_configurations(sweep: "SweepConfig", trials: list["TrialOutcome"]) -> list[Configuration]:
    """The sweep's configurations, best first: complete ones by their mean, then the rest."""
    sign = 1 if sweep.mode == "max" else -1
    groups: dict[str, Configuration] = {}
    for trial in trials:
        if trial.status != "FINISHED" or trial.metric is None:
            continue
        values = sweep.configuration(trial.params)
        key = repr(sorted(values.items()))
        groups.setdefault(key, Configuration(values, [], len(sweep.seeds))).trials.append(trial)
    for group in groups.values():
        group.trials.sort(key=lambda t: -sign * t.metric)
    return sorted(groups.values(), key=lambda g: (not g.complete, -sign * g.mean))


def described(sweep: "SweepConfig", configuration: Configuration) -> str:
    """`val_loss 0.1440 (mean of seeds 0, 1, 2: 0.1390-0.1502)`."""
    low = min(t.metric for t in configuration.trials)
    high = max(t.metric for t in configuration.trials)
    seeds = ", ".join(str(s) for s in sweep.seeds)
    gone = configuration.seed_count - len(configuration.trials)
    return (f"{sweep.metric} {configuration.mean:.4f} (mean of seeds {seeds}: {low:.4f}-{high:.4f}"
            + (f"; {gone} seed{'s' if gone > 1 else ''} without a metric)" if gone else ")"))
