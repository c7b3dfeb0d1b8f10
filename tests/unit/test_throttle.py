"""The Pacer on its own: batch sizes tuned to a target time, pauses, waits while loaded.

Time is fake: ``FakeTime.sleep`` moves ``FakeTime.clock`` on, so no test sleeps for real,
and the load is whatever the test's reader returns next.
"""

from __future__ import annotations

import logging
import math

import pytest

from fake_time import FakeTime
from nova_flavor_sync.errors import ApplyAbortedError, ExitCode, UsageError
from nova_flavor_sync.throttle import (
    MAX_CHECK_S,
    Pacer,
    PaceSettings,
    ReplicaLag,
    ServerBusyError,
    ServerLoad,
)

QUIET = ServerLoad(threads_running=1)


class Loads:
    """A load reader returning the given readings in turn, then the last one for ever."""

    def __init__(self, *readings: ServerLoad) -> None:
        self.readings = list(readings)
        self.calls = 0

    def __call__(self) -> ServerLoad:
        self.calls += 1
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


def pacer(time: FakeTime | None = None, read_load=None, **settings) -> Pacer:
    time = time or FakeTime()
    return Pacer(PaceSettings(**settings), read_load=read_load, sleep=time.sleep, clock=time.clock)


def run_batches(p: Pacer, rows_per_second: float, batches: int, overhead_s: float = 0.0) -> list[int]:
    """Feed the pacer batches that take size / rows_per_second (+ overhead); return the sizes used."""
    sizes = []
    for _ in range(batches):
        size = p.next_batch_size()
        sizes.append(size)
        p.batch_done(size, size / rows_per_second + overhead_s)
    return sizes


# -- batch size -----------------------------------------------------------------------------


def test_batches_converge_to_the_target_time():
    p = pacer(batch_size=500, target_batch_s=0.5)
    sizes = run_batches(p, rows_per_second=2000, batches=12, overhead_s=0.02)
    # 2,000 rows/s and 20 ms fixed cost per batch: 0.5 s holds about 960 rows.
    assert sizes[0] == 500 and sizes[1] > 500
    assert all(900 <= size <= 1000 for size in sizes[-4:]), sizes
    last = sizes[-1]
    assert abs(last / 2000 + 0.02 - 0.5) < 0.03


def test_batches_that_take_too_long_shrink_by_at_most_half_per_step_down_to_the_minimum():
    p = pacer(batch_size=1000, target_batch_s=0.5, min_batch_size=50)
    sizes = run_batches(p, rows_per_second=20, batches=10)  # 50 s for 1000 rows: far too slow
    assert sizes[:5] == [1000, 500, 250, 125, 62]
    assert sizes[-1] == 50 and min(sizes) == 50


def test_batches_that_are_fast_grow_by_at_most_double_per_step_up_to_the_maximum():
    p = pacer(batch_size=100, target_batch_s=0.5, max_batch_size=5000)
    sizes = run_batches(p, rows_per_second=1_000_000, batches=10)
    assert sizes[:6] == [100, 200, 400, 800, 1600, 3200]
    assert sizes[-1] == 5000 and max(sizes) == 5000


def test_a_first_size_below_the_minimum_is_the_floor():
    p = pacer(batch_size=10, target_batch_s=0.5, min_batch_size=50)
    assert run_batches(p, rows_per_second=1, batches=3) == [10, 10, 10]


def test_the_rate_is_smoothed_so_one_odd_batch_does_not_swing_the_size():
    p = pacer(batch_size=1000, target_batch_s=0.5)
    run_batches(p, rows_per_second=2000, batches=10)
    steady = p.next_batch_size()
    p.batch_done(steady, 5.0)  # one batch ten times slower (a lock wait, a retry)
    assert steady / 2 <= p.next_batch_size() < steady
    run_batches(p, rows_per_second=2000, batches=25)  # the odd batch fades away (weight 0.75 a batch)
    assert abs(p.next_batch_size() - steady) <= steady * 0.05


def test_without_a_target_the_size_stays_fixed():
    p = pacer(batch_size=300, target_batch_s=None)
    assert run_batches(p, rows_per_second=10, batches=5) == [300] * 5
    assert p.summary().startswith("5 batches of 300-300 rows")


# -- pause ----------------------------------------------------------------------------------


def test_the_pause_falls_between_batches_not_before_the_first():
    time = FakeTime()
    p = pacer(time, pause_s=1.5, max_threads_running=None, max_replica_lag_s=None, pause_on_flow_control=False)
    p.wait_turn(first=True)
    assert time.sleeps == []
    p.wait_turn()
    p.wait_turn()
    assert time.sleeps == [1.5, 1.5] and p.paused_s == 3.0


