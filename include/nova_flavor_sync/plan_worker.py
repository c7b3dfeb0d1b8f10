"""Plan a big table in worker processes, one consecutive id range each, then merge.

The table is nova_api's request_specs or one cell's instance_extra (``cell=True``): the
CLI plans one copy after the other, and the Airflow DAG each copy in its own task.

PyMySQL is pure Python: turning the server's packets into rows costs about as much CPU as
planning them, and Python threads cannot do both at once (the GIL). One process planning a
million rows took twice as long as a bare read of them. Here each worker reads and plans its
own id range on its own connection, and the parent merges the plans (``diff.merge_plans``):
the same plan, the same digest, as one process would make.

A worker is ``python -m nova_flavor_sync.plan_worker``, started with ``subprocess`` (Celery's
daemonic workers forbid ``multiprocessing`` children). It gets PlanJobs pickled on stdin, one
after the other (our own code on both ends; the password never appears in a command line or
environment), plans each, and answers on stdout with frames ``<c kind><I length>payload``:

    p  progress: rows of the current job planned so far (pickled int), every PROGRESS_EVERY rows
    r  result: the current job's Plan, pickled; its changes stay in a file in the job's
       spool_dir, which the parent adopts by name, so the parent's memory does not grow with them
    e  error: the exit code, a newline and a message free of secrets (UTF-8)

It exits when its stdin closes. The parent keeps a few workers and gives each its next job
when it answers one (``run_jobs``): a worker starts once for every copy of a cloud (a Python
start is a fifth of a second), and no core waits while another finishes a copy's last range.
"""

from __future__ import annotations

import os
import pickle
import queue
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from nova_flavor_sync.dburl import DbParams
from nova_flavor_sync.diff import make_plan, merge_plans
from nova_flavor_sync.errors import ExitCode, NovaFlavorSyncError
from nova_flavor_sync.flavor import Flavor
from nova_flavor_sync.plan import Plan
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
class PlanJob:
    """One worker's share: plan the rows with ids in ``id_range``, with these flavors and scope.

    ``cell``: the rows are a cell database's instance copies (``instance_extra.flavor``),
    not nova_api's RequestSpecs.
    """

    params: DbParams
    flavors: Mapping[int, Flavor]
    scope: Scope
    id_range: tuple[int, int]
    page_size: int
    spool_dir: str
    left_alone: Mapping[str, str] | None = None  # see NovaApiDb.iter_spec_rows
    cell: bool = False


def split_ids(bounds: tuple[int, int], parts: int) -> list[tuple[int, int]]:
    """Cut ``[low, high]`` into at most ``parts`` consecutive ranges of (nearly) equal width."""
    low, high = bounds
    parts = max(1, min(parts, high - low + 1))
    width = (high - low + 1) / parts
    edges = [low + round(i * width) for i in range(parts)] + [high + 1]
    return [(edges[i], edges[i + 1] - 1) for i in range(parts)]


def plan_in_workers(
    params: DbParams,
    flavors: Mapping[int, Flavor],
    scope: Scope,
    bounds: tuple[int, int],
    *,
    workers: int,
    page_size: int,
    progress: Callable[[int], None] | None = None,
    left_alone: Mapping[str, str] | None = None,
    cell: bool = False,
) -> Plan:
    """Plan every row with an id in ``bounds`` in ``workers`` processes; return the merged plan.

    ``cell``: ``params`` is a cell database and the rows its instance copies (instance_extra).
    """
    with tempfile.TemporaryDirectory(prefix="nova-flavor-sync-plan-") as spool_dir:
        jobs = [PlanJob(params, flavors, scope, ids, page_size, spool_dir, left_alone, cell=cell)
                for ids in split_ids(bounds, workers)]
        return merge_plans(scope, run_jobs(jobs, max_running=len(jobs), progress=progress))


