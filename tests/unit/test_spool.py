"""spool.SpoolFile: records wait in memory only briefly, then on disk, and read back in order."""

import os
import struct

from nova_flavor_sync.spool import SpoolFile

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
