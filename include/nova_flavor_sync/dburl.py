"""Where the nova_api database is: --db-url, NOVA_API_DB_URL or nova.conf -> DbParams.

A cell database's URL comes from ``nova_api.cell_mappings.database_connection``, which may
be a template that Nova fills from ``[database] connection``: :func:`cell_db_params`.

The password is kept out of str() and repr() so it cannot reach a log line by accident.
Every message below shows the URL only through :func:`redact_url`, and no ConfigError is
raised while an exception that might quote the URL or the file is being handled, so the
password is not in ``__cause__`` or ``__context__`` either.

URLs are split the way SQLAlchemy (hence Nova) splits them, so a URL that works in
nova.conf means the same here; the query string is checked more strictly, because a
parameter we silently dropped could be a TLS setting the operator relies on.
"""

from __future__ import annotations

import configparser
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import parse_qsl, unquote, urlparse

from .errors import ConfigError, UsageError

DEFAULT_NOVA_CONF = "/etc/nova/nova.conf"
ENV_VAR = "NOVA_API_DB_URL"
SCHEMES = frozenset(
    {"mysql", "mysql+pymysql", "mysql+mysqldb", "mariadb", "mariadb+pymysql", "mariadb+mysqldb"}
)
CHARSETS = ("utf8mb4", "utf8mb3", "utf8")
# Dropped without a word: devstack's SQLAlchemy engine plugin (plugin=dbcounter), the
# driver's timeouts and old use_unicode=0 advice. The engine sets its own for all of them.
IGNORED_PARAMS = frozenset(
    {"plugin", "connect_timeout", "read_timeout", "write_timeout", "use_unicode"}
)
# Refused with a reason rather than "unknown": each would change how or where we connect.
REFUSED_PARAMS = {
    "read_default_file": "an option file could supply another user, host or TLS setting; "
    "put them in the URL instead",
    "read_default_group": "an option file could supply another user, host or TLS setting; "
    "put them in the URL instead",
    "ssl_key_password": "a second secret in the URL is not supported; use an unencrypted key",
    "ssl_capath": "PyMySQL keyword arguments have no CA directory; use ssl_ca=FILE",
    "ssl_cipher": "PyMySQL keyword arguments have no cipher list; leave it to the server",
    "ssl_mode": "use ssl=true, ssl_ca=FILE, ssl_verify_cert, ssl_verify_identity "
    "or ssl_disabled instead",
}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
# SQLAlchemy's own URL pattern (sqlalchemy.engine.url._parse_url): the password runs to the
# first "@" and may hold unencoded ":/?#", exactly as Nova reads it.
_URL_RE = re.compile(
    r"""(?P<scheme>[\w+]+)://
    (?:(?P<user>[^:/]*)(?::(?P<password>[^@]*))?@)?
    (?:(?:\[(?P<ipv6>[^/?]+)\]|(?P<host>[^/:?]+))?(?::(?P<port>[^/?]*))?)?
    (?:/(?P<database>[^?]*))?
    (?:\?(?P<query>.*))?""",
    re.X | re.S,
)
_SECRET_KEY_RE = re.compile(r"([?&][^=&]*(?:password|passwd|pwd)[^=&]*=)[^&]*", re.I)


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
    # ssl_verify_cert, ssl_verify_identity, ssl_disabled), passed through as given;
    # "ssl" (a dict) only for ssl=true without any of them: see parse_db_url.
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

    def requires_tls(self) -> bool:
        """Whether the URL asked for TLS.

        PyMySQL 1.1 quietly stays in plain text when the server does not offer TLS, so a
        caller that must not send the password in the clear checks ``Ssl_cipher`` after
        connecting when this is true.
        """
        if self.ssl.get("ssl_disabled"):
            return False
        keys = ("ssl", "ssl_ca", "ssl_cert", "ssl_key", "ssl_verify_cert", "ssl_verify_identity")
        return any(self.ssl.get(k) for k in keys)

    def safe_url(self) -> str:
        """The location as a URL with the password masked, for messages and backups."""
        auth = f"{self.user}:***@" if self.password else (f"{self.user}@" if self.user else "")
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 needs brackets
        where = f"{host}:{self.port}"
        if self.unix_socket:
            where += f" (socket {self.unix_socket})"
        return f"mysql+pymysql://{auth}{where}/{self.database}"

    def __str__(self) -> str:
        return self.safe_url()


