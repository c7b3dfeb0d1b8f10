"""A stand-in for Nova that rewrites random request specs, run as a separate process.

    python tests/safety/nova_writer.py --host H --port P --user U --database D \
        --seed N --log FILE [--max-seconds S]      (password, if any, in NOVA_WRITER_PASSWORD)

Each write is what ``RequestSpec.save()`` does: read the whole blob, change a field inside
``nova_object.data``, ``json.dumps`` it (Nova's format) and write the whole blob back with a
plain ``UPDATE ... WHERE id = ?`` in autocommit mode: no lock, no compare-and-swap. It sets
``updated_at`` as Nova's ORM does. The fields it changes:

* ``availability_zone`` and ``ignore_hosts`` (not the flavor: the sync must never undo them);
* the flavor copy's ``extra_specs``, to a value of its own (a ``writer:mark`` key added, or a
  key dropped), as a resize to a flavor with other extra specs would;
* the flavor copy's ``extra_specs``, to the flavor's current ones, as a resize to the same
  flavor would (often byte-equal to what the sync writes: the "already" path).

Every write is logged, after the UPDATE returned, as one JSON line flushed at once:
``{"seq", "id", "kind", "t0", "t1", "read_sha256", "text"}``. ``t0`` is taken before the
SELECT and ``t1`` after the UPDATE, both ``time.monotonic()`` (CLOCK_MONOTONIC, the same
clock in every process on Linux): the write committed between them. It stops after the
write in progress when it gets SIGTERM (or after ``--max-seconds``), then prints
``{"writes": N, "deadlocks": D}``: a write is never half logged.

On Galera a write can fail at COMMIT with ``1213 Deadlock`` (a certification conflict with a
write through another node); Nova's oslo.db retries such a write from its read
(``wrap_db_retry(retry_on_deadlock=True)``), and so does this writer: only writes that
committed are logged, the deadlocks counted. ``--ids M:R`` writes only rows whose id is R
modulo M (two writers through two nodes then never write the same row, so each row has one
serial writer, and its last write is well defined).

``--cell-database DB`` (repeatable, same server) also saves instance copies: each write picks
a row at random among the RequestSpecs and those cells' ``instance_extra`` rows (same ``--ids``
rule), as ``Instance.save()`` saves the ``flavor`` blob: the ``cur`` flavor's extra_specs as
above, or the same flavor saved from an object with other changed fields (its
``nova_object.changes`` list differs: other bytes, same flavor). ``old`` and ``new`` stay
null (no resize under way). Its log lines then also name the ``database`` of the row.

This file is a script, not a test module, so it needs no import path under pytest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sys
import time

import pymysql

MUTATIONS = ("availability_zone", "ignore_hosts", "own_extra_specs", "flavor_extra_specs")
WEIGHTS = (4, 3, 2, 1)


def flavor_specs(cur) -> dict[int, dict[str, str]]:
    """The flavors' current extra specs (NULL values left out), as Nova would load them."""
    cur.execute("SELECT flavor_id, `key`, value FROM flavor_extra_specs ORDER BY flavor_id, `key`")
    specs: dict[int, dict[str, str]] = {}
    for flavor_id, key, value in cur.fetchall():
        if value is not None:
            specs.setdefault(flavor_id, {})[key] = value
    return specs


def mutate(document: dict, kind: str, seq: int, rng: random.Random, flavors: dict[int, dict[str, str]]) -> str:
    """Change one field of the spec like Nova would; return the kind actually applied."""
    data = document["nova_object.data"]
    flavor = data.get("flavor")
    flavor_data = flavor.get("nova_object.data") if isinstance(flavor, dict) else None
    if kind in ("own_extra_specs", "flavor_extra_specs") and not (
        isinstance(flavor_data, dict) and isinstance(flavor_data.get("extra_specs"), dict)
    ):
        kind = "availability_zone"  # no flavor copy to change: change something else
    if kind == "availability_zone":
        data["availability_zone"] = rng.choice(["az-1", "az-2", "az-3", f"az-w{seq}"])
    elif kind == "ignore_hosts":
        data["ignore_hosts"] = rng.choice([None, [f"compute-{rng.randrange(40)}"],
                                           [f"compute-{rng.randrange(40)}", f"compute-w{seq}"]])
    elif kind == "own_extra_specs":
        specs = dict(flavor_data["extra_specs"])
        if specs and rng.random() < 0.3:
            del specs[rng.choice(sorted(specs))]
        specs["writer:mark"] = str(seq)
        flavor_data["extra_specs"] = specs
    else:  # flavor_extra_specs
        flavor_data["extra_specs"] = dict(flavors.get(flavor_data.get("id"), {}))
    return kind


