"""The background job runner: progress, results, errors, cancel, one job at a time."""

import threading

from simu_core import jobs
from simu_core.errors import SimuError


def test_job_reports_progress_records_and_result():
    runner = jobs.JobRunner()

    def work(ctx):
        for step in range(3):
            ctx.report((step + 1) / 3, f"step {step}", step=step, loss=1.0 / (step + 1))
        return "answer"

    status = runner.submit("demo", work).wait(10)
    assert status.state == jobs.DONE and status.result == "answer" and status.progress == 1.0
    assert [r["step"] for r in status.records] == [0, 1, 2]


def test_user_error_becomes_a_failed_state_with_message_and_details():
    def work(ctx):
        raise SimuError("the forget set is empty; upload one")

    status = jobs.JobRunner().submit("bad", work).wait(10)
    assert status.state == jobs.FAILED and status.error == "the forget set is empty; upload one"
    assert "SimuError" in status.traceback


def test_crash_is_reported_not_swallowed():
    status = jobs.JobRunner().submit("crash", lambda ctx: 1 / 0).wait(10)
    assert status.state == jobs.FAILED and status.error.startswith("ZeroDivisionError")


def test_cancel_stops_a_running_job_between_steps():
    started = threading.Event()

    def work(ctx):
        started.set()
        steps = 0
        while not ctx.cancelled:
            steps += 1
            ctx.cancel_event.wait(0.01)
        return steps

    job = jobs.JobRunner().submit("long", work)
    assert started.wait(10)
    job.cancel()
    assert job.wait(10).state == jobs.CANCELLED


def test_jobs_run_one_at_a_time_in_order():
    runner = jobs.JobRunner()
    gate, order = threading.Event(), []
    first = runner.submit("first", lambda ctx: (gate.wait(10), order.append("first")))
    second = runner.submit("second", lambda ctx: order.append("second"))
    assert second.snapshot().state == jobs.QUEUED and "1 job(s) ahead" in second.snapshot().message
    assert runner.busy()
    gate.set()
    second.wait(10)
    assert first.snapshot().state == jobs.DONE and order == ["first", "second"]


def test_cancelled_queued_job_never_starts():
    runner = jobs.JobRunner()
    gate, ran = threading.Event(), []
    runner.submit("blocker", lambda ctx: gate.wait(10))
    queued = runner.submit("queued", lambda ctx: ran.append(True))
    queued.cancel()
    gate.set()
    assert queued.wait(10).state == jobs.CANCELLED and not ran


def test_eta_is_extrapolated_from_progress():
    status = jobs.JobStatus(1, "x", state=jobs.RUNNING, progress=0.25, started=0.0)
    status.finished = 10.0  # pretend 10 s elapsed
    assert status.eta_seconds == 30.0
