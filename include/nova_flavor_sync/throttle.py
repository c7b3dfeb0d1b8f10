"""Gentle on a shared database: batch sizes tuned to a target time, pauses, waits while loaded.

Pure: no SQL, no Airflow. The caller hands a :class:`Pacer` a ``read_load()`` callable
(``NovaApiDb.server_load``) and tells it how long each batch took; the pacer answers with
the size of the next batch and, before each batch, sleeps for the configured pause and for
as long as the server is loaded (bounded by ``max_wait_s``: nothing waits forever).

The tuning follows pt-online-schema-change's ``--chunk-time``: a decaying average of rows
per second (pt's WeightedAvgRate, weight 0.75) times the target seconds, here also limited
to half or twice the previous size per step and clamped to [min_batch_size, max_batch_size].
The load checks follow its ``--max-load`` (Threads_running, default 25), ``--max-lag`` (replica
lag, default 1 s) and ``--max-flow-ctl 0`` (any Galera flow control since the last check), and
also wait while Galera says flow control is active right now (``wsrep_flow_control_active``),
which is known before the first batch, when there is no "last check" yet.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from nova_flavor_sync.errors import ApplyAbortedError, UsageError

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 500  # rows per write transaction; apply.DEFAULT_BATCH_SIZE
MAX_BATCH_SIZE = 5000  # service.MAX_BATCH_SIZE
DEFAULT_MIN_BATCH_SIZE = 50
DEFAULT_TARGET_BATCH_S = 0.5  # pt-online-schema-change's --chunk-time
DEFAULT_MAX_THREADS_RUNNING = 25  # pt-online-schema-change's --max-load Threads_running=25
DEFAULT_MAX_REPLICA_LAG_S = 1.0  # pt-online-schema-change's --max-lag
DEFAULT_MAX_WAIT_S = 600.0

MAX_TARGET_BATCH_S = 60.0
MAX_PAUSE_S = 3600.0
MAX_REPLICA_LAG_S = 86400.0
MAX_WAIT_S = 86400.0

RATE_WEIGHT = 0.75  # how much of the past each new batch keeps in the rows/s average
MAX_STEP = 2.0  # a batch is at most twice, at least half, the size of the one before
FIRST_CHECK_S = 0.25  # while loaded: look again after this, doubling...
MAX_CHECK_S = 2.0  # ...up to this (pt-online-schema-change checks every second)
LOG_EVERY_S = 15.0  # while waiting, say so again this often


class ServerBusyError(ApplyAbortedError):
    """The server stayed loaded longer than ``max_wait_s``: stopped between two batches."""


@dataclass(frozen=True)
class ReplicaLag:
    """How far one replica is behind; ``lag_s`` None means unknown, ``problem`` says why."""

    name: str  # the replica's URL, password masked
    lag_s: float | None
    problem: str | None = None


@dataclass(frozen=True)
class ServerLoad:
    """One reading of what the pacer waits on; None means not known (or not applicable)."""

    threads_running: int | None = None
    replicas: tuple[ReplicaLag, ...] = ()
    # Galera: the share of the time since the previous reading during which flow control
    # paused replication (from wsrep_flow_control_paused_ns); None when not Galera or first.
    flow_control_paused: float | None = None
    recv_queue: int | None = None  # Galera: wsrep_local_recv_queue, shown in the log
    # Galera: wsrep_flow_control_active, flow control in effect at the moment of the reading
    # (known at the first reading too, when flow_control_paused is still only a baseline).
    flow_control_active: bool | None = None


@dataclass(frozen=True)
class PaceSettings:
    """How to pace the writes. Every wait is bounded; every number is checked."""

    batch_size: int = DEFAULT_BATCH_SIZE  # the first (or, without target_batch_s, every) batch
    target_batch_s: float | None = DEFAULT_TARGET_BATCH_S  # None: fixed batch_size
    min_batch_size: int = DEFAULT_MIN_BATCH_SIZE
    max_batch_size: int = MAX_BATCH_SIZE
    pause_s: float = 0.0  # sleep between two batches
    max_threads_running: int | None = DEFAULT_MAX_THREADS_RUNNING  # None: not checked
    max_replica_lag_s: float | None = DEFAULT_MAX_REPLICA_LAG_S  # None: lag not checked
    pause_on_flow_control: bool = True
    max_wait_s: float = DEFAULT_MAX_WAIT_S  # longest wait for the load to drop, then stop

    def __post_init__(self) -> None:
        problems = [
            _whole("batch_size", self.batch_size, 1, MAX_BATCH_SIZE),
            _whole("min_batch_size", self.min_batch_size, 1, MAX_BATCH_SIZE),
            _whole("max_batch_size", self.max_batch_size, 1, MAX_BATCH_SIZE),
            None if self.target_batch_s is None else _seconds(
                "target_batch_s", self.target_batch_s, 0.01, MAX_TARGET_BATCH_S),
            _seconds("pause_s", self.pause_s, 0, MAX_PAUSE_S),
            None if self.max_threads_running is None else _whole(
                "max_threads_running", self.max_threads_running, 1, 1_000_000),
            None if self.max_replica_lag_s is None else _seconds(
                "max_replica_lag_s", self.max_replica_lag_s, 0, MAX_REPLICA_LAG_S),
            _seconds("max_wait_s", self.max_wait_s, 1, MAX_WAIT_S),
            None if isinstance(self.pause_on_flow_control, bool) else "pause_on_flow_control must be true or false",
        ]
        if not any(problems) and self.min_batch_size > self.max_batch_size:
            problems.append(f"min_batch_size ({self.min_batch_size}) is above max_batch_size ({self.max_batch_size})")
        found = [p for p in problems if p]
        if found:
            raise UsageError("; ".join(found))

    @classmethod
    def fixed(cls, batch_size: int) -> PaceSettings:
        """Batches of ``batch_size`` rows, one after the other, no load checks: a caller that did not ask for pacing."""
        return cls(batch_size=batch_size, target_batch_s=None, max_threads_running=None, max_replica_lag_s=None,
                   pause_on_flow_control=False)

    @property
    def checks_load(self) -> bool:
        return self.max_threads_running is not None or self.max_replica_lag_s is not None or self.pause_on_flow_control

    def describe(self, replicas: int = 0) -> str:
        """One line for the log: what the run will do (``replicas``: how many are watched)."""
        if self.target_batch_s is None:
            size = f"batches of {self.batch_size} rows"
        else:
            low = min(self.min_batch_size, self.batch_size)
            size = (f"batches sized to take {self.target_batch_s:g} s ({low}-{self.max_batch_size} rows, "
                    f"starting at {self.batch_size})")
        waits = []
        if self.max_threads_running is not None:
            waits.append(f"Threads_running > {self.max_threads_running}")
        if self.max_replica_lag_s is not None and replicas:
            waits.append(f"one of the {replicas} replicas is more than {self.max_replica_lag_s:g} s behind"
                         if replicas > 1 else f"the replica is more than {self.max_replica_lag_s:g} s behind")
        if self.pause_on_flow_control:
            waits.append("Galera flow control")
        wait = f"; waiting while {', '.join(waits)} (at most {self.max_wait_s:g} s)" if waits else ""
        return f"{size}, pause {self.pause_s:g} s between batches{wait}"


def _whole(name: str, value: object, low: int, high: int) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{name} must be a whole number, not {value!r}"
    if not low <= value <= high:
        return f"{name} must be between {low} and {high}, not {value}"
    return None


def _seconds(name: str, value: object, low: float, high: float) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return f"{name} must be a number of seconds, not {value!r}"
    if not low <= value <= high:
        return f"{name} must be between {low:g} and {high:g} seconds, not {value:g}"
    return None


class Pacer:
    """Sizes the batches, and before each one pauses and waits while the server is loaded.

    ``apply.apply_batches`` calls ``next_batch_size()``, then ``wait_turn(first=...)``,
    writes the batch, then ``batch_done(rows, seconds)``. ``read_load`` is called only while
    some load check is on; ``sleep`` and ``clock`` are injectable for tests.
    """

    def __init__(
        self,
        settings: PaceSettings,
        *,
        read_load: Callable[[], ServerLoad] | None = None,
        pause_first: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.read_load = read_load
        self.pause_first = pause_first  # e.g. the second Airflow task: pause before its first batch
        self.sleep, self.clock = sleep, clock
        self.size = settings.batch_size
        self.floor = min(settings.min_batch_size, settings.batch_size)
        self._rows = 0.0  # decayed sums behind the rows/s average
        self._seconds = 0.0
        self.batches = 0
        self.sizes: list[int] = []
        self.waited_s = 0.0  # for load, in total
        self.paused_s = 0.0

    # -- sizing -------------------------------------------------------------------------

    def next_batch_size(self) -> int:
        return self.size

    def batch_done(self, rows: int, seconds: float) -> None:
        """Learn from a batch of ``rows`` that took ``seconds``: size the next one."""
        self.batches += 1
        self.sizes.append(rows)
        target = self.settings.target_batch_s
        if target is None or rows <= 0:
            return
        seconds = max(seconds, 1e-4)
        if self._seconds:
            self._rows = self._rows * RATE_WEIGHT + rows
            self._seconds = self._seconds * RATE_WEIGHT + seconds
        else:
            self._rows, self._seconds = float(rows), seconds
        ideal = self._rows / self._seconds * target
        stepped = min(max(ideal, self.size / MAX_STEP), self.size * MAX_STEP)
        new = max(self.floor, min(self.settings.max_batch_size, int(round(stepped))))
        log.debug("Batch of %d rows took %.3f s (%.0f rows/s on average): next batch %d rows",
                  rows, seconds, self._rows / self._seconds, new)
        self.size = new

    # -- waiting ------------------------------------------------------------------------

    def wait_turn(self, *, first: bool = False) -> None:
        """Before a batch: pause (not before the first), then wait while the server is loaded.

        Raises ServerBusyError when the load stays over a limit for more than max_wait_s.
        """
        pause = self.settings.pause_s
        if pause and (not first or self.pause_first):
            self.sleep(pause)
            self.paused_s += pause
        if self.read_load is None or not self.settings.checks_load:
            return
        reasons = self.why_loaded(self.read_load())
        if not reasons:
            return
        started = last_logged = self.clock()
        log.warning("Waiting before the next batch: %s", "; ".join(reasons))
        delay = FIRST_CHECK_S
        while reasons:
            waited = self.clock() - started
            if waited >= self.settings.max_wait_s:
                self.waited_s += waited
                raise ServerBusyError(
                    f"the server stayed busy for {waited:.0f} s, longer than the {self.settings.max_wait_s:g} s "
                    f"allowed ({'; '.join(reasons)})"
                )
            self.sleep(min(delay, self.settings.max_wait_s - waited))
            delay = min(delay * 2, MAX_CHECK_S)
            reasons = self.why_loaded(self.read_load())
            now = self.clock()
            if reasons and now - last_logged >= LOG_EVERY_S:
                last_logged = now
                log.info("Still waiting after %.0f s: %s", now - started, "; ".join(reasons))
        waited = self.clock() - started
        self.waited_s += waited
        log.info("Server load back under the limits after %.1f s; going on", waited)

    def why_loaded(self, load: ServerLoad) -> list[str]:
        """Each limit the reading is over, with the value seen; empty when all is well."""
        s = self.settings
        reasons = []
        if s.max_threads_running is not None and load.threads_running is not None \
                and load.threads_running > s.max_threads_running:
            reasons.append(f"Threads_running is {load.threads_running} (limit {s.max_threads_running})")
        if s.max_replica_lag_s is not None:
            for replica in load.replicas:
                if replica.lag_s is None:
                    reasons.append(f"replica {replica.name}: lag unknown, {replica.problem or 'not replicating'}")
                elif replica.lag_s > s.max_replica_lag_s:
                    reasons.append(f"replica {replica.name} is {replica.lag_s:g} s behind "
                                   f"(limit {s.max_replica_lag_s:g} s)")
        if s.pause_on_flow_control and (load.flow_control_active or load.flow_control_paused):
            queue = f", wsrep_local_recv_queue {load.recv_queue}" if load.recv_queue is not None else ""
            if load.flow_control_active:
                paused = ("" if load.flow_control_paused is None
                          else f", replication paused {load.flow_control_paused:.1%} of the time since the last check")
                reasons.append(f"Galera flow control is active (wsrep_flow_control_active true{paused}{queue})")
            else:
                reasons.append(f"Galera flow control paused replication {load.flow_control_paused:.1%} of the time "
                               f"since the last check{queue}")
        return reasons

    def summary(self) -> str:
        """One line for the end of a run: batches, sizes, time paused and waited."""
        sizes = f"{min(self.sizes)}-{max(self.sizes)} rows" if self.sizes else "no rows"
        return (f"{self.batches} batches of {sizes}, {self.paused_s:.1f} s paused, "
                f"{self.waited_s:.1f} s waited for the server")