def mutate_instance_copy(document: dict, kind: str, seq: int, rng: random.Random,
                         flavors: dict[int, dict[str, str]]) -> str:
    """Change an instance's flavor blob (``{"cur": ..., "old": null, "new": null}``) like Nova would."""
    cur = document["cur"]
    if kind in ("own_extra_specs", "flavor_extra_specs"):
        return mutate({"nova_object.data": {"flavor": cur}}, kind, seq, rng, flavors)
    if "nova_object.changes" in cur:  # the same flavor, saved from an object with other changed fields
        del cur["nova_object.changes"]
    else:
        cur["nova_object.changes"] = ["extra_specs"]
    return "resave"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--ids", default="1:0", help="M:R, only rows whose id is R modulo M")
    parser.add_argument("--cell-database", action="append", default=[],
                        help="also save the instance copies (instance_extra.flavor) of this cell database")
    args = parser.parse_args(argv)

    stop = False

    def on_term(signum, frame):  # only a flag: the write in progress completes and is logged
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    conn = pymysql.connect(
        host=args.host, port=args.port, user=args.user, password=os.environ.get("NOVA_WRITER_PASSWORD", ""),
        database=args.database, autocommit=True, connect_timeout=10,
    )
    rng = random.Random(args.seed)
    seq = deadlocks = 0
    modulo, remainder = (int(part) for part in args.ids.split(":"))
    with conn, conn.cursor() as cur, open(args.log, "w", encoding="utf-8") as log:
        cur.execute("SELECT id FROM request_specs ORDER BY id")
        rows = [(args.database, "request_specs", "spec", row_id) for (row_id,) in cur.fetchall()]
        for cell_database in args.cell_database:
            cur.execute(f"SELECT id FROM `{cell_database}`.instance_extra WHERE deleted = 0 ORDER BY id")
            rows += [(cell_database, "instance_extra", "flavor", row_id) for (row_id,) in cur.fetchall()]
        rows = [row for row in rows if row[3] % modulo == remainder]
        flavors = flavor_specs(cur)
        deadline = time.monotonic() + args.max_seconds
        while not stop and time.monotonic() < deadline:
            database, table, column, row_id = rng.choice(rows)
            wanted = rng.choices(MUTATIONS, weights=WEIGHTS)[0]
            while True:
                t0 = time.monotonic()
                cur.execute(f"SELECT {column} FROM `{database}`.{table} WHERE id = %s", (row_id,))
                (text,) = cur.fetchone()
                document = json.loads(text)
                if table == "request_specs":
                    kind = mutate(document, wanted, seq + 1, rng, flavors)
                else:
                    kind = mutate_instance_copy(document, wanted, seq + 1, rng, flavors)
                new_text = json.dumps(document)
                try:
                    cur.execute(f"UPDATE `{database}`.{table} SET {column} = %s, updated_at = UTC_TIMESTAMP() "
                                "WHERE id = %s", (new_text, row_id))
                    break
                except pymysql.err.OperationalError as exc:
                    if not (exc.args and exc.args[0] == 1213):
                        raise
                    deadlocks += 1  # Galera certification conflict: redo from the read, as oslo.db does
            t1 = time.monotonic()
            seq += 1
            entry = {"seq": seq, "id": row_id, "kind": kind, "t0": t0, "t1": t1,
                     "read_sha256": hashlib.sha256(text.encode()).hexdigest(), "text": new_text}
            if args.cell_database:
                entry["database"] = database
            log.write(json.dumps(entry) + "\n")
            log.flush()
    print(json.dumps({"writes": seq, "deadlocks": deadlocks}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
