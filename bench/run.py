"""Measure the engine on both flavor copies against floors, on a cloud made by ``bench/make_data.py``.

    .venv/bin/python bench/run.py --db-url mysql+pymysql://root@127.0.0.1:3306/nfs_bench_clone_1000000 \\
        --db-url mysql+pymysql://root@127.0.0.1:3306/nfs_bench_clone_100000 [--rows-check] [--json FILE]
    .venv/bin/python bench/run.py --summarize a.json b.json ...   # the worst ratio per target

Each ``--db-url`` is a nova_api database; its cells are found through its ``cell_mappings``
(``service.open_cells_of``; a template URL is filled from the API database's URL, as Nova
fills it from ``[database] connection``). The copies measured: ``nova_api.request_specs.spec``
and, in each cell but cell0, ``instance_extra.flavor``. For each database, in one run (the
apply: on every database unless ``--apply-first-only``):

* **read floor**: one bare keyset read with PyMySQL and the engine's page size
  (``db.DEFAULT_PAGE_SIZE``) of every table the plan reads, one after the other on one
  connection: ``request_specs (id, spec)``, and in each cell ``instance_extra (id,
  instance_uuid, flavor, deleted)`` joined with ``instances (vm_state, task_state, deleted)``
  on the uuid, as the engine must (an instance's state decides whether its copies may be
  written); after one warm-up pass (shown, not used);
* **engine read**: the engine's own reads without planning, in one process
  (``iter_spec_rows`` and each cell's ``iter_flavor_rows``);
* **plan**: what a dry run does, in a fresh Python process, timed inside it:
  ``service.connect``, ``resolve_scope(all_keys=True)``, ``open_cells_of``,
  ``plan_both_copies``; with its phases (the instances to leave alone, the RequestSpecs,
  each cell) and its peak RSS: the planner's ``VmHWM`` plus, if it started plan workers,
  as many times the largest child's peak as run at once (an upper bound of the sum);
* **apply** of the plan's changed rows of both copies, two ways, each from the same bytes
  (every changed row is copied to ``<table>_orig`` in its database first and put back after
  each way):
  (a) the tool, ``apply_both_copies`` below, as the command line writes: one backup of
  both copies (``service.back_up_copies``), then ``service.apply_copies``: each cell's
  instance copies first, then the RequestSpecs (CAS batches, default 500, no pacer);
  (c) the floor: per table, one multi-row ``UPDATE ... CASE id`` of 500 rows per statement,
  autocommit, no hash check, no re-read, no backup, one table after the other, writing
  exactly the bytes the tool writes (computed before, with the engine's
  ``rewrite_extra_specs``, checked against the plan's ``new_sha256``, spooled to a file);
* **statements**: every UPDATE this process sent, per database and table (counted inside
  PyMySQL: exact), and the server's ``Com_update`` delta (global: other clients' land in it).

``--rows-check`` reads back every changed row of both copies after each apply (its SHA2
must be the plan's ``new_sha256``) and after each restore (the original bytes' sha256).

The databases are left as they were found. ``--profile`` instead runs the plan of both
copies once in this process under cProfile and prints the top functions.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import cProfile
import json
import os
import pickle
import pstats
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pymysql
from pymysql.constants import COMMAND

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))  # run from a checkout

from nova_flavor_sync import apply as apply_mod  # noqa: E402
from nova_flavor_sync import service  # noqa: E402
from nova_flavor_sync.db import DEFAULT_PAGE_SIZE, NovaApiDb, NovaCellDb, utcnow  # noqa: E402
from nova_flavor_sync.dburl import DbParams, parse_db_url  # noqa: E402
from nova_flavor_sync.plan import CloudPlan, Plan, batched  # noqa: E402
from nova_flavor_sync.spec_json import rewrite_extra_specs, sha256_text  # noqa: E402

STATUS_NAMES = ("Questions", "Com_update", "Com_select", "Bytes_received", "Bytes_sent")
RSS_TARGET_MB = 300
TARGETS = {  # name: (limit, what)
    "plan_ratio": (1.5, "plan within 1.5x of the bare keyset read of both tables"),
    "peak_rss_mb": (RSS_TARGET_MB, f"peak RSS of the plan under {RSS_TARGET_MB} MB"),
    "rss_growth": (1.2, "peak RSS flat in N: at ROWS within 1.2x of ROWS/10 (same mix)"),
    "apply_ratio": (1.5, "apply (backups + CAS, both copies) within 1.5x of raw batched UPDATEs"),
    "rows_per_update": (None, "at most one UPDATE per 50 changed rows, in each table (rows per UPDATE)"),
}

# -- counting what this process sends ---------------------------------------------------

SENT: Counter[str] = Counter()
UPDATES: Counter[str] = Counter()  # "database.table" -> UPDATE statements sent
_original_execute_command = pymysql.connections.Connection._execute_command


def _counting_execute_command(self, command, sql):
    """Every command PyMySQL sends is one round trip: count them by kind, UPDATEs by table."""
    if command == COMMAND.COM_QUERY:
        text = sql.decode("utf-8", "replace") if isinstance(sql, bytes | bytearray) else str(sql)
        head = text.lstrip()[:40]
        kind = head[:6].upper() or "QUERY"
        SENT[kind] += 1
        if kind == "UPDATE":
            table = head.split(None, 2)[1] if len(head.split(None, 2)) > 1 else "?"
            database = self.db.decode() if isinstance(self.db, bytes) else str(self.db)
            UPDATES[f"{database}.{table}"] += 1
    elif command != COMMAND.COM_QUIT:
        SENT[f"COM_{command}"] += 1
    return _original_execute_command(self, command, sql)


pymysql.connections.Connection._execute_command = _counting_execute_command


def sent_total() -> int:
    return sum(SENT.values())


# -- small helpers ------------------------------------------------------------------------


def connect(params: DbParams, **overrides: Any) -> pymysql.connections.Connection:
    return pymysql.connect(**{**params.connect_kwargs(), "autocommit": True, **overrides})


def server_status(conn) -> dict[str, int]:
    with conn.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS WHERE Variable_name IN (" + ", ".join(f"'{n}'" for n in STATUS_NAMES) + ")")
        return {name: int(value) for name, value in cur.fetchall()}


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def machine() -> dict[str, Any]:
    """What says how this machine compares with the one an earlier figure came from.

    The plan is mostly Python (PyMySQL decoding, planning); half the floor is the server's
    work. A machine whose Python is slower for its server's speed gives higher ratios with the
    same code: ``python_loop_s`` (a fixed pure-Python loop, best of 3) and the floor's client
    and server CPU seconds tell machines apart.
    """
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")

    def loop() -> float:
        t0 = time.process_time()
        total = 0
        for i in range(5_000_000):
            total += i
        return time.process_time() - t0

    return {"cpu": model, "cpus": os.cpu_count(), "python": sys.version.split()[0],
            "python_loop_s": round(min(loop() for _ in range(3)), 3)}


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def template_url(params: DbParams) -> str:
    """What a cell_mappings template is filled from: the API database's URL, password spelled out."""
    auth = quote(params.user or "", safe="") + ":" + quote(params.password or "", safe="")
    return f"mysql+pymysql://{auth}@{params.host}:{params.port}/{params.database}?charset=utf8"


