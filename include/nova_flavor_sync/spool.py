"""A temporary file of records, so that a big plan's per-row lists do not live in memory.

A million-row cloud can have hundreds of thousands of rows to change or to leave alone;
the plan's lists (``plan.ChangeList``, ``plan.NoteList``) keep their rows here once there
are many. A SpoolFile only appends records and reads them back in order, a chunk at a
time; what a record means is its list's business.

A record is a fixed-size head (a ``struct``) whose last field is the length of the bytes
that follow the head. The file is unlinked (under ``$TMPDIR``) unless it is given a
directory: then it has a name there, so that a plan worker's list can be pickled as that
name and adopted by the parent process (see plan_worker).
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
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

    def chunks(self) -> Iterator[Chunk]:
        """Every record so far, in order, a chunk of the file at a time (see ``Chunk``)."""
        self._flush()
        self._file.flush()
        fd, offset, buffer = self._file.fileno(), 0, b""
        head = self.head
        while True:
            chunk = os.pread(fd, self.READ_SIZE, offset)
            if not chunk:
                break
            offset += len(chunk)
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
