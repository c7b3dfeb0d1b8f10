"""airflow_conn: an Airflow MySQL Connection (duck-typed) -> DbParams."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nova_flavor_sync.airflow_conn import params_from_connection
from nova_flavor_sync.errors import ConfigError

SECRET = "p@ss:w/rd-never-shown"


def connection(extra=None, **fields):
    values = dict(conn_id="nova_api_db", host="db.example", port=3307, login="nova",
                  password=SECRET, schema="nova_api", extra_dejson=extra or {})
    values.update(fields)
    return SimpleNamespace(**values)


def test_the_fields_become_db_params():
    params = params_from_connection(connection({"charset": "utf8", "unix_socket": "/run/mysqld.sock"}))
    assert (params.host, params.port, params.user, params.database) == ("db.example", 3307, "nova", "nova_api")
    assert (params.charset, params.unix_socket, params.ssl) == ("utf8", "/run/mysqld.sock", {})
    assert params.password == SECRET and SECRET not in repr(params) and SECRET not in str(params)


def test_defaults_for_an_empty_host_and_port():
    params = params_from_connection(connection(host=None, port=None, login=None, password=None))
    assert (params.host, params.port, params.user, params.password) == ("localhost", 3306, "", "")


@pytest.mark.parametrize(
    ("extra", "ssl"),
    [
        ({"ssl": {"ca": "/ca.pem"}}, {"ssl_ca": "/ca.pem", "ssl_verify_cert": True, "ssl_verify_identity": True}),
        ({"ssl": '{"ca": "/ca.pem", "check_hostname": false}'},
         {"ssl_ca": "/ca.pem", "ssl_verify_cert": True, "ssl_verify_identity": False}),
        ({"ssl": {"ca": "/ca.pem", "cert": "/c.pem", "key": "/k.pem"}},
         {"ssl_ca": "/ca.pem", "ssl_cert": "/c.pem", "ssl_key": "/k.pem", "ssl_verify_cert": True,
          "ssl_verify_identity": True}),
        ({"ssl_mode": "REQUIRED"}, {"ssl": {"check_hostname": False, "verify_mode": False}}),
        ({"ssl_mode": "disabled"}, {"ssl_disabled": True}),
        ({"ssl_mode": "PREFERRED"}, {}),
    ],
    ids=["ca-dict", "ca-json-no-hostname", "client-cert", "required", "disabled", "preferred"],
)
def test_tls_extras_are_honoured(extra, ssl):
    params = params_from_connection(connection(extra))
    assert params.ssl == ssl
    assert params.requires_tls() == (bool(ssl) and not ssl.get("ssl_disabled"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(schema=""), "its schema .* is empty"),
        (dict(extra_dejson={"charset": "latin1"}), "extra charset must be one of"),
        (dict(extra_dejson={"ssl": "not json"}), "extra ssl must be a JSON object"),
        (dict(extra_dejson={"ssl": 5}), "extra ssl must be a JSON object"),
        (dict(extra_dejson={"ssl_mode": "SOMETIMES"}), "extra ssl_mode must be one of"),
        (dict(extra_dejson={"ssl_mode": "DISABLED", "ssl": {"ca": "/ca.pem"}}), "TLS is disabled but"),
        (dict(extra_dejson={"unix_socket": "relative.sock"}), "extra unix_socket must be an absolute path"),
    ],
    ids=["no-schema", "bad-charset", "ssl-not-json", "ssl-number", "bad-ssl-mode", "disabled-but-ca",
         "relative-socket"],
)
def test_unusable_connections_are_refused_without_the_password(fields, message):
    with pytest.raises(ConfigError, match=f"Airflow connection 'nova_api_db': {message}") as caught:
        params_from_connection(connection(**fields))
    assert SECRET not in str(caught.value)
