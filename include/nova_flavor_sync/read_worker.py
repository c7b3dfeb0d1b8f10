"""Read request_specs in a second process, so reading and planning run on two cores.

PyMySQL is pure Python: turning the server's packets into rows costs about as much CPU as
planning them, and Python threads cannot run both at once (the GIL). At a million rows, a
plan read in the same process took 1.8 times the bare read; with the rows read here, in a
child process, the planner only unpacks them.

The parent starts ``python -m nova_flavor_sync.read_worker`` with ``subprocess`` (not
``multiprocessing``, which Celery's daemonic workers forbid), sends the connection
parameters and the query on its stdin (pickled: it is our own code on both ends, and the
password never appears in a command line or environment), and reads frames from its stdout:

    page:  <I rows>, then per row <q id><H uuid bytes><I spec bytes>, uuid, spec (UTF-8)
    end:   <I 0>
    error: <I 0xFFFFFFFF><I length>, the message (UTF-8, free of secrets)

The child reads keyset pages on one connection, exactly as ``NovaApiDb.iter_spec_rows``
does in-process; the pipe holds at most a few pages, so memory stays bounded on both sides.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from nova_flavor_sync.dburl import DbParams
from nova_flavor_sync.errors import DatabaseUnavailableError

PAGE = struct.Struct("<I")
ROW = struct.Struct("<qHI")
END, ERROR = 0, 0xFFFFFFFF
STOP_TIMEOUT_S = 10
PIPE_BYTES = 1 << 20  # within Linux's default /proc/sys/fs/pipe-max-size


@dataclass(frozen=True)
class ReadRequest:
    """What the child reads: the same page query the in-process reader runs."""

    params: DbParams
    sql: str  # takes (last_id, *extra, page_size)
    extra: tuple
    page_size: int


def read_in_child(request: ReadRequest) -> Iterator[tuple[int, str, str]]:
    """Yield ``(id, instance_uuid, spec)`` rows read by a child process, in id order.

    Raises DatabaseUnavailableError if the child fails; closing the generator early stops it.
    """
    # The child imports this package the way the parent did (an Airflow worker may have it
    # on sys.path only, not installed).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    child = subprocess.Popen(
        [sys.executable, "-m", "nova_flavor_sync.read_worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=1 << 20,
        env=env,
    )
    assert child.stdin is not None and child.stdout is not None
    _widen_pipe(child.stdout)
    try:
        pickle.dump(request, child.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        child.stdin.close()
        yield from _read_frames(child.stdout)
    finally:
        if child.poll() is None:
            child.kill()  # stopped early (or failed): it holds nothing worth finishing
        child.stdout.close()
        child.wait(timeout=STOP_TIMEOUT_S)


def _widen_pipe(stream: BinaryIO) -> None:
    """Let the pipe hold a whole page (Linux: 64 KiB by default), so the child rarely waits."""
    try:
        fcntl.fcntl(stream.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except OSError:
        pass  # a smaller pipe only costs a little speed


def _read_frames(stream: BinaryIO) -> Iterator[tuple[int, str, str]]:
    unpack_row, row_size = ROW.unpack_from, ROW.size
    while True:
        header = _read_exactly(stream, PAGE.size)
        (rows,) = PAGE.unpack(header)
        if rows == END:
            return
        if rows == ERROR:
            (length,) = PAGE.unpack(_read_exactly(stream, PAGE.size))
            raise DatabaseUnavailableError(_read_exactly(stream, length).decode("utf-8", "replace"))
        for _ in range(rows):
            row_id, uuid_len, spec_len = unpack_row(_read_exactly(stream, row_size))
            data = _read_exactly(stream, uuid_len + spec_len)
            yield row_id, data[:uuid_len].decode("utf-8"), data[uuid_len:].decode("utf-8")


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise DatabaseUnavailableError("the request_specs reader process stopped unexpectedly")
    return data


def _serve(request: ReadRequest, out: BinaryIO) -> None:
    """The child's side: read every page and write it out as frames."""
    from nova_flavor_sync.db import NovaApiDb  # the parent does not need this import

    pack_row = ROW.pack
    with NovaApiDb(request.params) as db:
        last_id = 0
        while True:
            with db.conn.cursor() as cur:
                cur.execute(request.sql, (last_id, *request.extra, request.page_size))
                page = cur.fetchall()
            if page:
                out.write(PAGE.pack(len(page)))
            for row_id, uuid, spec in page:
                uuid_bytes, spec_bytes = uuid.encode("utf-8"), spec.encode("utf-8")
                out.write(pack_row(row_id, len(uuid_bytes), len(spec_bytes)))
                out.write(uuid_bytes)
                out.write(spec_bytes)
            if len(page) < request.page_size:
                break
            last_id = page[-1][0]
            del page  # before the next page is read: one page in memory, not two
    out.write(PAGE.pack(END))
    out.flush()


def main() -> int:
    out = open(sys.stdout.fileno(), "wb", buffering=PIPE_BYTES, closefd=False)
    try:
        _serve(pickle.load(sys.stdin.buffer), out)
    except Exception as exc:  # reported to the parent, which raises it
        from nova_flavor_sync.db import describe_error

        message = describe_error(exc).encode("utf-8")
        out.write(PAGE.pack(ERROR) + PAGE.pack(len(message)) + message)
        out.flush()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
