"""Measure the engine against floors on a database made by ``bench/make_data.py``.

    .venv/bin/python bench/run.py --db-url mysql+pymysql://root@127.0.0.1:3306/nfs_bench_1000000 \\
        --db-url mysql+pymysql://root@127.0.0.1:3306/nfs_bench_100000 [--rows-check]

For each ``--db-url`` (the apply: the first one only, unless ``--apply-all``), in one run:

* **read floor**: a bare keyset read of every ``(id, spec)`` with PyMySQL and the engine's
  page size (``db.DEFAULT_PAGE_SIZE``), after a warm-up pass (shown, not used);
* **engine read**: the engine's own read in one process (``iter_spec_rows``: the
  queued-for-delete uuids, then the pages; SpecRow objects), without planning;
* **plan**: the dry run (``service.connect``, ``resolve_scope(all_keys=True)``,
  ``service.make_plan``) in a fresh Python process, timed inside it, with its peak RSS: the
  planner's ``VmHWM`` plus, for each plan worker it starts (``plan_worker``, from
  ``service.PLAN_WORKERS_FROM`` rows), the largest worker's peak; the apply below uses the last
  of these plans, as ``--run`` uses its own;
* **apply** of the plan's changed rows, three ways, each from the same bytes (the changed
  rows are copied to ``request_specs_orig`` first and put back after each):
  (a) the tool: ``service.back_up`` + ``service.apply_plan`` (CAS batches, default 500);
  (b) row at a time: one autocommit ``UPDATE ... WHERE id=%s`` per row;
  (c) the floor: one multi-row ``UPDATE ... CASE id`` of 500 rows per statement, autocommit,
  no hash check, no re-read, no backup.
  (b) and (c) write exactly the bytes the tool writes: computed before they are timed
  (with the engine's ``rewrite_extra_specs``, checked against the plan's ``new_sha256``)
  and streamed from a spool file;
* **statements**: the server's ``Com_update`` and ``Questions`` deltas (global counters:
  another client's statements land in them too; the "others" column estimates those), and
  the exact number of commands this process sent (counted in PyMySQL).

``--rows-check`` also reads back every changed row after each apply (its SHA2 must be the
plan's ``new_sha256``) and after each restore (the original bytes' sha256).

The databases are left as they were found. ``--profile`` instead runs the plan once under
cProfile and prints the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pickle
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql
from pymysql.constants import COMMAND

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))  # run from a checkout

from nova_flavor_sync import apply as apply_mod  # noqa: E402
from nova_flavor_sync import service  # noqa: E402
from nova_flavor_sync.db import DEFAULT_PAGE_SIZE, utcnow  # noqa: E402
from nova_flavor_sync.dburl import DbParams, parse_db_url  # noqa: E402
from nova_flavor_sync.plan import Plan, batched  # noqa: E402
from nova_flavor_sync.spec_json import rewrite_extra_specs, sha256_text  # noqa: E402

ORIG_TABLE = "request_specs_orig"
STATUS_NAMES = ("Questions", "Com_update", "Com_select", "Com_begin", "Com_commit", "Bytes_received", "Bytes_sent")
RSS_TARGET_MB = 300

# -- counting what this process sends ---------------------------------------------------

SENT: Counter[str] = Counter()
_original_execute_command = pymysql.connections.Connection._execute_command


def _counting_execute_command(self, command, sql):
    """Every command PyMySQL sends is one round trip: count them by kind."""
    if command == COMMAND.COM_QUERY:
        text = sql.decode("utf-8", "replace") if isinstance(sql, bytes | bytearray) else str(sql)
        SENT[text.lstrip()[:6].upper() or "QUERY"] += 1
    elif command != COMMAND.COM_QUIT:  # no reply awaited, and not in the server's Questions
        SENT[f"COM_{command}"] += 1
    return _original_execute_command(self, command, sql)


pymysql.connections.Connection._execute_command = _counting_execute_command


def sent_total() -> int:
    return sum(SENT.values())


# -- small helpers ------------------------------------------------------------------------


def connect(params: DbParams, **overrides: Any) -> pymysql.connections.Connection:
    return pymysql.connect(**{**params.connect_kwargs(), "autocommit": True, **overrides})


def server_status(conn: pymysql.connections.Connection) -> dict[str, int]:
    with conn.cursor() as cur:
        cur.execute(
            "SHOW GLOBAL STATUS WHERE Variable_name IN (" + ", ".join(f"'{n}'" for n in STATUS_NAMES) + ")"
        )
        return {name: int(value) for name, value in cur.fetchall()}


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class Measured:
    """One timed step: seconds, rows, and what it sent to the server."""

    name: str
    seconds: float
    rows: int
    server: dict[str, int] = field(default_factory=dict)  # global counter deltas
    sent: int = 0  # commands this process sent (exact)
    sent_by_kind: dict[str, int] = field(default_factory=dict)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


class Meter:
    """Time a block and take the server's global counters and our own around it."""

    def __init__(self, monitor: pymysql.connections.Connection, name: str, rows: int = 0) -> None:
        self.monitor, self.result = monitor, Measured(name, 0.0, rows)

    def __enter__(self) -> Measured:
        self._status = server_status(self.monitor)
        self._sent = Counter(SENT)
        self._t0 = time.perf_counter()
        return self.result

    def __exit__(self, *exc: object) -> None:
        self.result.seconds = time.perf_counter() - self._t0
        after = server_status(self.monitor)
        delta = {k: after[k] - self._status.get(k, 0) for k in after}
        delta["Questions"] -= 1  # the SHOW GLOBAL STATUS that read "after"
        self.result.server = delta
        kinds = Counter(SENT)
        kinds.subtract(self._sent)
        kinds["SHOW G"] -= 1  # the same SHOW, counted on our side too
        self.result.sent_by_kind = {k: v for k, v in kinds.items() if v}
        self.result.sent = sum(self.result.sent_by_kind.values())


