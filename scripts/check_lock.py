#!/usr/bin/env python3
"""Check that this interpreter's environment is requirements.lock, and that the lock is complete.

Run by scripts/install_lock.py after every install, with the interpreter it installed into.
Fails (exit 1), naming each problem, when:

- ``pip check`` finds a broken requirement;
- the venv holds a distribution the lock does not pin, or at another version, or lacks a pin;
- the lock misses a requirement of the project (with its extras), or pins a version outside
  it. ``pip check`` cannot see this: it ignores extras. Here every Requires-Dist is followed
  from the installed project, with the extras asked for at each step (fastapi[standard] ->
  fastapi-cli[standard] -> uvicorn[standard] -> httptools...), markers evaluated for this
  interpreter; the project's build-system requirements are checked too;
- the lock pins something nothing requires.

With ``--only NAME,NAME`` (a subset installed into an environment the lock does not own, such
as the Airflow image) only those pins are checked, and ``pip check``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import tomllib
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

from install_lock import DEFAULT_EXTRAS, REPO, LockError, Pin, canonical, installed_versions, read_lock
from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

Dist = importlib.metadata.Distribution


def _same_version(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def installed_distributions() -> dict[str, Dist]:
    """canonical name -> the distribution this interpreter imports (the first on sys.path)."""
    found: dict[str, Dist] = {}
    for dist in importlib.metadata.distributions():
        if name := dist.metadata["Name"]:
            found.setdefault(canonical(name), dist)
    return found


def _shown(req: Requirement) -> str:
    """The requirement without its marker: what was asked for."""
    return str(req).split(";")[0].strip()


def _requirements(dist: Dist, display: str, extra: str) -> Iterator[tuple[Requirement, str]]:
    """(requirement, who requires it) for what ``dist`` needs with ``extra`` ("" for its base
    requirements; for an extra, only what the extra adds)."""
    requirer = f"{display}[{extra}]=={dist.version}" if extra else f"{display}=={dist.version}"
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None:
            wanted = not extra
        elif extra:
            wanted = req.marker.evaluate({"extra": extra}) and not req.marker.evaluate({"extra": ""})
        else:
            wanted = req.marker.evaluate({"extra": ""})
        if wanted:
            yield req, requirer


def requirement_problems(pins: dict[str, Pin], project: str, dists: dict[str, Dist],
                         build_requires: Iterable[str] = ()) -> list[str]:
    """Follow every requirement from the installed ``project`` ("name[extra,extra]") through
    the installed distributions; each must be pinned by the lock, within its specifier."""
    root = Requirement(project)
    root_dist = dists.get(canonical(root.name))
    if root_dist is None:
        return [f"{root.name} is not installed: no requirements to check requirements.lock against"]
    queue: deque[tuple[Requirement, str]] = deque()
    for extra in ("", *sorted(canonical(e) for e in root.extras)):
        queue.extend(_requirements(root_dist, root.name, extra))
    queue.extend((Requirement(text), f"{root.name}'s build-system (pyproject.toml)") for text in build_requires)

    problems: list[str] = []
    expanded: set[tuple[str, str]] = set()
    reached: set[str] = set()
    while queue:
        req, requirer = queue.popleft()
        name = canonical(req.name)
        pin = pins.get(name)
        if pin is None:
            problems.append(f"requirements.lock misses {req.name}, which {requirer} requires ({_shown(req)})")
            continue
        reached.add(name)
        if not req.specifier.contains(pin.version, prereleases=True):
            problems.append(f"requirements.lock pins {pin.name}=={pin.version}, outside what {requirer} "
                            f"requires ({_shown(req)})")
        dist = dists.get(name)
        if dist is None:
            continue  # reported by installed_problems
        for extra in ("", *sorted(canonical(e) for e in req.extras)):
            if (name, extra) not in expanded:
                expanded.add((name, extra))
                queue.extend(_requirements(dist, pin.name, extra))
    for name in sorted(pins.keys() - reached):
        pin = pins[name]
        problems.append(f"requirements.lock pins {pin.name}=={pin.version}, which nothing requires "
                        f"(from {project} and its build-system)")
    return problems


def installed_problems(pins: dict[str, Pin], installed: dict[str, str], *, only: list[str] | None = None,
                       ignore: tuple[str, ...] = ()) -> list[str]:
    """The installed versions against the lock: every pin (or only these) installed at its
    version; with ``only`` None, nothing installed beyond the lock (but ``ignore``)."""
    problems = []
    for name in only if only is not None else sorted(pins):
        pin = pins[name]
        version = installed.get(name)
        if version is None:
            problems.append(f"requirements.lock pins {pin.name}=={pin.version}, which is not installed")
        elif not _same_version(version, pin.version):
            problems.append(f"the venv holds {pin.name}=={version}, requirements.lock pins {pin.name}=={pin.version}")
    if only is None:
        for name in sorted(installed.keys() - pins.keys() - {canonical(n) for n in ignore}):
            problems.append(f"the venv holds {name}=={installed[name]}, which requirements.lock does not pin")
    return problems


def lock_problems(lock: Path, project: str, pyproject: Path | None = None) -> list[str]:
    """Everything but ``pip check``, for the whole lock and the installed project."""
    pins = read_lock(lock)
    build_requires = tomllib.loads(pyproject.read_text())["build-system"]["requires"] if pyproject else []
    problems = installed_problems(pins, installed_versions(), ignore=(Requirement(project).name,))
    return problems + requirement_problems(pins, project, installed_distributions(), build_requires)


def pip_check() -> list[str]:
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    if done.returncode == 0:
        return []
    return [f"pip check: {line}" for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", type=Path, default=REPO / "requirements.lock")
    parser.add_argument("--project", default=f"nova-flavor-sync[{DEFAULT_EXTRAS}]",
                        help="the installed project and its extras to follow (default %(default)s)")
    parser.add_argument("--pyproject", type=Path, help="its pyproject.toml, for its build-system requirements")
    parser.add_argument("--only", metavar="NAME,NAME", help="check only these pins (a subset install)")
    args = parser.parse_args(argv)

    try:
        if args.only:
            pins = read_lock(args.lock)
            names = [canonical(n) for n in args.only.split(",") if n.strip()]
            if unknown := [n for n in names if n not in pins]:
                raise LockError(f"{args.lock.name} pins no {', '.join(unknown)}")
            problems = installed_problems(pins, installed_versions(), only=names)
            what = f"{len(names)} pins of {args.lock.name}"
        else:
            problems = lock_problems(args.lock, args.project, args.pyproject)
            what = f"{args.lock.name} and every requirement of {args.project}"
    except (OSError, LockError) as exc:
        print(f"check_lock: {exc}", file=sys.stderr)
        return 1
    problems += pip_check()
    if problems:
        for problem in problems:
            print(f"check_lock: {problem}", file=sys.stderr)
        print(f"check_lock: FAILED: {len(problems)} problem(s) with {what}. The lock is the truth: "
              "fix pyproject.toml and run `make lock`, or reinstall (`make clean install`).", file=sys.stderr)
        return 1
    print(f"check_lock: ok: {what}; pip check: no broken requirements")
    return 0


if __name__ == "__main__":
    sys.exit(main())
