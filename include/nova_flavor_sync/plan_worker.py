"""Plan big tables in worker processes, one consecutive id range at a time, then merge.

The tables are nova_api's request_specs and each cell's instance_extra (``PlanJob.cell``):
``service.plan_copies`` cuts every big copy of a plan into id ranges and gives them all to
one set of workers (``PlanWorkers``), and merges each copy's ranges as they come in
(``diff.PlanMerger``): the same plan, the same digest, as one process would make.

PyMySQL is pure Python: turning the server's packets into rows costs about as much CPU as
planning them, and Python threads cannot do both at once (the GIL). One process planning a
million rows took twice as long as a bare read of them. Here each worker reads and plans its
own id range on its own connection.

A worker is ``python -m nova_flavor_sync.plan_worker``, started with ``subprocess`` (Celery's
daemonic workers forbid ``multiprocessing`` children). It gets a PlanContext (flavors, scope,
the instances to leave alone), then PlanJobs, pickled on stdin, one after the other (our own
code on both ends; the password never appears in a command line or environment), plans each,
and answers on stdout with frames ``<c kind><I length>payload``:

    p  progress: rows of the current job planned so far (pickled int), every PROGRESS_EVERY rows
    r  result: the current job's Plan (``encode_result``): its long lists stay in files in
       the context's spool_dir, which the parent adopts by name, so the parent's memory does
       not grow with them; each SpecDiff is sent once per worker, then named by its number
    e  error: the exit code, a newline and a message free of secrets (UTF-8)

It exits when its stdin closes.
"""

from __future__ import annotations

import io
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from nova_flavor_sync.db import left_alone_reason
from nova_flavor_sync.dburl import DbParams
from nova_flavor_sync.diff import RowPlanner, make_plan
from nova_flavor_sync.errors import ExitCode, NovaFlavorSyncError
from nova_flavor_sync.flavor import Flavor
from nova_flavor_sync.plan import Plan, SpecDiff
from nova_flavor_sync.scope import Scope

FRAME = struct.Struct("<cI")
PROGRESS, RESULT, ERROR = b"p", b"r", b"e"
STOPPED = b"s"  # not a frame: the reader thread saw the worker's output end
PROGRESS_EVERY = 10_000
STOP_TIMEOUT_S = 10


