"""Build the old command as one file: ``make legacy-script`` -> dist/nova-fix-flavors.py.

The old deployment recipe copies one file to ``/root/nova-fix-flavors.py`` and runs it with
``python3``. This builds that file: a zipapp (PEP 441: a ``#!`` line, then a zip archive with a
``__main__.py``, which python3 runs as it runs a script) holding the nova_flavor_sync package
(not its demo data) and ``__main__.py``, which calls ``nova_flavor_sync.legacy_cli.main``: the
same code as the installed ``nova-fix-flavors.py`` and ``nova-flavor-sync`` commands.

What the controller needs: Python 3.11 or newer and PyMySQL (Nova's own database driver), each
checked first with a clear message (exit 4, nothing opened). orjson is used when it is there;
without it a stand-in inside the file does the same with json (the engine parses with json
whenever orjson refuses a text anyway, so what it reads and writes is the same; only slower).

The file is the same bytes for the same sources (fixed entry times and order). Stdlib only:
run it with any python3 (3.8+), no venv needed.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "include" / "nova_flavor_sync"
DEFAULT_OUTPUT = ROOT / "dist" / "nova-fix-flavors.py"
DEFAULT_PYTHON = "/usr/bin/env python3"
FALLBACK_DIR = "_fallback"  # on sys.path after site-packages: only what is not installed is taken from it
ENTRY_TIME = (2000, 1, 1, 0, 0, 0)

MAIN = '''\
# nova-fix-flavors.py as one file: this zip holds the nova_flavor_sync package; python3 runs this
# __main__.py. Built by `make legacy-script` (scripts/build_legacy_script.py) from nova-flavor-sync.
import os
import sys

REFUSED = 4  # refused before anything was opened (nova-flavor-sync's exit code)
if sys.version_info < (3, 11):
    sys.stderr.write("ERROR: nova-fix-flavors.py needs Python 3.11 or newer; %s is %s. Run it with a newer "
                     "python3 (e.g. /usr/bin/python3.11 %s).\\n" % (sys.executable, sys.version.split()[0],
                                                                     sys.argv[0]))
    sys.exit(REFUSED)
try:
    import pymysql  # noqa: F401
except ImportError:
    sys.stderr.write("ERROR: nova-fix-flavors.py needs PyMySQL, which %s cannot import. Run it with the python "
                     "of Nova's own environment, or install PyMySQL (python3-pymysql).\\n" % sys.executable)
    sys.exit(REFUSED)
# After site-packages: a real orjson wins; without one, the stand-in in this file is used.
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "@FALLBACK@"))

from nova_flavor_sync.legacy_cli import main  # noqa: E402

sys.exit(main())
'''.replace("@FALLBACK@", FALLBACK_DIR)

ORJSON_STAND_IN = '''\
"""What nova_flavor_sync uses of orjson, done by json: for a controller without orjson.

Only imported when no real orjson is installed (it is on sys.path after site-packages).
Reading: the engine falls back to json whenever orjson refuses a text, so json alone reads the
same values. Writing: backups encode single strings with it; json writes the same strings (its
escapes may differ, which the backup's checksum, taken over the bytes written, allows).
"""

import json

JSONDecodeError = json.JSONDecodeError


def loads(data):
    if isinstance(data, memoryview):
        data = data.tobytes()
    return json.loads(data)


def dumps(value):
    return json.dumps(value, ensure_ascii=False).encode("utf-8")
'''


def package_files() -> list[tuple[str, bytes]]:
    """(name in the zip, content) of every module of the package, without the demo data."""
    files = []
    for path in sorted(PACKAGE.glob("*.py")):
        files.append((f"nova_flavor_sync/{path.name}", path.read_bytes()))
    if not any(name.endswith("/legacy_cli.py") for name, _ in files):
        sys.exit(f"build_legacy_script: {PACKAGE} has no legacy_cli.py")
    return files


def build(output: Path, python: str) -> Path:
    entries = [("__main__.py", MAIN.encode()), *package_files(),
               (f"{FALLBACK_DIR}/orjson.py", ORJSON_STAND_IN.encode())]
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    with open(tmp, "wb") as out:
        out.write(b"#!" + python.encode() + b"\n")
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, content in entries:
                info = zipfile.ZipInfo(name, date_time=ENTRY_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                archive.writestr(info, content)
    os.chmod(tmp, 0o755)
    os.replace(tmp, output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="default %(default)s")
    parser.add_argument("--python", default=DEFAULT_PYTHON,
                        help="the #! line's interpreter (default %(default)s), e.g. the python of Nova's venv")
    args = parser.parse_args(argv)
    if not args.python.strip() or "\n" in args.python:
        parser.error("--python must be one line")
    path = build(args.output, args.python.strip())
    print(f"Built {path} ({path.stat().st_size} bytes): copy it to /root/nova-fix-flavors.py and run it with "
          "python3 (3.11+, with PyMySQL)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
