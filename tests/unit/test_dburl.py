"""Where the database is: URL parsing, nova.conf reading, precedence, and no password leaks."""

from __future__ import annotations

import os
import ssl
import traceback
from urllib.parse import quote

import pytest

from nova_flavor_sync import dburl
from nova_flavor_sync.dburl import (
    DbParams,
    parse_db_url,
    read_nova_conf,
    redact_url,
    resolve_db_params,
)
from nova_flavor_sync.errors import ConfigError, ExitCode, UsageError

SECRET = "pwS3CR3Tzq"  # distinctive, so any leak shows up in a substring check
# Every character that needs percent-encoding in a password, written encoded.
HARD_SECRET = "p@ss:w/rd%#?S3CR3T"
HARD_ENCODED = quote(HARD_SECRET, safe="")
URL = f"mysql+pymysql://nova:{SECRET}@db.example:3306/nova_api"


def leaked_texts(exc: BaseException) -> str:
    """Everything a log or traceback could show of ``exc`` and its whole chain."""
    texts, todo, seen = [], [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        texts += [str(e), repr(e), *map(str, e.args)]
        texts += traceback.format_exception(e)
        todo += [e.__cause__, e.__context__]
    return "\n".join(texts)


def assert_no_secret(exc: BaseException, *secrets: str) -> None:
    text = leaked_texts(exc)
    for secret in secrets or (SECRET,):
        assert secret not in text


def test_leak_check_walks_suppressed_context() -> None:
    """``raise ... from None`` still keeps ``__context__``: the check must look there too."""
    try:
        try:
            int(SECRET)
        except ValueError:
            raise ConfigError("clean message") from None
    except ConfigError as e:
        with pytest.raises(AssertionError):
            assert_no_secret(e)


# --- good URLs ---------------------------------------------------------------------------

GOOD = [
    ("mysql+pymysql://nova:pw@db:3307/nova_api",
     DbParams("nova_api", "db", 3307, "nova", "pw")),
    ("mysql://nova:pw@db/nova_api", DbParams("nova_api", "db", 3306, "nova", "pw")),
    ("mysql+mysqldb://nova:pw@db/nova_api", DbParams("nova_api", "db", 3306, "nova", "pw")),
    ("mariadb://nova:pw@db/nova_api", DbParams("nova_api", "db", 3306, "nova", "pw")),
    ("mariadb+pymysql://nova:pw@db/nova_api", DbParams("nova_api", "db", 3306, "nova", "pw")),
    ("mariadb+mysqldb://nova:pw@db/nova_api", DbParams("nova_api", "db", 3306, "nova", "pw")),
    ("MySQL+PyMySQL://nova:pw@db/nova_api", DbParams("nova_api", "db", 3306, "nova", "pw")),
    ("mysql+pymysql://nova@db/nova_api", DbParams("nova_api", "db", 3306, "nova", "")),
    ("mysql+pymysql:///nova_api", DbParams("nova_api", "localhost", 3306, "", "")),
    ("mysql+pymysql://nova:pw@db:/nova_api", DbParams("nova_api", "db", 3306, "nova", "pw")),
    ("mysql+pymysql://nova:pw@db:1/nova_api", DbParams("nova_api", "db", 1, "nova", "pw")),
    ("mysql+pymysql://nova:pw@db:65535/nova_api",
     DbParams("nova_api", "db", 65535, "nova", "pw")),
    (f"mysql+pymysql://nova:{HARD_ENCODED}@db/nova_api",
     DbParams("nova_api", "db", 3306, "nova", HARD_SECRET)),
    ("mysql+pymysql://n%40va%3Ax:pw@db/nova_api",
     DbParams("nova_api", "db", 3306, "n@va:x", "pw")),
    # SQLAlchemy (so Nova) reads the password up to the first "@": these work unencoded.
    ("mysql+pymysql://nova:pa/ss?x#y:z@db/nova_api",
     DbParams("nova_api", "db", 3306, "nova", "pa/ss?x#y:z")),
    ("mysql+pymysql://nova:pw@[::1]:3307/nova_api",
     DbParams("nova_api", "::1", 3307, "nova", "pw")),
    ("mysql+pymysql://nova:pw@[fd00:1::5]/nova_api",
     DbParams("nova_api", "fd00:1::5", 3306, "nova", "pw")),
    ("mysql+pymysql://nova:pw@/nova_api?unix_socket=/run/mysqld/mysqld.sock",
     DbParams("nova_api", "localhost", 3306, "nova", "pw", "/run/mysqld/mysqld.sock")),
    ("mysql+pymysql://nova:pw@db/nova_api?charset=utf8",
     DbParams("nova_api", "db", 3306, "nova", "pw", charset="utf8")),
    ("mysql+pymysql://nova:pw@db/nova_api?charset=UTF8MB3",
     DbParams("nova_api", "db", 3306, "nova", "pw", charset="utf8mb3")),
    ("mysql+pymysql://nova:pw@db/nova_api?charset=utf8mb4",
     DbParams("nova_api", "db", 3306, "nova", "pw")),
    # devstack's plugin=dbcounter and driver timeouts are dropped: harmless for us.
    ("mysql+pymysql://nova:pw@db/nova_api?charset=utf8&plugin=dbcounter&connect_timeout=5"
     "&read_timeout=30&write_timeout=30&use_unicode=0",
     DbParams("nova_api", "db", 3306, "nova", "pw", charset="utf8")),
    ("  mysql+pymysql://nova:pw@db/nova_api\n", DbParams("nova_api", "db", 3306, "nova", "pw")),
]


@pytest.mark.parametrize(
    ("url", "expected"), GOOD,
    ids=["pymysql-port", "mysql", "mysqldb", "mariadb", "mariadb-pymysql", "mariadb-mysqldb",
         "scheme-case", "no-password", "all-defaults", "empty-port", "port-1", "port-65535",
         "percent-encoded-password", "percent-encoded-user", "unencoded-password-like-nova",
         "ipv6-port", "ipv6", "unix-socket", "charset-utf8", "charset-utf8mb3",
         "charset-utf8mb4", "ignored-params", "surrounding-whitespace"],
)
def test_good_url(url: str, expected: DbParams) -> None:
    assert parse_db_url(url) == expected  # dataclass equality: every field, password too


def test_connect_kwargs_from_url() -> None:
    params = parse_db_url(f"mysql+pymysql://nova:{HARD_ENCODED}@db:3307/nova_api"
                          "?unix_socket=/run/m.sock&charset=utf8")
    assert params.connect_kwargs() == {
        "host": "db", "port": 3307, "user": "nova", "password": HARD_SECRET,
        "database": "nova_api", "charset": "utf8", "unix_socket": "/run/m.sock"}


# --- TLS ---------------------------------------------------------------------------------

TLS = [
    ("", {}, False),
    ("ssl_ca=/ca.pem",
     {"ssl_ca": "/ca.pem", "ssl_verify_cert": True, "ssl_verify_identity": True}, True),
    ("ssl_ca=/ca.pem&ssl_verify_identity=false",
     {"ssl_ca": "/ca.pem", "ssl_verify_cert": True, "ssl_verify_identity": False}, True),
    ("ssl_ca=/ca.pem&ssl_check_hostname=no",
     {"ssl_ca": "/ca.pem", "ssl_verify_cert": True, "ssl_verify_identity": False}, True),
    ("ssl_ca=/ca.pem&ssl_verify_cert=0",
     {"ssl_ca": "/ca.pem", "ssl_verify_cert": False, "ssl_verify_identity": False}, True),
    ("ssl_ca=/ca.pem&ssl_verify_cert=yes&ssl_verify_identity=1",
     {"ssl_ca": "/ca.pem", "ssl_verify_cert": True, "ssl_verify_identity": True}, True),
    ("ssl_cert=/c.pem&ssl_key=/k.pem", {"ssl_cert": "/c.pem", "ssl_key": "/k.pem"}, True),
    ("ssl_cert=/c.pem", {"ssl_cert": "/c.pem"}, True),
    ("ssl_verify_cert=TRUE", {"ssl_verify_cert": True}, True),
    ("ssl_verify_cert=false", {"ssl_verify_cert": False}, False),
    ("ssl=true", {"ssl": {"check_hostname": False, "verify_mode": False}}, True),
    ("ssl=1&ssl_ca=/ca.pem",
     {"ssl_ca": "/ca.pem", "ssl_verify_cert": True, "ssl_verify_identity": True}, True),
    ("ssl=yes&ssl_verify_cert=false",
     {"ssl_verify_cert": False, "ssl": {"check_hostname": False, "verify_mode": False}}, True),
    ("ssl_disabled=true", {"ssl_disabled": True}, False),
    ("ssl_disabled=false", {"ssl_disabled": False}, False),
    ("ssl=false", {"ssl_disabled": True}, False),
    ("ssl=no&ssl_disabled=yes", {"ssl_disabled": True}, False),
]


@pytest.mark.parametrize(
    ("query", "expected", "tls"), TLS,
    ids=["none", "ca-verifies-like-nova", "ca-no-hostname", "sqlalchemy-check-hostname",
         "ca-no-verify", "ca-explicit", "client-cert", "cert-with-key-inside",
         "verify-system-cas", "verify-off-only", "ssl-true", "ssl-true-with-ca",
         "ssl-true-no-verify", "disabled", "disabled-false", "ssl-false", "ssl-false-disabled"],
)
def test_tls_params_reach_connect_kwargs(query: str, expected: dict, tls: bool) -> None:
    params = parse_db_url(f"{URL}?{query}")
    assert params.ssl == expected
    kwargs = params.connect_kwargs()
    assert {k: kwargs[k] for k in expected} == expected
    assert params.requires_tls() is tls


CA_BUNDLE = ssl.get_default_verify_paths().cafile


@pytest.mark.skipif(not CA_BUNDLE or not os.path.isfile(CA_BUNDLE), reason="no CA bundle")
@pytest.mark.parametrize(
    ("query", "verify_mode", "check_hostname"),
    [("ssl=true", ssl.CERT_NONE, False),
     ("ssl_ca={ca}", ssl.CERT_REQUIRED, True),
     ("ssl_ca={ca}&ssl_verify_identity=false", ssl.CERT_REQUIRED, False),
     ("ssl_ca={ca}&ssl_verify_cert=false", ssl.CERT_NONE, False),
     ("ssl_verify_cert=true", ssl.CERT_REQUIRED, False)],
    ids=["ssl-true-encrypts", "ca-verifies-all", "ca-no-hostname", "ca-no-verify",
         "system-cas"],
)
def test_pymysql_builds_the_tls_context_we_mean(query, verify_mode, check_hostname) -> None:
    """What PyMySQL itself makes of DbParams.ssl (needs PyMySQL; no server contacted)."""
    pymysql = pytest.importorskip("pymysql")
    params = parse_db_url(f"{URL}?{query.format(ca=CA_BUNDLE)}")
    conn = pymysql.connections.Connection(defer_connect=True, **params.connect_kwargs())
    assert conn.ssl is True
    assert (conn.ctx.verify_mode, conn.ctx.check_hostname) == (verify_mode, check_hostname)


# --- bad URLs ----------------------------------------------------------------------------

BAD = [
    ("", "empty database URL"),
    ("   ", "empty database URL"),
    (f"nova:{SECRET}@db/nova_api", "not a database URL"),
    ("::::", "not a database URL"),
    ("sqlite:///nova_api.db", "unsupported URL scheme 'sqlite'"),
    (f"postgresql://nova:{SECRET}@db/nova_api", "unsupported URL scheme 'postgresql'"),
    (f"mysql+mariadbconnector://nova:{SECRET}@db/nova_api", "unsupported URL scheme"),
    (f"mysql+pymysql://nova:{SECRET}@db", r"a database name is needed .*/nova_api"),
    (f"mysql+pymysql://nova:{SECRET}@db/", r"a database name is needed .*/nova_api"),
    (f"mysql+pymysql://nova:{SECRET}@db/?charset=utf8", "a database name is needed"),
    (f"mysql+pymysql://nova:{SECRET}@db/nova_api/x", "'nova_api/x' is not a database name"),
    (f"mysql+pymysql://nova:{SECRET}@db:0/nova_api", "port must be a number from 1 to 65535"),
    (f"mysql+pymysql://nova:{SECRET}@db:65536/nova_api", "port must be a number"),
    (f"mysql+pymysql://nova:{SECRET}@db:-1/nova_api", "port must be a number"),
    (f"mysql+pymysql://nova:{SECRET}@db:33o6/nova_api", "port must be a number"),
    (f"mysql+pymysql://nova:{SECRET}", "port must be a number"),  # "@host" forgotten
    (f"mysql+pymysql://nova:{SECRET}/nova_api", "port must be a number"),
    (f"mysql+pymysql://nova:{SECRET}@[zz::1]/nova_api", "'zz::1' in brackets is not an IPv6"),
    (f"mysql+pymysql://nova:{SECRET[:5]}@{SECRET[5:]}@db/nova_api", "more than one '@'"),
    (f"mysql+pymysql://nova:{SECRET[:5]}@{SECRET[5:]}?x=1@db/nova_api", "more than one '@'"),
    (f"{URL}?foo=1", "unknown parameter 'foo'"),
    (f"{URL}?password={SECRET}", "unknown parameter 'password'"),
    (f"{URL}?charset=utf8&charset=utf8mb4", "'charset' is given more than once"),
    (f"{URL}?charset=", "'charset' has no value"),
    (f"{URL}?ssl_ca", "'ssl_ca' has no value"),
    (f"{URL}?charset=latin1", "charset must be one of utf8mb4, utf8mb3, utf8, not 'latin1'"),
    (f"{URL}?unix_socket=run/mysqld.sock", "unix_socket must be an absolute path"),
    (f"{URL}?ssl_verify_cert=maybe", "ssl_verify_cert must be true or false"),
    (f"{URL}?ssl=on", "ssl must be true or false"),
    (f"{URL}?ssl_disabled=true&ssl_ca=/ca.pem", "TLS is disabled but ssl_ca asks for it"),
    (f"{URL}?ssl=false&ssl_verify_cert=true", "TLS is disabled but ssl_verify_cert"),
    (f"{URL}?ssl=true&ssl_disabled=true", "TLS is disabled but ssl asks for it"),
    (f"{URL}?ssl=false&ssl_disabled=false", "ssl=false contradicts ssl_disabled=false"),
    (f"{URL}?ssl_key=/k.pem", "ssl_key needs ssl_cert"),
    (f"{URL}?ssl_verify_identity=true", "ssl_verify_identity needs ssl_ca"),
    (f"{URL}?ssl_ca=/ca.pem&ssl_verify_cert=false&ssl_verify_identity=true",
     "ssl_verify_identity=true contradicts ssl_verify_cert=false"),
    (f"{URL}?ssl_ca=/ca.pem&ssl_check_hostname=1&ssl_verify_identity=1",
     "only one of ssl_check_hostname and ssl_verify_identity"),
    (f"{URL}?ssl_key_password={SECRET}2", "'ssl_key_password' is not supported"),
    (f"{URL}?read_default_file=/etc/my.cnf", "'read_default_file' is not supported"),
    (f"{URL}?read_default_group=client", "'read_default_group' is not supported"),
    (f"{URL}?ssl_capath=/etc/ssl/certs", "'ssl_capath' is not supported .*ssl_ca=FILE"),
    (f"{URL}?ssl_cipher=AES", "'ssl_cipher' is not supported"),
    (f"{URL}?ssl_mode=REQUIRED", "'ssl_mode' is not supported .*ssl=true"),
    (f"{URL}?init_command=SET sql_mode=''", "unknown parameter 'init_command'"),
]


@pytest.mark.parametrize(
    ("url", "message"), BAD,
    ids=["empty", "blank", "no-scheme", "garbage", "sqlite", "postgresql", "other-driver",
         "no-database", "empty-database", "empty-database-query", "database-slash",
         "port-0", "port-65536", "port-negative", "port-typo", "host-forgotten",
         "host-forgotten-db", "bad-ipv6", "unencoded-at", "unencoded-at-query",
         "unknown-param", "password-param", "repeated-param", "empty-charset",
         "valueless-param", "latin1", "relative-socket", "bad-bool", "bad-ssl-bool",
         "disabled-with-ca", "ssl-false-with-verify", "ssl-true-and-disabled",
         "ssl-false-not-disabled", "key-without-cert", "identity-without-ca",
         "identity-without-verify", "both-hostname-names", "key-password",
         "read-default-file", "read-default-group", "capath", "cipher", "ssl-mode",
         "init-command"],
)
def test_bad_url(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_db_url(url)
    assert info.value.exit_code == ExitCode.REFUSED
    assert str(info.value).startswith("database URL: ")
    assert_no_secret(info.value, SECRET, SECRET[:5], SECRET[5:])


@pytest.mark.parametrize(
    "url",
    [f"mysql+pymysql://nova:{HARD_ENCODED}@db/nova_api?foo=1",
     f"mysql+pymysql://nova:{HARD_ENCODED}@db:99999/nova_api",
     f"postgresql://nova:{HARD_ENCODED}@db/nova_api"],
    ids=["unknown-param", "bad-port", "bad-scheme"],
)
def test_encoded_password_not_in_errors(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_db_url(url)
    assert_no_secret(info.value, HARD_SECRET, HARD_ENCODED)
    assert "nova:***@db" in str(info.value)  # the redacted URL is shown


# --- redact_url and DbParams text --------------------------------------------------------

@pytest.mark.parametrize(
    ("url", "expected"),
    [(URL, "mysql+pymysql://nova:***@db.example:3306/nova_api"),
     ("mysql://nova@db/nova_api", "mysql://nova@db/nova_api"),
     ("mysql://db:3306/nova_api", "mysql://db:3306/nova_api"),
     ("mysql://[::1]:3306/nova_api", "mysql://[::1]:3306/nova_api"),
     ("mysql://nova:p@ss@db/x", "mysql://nova:***@db/x"),
     ("mysql://nova:pa/ss?x@db/x", "mysql://nova:***@db/x"),
     ("mysql://nova:secret", "mysql://nova:***"),
     ("mysql://nova:secret/nova_api?x=1", "mysql://nova:***"),
     ("nova:secret@db/x", "nova:***@db/x"),
     ("mysql://db/x?ssl_key_password=k&a=b", "mysql://db/x?ssl_key_password=***&a=b"),
     ("", ""), ("@", "@"), ("://", "://"), (":@:", ":***@:"), ("[", "["), ("mysql://[", "mysql://["),
     ("\x00", "\x00")],
    ids=["password", "user-only", "no-user", "ipv6", "unencoded-at", "unencoded-slash",
         "host-forgotten", "host-forgotten-db", "no-scheme", "password-query", "empty",
         "at", "sep", "colon-at", "bracket", "open-bracket", "nul"],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_dbparams_text_hides_password() -> None:
    params = parse_db_url(f"mysql+pymysql://nova:{HARD_ENCODED}@[::1]/nova_api?ssl=true")
    assert HARD_SECRET not in repr(params) and HARD_SECRET not in str(params)
    assert HARD_ENCODED not in repr(params) and HARD_ENCODED not in str(params)
    assert str(params) == "mysql+pymysql://nova:***@[::1]:3306/nova_api"
    assert "password" not in repr(params)


# --- nova.conf ---------------------------------------------------------------------------

def write_conf(tmp_path, text: str, name: str = "nova.conf") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


NOVA_CONF = f"""\
[DEFAULT]
# oslo.config has no DEFAULT fallback for [api_database]
connection = mysql+pymysql://wrong:x@elsewhere/nova
transport_url = rabbit://nova:rabbitpw@mq:5672/

[database]
connection = mysql+pymysql://nova:cellpw@db/nova

[api_database]
connection = mysql+pymysql://nova:{SECRET}%25#x@db.example:3307/nova_api?charset=utf8
max_pool_size = 5
"""


def test_nova_conf_good(tmp_path) -> None:
    """% is not interpolated and # is not a comment: the value is used verbatim."""
    assert read_nova_conf(write_conf(tmp_path, NOVA_CONF)) == DbParams(
        "nova_api", "db.example", 3307, "nova", f"{SECRET}%#x", charset="utf8")


@pytest.mark.parametrize(
    ("text", "password"),
    [("[api_database]\nconnection = mysql://nova:first@db/nova_api\n"
      "connection = mysql://nova:last@db/nova_api\n", "last"),
     ("[api_database]\nconnection = mysql://nova:first@db/nova_api\n[api_database]\n"
      "connection = mysql://nova:last@db/nova_api\n", "last"),
     ("[api_database]\nconnection = \"mysql://nova:quoted@db/nova_api\"\n", "quoted"),
     ("[api_database]\nconnection='mysql://nova:quoted@db/nova_api'\n", "quoted")],
    ids=["repeated-key-last-wins", "repeated-section-last-wins", "double-quotes-dropped",
         "single-quotes-dropped"],
)
def test_nova_conf_variants(tmp_path, text: str, password: str) -> None:
    assert read_nova_conf(write_conf(tmp_path, text)).password == password


CONF_ERRORS = [
    ("[DEFAULT]\ndebug = true\n", r"no \[api_database\] section$"),
    ("[database]\nconnection = mysql://nova:x@db/nova\n",
     r"no \[api_database\] section \(\[database\] connection is the cell database"),
    ("[DEFAULT]\nconnection = mysql://nova:x@db/nova_api\n[api_database]\nmax_pool_size = 5\n",
     r"\[api_database\] has no connection option"),
    ("[api_database]\nconnection =\n", r"\[api_database\] connection is empty"),
    ("[api_database]\nconnection = \"\"\n", r"\[api_database\] connection is empty"),
    (f"connection = mysql+pymysql://nova:{SECRET}@db/nova_api\n",
     "line 1 comes before any"),
    (f"[api_database]\nconnection = mysql+pymysql://nova:{SECRET}@db/nova_api\n"
     f"{SECRET} garbage\n", "cannot parse line 3"),
    (f"[api_database]\nconnection = sqlite://nova:{SECRET}@db/nova_api\n",
     r"nova.conf \[api_database\] connection: unsupported URL scheme 'sqlite'"),
    (f"[api_database]\nconnection = mysql+pymysql://nova:{SECRET}@db\n",
     r"\[api_database\] connection: a database name is needed"),
]


@pytest.mark.parametrize(
    ("text", "message"), CONF_ERRORS,
    ids=["no-section", "only-cell-database", "no-option-default-ignored", "empty-option",
         "empty-quotes", "no-section-header", "garbage-line", "bad-scheme", "no-database"],
)
def test_nova_conf_errors(tmp_path, text: str, message: str) -> None:
    path = write_conf(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        read_nova_conf(path)
    assert path in str(info.value)
    assert_no_secret(info.value)


def test_nova_conf_missing(tmp_path) -> None:
    path = str(tmp_path / "nope.conf")
    with pytest.raises(ConfigError, match=f"nova.conf {path}: not found") as info:
        read_nova_conf(path)
    assert_no_secret(info.value)


def test_nova_conf_is_directory(tmp_path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        read_nova_conf(str(tmp_path))


def test_nova_conf_unreadable(tmp_path) -> None:
    path = write_conf(tmp_path, f"[api_database]\nconnection = mysql://n:{SECRET}@db/nova_api\n")
    os.chmod(path, 0)
    if os.access(path, os.R_OK):  # root reads it anyway
        pytest.skip("running as a user that can read mode 000 files")
    with pytest.raises(ConfigError, match="permission denied") as info:
        read_nova_conf(path)
    assert_no_secret(info.value)


def test_nova_conf_not_utf8(tmp_path) -> None:
    path = tmp_path / "nova.conf"
    path.write_bytes(b"[api_database]\nconnection = mysql://nova:\xff@db/nova_api\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        read_nova_conf(str(path))


# --- resolve_db_params -------------------------------------------------------------------

@pytest.fixture
def confs(tmp_path, monkeypatch):
    """A --nova-conf file and a default nova.conf, each naming its own database."""
    default = write_conf(tmp_path, "[api_database]\nconnection = mysql://n:p@default/nova_api\n",
                         "default.conf")
    monkeypatch.setattr(dburl, "DEFAULT_NOVA_CONF", default)
    given = write_conf(tmp_path, "[api_database]\nconnection = mysql://n:p@given/nova_api\n")
    return given, default


ENV = {"NOVA_API_DB_URL": "mysql://n:p@env/nova_api"}


@pytest.mark.parametrize(
    ("db_url", "use_conf", "environ", "host", "source"),
    [("mysql://n:p@flag/nova_api", False, ENV, "flag", "--db-url"),
     (None, True, ENV, "given", "{given} [api_database] connection"),
     (None, False, ENV, "env", "NOVA_API_DB_URL"),
     (None, False, {"NOVA_API_DB_URL": "  "}, "default", "{default} [api_database] connection"),
     (None, False, {}, "default", "{default} [api_database] connection")],
    ids=["db-url-beats-env", "nova-conf-beats-env", "env-beats-default", "blank-env-ignored",
         "default-nova-conf"],
)
def test_resolve_precedence(confs, db_url, use_conf, environ, host, source) -> None:
    given, default = confs
    params, where = resolve_db_params(db_url, given if use_conf else None, environ)
    assert (params.host, where) == (host, source.format(given=given, default=default))


def test_resolve_both_flags_is_usage_error(confs) -> None:
    with pytest.raises(UsageError, match="use one of --db-url and --nova-conf") as info:
        resolve_db_params(URL, confs[0], {})
    assert info.value.exit_code == ExitCode.USAGE


def test_resolve_default_missing_says_how(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(dburl, "DEFAULT_NOVA_CONF", str(tmp_path / "nova.conf"))
    with pytest.raises(ConfigError, match="does not exist") as info:
        resolve_db_params(None, None, {})
    for way in ("--db-url", "--nova-conf", "NOVA_API_DB_URL"):
        assert way in str(info.value)


@pytest.mark.parametrize(
    ("db_url", "environ", "prefix"),
    [(f"{URL}?foo=1", {}, "--db-url: "),
     (None, {"NOVA_API_DB_URL": f"{URL}?foo=1"}, "NOVA_API_DB_URL: ")],
    ids=["db-url", "env"],
)
def test_resolve_errors_name_the_source(confs, db_url, environ, prefix) -> None:
    with pytest.raises(ConfigError, match="unknown parameter 'foo'") as info:
        resolve_db_params(db_url, None, environ)
    assert str(info.value).startswith(prefix)
    assert_no_secret(info.value)


def test_resolve_missing_nova_conf_flag(tmp_path) -> None:
    path = str(tmp_path / "missing.conf")
    with pytest.raises(ConfigError, match=f"{path}: not found"):
        resolve_db_params(None, path, ENV)