def test_pause_first_pauses_before_the_first_batch_too():
    time = FakeTime()
    p = Pacer(PaceSettings(pause_s=2), pause_first=True, sleep=time.sleep, clock=time.clock)
    p.wait_turn(first=True)
    assert time.sleeps == [2]


# -- waiting while loaded -------------------------------------------------------------------


def test_while_threads_running_is_over_the_limit_it_waits_with_back_off_and_says_why(caplog):
    time = FakeTime()
    loads = Loads(*[ServerLoad(threads_running=40)] * 6, ServerLoad(threads_running=3))
    p = pacer(time, loads, max_threads_running=25)
    with caplog.at_level(logging.INFO, logger="nova_flavor_sync.throttle"):
        p.wait_turn()
    assert loads.calls == 7
    assert time.sleeps == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]  # doubling up to MAX_CHECK_S
    assert max(time.sleeps) == MAX_CHECK_S
    assert "Waiting before the next batch: Threads_running is 40 (limit 25)" in caplog.text
    assert "Server load back under the limits after 7.8 s" in caplog.text
    assert p.waited_s == pytest.approx(7.75)


def test_a_quiet_server_costs_one_reading_and_no_sleep():
    time, loads = FakeTime(), Loads(QUIET)
    p = pacer(time, loads)
    p.wait_turn()
    assert loads.calls == 1 and time.sleeps == []


def test_threads_running_at_the_limit_is_not_over_it():
    p = pacer(max_threads_running=25)
    assert p.why_loaded(ServerLoad(threads_running=25)) == []
    assert p.why_loaded(ServerLoad(threads_running=26)) == ["Threads_running is 26 (limit 25)"]


def test_no_limit_means_no_check():
    p = pacer(max_threads_running=None, max_replica_lag_s=None, pause_on_flow_control=False)
    busy = ServerLoad(threads_running=10_000, replicas=(ReplicaLag("r", None, "stopped"),), flow_control_paused=1.0)
    assert p.why_loaded(busy) == []
    loads = Loads(busy)
    p.read_load = loads
    p.wait_turn()
    assert loads.calls == 0  # nothing to check: the server is not even asked


def test_a_lagging_replica_is_waited_for():
    time = FakeTime()
    lagging = ServerLoad(1, (ReplicaLag("mysql+pymysql://u:***@r1:3306/nova_api", 12.0),
                             ReplicaLag("mysql+pymysql://u:***@r2:3306/nova_api", 0.0)))
    caught_up = ServerLoad(1, (ReplicaLag("mysql+pymysql://u:***@r1:3306/nova_api", 0.0),
                               ReplicaLag("mysql+pymysql://u:***@r2:3306/nova_api", 1.0)))
    p = pacer(time, Loads(lagging, lagging, caught_up), max_replica_lag_s=1.0)
    assert p.why_loaded(lagging) == ["replica mysql+pymysql://u:***@r1:3306/nova_api is 12 s behind (limit 1 s)"]
    p.wait_turn()
    assert time.sleeps == [0.25, 0.5]


def test_a_replica_that_stopped_replicating_counts_as_lagging_and_is_named():
    p = pacer(max_replica_lag_s=5)
    stopped = ServerLoad(1, (ReplicaLag("mysql+pymysql://r1:3306/nova_api", None,
                                        "replication is not running (Seconds_Behind_Master is NULL)"),))
    assert p.why_loaded(stopped) == [
        "replica mysql+pymysql://r1:3306/nova_api: lag unknown, replication is not running "
        "(Seconds_Behind_Master is NULL)"
    ]


def test_galera_flow_control_since_the_last_check_is_waited_for_unless_turned_off():
    paused = ServerLoad(threads_running=2, flow_control_paused=0.25, recv_queue=180)
    on = pacer(pause_on_flow_control=True)
    assert on.why_loaded(paused) == [
        "Galera flow control paused replication 25.0% of the time since the last check, wsrep_local_recv_queue 180"
    ]
    assert on.why_loaded(ServerLoad(threads_running=2, flow_control_paused=0.0)) == []
    assert on.why_loaded(ServerLoad(threads_running=2, flow_control_paused=None)) == []  # not Galera
    assert pacer(pause_on_flow_control=False).why_loaded(paused) == []

    time = FakeTime()
    waiting = pacer(time, Loads(paused, paused, ServerLoad(2, flow_control_paused=0.0)))
    waiting.wait_turn()
    assert time.sleeps == [0.25, 0.5]


def test_every_reason_is_given_at_once():
    p = pacer(max_threads_running=5, max_replica_lag_s=1)
    load = ServerLoad(9, (ReplicaLag("r", 3.0),), flow_control_paused=0.5)
    assert len(p.why_loaded(load)) == 3


