"""The step-level scheduler in-process (no Redis, no torch): ordering, caps, fairness, cancellation,
reclaimed jobs and mixed kinds, in the style of text-generation-inference's queue ``State`` tests."""

from __future__ import annotations

import pytest

from service.scheduler import Scheduler, Ticket


def ticket(job: str, rows: int = 1, steps: int = 2, at: float = 0.0, **kw: object) -> Ticket:
    return Ticket(job, str(kw.pop("model", "m")), rows, steps, at, **kw)  # type: ignore[arg-type]


def run_to_end(s: Scheduler, model: str = "m") -> list[list[str]]:
    """Step until idle; the job ids that retired after each evaluation."""
    out = []
    while not s.idle():
        s.plan()
        out.append([t.job_id for t in s.advance(model)])
    return out


def test_admits_oldest_first_by_submitted_time_not_arrival() -> None:
    s = Scheduler(max_rows=8)
    s.submit(ticket("late", at=3.0))
    s.submit(ticket("early", at=1.0))
    s.submit(ticket("middle", at=2.0))
    plan = s.plan()
    assert [t.job_id for t in plan.admitted] == ["early", "middle", "late"]
    assert plan.running == {"m": ["early", "middle", "late"]}


def test_cap_counts_images_and_the_head_is_never_overtaken() -> None:
    s = Scheduler(max_rows=4)
    s.submit(ticket("a", rows=3, steps=3, at=1))
    s.submit(ticket("big", rows=4, at=2))
    s.submit(ticket("small", rows=1, at=3))  # would fit beside a, but big is older
    assert [t.job_id for t in s.plan().admitted] == ["a"]
    assert s.rows("m") == 3
    s.advance("m")
    assert s.plan().admitted == []  # still blocked behind big
    s.advance("m")
    s.plan()
    assert [t.job_id for t in s.advance("m")] == ["a"]
    assert [t.job_id for t in s.plan().admitted] == ["big"]
    s.advance("m")
    s.advance("m")
    assert [t.job_id for t in s.plan().admitted] == ["small"]


def test_a_short_job_joins_a_running_long_one_and_leaves_first() -> None:
    """No head-of-line blocking: the short job finishes while the long one still runs."""
    s = Scheduler(max_rows=8)
    s.submit(ticket("long", rows=4, steps=250, at=0))
    s.plan()
    for _ in range(10):
        s.advance("m")
        s.plan()
    s.submit(ticket("short", rows=1, steps=3, at=1))
    plan = s.plan()
    assert [t.job_id for t in plan.admitted] == ["short"]
    assert plan.running["m"] == ["long", "short"]
    retired = []
    for _ in range(3):
        retired.append([t.job_id for t in s.advance("m")])
        s.plan()
    assert retired == [[], [], ["short"]]
    assert s.progress("long") == (13, 250)
    assert s.progress("short") is None


def test_each_job_retires_after_its_own_steps() -> None:
    s = Scheduler(max_rows=8)
    for job, steps in (("s5", 5), ("s1", 1), ("s3", 3)):
        s.submit(ticket(job, steps=steps, at=len(job)))
    assert run_to_end(s) == [["s1"], [], ["s3"], [], ["s5"]]


def test_cancel_waiting_is_immediate_running_leaves_at_the_next_boundary() -> None:
    s = Scheduler(max_rows=8)
    s.submit(ticket("run", rows=2, steps=10, at=0))
    s.submit(ticket("other", steps=10, at=1))
    s.plan()
    s.submit(ticket("wait", rows=7, at=2))  # does not fit yet
    assert s.cancel("wait") == "waiting"
    assert s.cancel("run") == "running"
    assert s.progress("run") == (0, 10)  # still in this step's batch
    s.advance("m")
    plan = s.plan()
    assert plan.evicted == ["run"]
    assert plan.running == {"m": ["other"]}
    assert s.cancel("run") is None and s.cancel("nobody") is None