def redact_url(url: str) -> str:
    """``url`` with its password (and any password-like query value) replaced by ``***``.

    Meant for garbage too, so it guesses generously: the user info runs to the *last*
    "@" (an unencoded "@" in a password still gets masked), and without any "@" a
    non-numeric "port" is taken for a password whose "@host" part is missing.
    """
    if not isinstance(url, str):
        return "<not a URL>"
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    at = rest.rfind("@")
    if at >= 0:
        user, colon, _ = rest[:at].partition(":")
        rest = f"{user}:***{rest[at:]}" if colon else rest
    else:
        m = re.match(r"(\[[^\]]*\]|[^:/?\[]*):(?![0-9]*(?:[/?]|$))", rest)
        rest = f"{m.group(0)}***" if m else rest
    rest = _SECRET_KEY_RE.sub(r"\1***", rest)
    return f"{scheme}{sep}{rest}"


def parse_db_url(url: str, *, source: str = "database URL") -> DbParams:
    """Turn an SQLAlchemy/oslo.db MySQL URL into DbParams; ConfigError if it is unusable.

    ``source`` names where the URL came from and starts every message.
    """

    def fail(problem: str) -> NoReturn:
        raise ConfigError(f"{source}: {problem}: {redact_url(url)}")

    url = url.strip() if isinstance(url, str) else ""
    if not url:
        raise ConfigError(f"{source}: empty database URL")
    scheme, sep, _ = url.partition("://")
    if not sep:
        fail("not a database URL (expected mysql+pymysql://USER:PASSWORD@HOST/nova_api)")
    if scheme.lower() not in SCHEMES:
        shown = f" {scheme!r}" if re.fullmatch(r"[A-Za-z][\w+.-]{0,30}", scheme) else ""
        fail(f"unsupported URL scheme{shown}; use one of {', '.join(sorted(SCHEMES))}")
    if url.count("@") > 1:  # SQLAlchemy would cut the password at the first "@"
        fail("more than one '@'; write '@' in the user name or password as %40")
    m = _URL_RE.fullmatch(url)
    if not m:
        fail("cannot parse the URL")
    port_text = m["port"] or ""
    if port_text and not (re.fullmatch(r"[0-9]{1,5}", port_text) and 0 < int(port_text) < 65536):
        fail("the port must be a number from 1 to 65535")  # never echoed: may be a password
    host = m["host"] or "localhost"
    if m["ipv6"] is not None:
        host = m["ipv6"]
        if not _is_ipv6(host):
            fail(f"{host!r} in brackets is not an IPv6 address")
    database = m["database"] or ""
    if not database:
        fail("a database name is needed after the host, e.g. /nova_api")
    if "/" in database:
        fail(f"{database!r} is not a database name")
    query = _query(m["query"] or "", fail)
    charset = query.pop("charset", "utf8mb4").lower()
    if charset not in CHARSETS:
        fail(f"charset must be one of {', '.join(CHARSETS)}, not {charset!r}")
    unix_socket = query.pop("unix_socket", None)
    if unix_socket is not None and not unix_socket.startswith("/"):
        fail("unix_socket must be an absolute path")
    return DbParams(
        database=database,
        host=host,
        port=int(port_text or 3306),
        user=unquote(m["user"] or ""),
        password=unquote(m["password"] or ""),
        unix_socket=unix_socket,
        charset=charset,
        ssl=ssl_kwargs(query, fail),
    )


def _is_ipv6(text: str) -> bool:
    """Whether ``text`` is an IPv6 address (checked outside ``except``: see module doc)."""
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _query(text: str, fail: Callable[[str], NoReturn]) -> dict[str, str]:
    """The query string as a dict, with ignored parameters dropped and bad ones refused."""
    known = {"charset", "unix_socket", "ssl", "ssl_ca", "ssl_cert", "ssl_key", "ssl_disabled",
             "ssl_verify_cert", "ssl_verify_identity", "ssl_check_hostname"}
    out: dict[str, str] = {}
    for key, value in parse_qsl(text, keep_blank_values=True):
        if key in IGNORED_PARAMS:
            continue
        if key in REFUSED_PARAMS:
            fail(f"parameter {key!r} is not supported ({REFUSED_PARAMS[key]})")
        if key not in known:
            fail(f"unknown parameter {key!r}")
        if key in out:
            fail(f"parameter {key!r} is given more than once")
        if not value:
            fail(f"parameter {key!r} has no value")
        out[key] = value
    if "ssl_check_hostname" in out:  # SQLAlchemy's name for PyMySQL's ssl_verify_identity
        if "ssl_verify_identity" in out:
            fail("give only one of ssl_check_hostname and ssl_verify_identity")
        out["ssl_verify_identity"] = out.pop("ssl_check_hostname")
    return out