@dataclass(frozen=True)
class Copy:
    """One table of flavor copies: nova_api's request_specs or one cell's instance_extra."""

    label: str  # "request_specs", "cell1 instance_extra"
    params: DbParams
    table: str
    column: str
    cell_uuid: str | None

    @property
    def key(self) -> str:
        return f"{self.params.database}.{self.table}"


def find_copies(params: DbParams) -> list[Copy]:
    """request_specs, then each cell's instance_extra (cell0 left out: never planned)."""
    copies = [Copy("request_specs", params, "request_specs", "spec", None)]
    api = service.connect(params)
    try:
        with service.open_cells_of(api, template_url=template_url(params)) as cells:
            for mapping, db in cells:
                if not mapping.is_cell0:
                    copies.append(Copy(f"{mapping.name} instance_extra", db.params, "instance_extra", "flavor",
                                       mapping.uuid))
    finally:
        api.close()
    return copies


@dataclass
class Measured:
    """One timed step: seconds, rows, and what it sent to the server."""

    name: str
    seconds: float
    rows: int
    server: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    updates: dict[str, int] = field(default_factory=dict)  # "database.table" -> UPDATEs sent
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Meter:
    """Time a block and take the server's global counters and our own around it."""

    def __init__(self, monitor, name: str, rows: int = 0) -> None:
        self.monitor, self.result = monitor, Measured(name, 0.0, rows)

    def __enter__(self) -> Measured:
        self._status = server_status(self.monitor)
        self._sent = sent_total()
        self._updates = Counter(UPDATES)
        self._t0 = time.perf_counter()
        return self.result

    def __exit__(self, *exc: object) -> None:
        self.result.seconds = time.perf_counter() - self._t0
        after = server_status(self.monitor)
        self.result.server = {k: after[k] - self._status.get(k, 0) for k in after}
        self.result.server["Questions"] -= 1  # the SHOW GLOBAL STATUS that read "after"
        self.result.sent = sent_total() - self._sent - 1
        updates = Counter(UPDATES)
        updates.subtract(self._updates)
        self.result.updates = {k: v for k, v in updates.items() if v}


# -- reads ---------------------------------------------------------------------------------

FLOOR_SQL = {
    "request_specs": "SELECT id, spec FROM request_specs WHERE id > %s ORDER BY id LIMIT %s",
    "instance_extra": (
        "SELECT e.id, e.instance_uuid, e.flavor, e.deleted, i.vm_state, i.task_state, i.deleted "
        "FROM instance_extra e LEFT JOIN instances i ON i.uuid = e.instance_uuid "
        "WHERE e.id > %s ORDER BY e.id LIMIT %s"
    ),
}


def floor_read_table(copy: Copy, page_size: int) -> tuple[int, int]:
    """A bare keyset read of one table (its copies' text): rows and characters read."""
    conn = connect(copy.params)
    rows = chars = last_id = 0
    text_at = 1 if copy.table == "request_specs" else 2
    try:
        with conn.cursor() as cur:
            while True:
                cur.execute(FLOOR_SQL[copy.table], (last_id, page_size))
                page = cur.fetchall()
                rows += len(page)
                chars += sum(len(row[text_at] or "") for row in page)
                if len(page) < page_size:
                    return rows, chars
                last_id = page[-1][0]
    finally:
        conn.close()


def server_cpu_s() -> float:
    """CPU seconds the local MariaDB server has used so far (nan when it is not on this machine).

    With the machine's load, wall times of steps vary; CPU seconds (ours, the workers', the
    server's) say what a step costs whatever else runs.
    """
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() not in ("mariadbd", "mysqld"):
                        continue
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except OSError:
                continue
    return float("nan")


