"""requirements.lock and the check that `make install` runs after installing it (scripts/check_lock.py).

The check runs against this interpreter's environment, which `make install` made from the lock.
"""

from __future__ import annotations

import re
from pathlib import Path

import check_lock
import pytest
from install_lock import LockError, Pin, read_lock

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements.lock"
PROJECT = "nova-flavor-sync[dev,airflow]"  # the extras `make install` installs


def _entries(text: str) -> list[str]:
    """The lock's requirements, one line each with its hashes; comments dropped."""
    lines = (line.strip() for line in text.replace("\\\n", " ").splitlines())
    return [" ".join(line.split()) for line in lines if line and not line.startswith("#")]


def _lock_copy(tmp_path: Path, edit) -> Path:
    text = LOCK.read_text()
    edited = edit(text)
    assert edited != text, "the edit changed nothing"
    path = tmp_path / "requirements.lock"
    path.write_text(edited)
    return path


def test_every_package_is_pinned_exactly_with_at_least_one_hash():
    entries = _entries(LOCK.read_text())
    assert len(entries) > 100
    for entry in entries:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[^\s;]+( --hash=sha256:[0-9a-f]{64})+", entry), entry[:120]
    names = {entry.split("==")[0].lower() for entry in entries}
    # The installer's own packages and the sdists' build backends: installed first, from here.
    assert {"pip", "setuptools", "wheel", "poetry-core", "pip-tools"} <= names


def test_read_lock_reads_every_entry():
    pins = read_lock(LOCK)
    assert len(pins) == len(_entries(LOCK.read_text()))
    assert pins["pymysql"].version == "1.1.3" and pins["pymysql"].hashes


@pytest.mark.parametrize(("line", "message"), [
    ("uvicorn>=0.15.0 --hash=sha256:" + "0" * 64, "not an exact pin"),
    ("uvicorn==0.54.0", "has no --hash"),
    ("--extra-index-url https://example.invalid/simple", "not an exact pin"),
])
def test_read_lock_refuses_what_cannot_be_installed_exactly(tmp_path, line, message):
    path = tmp_path / "requirements.lock"
    path.write_text(LOCK.read_text() + line + "\n")
    with pytest.raises(LockError, match=message):
        read_lock(path)


def test_the_real_lock_passes_the_check():
    assert check_lock.lock_problems(LOCK, PROJECT, REPO / "pyproject.toml") == []
    assert check_lock.pip_check() == []


def test_a_lock_missing_what_an_extra_requires_fails_naming_it_and_its_requirer(tmp_path):
    # httptools is needed only through extras: fastapi[standard] -> fastapi-cli[standard] ->
    # uvicorn[standard]. pip check cannot see that.
    lock = _lock_copy(tmp_path, lambda text: re.sub(r"^httptools==.*?(?=^\S)", "", text, flags=re.M | re.S))
    problems = check_lock.lock_problems(lock, PROJECT)
    assert [p for p in problems if re.fullmatch(
        r"requirements\.lock misses httptools, which uvicorn\[standard\]==\S+ requires \(httptools\S*\)", p)], problems
    # And the venv holds what the lock does not pin.
    assert [p for p in problems if re.fullmatch(r"the venv holds httptools==\S+, which requirements\.lock does not pin",
                                                p)], problems


def test_a_pin_outside_a_requirement_fails_naming_it_and_its_requirer(tmp_path, capsys):
    lock = _lock_copy(tmp_path, lambda text: text.replace("\npymysql==1.1.3 ", "\npymysql==1.0.2 "))
    assert check_lock.main(["--lock", str(lock), "--project", PROJECT]) == 1
    err = capsys.readouterr().err
    # What a user sees: the pin, who requires it, and what it requires.
    assert re.search(r"^check_lock: requirements\.lock pins pymysql==1\.0\.2, outside what nova-flavor-sync==\S+ "
                     r"requires \(PyMySQL[^)]*\)$", err, re.M), err
    assert "outside what apache-airflow-providers-mysql==" in err
    assert "check_lock: the venv holds pymysql==1.1.3, requirements.lock pins pymysql==1.0.2" in err
    assert "check_lock: FAILED" in err


def test_a_pin_nothing_requires_fails(tmp_path):
    extra = "left-over==1.0 --hash=sha256:" + "a" * 64 + "\n"
    lock = _lock_copy(tmp_path, lambda text: text + extra)
    problems = check_lock.lock_problems(lock, PROJECT)
    assert "requirements.lock pins left-over==1.0, which is not installed" in problems
    assert [p for p in problems if p.startswith("requirements.lock pins left-over==1.0, which nothing requires")]


def test_installed_versions_against_the_lock():
    pins = {"a": Pin("a", "1.1", ("sha256:x",)), "b": Pin("b", "2.0", ("sha256:y",))}
    assert check_lock.installed_problems(pins, {"a": "1.1", "b": "2.0.0"}) == []
    assert check_lock.installed_problems(pins, {"a": "1.0", "c": "3"}) == [
        "the venv holds a==1.0, requirements.lock pins a==1.1",
        "requirements.lock pins b==2.0, which is not installed",
        "the venv holds c==3, which requirements.lock does not pin",
    ]
    # A subset install (the Airflow image): only those pins, whatever else is there.
    assert check_lock.installed_problems(pins, {"a": "1.1", "c": "3"}, only=["a"]) == []