def test_cancelled_rows_free_room_for_a_waiting_job_at_the_same_boundary() -> None:
    s = Scheduler(max_rows=4)
    s.submit(ticket("a", rows=4, steps=50, at=0))
    s.plan()
    s.submit(ticket("b", rows=4, at=1))
    s.advance("m")
    assert s.plan().admitted == []
    s.cancel("a")
    s.advance("m")
    plan = s.plan()
    assert plan.evicted == ["a"] and [t.job_id for t in plan.admitted] == ["b"]


def test_a_reclaimed_job_keeps_its_place_and_runs_alone() -> None:
    s = Scheduler(max_rows=8)
    s.submit(ticket("young", steps=2, at=5.0))
    s.submit(ticket("reclaimed", steps=2, at=1.0, isolated=True))  # arrives later, submitted earlier
    s.submit(ticket("youngest", steps=2, at=6.0))
    plan = s.plan()
    assert [t.job_id for t in plan.admitted] == ["reclaimed"]
    s.submit(ticket("new", steps=1, at=7.0))
    s.advance("m")
    assert s.plan().admitted == []  # nothing joins an isolated job
    assert [t.job_id for t in s.advance("m")] == ["reclaimed"]
    assert [t.job_id for t in s.plan().admitted] == ["young", "youngest", "new"]


def test_an_isolated_job_waits_for_the_running_batches_to_drain() -> None:
    s = Scheduler(max_rows=8)
    s.submit(ticket("running", steps=3, at=2.0))
    s.submit(ticket("other-model", steps=1, at=2.5, model="n"))
    s.plan()
    s.submit(ticket("reclaimed", steps=1, at=1.0, isolated=True))
    s.submit(ticket("newer", steps=1, at=3.0))
    s.advance("m")
    assert [t.job_id for t in s.advance("n")] == ["other-model"]
    assert s.plan().admitted == []  # draining: newer must not jump ahead of the reclaimed job
    s.advance("m")
    s.plan()
    assert [t.job_id for t in s.advance("m")] == ["running"]
    assert [t.job_id for t in s.plan().admitted] == ["reclaimed"]


def test_models_have_their_own_batches_and_caps() -> None:
    s = Scheduler(max_rows=4)
    s.submit(ticket("a", rows=4, model="m", at=0))
    s.submit(ticket("b", rows=4, model="n", at=1))
    s.submit(ticket("c", rows=1, model="m", at=2))
    plan = s.plan()
    assert plan.running == {"m": ["a"], "n": ["b"]}
    assert [t.job_id for t in s.waiting] == ["c"]


def test_mixed_kinds_samplers_and_steps_share_one_batch() -> None:
    s = Scheduler(max_rows=16)
    s.submit(ticket("sample-ddpm", rows=4, steps=50, at=0, kind="sample"))
    s.submit(ticket("purify-ddim", rows=6, steps=5, at=1, kind="purify"))
    s.submit(ticket("sample-cm", rows=2, steps=1, at=2, kind="sample"))
    plan = s.plan()
    assert plan.running == {"m": ["sample-ddpm", "purify-ddim", "sample-cm"]}
    assert {t.kind for t in plan.admitted} == {"sample", "purify"}
    assert s.rows("m") == 12


def test_fairness_many_small_jobs_all_finish_in_submission_order() -> None:
    s = Scheduler(max_rows=3)
    for i in range(9):
        s.submit(ticket(f"j{i}", steps=2, at=float(i)))
    order = [job for step in run_to_end(s) for job in step]
    assert order == [f"j{i}" for i in range(9)]


def test_stopping_admits_nothing_but_finishes_the_running_jobs() -> None:
    s = Scheduler(max_rows=8)
    s.submit(ticket("run", steps=2, at=0))
    s.plan()
    s.submit(ticket("wait", at=1))
    assert s.plan(admit=False).admitted == []
    s.advance("m")
    assert [t.job_id for t in s.advance("m")] == ["run"]
    assert [t.job_id for t in s.waiting] == ["wait"]


