# nova-flavor-sync developer tasks. CI runs `bash .ci/run`, which is `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DB_HOST ?= 127.0.0.1
DB_PORT ?= 3306
DB_USER ?= root
DEMO_DB_URL ?= mysql+pymysql://$(DB_USER)@$(DB_HOST):$(DB_PORT)/nova_api_demo
# The demo's Airflow API server and UI: http://127.0.0.1:$(DEMO_PORT)/
DEMO_PORT ?= 8080
# The demo keeps everything inside the checkout, not in ~/airflow or ~/.nova-flavor-fixes:
# Airflow's home (metadata DB, logs, pids, the generated login) and the plans and backups.
DEMO_AIRFLOW_HOME := .demo/airflow
DEMO_DATA := .demo/data
export DB_HOST DB_PORT DB_USER

# Extra arguments for pytest, e.g. make test PYTEST_ARGS="tests/db -x"
PYTEST_ARGS ?=
# The suite runs in two pytest processes (pytest-xdist): most of it waits on servers, browsers
# and timers, so two share 2 cores well; each test file runs whole in one of them (see
# tests/conftest.py). TEST_PROCESSES= runs it in one. The tests marked serial (timings that do not
# hold beside another test process) run after, in a process of their own.
TEST_PROCESSES ?= -n 2 --dist loadgroup
# Extra arguments for pip-compile, e.g. make lock LOCK_ARGS=--upgrade
LOCK_ARGS ?=
LOCK_VENV ?= /tmp/nova-flavor-sync-lock-venv
# What make lock's pip-compile needs, installed into LOCK_VENV from the lock itself.
LOCK_TOOLS := pip,setuptools,wheel,pip-tools,build,pyproject-hooks,click,packaging

# Debian packages that building mysqlclient (apache-airflow-providers-mysql) needs, besides
# a C compiler and Python's headers. PyPI has no Linux wheel of mysqlclient: pip compiles it.
SYSTEM_DEPS ?= libmariadb-dev pkg-config
# Debian's headless-capable Chromium and its WebDriver (/usr/bin/chromium, /usr/bin/chromedriver):
# tests/airflow drive them with Selenium (tests/browser.py): approvals in Airflow's UI, the README's screenshot.
BROWSER_DEPS ?= chromium chromium-driver
# tests/galera start a three-node MariaDB Galera cluster of their own: mariadbd, the galera-4
# provider, and rsync for the joiners' state transfer (SST).
GALERA_DEPS ?= mariadb-server galera-4 rsync

.PHONY: install system-packages system-deps db-up test screenshot demo stop lock legacy-script clean