def ssl_kwargs(query: dict[str, str], fail: Callable[[str], NoReturn]) -> dict[str, Any]:
    """PyMySQL's TLS keyword arguments for the ssl query parameters.

    Two PyMySQL 1.1 habits are evened out so the URL means what Nova (SQLAlchemy) makes
    of it: ``ssl_ca`` alone would encrypt without checking the certificate, so a CA turns
    on ``ssl_verify_cert`` and ``ssl_verify_identity`` unless the URL says otherwise; and
    ``ssl_verify_identity`` without a CA would be dropped silently, so it is refused.
    """

    def flag(key: str) -> bool | None:
        if key not in query:
            return None
        value = _BOOLS.get(query[key].lower())
        if value is None:
            fail(f"{key} must be true or false (or 1/0, yes/no), not {query[key]!r}")
        return value

    ca, cert, key = query.get("ssl_ca"), query.get("ssl_cert"), query.get("ssl_key")
    verify, identity = flag("ssl_verify_cert"), flag("ssl_verify_identity")
    disabled, use_ssl = flag("ssl_disabled"), flag("ssl")
    if use_ssl is False:  # ssl=false reads as "no TLS", like mysql --ssl=0
        if disabled is False:
            fail("ssl=false contradicts ssl_disabled=false")
        disabled = True
    asked = [k for k, v in (("ssl", use_ssl), ("ssl_ca", ca), ("ssl_cert", cert),
                            ("ssl_key", key), ("ssl_verify_cert", verify),
                            ("ssl_verify_identity", identity)) if v]
    if disabled:
        if asked:
            fail(f"TLS is disabled but {', '.join(asked)} asks for it")
        return {"ssl_disabled": True}
    if key and not cert:
        fail("ssl_key needs ssl_cert (PyMySQL would ignore the key alone)")
    if ca:
        verify = True if verify is None else verify
        identity = verify if identity is None else identity
    if identity and not ca:
        fail("ssl_verify_identity needs ssl_ca (PyMySQL checks the host name only "
             "against a CA file)")
    if identity and verify is False:
        fail("ssl_verify_identity=true contradicts ssl_verify_cert=false")
    out: dict[str, Any] = {k: v for k, v in (("ssl_ca", ca), ("ssl_cert", cert),
                                             ("ssl_key", key), ("ssl_verify_cert", verify),
                                             ("ssl_verify_identity", identity),
                                             ("ssl_disabled", disabled)) if v is not None}
    if use_ssl and not (ca or cert or key or verify):
        # No ssl_* argument that turns TLS on: hand PyMySQL an explicit context spec
        # (encrypt, no certificate check, as MySQL's --ssl-mode=REQUIRED).
        out["ssl"] = {"check_hostname": False, "verify_mode": False}
    return out


