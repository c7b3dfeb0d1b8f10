"""An Airflow Connection (type ``mysql``) -> DbParams, without importing Airflow.

The DAG task fetches the Connection itself (UI, ``AIRFLOW_CONN_NOVA_API_DB`` as JSON or
URI, or a secrets backend: Airflow resolves all three) and hands the object in; this module
only reads its ``host``, ``port``, ``login``, ``password``, ``schema`` and ``extra_dejson``.
The extras are those of Airflow's MySQL provider: ``charset``, ``unix_socket``, ``ssl`` (a
dict or a JSON string with ``ca``, ``cert``, ``key``, ``check_hostname``) and ``ssl_mode``.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn, Protocol

from nova_flavor_sync.dburl import CHARSETS, DbParams, ssl_kwargs
from nova_flavor_sync.errors import ConfigError

DEFAULT_CONN_ID = "nova_api_db"
# The Connection that holds Nova's [database] connection: cell URL templates in cell_mappings
# are filled from it, as Nova fills them. Optional: without it, $NOVA_DATABASE_CONNECTION.
DEFAULT_DATABASE_CONN_ID = "nova_database"
# ssl_mode as MySQL clients spell it -> the URL-style TLS settings dburl understands.
SSL_MODES = {
    "DISABLED": {"ssl_disabled": "true"},
    "PREFERRED": {},
    "REQUIRED": {"ssl": "true"},
    "VERIFY_CA": {"ssl_verify_cert": "true", "ssl_verify_identity": "false"},
    "VERIFY_IDENTITY": {"ssl_verify_cert": "true", "ssl_verify_identity": "true"},
}


class ConnectionLike(Protocol):
    conn_id: str
    host: str | None
    port: int | None
    login: str | None
    password: str | None
    schema: str | None

    @property
    def extra_dejson(self) -> dict[str, Any]: ...


def params_from_connection(conn: ConnectionLike) -> DbParams:
    """Read an Airflow MySQL connection; ConfigError (never showing the password) if unusable."""
    name = getattr(conn, "conn_id", None) or DEFAULT_CONN_ID

    def fail(problem: str) -> NoReturn:
        raise ConfigError(f"Airflow connection {name!r}: {problem}")

    if not conn.schema:
        fail("its schema (the database name, e.g. nova_api) is empty")
    extra = conn.extra_dejson or {}
    charset = str(extra.get("charset", "utf8mb4")).lower()
    if charset not in CHARSETS:
        fail(f"extra charset must be one of {', '.join(CHARSETS)}, not {charset!r}")
    tls: dict[str, str] = {}
    ssl = extra.get("ssl")
    if isinstance(ssl, str) and ssl.strip():
        try:
            ssl = json.loads(ssl)
        except ValueError:
            ssl = None
        if not isinstance(ssl, dict):
            fail("extra ssl must be a JSON object such as {\"ca\": \"/etc/ssl/ca.pem\"}")
    if isinstance(ssl, dict):
        for key in ("ca", "cert", "key"):
            if ssl.get(key):
                tls[f"ssl_{key}"] = str(ssl[key])
        if "check_hostname" in ssl:
            tls["ssl_verify_identity"] = str(bool(ssl["check_hostname"])).lower()
    elif ssl not in (None, "", {}):
        fail("extra ssl must be a JSON object such as {\"ca\": \"/etc/ssl/ca.pem\"}")
    mode = extra.get("ssl_mode")
    if mode is not None:
        if str(mode).upper() not in SSL_MODES:
            fail(f"extra ssl_mode must be one of {', '.join(SSL_MODES)}, not {mode!r}")
        tls = {**SSL_MODES[str(mode).upper()], **tls}
    unix_socket = extra.get("unix_socket") or None
    if unix_socket is not None and not str(unix_socket).startswith("/"):
        fail("extra unix_socket must be an absolute path")
    return DbParams(
        database=conn.schema,
        host=conn.host or "localhost",
        port=int(conn.port or 3306),
        user=conn.login or "",
        password=conn.password or "",
        unix_socket=unix_socket,
        charset=charset,
        ssl=ssl_kwargs(tls, fail),
    )
