"""Carry out a Plan (or a restore) in batches of compare-and-swap writes; never prints.

Each batch re-reads its rows, writes only those that still hold the exact bytes they were
planned from, and is retried as a whole after a deadlock, lock wait timeout or lost
connection. A retry is safe because it starts from a fresh read: a row that already has
its new bytes (the lost COMMIT went through after all) counts as updated.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

from nova_flavor_sync.db import NovaDb, SpecWrite, retryable_reason
from nova_flavor_sync.errors import ApplyAbortedError
from nova_flavor_sync.plan import Plan, RowChange, SpecDiff
from nova_flavor_sync.spec_json import (
    REQUEST_SPEC,
    CopyLayout,
    SpecShapeError,
    dumps_extra_specs,
    rewrite_extra_specs,
    sha256_text,
)
from nova_flavor_sync.throttle import DEFAULT_BATCH_SIZE, Pacer, ServerBusyError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RowTarget:
    """A row to move from the bytes hashing to ``expected_sha256`` to those hashing to ``new_sha256``.

    ``expected_sha256`` None (a forced restore): from whatever bytes the row holds when the
    batch reads it; the write is still a compare-and-swap on those. ``instance_uuid``: the
    row must still belong to this instance.
    """

    id: int
    expected_sha256: str | None
    new_sha256: str
    build: Callable[[str], str | None]  # current spec text -> new text; None: not any more
    instance_uuid: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failing batch is tried again."""

    attempts: int = 5
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def delay(self, attempt: int) -> float:
        return min(self.first_delay_s * 2 ** (attempt - 1), self.max_delay_s)


@dataclass
class ApplyResult:
    """What happened to each row a run tried to write."""

    # Most rows of a big run end here (450,000 at a million instances): 8 bytes an id, not 36.
    updated: array[int] = field(default_factory=lambda: array("q"))
    already: list[int] = field(default_factory=list)  # had the new bytes before we wrote
    conflicts: list[int] = field(default_factory=list)  # changed since planned: not written
    gone: list[int] = field(default_factory=list)  # deleted since planned
    errors: dict[int, str] = field(default_factory=dict)
    batches: int = 0
    retries: int = 0

    @property
    def done(self) -> int:
        """Rows dealt with so far, whatever happened to them (for progress)."""
        return len(self.updated) + len(self.already) + len(self.conflicts) + len(self.gone) + len(self.errors)

    def add(self, other: ApplyResult) -> None:
        self.updated += other.updated
        self.already += other.already
        self.conflicts += other.conflicts
        self.gone += other.gone
        self.errors.update(other.errors)
        self.batches += other.batches
        self.retries += other.retries


def sync_targets(changes: Iterable[RowChange], layout: CopyLayout = REQUEST_SPEC) -> Iterator[RowTarget]:
    """The writes a sync plan asks for, one by one: rebuild each row with its target extra specs."""
    writers: dict[int, Callable[[str], str]] = {}  # one per shared SpecDiff
    for change in changes:
        writer = writers.get(id(change.diff))
        if writer is None:
            writer = writers[id(change.diff)] = target_writer(change.diff, layout)
        yield RowTarget(change.id, change.old_sha256, change.new_sha256, writer, change.instance_uuid)


def apply_plan(
    db: NovaDb,
    plan: Plan,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    exclude_ids: Iterable[int] = (),
    progress: Callable[[ApplyResult, int], None] | None = None,
    retry: RetryPolicy = RetryPolicy(),
    pacer: Pacer | None = None,
) -> ApplyResult:
    """Write every change of the plan into ``db``'s copies; rows in ``exclude_ids`` are reported as conflicts.

    The changes are streamed from the plan (which may have spooled them to a file).
    """
    excluded = set(exclude_ids)
    skipped = sorted(c.id for c in plan.changes if c.id in excluded) if excluded else []
    changes = (c for c in plan.changes if c.id not in excluded)
    result = apply_batches(
        db, sync_targets(changes, db.COPY.layout), total=len(plan.changes) - len(skipped), batch_size=batch_size,
        pacer=pacer,
        progress=progress, retry=retry,
    )
    result.conflicts = skipped + result.conflicts
    return result


