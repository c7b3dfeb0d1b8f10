"""Where plans and backups are kept: a local directory, or any storage fsspec can reach.

A location is a local path (``~/.nova-flavor-fixes/backups``, ``file:///srv/nfs/...``) or
the URL of an fsspec file system (``s3://bucket/prefix``, ``gs://...``, ``abfs://...``).
Local locations are plain ``Path`` objects, and keep every guarantee the file system can
give (0600 files in 0700 directories, fsync, link() that never replaces a file). Any other
is a path object of universal_pathlib (``UPath``, which Airflow's ``ObjectStoragePath``
extends), and gets what object storage can give:

- complete or absent: a file is written to a private local temporary file first, then
  uploaded as one object; S3 makes an object visible only when its PUT (or its multipart
  upload) completes, so a reader never sees half of one;
- never overwritten: the upload is conditional (``mode="create"``: S3's
  ``If-None-Match: *``, refused with 412 when the name exists; other file systems check
  that the name is free first);
- private: no file modes there. The bucket's policy, Block Public Access and its default
  encryption (SSE-S3 or SSE-KMS) decide who reads a backup; this module cannot check
  them, and says so in the log when it writes one (see the README, "Plans and backups on
  object storage").

The engine never imports Airflow: the Airflow side hands in ``ObjectStoragePath`` objects
(``remote=``), so ``s3://<conn_id>@bucket/prefix`` uses that Airflow Connection. The CLI
opens URLs with plain fsspec, which reads credentials and endpoint from the environment
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

# A local Path, or a UPath (Airflow's ObjectStoragePath is one) of any fsspec file system.
StoragePath = Any
LOCAL_PROTOCOLS = ("", "file", "local")
OBJECT_STORAGE_PRIVACY = (
    "no file modes on object storage: who may read it is the bucket's policy (Block Public Access, "
    "default encryption SSE-S3/SSE-KMS, IAM), which this tool cannot check"
)


def as_path(location: str | os.PathLike[str] | StoragePath, *, remote: Callable[[str], StoragePath] | None = None
            ) -> StoragePath:
    """The path object of a location: a ``Path`` for a local path or ``file://`` URL, else
    ``remote(url)`` (default ``upath.UPath``). Path objects are returned as they are (a local
    ``file://`` one as a ``Path``)."""
    if not isinstance(location, str):
        return local_path(location) or location
    if "://" not in location:
        return Path(location).expanduser()
    if remote is None:
        from upath import UPath  # only for URLs: the local case needs no fsspec

        remote = UPath
    path = remote(location)
    return local_path(path) or path


def local_path(path: StoragePath) -> Path | None:
    """The local ``Path`` of a path object on this machine's file system; None for object storage."""
    if isinstance(path, Path):  # a Path, or a UPath of the local file system (a Path too)
        return path.expanduser()
    if getattr(path, "protocol", None) in LOCAL_PROTOCOLS:
        return Path(path.path).expanduser()
    return None


def upload(write: Callable[[IO[bytes]], Any], names: Iterable[StoragePath], *, replace: bool = False
           ) -> tuple[StoragePath, Any]:
    """Write one object of object storage, under the first of ``names`` that is free.

    ``write(file)`` writes the content to a private local temporary file (0600, removed
    afterwards); the file is then uploaded whole, only if the name is free (unless
    ``replace``), so an object that exists is never replaced. Returns the name taken and
    what ``write`` returned.
    """
    with tempfile.NamedTemporaryFile(prefix="nova-flavor-sync-", suffix=".tmp") as local:
        result = write(local)
        local.flush()
        os.fsync(local.fileno())
        for path in names:
            try:
                path.fs.put_file(local.name, path.path, mode="overwrite" if replace else "create")
            except FileExistsError:  # s3fs: 412 Precondition Failed, from If-None-Match: *
                continue
            return path, result
    raise FileExistsError("every name offered is taken")
