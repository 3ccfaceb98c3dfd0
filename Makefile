# The commands README.md promises. Everything lands in .venv and ./var; nothing system-wide
# except what .ci/run installs with apt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv run test lint bench soak proto clean install vm-test

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The daemon in the foreground, development mode: config agentd.dev.toml, state, socket and
# logs under ./var, the repository's policies/. Needs root (namespaces, cgroups, mounts).
run: venv
	$(BIN)/agentd --config agentd.dev.toml

test: venv
	$(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check agentd agentd_client tests
	$(BIN)/mypy agentd agentd_client

bench: venv
	$(BIN)/python -m tests.bench.run $(BENCH_ARGS)

# 10,000 mixed calls against one daemon, then leaks looked for from outside (fds, mounts,
# cgroups, network namespaces, processes, zombies, RSS). `make test` runs a short one.
soak: venv
	$(BIN)/python -m tests.soak --calls 10000 $(SOAK_ARGS)

# Installs agentd on this host as a systemd service (needs root): wheel -> /opt/agentd, units,
# groups (sysusers), directories (tmpfiles). See README "Running as a service".
install: venv
	rm -rf dist && $(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist .
	scripts/install.sh dist/agentd-*.whl

# Boots a Debian VM with systemd and cgroup v2 (QEMU, TCG), installs the wheel and units, runs
# the end-to-end suite inside. Cache: vm-tests/cache/; console log: vm-tests/cache/console.log.
vm-test: venv
	vm-tests/run.sh

# Regenerates the committed stubs in agentd_client/v1 from proto/ (grpcio-tools is pinned).
proto: venv
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) var build *.egg-info