def floor_read(copies: Sequence[Copy], page_size: int) -> dict[str, Any]:
    """Every table, one after the other: total and per table (seconds, rows, chars), and CPU seconds."""
    per: dict[str, dict[str, float]] = {}
    cpu0, server0 = time.process_time(), server_cpu_s()
    t_all = time.perf_counter()
    for copy in copies:
        t0 = time.perf_counter()
        rows, chars = floor_read_table(copy, page_size)
        per[copy.label] = {"seconds": time.perf_counter() - t0, "rows": rows, "chars": chars}
    return {"seconds": time.perf_counter() - t_all, "per_table": per,
            "cpu_s": time.process_time() - cpu0, "server_cpu_s": server_cpu_s() - server0,
            "rows": sum(p["rows"] for p in per.values()), "chars": sum(p["chars"] for p in per.values())}


def engine_read(params: DbParams) -> dict[str, float]:
    """The engine's page queries and SpecRow objects of both copies, without planning."""
    per: dict[str, float] = {}
    api = service.connect(params)
    try:
        t0 = time.perf_counter()
        sum(1 for _ in api.iter_spec_rows(page_size=DEFAULT_PAGE_SIZE))
        per["request_specs"] = time.perf_counter() - t0
        with service.open_cells_of(api, template_url=template_url(params)) as cells:
            for mapping, db in cells:
                if mapping.is_cell0:
                    continue
                t0 = time.perf_counter()
                sum(1 for _ in db.iter_flavor_rows(page_size=DEFAULT_PAGE_SIZE))
                per[f"{mapping.name} instance_extra"] = time.perf_counter() - t0
    finally:
        api.close()
    return per


@contextmanager
def timed_phases(phases: dict[str, float]) -> Iterator[None]:
    """Time plan_both_copies' parts by wrapping the service functions it calls."""
    names = [n for n in ("instances_to_leave_alone", "plan_copies", "make_plan", "plan_cells", "make_cell_plan")
             if hasattr(service, n)]
    originals = {name: getattr(service, name) for name in names}

    def wrap(name, label_of):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return originals[name](*args, **kwargs)
            finally:
                label = label_of(args, kwargs)
                phases[label] = phases.get(label, 0.0) + time.perf_counter() - t0
        return timed

    labels = {
        "instances_to_leave_alone": lambda a, k: "instances to leave alone",
        # every big copy's id ranges in one set of workers: no time per table any more
        "plan_copies": lambda a, k: "copies (the instances to leave alone found meanwhile)",
        "make_plan": lambda a, k: "request_specs",
        "plan_cells": lambda a, k: "cells (" + ", ".join(db.params.database for db in a[0]) + ")",
        "make_cell_plan": lambda a, k: f"{a[0].params.database} instance_extra",
    }
    for name in names:
        setattr(service, name, wrap(name, labels[name]))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(service, name, function)


def plan_both_in_process(params: DbParams, phases: dict[str, float] | None = None) -> CloudPlan:
    """The dry run of both copies as the CLI makes it."""
    api = service.connect(params)
    try:
        flavors, scope = service.resolve_scope(api, all_keys=True)
        with service.open_cells_of(api, template_url=template_url(params)) as cells:
            if phases is None:
                return service.plan_both_copies(api, cells, scope, flavors=flavors)
            with timed_phases(phases):
                return service.plan_both_copies(api, cells, scope, flavors=flavors)
    finally:
        api.close()


def vm_status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


_WORKERS = {"started": 0, "running": 0, "most": 0}