def test_bad_tickets_are_refused() -> None:
    s = Scheduler(max_rows=2)
    with pytest.raises(ValueError, match="over the cap"):
        s.submit(ticket("x", rows=3))
    with pytest.raises(ValueError, match="at least one step"):
        s.submit(ticket("x", steps=0))
    s.submit(ticket("x"))
    with pytest.raises(ValueError, match="already scheduled"):
        s.submit(ticket("x"))
    s.drop("x")
    assert s.idle()


# ---- the step policy: which running jobs an evaluation takes ----------------------------------------


def srpt(max_rows: int = 64, **kw: object) -> Scheduler:
    return Scheduler(max_rows, policy="srpt", **kw)  # type: ignore[arg-type]


def test_fifo_is_the_default_and_takes_every_running_job() -> None:
    s = Scheduler(max_rows=8)
    s.submit(ticket("long", rows=4, steps=250, at=0))
    s.submit(ticket("short", rows=1, steps=5, at=1))
    plan = s.plan()
    assert plan.running == {"m": ["long", "short"]} and plan.deferred == {"m": []}


def test_srpt_takes_the_least_work_left_and_defers_a_long_job() -> None:
    s = srpt()
    s.submit(ticket("long", rows=4, steps=25, at=0))
    s.submit(ticket("short", rows=1, steps=5, at=1))
    plan = s.plan()
    assert plan.running == {"m": ["short"]} and plan.deferred == {"m": ["long"]}
    assert [t.job_id for t in plan.admitted] == ["long", "short"]  # both hold their rows in the batch
    assert s.rows("m") == 5
    s.advance("m")
    assert s.progress("long") == (0, 25) and s.progress("short") == (1, 5)  # only the evaluated moved


def test_srpt_fill_takes_jobs_within_the_factor_of_the_least_work() -> None:
    s = srpt(srpt_fill=4.0)
    s.submit(ticket("w5", rows=1, steps=5, at=0))  # work 5
    s.submit(ticket("w20", rows=2, steps=10, at=1))  # work 20 = 4 x 5: in
    s.submit(ticket("w21", rows=3, steps=7, at=2))  # work 21: out
    s.submit(ticket("w4", rows=4, steps=1, at=3))  # work 4: the least, so the bound is 16
    assert s.plan().running == {"m": ["w5", "w4"]}
    s.advance("m")  # w4 retires; w5 has 4 left: the bound is 16
    assert s.plan().running == {"m": ["w5"]}


def test_srpt_takes_equal_jobs_together() -> None:
    """Uniform traffic keeps its full batch."""
    s = srpt()
    for i in range(8):
        s.submit(ticket(f"j{i}", rows=4, steps=10, at=i))
    assert s.plan().running == {"m": [f"j{i}" for i in range(8)]}


def test_starvation_is_bounded_by_max_defer_steps() -> None:
    """A stream of shorter jobs never keeps a long one out for more than max_defer_steps boundaries."""
    s = srpt(max_defer_steps=3)
    s.submit(ticket("long", rows=4, steps=6, at=0))
    evaluated = ""
    for i in range(100):
        s.submit(ticket(f"short{i}", rows=1, steps=2, at=1 + i))  # always a job with less work waiting
        evaluated += "x" if "long" in s.plan().running["m"] else "."
        if "long" in [t.job_id for t in s.advance("m")]:
            break
    # Deferred 3 boundaries, then forced in; with one step left its work (4) is within 4x a short's.
    assert evaluated == "...x...x...x...x...xx"


def test_max_defer_steps_zero_never_defers() -> None:
    s = srpt(max_defer_steps=0)
    s.submit(ticket("long", rows=4, steps=25, at=0))
    s.submit(ticket("short", rows=1, steps=5, at=1))
    assert s.plan().running == {"m": ["long", "short"]}


