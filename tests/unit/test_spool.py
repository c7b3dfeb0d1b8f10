"""spool.SpoolFile: records wait in memory only briefly, then on disk, and read back in order."""

import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nova_flavor_sync.spool import PLAN_DIRECTORY_PREFIX, SpoolFile, spool_directory

HEAD = struct.Struct("<I")  # a record: its length, then its bytes


def record(data: bytes) -> bytes:
    return HEAD.pack(len(data)) + data


def on_disk(spool: SpoolFile) -> int:
    return os.fstat(spool._file.fileno()).st_size


def test_few_big_records_go_to_disk_once_they_hold_a_megabyte():
    # PendingRows appends a thousand planned rows as one record: a few hundred kB each. Counting
    # records alone kept hundreds of them (a plan worker's rows at a million instances) in memory.
    spool = SpoolFile(HEAD)
    big = record(b"x" * 300_000)
    for _ in range(3):
        spool.append(big)
    assert on_disk(spool) == 0  # 0.9 MB: still buffered
    spool.append(big)
    assert on_disk(spool) == 4 * len(big)
    spool.extend([big] * 4)
    assert on_disk(spool) == 8 * len(big)
    assert [length for _, records in spool.chunks() for _, length in records] == [300_000] * 8
    spool.close()


def test_many_small_records_are_written_a_batch_at_a_time_and_read_back_in_order():
    spool = SpoolFile(HEAD)
    spool.extend(record(str(i).encode()) for i in range(SpoolFile.WRITE_EVERY - 1))
    assert on_disk(spool) == 0
    spool.append(record(b"last"))
    assert on_disk(spool) > 0
    read = [bytes(buffer[at + HEAD.size: at + HEAD.size + length])
            for buffer, records in spool.chunks() for at, length in records]
    assert read == [str(i).encode() for i in range(SpoolFile.WRITE_EVERY - 1)] + [b"last"]
    spool.close()


def test_a_plan_directory_a_killed_run_left_behind_is_removed_when_the_next_plan_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    host, now = socket.gethostname(), time.time()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(ended.stdout)

    def left(name: str, untouched_s: float) -> Path:
        directory = tmp_path / (PLAN_DIRECTORY_PREFIX + name)
        directory.mkdir()
        (directory / "changes-1234").write_bytes(b"x" * 1000)  # a worker's list
        os.utime(directory, (now - untouched_s, now - untouched_s))
        return directory

    killed = left(f"{host}.{dead}-a1", 2 * 3600)
    kept = [
        left(f"{host}.{dead}-b2", 60),  # its process is gone, but it was written a minute ago
        left(f"{host}.{os.getpid()}-c3", 2 * 3600),  # its process runs
        left(f"other-host.{dead}-d4", 2 * 3600),  # another host's (a shared TMPDIR)
        left("e5", 2 * 3600),  # named before directories named their process
    ]
    with spool_directory() as path:
        assert Path(path).parent == tmp_path
        assert Path(path).name.startswith(f"{PLAN_DIRECTORY_PREFIX}{host}.{os.getpid()}-")
        assert not killed.exists() and all(directory.exists() for directory in kept)
    assert not Path(path).exists()
