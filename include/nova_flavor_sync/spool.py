"""A temporary file of records, so that a big plan's per-row lists do not live in memory.

A million-row cloud can have hundreds of thousands of rows to change or to leave alone;
the plan's lists (``plan.ChangeList``, ``plan.NoteList``) keep their rows here once there
are many. A SpoolFile only appends records and reads them back in order, a chunk at a
time; what a record means is its list's business.

A record is a fixed-size head (a ``struct``) whose last field is the length of the bytes
that follow the head. The file is unlinked (under ``$TMPDIR``) unless it is given a
directory: then it has a name there, so that a plan worker's list can be pickled as that
name and adopted by the parent process (see plan_worker). That directory is one plan's
(``spool_directory``).
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

# A chunk of records read back: the bytes, and each whole record in them as
# (where it starts, *the fields of its head); its tail follows its head.
Chunk = tuple[bytes, list[tuple[Any, ...]]]


class SpoolFile:
    """Records appended to a temporary file and read back in order, a chunk at a time."""

    READ_SIZE = 1 << 20
    # Appends are buffered and written this many records at a time, or once they hold this
    # many bytes (a record may be big: PendingRows appends a thousand rows as one).
    WRITE_EVERY = 4096
    WRITE_BYTES = 1 << 20

    def __init__(self, head: struct.Struct, *, directory: str | None = None, name: str = "rows") -> None:
        """``head``: a record's head; its last field is the length of the record's tail."""
        self.head = head
        self.name = name
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._path: str | None = None
        if directory is None:
            self._file: Any = tempfile.TemporaryFile(prefix=f"nova-flavor-sync-{name}-")
        else:
            self._file = tempfile.NamedTemporaryFile(prefix=f"{name}-", dir=directory, delete=False)
            self._path = self._file.name

    def append(self, record: bytes) -> None:
        self._pending.append(record)
        self._pending_bytes += len(record)
        if len(self._pending) >= self.WRITE_EVERY or self._pending_bytes >= self.WRITE_BYTES:
            self._flush()

    def extend(self, records: Iterable[bytes]) -> None:
        records = list(records)
        self._pending.extend(records)
        self._pending_bytes += sum(map(len, records))
        if len(self._pending) >= self.WRITE_EVERY or self._pending_bytes >= self.WRITE_BYTES:
            self._flush()

    def chunks(self, start: int = 0) -> Iterator[Chunk]:
        """Every record so far, in order, a chunk of the file at a time (see ``Chunk``); from
        byte ``start`` on, which must be where a record starts."""
        buffer, head = b"", self.head
        for chunk in self.blocks(self.READ_SIZE, start):
            buffer += chunk
            at, records = 0, []
            while at + head.size <= len(buffer):
                fields = head.unpack_from(buffer, at)
                end = at + head.size + fields[-1]
                if end > len(buffer):
                    break
                records.append((at, *fields))
                at = end
            yield buffer, records
            buffer = buffer[at:]

    def blocks(self, size: int, start: int = 0) -> Iterator[bytes]:
        """The file's bytes so far from byte ``start`` on, in order, ``size`` at a time (a block
        may be shorter), for a reader that knows where its records start without reading each
        head (``chunks`` reads them)."""
        self._flush()
        self._file.flush()
        fd, offset = self._file.fileno(), start
        while block := os.pread(fd, size, offset):
            offset += len(block)
            yield block

    def close(self) -> None:
        self._file.close()

    def _flush(self) -> None:
        if self._pending:
            self._file.write(b"".join(self._pending))
            self._pending = []
            self._pending_bytes = 0

    def __getstate__(self) -> dict[str, Any]:
        """Pickled as its name if it has one (a plan worker's), else with its records as bytes."""
        self._flush()
        self._file.flush()
        state: dict[str, Any] = {"head": self.head.format, "name": self.name, "path": self._path}
        if self._path is None:
            fd = self._file.fileno()
            state["records"] = os.pread(fd, os.fstat(fd).st_size, 0)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.head, self.name = struct.Struct(state["head"]), state["name"]
        self._pending, self._pending_bytes = [], 0
        self._path = None
        if state["path"] is not None:  # a worker's file: this process owns it from now on
            self._file = open(state["path"], "r+b")  # noqa: SIM115 (closed with the list)
            self._file.seek(0, os.SEEK_END)  # appends go after its records
            os.unlink(state["path"])
        else:
            self._file = tempfile.TemporaryFile(prefix=f"nova-flavor-sync-{self.name}-")
            self._file.write(state["records"])


# A plan's spool directory (``spool_directory``): ``nova-flavor-sync-plan-<host>.<pid>-<random>``.
PLAN_DIRECTORY_PREFIX = "nova-flavor-sync-plan-"
# A directory a run left behind is removed only once untouched this long (as well as its
# process gone): a plan writes into its directory as it goes.
LEFT_BEHIND_AFTER_S = 3600


@contextmanager
def spool_directory() -> Iterator[str]:
    """A temporary directory for one plan's spooled lists (plan workers' files, by name),
    removed after; named after this host and process.

    A run killed while it plans (SIGKILL, the OOM killer, a task's timeout) cannot remove its
    directory, and its workers' files there can be hundreds of MB: the directories of this
    host's runs whose process is gone and that are untouched for LEFT_BEHIND_AFTER_S are
    removed first (``remove_left_behind``).
    """
    base = tempfile.gettempdir()
    remove_left_behind(base)
    with tempfile.TemporaryDirectory(prefix=f"{PLAN_DIRECTORY_PREFIX}{socket.gethostname()}.{os.getpid()}-",
                                     dir=base) as path:
        yield path


def remove_left_behind(base: str) -> list[str]:
    """Remove the plan directories in ``base`` that runs of this user on this host left behind
    (their process is gone, nothing written for LEFT_BEHIND_AFTER_S); return their paths."""
    mine = f"{PLAN_DIRECTORY_PREFIX}{socket.gethostname()}."
    removed = []
    for entry in os.scandir(base):  # $TMPDIR: mostly other programs' files, not looked at
        pid = entry.name[len(mine):].split("-", 1)[0] if entry.name.startswith(mine) else ""
        if not pid.isdigit():
            continue
        try:
            stat = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if (not entry.is_dir(follow_symlinks=False) or stat.st_uid != os.getuid()
                or time.time() - stat.st_mtime < LEFT_BEHIND_AFTER_S or _running(int(pid))):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