# -- reads ---------------------------------------------------------------------------------


def floor_read(params: DbParams, page_size: int) -> tuple[int, int]:
    """A bare keyset read of (id, spec): rows and characters read."""
    conn = connect(params)
    rows = chars = last_id = 0
    try:
        with conn.cursor() as cur:
            while True:
                cur.execute(
                    "SELECT id, spec FROM request_specs WHERE id > %s ORDER BY id LIMIT %s", (last_id, page_size)
                )
                page = cur.fetchall()
                rows += len(page)
                chars += sum(len(spec) for _, spec in page)
                if len(page) < page_size:
                    return rows, chars
                last_id = page[-1][0]
    finally:
        conn.close()


def engine_read(params: DbParams) -> int:
    """The engine's page query and SpecRow objects, without planning."""
    db = service.connect(params)
    try:
        return sum(1 for _ in db.iter_spec_rows(page_size=DEFAULT_PAGE_SIZE))
    finally:
        db.close()


def plan_in_process(params: DbParams, workers: int | None = None) -> tuple[Plan, Any]:
    """The dry run as the CLI makes it (workers None: the engine decides)."""
    db = service.connect(params)
    flavors, scope = service.resolve_scope(db, all_keys=True)
    plan = service.make_plan(db, scope, flavors=flavors, workers=workers)
    return plan, db


