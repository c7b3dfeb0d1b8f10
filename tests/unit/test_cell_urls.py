"""A cell's database_connection filled from [database] connection exactly as Nova fills it.

The behaviour was read from openstack/nova master 00a030403f672b975364c855b7d25b40ef83e757
(Nova 34 before its release; no 34.0.0 tag yet), nova/objects/cell_mapping.py:
``CellMapping.format_db_url``, ``_format_url`` and ``_parse_netloc`` (which uses oslo.utils'
``netutils.parse_host_port`` since af7ec325e5, "Use oslo.utils to parse cell URL").
"""

from __future__ import annotations

import traceback
from urllib.parse import quote

import pytest

from nova_flavor_sync.dburl import cell_db_params, format_cell_db_url
from nova_flavor_sync.errors import ConfigError, ExitCode

SECRET = "pwS3CR3Tzq"  # distinctive, so any leak shows up in a substring check
DEMO_TEMPLATE = "{scheme}://{username}:{password}@{hostname}:{port}/nova_cell2?charset=utf8"
DEMO_DEFAULT = "mysql+pymysql://root:@127.0.0.1:3306/nova?charset=utf8"
DEFAULT = f"mysql+pymysql://nova:{SECRET}@db.example:3306/nova?charset=utf8"


def shown(exc: BaseException) -> str:
    """Everything a log or traceback could show of ``exc`` and its chain."""
    texts, todo = [], [exc]
    while todo:
        e = todo.pop()
        if e is not None:
            texts += [str(e), repr(e), *traceback.format_exception(e)]
            todo += [e.__cause__, e.__context__]
    return "\n".join(texts)


@pytest.mark.parametrize(
    "plain",
    [
        "mysql+pymysql://root:@127.0.0.1:3306/nova_cell1?charset=utf8",
        # A lone brace fails Nova's str.format; Nova then uses the text as it is.
        "mysql+pymysql://nova:p}w@db.example/nova_cell1",
    ],
)
def test_a_url_that_is_no_template_is_used_as_it_is(plain: str) -> None:
    assert format_cell_db_url(plain, DEFAULT) == plain
    assert format_cell_db_url(plain, None) == plain  # no [database] connection: Nova too


def test_the_demo_template_is_filled_from_the_default_url() -> None:
    assert format_cell_db_url(DEMO_TEMPLATE, DEMO_DEFAULT) == (
        "mysql+pymysql://root:@127.0.0.1:3306/nova_cell2?charset=utf8"
    )


def test_a_percent_encoded_password_is_copied_still_encoded() -> None:
    hard = "p@ss:w/rd%#?,S3CR3T"
    default = f"mysql+pymysql://nova:{quote(hard, safe='')}@db.example:3306/nova"
    url = format_cell_db_url(DEMO_TEMPLATE, default)
    assert url == (
        f"mysql+pymysql://nova:{quote(hard, safe='')}@db.example:3306/nova_cell2?charset=utf8"
    )
    assert cell_db_params(DEMO_TEMPLATE, default).password == hard


def test_no_colon_before_the_at_fills_the_password_with_the_text_none() -> None:
    # Nova does the same: with `[database] connection = mysql+pymysql://root@host/nova`
    # (no ":"), every service reading this cell logs in as root with the password "None"
    # and is refused. The operator must write `root:@host` for an empty password.
    default = "mysql+pymysql://root@127.0.0.1:3306/nova?charset=utf8"
    assert format_cell_db_url(DEMO_TEMPLATE, default) == (
        "mysql+pymysql://root:None@127.0.0.1:3306/nova_cell2?charset=utf8"
    )
    assert cell_db_params(DEMO_TEMPLATE, default).password == "None"
    assert cell_db_params(DEMO_TEMPLATE, DEMO_DEFAULT).password == ""


def test_path_query_and_fragment_are_filled_without_their_separators() -> None:
    default = "mysql+pymysql://nova:pw@db.example:3306/nova?charset=utf8&ssl=true#frag"
    template = "{scheme}://{username}:{password}@{hostname}/{path}_cell1?{query}#{fragment}"
    assert format_cell_db_url(template, default) == (
        "mysql+pymysql://nova:pw@db.example/nova_cell1?charset=utf8&ssl=true#frag"
    )


