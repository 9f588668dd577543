"""A sweep in MLflow: one parent run, one child run per trial (`mlflow.parentRunId`).

A child is found again by its trial id, so a trial that Tune restarts (a resumed sweep, a
PBT trial restored from another's checkpoint) goes on in the same child run: a sweep never
holds two runs for one trial.
"""
from __future__ import annotations

from typing import Any

from pipelines.tracking import Tracker, _client

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "raydeep.trial_id"
SWEEP_TAG = "raydeep.sweep"
PARAMS_TAG = "raydeep.params"
"""The trial's sampled values as JSON, as Tune gave them: the sweep rebuilds its config from them."""


class SweepRecord:
    def __init__(self, parent: Tracker, sweep_name: str):
        self.parent = parent
        self.sweep_name = sweep_name

    @classmethod
    def start(cls, uri: str, experiment: str, sweep_name: str, params: dict[str, Any]) -> "SweepRecord":
        parent = Tracker.start(uri, experiment, sweep_name, params,
                               tags={SWEEP_TAG: sweep_name, "raydeep.kind": "sweep"})
        return cls(parent, sweep_name)

    @classmethod
    def reopen(cls, uri: str, parent_run_id: str, sweep_name: str) -> "SweepRecord":
        return cls(Tracker.reopen(uri, parent_run_id), sweep_name)

    @classmethod
    def attach(cls, uri: str, parent_run_id: str, sweep_name: str) -> "SweepRecord":
        """The record as a trial sees it: the parent run untouched."""
        run = _client(uri).get_run(parent_run_id)
        return cls(Tracker(uri, parent_run_id, run.info.experiment_id), sweep_name)

    def child(self, trial_id: str, trial_name: str, params: dict[str, Any], tags: dict[str, str],
              epochs: int) -> Tracker:
        """The trial's child run: the one it already has, RUNNING again, or a new one."""
        found = self.find_child(trial_id)
        if found is not None:
            tracker = Tracker.reopen(self.parent.uri, found.info.run_id, epochs)
            tracker.set_tags(tags)  # PBT may have given the trial new values
            # A trial killed between making its child and logging the params left them out
            # (or some of them: they go 100 at a time); params, once logged, stay as they are.
            tracker.log_params({k: v for k, v in params.items() if k not in found.data.params})
            return tracker
        return Tracker.start(
            self.parent.uri, self._experiment_name(), trial_name, params,
            tags={**tags, PARENT_TAG: self.parent.run_id, TRIAL_TAG: trial_id,
                  SWEEP_TAG: self.sweep_name},
            epochs=epochs)

    def find_child(self, trial_id: str):
        runs = _client(self.parent.uri).search_runs(
            [self.parent.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent.run_id}' "
                          f"and tags.`{TRIAL_TAG}` = '{trial_id}'",
            max_results=2)
        return runs[0] if runs else None

    def children(self) -> list:
        client = _client(self.parent.uri)
        found, token = [], None
        while True:
            page = client.search_runs([self.parent.experiment_id],
                                      filter_string=f"tags.`{PARENT_TAG}` = '{self.parent.run_id}'",
                                      max_results=1000, page_token=token)
            found.extend(page)
            token = page.token
            if not token:
                return found

    def end_child(self, trial_id: str, status: str, reason: str) -> bool:
        """Give a child that is still RUNNING its final status (the trial's process could not:
        the scheduler stopped it, or it died). True if a child was ended."""
        found = self.find_child(trial_id)
        if found is None or found.info.status != "RUNNING":
            return False
        Tracker(self.parent.uri, found.info.run_id, self.parent.experiment_id).finish(status, reason)
        return True

    def _experiment_name(self) -> str:
        return _client(self.parent.uri).get_experiment(self.parent.experiment_id).name