def vm_status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def plan_child(url: str, plan_out: Path | None) -> int:
    """Run in a fresh process: the dry-run plan, timed, with peak RSS; print JSON.

    With ``plan_out``, the plan is then pickled there (after the peak was read) for the apply.
    """
    params = parse_db_url(url)
    rss_before = vm_status_kb("VmRSS")
    t0 = time.perf_counter()
    plan, db = plan_in_process(params)
    seconds = time.perf_counter() - t0
    db.close()
    peak_kb = vm_status_kb("VmHWM")
    maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Big tables are planned by worker processes (plan_worker): their memory counts too. The
    # kernel gives the largest child's peak; count it once per worker (an upper bound).
    workers = service.PLAN_WORKERS if plan.rows_read >= service.PLAN_WORKERS_FROM else 0
    reader_kb = workers * resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if plan_out is not None:
        with open(plan_out, "wb") as f:
            pickle.dump(plan, f, protocol=pickle.HIGHEST_PROTOCOL)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rows_read": plan.rows_read,
                "changes": len(plan.changes),
                "in_sync": plan.in_sync,
                "errors": len(plan.errors),
                "orphans": len(plan.orphans),
                "held_back": len(plan.held_back),
                "digest": plan.digest,
                "vmhwm_kb": peak_kb + reader_kb,
                "planner_vmhwm_kb": peak_kb,
                "workers_maxrss_kb": reader_kb,
                "workers": workers,
                "rss_before_kb": rss_before,
                "ru_maxrss_kb": maxrss_kb,
                "sent": sent_total(),
            }
        )
    )
    return 0


