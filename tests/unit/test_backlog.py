"""The backlog of writes an absent tracking store missed (`pipelines.backlog`), on a clock of
its own; and the tracker's part of it on a real SQLite MLflow store."""
import pickle

import pytest

from pipelines import backlog
from pipelines.backlog import Backlog
from pipelines.errors import ConfigError, TrackingUnreachable


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Store:
    """Where a backlog's entries go: up or down, and what it was sent, in order."""

    def __init__(self):
        self.up, self.got, self.tries = True, [], 0

    def send(self, kind, payload):
        self.tries += 1
        if not self.up:
            raise ConnectionRefusedError(111, "Connection refused")
        self.got.append((kind, payload))


@pytest.fixture
def parts():
    clock, store, said = Clock(), Store(), []
    log = Backlog("http://mlflow:5000", store.send, clock=clock, sleep=clock.sleep, say=said.append,
                  hint=lambda: "resume it later")
    return log, store, clock, said


def test_writes_go_through_in_order_while_the_store_answers(parts):
    log, store, _, said = parts
    for i in range(3):
        log.write("metrics", i)
    assert store.got == [("metrics", 0), ("metrics", 1), ("metrics", 2)] and said == []


def test_an_absent_store_keeps_the_writes_and_gets_them_in_order_when_back(parts):
    log, store, clock, said = parts
    log.write("metrics", 0)
    store.up = False
    log.write("metrics", 1)
    log.write("params", 2)  # within the retry interval: kept without trying the store
    assert store.tries == 2 and log.pending("metrics") == [1] and log.pending("params") == [2]
    assert len(said) == 1 and said[0].startswith(
        "raydeep: warning: the tracking store http://mlflow:5000 is unreachable (Connection refused)")
    clock.now += backlog.RETRY_EVERY_S
    log.write("metrics", 3)  # tried again, still away
    assert store.tries == 3 and len(said) == 1
    store.up = True
    log.write("metrics", 4)  # before the next try: kept
    assert store.got == [("metrics", 0)]
    clock.now += backlog.RETRY_EVERY_S
    log.write("metrics", 5)
    assert store.got == [("metrics", 0), ("metrics", 1), ("params", 2), ("metrics", 3), ("metrics", 4),
                         ("metrics", 5)]
    assert said[1] == "raydeep: the tracking store http://mlflow:5000 is back after 10 s; 5 kept writes logged"
    assert log.pending("metrics") == []


def test_a_write_the_store_refuses_is_raised_and_does_not_block_the_others(parts):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    log, store, _, _ = parts

    def send(kind, payload):
        if payload == "bad":
            raise MlflowException("Changing param values is not allowed", INVALID_PARAMETER_VALUE)
        store.send(kind, payload)

    log.send = send
    with pytest.raises(MlflowException):
        log.write("params", "bad")
    log.write("params", "good")
    assert store.got == [("params", "good")]


def test_a_store_that_stays_away_ends_the_wait_in_bounded_time_with_one_line(parts):
    log, store, clock, _ = parts
    store.up = False
    log.write("metrics", 1)
    with pytest.raises(TrackingUnreachable) as caught:
        log.drain("end the run", wait=7)
    assert 7 <= clock.now <= 8
    message = str(caught.value)
    assert message == ("cannot end the run: the tracking store http://mlflow:5000 has been unreachable "
                       "for 7 s (Connection refused); resume it later")
    assert log.pending("metrics") == [1]  # still kept: nothing is dropped by giving up


def test_a_call_that_needs_the_store_waits_for_it_after_the_kept_writes(parts):
    log, store, clock, said = parts
    store.up = False
    log.write("metrics", 1)

    def probe():
        if clock.now >= 3:
            store.up = True
        return None if store.up else "Connection refused"

    log.probe = probe
    assert log.call(lambda: store.got[:], "read the run's metrics", wait=10) == [("metrics", 1)]
    assert 3 <= clock.now < 5 and said[-1].startswith("raydeep: the tracking store")