def test_waiting_is_bounded_by_max_wait_s_and_the_error_says_what_it_saw():
    time = FakeTime()
    loads = Loads(ServerLoad(threads_running=99))
    p = pacer(time, loads, max_threads_running=25, max_wait_s=10)
    with pytest.raises(ServerBusyError) as stopped:
        p.wait_turn()
    assert time.now == pytest.approx(10)  # never slept past the bound
    assert "the server stayed busy for 10 s, longer than the 10 s allowed (Threads_running is 99 (limit 25))" \
        == str(stopped.value)
    assert isinstance(stopped.value, ApplyAbortedError) and stopped.value.exit_code == ExitCode.INCOMPLETE


def test_a_long_wait_is_logged_again_now_and_then(caplog):
    time = FakeTime()
    p = pacer(time, Loads(ServerLoad(threads_running=99)), max_threads_running=25, max_wait_s=60)
    with caplog.at_level(logging.INFO, logger="nova_flavor_sync.throttle"), pytest.raises(ServerBusyError):
        p.wait_turn()
    still = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Still waiting")]
    assert 3 <= len(still) <= 4 and all("Threads_running is 99" in line for line in still)


# -- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "message"), [
    ({"batch_size": 0}, "batch_size must be between 1 and 5000, not 0"),
    ({"batch_size": 6000}, "batch_size must be between 1 and 5000"),
    ({"batch_size": 2.5}, "batch_size must be a whole number"),
    ({"batch_size": True}, "batch_size must be a whole number"),
    ({"target_batch_s": 0}, "target_batch_s must be between 0.01 and 60 seconds, not 0"),
    ({"target_batch_s": math.nan}, "target_batch_s must be a number of seconds"),
    ({"target_batch_s": "0.5"}, "target_batch_s must be a number of seconds"),
    ({"pause_s": -1}, "pause_s must be between 0 and 3600 seconds, not -1"),
    ({"pause_s": math.inf}, "pause_s must be a number of seconds"),
    ({"max_threads_running": 0}, "max_threads_running must be between 1 and 1000000"),
    ({"max_replica_lag_s": -0.5}, "max_replica_lag_s must be between 0 and 86400 seconds"),
    ({"max_wait_s": 0}, "max_wait_s must be between 1 and 86400 seconds"),
    ({"max_wait_s": None}, "max_wait_s must be a number of seconds"),
    ({"pause_on_flow_control": "yes"}, "pause_on_flow_control must be true or false"),
    ({"min_batch_size": 600, "max_batch_size": 500}, r"min_batch_size \(600\) is above max_batch_size \(500\)"),
])
def test_bad_settings_are_refused_with_a_clear_message(settings, message):
    with pytest.raises(UsageError, match=message) as refused:
        PaceSettings(**settings)
    assert refused.value.exit_code == ExitCode.USAGE


def test_the_defaults_are_pt_online_schema_change_s():
    s = PaceSettings()
    assert (s.batch_size, s.target_batch_s, s.pause_s, s.max_threads_running, s.max_replica_lag_s,
            s.pause_on_flow_control, s.max_wait_s) == (500, 0.5, 0.0, 25, 1.0, True, 600.0)
    assert s.describe() == (
        "batches sized to take 0.5 s (50-5000 rows, starting at 500), pause 0 s between batches; waiting while "
        "Threads_running > 25, Galera flow control (at most 600 s)"
    )
    assert "waiting while Threads_running > 25, one of the 2 replicas is more than 1 s behind, Galera" \
        in s.describe(replicas=2)
    assert "the replica is more than 1 s behind" in s.describe(replicas=1)
    assert PaceSettings(target_batch_s=None, max_threads_running=None, max_replica_lag_s=None,
                        pause_on_flow_control=False, pause_s=2).describe() == \
        "batches of 500 rows, pause 2 s between batches"


def test_galera_flow_control_active_now_is_waited_for_even_at_the_first_reading():
    # The first reading has no "since the last check" yet (flow_control_paused None), but
    # wsrep_flow_control_active says the cluster is paused right now.
    first = ServerLoad(threads_running=2, flow_control_paused=None, recv_queue=0, flow_control_active=True)
    on = pacer(pause_on_flow_control=True)
    assert on.why_loaded(first) == ["Galera flow control is active (wsrep_flow_control_active true, "
                                    "wsrep_local_recv_queue 0)"]
    later = ServerLoad(threads_running=2, flow_control_paused=0.5, recv_queue=3, flow_control_active=True)
    assert on.why_loaded(later) == ["Galera flow control is active (wsrep_flow_control_active true, replication "
                                    "paused 50.0% of the time since the last check, wsrep_local_recv_queue 3)"]
    assert on.why_loaded(ServerLoad(threads_running=2, flow_control_paused=0.0, flow_control_active=False)) == []
    assert pacer(pause_on_flow_control=False).why_loaded(first) == []
