"""Background jobs for the app: one worker thread, a FIFO queue, a status object per job.

The worker never touches the UI. A job function receives a `JobContext`; it reports progress
through `ctx.report(...)` and checks `ctx.cancelled` (or passes `ctx.cancel_event` on) between
steps. The UI polls `job.snapshot()` (a copy, safe to read from any thread).

One job runs at a time per `JobRunner` (one per server process): heavy jobs on 2 cores or one
GPU only slow each other down, so a second request waits in the queue and says so.
"""

from __future__ import annotations

import copy
import itertools
import math
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from simu_core.errors import SimuError

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


@dataclass
class JobStatus:
    """What the UI shows about a job. `progress` is in [0, 1]; times are `time.time()` seconds."""

    id: int
    name: str
    state: str = QUEUED
    progress: float = 0.0
    message: str = "waiting for the worker"
    records: list[dict] = field(default_factory=list)  # per-step records (losses, lr, ...)
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: Any = None
    error: str | None = None  # a user-facing message
    traceback: str | None = None  # the details, for an expander

    @property
    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished or time.time()) - self.started

    anchor: tuple[float, float] | None = None  # (time, progress) of the first report with progress > 0

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the rate measured so far; None ("estimating") before `ETA_AFTER` of the job is done.

        The rate is taken from the first report with some progress (`anchor`) to now, so set-up work before
        the first step (copying a model, computing a mask) does not make every later step look slower, and
        a job that jumps to some fraction at once and then says nothing (no measured rate) gets no estimate.
        """
        if self.state != RUNNING:
            return None
        return eta_from_rate(self.anchor, self.progress, time.time())


ETA_AFTER = 0.1  # no estimate before this fraction of a job is done: early rates mislead


def eta_from_rate(
    anchor: tuple[float, float] | None, progress: float, now: float, after: float = ETA_AFTER
) -> float | None:
    """Seconds left at the mean rate since `anchor` (time, progress); None before `after` or without a rate."""
    if anchor is None or progress < after or progress <= anchor[1] or now <= anchor[0]:
        return None
    return (now - anchor[0]) / (progress - anchor[1]) * (1 - progress)


def steps_to_target(points: list[tuple[float, float]], target: float, last: int = 4) -> float | None:
    """The step at which a probe value (e.g. the forget exact match) reaches `target`, from its recent trend.

    `points` are (step, value) pairs, oldest first, taken every few steps. A value falling to a positive
    target (an exact match or ROUGE falling to 0.05) is fitted as an exponential decay: a least-squares line
    through the logs of the `last` values (floored at 1e-3); one rising to its target (a loss) as a line.
    (On the built-in SIMU run the exact match fell 0.85, 0.45, 0.15, 0.10, 0.0 every 10 steps: a straight
    line through the first two says step 30, the decay says 54, the run stopped at 50.) The stop cannot come
    before the next probe. Returns the last probe's step when it already met the target, None with fewer than
    two points or a trend that does not move towards the target.
    """
    if not points:
        return None
    step, value = points[-1]
    going_down = points[0][1] >= target
    if (value <= target) if going_down else (value >= target):
        return step
    recent = points[-last:]
    if len(recent) < 2:
        return None
    decay = going_down and target > 0
    ys = [math.log(max(v, 1e-3)) if decay else v for _, v in recent]
    goal = math.log(target) if decay else target
    n = len(recent)
    mx, my = sum(p[0] for p in recent) / n, sum(ys) / n
    sxx = sum((p[0] - mx) ** 2 for p in recent)
    slope = sum((p[0] - mx) * (y - my) for p, y in zip(recent, ys, strict=True)) / sxx if sxx else 0.0
    if slope == 0 or (slope > 0) == going_down:
        return None
    next_probe = step + (recent[-1][0] - recent[-2][0])
    return max(next_probe, mx + (goal - my) / slope)


def eta_to_stop(status: JobStatus, key: str, target: float) -> float | None:
    """Seconds until a step-based job is expected to stop early: when its probe `key` reaches `target`.

    The job's records carry `step`, `steps` and, on probe steps, `key` (e.g. the unlearning's `forget_em`);
    the stop step comes from `steps_to_target` (capped at the step budget) and the seconds per step from
    the job's rate so far (as `eta_seconds`, but as soon as the trend is known: a run that stops early may
    never reach a tenth of its budget). None while either is unknown.
    """
    if status.state != RUNNING or not status.records:
        return None
    budget = eta_from_rate(status.anchor, status.progress, time.time(), after=0.0)
    if budget is None:
        return None
    points = [(r["step"], r[key]) for r in status.records if r.get(key) is not None]
    stop = steps_to_target(points, target)
    step, steps = status.records[-1]["step"], status.records[-1]["steps"]
    if stop is None or steps <= step:
        return None
    return budget * (min(max(stop, step), steps) - step) / (steps - step)


def item_weighted(sizes: list[int], index: int, fraction: float) -> float:
    """Progress over several data sets done one after another, each weighted by its size (items)."""
    total = sum(sizes)
    return (sum(sizes[:index]) + fraction * sizes[index]) / total if total else 0.0


class JobContext:
    """Handed to a job function: report progress, check for cancel."""

    def __init__(self, job: Job) -> None:
        self._job = job
        self.cancel_event = job.cancel_event

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def report(self, progress: float | None = None, message: str | None = None, **record: Any) -> None:
        """Update progress/message; keyword arguments are appended as one record (e.g. losses)."""
        with self._job.lock:
            status = self._job.status
            if progress is not None:
                status.progress = min(1.0, max(0.0, progress))
                if status.anchor is None and status.progress > 0:
                    status.anchor = (time.time(), status.progress)
            if message is not None:
                status.message = message
            if record:
                status.records.append(record)


class Job:
    """A unit of background work with a thread-safe status."""

    def __init__(self, job_id: int, name: str, fn: Callable[[JobContext], Any]) -> None:
        self.fn = fn
        self.lock = threading.Lock()
        self.cancel_event = threading.Event()
        self.status = JobStatus(job_id, name)
        self.done_event = threading.Event()

    def snapshot(self) -> JobStatus:
        """A deep copy of the status, consistent at one instant."""
        with self.lock:
            return copy.deepcopy(self.status)

    def cancel(self) -> None:
        """Ask the job to stop at its next check (a queued job never starts)."""
        self.cancel_event.set()

    def wait(self, timeout: float | None = None) -> JobStatus:
        self.done_event.wait(timeout)
        return self.snapshot()

    def _run(self) -> None:
        with self.lock:
            if self.cancel_event.is_set():
                self._finish(CANCELLED, message="cancelled before it started")
                return
            self.status.state, self.status.started, self.status.message = RUNNING, time.time(), "started"
        try:
            result = self.fn(JobContext(self))
        except SimuError as err:
            self._finish_locked(FAILED, error=str(err), tb=traceback.format_exc())
        except Exception as err:  # any crash must end in a visible state, never a silent thread death
            self._finish_locked(FAILED, error=f"{type(err).__name__}: {err}", tb=traceback.format_exc())
        else:
            state = CANCELLED if self.cancel_event.is_set() else DONE
            self._finish_locked(state, result=result)

    def _finish_locked(self, state: str, **kwargs: Any) -> None:
        with self.lock:
            self._finish(state, **kwargs)

    def _finish(self, state: str, result: Any = None, error: str | None = None, tb: str | None = None,
                message: str | None = None) -> None:  # fmt: skip
        s = self.status
        s.state, s.finished, s.result, s.error, s.traceback = state, time.time(), result, error, tb
        if state == DONE:
            s.progress = 1.0
        s.message = message or {DONE: "finished", FAILED: error or "failed", CANCELLED: "cancelled"}[state]
        self.done_event.set()


class JobRunner:
    """Runs submitted jobs one at a time, in submission order, on a daemon worker thread."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Job] = queue.Queue()
        self._jobs: list[Job] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="simu-job-worker", daemon=True)
        self._worker.start()

    def submit(self, name: str, fn: Callable[[JobContext], Any]) -> Job:
        """Queue `fn`; returns its Job at once."""
        with self._lock:
            job = Job(next(self._ids), name, fn)
            self._jobs.append(job)
        ahead = self.pending_before(job)
        if ahead:
            with job.lock:
                job.status.message = f"queued: {ahead} job(s) ahead of it (one job runs at a time)"
        self._queue.put(job)
        return job

    def pending_before(self, job: Job) -> int:
        """Number of unfinished jobs submitted before `job`."""
        with self._lock:
            earlier = self._jobs[: self._jobs.index(job)]
        return sum(j.snapshot().state not in FINISHED for j in earlier)

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs)

    def busy(self) -> bool:
        return any(j.snapshot().state in (QUEUED, RUNNING) for j in self.jobs())

    def _work(self) -> None:
        while True:
            self._queue.get()._run()