def format_cell_db_url(
    template: str, default_url: str | None, *, source: str = "cell database_connection"
) -> str:
    """A cell's ``database_connection`` filled from ``[database] connection`` as Nova fills it.

    Read from nova/objects/cell_mapping.py (``CellMapping.format_db_url``, ``_format_url``,
    ``_parse_netloc``) at openstack/nova master 00a030403f67, i.e. Nova 34 before its
    release. Nova runs ``template.format(**subs)`` on *every* database_connection, template
    or not, with ``subs`` from ``urllib.parse.urlparse(default_url)``:

    - username, password, hostname, port are urlparse's attributes: ``None`` for a part
      the URL lacks, which str.format writes as the text ``None`` (``root@host`` gives the
      password ``None``, ``root:@host`` an empty one); not percent-decoded, so an encoded
      password is copied still encoded; hostname lower-cased and without IPv6 brackets
      (a template needs ``[{hostname}]``); port an int;
    - scheme; path without its leading "/"; query and fragment without "?" and "#";
    - a netloc with "," (oslo.messaging's host list) also gives indexed variables, split
      with oslo.utils' ``netutils.parse_host_port`` since Nova 34: a port that is no
      number there (an unencoded "," in a password) makes the whole fill fail.

    So a URL without braces comes back as it is, and "{{" and "}}" become "{" and "}".
    Where Nova fails (an unknown variable, a lone brace, a default URL urlparse cannot
    read) it logs "Failed to parse [database]/connection to format cell mapping" and uses
    the text unfilled, which for a template names no real server: ConfigError here
    instead, unless the text has no "{" (no template, so Nova's fallback is the right
    URL). Without a default URL Nova uses the text as it is too (and logs an error for a
    template). Messages show both URLs only through :func:`redact_url`.
    """
    if default_url is None:
        if "{" in template:
            raise ConfigError(
                f"{source}: a template, but [database] connection is not set: "
                f"{redact_url(template)}"
            )
        return template
    subs = _nova_url_subs(default_url)
    if subs is None:
        problem = (
            "cannot fill the template: Nova cannot parse [database] connection "
            f"{redact_url(default_url)} (its port must be a number, an IPv6 address needs "
            "[brackets], and a ',' in a password must be written %2C)"
        )
    else:
        try:
            return template.format(**subs)
        except KeyError as e:
            problem = _unknown_variable(str(e.args[0]), template, subs)
        except IndexError:
            problem = "a positional field such as {} or {0}; Nova fills named variables only"
        except (AttributeError, TypeError, ValueError):
            problem = (
                "a malformed template: a lone '{' or '}' (write a literal one as '{{' or "
                "'}}'), or a format Nova cannot apply to a variable"
            )
    if "{" not in template:
        return template  # no template: Nova's fallback, the text as it is, is the URL
    raise ConfigError(f"{source}: {problem}: {redact_url(template)}")


def cell_db_params(
    template: str, default_url: str | None, *, source: str = "cell database_connection"
) -> DbParams:
    """DbParams of a cell: its database_connection filled as Nova fills it, then parsed.

    The filled URL is checked like any other (:func:`parse_db_url`). A part the default
    URL lacks arrives as the text ``None``, as in Nova: a password ``None`` is kept (Nova
    logs in with it too, and is refused), a port ``None`` is refused as no number.
    """
    url = format_cell_db_url(template, default_url, source=source)
    where = source if url == template else f"{source} filled from [database] connection"
    return parse_db_url(url, source=where)


def _nova_url_subs(default_url: str) -> dict[str, Any] | None:
    """The variables of Nova's ``CellMapping._format_url``; None where its parsing raises."""
    try:
        url = urlparse(default_url)
        subs: dict[str, Any] = {
            "username": url.username,
            "password": url.password,
            "hostname": url.hostname,
            "port": url.port,  # ValueError when not a number from 0 to 65535
            "scheme": url.scheme,
            "query": url.query,
            "fragment": url.fragment,
            "path": url.path.lstrip("/"),
        }
        if "," in url.netloc:
            for index, netloc in enumerate(url.netloc.split(","), start=1):
                for key, value in _nova_parse_netloc(netloc).items():
                    subs[f"{key}{index}"] = value
    except ValueError:  # the text may quote the port, which may be a password: dropped
        return None
    return subs


def _nova_parse_netloc(netloc: str) -> dict[str, Any]:
    """Nova's ``cell_mapping._parse_netloc`` with oslo.utils' ``netutils.parse_host_port``."""
    userpass, hostport = netloc.split("@", 1) if "@" in netloc else ("", netloc)
    host: str | None = None
    port: int | None = None
    if hostport and hostport[0] == "[":
        host, after = hostport[1:].split("]")  # ValueError unless exactly one "]"
        port = int(after.split(":")[1]) if ":" in after else None
    elif hostport.count(":") == 1:
        host, port_text = hostport.split(":")
        port = int(port_text)
    elif hostport:
        host = hostport  # no port, or an IPv6 address without brackets
    user, password = userpass.split(":", 1) if ":" in userpass else (userpass, None)
    return {"username": user, "password": password, "hostname": host, "port": port}