def apply_batches(
    db: NovaDb,
    targets: Iterable[RowTarget],
    *,
    total: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    pacer: Pacer | None = None,
    progress: Callable[[ApplyResult, int], None] | None = None,
    retry: RetryPolicy = RetryPolicy(),
    write: bool = True,
) -> ApplyResult:
    """Apply the targets batch after batch, each one short transaction; ``total`` is for progress.

    Without ``write`` nothing is written: each batch is read and judged as it would be, and
    the rows it would write are counted as ``updated`` (a restore's dry run).

    Without a pacer every batch has ``batch_size`` rows. With one, the pacer sizes each batch,
    pauses and waits while the server is loaded before it, and learns from how long it took;
    if the server stays loaded too long it stops between two batches (ServerBusyError).
    """
    result = ApplyResult()
    rows = iter(targets)

    def cut() -> list[RowTarget]:
        return list(islice(rows, pacer.next_batch_size() if pacer is not None else batch_size))

    batch = cut()
    prepared: Prepared | None = None
    if not write:
        while batch:
            result.add(_prepare(db, batch).as_preview())
            batch = cut()
        return result
    with _ReadAhead(db) as ahead:
        while batch:
            # While this batch is written, the next one is read and rebuilt on a second
            # connection (the compare-and-swap still decides what is written).
            following = cut()
            ahead.start(following)
            if pacer is not None:
                try:
                    pacer.wait_turn(first=result.batches == 0)
                except ServerBusyError as exc:
                    raise ServerBusyError(
                        f"{exc}. Stopped before the batch of rows {batch[0].id}-{batch[-1].id}: every batch "
                        f"before it is written in full ({len(result.updated)} rows written), this one and the "
                        "rest not at all: run again when the server is less busy"
                    ) from None
            started = time.monotonic()
            result.add(apply_batch(db, batch, retry=retry, prepared=prepared))
            if pacer is not None:
                pacer.batch_done(len(batch), time.monotonic() - started)
            if progress is not None:
                progress(result, total)
            batch, prepared = following, ahead.result()
    return result


def apply_batch(
    db: NovaDb,
    batch: Sequence[RowTarget],
    *,
    retry: RetryPolicy = RetryPolicy(),
    sleep: Callable[[float], None] = time.sleep,
    prepared: Prepared | None = None,
) -> ApplyResult:
    """Re-read, compare, write one batch; retry it whole on transient database errors.

    ``prepared``: the batch already read and rebuilt (by the read-ahead); used for the first
    try only, a retry reads again.
    """
    label = f"rows {batch[0].id}-{batch[-1].id}" if batch else "empty batch"
    retries = 0
    while True:
        try:
            outcome = _try_batch(db, batch, prepared if retries == 0 else None)
            outcome.batches, outcome.retries = 1, retries
            return outcome
        except Exception as exc:
            reason = retryable_reason(exc)
            if reason is None:
                raise
            retries += 1
            if retries >= retry.attempts:
                raise ApplyAbortedError(
                    f"batch of {label} failed {retries} times ({reason}); stopped. Batches "
                    "before it are written in full, this one and the rest not at all: "
                    "run again to finish"
                ) from None
            delay = retry.delay(retries)
            log.warning("Batch of %s: %s; retry %d of %d in %.1f s", label, reason, retries, retry.attempts - 1, delay)
            sleep(delay)
            db.reopen_quietly()


@dataclass
class Prepared:
    """A batch read and rebuilt, not yet written: what is decided already, and the writes."""

    outcome: ApplyResult
    writes: list[SpecWrite]

    def as_preview(self) -> ApplyResult:
        """The outcome as if every write had succeeded."""
        self.outcome.updated.extend(write.id for write in self.writes)
        return self.outcome