def test_a_call_that_cannot_be_repeated_is_tried_once():
    clock, tries = Clock(), []

    def once():
        tries.append(1)
        raise ConnectionResetError(104, "Connection reset by peer")

    log = Backlog("sqlite:///x.db", lambda *_: None, clock=clock, sleep=clock.sleep, say=lambda _: None)
    with pytest.raises(TrackingUnreachable, match=r"cannot log the model: .*\(Connection reset by peer\)"):
        log.call(once, "log the model", retry=False, wait=30)
    assert tries == [1] and clock.now == 0


def test_what_counts_as_the_store_being_away():
    from mlflow.exceptions import MlflowException, RestException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

    assert backlog.transient(ConnectionRefusedError(111, "refused"))
    assert backlog.transient(MlflowException("API request to http://h/api failed with exception "
                                             "HTTPConnectionPool(...): Max retries exceeded", INTERNAL_ERROR))
    assert backlog.transient(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}))
    assert not backlog.transient(MlflowException("bad value", INVALID_PARAMETER_VALUE))
    assert not backlog.transient(MlflowException("no such run", RESOURCE_DOES_NOT_EXIST))
    assert not backlog.transient(ValueError("a bug"))
    refused = MlflowException(
        "API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed with exception "
        "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded with url: /api (Caused by "
        "NewConnectionError('<urllib3.connection.HTTPConnection object at 0x7f>: Failed to establish a "
        "new connection: [Errno 111] Connection refused'))")
    assert backlog.reason(refused) == "Connection refused"


def test_the_wait_and_mlflows_http_settings(monkeypatch):
    monkeypatch.delenv(backlog.WAIT_ENV, raising=False)
    assert backlog.wait_seconds() == backlog.DEFAULT_WAIT_S
    monkeypatch.setenv(backlog.WAIT_ENV, "2.5")
    assert backlog.wait_seconds() == 2.5
    for bad in ("soon", "-1", "inf", "nan"):
        monkeypatch.setenv(backlog.WAIT_ENV, bad)
        with pytest.raises(ConfigError, match=f"RAYDEEP_TRACKING_WAIT_S must be .* got '{bad}'"):
            backlog.wait_seconds()
    for key in backlog.HTTP_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")  # the user's own
    backlog.bound_http_waits("sqlite:///mlflow.db")
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in __import__("os").environ
    backlog.bound_http_waits("https://mlflow.example.com")
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"


def test_a_port_nobody_listens_on_is_found_without_mlflow():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert backlog.port_probe(f"http://127.0.0.1:{port}")() is not None
    assert backlog.port_probe("sqlite:///mlflow.db")() is None


def test_a_checkpoints_metrics_logged_again_are_in_the_store_once(store):
    """The tracker's side, on a real SQLite store: a tracker sent to a worker keeps its own
    writes, and a checkpoint's metrics (its epoch's and those kept unlogged) logged a
    second time add nothing."""
    from pipelines.context import epoch_record, log_saved_metrics
    from pipelines.tracking import Tracker

    tracker = Tracker.start(store, "outage", "r", {"a": 1})
    tracker.backlog.entries.append(("metrics", []))
    assert pickle.loads(pickle.dumps(tracker)).backlog.entries == []
    tracker.backlog.entries.clear()

    tracker.log_epoch(0, {"train_loss": 1.0}, timestamp=1000)
    record = {**epoch_record(tracker, {"train_loss": 0.5}), "unlogged": [["train_loss", 1.0, 1000, 0]]}
    tracker.log_epoch(1, {"train_loss": 0.5}, timestamp=record["logged_at"])
    for _ in range(2):
        log_saved_metrics(tracker, {"epoch": 1, "extra": record})
    assert sorted(tracker.logged_steps("train_loss")) == [0, 1]
    assert tracker.metric_history("train_loss") == [1.0, 0.5]


def test_a_wait_that_is_no_duration_is_refused_with_the_store(monkeypatch, workdir):
    from pipelines.tracking import check_store

    monkeypatch.setenv(backlog.WAIT_ENV, "a minute")
    with pytest.raises(ConfigError, match="RAYDEEP_TRACKING_WAIT_S must be a number of seconds"):
        check_store(f"sqlite:///{workdir / 'mlflow.db'}")
