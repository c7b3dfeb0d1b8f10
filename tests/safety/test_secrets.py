"""No password in any output: stdout, stderr, the log file, backups, exceptions (issue 4, part 5).

A real MariaDB account with a password runs every CLI mode, and a set of failing ones; then
every byte the runs produced is searched for the password, raw and percent-encoded.
"""

from __future__ import annotations

import traceback
from urllib.parse import quote

import pytest

from dbtools import SECRET
from nova_flavor_sync import cli, service
from nova_flavor_sync.dburl import parse_db_url
from nova_flavor_sync.errors import NovaFlavorSyncError

pytestmark = pytest.mark.db
from dbtools import assert_no_secret  # noqa: E402


def test_no_cli_mode_shows_the_password_anywhere(secret_account, demo_db, tmp_path, capsys, monkeypatch):
    user, url = secret_account
    files = ["--log-file", str(tmp_path / "logs" / "run.log"), "--backup-dir", str(tmp_path / "backups")]
    runs = [
        ["--db-url", url, "--verbose"],
        ["--db-url", url, "--run", "--all-keys", "--verbose"],
        ["--db-url", url, "--verify"],
        ["--list-backups"],
        ["--db-url", url.replace(demo_db.database, "nfs_no_such_db")],
        ["--db-url", url.replace("127.0.0.1", "127.0.0.1:1").replace(f":{demo_db.port}/", "/")],
        ["--db-url", url.replace("mysql+pymysql", "postgresql")],
        ["--db-url", url.replace(quote(SECRET, safe=""), "wrong" + SECRET[:3])],
        ["--db-ur1=" + url],
        [url],
    ]
    codes = []
    for args in runs:
        try:
            codes.append(cli.main([*files, *args]))
        except SystemExit as stop:  # argparse's usage errors
            codes.append(stop.code)
    backup = next((tmp_path / "backups").glob("flavor_copies_*.json"))
    for args in (["--db-url", url, "--restore", str(backup)], ["--db-url", url, "--restore", str(backup), "--run"]):
        codes.append(cli.main([*files, *args]))
    monkeypatch.setenv("NOVA_API_DB_URL", url)
    codes.append(cli.main([*files, "--verify"]))

    out, err = capsys.readouterr()
    assert codes == [3, 0, 0, 0, 4, 4, 4, 4, 2, 2, 3, 0, 3], out + err
    assert_no_secret(out, "stdout")
    assert_no_secret(err, "stderr")
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert_no_secret(path.read_text(encoding="utf-8", errors="replace"), str(path))
    assert user in out + err  # the user is shown, so the search above looked at real output


@pytest.mark.parametrize(
    "make_url",
    [
        lambda url, db: url.replace(db.database, "nfs_no_such_db"),
        lambda url, db: url.replace(quote(SECRET, safe=""), quote(SECRET + "x", safe="")),
        lambda url, db: url.replace(f":{db.port}/", ":1/"),
    ],
    ids=["unknown-database", "wrong-password", "closed-port"],
)
def test_connection_errors_carry_no_password_in_their_chain(secret_account, demo_db, make_url):
    _, url = secret_account
    with pytest.raises(NovaFlavorSyncError) as caught:
        service.connect(parse_db_url(make_url(url, demo_db)))
    assert_no_secret("".join(traceback.format_exception(caught.value)), "the exception chain")
    assert_no_secret(repr(caught.value.__context__) + repr(caught.value.__cause__), "the exception context")