def _count_workers() -> None:
    """Count the child processes the planner starts (plan workers), and how many run at once."""
    original = subprocess.Popen

    class Counting(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _WORKERS["started"] += 1
            _WORKERS["running"] += 1
            _WORKERS["most"] = max(_WORKERS["most"], _WORKERS["running"])

        def _ended(self) -> None:
            if self.returncode is not None and not getattr(self, "_counted_end", False):
                self._counted_end = True
                _WORKERS["running"] -= 1

        def wait(self, *args, **kwargs):
            result = super().wait(*args, **kwargs)
            self._ended()
            return result

        def poll(self):
            result = super().poll()
            self._ended()
            return result

    subprocess.Popen = Counting  # type: ignore[misc]


def plan_child(url: str, plan_out: Path | None) -> int:
    """Run in a fresh process: the plan of both copies, timed, with peak RSS; print JSON."""
    _count_workers()
    params = parse_db_url(url)
    rss_before = vm_status_kb("VmRSS")
    phases: dict[str, float] = {}
    server0 = server_cpu_s()
    t0 = time.perf_counter()
    cloud = plan_both_in_process(params, phases)
    seconds = time.perf_counter() - t0
    server_cpu = server_cpu_s() - server0
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    disagreeing = cloud.disagreement(sample=5).count  # as the dry run's report does: in the peak
    peak_kb = vm_status_kb("VmHWM")
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if _WORKERS["started"] else 0
    workers_kb = _WORKERS["most"] * children_kb
    if plan_out is not None:
        with open(plan_out, "wb") as f:
            pickle.dump(cloud, f, protocol=pickle.HIGHEST_PROTOCOL)
    copies = {
        ("request_specs" if c.cell_uuid is None else f"{c.where.split()[0]} instance_extra"): {
            "rows_read": c.plan.rows_read, "changes": len(c.plan.changes), "in_sync": c.plan.in_sync,
            "left_alone": len(c.plan.left_alone), "errors": len(c.plan.errors), "orphans": len(c.plan.orphans),
            "held_back": len(c.plan.held_back),
        }
        for c in cloud.copies
    }
    print(json.dumps({
        "seconds": seconds, "phases": phases, "copies": copies, "digest": cloud.digest,
        "rows_read": sum(c.plan.rows_read for c in cloud.copies), "changes": cloud.to_update,
        "disagreeing": disagreeing,
        "vmhwm_kb": peak_kb + workers_kb, "planner_vmhwm_kb": peak_kb, "workers_maxrss_kb": children_kb,
        "workers_started": _WORKERS["started"], "workers_at_once": _WORKERS["most"],
        "rss_before_kb": rss_before, "sent": sent_total(),
        "cpu_s": own.ru_utime + own.ru_stime, "workers_cpu_s": children.ru_utime + children.ru_stime,
        "server_cpu_s": server_cpu,
    }))
    return 0


def run_plan_child(url: str, plan_out: Path | None = None) -> dict[str, Any]:
    command = [sys.executable, __file__, "--plan-child", "--db-url", url]
    if plan_out is not None:
        command += ["--plan-out", str(plan_out)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the plan process failed (exit {done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- apply: the tool's way -------------------------------------------------------------------------


def apply_both_copies(
    api: NovaApiDb, cells: Sequence[tuple[Any, NovaCellDb]], cloud: CloudPlan, backup_dir: Path, batch_size: int
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Back up and apply every copy's plan as the command line does (``cli.py``'s sync, no pacer).

    ``service.back_up_copies`` (one backup file for all copies, its diverged rows excluded
    from the apply) then ``service.apply_copies`` (each cell's instance copies first, then
    the RequestSpecs; CAS batches, the instance copies with their write guard). Returns the
    backup (seconds, MB, records) and, per copy: seconds of apply (from the progress of
    each copy's batches), rows updated, conflicts, errors, diverged, batches, retries.
    """
    databases = service.databases_of(api, cells)
    t0 = time.perf_counter()
    backup = service.back_up_copies(
        databases, cloud.copies, backup_dir, digest=cloud.digest, scope=cloud.scope,
        cell_names={mapping.uuid: mapping.name for mapping, _ in cells},
    )
    t1 = time.perf_counter()
    last: dict[str, float] = {}  # each copy's last batch done, in the order they were written

    def progress(copy, result, total) -> None:
        last[copy.key] = time.perf_counter()

    applied = service.apply_copies(databases, cloud.copies, batch_size=batch_size,
                                   exclude=backup.diverged_by_database, progress=progress)
    started, apply_s = t1, {}
    for key, ended in last.items():
        apply_s[key], started = ended - started, ended
    out: dict[str, dict[str, Any]] = {}
    for done in applied:
        key = done.copy.key
        out[key] = {
            "apply_s": apply_s.get(key, 0.0), "updated": len(done.result.updated),
            "conflicts": len(done.result.conflicts), "errors": len(done.result.errors),
            "diverged": len(backup.diverged_by_database.get(key, ())),
            "batches": done.result.batches, "retries": done.result.retries,
        }
    backup_info = {"seconds": t1 - t0, "mb": backup.info.path.stat().st_size / 2**20,
                   "records": backup.info.record_count}
    return backup_info, out


# -- apply: the copy, the restore, the spool, the floor -----------------------------------------


def orig_table(copy: Copy) -> str:
    return f"{copy.table}_orig"


def copy_changed_rows(conn, copy: Copy, ids: Sequence[int]) -> None:
    """Keep the changed rows' bytes in <table>_orig (created here)."""
    with conn.cursor() as cur:
        cur.execute(
            f"CREATE TABLE {orig_table(copy)} (id INT NOT NULL PRIMARY KEY, {copy.column} MEDIUMTEXT, "
            "updated_at DATETIME NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb3 COLLATE=utf8mb3_general_ci"
        )
        for chunk in chunks(ids, 1000):
            cur.execute(
                f"INSERT INTO {orig_table(copy)} SELECT id, {copy.column}, updated_at FROM {copy.table} "
                "WHERE id IN %s",
                (tuple(chunk),),
            )


def restore_rows(conn, copy: Copy, ids: Sequence[int] | None = None) -> int:
    """Put <table>_orig back (only ``ids`` if given); return rows restored."""
    with conn.cursor() as cur:
        if ids is None:
            cur.execute(f"SELECT id FROM {orig_table(copy)} ORDER BY id")
            ids = [i for (i,) in cur.fetchall()]
        restored = 0
        for chunk in chunks(ids, 2000):
            # One table in the UPDATE: a multi-table UPDATE ... JOIN makes the server keep a
            # temporary file under its tmpdir, which another job cleaning /tmp once removed mid-run.
            restored += cur.execute(
                f"UPDATE {copy.table} t SET "
                f"t.{copy.column} = (SELECT o.{copy.column} FROM {orig_table(copy)} o WHERE o.id = t.id), "
                f"t.updated_at = (SELECT o.updated_at FROM {orig_table(copy)} o WHERE o.id = t.id) "
                "WHERE t.id IN %s",
                (tuple(chunk),),
            )
    return restored


def check_hashes(conn, copy: Copy, expected: dict[int, str], ids: Sequence[int]) -> int:
    """Rows among ``ids`` whose SHA2(text) is not ``expected[id]``."""
    bad = 0
    with conn.cursor() as cur:
        for chunk in chunks(ids, 1000):
            cur.execute(f"SELECT id, SHA2({copy.column}, 256) FROM {copy.table} WHERE id IN %s", (tuple(chunk),))
            found = dict(cur.fetchall())
            bad += sum(1 for i in chunk if found.get(i) != expected[i])
    return bad


def write_spool(conn, copy: Copy, plan: Plan, layout, path: Path, batch_size: int) -> int:
    """The new texts the tool will write, batch by batch, pickled to ``path``."""
    written = 0
    with open(path, "wb") as out, conn.cursor() as cur:
        for batch in batched(plan.changes, batch_size):
            cur.execute(f"SELECT id, {copy.column} FROM {copy.table} WHERE id IN %s", (tuple(c.id for c in batch),))
            current = dict(cur.fetchall())
            texts = []
            for change in batch:
                new_text = rewrite_extra_specs(current[change.id], dict(change.diff.target_extra_specs), layout=layout)
                if sha256_text(new_text) != change.new_sha256:
                    raise RuntimeError(f"{copy.label} row {change.id}: rewrite differs from the plan")
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


def raw_batched(copy: Copy, spool: Path) -> int:
    """(c) the floor for one table: one multi-row UPDATE per batch, autocommit, no hash, no re-read."""
    conn = connect(copy.params)
    done = 0
    try:
        with conn.cursor() as cur:
            for batch in read_spool(spool):
                whens = " ".join("WHEN %s THEN %s" for _ in batch)
                sql = (
                    f"UPDATE {copy.table} SET {copy.column} = CASE id {whens} END, updated_at = %s "
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


def mix_and_size(database: str) -> tuple[str, int | None]:
    """``nfs_bench_<mix>_<rows>`` (what the Makefile makes) -> (mix, rows); else (database, None)."""
    match = re.fullmatch(r"nfs_bench_(\w+?)_(\d+)", database)
    return (match.group(1), int(match.group(2))) if match else (database, None)


def bench_database(url: str, args: argparse.Namespace, *, apply: bool) -> dict[str, Any]:
    params = parse_db_url(url)
    copies = find_copies(params)
    monitor = connect(params)
    conns = {c.label: (monitor if c.cell_uuid is None else connect(c.params)) for c in copies}
    mix, _ = mix_and_size(params.database)
    out: dict[str, Any] = {"database": params.database, "mix": mix, "load_start": load()}
    for copy in copies:
        with conns[copy.label].cursor() as cur:
            cur.execute("SHOW TABLES LIKE %s", (orig_table(copy),))
            if cur.fetchone():
                print(f"  {copy.label}: {orig_table(copy)} left by an interrupted run: putting its rows back first")
                restore_rows(conns[copy.label], copy)
                cur.execute(f"DROP TABLE {orig_table(copy)}")
    with monitor.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS LIKE 'Threads_connected'")
        out["threads_connected"] = int(cur.fetchone()[1])
    print(f"\n== {params.database}: {load()}; copies: {', '.join(c.label for c in copies)} ==", flush=True)

    steps: list[Measured] = []
    with Meter(monitor, "first read (warm-up)") as m:
        warm = floor_read(copies, DEFAULT_PAGE_SIZE)
    m.rows = warm["rows"]
    steps.append(m)
    out["rows"] = warm["per_table"]["request_specs"]["rows"]
    out["rows_all_tables"] = warm["rows"]
    out["text_mb"] = {k: v["chars"] / 2**20 for k, v in warm["per_table"].items()}
    print(f"  warm-up read: {warm['rows']:,} rows of {len(copies)} tables, "
          f"{warm['chars'] / 2**20:,.0f} MB of text, {m.seconds:.1f} s", flush=True)
    floors: list[dict[str, Any]] = []
    plans: list[dict[str, Any]] = []
    plan_file = None
    if apply:  # the apply needs the plan object: the last child hands it over in a file
        plan_file = Path(tempfile.mkstemp(prefix="nfs-bench-plan-", suffix=".pickle", dir=args.work_dir)[1])
    for attempt in range(1, args.repeat + 1):
        with Meter(monitor, f"floor read #{attempt}") as m:
            floor = floor_read(copies, DEFAULT_PAGE_SIZE)
        m.rows, m.extra = floor["rows"], floor
        floors.append(floor)
        steps.append(m)
        print(f"  floor read #{attempt}: {floor['seconds']:.2f} s ("
              + ", ".join(f"{k} {v['seconds']:.2f}" for k, v in floor["per_table"].items())
              + f"); CPU: client {floor['cpu_s']:.2f} s, server {floor['server_cpu_s']:.2f} s", flush=True)
        with Meter(monitor, f"plan, new process #{attempt}") as m:
            child = run_plan_child(url, plan_file if attempt == args.repeat else None)
        m.rows, m.seconds, m.extra = child["rows_read"], child["seconds"], child
        plans.append(child)
        steps.append(m)
        print(f"  plan #{attempt}: {child['seconds']:.2f} s ("
              + ", ".join(f"{k} {v:.2f}" for k, v in child["phases"].items())
              + f"), peak RSS {child['vmhwm_kb'] / 1024:.0f} MB (planner {child['planner_vmhwm_kb'] / 1024:.0f}"
              f" + {child['workers_at_once']} x {child['workers_maxrss_kb'] / 1024:.0f} MB of "
              f"{child['workers_started']} workers), {child['changes']:,} changes; CPU: planner "
              f"{child['cpu_s']:.2f} s, workers {child['workers_cpu_s']:.2f} s, server {child['server_cpu_s']:.2f} s",
              flush=True)
    with Meter(monitor, "engine read only") as m:
        out["engine_read"] = engine_read(params)
    m.rows = warm["rows"]
    steps.append(m)
    print(f"  engine read only: {m.seconds:.2f} s ("
          + ", ".join(f"{k} {v:.2f}" for k, v in out["engine_read"].items()) + ")", flush=True)
    best_floor = min(floors, key=lambda f: f["seconds"])
    best_plan = min(plans, key=lambda p: p["seconds"])
    out["floor_s"] = best_floor["seconds"]
    out["floor_per_table"] = best_floor["per_table"]
    out["plan_s"] = best_plan["seconds"]
    out["plan_phases"] = best_plan["phases"]
    # CPU seconds of the best attempts: what they cost whatever else the machine ran
    out["floor_cpu_s"] = {"client": best_floor["cpu_s"], "server": best_floor["server_cpu_s"]}
    out["plan_cpu_s"] = {"planner": best_plan["cpu_s"], "workers": best_plan["workers_cpu_s"],
                         "server": best_plan["server_cpu_s"]}
    out["plan_ratio"] = out["plan_s"] / out["floor_s"]
    out["plan_ratios"] = [p["seconds"] / f["seconds"] for p, f in zip(plans, floors, strict=True)]
    out["peak_rss_mb"] = max(p["vmhwm_kb"] for p in plans) / 1024
    out["rss_at_start_mb"] = plans[0]["rss_before_kb"] / 1024
    out["plan_copies"] = plans[-1]["copies"]
    out["changes"] = plans[-1]["changes"]
    out["disagreeing"] = plans[-1]["disagreeing"]
    if len({p["digest"] for p in plans}) != 1:
        raise RuntimeError("the plan changed between runs: something else is writing to this database")

    if plan_file is not None:
        with open(plan_file, "rb") as f:
            cloud = pickle.load(f)
        plan_file.unlink()
        if cloud.to_update:
            out["apply"] = bench_apply(params, copies, conns, monitor, cloud, args, steps)
    out["load_end"] = load()
    out["steps"] = [
        {"name": s.name, "seconds": s.seconds, "rows": s.rows, "server": s.server, "sent": s.sent,
         "updates": s.updates, "note": s.note}
        for s in steps
    ]
    for conn in conns.values():
        if conn is not monitor:
            conn.close()
    monitor.close()
    print_database(out)
    return out


def bench_apply(params, copies, conns, monitor, cloud: CloudPlan, args, steps: list[Measured]) -> dict[str, Any]:
    plans = {c.cell_uuid: c.plan for c in cloud.copies}
    layouts = {c.label: (NovaApiDb if c.cell_uuid is None else NovaCellDb).COPY.layout for c in copies}
    todo = [c for c in copies if plans.get(c.cell_uuid) is not None and plans[c.cell_uuid].changes]
    ids = {c.label: [ch.id for ch in plans[c.cell_uuid].changes] for c in todo}
    old = {c.label: {ch.id: ch.old_sha256 for ch in plans[c.cell_uuid].changes} for c in todo}
    new = {c.label: {ch.id: ch.new_sha256 for ch in plans[c.cell_uuid].changes} for c in todo}
    work = Path(tempfile.mkdtemp(prefix="nfs-bench-", dir=args.work_dir))
    result: dict[str, Any] = {"changed_rows": {c.label: len(ids[c.label]) for c in todo}}
    copied: list[Copy] = []
    clean = False
    spools = {c.label: work / f"new_texts_{i}.pickle" for i, c in enumerate(todo)}
    try:
        t0 = time.perf_counter()
        for copy in todo:
            copy_changed_rows(conns[copy.label], copy, ids[copy.label])
            copied.append(copy)
        result["copy_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for copy in todo:
            write_spool(conns[copy.label], copy, plans[copy.cell_uuid], layouts[copy.label], spools[copy.label],
                        args.batch_size)
        result["spool_s"] = time.perf_counter() - t0
        print(f"  apply prep: copy {result['copy_s']:.1f} s, new texts {result['spool_s']:.1f} s "
              f"({sum(s.stat().st_size for s in spools.values()) / 2**20:,.0f} MB spool)", flush=True)

        def check(label: str) -> str:
            if not args.rows_check:
                return ""
            for copy in todo:
                bad = check_hashes(conns[copy.label], copy, new[copy.label], ids[copy.label])
                if bad:
                    raise RuntimeError(f"{label}: {copy.label}: {bad} rows do not hold the planned bytes")
            return f"{sum(map(len, ids.values())):,} rows read back: all hold the planned bytes"

        def restore(label: str) -> None:
            t0 = time.perf_counter()
            for copy in todo:
                restore_rows(conns[copy.label], copy, ids[copy.label])
                if args.rows_check:
                    bad = check_hashes(conns[copy.label], copy, old[copy.label], ids[copy.label])
                    if bad:
                        raise RuntimeError(f"after {label}: {copy.label}: {bad} rows not restored")
            print(f"  restored after {label}: {time.perf_counter() - t0:.1f} s", flush=True)

        total = sum(map(len, ids.values()))
        # (a) the tool: backups, then CAS batches, each copy.
        backup_dir = work / "backups"
        api = service.connect(params)
        try:
            with service.open_cells_of(api, template_url=template_url(params)) as cells:
                with Meter(monitor, "(a) tool: back_up_copies + apply_copies, both copies", total) as a:
                    backup_info, per_copy = apply_both_copies(api, cells, cloud, backup_dir, args.batch_size)
        finally:
            api.close()
        a.extra = {"backup": backup_info, **per_copy}
        for key, r in per_copy.items():
            if (r["conflicts"], r["errors"], r["diverged"]) != (0, 0, 0):
                raise RuntimeError(f"the tool did not apply {key} cleanly: {r}")
        if sum(r["updated"] for r in per_copy.values()) != total:
            raise RuntimeError(f"the tool updated {sum(r['updated'] for r in per_copy.values())} rows, not {total}")
        a.note = check("(a)")
        steps.append(a)
        shutil.rmtree(backup_dir)
        print(f"  (a) tool: {a.seconds:.1f} s (backup {backup_info['seconds']:.1f} s, "
              f"{backup_info['mb']:,.0f} MB; apply "
              + ", ".join(f"{k[:8]} {r['apply_s']:.1f} s" for k, r in per_copy.items()) + ")", flush=True)
        restore("(a)")

        # (c) the floor: raw batched UPDATEs of the same bytes, table after table.
        raw_per: dict[str, float] = {}
        with Meter(monitor, "(c) floor: raw batched UPDATE, both copies", total) as c:
            for copy in todo:
                t0 = time.perf_counter()
                done = raw_batched(copy, spools[copy.label])
                raw_per[copy.label] = time.perf_counter() - t0
                if done != len(ids[copy.label]):
                    raise RuntimeError(f"(c) {copy.label}: updated {done} rows, not {len(ids[copy.label])}")
        c.extra = raw_per
        c.note = check("(c)")
        steps.append(c)
        print(f"  (c) raw batched: {c.seconds:.1f} s ("
              + ", ".join(f"{k} {v:.1f}" for k, v in raw_per.items()) + ")", flush=True)
        restore("(c)")

        result["tool_s"] = a.seconds
        result["tool_per_copy"] = per_copy
        result["tool_backup"] = backup_info
        result["raw_s"] = c.seconds
        result["raw_per_table"] = raw_per
        result["tool_vs_raw"] = a.seconds / c.seconds
        result["tool_updates"] = {copy.label: a.updates.get(copy.key, 0) for copy in todo}
        result["raw_updates"] = {copy.label: c.updates.get(copy.key, 0) for copy in todo}
        result["rows_per_update"] = {
            copy.label: len(ids[copy.label]) / max(result["tool_updates"][copy.label], 1) for copy in todo
        }
        result["server_com_update"] = {"a": a.server.get("Com_update", 0), "c": c.server.get("Com_update", 0)}
        result["statements_sent"] = {"a": a.sent, "c": c.sent}
        result["rows_checked"] = bool(args.rows_check)
        clean = True
    finally:
        for copy in copied:
            with conns[copy.label].cursor() as cur:
                if not clean:  # stopped partway: put every changed row back
                    restore_rows(conns[copy.label], copy)
                cur.execute(f"DROP TABLE {orig_table(copy)}")
        shutil.rmtree(work, ignore_errors=True)
    return result


# -- printing ------------------------------------------------------------------------------------


def phase_of(phases: dict[str, float], label: str) -> float:
    """The plan's time for one table (``request_specs``, ``cell1 instance_extra``)."""
    if label == "request_specs":
        return phases.get(label, float("nan"))
    cell = label.split()[0]
    return next((v for k, v in phases.items() if k.split()[0].endswith(f"_{cell}")), float("nan"))


def print_database(out: dict[str, Any]) -> None:
    print(f"\n{out['database']} (mix {out['mix']}): {out['rows']:,} instances, {out['changes']:,} rows to "
          f"change; {out['load_start']} -> {out['load_end']}; {out['threads_connected']} client connections at start")
    print(f"  {'table':24} {'rows':>9} {'text MB':>8} {'floor s':>8} {'engine s':>8} {'plan s':>8} "
          f"{'changes':>8} {'left alone':>10}")
    for label, floor in out["floor_per_table"].items():
        copy = out["plan_copies"].get(label, {})
        phase = phase_of(out["plan_phases"], label)
        print(f"  {label:24} {floor['rows']:9,} {floor['chars'] / 2**20:8,.0f} {floor['seconds']:8.2f} "
              f"{out['engine_read'].get(label, float('nan')):8.2f} {phase:8.2f} {copy.get('changes', 0):8,} "
              f"{copy.get('left_alone', 0):10,}")
    print(f"  plan: {out['plan_s']:.2f} s = {out['plan_ratio']:.2f}x the read floor ({out['floor_s']:.2f} s); "
          f"each attempt {', '.join(f'{r:.2f}x' for r in out['plan_ratios'])}; phases "
          + ", ".join(f"{k} {v:.2f} s" for k, v in out["plan_phases"].items()))
    print(f"  peak RSS {out['peak_rss_mb']:.0f} MB ({out['rss_at_start_mb']:.0f} MB before planning); "
          f"{out['disagreeing']:,} instances whose copies disagree")
    if "apply" in out:
        ap = out["apply"]
        print(f"  apply: tool {ap['tool_s']:.2f} s = {ap['tool_vs_raw']:.2f}x raw batched ({ap['raw_s']:.2f} s)")
        for label, rows in ap["changed_rows"].items():
            print(f"    {label:24} {rows:9,} changed rows: tool {ap['tool_updates'][label]:,} UPDATEs "
                  f"(1 per {ap['rows_per_update'][label]:.0f} rows), raw {ap['raw_updates'][label]:,}; "
                  f"raw {ap['raw_per_table'][label]:.1f} s")
        print(f"    server Com_update: tool {ap['server_com_update']['a']:,}, raw {ap['server_com_update']['c']:,}; "
              f"all statements sent: tool {ap['statements_sent']['a']:,}, raw {ap['statements_sent']['c']:,}"
              + ("; every changed row read back after each way and each restore" if ap["rows_checked"] else ""))


def target_rows(results: list[dict[str, Any]]) -> list[tuple[str, str, float, bool]]:
    """(target, where, figure, met) for every result, and the RSS growth per mix."""
    lines = []
    for r in results:
        where = f"{r['mix']} {r['rows']:,}"
        lines.append(("plan_ratio", where, r["plan_ratio"], r["plan_ratio"] <= 1.5))
        lines.append(("peak_rss_mb", where, r["peak_rss_mb"], r["peak_rss_mb"] < RSS_TARGET_MB))
        if "apply" in r:
            ap = r["apply"]
            lines.append(("apply_ratio", where, ap["tool_vs_raw"], ap["tool_vs_raw"] <= 1.5))
            for label, per in ap["rows_per_update"].items():
                lines.append(("rows_per_update", f"{where} {label}", per, per >= 50))
    by_mix: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_mix.setdefault(r["mix"], []).append(r)
    for mix, rs in by_mix.items():
        if len(rs) > 1:
            big, small = max(rs, key=lambda r: r["rows"]), min(rs, key=lambda r: r["rows"])
            growth = big["peak_rss_mb"] / small["peak_rss_mb"]
            lines.append(("rss_growth", f"{mix} {big['rows']:,} / {small['rows']:,}", growth, growth <= 1.2))
    return lines


def print_summary(results: list[dict[str, Any]]) -> None:
    lines = target_rows(results)
    print("\n== targets (issue 11, both copies) ==")
    for target, where, figure, met in lines:
        unit = " MB" if target == "peak_rss_mb" else " rows/UPDATE" if target == "rows_per_update" else "x"
        print(f"  {'MET    ' if met else 'NOT MET'}  {target:16} {where:44} {figure:8.2f}{unit}")
    print("\n== worst per target ==")
    for target, (_, what) in TARGETS.items():
        mine = [line for line in lines if line[0] == target]
        if not mine:
            continue
        worst = (min if target == "rows_per_update" else max)(mine, key=lambda line: line[2])
        print(f"  {'MET    ' if all(m[3] for m in mine) else 'NOT MET'}  {what}: worst {worst[2]:.2f} ({worst[1]})")


def print_markdown(results: list[dict[str, Any]]) -> None:
    """One table row per database, as docs/benchmarks.md shows them."""
    print("| mix | instances | read floor | plan | plan / floor (each attempt) | peak RSS | apply: tool | raw "
          "floor | tool / raw | rows per UPDATE (RS, cell1, cell2) | load at start, end |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | --- |")
    for r in sorted(results, key=lambda r: (r["mix"], r["rows"])):
        ap = r.get("apply")
        apply_cells = (f"{ap['tool_s']:.1f} s | {ap['raw_s']:.1f} s | **{ap['tool_vs_raw']:.2f}x** | "
                       + ", ".join(f"{v:.0f}" for v in ap["rows_per_update"].values())) if ap else "- | - | - | -"
        print(f"| {r['mix']} | {r['rows']:,} | {r['floor_s']:.1f} s | {r['plan_s']:.1f} s | **{r['plan_ratio']:.2f}x** "
              f"({', '.join(f'{x:.2f}' for x in r['plan_ratios'])}) | {r['peak_rss_mb']:.0f} MB | {apply_cells} | "
              f"{r['load_start'].removeprefix('load ').split()[0]}, {r['load_end'].removeprefix('load ').split()[0]} |")


def profile(url: str, top: int) -> None:
    params = parse_db_url(url)
    profiler = cProfile.Profile()
    old = service.PLAN_WORKERS_FROM
    service.PLAN_WORKERS_FROM = 1 << 62  # the planning code itself, in this process
    profiler.enable()
    try:
        cloud = plan_both_in_process(params)
    finally:
        profiler.disable()
        service.PLAN_WORKERS_FROM = old
    print(f"plan of both copies, {sum(c.plan.rows_read for c in cloud.copies):,} rows under cProfile "
          f"({cloud.to_update:,} changes)")
    stats = pstats.Stats(profiler).strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db-url", action="append", help="an API database made by bench/make_data.py (repeatable)")
    parser.add_argument("--rows-check", action="store_true",
                        help="read back every changed row after each apply and each restore")
    parser.add_argument("--repeat", type=int, default=2, help="floor reads and plans, alternately (default 2)")
    parser.add_argument("--batch-size", type=int, default=apply_mod.DEFAULT_BATCH_SIZE)
    parser.add_argument("--no-apply", action="store_true", help="reads and plan only")
    parser.add_argument("--apply-first-only", action="store_true", help="measure the apply on the first --db-url only")
    parser.add_argument("--work-dir", default=None, help="where the spool and the backups go (default: TMPDIR)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--summarize", nargs="+", type=Path, metavar="JSON",
                        help="print the targets and the worst ratios of earlier --json files, and stop")
    parser.add_argument("--markdown", action="store_true", help="with --summarize: also a Markdown table")
    parser.add_argument("--profile", action="store_true", help="profile the plan on the first --db-url and stop")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--plan-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plan-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.summarize:
        results = [r for path in args.summarize for r in json.loads(path.read_text())]
        print_summary(results)
        if args.markdown:
            print()
            print_markdown(results)
        return 0
    if not args.db_url:
        parser.error("--db-url is required")
    if args.repeat < 1 or not 1 <= args.batch_size <= service.MAX_BATCH_SIZE:
        parser.error(f"--repeat must be positive, --batch-size 1 to {service.MAX_BATCH_SIZE}")
    if args.plan_child:
        return plan_child(args.db_url[0], args.plan_out)
    if args.profile:
        profile(args.db_url[0], args.top)
        return 0
    # The engine's modules as a deployed tool loads them, compiled: without a current .pyc
    # (a tree never imported, or PYTHONDONTWRITEBYTECODE set), every plan worker and child
    # compiles them again as it starts, some 0.1 s each, which is not the engine's work.
    compileall.compile_dir(Path(__file__).resolve().parents[1] / "include", quiet=1)
    host = machine()
    print(f"nova-flavor-sync benchmark, both copies: {host['cpus']} CPUs ({host['cpu'] or 'model unknown'}), "
          f"{load()}, Python {host['python']} (a 5M-step loop in {host['python_loop_s']:.3f} s), "
          f"page size {DEFAULT_PAGE_SIZE}, batch size {args.batch_size}")
    results = []
    for index, url in enumerate(args.db_url):
        results.append(bench_database(url, args, apply=not args.no_apply and (index == 0 or not args.apply_first_only)))
        results[-1]["machine"] = host
        if args.json:  # after each database, so a long run keeps what it measured
            args.json.write_text(json.dumps(results, indent=1, default=str))
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
