"""Where the nova_api database is: --db-url, NOVA_API_DB_URL or nova.conf -> DbParams.

The password is kept out of str() and repr() so it cannot reach a log line by accident.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DbParams:
    """How to open the nova_api database with PyMySQL."""

    database: str
    host: str = "localhost"
    port: int = 3306
    user: str = ""
    password: str = field(default="", repr=False)
    unix_socket: str | None = None
    charset: str = "utf8mb4"
    # PyMySQL's own ssl_* keyword arguments (ssl_ca, ssl_cert, ssl_key,
    # ssl_verify_cert, ssl_verify_identity, ssl_disabled), passed through as given.
    ssl: dict[str, Any] = field(default_factory=dict)

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``pymysql.connect`` (the only place the password goes)."""
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "database": self.database,
            "charset": self.charset,
            **self.ssl,
        }
        if self.unix_socket:
            kwargs["unix_socket"] = self.unix_socket
        return kwargs

    def safe_url(self) -> str:
        """The location as a URL with the password masked, for messages and backups."""
        auth = f"{self.user}:***@" if self.password else (f"{self.user}@" if self.user else "")
        where = f"{self.host}:{self.port}"
        if self.unix_socket:
            where += f" (socket {self.unix_socket})"
        return f"mysql+pymysql://{auth}{where}/{self.database}"

    def __str__(self) -> str:
        return self.safe_url()
