# nbdnats — the two commands that matter on a fresh machine are `make demo` and `make test`.
VENV    ?= .venv
BIN     := $(VENV)/bin
CARGO   := cargo --quiet
SHELL   := bash
.SHELLFLAGS := -eo pipefail -c
# maturin reruns pip for the dependencies; keep its chatter out of the way.
QUIET_PIP := grep -vE '^(Ignoring|Requirement already|Looking in)' || true
MANIFEST := --manifest-path ext/Cargo.toml

.PHONY: help bootstrap installer-image build-dev build-prod lint fmt test test-rust test-py demo bench bench-quick bench-deps clean

help:
	@echo "make demo        bootstrap, build, and copy a 1 GiB sparse disk through NATS"
	@echo "make test        bootstrap, build, lint, and run every test"
	@echo "make build-dev   debug build of the core into the venv"
	@echo "make build-prod  release build of the core into the venv"
	@echo "make lint        clippy, rustfmt, ruff, mypy, stubtest"
	@echo "make bench       benchmark suite on a release build (bench/README.md)"
	@echo "make bench-quick a smaller benchmark run, about 3 minutes"
	@echo "make bench-deps  install the bench extra (matplotlib, for the plots)"
	@echo "make installer-image  the RAM-booted installer's base image (.cache/images/installer)"

bootstrap:
	@scripts/bootstrap.sh

# Cached by its inputs: a second run with nothing changed takes seconds.
installer-image: bootstrap
	@VENV=$(VENV) scripts/installer-image.sh

# The editable install runs the package from this tree; compile its bytecode here, as a
# wheel's installer would, so no run recompiles it (PYTHONDONTWRITEBYTECODE stops that).
build-dev: bootstrap
	@$(BIN)/maturin develop -q 2>&1 | { $(QUIET_PIP); }
	@$(BIN)/python -m compileall -q nbdnats

build-prod: bootstrap
	@$(BIN)/maturin develop -q --release 2>&1 | { $(QUIET_PIP); }
	@$(BIN)/python -m compileall -q nbdnats

lint: build-prod
	$(CARGO) fmt $(MANIFEST) -- --check
	$(CARGO) clippy $(MANIFEST) --all-targets -- -D warnings
	$(BIN)/ruff check nbdnats tests scripts bench
	$(BIN)/ruff format --check nbdnats tests scripts bench
	$(BIN)/mypy
	$(BIN)/python -m mypy.stubtest nbdnats._core

fmt:
	$(CARGO) fmt $(MANIFEST)
	$(BIN)/ruff format nbdnats tests scripts bench
	$(BIN)/ruff check --fix nbdnats tests scripts bench

test-rust: bootstrap
	$(CARGO) test $(MANIFEST)

test-py: build-prod bench-deps
	$(BIN)/pytest

test: lint test-rust test-py

demo: build-prod
	@PATH="$(CURDIR)/$(BIN):$$PATH" scripts/demo.sh

# The plots need matplotlib: the `bench` extra of pyproject.toml, installed only for this.
# Idempotent: pip runs only while an import fails, and the import is checked again after it.
bench-deps: bootstrap
	@$(BIN)/python -c 'import matplotlib' 2>/dev/null || { \
	  $(BIN)/python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["bench"]))' > $(VENV)/bench-requirements.txt; \
	  $(BIN)/python -m pip install -q -r $(VENV)/bench-requirements.txt 2>&1 | { $(QUIET_PIP); }; }
	@$(BIN)/python -c 'import matplotlib' \
	  || { echo "make: error: matplotlib did not install into $(VENV); run $(BIN)/python -m pip install 'matplotlib>=3.7'" >&2; exit 1; }

# Benchmarks: results in bench/results/<time>/ (results.json, PNG plots, summary.md).
bench: build-prod bench-deps
	$(BIN)/python -m bench.run --latest bench/results/latest.json

bench-quick: build-prod bench-deps
	$(BIN)/python -m bench.run --quick

clean:
	rm -rf ext/target .demo .pytest_cache .mypy_cache .ruff_cache

# control/accounts-*.conf are rendered by nbdnats.dev.accounts for the compose topology.
.PHONY: control
control: build-prod
	$(BIN)/python -c 'from nbdnats.dev import control_dir, write_accounts; write_accounts(control_dir())'