def _try_batch(db: NovaDb, batch: Sequence[RowTarget], prepared: Prepared | None = None) -> ApplyResult:
    if prepared is None:
        prepared = _prepare(db, batch)
    outcome, writes = prepared.outcome, prepared.writes
    written = db.write_specs(writes)
    for write in writes:
        (outcome.updated if write.id in written else outcome.conflicts).append(write.id)
    return outcome


def _prepare(db: NovaDb, batch: Sequence[RowTarget]) -> Prepared:
    """Read the batch's rows and build the new texts of those still as planned (no write)."""
    outcome = ApplyResult()
    current = db.read_specs([t.id for t in batch], with_updated_at=False)
    writes: list[SpecWrite] = []
    for target in batch:
        if target.id not in current:
            outcome.gone.append(target.id)
            continue
        uuid, text = current[target.id][0], current[target.id][1]
        if target.instance_uuid is not None and uuid != target.instance_uuid:
            outcome.errors[target.id] = f"row now belongs to instance {uuid}, not {target.instance_uuid}; not written"
            continue
        sha = sha256_text(text)
        if sha == target.new_sha256:
            outcome.already.append(target.id)
        elif target.expected_sha256 is not None and sha != target.expected_sha256:
            outcome.conflicts.append(target.id)
        else:
            try:
                new_text = target.build(text)
            except SpecShapeError as exc:
                outcome.errors[target.id] = str(exc)
                continue
            if new_text is None:  # what was approved no longer applies to this row
                outcome.conflicts.append(target.id)
                continue
            if not db.fits_in_one_statement(new_text):
                outcome.errors[target.id] = (
                    f"new spec of {len(new_text)} bytes is too large for the server's "
                    "max_allowed_packet; not written"
                )
                continue
            if sha256_text(new_text) != target.new_sha256:
                # Same input bytes, same target: only a changed flavor target could do this.
                outcome.errors[target.id] = "rebuilt spec differs from the planned one; not written"
                continue
            writes.append(SpecWrite(target.id, sha, new_text, target.new_sha256))
    return Prepared(outcome, writes)


class _ReadAhead:
    """Prepares the next batch in a thread, on a second connection, while this one writes.

    At a million rows the write of a batch keeps the server busy for about 0.1 s while this
    process waits; reading and rebuilding the next batch meanwhile hid most of the re-read.
    Anything that goes wrong here only costs the head start: the batch is then prepared
    again on the main connection, with its retries.
    """

    def __init__(self, db: NovaDb) -> None:
        self._db = db
        self._reader: NovaDb | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def __enter__(self) -> _ReadAhead:
        return self

    def start(self, batch: Sequence[RowTarget]) -> None:
        if not batch:
            return
        if self._pool is None:
            self._reader = type(self._db)(self._db.params, lock_wait_timeout=self._db.lock_wait_timeout)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nova-flavor-sync-read-ahead")
        self._pending = self._pool.submit(_prepare, self._reader, batch)

    def result(self) -> Prepared | None:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            return pending.result()
        except Exception as exc:  # noqa: BLE001 (the main connection prepares it again)
            log.info("Reading ahead failed (%s); the batch is read again", type(exc).__name__)
            if self._reader is not None:
                self._reader.close()
            return None

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._reader is not None:
            self._reader.close()


def target_writer(diff: SpecDiff, layout: CopyLayout) -> Callable[[str], str]:
    """Rewrites a row with the diff's target extra specs, if its copy is the one the diff was
    made from: the plan recognised most rows by their text, without parsing them. Both ways
    of applying use it: a sync plan's (``sync_targets``), the Airflow tasks' (``service``)."""
    new_specs_json = dumps_extra_specs(dict(diff.target_extra_specs))  # once for every row that gets it
    planned_from = diff.planned_from()
    return lambda text: rewrite_extra_specs(text, new_specs_json=new_specs_json, layout=layout,
                                            planned_from=planned_from)