def run_jobs(
    jobs: Sequence[PlanJob], *, max_running: int, progress: Callable[[int], None] | None = None
) -> list[Plan]:
    """Plan the jobs in at most ``max_running`` worker processes, each given its next job when
    it answers one; the plans in job order.

    Each plan's changes stay spooled in the jobs' ``spool_dir``: merge them (``merge_plans``)
    before that directory goes. ``progress(rows)``: rows planned so far over every job.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    children: list[subprocess.Popen] = []
    messages: queue.Queue[tuple[int, bytes, Any]] = queue.Queue()
    readers: list[threading.Thread] = []
    results: list[Plan | None] = [None] * len(jobs)
    done = [0] * len(jobs)
    pending = iter(range(len(jobs)))
    current: list[int] = []  # each worker's job

    def give_next(worker: int) -> None:
        """The worker's next job on its stdin, or, when none is left, the end of its stdin."""
        stdin = children[worker].stdin
        assert stdin is not None
        index = next(pending, None)
        if index is None:
            stdin.close()
            return
        current[worker] = index
        pickle.dump(jobs[index], stdin, protocol=pickle.HIGHEST_PROTOCOL)
        stdin.flush()

    def start() -> None:
        # The child imports this package the way this process did (an Airflow worker
        # may have it on sys.path only).
        child = subprocess.Popen(
            [sys.executable, "-m", "nova_flavor_sync.plan_worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        children.append(child)
        current.append(-1)
        assert child.stdout is not None
        reader = threading.Thread(target=_read_frames, args=(len(children) - 1, child.stdout, messages), daemon=True)
        reader.start()
        readers.append(reader)
        give_next(len(children) - 1)

    try:
        for _ in range(min(max(max_running, 1), len(jobs))):
            start()
        while any(result is None for result in results):
            worker, kind, payload = messages.get()
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
                if index >= 0 and results[index] is None:
                    stopped = "a plan worker stopped before it finished (see its output above)"
                    raise PlanWorkerError(stopped, ExitCode.UNEXPECTED)
            else:
                code, _, message = payload.partition("\n")
                raise PlanWorkerError(message, ExitCode(int(code)))
        return [r for r in results if r is not None]
    finally:
        for child in children:
            if child.stdin is not None and not child.stdin.closed:
                try:
                    child.stdin.close()
                except OSError:
                    pass
            if child.poll() is None and any(r is None for r in results):
                child.kill()  # only after a failure: a worker given no more work exits
        for child in children:
            try:
                child.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:  # its answers are in (or a failure is raised): stop it
                child.kill()
                child.wait()
        for reader in readers:
            reader.join(timeout=STOP_TIMEOUT_S)


def _read_frames(worker: int, stream: BinaryIO, messages: queue.Queue) -> None:
    """A thread per worker: turn its frames into messages; anything else is an error message.

    A worker's output ends after the result of its last job: the end of the stream is an
    error only while the parent still waits for one of its results (``run_jobs``).
    """
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
                messages.put((worker, kind, pickle.loads(payload)))
    except Exception as exc:  # noqa: BLE001 (reported to the parent's loop, which raises it)
        failed = f"reading a plan worker's answer failed: {type(exc).__name__}"
        messages.put((worker, ERROR, f"{int(ExitCode.UNEXPECTED)}\n{failed}"))


def _send(out: BinaryIO, kind: bytes, payload: bytes) -> None:
    out.write(FRAME.pack(kind, len(payload)) + payload)
    out.flush()


def _work(job: PlanJob, out: BinaryIO) -> None:
    from nova_flavor_sync.db import NovaApiDb, NovaCellDb  # the parent process does not need it
    from nova_flavor_sync.spec_json import INSTANCE_FLAVOR, REQUEST_SPEC

    with (NovaCellDb if job.cell else NovaApiDb)(job.params) as db:
        if job.cell:
            rows = db.iter_flavor_rows(page_size=job.page_size, id_range=job.id_range, left_alone=job.left_alone)
        else:
            rows = db.iter_spec_rows(page_size=job.page_size, id_range=job.id_range, left_alone=job.left_alone)

        def counted():
            for count, row in enumerate(rows, 1):
                yield row
                if count % PROGRESS_EVERY == 0:
                    _send(out, PROGRESS, pickle.dumps(count))

        plan = make_plan(job.flavors, counted(), job.scope, spool_dir=job.spool_dir,
                         layout=INSTANCE_FLAVOR if job.cell else REQUEST_SPEC)
    _send(out, RESULT, pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL))


def main() -> int:
    out = sys.stdout.buffer
    try:
        while True:
            try:
                job = pickle.load(sys.stdin.buffer)
            except EOFError:  # the parent has no more work
                return 0
            _work(job, out)
    except Exception as exc:  # reported to the parent, which raises it
        from nova_flavor_sync.db import describe_error

        code = getattr(exc, "exit_code", ExitCode.UNEXPECTED)
        _send(out, ERROR, f"{int(code)}\n{describe_error(exc)}".encode())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
