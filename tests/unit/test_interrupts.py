"""Interrupts held back during a tracking-store write (`pipelines.interrupts`)."""
import signal
import threading

import pytest

from pipelines import backlog, interrupts


def test_an_interrupt_during_a_store_call_is_raised_as_the_call_returns():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            interrupts.handler(signal.SIGTERM, None)  # the signal arrives mid-write
            done.append("the write went on to its end")
    assert done == ["the write went on to its end"]
    with pytest.raises(KeyboardInterrupt):  # outside a write: at once, as Python's own
        interrupts.handler(signal.SIGINT, None)
    with interrupts.deferred():  # nothing pending is left behind
        pass
    seen = []  # another thread's store call is never where the interrupt is raised

    def write():
        with interrupts.deferred():
            seen.append(interrupts._depth)

    worker = threading.Thread(target=write)
    worker.start()
    worker.join()
    assert seen == [0]


def test_sqlalchemys_autoflush_preface_does_not_hide_the_databases_words():
    class OperationalError(Exception):
        pass

    error = OperationalError("(raised as a result of Query-invoked autoflush; consider using a "
                             "session.no_autoflush block if this flush is occurring prematurely)\n"
                             "(sqlite3.OperationalError) database is locked\n[SQL: INSERT ...]")
    assert backlog.transient(error)
    assert backlog.reason(error) == "(sqlite3.OperationalError) database is locked"