def test_the_cap_counts_deferred_rows() -> None:
    """Deferred jobs keep their rows in the running batch: admission still stops at max_rows."""
    s = srpt(max_rows=5)
    s.submit(ticket("long", rows=4, steps=50, at=0))
    s.submit(ticket("short", rows=1, steps=2, at=1))
    s.submit(ticket("next", rows=1, steps=1, at=2))
    plan = s.plan()
    assert [t.job_id for t in plan.admitted] == ["long", "short"] and plan.running == {"m": ["short"]}
    s.advance("m")
    assert s.plan().admitted == []
    assert [t.job_id for t in s.advance("m")] == ["short"]
    plan = s.plan()
    assert [t.job_id for t in plan.admitted] == ["next"] and plan.running == {"m": ["next"]}


def test_a_deferred_job_cancelled_leaves_at_the_next_boundary() -> None:
    s = srpt()
    s.submit(ticket("long", rows=4, steps=50, at=0))
    s.submit(ticket("short", rows=1, steps=5, at=1))
    assert s.plan().deferred == {"m": ["long"]}
    assert s.cancel("long") == "running"
    s.advance("m")
    plan = s.plan()
    assert plan.evicted == ["long"] and plan.running == {"m": ["short"]} and plan.deferred == {"m": []}
    assert s.rows("m") == 1


def test_a_reclaimed_job_runs_alone_at_every_step_under_srpt() -> None:
    s = srpt(max_defer_steps=1)
    s.submit(ticket("reclaimed", rows=4, steps=3, at=0.0, isolated=True))
    s.plan()
    s.submit(ticket("short", rows=1, steps=1, at=1.0))
    for _ in range(2):
        assert s.plan().running == {"m": ["reclaimed"]}
        s.advance("m")
    assert [t.job_id for t in s.advance("m")] == ["reclaimed"]
    assert s.plan().running == {"m": ["short"]}


def test_each_model_gets_its_own_selection() -> None:
    s = srpt()
    s.submit(ticket("m-long", rows=4, steps=40, at=0, model="m"))
    s.submit(ticket("m-short", rows=1, steps=4, at=1, model="m"))
    s.submit(ticket("n-long", rows=4, steps=40, at=2, model="n"))
    plan = s.plan()
    assert plan.running == {"m": ["m-short"], "n": ["n-long"]}
    s.advance("n")
    assert s.progress("n-long") == (1, 40) and s.progress("m-short") == (0, 4)


def test_bad_policy_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown scheduler policy 'lifo'; known: fifo, srpt"):
        Scheduler(4, policy="lifo")
    with pytest.raises(ValueError, match="srpt_fill must be >= 1"):
        Scheduler(4, policy="srpt", srpt_fill=0.5)
    with pytest.raises(ValueError, match="max_defer_steps must be >= 0"):
        Scheduler(4, max_defer_steps=-1)


def test_unadmitted_jobs_wait_again_in_their_order_and_run_from_step_zero() -> None:
    """The worker's mark 'running' failed (Redis went away): the boundary's admissions are undone."""
    s = Scheduler(max_rows=8)
    s.submit(ticket("old", steps=2, at=1.0))
    s.plan()
    s.advance("m")  # old is one step in
    s.submit(ticket("b", at=3.0))
    s.submit(ticket("a", at=2.0))
    admitted = s.plan().admitted
    assert [t.job_id for t in admitted] == ["a", "b"]
    s.unadmit(admitted)
    assert [t.job_id for t in s.waiting] == ["a", "b"]
    assert [r.ticket.job_id for r in s.running["m"]] == ["old"]
    assert s.plan().admitted == admitted
    assert [[t.job_id for t in s.advance("m")]] == [["old"]]
    assert run_to_end(s) == [["a", "b"]]  # their two steps, counted from the re-admission