def test_a_default_url_without_a_port() -> None:
    default = f"mysql+pymysql://nova:{SECRET}@db.example/nova"
    # {port} becomes the text None, as in Nova, which cannot connect to that either.
    assert format_cell_db_url(DEMO_TEMPLATE, default) == (
        f"mysql+pymysql://nova:{SECRET}@db.example:None/nova_cell2?charset=utf8"
    )
    with pytest.raises(ConfigError) as e:
        cell_db_params(DEMO_TEMPLATE, default)
    assert "port must be a number" in str(e.value) and ":None/" in str(e.value)
    assert SECRET not in shown(e.value)
    # A template without {port} gets MySQL's default port.
    params = cell_db_params("{scheme}://{username}:{password}@{hostname}/nova_cell1", default)
    assert (params.host, params.port, params.database) == ("db.example", 3306, "nova_cell1")


def test_params_of_the_filled_url() -> None:
    params = cell_db_params(DEMO_TEMPLATE, DEFAULT)
    assert (params.host, params.port, params.user, params.password, params.database) == (
        "db.example", 3306, "nova", SECRET, "nova_cell2"
    )
    assert params.charset == "utf8"
    assert SECRET not in repr(params) and SECRET not in str(params)


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{scheme}://{user}:{password}@{hostname}:{port}/nova_cell1", "unknown variable {user}"),
        # The unknown variable sits in the password: not named, as the password is masked.
        ("{scheme}://nova:a{b}c@{hostname}/nova_cell1", "unknown variable in the masked part"),
        ("{scheme}://{username}:{password}@{hostname/nova_cell1", "malformed template"),
        ("{}://{username}:{password}@{hostname}/nova_cell1", "positional field"),
    ],
)
def test_a_template_nova_cannot_fill_is_refused(template: str, problem: str) -> None:
    # Nova logs "Failed to parse [database]/connection to format cell mapping" and would
    # connect with the unfilled text: refused here, without the password in the message.
    with pytest.raises(ConfigError) as e:
        format_cell_db_url(template, DEFAULT, source="cell cell1 database_connection")
    message = str(e.value)
    assert message.startswith("cell cell1 database_connection: ") and problem in message
    assert SECRET not in shown(e.value) and "a{b}c" not in shown(e.value)
    assert e.value.exit_code == ExitCode.REFUSED


def test_the_refusal_lists_the_variables_nova_fills() -> None:
    with pytest.raises(ConfigError) as e:
        format_cell_db_url("{scheme}://{user}@{hostname}/nova_cell1", DEFAULT)
    for name in ("scheme", "username", "password", "hostname", "port", "path", "query",
                 "fragment"):
        assert f"{{{name}}}" in str(e.value)


def test_a_template_without_a_default_url_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"\[database\] connection is not set"):
        format_cell_db_url(DEMO_TEMPLATE, None)


@pytest.mark.parametrize(
    "default",
    [
        f"mysql+pymysql://nova:{SECRET}@db.example:99999/nova",  # urlparse: port out of range
        f"mysql+pymysql://nova:{SECRET}@[db.example]:3306/nova",  # urlparse: no IPv6 address
        # Nova 34 reads a "," in the netloc as a host list and its parse_host_port
        # fails on "nova:pw" (port "pw"...): write the comma as %2C.
        f"mysql+pymysql://nova:{SECRET},x@db.example:3306/nova",
    ],
)
def test_a_default_url_nova_cannot_parse_fills_no_template(default: str) -> None:
    with pytest.raises(ConfigError, match="Nova cannot parse") as e:
        format_cell_db_url(DEMO_TEMPLATE, default)
    assert SECRET not in shown(e.value)
    plain = "mysql+pymysql://root:@127.0.0.1:3306/nova_cell1"
    assert format_cell_db_url(plain, default) == plain  # Nova's fallback is the text itself


def test_a_host_list_gives_indexed_variables() -> None:
    # oslo.messaging's form, which Nova supports in every cell URL.
    default = "mysql+pymysql://alice@otherhost,bob:s3kret@localhost:123/nova"
    template = "{scheme}://{username1}:{password2}@{hostname2}:{port2}/nova_cell1"
    assert format_cell_db_url(template, default) == (
        "mysql+pymysql://alice:s3kret@localhost:123/nova_cell1"
    )