def _unknown_variable(name: str, template: str, subs: Mapping[str, Any]) -> str:
    """The message for ``{name}``; the name is left out when it sits in the masked password."""
    shown = redact_url(template)
    field_ = f"{{{name}}}" if re.fullmatch(r"\w{1,40}", name) and f"{{{name}" in shown else ""
    known = ", ".join(f"{{{k}}}" for k in subs)
    return f"unknown variable {field_ or 'in the masked part'}; Nova fills only {known}"


def read_nova_conf(path: str) -> DbParams:
    """DbParams from ``[api_database] connection`` of the nova.conf at ``path``."""
    where = f"{path} [api_database] connection"
    cp = _read_nova_conf(path)
    if not cp.has_section("api_database"):
        hint = " ([database] connection is the cell database, not nova_api)"
        hint = hint if cp.has_section("database") else ""
        raise ConfigError(f"nova.conf {path}: no [api_database] section{hint}")
    if not cp.has_option("api_database", "connection"):
        raise ConfigError(f"nova.conf {path}: [api_database] has no connection option")
    value = _option_value(cp.get("api_database", "connection"))
    if not value:
        raise ConfigError(f"nova.conf {path}: [api_database] connection is empty")
    return parse_db_url(value, source=where)


def read_nova_conf_cell_url(path: str) -> str | None:
    """``[database] connection`` of the nova.conf at ``path`` (None if unset): what Nova fills
    a cell's ``database_connection`` template from (``format_cell_db_url``)."""
    cp = _read_nova_conf(path)
    if not cp.has_option("database", "connection"):
        return None
    return _option_value(cp.get("database", "connection")) or None


def _read_nova_conf(path: str) -> configparser.ConfigParser:
    """The nova.conf at ``path``, parsed as oslo.config reads it, or ConfigError saying why not."""
    problem = text = None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        problem = "not found"
    except PermissionError:
        problem = "permission denied (run as a user that can read it, e.g. root or nova)"
    except IsADirectoryError:
        problem = "is a directory, not a nova.conf file"
    except UnicodeDecodeError:
        problem = "is not UTF-8 text"
    except OSError as e:
        problem = f"cannot be read ({e.strerror or type(e).__name__})"
    if problem:
        raise ConfigError(f"nova.conf {path}: {problem}")
    # "[DEFAULT]" is an ordinary group in oslo.config, not defaults for [api_database].
    cp = configparser.ConfigParser(interpolation=None, strict=False, default_section="\0none")
    try:
        cp.read_string(text or "", source=path)
    except configparser.MissingSectionHeaderError as e:
        problem = f"line {e.lineno} comes before any [section]"
    except configparser.ParsingError as e:
        problem = f"cannot parse line {', '.join(str(n) for n, _ in e.errors)}"
    except configparser.Error as e:  # the message may quote a line: name the kind only
        problem = f"cannot parse ({type(e).__name__})"
    if problem:
        raise ConfigError(f"nova.conf {path}: {problem}")
    return cp


def _option_value(raw: str) -> str:
    value = raw.strip()
    if len(value) > 1 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]  # oslo.config drops one pair of surrounding quotes
    return value


def resolve_db_params(
    db_url: str | None, nova_conf: str | None, environ: Mapping[str, str]
) -> tuple[DbParams, str]:
    """The database to use and where that came from, for the log and the backup.

    Precedence: --db-url, --nova-conf, $NOVA_API_DB_URL, then DEFAULT_NOVA_CONF.
    """
    if db_url is not None and nova_conf is not None:
        raise UsageError("use one of --db-url and --nova-conf, not both")
    if db_url is not None:
        return parse_db_url(db_url, source="--db-url"), "--db-url"
    if nova_conf is not None:
        return read_nova_conf(nova_conf), f"{nova_conf} [api_database] connection"
    env_url = environ.get(ENV_VAR, "").strip()
    if env_url:
        return parse_db_url(env_url, source=ENV_VAR), ENV_VAR
    default = DEFAULT_NOVA_CONF  # read at call time so tests can point it elsewhere
    try:
        with open(default, "rb"):
            pass
    except FileNotFoundError:
        raise ConfigError(
            f"no database given and {default} does not exist: pass --db-url URL or "
            f"--nova-conf PATH, or set {ENV_VAR}"
        ) from None
    except OSError:
        pass  # read_nova_conf reports it in its own words
    return read_nova_conf(default), f"{default} [api_database] connection"
