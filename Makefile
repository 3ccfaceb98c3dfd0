# The commands README.md promises. Everything lands in .venv and ./var; nothing system-wide
# except what .ci/run installs with apt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv run test lint bench proto clean

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
	$(BIN)/ruff check agentd tests
	$(BIN)/mypy agentd

bench: venv
	$(BIN)/python -m tests.bench.run $(BENCH_ARGS)

# Regenerates the committed stubs in agentd/api/gen from proto/ (grpcio-tools is pinned).
proto: venv
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) var build *.egg-info