def run_plan_child(url: str, plan_out: Path | None = None) -> dict[str, Any]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    command = [sys.executable, __file__, "--plan-child", "--db-url", url]
    if plan_out is not None:
        command += ["--plan-out", str(plan_out)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the plan process failed (exit {done.returncode}):\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # RUSAGE_CHILDREN is the largest of every child so far: only a new maximum is this child's.
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["children_maxrss_kb"] = after if after > before else None
    return result


# -- apply: the copy, the restore, the spool -----------------------------------------------


def copy_changed_rows(conn, ids: Sequence[int]) -> None:
    """Keep the changed rows' bytes in request_specs_orig (created here)."""
    with conn.cursor() as cur:
        cur.execute(
            f"CREATE TABLE {ORIG_TABLE} (id INT NOT NULL PRIMARY KEY, spec MEDIUMTEXT NOT NULL, "
            "updated_at DATETIME NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb3 COLLATE=utf8mb3_general_ci"
        )
        for chunk in chunks(ids, 1000):
            cur.execute(
                f"INSERT INTO {ORIG_TABLE} SELECT id, spec, updated_at FROM request_specs WHERE id IN %s",
                (tuple(chunk),),
            )


def restore_rows(conn, ids: Sequence[int] | None = None) -> int:
    """Put request_specs_orig back (only ``ids`` if given); return rows restored."""
    with conn.cursor() as cur:
        if ids is None:
            cur.execute(f"SELECT id FROM {ORIG_TABLE} ORDER BY id")
            ids = [i for (i,) in cur.fetchall()]
        restored = 0
        for chunk in chunks(ids, 2000):
            restored += cur.execute(
                f"UPDATE request_specs rs JOIN {ORIG_TABLE} o ON o.id = rs.id "
                "SET rs.spec = o.spec, rs.updated_at = o.updated_at WHERE o.id IN %s",
                (tuple(chunk),),
            )
    return restored


def check_hashes(conn, expected: dict[int, str], ids: Sequence[int]) -> int:
    """Rows among ``ids`` whose SHA2(spec) is not ``expected[id]``."""
    bad = 0
    with conn.cursor() as cur:
        for chunk in chunks(ids, 1000):
            cur.execute("SELECT id, SHA2(spec, 256) FROM request_specs WHERE id IN %s", (tuple(chunk),))
            found = dict(cur.fetchall())
            bad += sum(1 for i in chunk if found.get(i) != expected[i])
    return bad


def write_spool(conn, plan: Plan, path: Path, batch_size: int) -> int:
    """The new texts the tool will write, batch by batch, pickled to ``path``."""
    written = 0
    with open(path, "wb") as out, conn.cursor() as cur:
        for batch in batched(plan.changes, batch_size):
            cur.execute("SELECT id, spec FROM request_specs WHERE id IN %s", (tuple(c.id for c in batch),))
            current = dict(cur.fetchall())
            texts = []
            for change in batch:
                new_text = rewrite_extra_specs(current[change.id], dict(change.diff.target_extra_specs))
                if sha256_text(new_text) != change.new_sha256:
                    raise RuntimeError(f"row {change.id}: rewrite differs from the plan")
                texts.append((change.id, new_text))
            pickle.dump(texts, out, protocol=pickle.HIGHEST_PROTOCOL)
            written += len(texts)
    return written


def read_spool(path: Path) -> Iterator[list[tuple[int, str]]]:
    with open(path, "rb") as f:
        while True:
            try:
                yield pickle.load(f)
            except EOFError:
                return


def row_at_a_time(params: DbParams, spool: Path, limit: int) -> int:
    """(b): one autocommit UPDATE per row, as the script this replaces did."""
    conn = connect(params)
    done = 0
    try:
        with conn.cursor() as cur:
            for batch in read_spool(spool):
                for row_id, text in batch:
                    if done >= limit:
                        return done
                    done += cur.execute(
                        "UPDATE request_specs SET spec = %s, updated_at = %s WHERE id = %s", (text, utcnow(), row_id)
                    )
    finally:
        conn.close()
    return done


def raw_batched(params: DbParams, spool: Path) -> int:
    """(c) the floor: one multi-row UPDATE per batch, autocommit, no hash, no re-read."""
    conn = connect(params)
    done = 0
    try:
        with conn.cursor() as cur:
            for batch in read_spool(spool):
                whens = " ".join("WHEN %s THEN %s" for _ in batch)
                sql = (
                    f"UPDATE request_specs SET spec = CASE id {whens} END, updated_at = %s "
                    f"WHERE id IN ({', '.join('%s' for _ in batch)})"
                )
                args: list[Any] = [v for pair in batch for v in pair]
                args.append(utcnow())
                args.extend(row_id for row_id, _ in batch)
                done += cur.execute(sql, args)
    finally:
        conn.close()
    return done


# -- one database ------------------------------------------------------------------------------


def bench_database(url: str, args: argparse.Namespace, *, apply: bool) -> dict[str, Any]:
    params = parse_db_url(url)
    monitor = connect(params)
    out: dict[str, Any] = {"database": params.database, "load_start": load()}
    with monitor.cursor() as cur:
        cur.execute("SHOW TABLES LIKE %s", (ORIG_TABLE,))
        if cur.fetchone():
            print(f"  {ORIG_TABLE} left by an interrupted run: putting its rows back first")
            restore_rows(monitor)
            cur.execute(f"DROP TABLE {ORIG_TABLE}")
        cur.execute(
            "SELECT data_length, index_length FROM information_schema.TABLES "
            "WHERE table_schema = DATABASE() AND table_name = 'request_specs'"
        )
        data_length, index_length = cur.fetchone()
        cur.execute("SHOW GLOBAL STATUS LIKE 'Threads_connected'")
        out["threads_connected"] = int(cur.fetchone()[1])
    out["data_mb"] = data_length / 2**20
    out["index_mb"] = index_length / 2**20
    print(f"\n== {params.database}: {load()}, request_specs {out['data_mb']:,.0f} MB data ==", flush=True)

    steps: list[Measured] = []

    def step(name: str, rows: int = 0) -> Meter:
        return Meter(monitor, name, rows)

    # Reads: warm up, then floor and plan alternately, so neither gets a warmer cache.
    with step("first read (warm-up)") as m:
        m.rows, chars = floor_read(params, DEFAULT_PAGE_SIZE)
    out["rows"], out["spec_mb"] = m.rows, chars / 2**20
    steps.append(m)
    print(f"  warm-up read: {m.rows:,} rows, {out['spec_mb']:,.0f} MB of spec text, {m.seconds:.1f} s", flush=True)
    floors: list[Measured] = []
    plans: list[dict[str, Any]] = []
    plan_file = None
    if apply:  # the apply needs the plan object: the last child hands it over in a file
        plan_file = Path(tempfile.mkstemp(prefix="nfs-bench-plan-", suffix=".pickle", dir=args.work_dir)[1])
    for attempt in range(1, args.repeat + 1):
        with step(f"floor read #{attempt}") as m:
            m.rows, _ = floor_read(params, DEFAULT_PAGE_SIZE)
        floors.append(m)
        steps.append(m)
        print(f"  floor read #{attempt}: {m.seconds:.2f} s", flush=True)
        with step(f"plan, new process #{attempt}") as m:
            child = run_plan_child(url, plan_file if attempt == args.repeat else None)
        m.rows = child["rows_read"]
        m.seconds, m.extra = child["seconds"], child  # timed inside the child (no interpreter start)
        m.sent, m.sent_by_kind = child["sent"], {}
        plans.append(child)
        steps.append(m)
        print(f"  plan #{attempt}: {child['seconds']:.2f} s, peak RSS {child['vmhwm_kb'] / 1024:.0f} MB "
              f"(planner {child['planner_vmhwm_kb'] / 1024:.0f} + {child['workers']} workers "
              f"{child['workers_maxrss_kb'] / 1024:.0f}), "
              f"{child['changes']:,} changes", flush=True)
    with step("engine read only") as m:
        m.rows = engine_read(params)
    steps.append(m)
    print(f"  engine read only: {m.seconds:.2f} s", flush=True)
    out["floor_s"] = min(f.seconds for f in floors)
    out["plan_s"] = min(p["seconds"] for p in plans)
    out["plan_ratio"] = out["plan_s"] / out["floor_s"]
    out["peak_rss_mb"] = max(p["vmhwm_kb"] for p in plans) / 1024
    out["rss_at_start_mb"] = plans[0]["rss_before_kb"] / 1024
    out["changes"] = plans[-1]["changes"]
    out["plan_counts"] = {k: plans[0][k] for k in ("rows_read", "changes", "in_sync", "errors", "orphans", "held_back")}
    if len({p["digest"] for p in plans}) != 1:
        raise RuntimeError("the plan changed between runs: something else is writing to this database")

    if plan_file is not None:
        # The apply uses the last child's plan, as a --run applies the plan its dry run made.
        with open(plan_file, "rb") as f:
            plan = pickle.load(f)
        plan_file.unlink()
        if plan.changes:
            db = service.connect(params)
            try:
                out["apply"] = bench_apply(params, monitor, db, plan, args, steps)
            finally:
                db.close()
    out["load_end"] = load()
    out["steps"] = [
        {"name": s.name, "seconds": s.seconds, "rows": s.rows, "server": s.server, "sent": s.sent,
         "sent_by_kind": s.sent_by_kind, "note": s.note}
        for s in steps
    ]
    monitor.close()
    print_database(out, steps)
    return out


def bench_apply(params, monitor, db, plan: Plan, args, steps: list[Measured]) -> dict[str, Any]:
    ids = [c.id for c in plan.changes]
    old = {c.id: c.old_sha256 for c in plan.changes}
    new = {c.id: c.new_sha256 for c in plan.changes}
    work = Path(tempfile.mkdtemp(prefix="nfs-bench-", dir=args.work_dir))
    result: dict[str, Any] = {"changed_rows": len(ids)}
    copied = clean = False
    try:
        t0 = time.perf_counter()
        copy_changed_rows(monitor, ids)
        copied = True
        result["copy_s"] = time.perf_counter() - t0
        spool = work / "new_texts.pickle"
        t0 = time.perf_counter()
        write_spool(monitor, plan, spool, args.batch_size)
        result["spool_s"] = time.perf_counter() - t0  # read + rewrite + hash: not in (b) or (c)
        print(f"  apply prep: copy {result['copy_s']:.1f} s, new texts {result['spool_s']:.1f} s "
              f"({spool.stat().st_size / 2**20:,.0f} MB spool)", flush=True)

        def restore(label: str, written: Sequence[int]) -> None:
            t0 = time.perf_counter()
            restore_rows(monitor, written)
            seconds = time.perf_counter() - t0
            if args.rows_check:
                bad = check_hashes(monitor, old, written)
                if bad:
                    raise RuntimeError(f"after {label}: {bad} rows not restored to their original bytes")
            print(f"  restored after {label}: {seconds:.1f} s", flush=True)

        def check(label: str, written: Sequence[int]) -> str:
            if not args.rows_check:
                return ""
            bad = check_hashes(monitor, new, written)
            if bad:
                raise RuntimeError(f"{label}: {bad} rows do not hold the planned bytes")
            return f"{len(written):,} rows read back: all hold the planned bytes"

        # (a) the tool: backup, then CAS batches.
        backup_dir = work / "backups"
        with Meter(monitor, "(a) tool: back_up + apply_plan", len(ids)) as a:
            t0 = time.perf_counter()
            backup = service.back_up(db, plan, backup_dir)
            backup_s = time.perf_counter() - t0
            applied = service.apply_plan(db, plan, batch_size=args.batch_size)
        a.extra = {"backup_s": backup_s, "apply_s": a.seconds - backup_s, "batches": applied.batches,
                   "backup_mb": backup.info.path.stat().st_size / 2**20, "retries": applied.retries}
        if (len(applied.updated), applied.conflicts, applied.errors, backup.diverged) != (len(ids), [], {}, []):
            raise RuntimeError(f"the tool did not apply cleanly: {len(applied.updated)} updated, "
                               f"{len(applied.conflicts)} conflicts, {len(applied.errors)} errors")
        a.note = check("(a)", ids)
        steps.append(a)
        shutil.rmtree(backup_dir)
        print(f"  (a) tool: {a.seconds:.1f} s (backup {backup_s:.1f} s, {a.extra['backup_mb']:,.0f} MB)", flush=True)
        restore("(a)", ids)

        # (b) row at a time: on the first --row-at-a-time-max rows if there are more.
        limit = min(len(ids), args.row_at_a_time_max)
        with Meter(monitor, "(b) row at a time", limit) as b:
            done = row_at_a_time(params, spool, limit)
        if done != limit:
            raise RuntimeError(f"(b) updated {done} rows, not {limit}")
        if limit < len(ids):
            b.note = (f"measured on the first {limit:,} of {len(ids):,} rows; "
                      f"all of them would take ~{b.seconds * len(ids) / limit:,.0f} s")
            b.extra["extrapolated_s"] = b.seconds * len(ids) / limit
        checked = check("(b)", ids[:limit])
        b.note = "; ".join(x for x in (b.note, checked) if x)
        steps.append(b)
        print(f"  (b) row at a time: {b.seconds:.1f} s for {limit:,} rows", flush=True)
        restore("(b)", ids[:limit])

        # (c) the floor: raw batched UPDATE of the same bytes.
        with Meter(monitor, "(c) floor: raw batched UPDATE", len(ids)) as c:
            done = raw_batched(params, spool)
        if done != len(ids):
            raise RuntimeError(f"(c) updated {done} rows, not {len(ids)}")
        c.note = check("(c)", ids)
        steps.append(c)
        print(f"  (c) raw batched: {c.seconds:.1f} s", flush=True)
        restore("(c)", ids)

        result["tool_s"], result["tool_apply_s"], result["tool_backup_s"] = a.seconds, a.extra["apply_s"], backup_s
        result["row_s_per_row"] = b.seconds / limit
        result["raw_s"] = c.seconds
        result["tool_vs_raw"] = a.seconds / c.seconds
        result["tool_apply_only_vs_raw"] = a.extra["apply_s"] / c.seconds
        methods = (("a", a), ("b", b), ("c", c))
        result["updates_per_row"] = {k: m.server.get("Com_update", 0) / m.rows for k, m in methods}
        result["sent_per_row"] = {k: m.sent / m.rows for k, m in methods}
        result["tool_updates_sent"] = a.sent_by_kind.get("UPDATE", 0)
        result["bytes_received_per_row"] = {k: m.server.get("Bytes_received", 0) / m.rows for k, m in methods}
        result["bytes_sent_per_row"] = {k: m.server.get("Bytes_sent", 0) / m.rows for k, m in methods}
        result["tool_batches"] = applied.batches
        clean = True
    finally:
        if copied:
            with monitor.cursor() as cur:
                if not clean:  # stopped partway: put every changed row back
                    restore_rows(monitor)
                cur.execute(f"DROP TABLE {ORIG_TABLE}")
        shutil.rmtree(work, ignore_errors=True)
    return result


# -- printing ------------------------------------------------------------------------------------


def print_database(out: dict[str, Any], steps: list[Measured]) -> None:
    rows = out["rows"]
    print(f"\n{out['database']}: {rows:,} rows, {out['changes']:,} to change, "
          f"{out['spec_mb']:,.0f} MB of spec text; {out['load_start']} -> {out['load_end']}; "
          f"{out['threads_connected']} client connections at start")
    header = (f"{'step':34} {'seconds':>9} {'rows':>9} {'rows/s':>9} {'vs floor':>8} "
              f"{'Com_update':>10} {'Questions':>9} {'ours':>7} {'others':>6}  note")
    print(header)
    print("-" * len(header))
    floor = out["floor_s"]
    raw = out.get("apply", {}).get("raw_s")
    for s in steps:
        is_apply = s.name.startswith("(")
        ref = raw if is_apply else floor
        per = s.seconds / s.rows if is_apply and s.rows else None
        ratio = ((per * out["apply"]["changed_rows"]) if per and "(b)" in s.name else s.seconds) / ref if ref else 0
        questions = s.server.get("Questions", 0)
        others = questions - s.sent
        note = s.note
        if "backup_s" in s.extra:
            note = (f"backup {s.extra['backup_s']:.1f} s + apply {s.extra['apply_s']:.1f} s, "
                    f"{s.extra['batches']} batches; " + note).rstrip("; ")
        print(f"{s.name:34} {s.seconds:9.2f} {s.rows:9,} {s.rate:9,.0f} {ratio:7.2f}x "
              f"{s.server.get('Com_update', 0):10,} {questions:9,} {s.sent:7,} {others:6,}  {note}")
    print(f"plan: {out['plan_s']:.2f} s = {out['plan_ratio']:.2f}x the read floor ({floor:.2f} s); "
          f"peak RSS {out['peak_rss_mb']:.0f} MB ({out['rss_at_start_mb']:.0f} MB before planning)")
    if "apply" in out:
        ap = out["apply"]
        print(f"apply: tool {ap['tool_s']:.2f} s = {ap['tool_vs_raw']:.2f}x the raw batched floor "
              f"({ap['raw_s']:.2f} s); apply alone {ap['tool_apply_only_vs_raw']:.2f}x")
        for key, label in (("a", "tool"), ("b", "row at a time"), ("c", "raw batched")):
            print(f"  {label:14}: {ap['updates_per_row'][key]:.4f} UPDATE per changed row (server), "
                  f"{ap['sent_per_row'][key]:.4f} statements sent per changed row (exact), "
                  f"bytes per changed row: {ap['bytes_received_per_row'][key]:,.0f} to the server, "
                  f"{ap['bytes_sent_per_row'][key]:,.0f} from it")


def print_summary(results: list[dict[str, Any]]) -> None:
    print("\n== targets (issue 5) ==")
    big = max(results, key=lambda r: r["rows"])
    small = min(results, key=lambda r: r["rows"])
    lines = [("plan within 1.5x of the read floor",
              f"{big['plan_ratio']:.2f}x at {big['rows']:,} rows", big["plan_ratio"] <= 1.5)]
    if big is not small:
        growth = big["peak_rss_mb"] / small["peak_rss_mb"]
        lines.append((f"peak RSS under {RSS_TARGET_MB} MB (at 1M rows)",
                      f"{big['peak_rss_mb']:.0f} MB at {big['rows']:,} rows", big["peak_rss_mb"] < RSS_TARGET_MB))
        lines.append(("peak RSS within 1.2x of ROWS/10",
                      f"{growth:.2f}x ({big['peak_rss_mb']:.0f} / {small['peak_rss_mb']:.0f} MB)", growth <= 1.2))
    if "apply" in big:
        ap = big["apply"]
        lines.append(("apply (backup + CAS) within 1.5x of raw batched",
                      f"{ap['tool_vs_raw']:.2f}x", ap["tool_vs_raw"] <= 1.5))
        # Our own count is exact; the server's global Com_update also has other clients' UPDATEs.
        lines.append(("at most one UPDATE per 50 changed rows",
                      f"1 per {ap['changed_rows'] / max(ap['tool_updates_sent'], 1):.0f}: "
                      f"{ap['tool_updates_sent']:,} sent for {ap['changed_rows']:,} rows "
                      f"(server's Com_update delta: 1 per {1 / ap['updates_per_row']['a']:.0f})",
                      ap["tool_updates_sent"] <= ap["changed_rows"] / 50))
    for target, figure, met in lines:
        print(f"  {'MET    ' if met else 'NOT MET'}  {target:50} {figure}")
    if big["rows"] < 1_000_000:
        print(f"  (the targets are stated for 1,000,000 rows; this run's largest is {big['rows']:,})")


def profile(url: str, top: int) -> None:
    params = parse_db_url(url)
    profiler = cProfile.Profile()
    profiler.enable()
    plan, db = plan_in_process(params, workers=1)  # the planning code itself, in this process
    profiler.disable()
    db.close()
    print(f"plan of {plan.rows_read:,} rows under cProfile ({len(plan.changes):,} changes)")
    stats = pstats.Stats(profiler).strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db-url", action="append", required=True,
                        help="a database made by bench/make_data.py; give it twice for ROWS and ROWS/10")
    parser.add_argument("--rows-check", action="store_true",
                        help="read back every changed row after each apply and each restore")
    parser.add_argument("--repeat", type=int, default=2, help="floor reads and plans, alternately (default 2)")
    parser.add_argument("--batch-size", type=int, default=apply_mod.DEFAULT_BATCH_SIZE)
    parser.add_argument("--row-at-a-time-max", type=int, default=50_000,
                        help="time (b) on at most this many rows, and extrapolate (default 50,000)")
    parser.add_argument("--no-apply", action="store_true", help="reads and plan only")
    parser.add_argument("--apply-all", action="store_true",
                        help="measure the apply on every --db-url, not only on the first")
    parser.add_argument("--work-dir", default=None, help="where the spool and the backup go (default: TMPDIR)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--profile", action="store_true", help="profile the plan on the first --db-url and stop")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--plan-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plan-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 1 or not 1 <= args.batch_size <= service.MAX_BATCH_SIZE or args.row_at_a_time_max < 1:
        parser.error(f"--repeat and --row-at-a-time-max must be positive, --batch-size 1 to {service.MAX_BATCH_SIZE}")
    if args.plan_child:
        return plan_child(args.db_url[0], args.plan_out)
    if args.profile:
        profile(args.db_url[0], args.top)
        return 0
    print(f"nova-flavor-sync benchmark: {os.cpu_count()} CPUs, {load()}, Python {sys.version.split()[0]}, "
          f"page size {DEFAULT_PAGE_SIZE}, batch size {args.batch_size}")
    results = [
        bench_database(url, args, apply=not args.no_apply and (index == 0 or args.apply_all))
        for index, url in enumerate(args.db_url)
    ]
    print_summary(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
