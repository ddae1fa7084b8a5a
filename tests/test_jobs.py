"""The background job runner: progress, results, errors, cancel, one job at a time."""

import threading
import time

import numpy as np
import pytest

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


def test_eta_is_the_rate_since_the_first_progress_times_what_is_left():
    # first progress 0.05 at t = 100 (set-up before it is not counted), 0.25 at t = 110: 0.02 per second
    assert jobs.eta_from_rate((100.0, 0.05), 0.25, 110.0) == pytest.approx(0.75 / 0.02)


def test_no_eta_before_a_tenth_of_the_job_or_without_a_measured_rate():
    assert jobs.eta_from_rate((100.0, 0.01), 0.09, 200.0) is None
    assert jobs.eta_from_rate(None, 0.5, 200.0) is None
    assert jobs.eta_from_rate((100.0, 0.1), 0.1, 200.0) is None  # jumped to 10% at once, then silent


def test_status_eta_follows_the_reports_of_a_running_job():
    gate, reported = threading.Event(), threading.Event()

    def work(ctx):
        ctx.report(0.0, "setting up")
        ctx.report(0.05, "first step")
        time.sleep(0.2)
        ctx.report(0.25, "fifth step")
        reported.set()
        gate.wait(10)

    job = jobs.JobRunner().submit("x", work)
    assert reported.wait(10)
    status = job.snapshot()
    assert status.anchor[1] == 0.05
    assert status.eta_seconds == pytest.approx(0.2 / 0.2 * 0.75, rel=0.5)  # 0.2 of the job in ~0.2 s
    gate.set()
    assert job.wait(10).eta_seconds is None  # finished: no estimate


def test_steps_to_target_fits_a_falling_rate_as_an_exponential_decay():
    points = [(10, 0.8), (20, 0.4), (30, 0.2)]  # halves every 10 steps: 0.05 two halvings after step 30
    assert jobs.steps_to_target(points, 0.05) == pytest.approx(50.0)
    fit = np.polyfit([10, 20, 30, 40], np.log([0.9, 0.5, 0.35, 0.2]), 1)  # the reference least squares
    expected = (np.log(0.05) - fit[1]) / fit[0]
    assert expected > 50  # after the next probe
    assert jobs.steps_to_target([(10, 0.9), (20, 0.5), (30, 0.35), (40, 0.2)], 0.05) == pytest.approx(expected)


def test_steps_to_target_fits_a_rising_loss_as_a_line():
    assert jobs.steps_to_target([(10, 2.0), (20, 3.0)], 6.0) == pytest.approx(50.0)


def test_the_stop_is_never_before_the_next_probe():
    assert jobs.steps_to_target([(10, 0.9), (20, 0.06)], 0.05) == 30


def test_steps_to_target_without_a_trend_towards_it():
    assert jobs.steps_to_target([(10, 0.5)], 0.05) is None
    assert jobs.steps_to_target([(10, 0.5), (20, 0.6)], 0.05) is None
    assert jobs.steps_to_target([(10, 0.5), (20, 0.5)], 0.05) is None
    assert jobs.steps_to_target([(10, 0.5), (20, 0.04)], 0.05) == 20  # already met


def test_item_weighted_progress():
    assert jobs.item_weighted([10, 30], 0, 1.0) == 0.25
    assert jobs.item_weighted([10, 30], 1, 0.5) == pytest.approx(0.625)


def test_eta_to_stop_scales_the_budget_eta_by_the_steps_to_the_expected_stop():
    records = [
        {"step": i, "steps": 100, **({"forget_em": 0.5 ** (i / 10)} if i % 10 == 0 else {})} for i in range(1, 32)
    ]
    status = jobs.JobStatus(1, "x", state=jobs.RUNNING, progress=0.31, records=records, anchor=(time.time() - 30, 0.01))
    budget = status.eta_seconds  # ~ 30 s for 0.3 of the job: ~ 69 s for the 69 steps left
    stop = jobs.eta_to_stop(status, "forget_em", 0.05)  # EM halves every 10 steps: 0.05 at step 43.2
    assert stop == pytest.approx(budget * (10 * np.log2(20) - 31) / 69, rel=0.01)
    assert jobs.eta_to_stop(status, "forget_nll", 5.0) is None  # never probed
