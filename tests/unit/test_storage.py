"""`pipelines.storage` on a local directory: checkpoints that are whole or not at all, safe
loads, pruning that keeps the newest good state, names that stay inside the store."""
from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from helpers import small_run

from pipelines.config import ConfigError
from pipelines.storage import (
    COMPLETE_FILE,
    RUN_FILE,
    STATE_FILE,
    RunDir,
    Store,
    checkpoint_name,
    checkpoints,
    complete_checkpoints,
    newest_state,
)


def saved_run(tmp_path, epochs: int, keep: int = 10) -> RunDir:
    run_dir = RunDir("run", tmp_path / "run", keep=keep)
    run_dir.local.mkdir()
    for epoch in range(epochs):
        run_dir.save_checkpoint(epoch, model={"w": torch.full((3,), float(epoch))}, optimizer={})
    return run_dir


def test_a_checkpoint_round_trips_and_records_its_checksum(tmp_path):
    run_dir = saved_run(tmp_path, 2)
    state = run_dir.newest_state()
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    record = json.loads((run_dir.local / checkpoint_name(1) / COMPLETE_FILE).read_text())
    assert record["bytes"] == (run_dir.local / checkpoint_name(1) / STATE_FILE).stat().st_size
    assert not list(run_dir.local.rglob("*.tmp")), "a temporary file was left behind"


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, damage):
    run_dir = saved_run(tmp_path, 3)
    state_file = run_dir.local / checkpoint_name(2) / STATE_FILE
    raw = state_file.read_bytes()
    if damage == "truncate":
        state_file.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":  # same size, one byte of tensor data changed: only the checksum sees it
        middle = len(raw) // 2
        state_file.write_bytes(raw[:middle] + bytes([raw[middle] ^ 0xFF]) + raw[middle + 1:])
    else:
        state_file.unlink()
    assert run_dir.newest_state()["epoch"] == 1


def test_a_planted_pickle_does_not_run_on_resume(tmp_path):
    """A checkpoint's file in shared storage or a bucket is not trusted code."""
    run_dir = saved_run(tmp_path, 1)
    witness = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {witness}",))

    planted = run_dir.local / checkpoint_name(5)
    planted.mkdir()
    torch.save({"epoch": 5, "model": Payload(), "optimizer": {}}, planted / STATE_FILE)
    assert run_dir.newest_state()["epoch"] == 0  # the planted one is skipped ...
    assert not witness.exists()  # ... without running
    assert newest_state(str(run_dir.local))["epoch"] == 0


def test_pruning_keeps_the_newest_complete_checkpoints_and_spares_one_being_written(tmp_path):
    run_dir = saved_run(tmp_path, 4, keep=2)
    assert [e for e, _ in checkpoints(str(run_dir.local))] == [3, 2]
    in_flight = run_dir.local / checkpoint_name(4)  # written, its completion record not yet
    in_flight.mkdir()
    (in_flight / STATE_FILE).write_bytes(b"partial")
    run_dir.prune()
    assert [e for e, _ in checkpoints(str(run_dir.local))] == [4, 3, 2]
    assert [e for e, _ in complete_checkpoints(str(run_dir.local))] == [3, 2]
    assert run_dir.newest_state()["epoch"] == 3


def test_one_keep_never_removes_the_newest_complete_state(tmp_path):
    run_dir = saved_run(tmp_path, 3, keep=1)
    assert [e for e, _ in checkpoints(str(run_dir.local))] == [2]


def test_the_store_finds_runs_by_name_and_the_newest(tmp_path):
    store = Store(str(tmp_path / "runs"))
    for name in ("a", "b"):
        store.create(name).write_json(RUN_FILE, {"mlflow_run_id": name})
    assert store.find("a") == "a" and store.find("latest") == "b"
    with pytest.raises(ConfigError, match="no run of that name"):
        store.find("c")
    with pytest.raises(ConfigError, match="already has a run"):
        store.create("a")


def test_runs_started_at_once_get_directories_of_their_own(tmp_path):
    store, made = Store(str(tmp_path / "runs")), []
    threads = [threading.Thread(target=lambda: made.append(store.create("mlp-local-20261201-120000",
                                                                       unique=True).name))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(made) == ["mlp-local-20261201-120000", "mlp-local-20261201-120000-2",
                            "mlp-local-20261201-120000-3"]


def test_a_damaged_marker_is_a_one_line_error(tmp_path):
    store = Store(str(tmp_path / "runs"))
    run_dir = store.create("a")
    (run_dir.local / RUN_FILE).write_bytes(b"\xff\xfe not json")
    with pytest.raises(ConfigError, match="raydeep_run.json is missing or damaged"):
        store.reopen("a").read_json(RUN_FILE)


def test_markers_hide_uri_passwords(tmp_path):
    run_dir = Store(str(tmp_path / "runs")).create("a")
    run_dir.write_json(RUN_FILE, {"config": {"storage_path": "s3://KEY:SECRET@bucket/runs"}})
    text = (run_dir.local / RUN_FILE).read_text()
    assert "SECRET" not in text and "s3://KEY:***@bucket/runs" in text


@pytest.mark.parametrize("name", ["..", "../escape", "a/b", "", " padded"])
def test_a_run_name_that_leaves_the_store_is_refused(name):
    with pytest.raises(ConfigError, match="must be a plain name"):
        small_run(**{"tracking.run_name": name})
