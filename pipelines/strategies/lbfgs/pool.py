"""Sandblaster's load balancing: portions handed to workers as they finish.

An evaluation is P portions (P well above the number of workers W). Each idle worker gets
the next portion; a fast worker thus does more of them and a slow one holds the
evaluation back by at most one portion. Once every portion is handed out, a portion that
has run `backup_after` times longer than the evaluation's median portion gets a backup
copy on an idle worker, and the first answer wins (the loser's answer, when it comes, is
dropped). A worker that dies has its portions handed out again and is replaced.

Answers are identified by an attempt number; the shards sum the winning attempt of each
portion in portion order, so the result is the same whichever worker answered.
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from pipelines.errors import first_line, raise_task_cause


@dataclass
class Answers:
    """An evaluation's outcome, per portion in portion order."""

    values: list
    attempts: list[int]
    examples: int
    seconds: float
    backups: int = 0
    reruns: int = 0


@dataclass
class _Task:
    slot: int
    evaluation: int
    portion: int
    attempt: int
    started: float = field(default_factory=time.perf_counter)


class PortionPool:
    """W worker actors (made by `start(slot)`) and the portions in flight on them."""

    POLL_S = 0.02

    def __init__(self, start: Callable[[int], object], workers: int, backup_after: float,
                 max_restarts: int, say: Callable[[str], None]):
        self.start, self.backup_after, self.max_restarts, self.say = start, backup_after, max_restarts, say
        self.workers = {slot: start(slot) for slot in range(workers)}
        self.running: dict[object, _Task] = {}
        """Object ref -> task, across evaluations: a backup's loser may still be running."""
        self.attempts = 0
        self.restarts = 0
        self.backups = 0
        self.reruns = 0

    def run(self, method: str, evaluation: int, epoch: int, portions: int) -> Answers:
        """Run `worker.method(evaluation, epoch, portion, attempt)` for every portion."""
        import ray

        began = time.perf_counter()
        waiting = deque(range(portions))
        answers: dict[int, tuple] = {}
        durations: list[float] = []
        backed_up: set[int] = set()
        backups_before, reruns_before = self.backups, self.reruns
        while len(answers) < portions:
            for slot in self._idle():
                if waiting:
                    self._submit(slot, method, evaluation, epoch, waiting.popleft())
                else:
                    straggler = self._straggler(evaluation, answers, durations, backed_up)
                    if straggler is None:
                        break
                    backed_up.add(straggler)
                    self.backups += 1
                    self._submit(slot, method, evaluation, epoch, straggler)
            timeout = self.POLL_S if self.backup_after and not waiting and self._idle() else None
            done, _ = ray.wait(list(self.running), num_returns=1, timeout=timeout)
            for ref in done:
                task = self.running.pop(ref)
                try:
                    value, examples, seconds = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    self._replace(task.slot, e)
                    if task.evaluation == evaluation and task.portion not in answers \
                            and not self._in_flight(evaluation, task.portion):
                        waiting.appendleft(task.portion)
                        self.reruns += 1
                    continue
                except ray.exceptions.RayTaskError as e:
                    raise_task_cause(e)
                if task.evaluation == evaluation and task.portion not in answers:
                    answers[task.portion] = (value, task.attempt, examples)
                    durations.append(seconds)
        ordered = [answers[p] for p in range(portions)]
        return Answers([v for v, _, _ in ordered], [a for _, a, _ in ordered],
                       sum(n for _, _, n in ordered), time.perf_counter() - began,
                       self.backups - backups_before, self.reruns - reruns_before)

    def close(self) -> None:
        import ray

        for actor in self.workers.values():
            ray.kill(actor)

    # --- the pieces --------------------------------------------------------------------------

    def _idle(self) -> list[int]:
        busy = {task.slot for task in self.running.values()}
        return [slot for slot in self.workers if slot not in busy]

    def _in_flight(self, evaluation: int, portion: int) -> bool:
        return any(t.evaluation == evaluation and t.portion == portion for t in self.running.values())

    def _submit(self, slot: int, method: str, evaluation: int, epoch: int, portion: int) -> None:
        self.attempts += 1
        ref = getattr(self.workers[slot], method).remote(evaluation, epoch, portion, self.attempts)
        self.running[ref] = _Task(slot, evaluation, portion, self.attempts)

    def _straggler(self, evaluation: int, answers: dict, durations: list[float],
                   backed_up: set[int]) -> int | None:
        """The longest-running unanswered portion, once it is overdue for a backup."""
        if not self.backup_after or not durations:
            return None
        overdue = self.backup_after * statistics.median(durations)
        now = time.perf_counter()
        late = [(now - t.started, t.portion) for t in self.running.values()
                if t.evaluation == evaluation and t.portion not in answers
                and t.portion not in backed_up and now - t.started > overdue]
        return max(late)[1] if late else None

    def _replace(self, slot: int, error: Exception) -> None:
        reason = first_line(error, 200)
        if 0 <= self.max_restarts <= self.restarts:
            raise RuntimeError(f"worker {slot} died after {self.restarts} replacements "
                               f"(strategy.max_worker_restarts={self.max_restarts}): {reason}")
        self.restarts += 1
        self.say(f"worker {slot} died ({reason}); its portions go to the other workers "
                 "and a new worker takes its place")
        for ref in [r for r, t in self.running.items() if t.slot == slot]:
            del self.running[ref]
        self.workers[slot] = self.start(slot)