# system-packages first: a quick dpkg check when everything is there.
install: system-packages $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-installs only when the lock, the project metadata or the install scripts changed (so the
# system check below runs only then, too). Installs never resolve: the lock as written, by hash,
# --no-deps, the sdists built with the locked setuptools and poetry-core, then the project
# (editable) and scripts/check_lock.py. See scripts/install_lock.py.
$(STAMP): requirements.lock pyproject.toml scripts/install_lock.py scripts/check_lock.py | $(PY)
	@$(MAKE) --no-print-directory system-deps
	$(PY) scripts/install_lock.py
	touch $@

# Installs SYSTEM_DEPS, BROWSER_DEPS and GALERA_DEPS with apt-get when one is missing (as root; otherwise
# says what to run).
system-packages:
	@missing=$$(for p in $(SYSTEM_DEPS) $(BROWSER_DEPS) $(GALERA_DEPS); do \
	    dpkg-query -W -f='$${Status}\n' "$$p" 2>/dev/null | grep -q '^install ok installed$$' || echo "$$p"; done); \
	missing=$$(echo $$missing); \
	if [[ -n "$$missing" ]]; then \
	    if [[ $$(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then \
	        echo "system-packages: missing Debian packages: $$missing; as root, run:" >&2; \
	        echo "    apt-get update && apt-get install -y --no-install-recommends $$missing" >&2; \
	        echo "(elsewhere: MariaDB's or MySQL's client headers, pkg-config, Chromium and its chromedriver," \
	             "MariaDB server with the Galera 4 provider, rsync)" >&2; \
	        exit 1; \
	    fi; \
	    echo "system-packages: installing $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes \
	        apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# The Debian packages above, then a C compiler and Python's headers, which mysqlclient's
# build needs too.
system-deps: system-packages
	@cc=$$($(PYTHON) -c 'import sysconfig; print((sysconfig.get_config_var("CC") or "cc").split()[0])'); \
	command -v "$${CC:-$$cc}" >/dev/null 2>&1 || { \
	    echo "system-deps: no C compiler ($${CC:-$$cc}) to build mysqlclient: apt-get install gcc" >&2; exit 1; }
	@inc=$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
	[[ -f "$$inc/Python.h" ]] || { \
	    echo "system-deps: $(PYTHON) has no headers ($$inc/Python.h) to build mysqlclient:" \
	         "apt-get install python3-dev (Debian's python3), or a Python built with its headers" >&2; exit 1; }

db-up:
	bash scripts/ensure-mariadb

test: install db-up
	$(PY) -m pytest $(TEST_PROCESSES) -m "not serial" $(PYTEST_ARGS) || [[ $$? -eq 5 ]]  # 5: none chosen
	$(PY) -m pytest -p no:xdist -m serial $(PYTEST_ARGS) || [[ $$? -eq 5 ]]

# Takes the README's screenshots again: the approval page (docs/images/approval-page.png) and
# the drift page (docs/images/drift-history.png) and the plan view (docs/images/plan-view.png).
screenshot: install db-up
	NFS_UPDATE_SCREENSHOT=1 $(PY) -m pytest tests/airflow/test_demo.py -k approval_page -s
	NFS_UPDATE_SCREENSHOT=1 $(PY) -m pytest tests/airflow/test_drift_page.py -k browser -s
	NFS_UPDATE_SCREENSHOT=1 $(PY) -m pytest tests/airflow/test_plan_view.py -k real_run -s

# A fresh copy of the demo cloud, an Airflow on 127.0.0.1:$(DEMO_PORT) left running (reused by
# the next `make demo` while it is healthy), and a dry run of nova_flavor_sync through it.
demo: install db-up
	mkdir -p .demo
	$(PY) -m nova_flavor_sync.demo --db-url '$(DEMO_DB_URL)' --replace
	$(PY) scripts/demo_airflow.py start --home $(DEMO_AIRFLOW_HOME) --port '$(DEMO_PORT)' \
	    --db-url '$(DEMO_DB_URL)' --data-dir $(DEMO_DATA)

# Stops the Airflow that `make demo` started (nothing else); fine when none is running.
stop:
	@if [[ -x $(PY) ]]; then $(PY) scripts/demo_airflow.py stop --home $(DEMO_AIRFLOW_HOME); \
	else echo "Nothing to stop: no $(VENV), so make demo never ran here"; fi

# The old command as the one file the old deployment recipe copies to /root/nova-fix-flavors.py: a
# zipapp of the engine (no demo data) that python3 runs, 3.11+ with PyMySQL (README: Coming from
# nova-fix-flavors.py). Stdlib only, no venv needed; the same bytes for the same sources.
#   make legacy-script LEGACY_PYTHON=/opt/openstack/nova-controller/bin/python   (its #! line)
LEGACY_SCRIPT ?= dist/nova-fix-flavors.py
LEGACY_PYTHON ?= /usr/bin/env python3

legacy-script:
	$(PYTHON) scripts/build_legacy_script.py --output '$(LEGACY_SCRIPT)' --python '$(LEGACY_PYTHON)'

# Benchmarks (issues 5 and 11): not part of `make test`. See bench/README.md and docs/benchmarks.md.
# Both flavor copies: nfs_bench_<mix>_<rows> (nova_api) and its cells nfs_bench_<mix>_<rows>_cell0..2,
# for each mix in BENCH_MIXES at ROWS and ROWS/10.
#   make bench-data ROWS=1000000 && make bench ROWS=1000000 && make bench-drop ROWS=1000000
ROWS ?= 100000
SEED ?= 1
BENCH_MIXES ?= clone distinct stale95 disagree
# Extra arguments for bench/make_data.py (e.g. --stale-fraction 0.3) and bench/run.py
# (e.g. make bench BENCH_ARGS="--repeat 1 --no-apply")
DATA_ARGS ?=
BENCH_ARGS ?=
BENCH_JSON ?= bench-$(ROWS).json
BENCH_URL = mysql+pymysql://$(DB_USER)@$(DB_HOST):$(DB_PORT)/nfs_bench
BENCH_TENTH = $(shell echo $$(( $(ROWS) / 10 )))

bench-data: install db-up
	set -e; for mix in $(BENCH_MIXES); do for rows in $(ROWS) $(BENCH_TENTH); do \
	    $(PY) bench/make_data.py --db-url "$(BENCH_URL)_$${mix}_$${rows}" --rows $$rows --mix $$mix \
	        --seed $(SEED) --replace $(DATA_ARGS); done; done

bench: install db-up
	$(PY) bench/run.py $(foreach mix,$(BENCH_MIXES),--db-url '$(BENCH_URL)_$(mix)_$(ROWS)' \
	    --db-url '$(BENCH_URL)_$(mix)_$(BENCH_TENTH)') --rows-check --json '$(BENCH_JSON)' $(BENCH_ARGS)

bench-drop: install
	set -e; for mix in $(BENCH_MIXES); do for rows in $(ROWS) $(BENCH_TENTH); do \
	    $(PY) bench/make_data.py --db-url "$(BENCH_URL)_$${mix}_$${rows}" --drop; done; done

# The one place that resolves. pip-tools lives in a throwaway venv outside the repo, installed
# from the lock itself (LOCK_TOOLS, by hash); the pins already in requirements.lock are kept
# unless LOCK_ARGS says --upgrade. The machine's pip config (extra indexes, find-links,
# constraints) is ignored, so the lock only points at the default index. Resolving needs
# mysqlclient's metadata, which its setup.py gets from pkg-config: system-deps.
lock: system-deps
	[[ -x $(LOCK_VENV)/bin/python ]] || $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python scripts/install_lock.py --only $(LOCK_TOOLS)
	env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
	    CUSTOM_COMPILE_COMMAND="make lock" \
	    $(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes --extra dev --extra airflow --strip-extras --allow-unsafe --no-emit-index-url \
	    --output-file requirements.lock $(LOCK_ARGS) pyproject.toml

clean: stop
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache build dist include/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