class PlanWorkerError(NovaFlavorSyncError):
    """A plan worker failed; str() says why, and exit_code is that of the worker's error."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.UNEXPECTED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class PlanContext:
    """What every range of one plan shares; a worker gets it once, before its first PlanJob.

    ``spool_dir``: where the workers spool their plans' long lists, by name, for the parent
    to adopt.
    """

    flavors: Mapping[int, Flavor]
    scope: Scope
    page_size: int
    spool_dir: str


@dataclass(frozen=True)
class LeftAlone:
    """The instances whose copies must be left alone, and why (``cells.instances_to_leave_alone``).

    Sent to each worker once the parent has found them, which it does while its workers
    already plan (see diff.make_plan's ``left_alone``). ``in_flux=False``: without the
    instances whose flavor alone says they are busy, which the plans of the cells' copies
    find (``cells.instances_in_flux``): enough for those plans, whose rows say it
    themselves, not for the RequestSpecs', which wait for InstancesInFlux.
    """

    reasons: Mapping[str, str]
    in_flux: bool = True


@dataclass(frozen=True)
class InstancesInFlux:
    """What completes a LeftAlone without them (``cells.instances_in_flux``); sent once every
    cell's copies are planned, so no job planned with the LeftAlone alone still runs (its
    map is completed in place: a million instances' is 10 MB in each worker)."""

    reasons: Mapping[str, str]


@dataclass(frozen=True)
class PlanJob:
    """One worker's share: plan the rows with ids in ``id_range`` of one database.

    ``cell``: the rows are a cell database's instance copies (``instance_extra.flavor``),
    not nova_api's RequestSpecs.
    """

    params: DbParams
    id_range: tuple[int, int]
    cell: bool = False


def split_ids(bounds: tuple[int, int], parts: int) -> list[tuple[int, int]]:
    """Cut ``[low, high]`` into at most ``parts`` consecutive ranges of (nearly) equal width."""
    low, high = bounds
    parts = max(1, min(parts, high - low + 1))
    width = (high - low + 1) / parts
    edges = [low + round(i * width) for i in range(parts)] + [high + 1]
    return [(edges[i], edges[i + 1] - 1) for i in range(parts)]


class PlanWorkers:
    """``count`` plan worker processes: start them, give them one plan's ranges (``run``), stop them.

    Each worker gets the PlanContext once and then one PlanJob after another, the next when
    it answers one, so no core waits while another finishes a copy's last range; it keeps
    its RowPlanners from one job to the next, so it judges each distinct flavor copy once.
    The instances to leave alone (a few seconds of the servers' work at a million
    instances) are found while the workers start and plan their first rows, and sent to
    them when found (``LeftAlone``).
    """

    def __init__(self, count: int) -> None:
        self._env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._children: list[subprocess.Popen] = []
        self._readers: list[threading.Thread] = []
        self._messages: queue.Queue[tuple[int, bytes, Any]] = queue.Queue()
        self._spec_diffs = _SpecDiffs()
        self._failed = False
        try:
            for _ in range(count):
                self._start()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> PlanWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._children)

    def _start(self) -> None:
        # The child imports this package the way this process did (an Airflow worker
        # may have it on sys.path only).
        child = subprocess.Popen(
            [sys.executable, "-m", "nova_flavor_sync.plan_worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self._env,
        )
        self._children.append(child)
        assert child.stdout is not None
        reader = threading.Thread(target=_read_frames, daemon=True,
                                  args=(len(self._children) - 1, child.stdout, self._messages, self._spec_diffs))
        reader.start()
        self._readers.append(reader)

    def run(
        self,
        context: PlanContext,
        jobs: Sequence[PlanJob],
        *,
        left_alone: Callable[[], Mapping[str, str]],
        in_flux: bool = True,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[Plan]:
        """Plan the jobs; yield their plans in job order, each as soon as it and those before it
        are in (the workers go on meanwhile). Once per PlanWorkers.

        ``left_alone()`` finds the instances to leave alone: it is called here once the
        workers have their first jobs, and its answer sent to each of them. ``in_flux=False``:
        it does not have the instances in flux (LeftAlone); the RequestSpecs' jobs wait for
        ``send_instances_in_flux`` (the cells' jobs, which do not, come first).

        Each plan's changes stay spooled in ``context.spool_dir``: merge them
        (``diff.PlanMerger``) before that directory goes. The plans share their SpecDiffs (one
        object per value). ``progress(rows)``: rows planned so far over every job.
        """
        results: list[Plan | None] = [None] * len(jobs)
        yielded = 0
        done = [0] * len(jobs)
        pending = iter(range(len(jobs)))
        current = [-1] * len(self._children)  # each worker's job

        def give_next(worker: int) -> None:
            """The worker's next job on its stdin, or, when none is left, the end of its stdin."""
            index = next(pending, None)
            if index is None:
                self._end_input(worker)
                return
            current[worker] = index
            self._write_to(worker, pickle.dumps(jobs[index], protocol=pickle.HIGHEST_PROTOCOL))

        self._spec_diffs.planner = RowPlanner(context.flavors, context.scope)
        try:
            shared = pickle.dumps(context, protocol=pickle.HIGHEST_PROTOCOL)  # once: thousands of flavors
            for worker in range(len(self._children)):
                self._write_to(worker, shared)
                give_next(worker)
            self._send_all(LeftAlone(left_alone(), in_flux))
            while yielded < len(jobs):
                if results[yielded] is not None:
                    plan, results[yielded] = results[yielded], None  # the caller has it now
                    yielded += 1
                    yield plan
                    continue
                worker, kind, payload = self._messages.get()
                index = current[worker]
                if kind == PROGRESS:
                    done[index] = payload
                    if progress is not None:
                        progress(sum(done))
                elif kind == RESULT:
                    results[index] = payload
                    done[index] = payload.rows_read
                    give_next(worker)
                elif kind == STOPPED:
                    if index >= yielded and results[index] is None:  # a worker given no job stops, rightly
                        stopped = "a plan worker stopped before it finished (see its output above)"
                        raise PlanWorkerError(stopped, ExitCode.UNEXPECTED)
                else:
                    code, _, message = payload.partition("\n")
                    raise PlanWorkerError(message, ExitCode(int(code)))
        except BaseException:  # GeneratorExit too: a caller that stops early
            self._failed = True
            raise

    def send_instances_in_flux(self, reasons: Mapping[str, str]) -> None:
        """What completes ``run``'s ``in_flux=False`` LeftAlone, once every cell's job is done."""
        self._send_all(InstancesInFlux(reasons))

    def _send_all(self, message: LeftAlone | InstancesInFlux) -> None:
        found = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for worker in range(len(self._children)):
            self._write_to(worker, found)

    def _write_to(self, worker: int, message: bytes) -> None:
        stdin = self._children[worker].stdin
        assert stdin is not None
        if stdin.closed:  # it has had every job it will get
            return
        try:
            stdin.write(message)
            stdin.flush()
        except BrokenPipeError:  # it stopped: its reader thread reports how
            pass

    def _end_input(self, worker: int) -> None:
        stdin = self._children[worker].stdin
        if stdin is not None and not stdin.closed:
            try:
                stdin.close()
            except OSError:
                pass

    def close(self) -> None:
        """Stop the workers: a worker whose input ends exits; after a failure, each is killed."""
        for worker, child in enumerate(self._children):
            self._end_input(worker)
            if self._failed and child.poll() is None:
                child.kill()
        for child in self._children:
            try:
                child.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:  # its answers are in (or a failure is raised): stop it
                child.kill()
                child.wait()
        for reader in self._readers:
            reader.join(timeout=STOP_TIMEOUT_S)
        self._children, self._readers = [], []


def _read_frames(worker: int, stream: BinaryIO, messages: queue.Queue, spec_diffs: _SpecDiffs) -> None:
    """A thread per worker: turn its frames into messages; anything else is an error message.

    A worker's output ends after the result of its last job: the end of the stream is an
    error only while the parent still waits for one of its results (``PlanWorkers.run``).
    """
    diffs: list[SpecDiff] = []  # this worker's SpecDiffs by number (see encode_result)
    try:
        with stream:
            while True:
                header = stream.read(FRAME.size)
                if not header:
                    messages.put((worker, STOPPED, None))
                    return
                if len(header) < FRAME.size:
                    raise EOFError("a truncated frame")
                kind, length = FRAME.unpack(header)
                payload = stream.read(length)
                if kind == ERROR:
                    messages.put((worker, ERROR, payload.decode("utf-8", "replace")))
                    return
                if kind == RESULT:
                    messages.put((worker, kind, decode_result(payload, diffs, spec_diffs)))
                else:
                    messages.put((worker, kind, pickle.loads(payload)))
    except Exception as exc:  # noqa: BLE001 (reported to the parent's loop, which raises it)
        failed = f"reading a plan worker's answer failed: {type(exc).__name__}"
        messages.put((worker, ERROR, f"{int(ExitCode.UNEXPECTED)}\n{failed}"))


# A result frame: the length of the first part, the SpecDiffs the parent has not had from
# this worker (a pickled list of what each was made from), then the Plan pickled with every
# SpecDiff as its number.
_RESULT_HEAD = struct.Struct("<I")


class _SpecDiffs:
    """The parent's SpecDiffs, made again from what each was made from (``encode_result``):
    pickling a SpecDiff (and its KeyChanges) took as long as judging its copy, twice (once
    each way) for each of thousands of diffs where flavors are many; and both workers send
    equal diffs, made once here (the planner's cache), so that the plans share one object
    per value. ``planner``: of the plan's flavors and scope (set by ``PlanWorkers.run``)."""

    def __init__(self) -> None:
        self.planner: RowPlanner | None = None
        self._lock = threading.Lock()  # one reader thread per worker

    def made_from(self, flavor_id: int, extra_specs: dict[str, str]) -> SpecDiff:
        assert self.planner is not None, "a result before PlanWorkers.run"
        with self._lock:
            return self.planner.diff_of(flavor_id, extra_specs)


class _DiffsByNumber(pickle.Pickler):
    def __init__(self, file: BinaryIO, numbers: Mapping[int, int]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._numbers = numbers

    def persistent_id(self, obj: Any) -> int | None:
        return self._numbers.get(id(obj)) if type(obj) is SpecDiff else None


class _NumberedDiffs(pickle.Unpickler):
    def __init__(self, file: BinaryIO, diffs: Sequence[SpecDiff]) -> None:
        super().__init__(file)
        self._diffs = diffs

    def persistent_load(self, pid: Any) -> SpecDiff:
        return self._diffs[pid]


class SentDiffs:
    """A worker's SpecDiffs the parent has, by object, with their numbers (kept alive here)."""

    def __init__(self) -> None:
        self.numbers: dict[int, int] = {}
        self._kept: list[SpecDiff] = []

    def add_new(self, diffs: Iterable[SpecDiff]) -> list[SpecDiff]:
        new = []
        for diff in diffs:
            if id(diff) not in self.numbers:
                self.numbers[id(diff)] = len(self._kept)
                self._kept.append(diff)
                new.append(diff)
        return new


def encode_result(plan: Plan, sent: SentDiffs) -> bytes:
    """A Plan for the parent: a plan worker's many ranges share thousands of SpecDiffs (one
    per distinct flavor copy that changes), each sent once, as what it was made from (its
    flavor's id and the copy's extra specs: ``_SpecDiffs``), then named by number."""
    made_from = [(diff.flavor_id, diff.planned_from()[2]) for diff in sent.add_new(plan.spec_diffs())]
    new = pickle.dumps(made_from, protocol=pickle.HIGHEST_PROTOCOL)
    body = io.BytesIO()
    _DiffsByNumber(body, sent.numbers).dump(plan)
    return _RESULT_HEAD.pack(len(new)) + new + body.getvalue()


def decode_result(payload: bytes, diffs: list[SpecDiff], spec_diffs: _SpecDiffs) -> Plan:
    """``encode_result``'s Plan: ``diffs`` are the worker's SpecDiffs so far (the new ones are
    added, made by ``spec_diffs``)."""
    (length,) = _RESULT_HEAD.unpack_from(payload)
    start = _RESULT_HEAD.size
    diffs.extend(spec_diffs.made_from(*made_from) for made_from in pickle.loads(payload[start:start + length]))
    return _NumberedDiffs(io.BytesIO(payload[start + length:]), diffs).load()


def _send(out: BinaryIO, kind: bytes, payload: bytes) -> None:
    out.write(FRAME.pack(kind, len(payload)) + payload)
    out.flush()


class _Inbox:
    """A worker's stdin, read by a thread of its own: the PlanContext and the PlanJobs in order
    (``next``), and the instances to leave alone whenever they come (``LeftAlone``), while a
    job is being planned: ``for_job`` is what make_plan waits on (diff.LeftAloneLater)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._messages: queue.Queue[PlanContext | PlanJob | None] = queue.Queue()
        self._stream = stream
        # Those without the instances in flux, enough for a cell's copies; those with them.
        self._cells, self._all = _LeftAloneSoFar(), _LeftAloneSoFar()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                message = pickle.load(self._stream)
                if isinstance(message, LeftAlone):
                    for came in (self._cells, self._all) if message.in_flux else (self._cells,):
                        came.set(message.reasons)
                elif isinstance(message, InstancesInFlux):  # every cell's job is done: complete
                    reasons = self._cells.known()  # their map in place, for the RequestSpecs'
                    assert reasons is not None, "InstancesInFlux before its LeftAlone"
                    reasons.update(message.reasons)  # type: ignore[attr-defined]
                    self._all.set(reasons)
                else:
                    self._messages.put(message)
        except EOFError:  # the parent has no more work
            pass
        finally:
            for came in (self._cells, self._all):  # a worker waiting for them stops waiting (and
                came.end()  # fails: see wait)
            self._messages.put(None)

    def next(self) -> PlanContext | PlanJob | None:
        """The next PlanContext or PlanJob; None once the parent has no more."""
        return self._messages.get()

    def for_job(self, job: PlanJob) -> _LeftAloneSoFar:
        return self._cells if job.cell else self._all


class _LeftAloneSoFar:
    """The instances to leave alone once they have come (diff.LeftAloneLater)."""

    def __init__(self) -> None:
        self._reasons: Mapping[str, str] | None = None
        self._came = threading.Event()

    def set(self, reasons: Mapping[str, str]) -> None:
        if self._reasons is None:  # the first wins: a cell's job may already have used it
            self._reasons = reasons
        self._came.set()

    def end(self) -> None:
        self._came.set()

    def known(self) -> Mapping[str, str] | None:
        return self._reasons

    def wait(self) -> Mapping[str, str]:
        self._came.wait()
        if self._reasons is None:
            raise EOFError("the parent stopped before it sent the instances to leave alone")
        return self._reasons

    reason = staticmethod(left_alone_reason)  # asked for every row: imported once


def _work(context: PlanContext, job: PlanJob, planners: dict[bool, RowPlanner], sent: SentDiffs, inbox: _Inbox,
          out: BinaryIO) -> None:
    from nova_flavor_sync.db import NovaApiDb, NovaCellDb  # the parent process does not need it
    from nova_flavor_sync.spec_json import INSTANCE_FLAVOR, REQUEST_SPEC

    layout = INSTANCE_FLAVOR if job.cell else REQUEST_SPEC
    planner = planners.get(job.cell)
    if planner is None:
        other = planners.get(not job.cell)
        planner = planners[job.cell] = (RowPlanner(context.flavors, context.scope, layout) if other is None
                                        else other.for_layout(layout))
    with (NovaCellDb if job.cell else NovaApiDb)(job.params) as db:
        read = db.iter_flavor_rows if job.cell else db.iter_spec_rows
        # Read without the instances to leave alone (they may not have come yet): make_plan
        # decides each row's fate with them (its reason(): what the read would have given).
        rows = read(page_size=context.page_size, id_range=job.id_range, left_alone={})

        def counted():
            for count, row in enumerate(rows, 1):
                yield row
                if count % PROGRESS_EVERY == 0:
                    _send(out, PROGRESS, pickle.dumps(count))

        plan = make_plan(context.flavors, counted(), context.scope, spool_dir=context.spool_dir, layout=layout,
                         planner=planner, left_alone=inbox.for_job(job), with_digest=False)
    _send(out, RESULT, encode_result(plan, sent))


def main() -> int:
    """A worker: a PlanContext, then PlanJobs, on stdin until it ends; answers in frames on stdout."""
    out = sys.stdout.buffer
    inbox = _Inbox(sys.stdin.buffer)
    context: PlanContext | None = None
    planners: dict[bool, RowPlanner] = {}  # by PlanJob.cell: the verdicts of every job so far
    sent = SentDiffs()
    try:
        while (message := inbox.next()) is not None:
            if isinstance(message, PlanContext):
                assert context is None, "one PlanContext per worker"
                context = message
                continue
            assert context is not None, "a PlanJob came before its PlanContext"
            _work(context, message, planners, sent, inbox, out)
        return 0
    except Exception as exc:  # reported to the parent, which raises it
        from nova_flavor_sync.db import describe_error

        code = getattr(exc, "exit_code", ExitCode.UNEXPECTED)
        _send(out, ERROR, f"{int(code)}\n{describe_error(exc)}".encode())
        return 1


if __name__ == "__main__":
    # Run as the package's module, not as __main__: the parent pickles PlanContext and PlanJob
    # as nova_flavor_sync.plan_worker's classes, which main() must recognise.
    from nova_flavor_sync.plan_worker import main as worker_main

    sys.exit(worker_main())
