"""Step-level ("continuous") batching policy: which job's rows run at the next network evaluation.

Pure and torch-free, so its rules are unit-tested in-process; the worker owns the tensors.

Each model has one running batch. At every step boundary the worker asks for a ``StepPlan``:
cancelled jobs' rows leave, then waiting jobs join oldest first (by first-submitted time, so a job
reclaimed from a dead worker keeps its place) while their images fit within ``max_rows``; the first
that does not fit stops admission for its model, so a large job is never overtaken for ever by small
ones. After the evaluation ``advance`` moves the jobs it took one step on and retires those that
reached t = 0. Jobs of any sampler, step count, t* or kind share a batch: each row carries its own
time and update.

*Which* running jobs' rows the evaluation takes is the step policy (``policy``): ``fifo`` takes every
running row (a bigger batch is nearly free on a GPU); ``srpt`` takes the job with the least work
left (images x steps left) and those within ``srpt_fill`` times that much. On the CPU a step costs
about the rows it holds, so under ``fifo`` a 1-image request pays for a 4-image long job's rows at
every one of its steps; under ``srpt`` the long job's rows wait while short requests run (see
``bench/sim_scheduler.py`` for the policies compared). Rows left out simply wait a step: a row's
result depends only on its own seed and step, so deferring it never changes an image. Starvation is
bounded: a job left out of ``max_defer_steps`` boundaries in a row is taken at the next.

A reclaimed job (its worker died while holding it) is *isolated*: it runs alone, once every running
batch has drained, and nothing joins while it runs. If it is what killed the worker it then takes no
healthy job down with it, and only it reaches the dead-letter stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

POLICIES = ("fifo", "srpt")


@dataclass(frozen=True)
class Ticket:
    """A job as the scheduler sees it."""

    job_id: str
    model: str
    rows: int  # output images: one row of the running batch each
    steps: int  # network evaluations until its rows reach t = 0
    submitted: float  # first-submitted time (kept across requeues and reclaims)
    isolated: bool = False
    kind: str = "sample"


@dataclass
class Running:
    ticket: Ticket
    step: int = 0
    deferred: int = 0  # boundaries in a row it was left out of the evaluation

    @property
    def remaining(self) -> int:
        return self.ticket.steps - self.step

    @property
    def work(self) -> int:
        """Row-evaluations left: what the rest of the job costs on the CPU."""
        return self.ticket.rows * self.remaining


def select_fifo(rows: list[Running], fill: float) -> list[Running]:
    """Every running row, in admission order."""
    return list(rows)


def select_srpt(rows: list[Running], fill: float) -> list[Running]:
    """The job with the least work left, and those within ``fill`` times that much."""
    least = min(r.work for r in rows)
    return [r for r in rows if r.work <= fill * least]


SELECTORS: dict[str, Callable[[list[Running], float], list[Running]]] = {
    "fifo": select_fifo,
    "srpt": select_srpt,
}


@dataclass(frozen=True)
class StepPlan:
    """What happens at one step boundary."""

    admitted: list[Ticket]  # join the running batch now (in order)
    evicted: list[str]  # cancelled jobs whose rows leave now
    running: dict[str, list[str]]  # model -> job ids evaluated at this step (admitted included)
    deferred: dict[str, list[str]] = field(default_factory=dict)  # model -> running jobs that wait

    @property
    def empty(self) -> bool:
        return not any(self.running.values())


@dataclass
class Scheduler:
    """Waiting and running jobs of one worker; ``max_rows`` caps each model's running batch, ``policy``
    (``POLICIES``) picks the running jobs each evaluation takes."""

    max_rows: int
    policy: str = "fifo"
    srpt_fill: float = 4.0
    max_defer_steps: int = 8
    waiting: list[Ticket] = field(default_factory=list)
    running: dict[str, list[Running]] = field(default_factory=dict)
    _cancelled: set[str] = field(default_factory=set)
    _stepping: dict[str, set[str]] = field(default_factory=dict)  # model -> the last plan's jobs

    def __post_init__(self) -> None:
        if self.policy not in SELECTORS:
            raise ValueError(f"unknown scheduler policy {self.policy!r}; known: {', '.join(POLICIES)}")
        if not self.srpt_fill >= 1:
            raise ValueError(f"srpt_fill must be >= 1, got {self.srpt_fill}")
        if self.max_defer_steps < 0:
            raise ValueError(f"max_defer_steps must be >= 0, got {self.max_defer_steps}")

    def submit(self, ticket: Ticket) -> None:
        if ticket.rows > self.max_rows:
            raise ValueError(f"job {ticket.job_id} has {ticket.rows} images, over the cap of {self.max_rows}")
        if ticket.steps < 1:
            raise ValueError(f"job {ticket.job_id} needs at least one step")
        if self._known(ticket.job_id):
            raise ValueError(f"job {ticket.job_id} is already scheduled")
        self.waiting.append(ticket)
        self.waiting.sort(key=lambda t: (t.submitted, t.job_id))

    def _known(self, job_id: str) -> bool:
        return any(t.job_id == job_id for t in self.waiting) or any(
            r.ticket.job_id == job_id for rows in self.running.values() for r in rows
        )

    def cancel(self, job_id: str) -> str | None:
        """'waiting' (dropped now), 'running' (its rows leave at the next boundary) or None."""
        for i, t in enumerate(self.waiting):
            if t.job_id == job_id:
                del self.waiting[i]
                return "waiting"
        if any(r.ticket.job_id == job_id for rows in self.running.values() for r in rows):
            self._cancelled.add(job_id)
            return "running"
        return None

    def drop(self, job_id: str) -> None:
        """Forget a job wherever it is, at once (it failed, or the worker hands it back)."""
        self.waiting = [t for t in self.waiting if t.job_id != job_id]
        for model, rows in self.running.items():
            self.running[model] = [r for r in rows if r.ticket.job_id != job_id]
        self._cancelled.discard(job_id)

    def unadmit(self, tickets: list[Ticket]) -> None:
        """Put jobs admitted at this boundary back in the waiting order, before any step ran them (the
        worker could not mark them running): admitted again at a later boundary."""
        for ticket in tickets:
            self.drop(ticket.job_id)
            self.submit(ticket)

    def rows(self, model: str) -> int:
        return sum(r.ticket.rows for r in self.running.get(model, []))

    def _isolated_running(self) -> bool:
        return any(r.ticket.isolated for rows in self.running.values() for r in rows)

    def _busy(self) -> bool:
        return any(self.running.values())

    def plan(self, admit: bool = True) -> StepPlan:
        """Evict cancelled rows, admit waiting jobs (unless ``admit`` is False: the worker is
        stopping), and say which jobs the next evaluation runs."""
        evicted = sorted(self._cancelled)
        for job_id in evicted:
            self.drop(job_id)
        admitted: list[Ticket] = []
        if admit and not self._isolated_running():
            admitted = self._admit()
        running: dict[str, list[str]] = {}
        deferred: dict[str, list[str]] = {}
        for model, rows in self.running.items():
            if not rows:
                continue
            chosen = {id(r) for r in self.select(rows)}
            for r in rows:
                if r.deferred >= self.max_defer_steps:
                    chosen.add(id(r))  # the starvation bound
                r.deferred = 0 if id(r) in chosen else r.deferred + 1
            running[model] = [r.ticket.job_id for r in rows if id(r) in chosen]
            deferred[model] = [r.ticket.job_id for r in rows if id(r) not in chosen]
        self._stepping = {model: set(jobs) for model, jobs in running.items()}
        return StepPlan(admitted, evicted, running, deferred)

    def select(self, rows: list[Running]) -> list[Running]:
        """The running jobs of one model that the next evaluation takes (never none)."""
        return SELECTORS[self.policy](rows, self.srpt_fill) or rows[:1]

    def _admit(self) -> list[Ticket]:
        heads: dict[str, Ticket] = {}  # each model's oldest waiting job
        for t in self.waiting:
            heads.setdefault(t.model, t)
        if any(t.isolated for t in heads.values()):
            # Drain: an isolated job at the front of its model's order runs once nothing else does.
            oldest = min((t for t in heads.values() if t.isolated), key=lambda t: (t.submitted, t.job_id))
            if self._busy():
                return []
            self.waiting.remove(oldest)
            self.running.setdefault(oldest.model, []).append(Running(oldest))
            return [oldest]
        admitted = []
        blocked: set[str] = set()
        for t in list(self.waiting):
            if t.model in blocked:
                continue
            if self.rows(t.model) + t.rows > self.max_rows:
                blocked.add(t.model)  # oldest first: nobody younger overtakes it
                continue
            self.waiting.remove(t)
            self.running.setdefault(t.model, []).append(Running(t))
            admitted.append(t)
        return admitted

    def advance(self, model: str) -> list[Ticket]:
        """After one evaluation of ``model``'s batch: the jobs the last plan took move one step; those
        at t = 0 retire."""
        done: list[Running] = []
        keep: list[Running] = []
        stepping = self._stepping.get(model, set())
        for r in self.running.get(model, []):
            if r.ticket.job_id not in stepping:
                keep.append(r)
                continue
            r.step += 1
            (done if r.step >= r.ticket.steps else keep).append(r)
        self.running[model] = keep
        for r in done:
            self._cancelled.discard(r.ticket.job_id)
        return [r.ticket for r in done]

    def progress(self, job_id: str) -> tuple[int, int] | None:
        """(steps done, steps) of a running job."""
        for rows in self.running.values():
            for r in rows:
                if r.ticket.job_id == job_id:
                    return r.step, r.ticket.steps
        return None

    def idle(self) -> bool:
        return not self.waiting and not self._busy()
